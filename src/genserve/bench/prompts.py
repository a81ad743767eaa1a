"""Prompts for the load generator: synthetic ShareGPT-like lengths, fixed lengths, JSONL files.

Synthetic prompts are word salad built from the tokenizer's own whole-word tokens, so a prompt
of N tokens re-tokenizes to exactly N tokens (checked, and trimmed when a merge crosses a word).
Without a tokenizer the text falls back to a small built-in word list and lengths are estimates
(one token per word), which the report says.

The ShareGPT-like length distribution (seeded, `numpy.random.default_rng(seed)`):

    input  ~ round(LogNormal(ln 100, 1.0)),  clipped to [4, 1024]   (median 100, mean ~160)
    output ~ round(LogNormal(ln 240, 0.8)),  clipped to [4, 512]    (median 240, mean ~300)

These match the published ShareGPT statistics used by vLLM's serving benchmark (mean input 161,
mean output 338 tokens) closely enough, with tails clipped so one request cannot monopolise a
2-core CPU run.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SHAREGPT_INPUT = (math.log(100.0), 1.0, 4, 1024)  # (mu, sigma, min, max)
SHAREGPT_OUTPUT = (math.log(240.0), 0.8, 4, 512)

_FALLBACK_WORDS = (
    "time person year way day thing man world life hand part child eye woman place work week "
    "case point government company number group problem fact system program question night "
    "water room mother area money story month lot right study book job word business issue side "
    "kind head house service friend father power hour game line end member law car city name "
    "team minute idea body information back parent face others level office door health art war"
).split()


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request: the prompt text, its length in tokens and the output length to ask for."""

    prompt: str
    input_len: int
    output_len: int


class PromptBuilder:
    """Builds prompt text of an exact token length from a `tokenizers.Tokenizer` (or estimates)."""

    def __init__(self, tokenizer_path: str | Path | None, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.tokenizer, self.words = _load(str(tokenizer_path)) if tokenizer_path else (None, [])
        self.exact = bool(self.words)

    def count(self, text: str) -> int:
        if self.tokenizer is None:
            return len(text.split())
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def text(self, n_tokens: int, lead: str = "") -> str:
        """`lead` + word salad, `n_tokens` tokens in all (as the tokenizer counts them)."""
        if not self.exact:
            picks = self.rng.choice(len(_FALLBACK_WORDS), size=max(n_tokens, 1))
            return lead + " ".join(_FALLBACK_WORDS[i] for i in picks)
        have = self.count(lead) if lead else 0
        need = max(n_tokens - have, 1)
        picks = self.rng.choice(len(self.words), size=need)
        text = lead + "".join(self.words[i] for i in picks)
        return self._fit(text, n_tokens)

    def _fit(self, text: str, n_tokens: int) -> str:
        assert self.tokenizer is not None
        for _ in range(4):  # a merge across two words can change the count by a token or two
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids
            if len(ids) == n_tokens:
                return text
            if len(ids) > n_tokens:
                text = self.tokenizer.decode(ids[:n_tokens])
            else:
                pad = self.rng.choice(len(self.words), size=n_tokens - len(ids))
                text += "".join(self.words[i] for i in pad)
        return text


@functools.cache
def _load(path: str) -> tuple[Any, list[str]]:
    """(tokenizers.Tokenizer, its whole-word tokens), loaded once per path."""
    from tokenizers import Tokenizer

    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(p))
    return tokenizer, _word_tokens(tokenizer)


def _word_tokens(tokenizer) -> list[str]:
    """Decoded vocabulary entries that are one lowercase word with a leading space."""
    vocab = tokenizer.get_vocab()
    pattern = re.compile(r"^(Ġ|▁)[a-z]{3,9}$")
    ids = sorted(i for tok, i in vocab.items() if pattern.match(tok))
    words = [tokenizer.decode([i]) for i in ids]
    words = [w for w in words if re.fullmatch(r" [a-z]{3,9}", w)]
    return words if len(words) >= 100 else []


def sharegpt_lengths(n: int, seed: int) -> list[tuple[int, int]]:
    """`n` seeded (input_len, output_len) pairs from the documented ShareGPT-like distribution."""
    rng = np.random.default_rng(seed)

    def draw(mu: float, sigma: float, lo: int, hi: int) -> np.ndarray:
        return np.clip(np.rint(rng.lognormal(mu, sigma, size=n)), lo, hi).astype(int)

    ins = draw(*SHAREGPT_INPUT)
    outs = draw(*SHAREGPT_OUTPUT)
    return [(int(i), int(o)) for i, o in zip(ins, outs, strict=True)]


def synthetic_specs(
    builder: PromptBuilder, lengths: Sequence[tuple[int, int]]
) -> list[RequestSpec]:
    return [RequestSpec(builder.text(i), i, o) for i, o in lengths]


def shared_prefix_specs(
    builder: PromptBuilder,
    n: int,
    prefix_len: int,
    question_len: int,
    output_len: int,
    *,
    shared: bool,
) -> list[RequestSpec]:
    """`n` prompts: one `prefix_len`-token system prompt (a different one per request when
    `shared` is false: the no-cache control), then a distinct `question_len`-token question."""
    head = "You are a helpful assistant. Read the notes below, then answer.\n"
    prefix = builder.text(prefix_len, lead=head)
    specs = []
    for _ in range(n):
        p = prefix if shared else builder.text(prefix_len, lead=head)
        question = builder.text(question_len)
        specs.append(RequestSpec(p + question, prefix_len + question_len, output_len))
    return specs


def jsonl_specs(path: str | Path, builder: PromptBuilder, default_output: int) -> list[RequestSpec]:
    """Prompts from a JSONL file, one object a line.

    Accepted shapes: `{"prompt": str, "output_len"?: int}`, `{"text": str, ...}`, or a ShareGPT
    record `{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]}`
    (the first human turn is the prompt; the first gpt turn's token count is the output length).
    """
    specs = []
    for line_no, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{line_no}: not JSON ({exc})") from exc
        prompt, output = _record(obj, builder, default_output)
        if not prompt:
            raise ValueError(f"{path}:{line_no}: no prompt, text or human turn")
        specs.append(RequestSpec(prompt, builder.count(prompt), output))
    if not specs:
        raise ValueError(f"{path}: no prompts")
    return specs


def _record(obj: dict, builder: PromptBuilder, default_output: int) -> tuple[str, int]:
    output = int(obj.get("output_len") or obj.get("max_new_tokens") or default_output)
    if "conversations" in obj:
        turns = obj["conversations"]
        human = next((t["value"] for t in turns if t.get("from") in ("human", "user")), "")
        reply = next((t["value"] for t in turns if t.get("from") in ("gpt", "assistant")), None)
        if reply and "output_len" not in obj:
            output = max(4, min(builder.count(reply), 1024))
        return human, output
    return str(obj.get("prompt") or obj.get("text") or ""), output
