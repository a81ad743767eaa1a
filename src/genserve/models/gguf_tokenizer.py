"""Rebuild a Hugging Face `tokenizer.json` from the tokenizer a GGUF file describes.

A GGUF carries no `tokenizer.json`: llama.cpp stores the vocabulary, merges, scores, token types
and special ids as metadata (`tokenizer.ggml.*`). Two vocabulary kinds are handled:

- `gpt2`: byte-level BPE. The split regex comes from `tokenizer.ggml.pre`, as in llama.cpp's
  `llama-vocab.cpp`, so the ids match the tokenizer the model was trained with.
- `llama`: SentencePiece-style BPE with `▁` for spaces and byte fallback. Files rarely list
  merges; they are then derived from the vocabulary, best token score first.

Only the `tokenizers` library is used: runtime code never imports `transformers`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

logger = logging.getLogger(__name__)

# `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = range(
    1, 7
)

# The split regexes of llama.cpp's `llama-vocab.cpp`, applied one after the other.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# `tokenizer.ggml.pre` -> its splits, grouped as llama.cpp groups them. StarCoder-style
# vocabularies (SmolLM's included) isolate every digit first, as their original tokenizer did.
# "default" (a vocabulary llama.cpp did not recognise) and unknown names split as GPT-2.
_LLAMA3_FAMILY = (
    "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
    "jina-v5-nano",
)  # fmt: skip
_PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(
        (
            "default",
            "gpt-2",
            "gpt2",
            "phi-2",
            "mpt",
            "olmo",
            "jais",
            "trillion",
            "roberta-bpe",
            "jina-es",
            "jina-de",
            "jina-v1-en",
            "jina-v2-es",
            "jina-v2-de",
            "jina-v2-code",
            "gigachat",
            "a.x-4.0",
            "mellum",
            "modern-bert",
            "exaone4",
        ),
        (_GPT2_SPLIT,),
    ),  # fmt: skip
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
        (r"\p{N}", _GPT2_SPLIT),
    ),
    **dict.fromkeys(
        (*_LLAMA3_FAMILY, "dbrx", "smaug-bpe", "glm4", "chatglm-bpe"), (_LLAMA3_SPLIT,)
    ),
    **dict.fromkeys(
        (
            "qwen2",
            "deepseek-r1-qwen",
            "kormo",
            "f2llmv2",
            "megrez",
            "stablelm2",
            "hunyuan",
            "grok-2",
        ),
        (_QWEN2_SPLIT,),
    ),
    "qwen35": (_QWEN35_SPLIT,),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), (_GPT4O_SPLIT,)),
    "tekken": (_TEKKEN_SPLIT,),
}
# Vocabularies for which llama.cpp looks a whole pre-token up before merging (`ignore_merges`).
_IGNORE_MERGES = {*_LLAMA3_FAMILY, "tekken"}
# Byte-level vocabularies llama.cpp adds BOS to when the file does not say.
_ADD_BOS_BY_DEFAULT = {*_LLAMA3_FAMILY, "tekken", "chameleon"}


class TokenizerBuildError(ValueError):
    """The GGUF's tokenizer metadata cannot be turned into a tokenizer."""


@cache
def byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (printable latin-1 maps to itself)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    kept += range(ord("®"), ord("ÿ") + 1)
    mapping = {b: chr(b) for b in kept}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def build_tokenizer(meta: Mapping[str, Any]) -> Tokenizer:
    """The tokenizer described by `tokenizer.ggml.*` metadata (keys without that prefix)."""
    kind = meta.get("model")
    if "tokens" not in meta:
        raise TokenizerBuildError("tokenizer.ggml.tokens is missing")
    builders = {"gpt2": _byte_level_tokenizer, "llama": _sentencepiece_tokenizer}
    if kind not in builders:
        raise TokenizerBuildError(
            f"unsupported tokenizer.ggml.model {kind!r} (supported: gpt2, llama)"
        )
    try:
        return builders[kind](meta)
    except TokenizerBuildError:
        raise
    except Exception as exc:  # `tokenizers` rejects inconsistent vocabularies and merges
        detail = " ".join(str(exc).split())
        raise TokenizerBuildError(f"invalid {kind} tokenizer metadata ({detail})") from exc


