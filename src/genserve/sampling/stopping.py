"""When a request stops: length, then EOS, then a completed grammar, then stop sequences (TGI's
`StoppingCriteria` order; a grammar that allows nothing more but EOS ends as `stop_sequence`).

Stop sequences are matched on the decoded output text as the stream shows it (special tokens
included), so a stop string split across several tokens is found when its last piece arrives.
Only a bounded tail of the text is kept: past 300 characters it is cut to the last 200, and never
shorter than the longest stop string. `generated_text` keeps the stop sequence, as in TGI.

Two deliberate differences from TGI's `re.escape(stop) + "$"`: a stop string ending inside the
new text piece (not only at its very end) is found, and empty stop strings are ignored (TGI's
would end every request after its first token).
"""

from __future__ import annotations

from collections.abc import Iterable

from genserve.engine.request import FinishReason
from genserve.sampling.params import StoppingParams

TAIL_TRIM_AT = 300  # characters of kept text that trigger a trim ...
TAIL_KEEP = 200  # ... down to this many (TGI's numbers)


class StopChecker:
    """Per-request stopping state; call it once per generated token, in order."""

    __slots__ = ("max_new_tokens", "eos_token_ids", "stop_sequences", "num_generated",
                 "stop_sequence", "_tail", "_longest", "_trim_at", "_keep")  # fmt: skip

    def __init__(self, stopping: StoppingParams, eos_token_ids: Iterable[int]) -> None:
        self.max_new_tokens = stopping.max_new_tokens
        self.eos_token_ids = frozenset() if stopping.ignore_eos else frozenset(eos_token_ids)
        self.stop_sequences = [s for s in stopping.stop_sequences if s]
        self.num_generated = 0
        self.stop_sequence: str | None = None  # the stop string that ended the request
        self._tail = ""
        self._longest = max((len(s) for s in self.stop_sequences), default=0)
        self._keep = max(TAIL_KEEP, self._longest)
        self._trim_at = self._keep + (TAIL_TRIM_AT - TAIL_KEEP)

    def __call__(self, token_id: int, text: str, grammar_done: bool = False) -> FinishReason | None:
        """`token_id` was just generated and decoded to the stream piece `text` ("" while the
        detokenizer holds back an incomplete character); `grammar_done`: the request's grammar
        is complete with it. Returns why to stop, or None."""
        self.num_generated += 1
        if self.num_generated >= self.max_new_tokens:
            return FinishReason.LENGTH
        if token_id in self.eos_token_ids:
            return FinishReason.EOS_TOKEN
        if grammar_done:
            return FinishReason.STOP_SEQUENCE
        if self.stop_sequences and text:
            return self._check_text(text)
        return None

    def _check_text(self, text: str) -> FinishReason | None:
        self._tail += text
        # A match must end inside `text`: it starts at most `longest - 1` characters before it.
        window = self._tail[-(len(text) + self._longest - 1) :]
        for stop in self.stop_sequences:
            if stop in window:
                self.stop_sequence = stop
                return FinishReason.STOP_SEQUENCE
        if len(self._tail) > self._trim_at:
            self._tail = self._tail[-self._keep :]
        return None
