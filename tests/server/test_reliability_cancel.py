"""Cancellation everywhere: a client that goes away, at any point, on any route (streaming or
not; `best_of`, Vertex instances, OpenAI `n` and prompt lists fan out) aborts all its work; its KV blocks are free
before the next engine step; nothing is left counted anywhere (real engine, tiny model)."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import httpx
import pytest
from reliability_util import assert_clean, read_stream, reliable_server

N_REQUESTS = 100


@pytest.fixture(scope="module")
def served(tiny_llama_dir):
    with reliable_server(tiny_llama_dir, max_concurrent_requests=1024) as s:
        yield s


class AbortLedger:
    """For every abort the HTTP side asks for: the engine step count then, and when the engine
    thread carried it out (it must be before the next step runs)."""

    def __init__(self, engine) -> None:
        self.steps = 0
        self.asked: dict[str, int] = {}
        self.done: dict[str, int] = {}
        self.still_holding: list[str] = []
        self._engine = engine
        self._outer_abort = engine.abort
        self._inner_abort = engine.engine.abort
        engine.abort = self.ask
        engine.engine.abort = self.carry_out
        engine.step_listeners.append(self.count)

    def count(self, _engine) -> None:
        self.steps += 1

    def ask(self, rid: str) -> None:
        self.asked.setdefault(rid, self.steps)
        self._outer_abort(rid)

    def carry_out(self, rid: str) -> bool:
        req = self._engine.engine.scheduler.get_request(rid)
        found = self._inner_abort(rid)
        self.done.setdefault(rid, self.steps)
        if req is not None and req.block_table:
            self.still_holding.append(rid)
        return found

    def restore(self) -> None:
        self._engine.abort = self._outer_abort
        self._engine.engine.abort = self._inner_abort
        self._engine.step_listeners.remove(self.count)


def _body(kind: str, max_new: int) -> tuple[str, dict]:
    params = {"max_new_tokens": max_new}
    if kind == "stream":
        return "/generate_stream", {"inputs": "Tell me a story", "parameters": params}
    if kind == "compat_stream":
        return "/", {"inputs": "Once upon", "parameters": params, "stream": True}
    if kind == "best_of":
        params |= {"best_of": 2, "do_sample": True, "details": True}
        return "/generate", {"inputs": "Pick the best", "parameters": params}
    if kind == "vertex":
        inst = {"inputs": "Vertex", "parameters": {"max_new_tokens": max_new}}
        return "/vertex", {"instances": [inst, inst]}
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": max_new}
    if kind == "chat_stream":
        return "/v1/chat/completions", {**chat, "stream": True, "n": 2}
    if kind == "chat":
        return "/v1/chat/completions", {**chat, "n": 2}
    if kind == "completions":  # two prompts times n=2: four engine requests
        body = {"prompt": ["Once", "Twice"], "max_tokens": max_new, "n": 2}
        return "/v1/completions", body
    return "/generate", {"inputs": "Hello there", "parameters": params}


KINDS = ("stream", "generate", "best_of", "compat_stream", "vertex", "chat_stream", "chat",
         "completions")  # fmt: skip


def _cancelled(i: int) -> bool:
    return (i // len(KINDS)) % 2 == 1  # every kind: half left, half run to the end


async def _one(client: httpx.AsyncClient, i: int, rng: random.Random) -> tuple[str, str]:
    kind = KINDS[i % len(KINDS)]
    cancel = _cancelled(i)
    path, body = _body(kind, 48 if cancel else 6)
    if cancel and kind.endswith("stream"):  # leave after a random number of tokens
        await read_stream(client, path, body, stop_after=rng.randint(1, 6))
        return kind, "left"
    task = asyncio.ensure_future(client.post(path, json=body))
    if not cancel:
        r = await task
        return kind, str(r.status_code)
    await asyncio.sleep(rng.uniform(0.0, 0.6))  # anywhere: validation, queue, prefill, decode
    task.cancel()
    try:
        r = await task
        return kind, f"done-{r.status_code}"  # finished before we left
    except asyncio.CancelledError:
        return kind, "cancelled"


async def _storm(url: str, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=N_REQUESTS, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        order = list(range(N_REQUESTS))
        rng.shuffle(order)
        return await asyncio.gather(*(_one(client, i, rng) for i in order))


def test_disconnect_storm_leaks_nothing(served):
    ledger = AbortLedger(served.engine)
    try:
        outcomes = asyncio.run(_storm(served.url, seed=8))
        assert_clean(served)
    finally:
        ledger.restore()
    tally = Counter(outcome for _, outcome in outcomes)
    # the requests nobody cancelled all succeeded
    kept = sum(not _cancelled(i) for i in range(N_REQUESTS))
    assert tally["200"] == kept, tally
    assert not [o for o in tally if o.startswith("done-") and o != "done-200"], tally
    assert ledger.asked, "no request was aborted: the storm did not cancel anything"
    # each abort the server asked for was carried out before the next engine step ran ...
    late = {rid: (ledger.asked[rid], ledger.done.get(rid)) for rid in ledger.asked}
    late = {rid: s for rid, s in late.items() if s[1] is None or s[1] > s[0] + 1}
    assert not late, f"aborts not carried out by the next step: {late}"
    # ... and the request's blocks were free when it returned
    assert not ledger.still_holding


def test_best_of_cancel_aborts_every_sequence(served):
    """Leaving a `best_of` request aborts all of its engine requests, not just one."""
    ledger = AbortLedger(served.engine)

    async def go() -> None:
        params = {"best_of": 2, "do_sample": True, "max_new_tokens": 200}
        body = {"inputs": "Long best of", "parameters": params}
        async with httpx.AsyncClient(base_url=served.url, timeout=60) as client:
            task = asyncio.ensure_future(client.post("/generate", json=body))
            while served.engine.num_live < 2:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    try:
        asyncio.run(go())
        assert_clean(served)
    finally:
        ledger.restore()
    assert len(ledger.asked) == 2 and set(ledger.done) >= set(ledger.asked)


def test_still_serves_after_the_storm(served):
    r = httpx.post(
        f"{served.url}/generate",
        json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}},
        timeout=60,
    )
    assert r.status_code == 200 and r.headers["x-generated-tokens"] == "3"
    assert_clean(served)
