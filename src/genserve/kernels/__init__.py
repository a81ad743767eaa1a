"""Native CPU kernels, compiled on first use with the system C compiler and cached.

`load_decode_bf16()` returns the ctypes library of `decode_bf16.c`, or None when the CPU lacks
AVX512-BF16, no compiler is found, or the build fails (genserve then runs PyTorch ops only).
PyTorch must be imported first: the library links libgomp by soname and so shares its threads.
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


def _build(source: Path) -> Path | None:
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        log.warning("no C compiler found: native kernels disabled")
        return None
    digest = hashlib.sha256(source.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = cache_root() / f"{source.stem}-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [compiler, *FLAGS, str(source), "-o", str(out), "-lm"]
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
        return ctypes.CDLL(str(path))
    except OSError as e:
        log.warning("loading %s failed: %s", path, e)
        return None
