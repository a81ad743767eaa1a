"""The model's tokenizer (a `tokenizers.Tokenizer` plus the facts around it) and the incremental
detokenizer that turns generated ids into stream text.

Special tokens, decided once for every route (TGI's behaviour):
- each streamed token's `text` is decoded with special tokens shown (`skip_special_tokens=False`),
  so an EOS token streams as e.g. "<|im_end|>", and stop sequences are matched on that text;
- `generated_text` is re-decoded from the generated ids with special tokens skipped
  (`IncrementalDetokenizer.final_text()`), so it can differ from the concatenated stream.

BOS: the tokenizer.json post-processor decides (Llama-3 adds `<|begin_of_text|>` there; SmolLM2
and Qwen add nothing), unless `tokenizer_config.json` says otherwise: an explicit `add_bos_token`
/ `add_eos_token` is enforced, and for `LlamaTokenizer(Fast)` classes a missing `add_bos_token`
means true (TGI's router rebuilds those post-processors the same way).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers

logger = logging.getLogger(__name__)

LLAMA_TOKENIZER_CLASSES = frozenset({"LlamaTokenizer", "LlamaTokenizerFast"})
_NO_FIX = (False, False, False, False)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _token_content(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _id_list(value: Any) -> list[int]:
    """`eos_token_id` as written in config.json / generation_config.json: int, list or null."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


@dataclass(frozen=True, slots=True)
class TokenizedText:
    """`encode_with_offsets`: for /tokenize. `start`/`stop` are byte offsets into the UTF-8 input,
    `texts` the matching slices of the input ("" for added special tokens such as a BOS)."""

    ids: list[int]
    texts: list[str]
    starts: list[int]
    stops: list[int]


class Tokenizer:
    """A `tokenizers.Tokenizer` with the model's BOS/EOS facts and chat template."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        extra_eos_token_ids: Sequence[int] = (),
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        chat_template: str | list[dict[str, Any]] | None = None,
    ) -> None:
        """`add_bos_token` / `add_eos_token`: None leaves it to the post-processor."""
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tok = tokenizer
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = tokenizer.token_to_id(bos_token) if bos_token else None
        eos_id = tokenizer.token_to_id(eos_token) if eos_token else None
        self.eos_token_id: int | None = eos_id
        eos_ids = set(extra_eos_token_ids)
        if eos_id is not None:
            eos_ids.add(eos_id)
        self.eos_token_ids: frozenset[int] = frozenset(eos_ids)
        self.chat_template = chat_template
        self.source_dir: Path | None = None  # the model directory, when read from one
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        added = tokenizer.get_added_tokens_decoder()
        self.special_token_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)
        self._token_text: dict[int, str] = {}
        self._fix = self._special_token_fix(add_bos_token, add_eos_token)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Reads tokenizer.json, tokenizer_config.json (or special_tokens_map.json),
        chat_template.jinja, generation_config.json and config.json from a model directory."""
        path = Path(path)
        tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        config = _read_json(path / "tokenizer_config.json")
        special_map = _read_json(path / "special_tokens_map.json")
        bos, eos = (
            _token_content(config.get(key)) or _token_content(special_map.get(key))
            for key in ("bos_token", "eos_token")
        )
        eos_ids = _id_list(_read_json(path / "generation_config.json").get("eos_token_id"))
        eos_ids += _id_list(_read_json(path / "config.json").get("eos_token_id"))
        llama = config.get("tokenizer_class") in LLAMA_TOKENIZER_CLASSES
        add_bos = config.get("add_bos_token", True if llama else None)
        add_eos = config.get("add_eos_token", False if llama else None)
        template = config.get("chat_template")
        jinja = path / "chat_template.jinja"
        if template is None and jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        tokenizer = cls(
            tok,
            bos_token=bos,
            eos_token=eos,
            extra_eos_token_ids=eos_ids,
            add_bos_token=add_bos if isinstance(add_bos, bool) else None,
            add_eos_token=add_eos if isinstance(add_eos, bool) else None,
            chat_template=template,
        )
        tokenizer.source_dir = path
        return tokenizer

    # ------------------------------------------------------------------ encoding

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if not add_special_tokens or self._fix == _NO_FIX:
            return ids
        start, stop, bos, eos = self._fix_plan(ids)
        return bos + ids[start:stop] + eos

    def encode_with_offsets(self, text: str, add_special_tokens: bool = True) -> TokenizedText:
        enc = self._tok.encode(text, add_special_tokens=add_special_tokens)
        byte_at = _char_to_byte_offsets(text)
        rows = [
            (tid, "" if special else text[start:stop], byte_at[start], byte_at[stop])
            for tid, (start, stop), special in zip(
                enc.ids, enc.offsets, enc.special_tokens_mask, strict=True
            )
        ]
        if add_special_tokens and self._fix != _NO_FIX:
            start, stop, bos, eos = self._fix_plan(enc.ids)
            end = byte_at[-1]
            rows = (
                [(i, "", 0, 0) for i in bos] + rows[start:stop] + [(i, "", end, end) for i in eos]
            )
        return TokenizedText(
            [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows]
        )

    # ------------------------------------------------------------------ decoding

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = ids if isinstance(ids, list) else list(ids)
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """The raw vocabulary entry (e.g. "Ġhello", "▁hello")."""
        return self._tok.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def token_text(self, token_id: int) -> str:
        """The text of one token decoded alone, special tokens shown (top tokens, prefill).

        An incomplete UTF-8 piece decodes to "\ufffd", as in TGI.
        """
        text = self._token_text.get(token_id)
        if text is None:
            text = self._tok.decode([token_id], skip_special_tokens=False)
            self._token_text[token_id] = text
        return text

    def is_special(self, token_id: int) -> bool:
        """True for tokens that `decode(..., skip_special_tokens=True)` drops."""
        return token_id in self.special_token_ids

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._tok

    # ------------------------------------------------------------------ BOS / EOS

    def _special_token_fix(self, add_bos: bool | None, add_eos: bool | None) -> tuple[bool, ...]:
        """(prepend_bos, strip_bos, append_eos, strip_eos) so that the config's explicit flags
        win over what the post-processor does. Probed once on a one-character text."""
        plain = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a", add_special_tokens=True).ids
        bos, eos = self.bos_token_id, self.eos_token_id
        has_bos = bos is not None and full[:1] == [bos] and plain[:1] != [bos]
        has_eos = eos is not None and full[-1:] == [eos] and plain[-1:] != [eos]
        fix = (
            bool(add_bos) and bos is not None and not has_bos,
            add_bos is False and has_bos,
            bool(add_eos) and eos is not None and not has_eos,
            add_eos is False and has_eos,
        )
        if fix != _NO_FIX:
            logger.info("tokenizer_config overrides the post-processor's BOS/EOS: %s", fix)
        return fix

    def _fix_plan(self, ids: list[int]) -> tuple[int, int, list[int], list[int]]:
        """How to apply `_fix` to post-processed `ids`: keep ids[start:stop], add bos/eos lists."""
        prepend_bos, strip_bos, append_eos, strip_eos = self._fix
        start = 1 if strip_bos and ids[:1] == [self.bos_token_id] else 0
        stop = len(ids) - (1 if strip_eos and ids[-1:] == [self.eos_token_id] else 0)
        bos = [self.bos_token_id] if prepend_bos else []
        eos = [self.eos_token_id] if append_eos else []
        return start, max(start, stop), bos, eos


