"""Convert a GGUF checkpoint (llama.cpp's format) into a plain Hugging Face model directory.

The output is what `save_pretrained` would write: `config.json`, `generation_config.json`,
`model.safetensors` (float32, HF tensor names), `tokenizer.json`, `tokenizer_config.json` and
`chat_template.jinja`, so the rest of genserve only ever loads one format.

Two things llama.cpp's converter did are undone here:
- quantization: every tensor is dequantized to float32 with `gguf.quants.dequantize`;
- for the `llama` architecture, the rows of Q and K were permuted (per head, the two rotary halves
  interleaved) to suit llama.cpp's rotary kernel; we permute them back, as `transformers` does.

Conversion writes into a temporary sibling directory and renames it into place, so concurrent
processes converting the same file never see a half-written directory. `cached_gguf_dir` keeps
one conversion per GGUF file:

    <cache_root>/models/<gguf stem>-<key>/   config.json, model.safetensors, tokenizer.json, ...

where `<key>` hashes the file's size, mtime and `CONVERTER_VERSION`: finding it costs one stat.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from genserve.models.gguf_tokenizer import (
    TokenizerBuildError,
    eos_token_ids,
    tokenizer_metadata,
    write_tokenizer_files,
)

logger = logging.getLogger(__name__)

# Bump when the output of `convert_gguf` changes, so cached conversions are redone.
CONVERTER_VERSION = 1
# Written into every converted directory; says where it came from.
SOURCE_FILE = "gguf_source.json"
# A conversion's temp directory older than this was left by a process that died.
STALE_TEMP_AGE_S = 3600.0


class GGUFError(ValueError):
    """A GGUF file that cannot be converted; the message is one line naming the problem."""


@dataclass(frozen=True, slots=True)
class _Arch:
    hf_class: str
    model_type: str
    permute_qk: bool  # llama.cpp permutes Q/K rows only for llama-family checkpoints


ARCHITECTURES: dict[str, _Arch] = {
    "llama": _Arch("LlamaForCausalLM", "llama", permute_qk=True),
    "qwen2": _Arch("Qwen2ForCausalLM", "qwen2", permute_qk=False),
    "qwen3": _Arch("Qwen3ForCausalLM", "qwen3", permute_qk=False),
}

_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Tensors llama.cpp adds that have no HF counterpart: precomputed Llama 3 rope frequency factors.
_DROPPED_TENSORS = {"rope_freqs.weight"}
_LAYER_NAME = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


@dataclass(slots=True)
class GGUFCheckpoint:
    """A parsed GGUF file: its metadata (key -> value) and tensor records."""

    path: Path
    arch: str
    meta: dict[str, Any]
    tensors: list[Any]  # gguf.ReaderTensor; `data` is a memory map of the file

    def arch_key(self, key: str, default: Any = None) -> Any:
        return self.meta.get(f"{self.arch}.{key}", default)


def read_gguf(path: str | os.PathLike[str]) -> GGUFCheckpoint:
    """Parse `path`'s header; raise `GGUFError` for a missing, corrupt or unsupported file."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"GGUF file not found: {path}")
    with path.open("rb") as f:
        magic = f.read(4)
    if not magic:
        raise GGUFError(f"{path} is empty, not a GGUF file")
    if magic != b"GGUF":
        raise GGUFError(f"{path} is not a GGUF file (bad magic {magic!r})")
    try:
        reader = gguf.GGUFReader(path)
        meta = {name: field.contents() for name, field in reader.fields.items()}
    except Exception as exc:  # the reader fails in many ways on a damaged file
        raise GGUFError(f"{path} is a corrupt or truncated GGUF file ({_one_line(exc)})") from exc
    if reader.byte_order != "I":
        raise GGUFError(f"{path} is a big-endian GGUF file, which is not supported")
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        supported = ", ".join(ARCHITECTURES)
        raise GGUFError(f"{path}: unsupported architecture {arch!r} (supported: {supported})")
    checkpoint = GGUFCheckpoint(path=path, arch=arch, meta=meta, tensors=list(reader.tensors))
    _check_tensor_types(checkpoint)
    return checkpoint


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _check_tensor_types(checkpoint: GGUFCheckpoint) -> None:
    """Fail before any work if a tensor's type cannot be dequantized (probe one block each)."""
    import gguf

    seen = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16}
    for tensor in checkpoint.tensors:
        qtype = tensor.tensor_type
        if qtype in seen:
            continue
        seen.add(qtype)
        unsupported = GGUFError(
            f"{checkpoint.path}: tensor {tensor.name} has unsupported type {qtype.name}"
        )
        if tensor.data.dtype != np.uint8:  # integer tensors: not weights we can use
            raise unsupported
        block = tensor.data.reshape(-1)[: gguf.GGML_QUANT_SIZES[qtype][1]]
        try:
            gguf.quants.dequantize(block, qtype)
        except NotImplementedError:  # the gguf package's answer for a type it cannot decode
            raise unsupported from None


