"""Model-step throughput: genserve's ModelRunner beside transformers on the same weights.

SmolLM2-135M-Instruct (the built-in default), bfloat16 and float32: single-sequence decode
steps/s (64-token context) and 512-token prefill tokens/s, with the share of the memory-bandwidth
roofline (weight bytes read per decode step / measured streaming bandwidth). The CPU model, its flags and
the kernel set are printed above the numbers and saved with them (--json).

    python bench/model_step.py [--threads 2] [--steps 48] [--model-id DIR_or_GGUF]
                               [--kernels amx|avx512-bf16|avx2-fma|torch] [--dtypes bfloat16,float32]
                               [--engines genserve,transformers] [--json out.json]

--kernels runs genserve on that kernel set (GENSERVE_KERNELS, with PyTorch itself limited to AVX2
for avx2-fma; see genserve/bench/machine.py). bench/vs_llamacpp.py runs this script per kernel set
and sets the numbers beside llama.cpp's llama-bench.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from genserve.bench.machine import cpu_info, cpu_line, reexec_with_kernels
from genserve.config import CacheConfig
from genserve.engine.model_runner import ModelRunner
from genserve.engine.request import Request
from genserve.engine.scheduler_output import ScheduledRequest, SchedulerOutput
from genserve.models.loader import load_config, load_model, resolve_model_dir

CONTEXT = 64
PREFILL = 512


def copy_bandwidth() -> float:
    """STREAM-style copy bandwidth (bytes read + written per second) over 512 MiB."""
    a = torch.ones(256 << 20, dtype=torch.uint8)
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        b.copy_(a)
        times.append(time.perf_counter() - t)
    return 2 * a.numel() / min(times)


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def genserve_numbers(model_dir, dtype, steps: int) -> tuple[float, float, int]:
    cfg = load_config(model_dir)
    model = load_model(model_dir, dtype, cfg)
    runner = ModelRunner(model, cfg, CacheConfig(block_size=16, num_blocks=128), dtype)
    table = list(range(1, 128))

    def prefill():
        req = Request("p", [(i * 31) % 40000 + 100 for i in range(PREFILL)])
        req.block_table = table
        runner.execute(SchedulerOutput([ScheduledRequest(req, PREFILL)]))

    prefill_s = timed(prefill, 3)
    req = Request("d", [(i * 17) % 40000 + 100 for i in range(CONTEXT)])
    req.block_table = table
    runner.execute(SchedulerOutput([ScheduledRequest(req, CONTEXT)]))
    req.num_computed_tokens = CONTEXT
    req.append_output_token(100)

    def decode():
        runner.execute(SchedulerOutput([ScheduledRequest(req, 1)]))
        req.num_computed_tokens += 1
        req.append_output_token(100)

    decode_s = timed(decode, steps)
    return PREFILL / prefill_s, 1 / decode_s, weight_bytes(model)


def transformers_numbers(model_dir, dtype, steps: int) -> tuple[float, float, int]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    ids = torch.tensor([[(i * 31) % 40000 + 100 for i in range(PREFILL)]])

    @torch.inference_mode()
    def prefill():
        model(ids, use_cache=True)

    prefill_s = timed(prefill, 3)
    ctx = torch.tensor([[(i * 17) % 40000 + 100 for i in range(CONTEXT)]])
    with torch.inference_mode():
        state = {"past": model(ctx, use_cache=True).past_key_values}
    tok = torch.tensor([[100]])

    @torch.inference_mode()
    def decode():
        state["past"] = model(tok, past_key_values=state["past"], use_cache=True).past_key_values

    decode_s = timed(decode, steps)
    return PREFILL / prefill_s, 1 / decode_s, weight_bytes(model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-id", default=None, help="default: the built-in SmolLM2-135M")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--kernels", default=None, help="genserve kernel set (GENSERVE_KERNELS)")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--engines", default="genserve,transformers")
    ap.add_argument("--json", default=None, help="write the rows and the machine here")
    args = ap.parse_args()
    reexec_with_kernels(args.kernels)  # before any kernel loads (PyTorch's ISA limit too)
    torch.set_num_threads(args.threads)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    model_dir = resolve_model_dir(args.model_id)
    bw = copy_bandwidth()
    machine = cpu_info()
    print(cpu_line(machine))
    print(f"model {model_dir.name}, {args.threads} threads, copy bandwidth {bw / 1e9:.1f} GB/s")
    kernels = machine["genserve_kernels"].split(" ")[0]
    header = f"{'dtype':9} {'engine':13} {'kernels':9} {'decode tok/s':>12} {'prefill tok/s':>14}"
    header += f" {'roofline':>9}"
    print(header)
    print("-" * len(header))
    rows = []
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name.strip())
        nums = {}
        if "genserve" in engines:
            g_pre, g_dec, nbytes = genserve_numbers(model_dir, dtype, args.steps)
            nums["genserve"] = (g_pre, g_dec, kernels)
        if "transformers" in engines:
            t_pre, t_dec, nbytes = transformers_numbers(model_dir, dtype, args.steps)
            nums["transformers"] = (t_pre, t_dec, "torch")
        floor = nbytes / bw  # seconds to stream the weights once
        for engine, (pre, dec, ks) in nums.items():
            share = floor * dec
            print(f"{name:9} {engine:13} {ks:9} {dec:12.1f} {pre:14.0f} {share:9.0%}")
            rows.append(dict(engine=engine, dtype=name, kernels=ks, decode_tok_s=dec,
                             prefill_tok_s=pre, roofline=share, load_1m=os.getloadavg()[0]))  # fmt: skip
        if len(nums) == 2:
            (g_pre, g_dec, _), (t_pre, t_dec, _) = nums["genserve"], nums["transformers"]
            print(f"{name:9} {'ratio':13} {'':9} {g_dec / t_dec:11.2f}x {g_pre / t_pre:13.2f}x")
    print(
        "roofline = (weight bytes / copy bandwidth) / measured decode step time; "
        "copy bandwidth counts bytes read + written"
    )
    if args.json:
        doc = {"machine": machine, "model": model_dir.name, "threads": args.threads,
               "copy_bandwidth_gbs": bw / 1e9, "decode_context": CONTEXT, "prefill": PREFILL,
               "rows": rows}  # fmt: skip
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
