"""End-to-end engine on a tiny model: batching, seeds, preemption and aborts change nothing
they should not, and every block comes back."""

from __future__ import annotations

import pytest

from genserve.config import CacheConfig, SchedulerConfig
from genserve.engine.llm_engine import LLMEngine
from genserve.engine.request import FinishReason, Request
from genserve.kernels import load_kernels
from genserve.sampling.params import SamplingParams, StoppingParams


def make_engine(
    model_dir, num_blocks=256, block_size=4, budget=64, max_seqs=64, dtype="float32"
) -> LLMEngine:
    return LLMEngine.from_model(
        str(model_dir),
        dtype=dtype,
        cache_config=CacheConfig(block_size=block_size, num_blocks=num_blocks),
        scheduler_config=SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs),
    )


def run(engine: LLMEngine, requests: list[Request], abort_after: dict[str, int] | None = None):
    """Step until done; check integrity after every step; return generated ids per request."""
    out: dict[str, list[int]] = {r.request_id: [] for r in requests}
    finals = {}
    for r in requests:
        engine.add_request(r)
    abort_after = dict(abort_after or {})
    while engine.has_unfinished():
        for ev in engine.step():
            assert ev.error is None, ev.error
            out[ev.request_id].append(ev.token_id)
            if ev.finished:
                finals[ev.request_id] = ev
        for rid, n in list(abort_after.items()):
            if len(out[rid]) >= n:
                engine.abort(rid)
                del abort_after[rid]
        engine.scheduler.check_integrity()
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_usable_blocks, "blocks leaked"
    return out, finals


def _params(i: int) -> SamplingParams:
    kind = i % 4
    if kind == 0:
        return SamplingParams()
    if kind == 1:
        return SamplingParams(do_sample=True, seed=1000 + i, temperature=0.8, top_k=50)
    if kind == 2:
        return SamplingParams(repetition_penalty=1.3, top_n_tokens=3)
    return SamplingParams(do_sample=True, seed=2000 + i, top_p=0.9, frequency_penalty=0.5)


def _requests(n: int, max_new: int = 24, prefix: str = "r") -> list[Request]:
    reqs = []
    for i in range(n):
        prompt = [(i * 7919 + j * 104729) % 40000 + 100 for j in range(5 + (i * 13) % 50)]
        reqs.append(
            Request(
                f"{prefix}{i}",
                prompt,
                _params(i),
                StoppingParams(max_new_tokens=max_new + i % 5, ignore_eos=True),
            )
        )
    return reqs


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir):
    return tiny_llama_dir


def test_batched_equals_alone(model_dir):
    """16 concurrent requests with mixed parameters: each gets exactly its solo tokens."""
    engine = make_engine(model_dir)
    batched, finals = run(engine, _requests(16))
    for req in _requests(16, prefix="r"):
        alone, _ = run(make_engine(model_dir), [req])
        assert batched[req.request_id] == alone[req.request_id], req.request_id
    assert all(f.finish_reason == FinishReason.LENGTH for f in finals.values())


def test_preemption_keeps_outputs(model_dir, record_preemptions):
    """A cache too small for all requests at once forces preemption by recompute."""
    big, _ = run(make_engine(model_dir), _requests(12, max_new=40))
    engine = make_engine(model_dir, num_blocks=40, block_size=4)
    preempted = record_preemptions(engine)
    small, _ = run(engine, _requests(12, max_new=40))
    assert preempted, "the test cache was meant to force preemption"
    assert small == big


def test_bf16_native_path_under_preemption_aborts_and_chunks(model_dir, record_preemptions):
    """bfloat16 runs the native kernels (fused layer, packed matmuls, paged attention) where
    the CPU has them: a cache that forces preemption, chunked prefills beside decode rows and
    aborts mid-way leave no error, integrity intact after every step and every block free."""
    engine = make_engine(model_dir, num_blocks=40, block_size=4, budget=32, dtype="bfloat16")
    assert (engine.runner.model.attention_layers()[0].lib is not None) == (
        load_kernels() is not None
    )
    preempted = record_preemptions(engine)
    reqs = _requests(12, max_new=40)
    out, finals = run(engine, reqs, abort_after={"r2": 5, "r7": 0, "r9": 20})
    assert preempted, "the test cache was meant to force preemption"
    for req in reqs:
        if req.request_id not in ("r2", "r7", "r9"):
            assert len(out[req.request_id]) == req.stopping.max_new_tokens


