"""Scheduler on synthetic requests, with a fake engine; integrity checked after every step."""

from __future__ import annotations

import random

import pytest

from genserve.config import SchedulerConfig
from genserve.engine.block_manager import BlockManager
from genserve.engine.request import Request, RequestStatus
from genserve.engine.scheduler import Scheduler
from genserve.engine.scheduler_output import SchedulerOutput
from genserve.sampling.params import StoppingParams


def fake_token(req: Request) -> int:
    """Deterministic per position, so a lost or repeated token shows up in the output."""
    return 1000 + req.num_output_tokens


def expected_output(n: int) -> list[int]:
    return list(range(1000, 1000 + n))


def make_req(rid: str, prompt: list[int] | range, max_new: int = 4) -> Request:
    return Request(
        request_id=rid,
        prompt_token_ids=list(prompt),
        stopping=StoppingParams(max_new_tokens=max_new),
    )


class FakeEngine:
    """schedule -> (runner reads the batch) -> update -> append sampled tokens -> stop."""

    def __init__(self, sched: Scheduler):
        self.sched = sched
        self.finished: list[Request] = []
        self.samples_per_req: dict[str, int] = {}

    def step(self) -> SchedulerOutput:
        sched = self.sched
        was_running = set(sched.running)
        out = sched.schedule()
        ids = [s.request.request_id for s in out.scheduled]
        assert len(ids) == len(set(ids)), "request scheduled twice in one step"
        assert not set(out.preempted) & {s.request for s in out.scheduled}
        assert out.num_tokens <= sched.config.max_num_batched_tokens
        # running (continuing) requests come before newly admitted ones
        flags = [s.request in was_running for s in out.scheduled]
        assert flags == sorted(flags, reverse=True)
        for s in out.scheduled:
            assert s.num_new_tokens > 0 and s.end <= s.request.num_tokens
            assert s.request.num_computed_tokens < s.request.num_tokens
            assert len(s.request.block_table) * sched.block_manager.block_size >= s.end
        sampling = [s.request for s in out.scheduled if s.samples]  # read before update()
        sched.update(out)
        for req in sampling:
            req.append_output_token(fake_token(req))
            self.samples_per_req[req.request_id] = self.samples_per_req.get(req.request_id, 0) + 1
            if req.num_output_tokens >= req.stopping.max_new_tokens:
                sched.finish(req, RequestStatus.FINISHED_LENGTH)
                self.finished.append(req)
        sched.check_integrity()
        return out

    def run(self, max_steps: int = 1000) -> list[SchedulerOutput]:
        outs = []
        while self.sched.has_unfinished:
            assert len(outs) < max_steps, "no progress"
            outs.append(self.step())
        return outs


def make_sched(
    num_blocks: int = 64, block_size: int = 4, prefix: bool = True, **cfg
) -> tuple[Scheduler, FakeEngine]:
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix)
    sched = Scheduler(SchedulerConfig(**cfg), bm)
    return sched, FakeEngine(sched)


def all_free(sched: Scheduler) -> bool:
    bm = sched.block_manager
    return bm.num_free_blocks == bm.num_usable_blocks and bm.num_used_blocks == 0


def test_single_request_lifecycle():
    sched, eng = make_sched()
    req = make_req("a", range(5), max_new=3)
    sched.add_request(req)
    assert sched.has_unfinished and sched.num_waiting == 1
    outs = eng.run()
    assert [[s.num_new_tokens for s in o.scheduled] for o in outs] == [[5], [1], [1]]
    assert req.output_token_ids == expected_output(3)
    assert req.status == RequestStatus.FINISHED_LENGTH
    assert sched.num_running == 0 and sched.num_waiting == 0 and all_free(sched)
    assert sched.schedule().is_empty


def test_chunked_prefill_of_long_prompt():
    sched, eng = make_sched(max_num_batched_tokens=16)
    req = make_req("long", range(40), max_new=2)
    sched.add_request(req)
    chunks = []
    for _ in range(3):
        out = eng.step()
        (s,) = out.scheduled
        chunks.append(s.num_new_tokens)
        if len(chunks) < 3:
            assert req.output_token_ids == []  # nothing sampled before the last chunk
    assert chunks == [16, 16, 8] and req.output_token_ids == expected_output(1)
    eng.run()
    assert req.output_token_ids == expected_output(2) and all_free(sched)


