"""BlockManager: allocation, refcounts, prefix cache, eviction; integrity after every op."""

from __future__ import annotations

import pytest

from genserve.engine import block_manager as bm_module
from genserve.engine.block_manager import BlockManager
from genserve.engine.request import Request, RequestStatus


def make_req(rid: str, tokens: list[int], **kw) -> Request:
    return Request(request_id=rid, prompt_token_ids=list(tokens), **kw)


def admit(bm: BlockManager, req: Request, *live: Request) -> int:
    """Look up the prefix cache, allocate the whole prompt, pretend the forward ran.
    Returns the number of tokens actually computed."""
    hit = bm.lookup_prefix(req)
    assert bm.allocate(req, req.num_tokens, hit)
    computed = req.num_tokens - req.num_computed_tokens
    req.num_computed_tokens = req.num_tokens
    bm.cache_blocks(req)
    bm.check_integrity([req, *live])
    return computed


def decode(bm: BlockManager, req: Request, token: int, *live: Request) -> None:
    """One decode step: the sampled token is appended, then its KV computed next step."""
    req.append_output_token(token)
    assert bm.allocate(req, req.num_tokens)
    req.num_computed_tokens = req.num_tokens
    bm.cache_blocks(req)
    bm.check_integrity([req, *live])


def test_allocate_and_free_never_hand_out_block_zero():
    bm = BlockManager(num_blocks=10, block_size=4)
    bm.check_integrity([])
    assert bm.num_usable_blocks == 9 and bm.num_free_blocks == 9 and bm.usage == 0.0
    a = make_req("a", range(10))
    assert bm.allocate(a, 10)
    assert len(a.block_table) == 3 and 0 not in a.block_table
    assert bm.num_free_blocks == 6 and bm.num_used_blocks == 3
    bm.check_integrity([a])
    assert bm.allocate(a, 12)  # still 3 blocks
    assert len(a.block_table) == 3
    b = make_req("b", range(24))
    assert bm.allocate(b, 24)
    assert 0 not in b.block_table and not set(a.block_table) & set(b.block_table)
    assert bm.num_free_blocks == 0 and bm.usage == 1.0
    bm.check_integrity([a, b])
    c = make_req("c", [1])
    assert not bm.can_allocate(c, 1)
    assert not bm.allocate(c, 1) and c.block_table == []
    bm.check_integrity([a, b])
    bm.free(a)
    assert a.block_table == [] and bm.num_free_blocks == 3
    bm.check_integrity([b])
    bm.free(b)
    assert bm.num_free_blocks == 9
    bm.check_integrity([])


def test_integrity_catches_corruption():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_req("a", [1, 2, 3])
    bm.allocate(a, 3)
    bm.blocks[a.block_table[0]].ref_count += 1
    with pytest.raises(AssertionError):
        bm.check_integrity([a])
    bm.blocks[a.block_table[0]].ref_count -= 1
    with pytest.raises(AssertionError):
        bm.check_integrity([])  # a is live but not listed


def test_shared_prefix_hits_and_refcounts():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_req("a", list(range(12)))
    assert admit(bm, a) == 12 and a.num_cached_tokens == 0
    assert bm.num_cached_blocks == 3
    b = make_req("b", list(range(8)) + [100, 101, 102])
    assert admit(bm, b, a) == 3
    assert b.num_cached_tokens == 8
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    bm.free(a)
    bm.check_integrity([b])
    assert [bm.blocks[i].ref_count for i in b.block_table] == [1, 1, 1]
    bm.free(b)
    bm.check_integrity([])
    assert bm.num_free_blocks == bm.num_usable_blocks  # cached blocks count as free


