"""Native CPU kernels, compiled on first use with the system C compiler and cached.

`load_decode_bf16()` returns the ctypes library of `decode_bf16.c`, or None when the CPU lacks
AVX512-BF16, no compiler is found, or the build fails (genserve then runs PyTorch ops only).
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


@cache
def load_decode_bf16() -> ctypes.CDLL | None:
    if not native_enabled():
        return None
    if not cpu_has("avx512f", "avx512bw", "avx512vl", "avx512_bf16"):
        return None
    import torch  # noqa: F401 - load PyTorch's libgomp before ours

    path = _build(HERE / "decode_bf16.c")
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        log.warning("loading %s failed: %s", path, e)
        return None
    # the signatures, declared once: callers pass plain ints (data_ptr()) and floats.
    # genserve_decode_layer_bf16 takes struct pointers (layers/fused_decode.py builds them).
    p, i, i64, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    signatures = {
        "genserve_decode_layer_bf16": (None, None),
        "genserve_gemm_bf16": ([p, p, p, i, p, i, i, i, i, i], None),
        "genserve_add_rmsnorm_bf16": ([p, p, p, p, i, i, f], None),
        "genserve_qkv_post_bf16": ([p, i, i, i, i, p, p, p, f, p, p, p], None),
        "genserve_silu_mul_bf16": ([p, p, i, i], None),
        "genserve_paged_decode_attention_bf16": (
            [p, i64, p, i64, p, p, p, i, p, i64, i, i, i, i, i, f],
            i,
        ),
        "genserve_argmax_f32": ([p, i, i64, p], None),
    }
    for name, (argtypes, restype) in signatures.items():
        fn = getattr(lib, name)
        if argtypes is not None:
            fn.argtypes = argtypes
        fn.restype = restype
    return lib


@cache
def load_amx_linear() -> ctypes.CDLL | None:
    if not native_enabled() or not cpu_has("amx_bf16", "amx_tile", "avx512_bf16"):
        return None
    import torch  # noqa: F401 - load PyTorch's libgomp before ours

    path = _build(HERE / "amx_linear.c", ("-mamx-tile", "-mamx-bf16"))
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        log.warning("loading %s failed: %s", path, e)
        return None
    if lib.genserve_amx_init() != 0:
        log.warning("the kernel did not grant AMX state: AMX linear layers disabled")
        return None
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.genserve_amx_pack_bf16.argtypes = [p, p, i, i]
    lib.genserve_amx_pack_bf16.restype = None
    lib.genserve_amx_linear_bf16.argtypes = [p, i, p, p, p, i, i, i, i, i]
    lib.genserve_amx_linear_bf16.restype = i
    return lib
