"""The bf16 linear kernels per kernel set: genserve_gemm_bf16 (gemm.c, W rows as they are) and
genserve_panel_linear_bf16 (panel_linear.c, W panel-packed once), side by side with MKL's fp32
sgemm (`F.linear` on float32 tensors) in the same run: weight-streaming GB/s at M=1 (against
the machine's copy bandwidth) and GFLOP/s at M=32, 512, 2048.

SmolLM2-135M shapes: qkv/gate_up-like K=576, N=3072; down K=1536, N=576; lm_head K=576,
N=49152. Every number comes with the CPU model and the kernel set that ran it; the machine may
be shared, so each number is the best of many calls.

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
ROWS = (32, 512, 2048)


def best_time(fn, min_s: float = 0.3, min_calls: int = 10) -> float:
    fn()
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_s or len(times) < min_calls:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def copy_gbs() -> float:
    """Bytes read + written per second copying 256 MiB."""
    a = torch.ones(128 << 20, dtype=torch.uint8)
    b = torch.empty_like(a)
    return 2 * a.numel() / best_time(lambda: b.copy_(a), min_calls=5) / 1e9


def kernels(lib, w: torch.Tensor):
    """{name: fn(x, y)} for the two kernels on weight w [N, K] bf16; y fp32 [M, N]."""
    n, k = w.shape
    p = torch.empty(lib.genserve_panel_packed_size(n, k), dtype=torch.bfloat16)
    lib.genserve_panel_pack_bf16(w.data_ptr(), p.data_ptr(), n, k)

    def gemm(x, y):
        lib.genserve_gemm_bf16(w.data_ptr(), None, x.data_ptr(), k, y.data_ptr(), n, x.shape[0],
                               n, k, 1)  # fmt: skip

    def panel(x, y, p=p):
        lib.genserve_panel_linear_bf16(x.data_ptr(), k, p.data_ptr(), None, y.data_ptr(), n,
                                       x.shape[0], n, k, 1)  # fmt: skip

    return {"gemm": gemm, "panel": panel}


def gemv_gbs(lib, k: int, n: int) -> dict[str, float]:
    w = (torch.randn(n, k) * 0.05).bfloat16()
    x, y = torch.randn(1, k).bfloat16(), torch.empty(1, n)
    fns = kernels(lib, w)
    return {name: w.numel() * 2 / best_time(partial(fn, x, y)) / 1e9 for name, fn in fns.items()}


def gemm_gflops(lib, m: int, k: int, n: int) -> dict[str, float]:
    """ours (both kernels) and MKL fp32 sgemm on the same matrices in fp32"""
    w = (torch.randn(n, k) * 0.05).bfloat16()
    x, y = torch.randn(m, k).bfloat16(), torch.empty(m, n)
    flops = 2 * m * n * k
    fns = {**kernels(lib, w), "mkl": partial(F.linear, x.float(), w.float())}
    times = {name: [] for name in fns}
    for _ in range(3):  # interleaved, so a busy spell of the machine hits all three alike
        for name, fn in fns.items():
            times[name].append(best_time(partial(fn, x, y) if name != "mkl" else fn, min_s=0.2))
    return {name: flops / min(t) / 1e9 for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sets", default=",".join(cpu.supported_sets()))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu.cpu_model()}; {args.threads} threads; copy {copy_gbs():.1f} GB/s")
    isa = "AVX-512" if cpu.cpu_has("avx512f") else "AVX2"
    print(f"MKL fp32 sgemm runs {isa} here, whichever kernel set runs beside it")
    torch.manual_seed(0)
    for name in args.sets.split(","):
        lib = load_kernels(name)
        if lib is None:
            print(f"{name}: not available on this CPU")
            continue
        for k, n in SHAPES:
            r = gemv_gbs(lib, k, n)
            print(f"{name:12s} M=1    K={k:5d} N={n:6d}  gemm {r['gemm']:6.1f}  "
                  f"panel {r['panel']:6.1f} GB/s")  # fmt: skip
        for m in ROWS:
            r = gemm_gflops(lib, m, 576, 3072)
            print(f"{name:12s} M={m:<4d} K=  576 N=  3072  gemm {r['gemm']:6.1f}  "
                  f"panel {r['panel']:6.1f}  MKL fp32 {r['mkl']:6.1f} GFLOP/s  "
                  f"(panel/MKL {r['panel'] / r['mkl']:.0%})")  # fmt: skip


if __name__ == "__main__":
    main()
