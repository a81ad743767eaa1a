"""The peers `genserve bench --compare` runs side by side, all on SmolLM2-135M-Instruct:

- genserve-bf16 / genserve-fp32: `genserve launch --dtype ...` (TGI API), the Q4_1 GGUF
  dequantized by genserve into an HF directory;
- llama.cpp-f16: `llama-server --parallel 64` (OpenAI completions with `ignore_eos`) on an F16
  GGUF converted by llama.cpp from that same HF directory;
- llama.cpp-q4_1: the same server on the original Q4_1 GGUF;
- transformers / transformers-cb: `transformers serve --device cpu --dtype float32` on the HF
  directory, without and with `--continuous-batching` (fixed lengths via `generation_config`).

genserve has no way to ignore EOS over TGI's HTTP API, so its requests ask for `max_new_tokens`
and may end early; the report shows requested vs produced tokens per run.
"""

from __future__ import annotations

import sys
from pathlib import Path

from genserve.bench import llamacpp
from genserve.bench.choices import PEERS
from genserve.bench.machine import kernel_set_text
from genserve.bench.servers import ServerSpec

LLAMA_PARALLEL = 64
LLAMA_CTX_PER_SLOT = 2048
DEFAULT_THREADS = 2  # the machine's cores; torch reads OMP_NUM_THREADS, llama.cpp takes -t


def genserve_spec(
    dtype: str, model_id: str | None = None, threads: int | None = None
) -> ServerSpec:
    short = {"bfloat16": "bf16", "float32": "fp32"}.get(dtype, dtype)

    def argv(port: int) -> list[str]:
        cmd = [sys.executable, "-m", "genserve.cli", "launch", "--hostname", "127.0.0.1"]
        cmd += ["--port", str(port), "--dtype", dtype, "--graceful-termination-timeout", "5"]
        if model_id:
            cmd += ["--model-id", model_id]
        return cmd

    return ServerSpec(
        name=f"genserve-{short}",
        description=f"genserve launch --dtype {dtype} (TGI /generate_stream, max_new_tokens only;"
        f" kernels {kernel_set_text()})",
        api="tgi",
        fixed_length="none",
        argv=argv,
        env=_omp(threads),
    )


def _omp(threads: int | None) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(threads)} if threads else {}


def llama_cpp_spec(
    name: str, binary: Path, gguf: Path | None, why: str | None, threads: int
) -> ServerSpec:
    def argv(port: int) -> list[str]:
        cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--parallel", str(LLAMA_PARALLEL), "--cont-batching", "--kv-unified"]
        cmd += ["--ctx-size", str(LLAMA_PARALLEL * LLAMA_CTX_PER_SLOT)]
        return cmd + ["--threads", str(threads), "--threads-batch", str(threads), "--no-webui"]

    kind = gguf.name if gguf else "?"
    return ServerSpec(
        name=name,
        description=f"llama-server ({binary.parent.parent.name}) --parallel {LLAMA_PARALLEL} "
        f"-t {threads} on {kind} "
        "(OpenAI /v1/completions, ignore_eos)",
        api="openai-completions",
        fixed_length="ignore_eos",
        argv=argv,
        model="smollm2",
        unavailable=why,
    )


def transformers_spec(
    hf_dir: Path, dtype: str = "float32", cb: bool = False, threads: int | None = None
) -> ServerSpec:
    flag = ["--continuous-batching"] if cb else []

    def argv(port: int) -> list[str]:
        cmd = [sys.executable, "-c", "from transformers.cli.transformers import main; main()"]
        cmd += ["serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
        return cmd + ["--dtype", dtype, *flag, str(hf_dir)]

    return ServerSpec(
        name="transformers-cb" if cb else "transformers",
        description=" ".join(["transformers serve --device cpu --dtype", dtype, *flag])
        + " (its own server; OpenAI /v1/completions, min_new_tokens via generation_config)",
        api="openai-completions",
        fixed_length="hf-generation-config",
        argv=argv,
        model=str(hf_dir),
        env=_omp(threads),
    )


def peer_specs(
    names: list[str], cache: Path, threads: int = DEFAULT_THREADS, isa: str = "native"
) -> list[ServerSpec]:
    """ServerSpecs for `names` (llama.cpp built as variant `isa`); a peer that cannot run here
    carries the reason."""
    from genserve.models.default_model import default_model_dir

    hf_dir = default_model_dir()
    binary = llamacpp.llama_server_path(cache, isa)
    no_build = None if binary.exists() else f"llama-server ({isa}) not built (use --build-peers)"
    specs = []
    for name in names:
        if name == "genserve-bf16":
            specs.append(genserve_spec("bfloat16", threads=threads))
        elif name == "genserve-fp32":
            specs.append(genserve_spec("float32", threads=threads))
        elif name == "llama.cpp-f16":
            gguf, why = _converted(cache, hf_dir)
            specs.append(llama_cpp_spec(name, binary, gguf, no_build or why, threads))
        elif name == "llama.cpp-q4_1":
            specs.append(llama_cpp_spec(name, binary, llamacpp.q4_1_gguf(), no_build, threads))
        elif name in ("transformers", "transformers-cb"):
            specs.append(transformers_spec(hf_dir, cb=name.endswith("-cb"), threads=threads))
        else:
            raise ValueError(f"unknown peer {name!r} (choose from {', '.join(PEERS)})")
    return specs


def _converted(cache: Path, hf_dir: Path) -> tuple[Path | None, str | None]:
    try:
        return llamacpp.f16_gguf(cache, hf_dir), None
    except Exception as exc:  # reported in the table, the other peers still run
        return None, f"F16 GGUF conversion failed: {exc}"
