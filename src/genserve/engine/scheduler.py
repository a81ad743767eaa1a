"""Continuous batching: one token-budgeted loop per step (vLLM v1 style).

Every request's `num_computed_tokens` catches up with its `num_tokens` (prompt + generated).
Each step gives the budget (`max_num_batched_tokens`, TGI's `--max-batch-prefill-tokens`) first
to running requests in order (a decode takes 1 token, an unfinished chunked prefill takes what
is left of its prompt, capped by the budget), then to waiting requests in FIFO order. A prompt
longer than the remaining budget is simply chunked over several steps, so decodes keep flowing
while it is prefilled. No phase flags: prefill, chunked prefill, decode and prefix-cache hits
are the same arithmetic.

When blocks run out for a running request, the lowest-priority running request (the last one
in `running`) is preempted by recompute: its blocks are freed, its computed count reset, and it
goes back to the front of `waiting`. It keeps its generated tokens; on re-admission the prefix
cache is consulted over all of them, so often little is actually recomputed.

`max_batch_total_tokens` (TGI's `--max-batch-total-tokens`), when set, caps the KV slots held
by live requests: used blocks * block_size <= max_batch_total_tokens. It acts exactly like a
smaller cache. Requests that could never fit the cache (prompt + max_new_tokens) must be
rejected by validation; the scheduler assumes every request fits on its own.

Engine call order per step: `schedule()` -> runner executes it (read `ScheduledRequest.samples`
/ `start` / `end` before `update()`, they read the live computed count) -> `update(output)` ->
append sampled tokens with `req.append_output_token` -> stopping -> `finish(req, status)`.
Aborts (`abort(request_id)`) go between steps.
"""

from __future__ import annotations

import logging
from collections import deque

from genserve.config import SchedulerConfig
from genserve.engine.block_manager import BlockManager, PrefixHit
from genserve.engine.request import Request, RequestStatus
from genserve.engine.scheduler_output import ScheduledRequest, SchedulerOutput

logger = logging.getLogger(__name__)


class Scheduler:
    """Owns the waiting and running queues and decides each step's batch."""

    def __init__(self, scheduler_config: SchedulerConfig, block_manager: BlockManager):
        self.config = scheduler_config
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._requests: dict[str, Request] = {}  # unfinished requests by id, for abort
        # finish()/abort() only mark; queues are compacted once per step, so finishing many
        # requests in one step stays O(n) instead of O(n^2) list removals.
        self._needs_compaction = False
        total = scheduler_config.max_batch_total_tokens
        self._max_used_blocks = (
            block_manager.num_usable_blocks
            if total is None
            else min(block_manager.num_usable_blocks, total // block_manager.block_size)
        )

    # ------------------------------------------------------------------------------ queues
    def add_request(self, req: Request) -> None:
        if req.request_id in self._requests:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        assert not req.block_table and not req.is_finished
        req.status = RequestStatus.WAITING
        self._requests[req.request_id] = req
        self.waiting.append(req)

    def abort(self, request_id: str) -> Request | None:
        """Abort an unfinished request: free its blocks at once, status FINISHED_ABORTED.
        Returns it, or None if it is unknown or already finished."""
        req = self._requests.get(request_id)
        if req is None:
            return None
        self.finish(req, RequestStatus.FINISHED_ABORTED)
        return req

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Mark `req` finished and free its blocks; it leaves its queue before the next step."""
        assert status.is_finished, status
        if req.is_finished:
            return
        req.status = status
        self._requests.pop(req.request_id, None)
        self.block_manager.free(req)
        self._needs_compaction = True

    def _compact(self) -> None:
        if self._needs_compaction:
            self.running = [r for r in self.running if not r.is_finished]
            self.waiting = deque(r for r in self.waiting if not r.is_finished)
            self._needs_compaction = False

    @property
    def num_waiting(self) -> int:
        self._compact()
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        self._compact()
        return len(self.running)

    @property
    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def get_request(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    # ---------------------------------------------------------------------------- schedule
    def schedule(self) -> SchedulerOutput:
        """Build this step's batch: running requests first (in order), then admissions."""
        self._compact()
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if num_new <= 0:  # nothing to compute until the engine appends a token
                i += 1
                continue
            if not self._allocate_or_preempt(req, req.num_computed_tokens + num_new, out):
                break  # `req` itself was preempted: nothing after it can be served either
            out.scheduled.append(ScheduledRequest(req, num_new))
            budget -= num_new
            i += 1

        # Memory is short if anything was preempted: admitting would only thrash.
        if not out.preempted:
            self._admit_waiting(out, budget)
        return out

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        """FIFO admission. The head that cannot get blocks stays at the head and blocks the
        rest, so a large request is never starved by smaller later ones."""
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            hit = bm.lookup_prefix(req)
            num_new = min(req.num_tokens - hit.num_tokens, budget)
            if not self._try_allocate(req, hit.num_tokens + num_new, hit):
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, num_new))
            budget -= num_new

    def _try_allocate(self, req: Request, num_tokens: int, hit: PrefixHit | None = None) -> bool:
        bm = self.block_manager
        needed = bm.blocks_needed(req, num_tokens, hit)
        if bm.num_used_blocks + needed > self._max_used_blocks:
            return False
        return bm.allocate(req, num_tokens, hit)

    def _allocate_or_preempt(self, req: Request, num_tokens: int, out: SchedulerOutput) -> bool:
        """Allocate for a running request, preempting from the back of `running` until it
        fits. False when `req` itself had to go."""
        while not self._try_allocate(req, num_tokens):
            victim = self.running.pop()
            self._preempt(victim, out)
            if victim is req:
                if not self.running:  # alone and still too big: it can never finish
                    logger.warning(
                        "%s needs more KV than the cache holds (%d tokens); it will livelock",
                        req.request_id,
                        num_tokens,
                    )
                return False
        return True

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.block_manager.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(req)  # victims leave in reverse priority: order is kept
        out.preempted.append(req)
        logger.debug("preempted %s (%d tokens)", req.request_id, req.num_tokens)

    # ------------------------------------------------------------------------------ update
    def update(self, output: SchedulerOutput) -> None:
        """Record that the step's forward ran: advance computed counts and publish the
        blocks it completed to the prefix cache. Requests finished meanwhile are skipped."""
        bm = self.block_manager
        for sched in output.scheduled:
            req = sched.request
            if req.status != RequestStatus.RUNNING:
                continue
            req.num_computed_tokens += sched.num_new_tokens
            assert req.num_computed_tokens <= req.num_tokens
            bm.cache_blocks(req)

    # ---------------------------------------------------------------------------- checking
    def check_integrity(self) -> None:
        """Assert queue/state consistency and the block manager's integrity (for tests)."""
        self._compact()
        running, waiting = set(self.running), set(self.waiting)
        assert len(running) == len(self.running) and len(waiting) == len(self.waiting)
        assert not running & waiting, "request both running and waiting"
        assert running | waiting == set(self._requests.values()), "request lost or leaked"
        assert len(self.running) <= self.config.max_num_seqs
        for req in self.running:
            assert req.status == RequestStatus.RUNNING, (req.request_id, req.status)
            assert req.block_table, f"running {req.request_id} holds no blocks"
            assert req.num_computed_tokens <= len(req.block_table) * self.block_manager.block_size
        for req in self.waiting:
            assert req.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED), req.status
            assert not req.block_table and req.num_computed_tokens == 0, req.request_id
        assert self.block_manager.num_used_blocks <= self._max_used_blocks
        self.block_manager.check_integrity(self.running)
