"""Paged KV-cache bookkeeping: fixed-size blocks, reference counts and a prefix cache.

Pure Python and tensor-free: the model runner owns the KV tensors; this module only decides
which block ids each request's tokens live in. Token `t` of a request lives in slot
`block_table[t // block_size] * block_size + t % block_size`.

Prefix cache: a full block is identified by the chain hash `hash_block(parent_hash, tokens)`,
so equal hashes mean "same tokens after the same prefix". A hash hit is verified by comparing
the block's tokens and parent hash, so a 64-bit collision can cost a cache miss but never
wrong KV. A block is registered (`cache_blocks`) only after its KV has been computed, i.e.
from `Scheduler.update()` after the forward ran: a request aborted or failed before its
forward never publishes blocks holding garbage. Blocks whose last user is gone keep their
hash in an LRU "evictable" set and are recycled only when the plain free list is empty.

Block 0 is reserved: the model runner writes padding/scratch slots there (as TGI does), so it
is never handed out and never counted as usable.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from genserve.engine.request import Request, RequestStatus

logger = logging.getLogger(__name__)

RESERVED_BLOCK_ID = 0


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """Chain hash of one full block. In-process only, so Python's `hash` is enough;
    hits are verified by token equality anyway."""
    return hash((parent_hash, token_ids))


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full, computed and registered
    parent_hash: int | None = None
    token_ids: tuple[int, ...] = ()

    def reset(self) -> None:
        self.hash = None
        self.parent_hash = None
        self.token_ids = ()


@dataclass(slots=True)
class PrefixHit:
    """Cached full blocks matching the head of a request's tokens.

    Valid only until the block manager is next mutated: look up, then allocate at once.
    """

    block_ids: list[int] = field(default_factory=list)
    num_tokens: int = 0
    last_hash: int | None = None


@dataclass(slots=True)
class _RequestState:
    """How far a live request's blocks have been hashed (the chain continues from last_hash)."""

    num_hashed_blocks: int = 0
    last_hash: int | None = None


