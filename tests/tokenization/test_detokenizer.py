"""IncrementalDetokenizer on multibyte text with real byte-level BPE tokenizers (SmolLM2, Qwen3,
Llama-3) and a SentencePiece-style tokenizer with byte fallback (Llama-2/Mistral decoders)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers
from tokenizers import decoders, models, normalizers, processors, trainers

from genserve.tokenization.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    " Hello world, this is fine.",
    " 你好，世界！今天天气很好。",
    " emoji 🤖👍🏽 and a family 👨‍👩‍👧 plus 🇫🇷🇯🇵",
    " café naïve résumé Ærøskøbing Ελληνικά русский",
    "\n\nLine one\n  indented  twice\tтаб",
    " mixed 日本語テキスト with ascii and 한국어",
]
PROMPTS = ["Question: say something.\nAnswer:", "写一首关于春天的诗：", "🤖", ""]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_token_ids(tok: Tokenizer, text: str) -> list[int]:
    """`text` as one token per UTF-8 byte: every multibyte character spans several tokens."""
    table = _bytes_to_unicode()
    ids = [tok.token_to_id(table[b]) for b in text.encode("utf-8")]
    assert None not in ids
    return ids


def _train_sentencepiece_like(out: Path) -> Path:
    """A tiny BPE with Llama-2's normalizer/decoder and <0xNN> byte-fallback tokens."""
    corpus = ["Hello world, this is fine.", "The quick brown fox jumps over the lazy dog."] * 20
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(corpus, trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    data["model"].update(byte_fallback=True, fuse_unk=True)
    tok = tokenizers.Tokenizer.from_str(json.dumps(data))
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "LlamaTokenizerFast"}
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def tokenizer_by_name(request, tmp_path_factory):
    cache: dict[str, Tokenizer] = {}

    def get(name: str) -> Tokenizer:
        if name not in cache:
            if name == "sentencepiece":
                path = _train_sentencepiece_like(tmp_path_factory.mktemp("sp"))
            else:
                path = request.getfixturevalue(f"{name}_tokenizer_dir")
            cache[name] = Tokenizer.from_dir(path)
        return cache[name]

    return get


def stream(
    tok: Tokenizer, prompt_ids: list[int], ids: list[int]
) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tok, prompt_ids)
    return [detok.step(i) for i in ids], detok


def check_stream(tok: Tokenizer, prompt_ids: list[int], ids: list[int], expected: str) -> None:
    pieces, detok = stream(tok, prompt_ids, ids)
    assert "".join(pieces) == expected
    assert detok.output_text == expected
    assert detok.final_text(skip_special_tokens=False) == expected
    if "\ufffd" not in expected:
        assert not any("\ufffd" in p for p in pieces), pieces
    assert detok.output_ids == ids


NAMES = ["smollm2", "qwen3", "llama3", "sentencepiece"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("prompt", PROMPTS)
def test_stream_equals_full_decode(tokenizer_by_name, name, prompt):
    tok = tokenizer_by_name(name)
    prompt_ids = tok.encode(prompt) if prompt else []
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        # decoding in the prompt's context is what the user sees after the prompt
        full = tok.decode(prompt_ids + ids, skip_special_tokens=False)
        context = tok.decode(prompt_ids, skip_special_tokens=False)
        assert full.startswith(context)
        check_stream(tok, prompt_ids, ids, full[len(context) :])
        if name != "sentencepiece":
            assert full[len(context) :] == text  # byte-level BPE round-trips exactly


@pytest.mark.parametrize("name", ["smollm2", "qwen3"])
def test_every_character_split_into_byte_tokens(tokenizer_by_name, name):
    tok = tokenizer_by_name(name)
    prompt_ids = tok.encode("Say it:")
    for text in TEXTS:
        ids = byte_token_ids(tok, text)
        assert tok.decode(ids) == text
        check_stream(tok, prompt_ids, ids, text)


def test_prompt_ending_mid_character_sentencepiece(tokenizer_by_name):
    """Byte-fallback runs: the context must not start inside a character."""
    tok = tokenizer_by_name("sentencepiece")
    prompt_ids = tok.encode("写诗")  # 6 byte tokens: the last 5 start mid-character
    ids = tok.encode("你好 Hello", add_special_tokens=False)
    assert tok.id_to_token(ids[0]) == "▁"
    check_stream(tok, prompt_ids, ids[1:], "你好 Hello")  # continues the prompt's byte run


def test_special_tokens_shown_in_stream_skipped_in_final_text(tokenizer_by_name):
    tok = tokenizer_by_name("qwen3")
    prompt = tok.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode("Hello 🤖", add_special_tokens=False) + [tok.eos_token_id]
    pieces, detok = stream(tok, prompt, ids)
    assert pieces[-1] == "<|im_end|>"
    assert detok.output_text == "Hello 🤖<|im_end|>"
    assert detok.final_text() == "Hello 🤖"


def test_sentencepiece_leading_spaces(tokenizer_by_name):
    tok = tokenizer_by_name("sentencepiece")
    prompt = tok.encode("Hello")
    ids = tok.encode("world, this is fine", add_special_tokens=False)  # "▁world▁..."
    pieces, detok = stream(tok, prompt, ids)
    assert "".join(pieces) == " world, this is fine"
    assert detok.final_text() == " world, this is fine"
    # without context the first space is stripped, as a plain decode does
    pieces, _ = stream(tok, [], ids)
    assert "".join(pieces) == "world, this is fine"


def test_flush_emits_held_back_bytes(tokenizer_by_name):
    tok = tokenizer_by_name("smollm2")
    ids = byte_token_ids(tok, "ok 🤖")[:-1]  # stops one byte short of the emoji
    pieces, detok = stream(tok, tok.encode("Go"), ids)
    assert "".join(pieces) == "ok " and not any("\ufffd" in p for p in pieces)
    assert detok.flush() == "\ufffd"
    assert detok.output_text == "ok \ufffd" and detok.flush() == ""


def test_only_a_small_window_is_decoded(tokenizer_by_name):
    tok = tokenizer_by_name("qwen3")
    sizes: list[int] = []
    decode = tok.decode

    class Spy:
        def decode(self, ids, skip_special_tokens=False):
            sizes.append(len(ids))
            return decode(ids, skip_special_tokens)

    text = TEXTS[1] * 30
    ids = tok.encode(text, add_special_tokens=False)
    pieces, _ = stream(Spy(), tok.encode("A long prompt " * 50), ids)
    assert "".join(pieces) == text
    assert len(ids) > 200 and max(sizes) <= 12