def test_decodes_continue_while_a_long_prompt_is_chunked():
    sched, eng = make_sched(max_num_batched_tokens=16)
    a = make_req("a", range(4), max_new=20)
    sched.add_request(a)
    eng.step()
    b = make_req("b", range(100, 200), max_new=2)
    sched.add_request(b)
    b_chunks = []
    while b.num_output_tokens == 0:
        out = eng.step()
        assert out.scheduled[0].request is a and out.scheduled[0].num_new_tokens == 1
        assert out.scheduled[1].request is b
        b_chunks.append(out.scheduled[1].num_new_tokens)
    assert b_chunks == [15] * 6 + [10]
    eng.run()
    assert a.output_token_ids == expected_output(20) and b.output_token_ids == expected_output(2)
    assert all_free(sched)


def test_fifo_admission_order():
    sched, eng = make_sched(max_num_batched_tokens=16)
    reqs = [make_req(f"r{i}", range(i * 100, i * 100 + 10), max_new=3) for i in range(6)]
    for r in reqs:
        sched.add_request(r)
    first_seen: dict[str, int] = {}
    for step, out in enumerate(eng.run()):
        for s in out.scheduled:
            first_seen.setdefault(s.request.request_id, step)
    order = [first_seen[r.request_id] for r in reqs]
    assert order == sorted(order)
    assert all(r.output_token_ids == expected_output(3) for r in reqs)


def test_blocked_head_is_not_overtaken():
    # 6 usable blocks of 4 slots. a holds 4 (+1 while decoding); b needs 3 and must wait;
    # c needs only 1 and would fit, but must not jump ahead of b.
    sched, eng = make_sched(num_blocks=7, block_size=4)
    a = make_req("a", range(16), max_new=3)
    sched.add_request(a)
    eng.step()
    b = make_req("b", range(100, 112), max_new=2)
    c = make_req("c", [7], max_new=2)
    sched.add_request(b)
    sched.add_request(c)
    while not a.is_finished:
        out = eng.step()
        assert [s.request for s in out.scheduled] == [a]
    out = eng.step()
    assert [s.request for s in out.scheduled] == [b, c]
    eng.run()
    assert all_free(sched)


def test_max_num_seqs_caps_running():
    sched, eng = make_sched(max_num_seqs=2)
    reqs = [make_req(f"r{i}", range(i * 10, i * 10 + 3), max_new=4) for i in range(3)]
    for r in reqs:
        sched.add_request(r)
    out = eng.step()
    assert [s.request for s in out.scheduled] == reqs[:2] and sched.num_waiting == 1
    eng.run()
    assert all(r.output_token_ids == expected_output(4) for r in reqs)


def test_max_batch_total_tokens_caps_used_slots():
    sched, eng = make_sched(num_blocks=64, block_size=4, max_batch_total_tokens=24)
    reqs = [make_req(f"r{i}", range(i * 10, i * 10 + 8), max_new=6) for i in range(4)]
    for r in reqs:
        sched.add_request(r)
    peak = 0
    while sched.has_unfinished:
        eng.step()
        peak = max(peak, sched.block_manager.num_used_blocks)
    assert peak * 4 <= 24
    assert all(r.output_token_ids == expected_output(6) for r in reqs)


@pytest.mark.parametrize("prefix", [True, False])
def test_preemption_under_tiny_cache(prefix):
    # 6 usable blocks of 2 slots = 12 slots; each request needs KV for 4 + 5 = 9 tokens.
    sched, eng = make_sched(num_blocks=7, block_size=2, prefix=prefix)
    a = make_req("a", [1, 2, 3, 4], max_new=6)
    b = make_req("b", [5, 6, 7, 8], max_new=6)
    sched.add_request(a)
    sched.add_request(b)
    preempted = []
    readmit_chunks = []
    while sched.has_unfinished:
        waiting_before = set(sched.waiting)
        out = eng.step()
        preempted += out.preempted
        for s in out.scheduled:
            if s.request in waiting_before and s.request.status != RequestStatus.WAITING:
                readmit_chunks.append((s.request.num_tokens, s.num_new_tokens))
    assert preempted and all(r is b for r in preempted)  # the lower-priority one goes
    assert a.output_token_ids == expected_output(6) and b.output_token_ids == expected_output(6)
    assert eng.samples_per_req == {"a": 6, "b": 6}  # recompute never re-samples a token
    assert all_free(sched)
    if prefix:  # the victim's full blocks were still cached when it came back
        assert any(new < total for total, new in readmit_chunks)


