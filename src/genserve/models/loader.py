"""Where a model comes from (local dir, hub id, .gguf file, the built-in default) and how its
weights get into our modules: built on the `meta` device, each parameter materialised once and
filled straight from the memory-mapped safetensors (packed q/k/v and gate/up included).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from genserve.config import ModelConfig
from genserve.kernels import load_kernels
from genserve.kernels.cpu import kernel_set
from genserve.models.registry import model_class, supported_architectures

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]


class ModelLoadError(ValueError):
    """A user-facing problem with the model source; the CLI prints it as one line."""


def default_dtype() -> torch.dtype:
    """bfloat16 wherever genserve's native kernels run on this CPU (every x86-64-v3 CPU: AVX2
    and FMA widen bf16 in registers; AVX512-BF16 and AMX compute in it), else float32 (PyTorch's
    own bf16 matmuls on such CPUs are slower than its float32 ones)."""
    if torch.cuda.is_available():
        return torch.bfloat16
    try:
        name = kernel_set().name
    except ValueError as e:  # GENSERVE_KERNELS names a set this CPU cannot run
        raise ModelLoadError(str(e)) from e
    return torch.bfloat16 if load_kernels(name) is not None else torch.float32


def parse_dtype(name: str | None) -> torch.dtype:
    if name is None:
        return default_dtype()
    if name not in DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_model_dir(model_id: str | None, revision: str | None = None) -> Path:
    """Turn `--model-id` into a local Hugging Face directory."""
    if model_id is None:
        from genserve.models.default_model import default_model_dir

        return default_model_dir()
    path = Path(model_id).expanduser()
    if model_id.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {model_id}")
        from genserve.models.gguf import cached_gguf_dir

        return cached_gguf_dir(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{model_id} is a directory without config.json")
        return path
    if path.exists() or model_id.startswith((".", "/", "~")) or model_id.count("/") != 1:
        raise ModelLoadError(f"model path does not exist: {model_id}")
    return _download(model_id, revision)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        why = "HF_HUB_OFFLINE=1 and it is not in the cache" if offline else "the hub is unreachable"
        raise ModelLoadError(
            f"cannot fetch {repo_id}: {why}; pass a local directory or a .gguf file as "
            "--model-id, or omit it to serve the built-in SmolLM2-135M-Instruct"
        ) from e
    except HfHubHTTPError as e:
        raise ModelLoadError(f"cannot fetch {repo_id} from the hub: {e}".splitlines()[0]) from e


def load_config(model_dir: Path) -> ModelConfig:
    try:
        raw = json.loads((model_dir / "config.json").read_text())
        cfg = ModelConfig.from_hf(raw)
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"invalid config.json in {model_dir}: {e}") from e
    if model_class(cfg.architecture) is None:
        raise ModelLoadError(
            f"unsupported architecture {cfg.architecture or '(none)'!r}; "
            f"supported: {', '.join(supported_architectures())}"
        )
    return cfg


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise ModelLoadError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")


def load_model(model_dir: Path, dtype: torch.dtype, cfg: ModelConfig | None = None) -> nn.Module:
    """Build the model on `meta` and fill every parameter from the checkpoint."""
    cfg = cfg or load_config(model_dir)
    with torch.device("meta"):
        model = model_class(cfg.architecture)(cfg)
    params = dict(model.named_parameters())
    for name, p in params.items():
        setattr(
            _owner(model, name),
            name.rsplit(".", 1)[-1],
            nn.Parameter(torch.empty(p.shape, dtype=dtype), requires_grad=False),
        )
    params = dict(model.named_parameters())
    loaded: dict[str, set] = {}
    for file in _weight_files(model_dir):
        _load_file(model, file, params, loaded)
    missing = [n for n in params if loaded.get(n) != _expected_shards(model, n)]
    if missing:
        raise ModelLoadError(
            f"checkpoint in {model_dir} lacks {len(missing)} weights, e.g. {missing[0]}"
        )
    return model.eval()


def _expected_shards(model: nn.Module, name: str) -> set:
    packed = getattr(model, "packed_modules", {})
    shards = {shard for ours, shard in packed.values() if f".{ours}." in f".{name}"}
    return shards or {None}


def _owner(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model


def _load_file(model: nn.Module, file: Path, params: dict, loaded: dict[str, set]) -> None:
    packed = getattr(model, "packed_modules", {})
    try:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                name, shard = _map_name(key, packed)
                if name not in params:
                    continue  # e.g. rotary inv_freq, or lm_head of a tied checkpoint
                tensor = f.get_tensor(key)
                target = params[name]
                rows = target.data if shard is None else target.data[model.shard_slice(name, shard)]
                if rows.shape != tensor.shape:
                    raise ModelLoadError(
                        f"{file.name}: {key} has shape {tuple(tensor.shape)}, "
                        f"expected {tuple(rows.shape)}"
                    )
                rows.copy_(tensor)
                loaded.setdefault(name, set()).add(shard)
    except (OSError, RuntimeError, ValueError) as e:
        if isinstance(e, ModelLoadError):
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelLoadError(f"corrupt or truncated safetensors file {file.name}: {msg}") from e


def _map_name(key: str, packed: dict[str, tuple[str, str | int]]) -> tuple[str, str | int | None]:
    for ckpt, (ours, shard) in packed.items():
        part = f".{ckpt}."
        if part in key:
            return key.replace(part, f".{ours}."), shard
    return key, None
