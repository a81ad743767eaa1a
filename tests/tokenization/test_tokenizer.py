"""Tokenizer.from_dir on real tokenizers: BOS/EOS facts, encode parity with transformers,
byte offsets for /tokenize, token texts and special flags."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import tokenizers

from genserve.tokenization.tokenizer import Tokenizer

TEXTS = [
    "Hello world",
    "  leading spaces and trailing ",
    "héllo café naïve Ærøskøbing",
    "你好，世界！这是一个测试。",
    "emoji 🤖👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "code:\n\tdef f(x):\n\t\treturn x ** 2  # ½",
    "<|im_start|>user\nhi<|im_end|>",
]


@pytest.fixture(scope="module")
def smollm2(smollm2_tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_dir(smollm2_tokenizer_dir)


@pytest.fixture(scope="module")
def qwen3(qwen3_tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_dir(qwen3_tokenizer_dir)


@pytest.fixture(scope="module")
def llama3(llama3_tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_dir(llama3_tokenizer_dir)


def copy_dir(src: Path, dst: Path, tokenizer_config: dict | None = None, **extra: dict) -> Path:
    """A model dir linking src's tokenizer files, with `tokenizer_config` and extra json files."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (src / name).exists():
            (dst / name).symlink_to(src / name)
    if tokenizer_config is not None:
        (dst / "tokenizer_config.json").unlink(missing_ok=True)
        (dst / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    for name, content in extra.items():
        (dst / f"{name}.json").write_text(json.dumps(content))
    return dst


def test_smollm2_facts(smollm2):
    assert smollm2.bos_token == "<|im_start|>" and smollm2.bos_token_id == 1
    assert smollm2.eos_token == "<|im_end|>" and smollm2.eos_token_ids == frozenset({2})
    assert smollm2.vocab_size == 49152
    assert isinstance(smollm2.chat_template, str) and "im_start" in smollm2.chat_template
    assert smollm2.encode("Hello")[0] != smollm2.bos_token_id  # add_bos_token false: no BOS
    assert smollm2.is_special(2) and not smollm2.is_special(smollm2.encode("Hello")[0])


def test_qwen3_facts(qwen3):
    assert qwen3.bos_token is None and qwen3.bos_token_id is None
    assert qwen3.eos_token_ids == frozenset({151645})
    assert qwen3.vocab_size == 151669
    assert qwen3.encode("Hello world") == [9707, 1879]
    assert qwen3.id_to_token(1879) == "Ġworld"
    assert qwen3.token_text(1879) == " world"
    assert qwen3.token_text(151645) == "<|im_end|>" and qwen3.is_special(151645)


@pytest.mark.parametrize("name", ["smollm2", "qwen3", "llama3"])
def test_encode_decode_match_transformers(name, request):
    from transformers import AutoTokenizer

    path = request.getfixturevalue(f"{name}_tokenizer_dir")
    ours, theirs = request.getfixturevalue(name), AutoTokenizer.from_pretrained(path)
    for text in TEXTS:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == theirs(text, add_special_tokens=special)["input_ids"], text
        for skip in (True, False):
            expected = theirs.decode(ids, skip_special_tokens=skip)
            assert ours.decode(ids, skip_special_tokens=skip) == expected


def test_llama3_post_processor_adds_bos(llama3_tokenizer_dir):
    """Meta's Llama-3 tokenizer.json adds <|begin_of_text|> in its post-processor."""
    tok = tokenizers.Tokenizer.from_file(str(llama3_tokenizer_dir / "tokenizer.json"))
    tok.post_processor = tokenizers.processors.Sequence(
        [
            tokenizers.processors.ByteLevel(trim_offsets=False),
            tokenizers.processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                special_tokens=[("<|begin_of_text|>", 128000)],
            ),
        ]
    )
    llama3 = Tokenizer(tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    assert llama3.encode("Hello") == [128000, 9906]
    assert llama3.encode("Hello", add_special_tokens=False) == [9906]
    offsets = llama3.encode_with_offsets("Hello")
    assert offsets.ids == [128000, 9906] and offsets.texts == ["", "Hello"]
    assert (offsets.starts, offsets.stops) == ([0, 0], [0, 5])


def test_add_bos_token_flag_wins(smollm2_tokenizer_dir, tmp_path):
    config = json.loads((smollm2_tokenizer_dir / "tokenizer_config.json").read_text())
    plain = Tokenizer.from_dir(smollm2_tokenizer_dir).encode("Hi there")
    with_bos = Tokenizer.from_dir(
        copy_dir(smollm2_tokenizer_dir, tmp_path / "a", config | {"add_bos_token": True})
    )
    assert with_bos.encode("Hi there") == [1, *plain]
    assert with_bos.encode("Hi there", add_special_tokens=False) == plain
    assert with_bos.encode_with_offsets("Hi there").ids == [1, *plain]
    # TGI: LlamaTokenizer(Fast) classes add a BOS unless add_bos_token is false
    llama_cls = config | {"tokenizer_class": "LlamaTokenizerFast"}
    assert (
        Tokenizer.from_dir(copy_dir(smollm2_tokenizer_dir, tmp_path / "b", llama_cls)).encode(
            "Hi there"
        )[0]
        == 1
    )
    no_bos = llama_cls | {"add_bos_token": False}
    assert (
        Tokenizer.from_dir(copy_dir(smollm2_tokenizer_dir, tmp_path / "c", no_bos)).encode(
            "Hi there"
        )
        == plain
    )


def test_eos_ids_from_every_source_and_token_dicts(qwen3_tokenizer_dir, tmp_path):
    config = json.loads((qwen3_tokenizer_dir / "tokenizer_config.json").read_text())
    config["eos_token"] = {"content": "<|im_end|>", "special": True, "__type": "AddedToken"}
    config["bos_token"] = {"content": "<|endoftext|>"}
    config["chat_template"] = [
        {"name": "default", "template": "{{ x }}"},
        {"name": "tool_use", "template": "t"},
    ]
    out = copy_dir(
        qwen3_tokenizer_dir,
        tmp_path / "q",
        config,
        generation_config={"eos_token_id": [151645, 151643]},
        config={"eos_token_id": 151644, "bos_token_id": 151643},
    )
    tok = Tokenizer.from_dir(out)
    assert tok.eos_token == "<|im_end|>" and tok.bos_token_id == 151643
    assert tok.eos_token_ids == frozenset({151643, 151644, 151645})
    assert tok.chat_template == config["chat_template"]  # raw: a named list stays a list


def test_chat_template_jinja_file_and_missing_config(smollm2_tokenizer_dir, tmp_path):
    out = tmp_path / "bare"
    out.mkdir()
    shutil.copy(smollm2_tokenizer_dir / "tokenizer.json", out / "tokenizer.json")
    bare = Tokenizer.from_dir(out)
    assert (
        bare.chat_template is None and bare.eos_token_ids == frozenset() and bare.bos_token is None
    )
    (out / "chat_template.jinja").write_text("{{ messages }}")
    assert Tokenizer.from_dir(out).chat_template == "{{ messages }}"


def test_encode_with_offsets_are_byte_offsets(qwen3):
    text = "héllo 世界 🤖!"
    enc = qwen3.encode_with_offsets(text)
    raw = text.encode("utf-8")
    assert enc.ids == qwen3.encode(text)
    assert enc.stops[-1] == len(raw) and enc.starts[0] == 0
    for piece, start, stop in zip(enc.texts, enc.starts, enc.stops, strict=True):
        assert raw[start:stop].decode("utf-8") == piece
    assert any(
        stop - start > len(piece)
        for piece, start, stop in zip(enc.texts, enc.starts, enc.stops, strict=True)
    )


def test_token_text_of_partial_utf8_is_replacement_char(qwen3):
    ids = qwen3.encode(" 🤖", add_special_tokens=False)
    assert len(ids) == 3 and qwen3.token_text(ids[-1]) == "\ufffd"
    assert qwen3.decode(ids) == " 🤖"