def test_whole_prompt_cached_backs_off_one_token():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_req("a", list(range(12)))
    admit(bm, a)
    # Same 12 tokens: the last full block holds the last prompt token, so it is not reused;
    # the recomputed tokens land in a block b owns alone.
    b = make_req("b", list(range(12)))
    assert admit(bm, b, a) == 4
    assert b.num_cached_tokens == 8
    assert b.block_table[:2] == a.block_table[:2] and bm.blocks[b.block_table[2]].ref_count == 1
    # One token past the cached blocks: all three blocks reused, one token computed.
    c = make_req("c", list(range(13)))
    assert admit(bm, c, a, b) == 1
    assert c.num_cached_tokens == 12 and c.block_table[:3] == a.block_table


def test_lookup_is_read_only_and_allocate_sets_computed():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_req("a", list(range(9)))
    admit(bm, a)
    b = make_req("b", list(range(9)))
    hit = bm.lookup_prefix(b)
    assert hit.num_tokens == 8 and b.num_computed_tokens == 0 and b.block_table == []
    bm.check_integrity([a])
    assert bm.allocate(b, 9, hit)
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    bm.check_integrity([a, b])


def test_hash_registered_during_decode():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_req("a", [1, 2, 3, 4, 5, 6])
    admit(bm, a)
    assert bm.num_cached_blocks == 1  # tokens 5, 6 do not fill a block yet
    decode(bm, a, 7)
    assert bm.num_cached_blocks == 1
    decode(bm, a, 8)
    assert bm.num_cached_blocks == 2  # [5, 6, 7, 8] filled during decode
    b = make_req("b", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert admit(bm, b, a) == 1 and b.num_cached_tokens == 8


def test_blocks_are_registered_only_once_computed():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_req("a", list(range(8)))
    assert bm.allocate(a, 8)
    bm.cache_blocks(a)  # nothing computed yet
    assert bm.num_cached_blocks == 0
    a.num_computed_tokens = 5  # a chunk ended mid-block
    bm.cache_blocks(a)
    assert bm.num_cached_blocks == 1
    bm.check_integrity([a])


def test_lru_eviction_of_free_cached_blocks():
    bm = BlockManager(num_blocks=5, block_size=2)  # 4 usable
    a = make_req("a", [1, 2, 3, 4])
    admit(bm, a)
    a_table = list(a.block_table)
    bm.free(a)
    b = make_req("b", [5, 6, 7, 8])
    admit(bm, b)
    bm.free(b)
    bm.check_integrity([])
    assert bm.num_cached_blocks == 4 and bm.num_free_blocks == 4
    # Nothing plainly free: the least recently released block (a's tail) is evicted.
    c = make_req("c", [9])
    assert bm.allocate(c, 1)
    assert c.block_table == [a_table[1]]
    bm.check_integrity([c])
    assert bm.num_cached_blocks == 3
    a2 = make_req("a2", [1, 2, 3, 4, 0])
    assert bm.lookup_prefix(a2).num_tokens == 2  # a's head survived, its tail did not
    b2 = make_req("b2", [5, 6, 7, 8, 0])
    assert bm.lookup_prefix(b2).num_tokens == 4


def test_lru_order_follows_release_time_and_hits_refresh():
    bm = BlockManager(num_blocks=4, block_size=2)  # 3 usable
    a = make_req("a", [1, 2, 0])
    admit(bm, a)
    bm.free(a)  # a's [1, 2] block: evictable
    b = make_req("b", [3, 4, 0])
    admit(bm, b)
    bm.free(b)  # b's [3, 4] block: evictable, released later
    a2 = make_req("a2", [1, 2, 9])
    admit(bm, a2)  # pins a's block again
    assert a2.num_cached_tokens == 2
    bm.free(a2)  # [1, 2] now the most recently released
    c = make_req("c", [7, 7, 7, 7, 7])
    assert bm.allocate(c, 5)  # 3 blocks: must evict both cached ones
    bm.check_integrity([c])
    assert bm.num_cached_blocks == 0
    bm.free(c)
    d = make_req("d", [5, 5, 5, 5])
    e = make_req("e", [6, 6])
    admit(bm, d)
    bm.free(d)
    admit(bm, e)  # takes a plain free block before evicting anything
    assert bm.num_cached_blocks == 3
    bm.check_integrity([e])


def test_forced_hash_collision_is_a_miss(monkeypatch):
    monkeypatch.setattr(bm_module, "hash_block", lambda parent, tokens: 42)
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_req("a", [1, 2, 3, 4, 5])
    admit(bm, a)
    assert bm.num_cached_blocks == 1
    b = make_req("b", [9, 9, 9, 9, 5])
    assert admit(bm, b, a) == 5 and b.num_cached_tokens == 0
    assert not set(a.block_table) & set(b.block_table)
    assert bm.num_cached_blocks == 1  # b's colliding block is not registered
    # Same tokens after a different parent also collide here: still a miss.
    c = make_req("c", [1, 2, 3, 4, 1, 2, 3, 4, 0])
    assert admit(bm, c, a, b) == 5 and c.num_cached_tokens == 4
    bm.free(b)
    bm.check_integrity([a, c])
    assert bm.num_free_blocks == bm.num_usable_blocks - len(a.block_table) - 2


def test_duplicate_blocks_computed_concurrently_stay_private():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_req("a", list(range(9)))
    b = make_req("b", list(range(9)))
    for r in (a, b):
        assert bm.allocate(r, 9, bm.lookup_prefix(r))
    for r in (a, b):
        r.num_computed_tokens = 9
        bm.cache_blocks(r)
    bm.check_integrity([a, b])
    assert bm.num_cached_blocks == 2
    bm.free(b)
    bm.free(a)
    bm.check_integrity([])
    assert bm.num_cached_blocks == 2 and bm.num_free_blocks == 15


def test_prefill_logprobs_and_disabled_cache_skip_lookup():
    bm = BlockManager(num_blocks=16, block_size=4)
    admit(bm, a := make_req("a", list(range(9))))
    b = make_req("b", list(range(9)), prefill_logprobs=True)
    assert admit(bm, b, a) == 9 and b.num_cached_tokens == 0
    off = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=False)
    c = make_req("c", list(range(9)))
    admit(off, c)
    assert off.num_cached_blocks == 0
    off.free(c)
    d = make_req("d", list(range(9)))
    assert admit(off, d) == 9
    off.check_integrity([d])