def default_add_bos(meta: Mapping[str, Any]) -> bool:
    """`tokenizer.ggml.add_bos_token`, else llama.cpp's default for the vocabulary."""
    if "add_bos_token" in meta:
        return bool(meta["add_bos_token"])
    return meta.get("model") == "llama" or meta.get("pre") in _ADD_BOS_BY_DEFAULT


def _byte_level_tokenizer(meta: Mapping[str, Any]) -> Tokenizer:
    tokens: list[str] = meta["tokens"]
    alphabet = byte_alphabet()
    spellable = set(alphabet.values())
    # GGUF stores byte-level tokens already spelled in the byte alphabet; a few converters wrote
    # raw text instead, so respell anything that uses other characters.
    spelled = [
        t if set(t) <= spellable else "".join(alphabet[b] for b in t.encode("utf-8"))
        for t in tokens
    ]
    bpe = models.BPE(
        vocab=_vocab(spelled),
        merges=_merges_from_file(meta),
        ignore_merges=meta.get("pre") in _IGNORE_MERGES,
    )
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = _byte_level_pre_tokenizer(meta.get("pre"))
    tok.decoder = decoders.ByteLevel()
    # A control token spelled outside the byte alphabet is a converter mislabel; adding it would
    # grow the vocabulary past the embedding matrix, so it is left out.
    _add_special_tokens(tok, meta, lambda t: set(t) <= spellable, spelled)
    _set_post_processor(tok, meta)
    return tok


def _byte_level_pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    if pre is not None and pre not in _PRE_TOKENIZER_SPLITS:
        logger.warning("unknown tokenizer.ggml.pre %r; splitting text as GPT-2 does", pre)
    splits = _PRE_TOKENIZER_SPLITS.get(pre or "default", (_GPT2_SPLIT,))
    steps = [pre_tokenizers.Split(Regex(regex), behavior="isolated") for regex in splits]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(steps)


