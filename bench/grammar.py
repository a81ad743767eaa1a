"""Grammar-constrained decoding cost: compile time per schema (cold and cached), and the time a
decode step gains when every row of the batch is constrained, beside the unconstrained step.

The schemas are the tests' (`tests/sampling/grammar_schemas.py`: 20 JSON schemas, one with 12
optional properties, and 5 regexes). Step times go through `LLMEngine` on the default model
(SmolLM2-135M-Instruct) unless `--model-id` names another. A batch is kept full: a constrained
request that completes its JSON is replaced at once, and only pure decode steps with exactly
`batch` rows are timed (steps that also prefill a newcomer are left out, in both modes).
Unconstrained rows sample with the same parameters and ignore EOS.

    python bench/grammar.py [--model-id DIR] [--dtype bfloat16] [--batch-sizes 1,32] [--steps 60]
                            [--threads 1]

On a shared 2-core machine, prefer `--threads 1`: with two intra-op threads every parallel
torch op waits for a time slice on the other core whenever a neighbour holds it (~8-16 ms per
op), which swamps the step times of both modes. The "grammar added" column (sampler and
matcher time, guided minus plain) is the robust figure; whole-step differences are noisy.

Engine choice (measured on this 2-core machine, SmolLM2 tokenizer, the same 20 schemas; cold
compile / mean per-token mask time along a valid document):
    llguidance 1.9.1     compile 0.4-2.6 ms (12 optional properties: 1.6 ms), first mask
                         included; mask 10-420 us mean, ~20 us median, bounded strings
                         (`maxLength`) ~0.3-0.6 ms, unbounded ones ~6 us
    outlines-core 0.2.14 compile 30-540 ms (12 optional properties: 1.3-1.5 s); mask ~1 us
                         (a precomputed index); refuses `allOf`, fails on `format: time`
    xgrammar 0.2.8       compile 0.5-330 ms (12 optional properties: 330 ms); mask 2-950 us
                         mean; rejected two valid documents; needs transformers and triton
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "sampling"))
from grammar_schemas import REGEXES, SCHEMAS  # noqa: E402

from genserve.engine.llm_engine import LLMEngine  # noqa: E402
from genserve.engine.request import Request  # noqa: E402
from genserve.sampling.grammar import CompiledGrammar, GrammarCompiler  # noqa: E402
from genserve.sampling.grammar_mask import GrammarMask, GrammarStates  # noqa: E402
from genserve.sampling.grammar_spec import GrammarSpec  # noqa: E402
from genserve.sampling.params import SamplingParams, StoppingParams  # noqa: E402
from genserve.sampling.sampler import Sampler  # noqa: E402

PROMPT = "Describe a made-up record as JSON."
WARMUP_STEPS = 3
IDS = itertools.count()  # request ids unique across runs


def specs() -> dict[str, GrammarSpec]:
    out = {f"json/{name}": GrammarSpec.json_schema(s) for name, s in SCHEMAS.items()}
    out |= {f"regex/{name}": GrammarSpec.regex(r) for name, r in REGEXES.items()}
    return out


def compile_times(compiler: GrammarCompiler, repeats: int = 3) -> None:
    t = time.perf_counter()
    compiler.tokenizer()
    print(f"llguidance tokenizer view (once per server): {1e3 * (time.perf_counter() - t):.0f} ms")
    print(f"{'grammar':28s} {'cold first':>11s} {'cold best':>10s} {'cached':>9s}")
    for name, spec in specs().items():
        cold = []
        for _ in range(repeats):
            compiler.clear()
            t = time.perf_counter()
            compiler.compile(spec)
            cold.append(time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(100):
            compiler.compile(spec)
        cached = (time.perf_counter() - t) / 100
        print(
            f"{name:28s} {1e3 * cold[0]:8.2f} ms {1e3 * min(cold):7.2f} ms {1e6 * cached:6.1f} us"
        )


class Timer:
    """Accumulates the time spent in `owner.name` (patched on the class)."""

    def __init__(self, owner: type, name: str) -> None:
        self.total = 0.0
        orig = getattr(owner, name)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return orig(*args, **kwargs)
            finally:
                self.total += time.perf_counter() - t

        setattr(owner, name, timed)


# what a step spends in: the whole sampler, the grammar mask in it (fill + unpack + add), and
# the engine's per-token "is the grammar complete?" (matchers consuming the sampled tokens)
TIMERS = {
    "sampler": (Sampler, "__call__"),
    "mask": (GrammarMask, "__call__"),
    "done": (GrammarStates, "done"),
}


def decode_steps(
    engine: LLMEngine,
    grammars: list[CompiledGrammar] | None,
    batch: int,
    steps: int,
    timers: dict[str, Timer],
) -> dict[str, list[float]]:
    """Per timed step (a pure decode step with exactly `batch` rows, the batch kept full): its
    wall time and each timer's share. Unconstrained requests ignore EOS and stop after 16-63
    tokens, so that both modes see requests come and go (plan rebuilds) alike."""
    prompt = engine.tokenizer.encode(PROMPT)
    live: set[str] = set()

    def add() -> None:
        i = next(IDS)
        grammar = grammars[i % len(grammars)] if grammars else None
        params = SamplingParams(do_sample=True, temperature=0.7, seed=i, grammar=grammar)
        stop = StoppingParams(256) if grammars else StoppingParams(16 + i % 48, [], True)
        engine.add_request(Request(f"r{i}", prompt, params, stop))
        live.add(f"r{i}")

    for _ in range(batch):
        add()
    out: dict[str, list[float]] = {"step": [], **{name: [] for name in timers}}
    seen = 0
    while len(out["step"]) < steps:
        for timer in timers.values():
            timer.total = 0.0
        t = time.perf_counter()
        events = engine.step()
        elapsed = time.perf_counter() - t
        stats = engine.last_step
        if stats.num_scheduled == batch and stats.num_prefill_tokens == 0:
            seen += 1
            if seen > WARMUP_STEPS:
                out["step"].append(elapsed)
                for name, timer in timers.items():
                    out[name].append(timer.total)
        for ev in events:
            assert ev.error is None, ev.error
            if ev.finished:
                live.discard(ev.request_id)
                add()
    for rid in live:
        engine.abort(rid)
    return out


def compare(
    engine: LLMEngine,
    grammars: list[CompiledGrammar],
    batch: int,
    args: argparse.Namespace,
    timers: dict[str, Timer],
) -> None:
    """Alternate unconstrained and constrained runs (`rounds` each), so that a change in the
    machine's load hits both alike; print medians (ms) per step."""
    plain: dict[str, list[float]] = {}
    guided: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for grammar_list, acc in ((None, plain), (grammars, guided)):
            run = decode_steps(engine, grammar_list, batch, args.steps // args.rounds, timers)
            for name, values in run.items():
                acc.setdefault(name, []).extend(values)
    p = {k: 1e3 * statistics.median(v) for k, v in plain.items()}
    g = {k: 1e3 * statistics.median(v) for k, v in guided.items()}
    added = g["sampler"] + g["done"] - p["sampler"] - p["done"]
    print(
        f"{batch:5d} {p['step']:9.1f} {g['step']:9.1f} {100 * (g['step'] / p['step'] - 1):+5.0f}% "
        f"{p['sampler']:9.2f} {g['sampler']:9.2f} {g['mask']:7.2f} {g['done']:6.2f} "
        f"{added:+8.2f} {100 * added / p['step']:+5.1f}%"
    )


HEADER = """median per decode step, ms (plain = unconstrained, guided = every row constrained)
batch step:plain guided   diff  sampler:plain guided  mask    done  grammar added (of step)"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-id", default=None, help="HF dir or GGUF (default: SmolLM2)")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per mode")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()}; torch threads {torch.get_num_threads()}")
    engine = LLMEngine.from_model(args.model_id, dtype=args.dtype)
    compiler = GrammarCompiler.for_tokenizer(engine.tokenizer, engine.eos_token_ids)
    assert compiler is not None
    compile_times(compiler)
    grammars = [compiler.compile(GrammarSpec.json_schema(s)) for s in SCHEMAS.values()]
    timers = {name: Timer(*where) for name, where in TIMERS.items()}
    print(f"\n{HEADER}")
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        compare(engine, grammars, batch, args, timers)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
