"""Native CPU kernels, compiled on first use with the system C compiler and cached.

The C sources are one per concept (gemm.c, panel_linear.c, small_ops.c, attention_decode.c,
attention_prefill.c, decoder_layer.c, sampling.c); each kernel set of `cpu.py` builds them all
into one library with its own compiler flags, the sources picking their variant by the
predefined ISA macros (`__AVX512BF16__`, else AVX2 + FMA; `GENSERVE_AMX` for the AMX paths).

`load_kernels(kernel_set)` returns that library (ctypes, signatures declared), or None for
`torch`, a set this CPU cannot run, no compiler or a failed build (genserve then runs PyTorch
ops). `load_amx_linear()` returns `amx_linear.c`'s library when the chosen set is `amx`.
PyTorch must be imported first: the libraries link libgomp by soname and so share its threads.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

from genserve.kernels import cpu

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
COMMON_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC")
AVX512_BF16 = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma")
AMX = ("-mamx-tile", "-mamx-bf16")
SET_FLAGS: dict[str, tuple[str, ...]] = {
    "avx2-fma": ("-mavx2", "-mfma", "-mf16c"),
    "avx512-bf16": AVX512_BF16,
    "amx": (*AVX512_BF16, *AMX, "-DGENSERVE_AMX"),
}
KERNEL_SOURCES = ("gemm.c", "small_ops.c", "attention_decode.c", "attention_prefill.c",
                  "decoder_layer.c", "sampling.c", "panel_linear.c")  # fmt: skip


def cache_root() -> Path:
    root = os.environ.get("GENSERVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "genserve"
    )
    return Path(root) / "kernels"


def _build(name: str, sources: tuple[Path, ...], flags: tuple[str, ...]) -> Path | None:
    """Compiles `sources` into one library `name-<hash>.so` in the cache, the hash over the
    sources, every header beside them and the flags; a cached build is reused."""
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        log.warning("no C compiler found: native kernels disabled")
        return None
    flags = (*COMMON_FLAGS, *flags)
    text = b"".join(p.read_bytes() for p in (*sources, *sorted(HERE.glob("*.h"))))
    digest = hashlib.sha256(text + " ".join(flags).encode()).hexdigest()[:16]
    target = cache_root() / f"{name}-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [compiler, *flags, *map(str, sources), "-o", str(out), "-lm"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            log.warning("building %s failed: %s", name, res.stderr.strip()[:500])
            return None
        os.replace(out, target)
    return target


PTR, INT, I64, FLT = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
Signatures = dict[str, tuple[list | None, type | None]]  # name -> (argtypes, restype)


def _load(
    name: str, sources: tuple[str, ...], flags: tuple[str, ...], signatures: Signatures
) -> ctypes.CDLL | None:
    """Builds (once) and loads a library, declaring each function's signature so callers pass
    plain ints (data_ptr()) and floats; None where the compiler or loader says no."""
    import torch  # noqa: F401 - load PyTorch's libgomp before ours

    path = _build(name, tuple(HERE / src for src in sources), flags)
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        log.warning("loading %s failed: %s", path, e)
        return None
    for fn_name, (argtypes, restype) in signatures.items():
        fn = getattr(lib, fn_name)
        if argtypes is not None:
            fn.argtypes = argtypes
        fn.restype = restype
    return lib


# genserve_prefill_attention_bf16 (every set) and genserve_prefill_attention_amx: one signature
PREFILL_ARGS = (
    [PTR, I64, PTR, I64, PTR, PTR, PTR, INT, PTR, PTR, PTR, INT, INT, INT, INT, INT, FLT],
    INT,
)
# Every native kernel set exports these. genserve_decode_layer_bf16 and
# genserve_decode_stack_bf16 take struct pointers (layers/fused_decode.py builds them); the
# stack takes its linears as function pointers: the amx library's, or the panel ones here.
# Those returning INT return nonzero when memory ran out (the result is then not usable).
KERNEL_SIGNATURES: Signatures = {
    "genserve_decode_layer_bf16": (None, INT),
    "genserve_decode_stack_bf16": (None, INT),
    "genserve_gemm_bf16": ([PTR, PTR, PTR, INT, PTR, INT, INT, INT, INT, INT], INT),
    "genserve_add_rmsnorm_bf16": ([PTR, PTR, PTR, PTR, INT, INT, FLT], None),
    "genserve_qkv_post_bf16": ([PTR, INT, INT, INT, INT, PTR, PTR, PTR, FLT, PTR, PTR, PTR], None),
    "genserve_silu_mul_bf16": ([PTR, PTR, INT, INT], None),
    "genserve_paged_decode_attention_bf16": (
        [PTR, I64, PTR, I64, PTR, PTR, PTR, INT, PTR, I64, INT, INT, INT, INT, INT, FLT], INT
    ),
    "genserve_argmax_f32": ([PTR, INT, I64, PTR], None),
    "genserve_sample_cdf_f32": ([PTR, I64, INT, I64, PTR, PTR], None),
    "genserve_top_p_mask_f32": ([PTR, I64, PTR, INT, I64, PTR], INT),
    "genserve_top_k_mask_f32": ([PTR, I64, INT, I64, PTR], INT),
    "genserve_logsumexp_f32": ([PTR, I64, INT, I64, PTR], None),
    "genserve_prefill_attention_bf16": PREFILL_ARGS,
    "genserve_panel_packed_size": ([INT, INT], I64),
    "genserve_panel_pack_bf16": ([PTR, PTR, INT, INT], None),
    "genserve_panel_linear_bf16": ([PTR, INT, PTR, PTR, PTR, INT, INT, INT, INT, INT], INT),
    "genserve_panel_glu_bf16": ([PTR, INT, PTR, PTR, INT, INT, INT, INT], INT),
    "genserve_panel_linear_argmax_bf16": ([PTR, INT, PTR, INT, INT, INT, INT, PTR, PTR], INT),
}  # fmt: skip
# The amx set's extras (callers test with hasattr)
AMX_SIGNATURES: Signatures = {
    **KERNEL_SIGNATURES,
    "genserve_prefill_attention_amx": PREFILL_ARGS,
}  # fmt: skip


def load_kernels(kernel_set: str | None = None) -> ctypes.CDLL | None:
    """The kernel library of `kernel_set` (None: `cpu.kernel_set()`'s, the one this process
    runs), or None for `torch`, a set this CPU cannot run, or a failed build."""
    if kernel_set is None:
        kernel_set = cpu.kernel_set().name
    if not cpu.native_enabled() or kernel_set not in cpu.supported_sets():
        return None
    return _load_set(kernel_set)


@cache
def _load_set(kernel_set: str) -> ctypes.CDLL | None:
    signatures = AMX_SIGNATURES if kernel_set == "amx" else KERNEL_SIGNATURES
    return _load(f"kernels-{kernel_set}", KERNEL_SOURCES, SET_FLAGS[kernel_set], signatures)


def load_amx_linear() -> ctypes.CDLL | None:
    """`amx_linear.c`'s library where the chosen kernel set is `amx`, else None."""
    if cpu.kernel_set().name != "amx" or not cpu.native_enabled():
        return None
    return _load_amx_linear()


@cache
def _load_amx_linear() -> ctypes.CDLL | None:
    lib = _load(
        "amx_linear",
        ("amx_linear.c",),
        (*AVX512_BF16, *AMX),
        {
            "genserve_amx_init": ([], INT),
            "genserve_amx_pack_bf16": ([PTR, PTR, INT, INT], None),
            "genserve_amx_linear_bf16": ([PTR, INT, PTR, PTR, PTR, INT, INT, INT, INT, INT], INT),
            "genserve_amx_linear_argmax_bf16": ([PTR, INT, PTR, INT, INT, INT, INT, PTR, PTR], INT),
            "genserve_amx_glu_bf16": ([PTR, INT, PTR, PTR, INT, INT, INT, INT], INT),
        },
    )
    if lib is not None and lib.genserve_amx_init() != 0:
        log.warning("the kernel did not grant AMX state: AMX linear layers disabled")
        return None
    return lib
