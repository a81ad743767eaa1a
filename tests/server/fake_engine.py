"""A scripted stand-in for `AsyncEngine`, for unit-level server tests.

Tokens are words: token `i` of a request is the word `w{i}` (id 100 + i). A request aborts
when its iterator is closed before the end (recorded in `aborted`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from genserve.engine.request import FinishReason, Request, TokenEvent, TopToken
from genserve.tokenization.tokenizer import TokenizedText


class FakeTokenizer:
    eos_token_ids = (0,)
    vocab_size = 1000

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [hash(w) % 900 + 50 for w in text.split()]
        return ([1] if add_special_tokens else []) + ids

    def encode_with_offsets(self, text: str, add_special_tokens: bool = True) -> TokenizedText:
        ids, texts, starts, stops, pos = [], [], [], [], 0
        for word in text.split():
            start = text.index(word, pos)
            pos = start + len(word)
            ids.append(hash(word) % 900 + 50)
            texts.append(word)
            starts.append(len(text[:start].encode()))
            stops.append(len(text[:pos].encode()))
        return TokenizedText(ids, texts, starts, stops)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f" w{i - 100}" for i in ids)


class FakeEngine:
    def __init__(self, delay_s: float = 0.0, fail_at: int | None = None) -> None:
        self.tokenizer = FakeTokenizer()
        self.model_id = "fake"
        self.max_model_len = 512
        self.kv_capacity_tokens = 4096
        self.healthy = True
        self.num_waiting = 0
        self.num_running = 0
        self.delay_s = delay_s
        self.fail_at = fail_at
        self.requests: list[Request] = []
        self.aborted: set[str] = set()
        self.finished: set[str] = set()
        self.started = False

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.started = False

    def abort(self, request_id: str) -> None:
        self.aborted.add(request_id)

    async def generate(self, request: Request) -> AsyncIterator[TokenEvent]:
        self.requests.append(request)
        self.num_running += 1
        done = False
        try:
            n = request.stopping.max_new_tokens
            seed = request.sampling.seed or 0
            text = ""
            for i in range(n):
                await asyncio.sleep(self.delay_s)
                if self.fail_at is not None and i == self.fail_at:
                    done = True
                    yield TokenEvent(request.request_id, 0, "", None, False, i, error="boom")
                    return
                word = f" w{i}"
                text += word
                stop = next((s for s in request.stopping.stop_sequences if s in text), None)
                last = i == n - 1 or stop is not None
                logprob = -0.1 * (i + 1) - (seed % 7) * 0.01 if request.sampling.sampling else -0.5
                top = [TopToken(100 + i, word, logprob, False), TopToken(7, " x", -3.0, False)]
                ev = TokenEvent(
                    request.request_id,
                    100 + i,
                    word,
                    logprob,
                    False,
                    i,
                    top_tokens=top[: request.sampling.top_n_tokens],
                    num_prompt_tokens=len(request.prompt_token_ids),
                )
                if i == 0 and request.prefill_logprobs:
                    ev.prompt_logprobs = [None] + [-1.0] * (len(request.prompt_token_ids) - 1)
                if last:
                    ev.finish_reason = FinishReason.STOP_SEQUENCE if stop else FinishReason.LENGTH
                    ev.generated_text = text
                    done = True
                yield ev
                if last:
                    return
        finally:
            self.num_running -= 1
            (self.finished if done else self.aborted).add(request.request_id)
