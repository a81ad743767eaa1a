"""genserve_gemm_bf16 per kernel set: GEMV weight-streaming GB/s (M=1) against the machine's
copy bandwidth, and GEMM GFLOP/s (M=32, 512) against MKL's fp32 sgemm in the same run.

SmolLM2-135M shapes: qkv/gate_up-like K=576, N=3072; down K=1536, N=576; lm_head K=576,
N=49152. Every number comes with the CPU model and the kernel set that ran it.

    python bench/kernels_gemm.py [--threads 2] [--sets avx2-fma,amx]
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
import torch.nn.functional as F

from genserve.kernels import cpu, load_kernels

SHAPES = [(576, 3072), (1536, 576), (576, 49152)]  # (K, N)


def best_time(fn, min_s: float = 0.3) -> float:
    fn()
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_s or len(times) < 5:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def copy_gbs() -> float:
    """Bytes read + written per second copying 256 MiB."""
    a = torch.ones(128 << 20, dtype=torch.uint8)
    b = torch.empty_like(a)
    return 2 * a.numel() / best_time(lambda: b.copy_(a)) / 1e9


def gemm(lib, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
    m, k = x.shape
    lib.genserve_gemm_bf16(w.data_ptr(), None, x.data_ptr(), k, y.data_ptr(), y.shape[1], m,
                           w.shape[0], k, 1)  # fmt: skip


def gemv_gbs(lib, k: int, n: int) -> float:
    w = (torch.randn(n, k) * 0.05).bfloat16()
    x, y = torch.randn(1, k).bfloat16(), torch.empty(1, n)
    return w.numel() * 2 / best_time(partial(gemm, lib, w, x, y)) / 1e9


def gemm_gflops(lib, m: int, k: int, n: int) -> tuple[float, float]:
    """(ours, MKL fp32 sgemm on the same matrices in fp32)"""
    w = (torch.randn(n, k) * 0.05).bfloat16()
    x, y = torch.randn(m, k).bfloat16(), torch.empty(m, n)
    flops = 2 * m * n * k
    ours = flops / best_time(partial(gemm, lib, w, x, y)) / 1e9
    mkl = flops / best_time(partial(F.linear, x.float(), w.float())) / 1e9
    return ours, mkl


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sets", default=",".join(cpu.supported_sets()))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu.cpu_model()}; {args.threads} threads; copy {copy_gbs():.1f} GB/s")
    torch.manual_seed(0)
    for name in args.sets.split(","):
        lib = load_kernels(name)
        if lib is None:
            print(f"{name}: not available on this CPU")
            continue
        for k, n in SHAPES:
            print(f"{name:12s} M=1   K={k:5d} N={n:6d}  {gemv_gbs(lib, k, n):6.1f} GB/s")
        for m in (32, 512):
            ours, mkl = gemm_gflops(lib, m, 576, 3072)
            print(f"{name:12s} M={m:<3d} K=  576 N=  3072  {ours:6.1f} GFLOP/s"
                  f"  (MKL fp32 sgemm {mkl:6.1f})")  # fmt: skip


if __name__ == "__main__":
    main()