def hf_tensor_name(gguf_name: str) -> str | None:
    """HF state-dict name of a GGUF tensor; None if it has no HF counterpart or is unknown."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _GLOBAL_TENSORS and suffix in ("weight", "bias"):
        return f"{_GLOBAL_TENSORS[stem]}.{suffix}"
    match = _LAYER_NAME.match(gguf_name)
    if match and match.group(2) in _LAYER_TENSORS:
        layer, leaf, suffix = match.groups()
        return f"model.layers.{layer}.{_LAYER_TENSORS[leaf]}.{suffix}"
    return None


def _required_tensors(arch: str, num_layers: int) -> list[str]:
    names = ["token_embd.weight", "output_norm.weight"]
    leaves = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm"]
    leaves += ["ffn_gate", "ffn_up", "ffn_down"]
    if arch == "qwen3":
        leaves += ["attn_q_norm", "attn_k_norm"]
    for i in range(num_layers):
        names += [f"blk.{i}.{leaf}.weight" for leaf in leaves]
        if arch == "qwen2":  # HF's Qwen2 always has q/k/v biases
            names += [f"blk.{i}.attn_{p}.bias" for p in "qkv"]
    return names


def tensor_plan(checkpoint: GGUFCheckpoint, num_layers: int) -> list[tuple[str, list[int], Any]]:
    """(HF name, HF shape, GGUF tensor) for every tensor to write, in file order.

    Raises `GGUFError` for a missing or unknown tensor before anything is written.
    """
    present = {t.name for t in checkpoint.tensors}
    for name in _required_tensors(checkpoint.arch, num_layers):
        if name not in present:
            raise GGUFError(f"{checkpoint.path}: missing tensor {name}")
    plan = []
    for tensor in checkpoint.tensors:
        if tensor.name in _DROPPED_TENSORS:
            logger.warning(
                "%s: dropping %s: its Llama 3 rope scaling is not converted (only matters past "
                "the original context length)",
                checkpoint.path.name,
                tensor.name,
            )
            continue
        name = hf_tensor_name(tensor.name)
        layer = _LAYER_NAME.match(tensor.name)
        if name is None or (layer is not None and int(layer.group(1)) >= num_layers):
            raise GGUFError(f"{checkpoint.path}: unexpected tensor {tensor.name}")
        plan.append((name, [int(d) for d in reversed(tensor.shape.tolist())], tensor))
    return plan


def unpermute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation.

    llama.cpp stores each head's rows as interleaved rotary pairs (row 2i, 2i+1 = halves i of
    HF's "rotate_half" layout). Weight [n_head * head_dim, in] or bias [n_head * head_dim].
    """
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise GGUFError(f"cannot un-permute a Q/K tensor of {rows} rows over {n_head} heads")
    # [n_head, head_dim / 2, 2, in] -> [n_head, 2, head_dim / 2, in]
    grouped = weight.reshape(n_head, rows // n_head // 2, 2, -1)
    return np.ascontiguousarray(grouped.swapaxes(1, 2)).reshape(weight.shape)


def dequantize_tensor(tensor: Any) -> np.ndarray:
    """A GGUF tensor as a float32 array in HF (row-major, reversed GGUF dims) shape."""
    import gguf

    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    shape = [int(d) for d in reversed(tensor.shape.tolist())]
    return np.asarray(values, dtype=np.float32).reshape(shape)


def _iter_weights(
    checkpoint: GGUFCheckpoint, config: Mapping[str, Any], plan: list[tuple[str, list[int], Any]]
) -> Iterator[np.ndarray]:
    """Each planned tensor as float32, Q/K rows back in HF order for llama."""
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    permute = ARCHITECTURES[checkpoint.arch].permute_qk
    for name, _, tensor in plan:
        weight = dequantize_tensor(tensor)
        proj = name.split(".")[-2]
        if permute and proj in heads:
            weight = unpermute_qk(weight, heads[proj])
        yield weight


def write_safetensors(
    path: Path, specs: list[tuple[str, list[int]]], arrays: Iterator[np.ndarray]
) -> None:
    """Stream float32 tensors into a safetensors file, holding one tensor in memory at a time."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in specs:
        size = 4 * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for (name, shape), array in zip(specs, arrays, strict=True):
            if list(array.shape) != shape:
                raise GGUFError(f"tensor {name} has shape {list(array.shape)}, expected {shape}")
            f.write(np.ascontiguousarray(array, dtype="<f4").data)


def hf_config(checkpoint: GGUFCheckpoint) -> dict[str, Any]:
    """`config.json` contents for the checkpoint's architecture."""
    arch = ARCHITECTURES[checkpoint.arch]
    tensors = {t.name: t for t in checkpoint.tensors}

    def need(key: str) -> Any:
        value = checkpoint.arch_key(key)
        if value is None:
            raise GGUFError(f"{checkpoint.path}: missing metadata {checkpoint.arch}.{key}")
        if isinstance(value, list):
            raise GGUFError(
                f"{checkpoint.path}: per-layer {checkpoint.arch}.{key} is not supported"
            )
        return value

    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{checkpoint.path}: no token_embd.weight tensor")
    heads = need("attention.head_count")
    kv_heads = checkpoint.arch_key("attention.head_count_kv", heads)
    hidden = need("embedding_length")
    head_dim = checkpoint.arch_key("attention.key_length")
    if head_dim is None and arch.model_type == "llama":
        head_dim = checkpoint.arch_key("rope.dimension_count")
    head_dim = head_dim or hidden // heads
    if (
        "blk.0.attn_q.weight" in tensors
        and int(tensors["blk.0.attn_q.weight"].shape[1]) != heads * head_dim
    ):
        raise GGUFError(f"{checkpoint.path}: attn_q rows do not match {heads} heads of {head_dim}")
    tok = tokenizer_metadata(checkpoint.meta)
    config: dict[str, Any] = {
        "architectures": [arch.hf_class],
        "model_type": arch.model_type,
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(checkpoint.arch_key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _f32(checkpoint.arch_key("rope.freq_base", 10000.0)),
        "max_position_embeddings": need("context_length"),
        "vocab_size": int(tensors["token_embd.weight"].shape[1]),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": tok.get("bos_token_id"),
        "eos_token_id": eos_token_ids(tok),
        "pad_token_id": tok.get("padding_token_id"),
        "torch_dtype": "float32",
    }
    if arch.model_type == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
        config["mlp_bias"] = False
    elif arch.model_type == "qwen3":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
    rope_scaling = _rope_scaling(checkpoint)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


def _f32(value: float) -> float:
    """A float32 metadata value as its shortest decimal (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def _rope_scaling(checkpoint: GGUFCheckpoint) -> dict[str, Any] | None:
    kind = checkpoint.arch_key("rope.scaling.type")
    factor = checkpoint.arch_key("rope.scaling.factor")
    if kind in (None, "none") and factor in (None, 1.0):
        return None
    if kind not in ("linear", "yarn") or factor is None:
        raise GGUFError(f"{checkpoint.path}: unsupported rope scaling {kind!r} (factor {factor})")
    scaling: dict[str, Any] = {"rope_type": kind, "factor": _f32(factor)}
    original = checkpoint.arch_key("rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = original
    attn_factor = checkpoint.arch_key("rope.scaling.attn_factor")
    if kind == "yarn" and attn_factor is not None:
        scaling["attention_factor"] = _f32(attn_factor)
    return scaling


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_model_dir(checkpoint: GGUFCheckpoint, out: Path) -> None:
    config = hf_config(checkpoint)
    plan = tensor_plan(checkpoint, config["num_hidden_layers"])
    _write_json(out / "config.json", config)
    generation = {
        k: config[k]
        for k in ("bos_token_id", "eos_token_id", "pad_token_id")
        if config[k] is not None
    }
    _write_json(out / "generation_config.json", generation)
    try:
        wrote = write_tokenizer_files(
            checkpoint.meta, out, max_length=config["max_position_embeddings"]
        )
    except TokenizerBuildError as exc:
        raise GGUFError(f"{checkpoint.path}: {exc}") from exc
    if not wrote:
        logger.warning("%s has no tokenizer metadata; writing no tokenizer", checkpoint.path.name)
    specs = [(name, shape) for name, shape, _ in plan]
    write_safetensors(out / "model.safetensors", specs, _iter_weights(checkpoint, config, plan))
    source = {
        "gguf": str(checkpoint.path),
        "size": checkpoint.path.stat().st_size,
        "file_type": checkpoint.meta.get("general.file_type"),
        "name": checkpoint.meta.get("general.name"),
        "converter_version": CONVERTER_VERSION,
    }
    _write_json(out / SOURCE_FILE, source)


def convert_gguf(
    gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Convert `gguf_path` into an HF model directory at `out_dir` and return its path.

    The directory appears atomically. If `out_dir` exists, raise `FileExistsError` unless
    `overwrite`; if another process creates it while we convert, keep theirs.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True to replace it)")
    start = time.perf_counter()
    checkpoint = read_gguf(gguf_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_model_dir(checkpoint, tmp)
        _fsync_files(tmp)  # a crash after the rename must not leave empty files behind
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        _publish(tmp, out_dir, overwrite=overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s in %.1f s", checkpoint.path.name, time.perf_counter() - start)
    return out_dir


def _fsync_files(directory: Path) -> None:
    for path in directory.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _publish(tmp: Path, out_dir: Path, *, overwrite: bool) -> None:
    if overwrite and out_dir.exists():
        # Move the old one aside first: rename cannot replace a non-empty directory.
        trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        try:
            os.replace(out_dir, trash / "old")
        except FileNotFoundError:
            pass
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if not out_dir.is_dir():
            raise
        logger.info("%s was converted concurrently by another process; keeping that one", out_dir)


def default_cache_root() -> Path:
    """`$GENSERVE_CACHE`, else `$XDG_CACHE_HOME/genserve`, else `~/.cache/genserve`."""
    if root := os.environ.get("GENSERVE_CACHE"):
        return Path(root).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "genserve"


def cache_dir_for(
    gguf_path: str | os.PathLike[str], cache_root: str | os.PathLike[str] | None = None
) -> Path:
    """Where `cached_gguf_dir` keeps the conversion of `gguf_path` (a stat, no read)."""
    path = Path(gguf_path)
    try:
        st = path.stat()
    except OSError as exc:
        raise GGUFError(f"GGUF file not found: {path}") from exc
    stamp = f"{st.st_size}:{st.st_mtime_ns}:{CONVERTER_VERSION}"
    key = hashlib.sha256(stamp.encode()).hexdigest()[:16]
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    return root / "models" / f"{path.stem}-{key}"


def cached_gguf_dir(
    gguf_path: str | os.PathLike[str], cache_root: str | os.PathLike[str] | None = None
) -> Path:
    """The HF directory converted from `gguf_path`, converting only on the first call.

    Safe for concurrent processes: each converts into its own temp directory and renames it
    into place; the first rename wins and the others keep the winner's directory.
    """
    out_dir = cache_dir_for(gguf_path, cache_root)
    if (out_dir / SOURCE_FILE).is_file():
        return out_dir
    _remove_stale_temp_dirs(out_dir)
    logger.info("converting %s into %s", gguf_path, out_dir)
    if out_dir.exists():  # no marker: not a finished conversion of ours
        return convert_gguf(gguf_path, out_dir, overwrite=True)
    try:
        return convert_gguf(gguf_path, out_dir)
    except FileExistsError:  # another process published it between our checks
        return out_dir


def _remove_stale_temp_dirs(out_dir: Path) -> None:
    if not out_dir.parent.is_dir():
        return
    now = time.time()
    for tmp in out_dir.parent.glob(f".{out_dir.name}.*"):
        try:
            if now - tmp.stat().st_mtime > STALE_TEMP_AGE_S:
                shutil.rmtree(tmp, ignore_errors=True)
        except FileNotFoundError:
            pass