def _char_to_byte_offsets(text: str) -> list[int]:
    """offsets[i] = UTF-8 byte offset of character i (len(text) + 1 entries)."""
    out = [0] * (len(text) + 1)
    total = 0
    for i, ch in enumerate(text):
        out[i] = total
        total += len(ch.encode("utf-8"))
    out[len(text)] = total
    return out


class IncrementalDetokenizer:
    """Generated ids -> stream text pieces, with TGI's prefix/read offsets (`decode_token`).

    Each step decodes only a small window: `ids[prefix:read]` (text already emitted, kept as
    context so SentencePiece and byte-level BPE get their leading spaces right) and
    `ids[prefix:]`. The difference is emitted unless it ends in "\ufffd" (an incomplete UTF-8
    character), in which case "" is returned and the bytes wait for the next token. The window
    starts on the last 5 prompt ids (fewer if they start mid-character).

    Pieces show special tokens (`output_text` is what the stream showed); `final_text()` is
    TGI's `generated_text`, re-decoded with special tokens skipped.
    """

    CONTEXT_TOKENS = 5

    __slots__ = ("_tokenizer", "_ids", "_num_context", "_prefix", "_read", "_prefix_text",
                 "_pieces")  # fmt: skip

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int]) -> None:
        context = list(prompt_ids[-self.CONTEXT_TOKENS :]) if prompt_ids else []
        # Start the context on a character boundary: SentencePiece's ByteFallback decoder turns a
        # whole run of byte tokens into "\ufffd"s when the run starts mid-character, which would
        # swallow generated characters that continue the run.
        text = tokenizer.decode(context)
        while context and text.startswith("\ufffd"):
            context = context[1:]
            text = tokenizer.decode(context)
        self._tokenizer = tokenizer
        self._ids = context  # the prompt's tail, then every generated id
        self._num_context = len(context)
        self._prefix = 0  # prefix_offset, relative to `_ids`
        self._read = len(context)  # read_offset: ids up to here are emitted
        self._prefix_text: str | None = text  # decode(_ids[_prefix:_read]), None = to compute
        self._pieces: list[str] = []

    def step(self, token_id: int) -> str:
        """Adds one generated id; returns the new text it completes (possibly "")."""
        self._ids.append(token_id)
        if self._prefix_text is None:
            self._prefix_text = self._tokenizer.decode(self._ids[self._prefix : self._read])
        text = self._tokenizer.decode(self._ids[self._prefix :])
        if len(text) <= len(self._prefix_text) or text.endswith("\ufffd"):
            return ""
        return self._emit(text[len(self._prefix_text) :])

    def flush(self) -> str:
        """Emits whatever is held back (incomplete characters as "\ufffd"); for the last token."""
        if self._read == len(self._ids):
            return ""
        prefix_text = self._tokenizer.decode(self._ids[self._prefix : self._read])
        text = self._tokenizer.decode(self._ids[self._prefix :])
        return self._emit(text[len(prefix_text) :])

    def _emit(self, piece: str) -> str:
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = None
        self._pieces.append(piece)
        return piece

    @property
    def output_ids(self) -> list[int]:
        return self._ids[self._num_context :]

    @property
    def output_text(self) -> str:
        """All text emitted so far, special tokens shown."""
        return "".join(self._pieces)

    def final_text(self, skip_special_tokens: bool = True) -> str:
        """The generated ids decoded at once, in the context of the prompt's tail."""
        decode = self._tokenizer.decode
        context = decode(self._ids[: self._num_context], skip_special_tokens)
        full = decode(self._ids, skip_special_tokens)
        if full.startswith(context):
            return full[len(context) :]
        return decode(self.output_ids, skip_special_tokens)