def test_failed_allocation_with_hit_changes_nothing():
    bm = BlockManager(num_blocks=5, block_size=2)  # 4 usable
    a = make_req("a", [1, 2, 3, 4, 5])
    admit(bm, a)
    bm.free(a)  # two cached evictable blocks, one plain free block
    b = make_req("b", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    hit = bm.lookup_prefix(b)
    assert hit.num_tokens == 4
    assert bm.blocks_needed(b, 10, hit) == 5  # 3 fresh + 2 pinned evictable
    assert not bm.allocate(b, 10, hit)
    assert b.block_table == [] and b.num_computed_tokens == 0
    bm.check_integrity([])
    assert bm.num_cached_blocks == 2 and bm.num_free_blocks == 4
    assert bm.allocate(b, 8, hit)
    assert b.num_cached_tokens == 4
    bm.check_integrity([b])


def test_preempted_request_keeps_its_first_cached_count():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_req("a", list(range(8)))
    admit(bm, a)
    a.append_output_token(50)
    bm.free(a)
    a.num_computed_tokens = 0
    a.status = RequestStatus.PREEMPTED
    # Re-entry looks up over prompt + generated tokens, but num_cached_tokens (prompt tokens
    # served on the first schedule) is left alone.
    assert admit(bm, a) == 1 and a.num_cached_tokens == 0 and a.num_computed_tokens == 9


def test_constructor_validates():
    with pytest.raises(ValueError):
        BlockManager(num_blocks=1, block_size=4)
    with pytest.raises(ValueError):
        BlockManager(num_blocks=4, block_size=0)