class BlockManager:
    """Hands out KV blocks to requests, shares cached prefix blocks between them."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is reserved), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # refcount 0, no hash: handed out first (FIFO)
        self._free: deque[int] = deque(range(1, num_blocks))
        # refcount 0, hashed: oldest first; evicted only when `_free` is empty
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._hash_to_block: dict[int, int] = {}
        # requests currently holding blocks (Request has identity hashing: eq=False)
        self._live: dict[Request, _RequestState] = {}

    # ----------------------------------------------------------------------------- counts
    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: plain free ones plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache (in use or evictable)."""
        return len(self._hash_to_block)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks held by live requests (0.0 .. 1.0)."""
        return self.num_used_blocks / self.num_usable_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------------- allocation
    def lookup_prefix(self, req: Request) -> PrefixHit:
        """Longest run of cached full blocks at the head of `req.all_token_ids`.

        Only blocks strictly before the block holding the last token are considered, so at
        least one token is always computed (its logits are needed) and that recomputation
        always writes into a block the request owns alone. Requests that want prefill
        logprobs skip the cache (as in TGI): they need logits for every prompt token.
        """
        hit = PrefixHit()
        if not self.enable_prefix_caching or req.prefill_logprobs or req.block_table:
            return hit
        bs = self.block_size
        ids = req.all_token_ids
        parent: int | None = None
        for i in range((len(ids) - 1) // bs):
            tokens = tuple(ids[i * bs : (i + 1) * bs])
            h = hash_block(parent, tokens)
            block_id = self._hash_to_block.get(h)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.token_ids != tokens or block.parent_hash != parent:
                break  # hash collision: a miss, never wrong KV
            hit.block_ids.append(block_id)
            parent = h
        hit.num_tokens = len(hit.block_ids) * bs
        hit.last_hash = parent
        return hit

    def blocks_needed(self, req: Request, num_tokens: int, hit: PrefixHit | None = None) -> int:
        """Blocks `allocate(req, num_tokens, hit)` would take out of `num_free_blocks`:
        fresh blocks plus evictable cached blocks the hit pins."""
        have = len(req.block_table)
        pinned = 0
        if hit is not None:
            have += len(hit.block_ids)
            pinned = sum(1 for b in hit.block_ids if self.blocks[b].ref_count == 0)
        return max(0, self.num_blocks_for(num_tokens) - have) + pinned

    def can_allocate(self, req: Request, num_tokens: int, hit: PrefixHit | None = None) -> bool:
        return self.blocks_needed(req, num_tokens, hit) <= self.num_free_blocks

    def allocate(self, req: Request, num_tokens: int, hit: PrefixHit | None = None) -> bool:
        """Grow `req.block_table` to cover `num_tokens` tokens; all or nothing.

        On a request's first allocation, `hit` (from `lookup_prefix`, taken just before) is
        pinned as the head of its table; `req.num_computed_tokens` jumps to the cached length
        and, unless the request is a preempted one coming back, `req.num_cached_tokens`
        records how many prompt tokens the cache served. Returns False (and changes nothing)
        when the free blocks do not suffice.
        """
        if self.blocks_needed(req, num_tokens, hit) > self.num_free_blocks:
            return False
        if req not in self._live:
            assert not req.block_table, f"{req.request_id}: blocks not owned by this manager"
            state = _RequestState()
            self._live[req] = state
            cached = 0
            if hit is not None and hit.block_ids:
                for block_id in hit.block_ids:
                    self._pin(block_id)
                req.block_table = list(hit.block_ids)
                state.num_hashed_blocks = len(hit.block_ids)
                state.last_hash = hit.last_hash
                cached = hit.num_tokens
                req.num_computed_tokens = cached
            if req.status != RequestStatus.PREEMPTED:
                req.num_cached_tokens = min(cached, req.num_prompt_tokens)
        else:
            assert hit is None or not hit.block_ids, (
                "a prefix hit only applies to a first allocation"
            )
        for _ in range(self.num_blocks_for(num_tokens) - len(req.block_table)):
            req.block_table.append(self._take())
        return True

    def cache_blocks(self, req: Request) -> None:
        """Register every full block among `req`'s first `num_computed_tokens` tokens.

        Call after the forward that computed them (prefill chunks and decode alike). A block
        whose hash is already registered (another request computed the same tokens at the
        same time) stays private and returns to the free list when released.
        """
        state = self._live.get(req)
        if not self.enable_prefix_caching or state is None:
            return
        bs = self.block_size
        ids = req.all_token_ids
        num_full = min(req.num_computed_tokens, len(req.block_table) * bs) // bs
        while state.num_hashed_blocks < num_full:
            i = state.num_hashed_blocks
            tokens = tuple(ids[i * bs : (i + 1) * bs])
            h = hash_block(state.last_hash, tokens)
            block = self.blocks[req.block_table[i]]
            if block.hash is None and h not in self._hash_to_block:
                block.hash = h
                block.parent_hash = state.last_hash
                block.token_ids = tokens
                self._hash_to_block[h] = block.block_id
            state.last_hash = h
            state.num_hashed_blocks += 1

    def free(self, req: Request) -> None:
        """Release all of `req`'s blocks. Tail blocks are released first so that, within a
        request, they are evicted before the (more shareable) head blocks."""
        self._live.pop(req, None)
        for block_id in reversed(req.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                if block.hash is not None:
                    self._evictable[block_id] = None
                else:
                    self._free.append(block_id)
        req.block_table = []  # a new list: never mutate one a runner may still hold

    def reset_prefix_cache(self) -> int:
        """Drop every evictable cached block (e.g. after weights change). Returns the count."""
        n = len(self._evictable)
        while self._evictable:
            block_id, _ = self._evictable.popitem(last=False)
            self._forget(block_id)
            self._free.append(block_id)
        return n

    # --------------------------------------------------------------------------- internals
    def _pin(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._evictable[block_id]
        block.ref_count += 1

    def _take(self) -> int:
        if self._free:
            block_id = self._free.popleft()
        else:
            block_id, _ = self._evictable.popitem(last=False)  # least recently released
            self._forget(block_id)
        self.blocks[block_id].ref_count = 1
        return block_id

    def _forget(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.hash is not None and self._hash_to_block.get(block.hash) == block_id:
            del self._hash_to_block[block.hash]
        block.reset()

    # --------------------------------------------------------------------------- checking
    def check_integrity(self, live_requests: Iterable[Request] | None = None) -> None:
        """Assert the bookkeeping is consistent. O(num_blocks): for tests and idle checks.

        free + evictable + used == usable; no block in two places; block 0 untouched;
        refcounts equal the number of live block tables naming each block; every registered
        hash points at a block carrying it. With `live_requests`, also that exactly those
        requests hold blocks.
        """
        free, evictable = set(self._free), set(self._evictable)
        assert len(free) == len(self._free), "duplicate block in the free list"
        assert not free & evictable, "block both free and evictable"
        assert RESERVED_BLOCK_ID not in free | evictable, "reserved block 0 handed out"
        refs = [0] * self.num_blocks
        for req in self._live:
            for block_id in req.block_table:
                refs[block_id] += 1
        if live_requests is not None:
            given = set(live_requests)
            assert given == set(self._live), (
                f"live requests differ: extra {[r.request_id for r in given - set(self._live)]}"
                f", missing {[r.request_id for r in set(self._live) - given]}"
            )
        assert refs[RESERVED_BLOCK_ID] == 0 and self.blocks[0].ref_count == 0
        used = 0
        for block in self.blocks[1:]:
            bid = block.block_id
            assert block.ref_count == refs[bid], (
                f"block {bid}: ref {block.ref_count} != {refs[bid]}"
            )
            if block.hash is not None:
                assert self._hash_to_block.get(block.hash) == bid, f"block {bid} hash unindexed"
            if block.ref_count > 0:
                used += 1
                assert bid not in free and bid not in evictable, f"block {bid} used and free"
            elif bid in evictable:
                assert block.hash is not None, f"evictable block {bid} has no hash"
            else:
                assert bid in free, f"block {bid} leaked"
                assert block.hash is None, f"free block {bid} still hashed"
        assert len(free) + len(evictable) + used == self.num_usable_blocks
        for h, bid in self._hash_to_block.items():
            assert self.blocks[bid].hash == h, f"hash index points at block {bid} without it"