def test_preempted_request_resumes_with_generated_tokens():
    sched, eng = make_sched(num_blocks=5, block_size=2, prefix=False)  # 8 slots
    a = make_req("a", [1, 2], max_new=6)
    b = make_req("b", [3, 4], max_new=4)
    sched.add_request(a)
    sched.add_request(b)
    out = eng.step()
    while not out.preempted:
        out = eng.step()
    assert out.preempted == [b] and b.status == RequestStatus.PREEMPTED
    generated = list(b.output_token_ids)
    assert generated and sched.waiting[0] is b and b.block_table == []
    while b.status == RequestStatus.PREEMPTED:
        out = eng.step()
    (sb,) = [s for s in out.scheduled if s.request is b]
    assert sb.num_new_tokens == 2 + len(generated)  # prompt + generated, recomputed
    eng.run()
    assert b.output_token_ids[: len(generated)] == generated
    assert b.output_token_ids == expected_output(4) and a.output_token_ids == expected_output(6)


def test_prefix_cache_hit_through_scheduler():
    sched, eng = make_sched(block_size=4)
    a = make_req("a", range(32), max_new=1)
    sched.add_request(a)
    eng.run()
    b = make_req("b", list(range(32)) + [500, 501], max_new=2)
    sched.add_request(b)
    out = eng.step()
    assert out.scheduled[0].num_new_tokens == 2 and b.num_cached_tokens == 32
    eng.run()
    assert b.output_token_ids == expected_output(2) and all_free(sched)


def test_abort_running_and_waiting():
    sched, eng = make_sched(max_num_seqs=1)
    a = make_req("a", range(10), max_new=50)
    b = make_req("b", range(20, 30), max_new=5)
    sched.add_request(a)
    sched.add_request(b)
    eng.step()
    assert a.block_table and not b.block_table
    assert sched.abort("a") is a and a.status == RequestStatus.FINISHED_ABORTED
    assert a.block_table == [] and sched.block_manager.num_used_blocks == 0
    sched.check_integrity()
    assert sched.abort("a") is None and sched.abort("nope") is None
    out = eng.step()
    assert [s.request for s in out.scheduled] == [b]
    assert sched.abort("b") is b
    sched.check_integrity()
    c = make_req("c", range(5), max_new=5)
    d = make_req("d", range(5), max_new=5)
    sched.add_request(c)
    sched.add_request(d)
    assert sched.abort("c") is c and sched.num_waiting == 1
    out = eng.step()
    assert [s.request for s in out.scheduled] == [d]
    eng.run()
    assert not sched.has_unfinished and all_free(sched)


def test_duplicate_request_id_rejected():
    sched, _ = make_sched()
    sched.add_request(make_req("a", [1]))
    with pytest.raises(ValueError):
        sched.add_request(make_req("a", [2]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_randomized_stress(seed):
    rng = random.Random(seed)
    sched, eng = make_sched(num_blocks=41, block_size=4, max_num_batched_tokens=32, max_num_seqs=8)
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(4, 24))] for _ in range(4)]
    live: dict[str, Request] = {}
    aborted: set[str] = set()
    n = 0
    for _ in range(300):
        if rng.random() < 0.3:
            body = [rng.randrange(50) for _ in range(rng.randrange(1, 36))]
            prompt = (rng.choice(prefixes) if rng.random() < 0.6 else []) + body
            req = make_req(f"r{n}", prompt, max_new=rng.randrange(1, 20))
            n += 1
            live[req.request_id] = req
            sched.add_request(req)
        if live and rng.random() < 0.05:
            rid = rng.choice(sorted(live))
            if sched.abort(rid) is not None:
                aborted.add(rid)
            sched.check_integrity()
        eng.step()
    eng.run(max_steps=5000)
    assert all_free(sched) and sched.num_running == 0 and sched.num_waiting == 0
    for rid, req in live.items():
        if rid in aborted:
            assert req.status == RequestStatus.FINISHED_ABORTED
        else:
            assert req.status == RequestStatus.FINISHED_LENGTH
            assert req.output_token_ids == expected_output(req.stopping.max_new_tokens)
    assert len(eng.finished) + len(aborted) == n
