"""Offline engine throughput: genserve's continuous-batching engine beside `transformers`
`generate` with padded batching, same weights, same batch sizes, in one run.

SmolLM2-135M-Instruct (built-in default), bfloat16; N concurrent requests of 128 prompt tokens and
128 new tokens each (EOS ignored), N in 1, 8, 32, 64. Prints output tokens/s for both and the ratio.

    python bench/engine_throughput.py [--batch-sizes 1,8,32,64] [--dtype bfloat16] [--skip-transformers]
                                      [--repeats 3] [--sample] [--kernels avx2-fma] [--json out.json]

With --repeats N each engine runs every batch size N times (fresh prompts each time) and the
best run counts: on a shared machine neighbours only ever slow a run down. Decoding is greedy;
--sample samples instead (temperature 0.7, top_p 0.9, a seed per request) on both sides.
--kernels runs genserve on that kernel set (GENSERVE_KERNELS; see genserve/bench/machine.py). The
CPU model, its flags and the kernel set are printed above the numbers and saved with them.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from genserve import hugepages
from genserve.bench.machine import cpu_info, cpu_line, reexec_with_kernels
from genserve.engine.llm_engine import LLMEngine
from genserve.engine.request import Request
from genserve.models.loader import resolve_model_dir
from genserve.sampling.params import SamplingParams, StoppingParams

PROMPT, NEW = 128, 128
TEMPERATURE, TOP_P = 0.7, 0.9  # --sample


def prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(PROMPT)] for _ in range(n)]


def genserve_tps(engine: LLMEngine, batch: list[list[int]], sample: bool = False) -> float:
    for i, ids in enumerate(batch):
        stop = StoppingParams(max_new_tokens=NEW, ignore_eos=True)
        params = SamplingParams(logprobs=False)
        if sample:
            params = SamplingParams(do_sample=True, temperature=TEMPERATURE, top_p=TOP_P, seed=i,
                                    logprobs=False)  # fmt: skip
        engine.add_request(Request(f"b{len(batch)}-{i}", ids, params, stop))
    produced = 0
    t = time.perf_counter()
    while engine.has_unfinished():
        produced += len(engine.step())
    return produced / (time.perf_counter() - t)


def transformers_tps(model, batch: list[list[int]], sample: bool = False) -> float:
    ids = torch.tensor(batch)  # equal lengths: padding-free padded batching
    mask = torch.ones_like(ids)
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
            pad_token_id=0,
            **(dict(do_sample=True, temperature=TEMPERATURE, top_p=TOP_P, top_k=0) if sample
               else dict(do_sample=False)),
        )  # fmt: skip
    return (out.shape[1] - PROMPT) * len(batch) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-id", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch-sizes", default="1,8,32,64")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--repeats", type=int, default=1, help="best of N runs per point")
    ap.add_argument("--sample", action="store_true", help="sample (temperature, top_p) on both")
    ap.add_argument("--kernels", default=None, help="genserve kernel set (GENSERVE_KERNELS)")
    ap.add_argument("--json", default=None, help="write the rows and the machine here")
    args = ap.parse_args()
    reexec_with_kernels(args.kernels)  # before any kernel loads (PyTorch's ISA limit too)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    engine = LLMEngine.from_model(args.model_id, dtype=args.dtype)
    # steady state, as a server that has been up for a few seconds: the KV cache's memory is
    # committed by a background thread after start-up (genserve/hugepages.py)
    hugepages.wait_prefaulted()
    vocab = engine.model_config.vocab_size
    genserve_tps(engine, prompts(2, vocab, seed=99))  # warm-up
    hf = None
    if not args.skip_transformers:
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(
            resolve_model_dir(args.model_id), dtype=getattr(torch, args.dtype)
        ).eval()
    machine = cpu_info()
    print(cpu_line(machine))
    kernels = machine["genserve_kernels"].split(" ")[0]
    mode = f"sampled (temperature {TEMPERATURE}, top_p {TOP_P})" if args.sample else "greedy"
    print(f"{PROMPT} prompt / {NEW} new tokens per request, {args.dtype}, {mode}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'concurrent':>10} {'kernels':>9} {'genserve tok/s':>15} {'transformers tok/s':>19} "
          f"{'ratio':>7}")  # fmt: skip
    rows = []
    for n in sizes:
        ours = theirs = float("nan")
        for r in range(args.repeats):
            batch = prompts(n, vocab, seed=n + 1000 * r)  # fresh prompts: no prefix-cache hits
            tps = genserve_tps(engine, batch, args.sample)
            ours = max(tps, ours) if r else tps
            if hf is not None:
                t = transformers_tps(hf, batch, args.sample)
                theirs = max(t, theirs) if r else t
        print(f"{n:>10} {kernels:>9} {ours:>15.1f} {theirs:>19.1f} {ours / theirs:>6.2f}x")
        rows.append(dict(concurrent=n, kernels=kernels, genserve_tok_s=ours,
                         transformers_tok_s=None if hf is None else theirs))  # fmt: skip
    if args.json:
        doc = {"machine": machine, "dtype": args.dtype, "mode": mode, "prompt": PROMPT,
               "new": NEW, "threads": torch.get_num_threads(), "rows": rows}  # fmt: skip
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