@pytest.mark.parametrize("logprobs", [False, True])
def test_all_greedy_batch_chooses_in_the_output_projection(model_dir, logprobs):
    """An all-greedy bfloat16 batch without top tokens takes its tokens (and logprobs, where
    asked) from the output projection's fused argmax where the head is AMX-packed: the same
    tokens as logits + sampler, logprobs within fp32 summation order. A row that asks for top
    tokens keeps the logits path."""

    def requests():
        return [
            Request(f"g{i}", [(i * 31 + j * 17) % 40000 + 100 for j in range(3 + i)],
                    SamplingParams(logprobs=logprobs),
                    StoppingParams(max_new_tokens=12, ignore_eos=True))
            for i in range(40)
        ]  # fmt: skip

    engine = make_engine(model_dir, dtype="bfloat16")
    head = getattr(engine.runner.model, "packed_lm_head", None)
    fused_calls = []
    if head is not None:
        argmax = head.argmax
        head.argmax = lambda *a: fused_calls.append(a[0].shape[0]) or argmax(*a)
    lps = _record_logprobs(engine)
    out, _ = run(engine, requests())
    reference = make_engine(model_dir, dtype="bfloat16")
    reference.sampler.greedy_only = lambda requests: False
    ref_lps = _record_logprobs(reference)
    expected, _ = run(reference, requests())
    assert out == expected
    for rid, values in ref_lps.items():
        if logprobs:
            assert values == pytest.approx(lps[rid], rel=1e-5, abs=1e-5)
        else:
            assert values == lps[rid] == [None] * len(values)
    if head is not None:
        assert fused_calls and max(fused_calls) > 16, fused_calls
    top = Request("d", requests()[0].prompt_token_ids, SamplingParams(top_n_tokens=2),
                  StoppingParams(max_new_tokens=12, ignore_eos=True))  # fmt: skip
    assert not engine.sampler.greedy_only([top])
    assert run(engine, [top])[0]["d"] == expected["g0"]


def _record_logprobs(engine: LLMEngine) -> dict[str, list]:
    """Each event's logprob, per request id, as the engine steps."""
    into: dict[str, list] = {}
    step = engine.step

    def recording_step():
        events = step()
        for ev in events:
            into.setdefault(ev.request_id, []).append(ev.logprob)
        return events

    engine.step = recording_step
    return into


def test_chunked_prefill_and_prefix_cache(model_dir):
    """A shared 64-token prefix is served from cache the second time; outputs unchanged."""
    shared = list(range(500, 564))
    first = Request("a", shared + [7, 8, 9], stopping=StoppingParams(8, ignore_eos=True))
    second = Request("b", shared + [10, 11], stopping=StoppingParams(8, ignore_eos=True))
    engine = make_engine(model_dir, budget=16)  # 67-token prompt -> 5 chunks
    out_a, fin_a = run(engine, [first])
    out_b, fin_b = run(engine, [second])
    assert fin_b["b"].num_cached_tokens == 64
    fresh, _ = run(
        make_engine(model_dir),
        [Request("b", shared + [10, 11], stopping=StoppingParams(8, ignore_eos=True))],
    )
    assert out_b["b"] == fresh["b"]


def test_abort_frees_blocks(model_dir):
    engine = make_engine(model_dir)
    reqs = _requests(8, max_new=30)
    out, finals = run(engine, reqs, abort_after={"r1": 3, "r4": 0, "r6": 10})
    assert "r1" not in finals and "r6" not in finals
    assert len(out["r1"]) <= 4


def test_stop_sequence_and_eos(model_dir):
    engine = make_engine(model_dir)
    probe, _ = run(
        engine, [Request("p", [300, 301, 302], stopping=StoppingParams(12, ignore_eos=True))]
    )
    text = engine.tokenizer.decode(probe["p"])
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    _, finals = run(engine, [Request("s", [300, 301, 302], stopping=StoppingParams(12, [stop]))])
    fin = finals["s"]
    assert fin.finish_reason == FinishReason.STOP_SEQUENCE
    assert fin.generated_text.endswith(stop) or stop in fin.generated_text


def test_fault_in_step_fails_only_that_step(model_dir):
    engine = make_engine(model_dir)
    calls = {"n": 0}

    def hook(out):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected")

    engine.fault_hook = hook
    for r in _requests(4, max_new=10):
        engine.add_request(r)
    errors = []
    while engine.has_unfinished():
        errors += [e for e in engine.step() if e.error]
        engine.scheduler.check_integrity()
    assert errors and all("injected" in e.error for e in errors)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_usable_blocks
    engine.fault_hook = None
    out, _ = run(engine, _requests(2, prefix="after"))
    assert all(len(v) > 0 for v in out.values())


def test_prefill_logprobs(model_dir):
    engine = make_engine(model_dir, budget=8)
    req = Request("p", list(range(200, 220)), stopping=StoppingParams(3, ignore_eos=True))
    req.prefill_logprobs = True
    engine.add_request(req)
    first = None
    while engine.has_unfinished():
        for ev in engine.step():
            first = first or ev
    assert first.prompt_logprobs is not None and len(first.prompt_logprobs) == 20
    assert first.prompt_logprobs[0] is None
    assert all(lp <= 0 for lp in first.prompt_logprobs[1:])