def _sentencepiece_tokenizer(meta: Mapping[str, Any]) -> Tokenizer:
    tokens: list[str] = meta["tokens"]
    vocab = _vocab(tokens)
    if "merges" in meta:
        merges = _merges_from_file(meta)
    else:
        scores = meta.get("scores")
        if scores is None or len(scores) != len(tokens):
            raise TokenizerBuildError("a llama vocabulary needs tokenizer.ggml.scores or merges")
        merges = _merges_from_scores(tokens, scores, vocab)
    unk_id = meta.get("unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    prefix_space = bool(meta.get("add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix_space else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    _add_special_tokens(tok, meta, lambda t: True, tokens)
    _set_post_processor(tok, meta)
    return tok


def _vocab(spelled: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for index, token in enumerate(spelled):
        # A duplicate spelling keeps its first id; the later one is unreachable, as in llama.cpp.
        vocab.setdefault(token, index)
    if len(vocab) != len(spelled):
        logger.warning("%d duplicate token spellings in the vocabulary", len(spelled) - len(vocab))
    return vocab


def _merges_from_file(meta: Mapping[str, Any]) -> list[tuple[str, str]]:
    merges = []
    for merge in meta.get("merges") or ():
        left, sep, right = merge.partition(" ")
        if not sep or not left or not right:
            raise TokenizerBuildError(f"malformed merge {merge!r} in tokenizer.ggml.merges")
        merges.append((left, right))
    return merges


def _merges_from_scores(
    tokens: list[str], scores: list[float], vocab: Mapping[str, int]
) -> list[tuple[str, str]]:
    """SentencePiece merges: every split of a token into two vocabulary tokens, best score first.

    Ties keep vocabulary order (splits of one token by their pieces' ids), with longer left and
    right pieces first, which is how `transformers` orders them too.
    """
    candidates = []
    for token, score in zip(tokens, scores, strict=True):
        splits = [
            (token[:i], token[i:])
            for i in range(1, len(token))
            if token[:i] in vocab and token[i:] in vocab
        ]
        splits.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        candidates.extend((left, right, score) for left, right in splits)
    candidates.sort(key=lambda c: (-c[2], -len(c[0]), -len(c[1])))
    return [(left, right) for left, right, _ in candidates]


def _add_special_tokens(
    tok: Tokenizer, meta: Mapping[str, Any], allowed: Callable[[str], bool], spelled: list[str]
) -> None:
    """Control tokens become special added tokens, user-defined ones plain added tokens.

    Either way they are matched whole in the input instead of being cut into pieces.
    """
    types = meta.get("token_type") or ()
    tokens: list[str] = meta["tokens"]
    control, user = [], []
    for token, token_type, spelling in zip(tokens, types, spelled, strict=False):
        if token_type == TOKEN_CONTROL and allowed(token):
            control.append(AddedToken(token, special=True, normalized=False))
        elif token_type == TOKEN_USER_DEFINED and token == spelling:
            user.append(AddedToken(token, special=False, normalized=False))
    if control:
        tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)


def special_token(meta: Mapping[str, Any], key: str) -> str | None:
    """The text of special token `key` (`bos`, `eos`, `unknown`, `padding`, ...), if set."""
    index = meta.get(f"{key}_token_id")
    tokens = meta.get("tokens") or ()
    if index is None or not 0 <= index < len(tokens):
        return None
    return tokens[index]


def _set_post_processor(tok: Tokenizer, meta: Mapping[str, Any]) -> None:
    prefix, suffix, specials = [], [], []
    for key, wanted, side in (
        ("bos", default_add_bos(meta), prefix),
        ("eos", bool(meta.get("add_eos_token", False)), suffix),
    ):
        text = special_token(meta, key)
        if wanted and text is not None:
            side.append(text)
            if text not in dict(specials):
                specials.append((text, meta[f"{key}_token_id"]))
    single = [*prefix, "$A:0", *suffix]
    pair = [*single, *prefix, "$B:1", *suffix]
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=specials
    )


def tokenizer_metadata(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The `tokenizer.ggml.*` entries of a GGUF's metadata, without that prefix."""
    prefix = "tokenizer.ggml."
    return {k[len(prefix) :]: v for k, v in meta.items() if k.startswith(prefix)}


def eos_token_ids(tok: Mapping[str, Any]) -> int | list[int] | None:
    """EOS, plus the end-of-turn / end-of-message ids when set (Llama 3 style)."""
    ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        if tok.get(key) is not None and tok[key] not in ids:
            ids.append(tok[key])
    if not ids:
        return None
    return ids[0] if len(ids) == 1 else ids


def write_tokenizer_files(meta: Mapping[str, Any], out: Path, *, max_length: int | None) -> bool:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja for GGUF metadata
    `meta` (full key names) into `out`. False when the file describes no tokenizer."""
    tok = tokenizer_metadata(meta)
    if "tokens" not in tok:
        return False
    chat_template = meta.get("tokenizer.chat_template")
    build_tokenizer(tok).save(str(out / "tokenizer.json"))
    config = tokenizer_config(tok, chat_template=chat_template, max_length=max_length)
    text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    (out / "tokenizer_config.json").write_text(text, encoding="utf-8")
    if chat_template is not None:
        (out / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    return True


def tokenizer_config(
    meta: Mapping[str, Any], *, chat_template: str | None, max_length: int | None
) -> dict[str, Any]:
    """`tokenizer_config.json` for the tokenizer `build_tokenizer(meta)` returns."""
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": special_token(meta, "bos"),
        "eos_token": special_token(meta, "eos"),
        "pad_token": special_token(meta, "padding"),
        "unk_token": special_token(meta, "unknown"),
        "add_bos_token": default_add_bos(meta),
        "add_eos_token": bool(meta.get("add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
    }
    if max_length is not None:
        config["model_max_length"] = max_length
    if chat_template is not None:
        config["chat_template"] = chat_template
    return config
