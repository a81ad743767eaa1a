"""Model-step throughput: genserve's ModelRunner beside transformers on the same weights.

SmolLM2-135M-Instruct (the built-in default), bfloat16 and float32: single-sequence decode
steps/s (64-token context) and 512-token prefill tokens/s, with the share of the memory-bandwidth
roofline (weight bytes read per decode step / measured streaming bandwidth).

    python bench/model_step.py [--threads 2] [--steps 48] [--model-id DIR_or_GGUF]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

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


def transformers_numbers(model_dir, dtype, steps: int) -> tuple[float, float]:
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
    return PREFILL / prefill_s, 1 / decode_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-id", default=None, help="default: the built-in SmolLM2-135M")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--steps", type=int, default=48)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = resolve_model_dir(args.model_id)
    bw = copy_bandwidth()
    print(f"model {model_dir.name}, {args.threads} threads, copy bandwidth {bw / 1e9:.1f} GB/s")
    header = f"{'dtype':9} {'engine':13} {'decode tok/s':>12} {'prefill tok/s':>14} {'roofline':>9}"
    print(header)
    print("-" * len(header))
    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype).removeprefix("torch.")
        g_pre, g_dec, nbytes = genserve_numbers(model_dir, dtype, args.steps)
        t_pre, t_dec = transformers_numbers(model_dir, dtype, args.steps)
        floor = nbytes / bw  # seconds to stream the weights once
        for engine, pre, dec in (("genserve", g_pre, g_dec), ("transformers", t_pre, t_dec)):
            share = floor * dec
            print(f"{name:9} {engine:13} {dec:12.1f} {pre:14.0f} {share:9.0%}")
        print(f"{name:9} {'ratio':13} {g_dec / t_dec:11.2f}x {g_pre / t_pre:13.2f}x")
    print(
        "roofline = (weight bytes / copy bandwidth) / measured decode step time; "
        "copy bandwidth counts bytes read + written"
    )


if __name__ == "__main__":
    main()
