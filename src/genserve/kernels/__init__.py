"""Native CPU kernels, compiled on first use with the system C compiler and cached.

`load_decode_bf16()` returns the ctypes library of `decode_bf16.c` (built with its AMX paths where
AMX is granted), or None when the CPU lacks AVX512-BF16, no compiler is found, or the build fails
(genserve then runs PyTorch ops only).
`load_amx_linear()` likewise for `amx_linear.c` (AMX-BF16 CPUs, once Linux granted AMX state).
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

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-fopenmp",
         "-shared", "-fPIC"]  # fmt: skip


def cache_root() -> Path:
    root = os.environ.get("GENSERVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "genserve"
    )
    return Path(root) / "kernels"


def cpu_has(*flags: str) -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    words = set(text.split())
    return all(f in words for f in flags)


def _build(source: Path, extra_flags: tuple[str, ...] = ()) -> Path | None:
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        log.warning("no C compiler found: native kernels disabled")
        return None
    flags = [*FLAGS, *extra_flags]
    headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))
    digest = hashlib.sha256(source.read_bytes() + headers + " ".join(flags).encode()).hexdigest()
    digest = digest[:16]
    target = cache_root() / f"{source.stem}-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [compiler, *flags, str(source), "-o", str(out), "-lm"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            log.warning("building %s failed: %s", source.name, res.stderr.strip()[:500])
            return None
        os.replace(out, target)
    return target


def native_enabled() -> bool:
    """GENSERVE_NATIVE_KERNELS=0 turns off every native path (kernels and weight prepacking)."""
    return os.environ.get("GENSERVE_NATIVE_KERNELS", "1") != "0"


PTR, INT, I64, FLT = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
Signatures = dict[str, tuple[list | None, type | None]]  # name -> (argtypes, restype)


def _load(
    source: str,
    cpu_flags: tuple[str, ...],
    signatures: Signatures,
    extra_flags: tuple[str, ...] = (),
) -> ctypes.CDLL | None:
    """Builds (once) and loads `source`, declaring each function's signature so callers pass
    plain ints (data_ptr()) and floats; None where the CPU, compiler or loader says no."""
    if not native_enabled() or not cpu_has(*cpu_flags):
        return None
    import torch  # noqa: F401 - load PyTorch's libgomp before ours

    path = _build(HERE / source, extra_flags)
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        log.warning("loading %s failed: %s", path, e)
        return None
    for name, (argtypes, restype) in signatures.items():
        fn = getattr(lib, name)
        if argtypes is not None:
            fn.argtypes = argtypes
        fn.restype = restype
    return lib


DECODE_SIGNATURES: Signatures = {
    # genserve_decode_layer_bf16 and genserve_decode_stack_bf16 take struct pointers
    # (layers/fused_decode.py builds them)
    "genserve_decode_layer_bf16": (None, None),
    "genserve_decode_stack_bf16": (None, INT),
    "genserve_gemm_bf16": ([PTR, PTR, PTR, INT, PTR, INT, INT, INT, INT, INT], None),
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
}  # fmt: skip
DECODE_AMX_SIGNATURES: Signatures = {
    **DECODE_SIGNATURES,
    "genserve_prefill_attention_amx": (
        [PTR, I64, PTR, I64, PTR, PTR, PTR, INT, PTR, PTR, PTR, INT, INT, INT, INT, INT, FLT], INT
    ),
}  # fmt: skip


@cache
def load_decode_bf16(amx: bool | None = None) -> ctypes.CDLL | None:
    """`decode_bf16.c`, built with its AMX paths (attention scores in tiles) where AMX is
    granted (`amx=None`: where possible; tests ask for either build)."""
    base = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")
    if amx is not False and load_amx_linear() is not None:  # AMX state granted
        flags = ("-mamx-tile", "-mamx-bf16", "-DGENSERVE_AMX")
        lib = _load("decode_bf16.c", (*base, "amx_bf16", "amx_tile"), DECODE_AMX_SIGNATURES, flags)
        if lib is not None or amx:
            return lib
    if amx:
        return None
    return _load("decode_bf16.c", base, DECODE_SIGNATURES)


@cache
def load_amx_linear() -> ctypes.CDLL | None:
    lib = _load(
        "amx_linear.c",
        ("amx_bf16", "amx_tile", "avx512_bf16"),
        {
            "genserve_amx_init": ([], INT),
            "genserve_amx_pack_bf16": ([PTR, PTR, INT, INT], None),
            "genserve_amx_linear_bf16": ([PTR, INT, PTR, PTR, PTR, INT, INT, INT, INT, INT], INT),
            "genserve_amx_linear_argmax_bf16": ([PTR, INT, PTR, INT, INT, INT, INT, PTR, PTR], INT),
            "genserve_amx_glu_bf16": ([PTR, INT, PTR, PTR, INT, INT, INT, INT], INT),
        },
        ("-mamx-tile", "-mamx-bf16"),
    )
    if lib is not None and lib.genserve_amx_init() != 0:
        log.warning("the kernel did not grant AMX state: AMX linear layers disabled")
        return None
    return lib
