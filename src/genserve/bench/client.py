"""Streaming HTTP clients: TGI `/generate_stream`, OpenAI `/v1/completions` and chat completions.

Each request records when its chunks arrived (client clock, `time.perf_counter`), how many output
tokens the server says it produced, and an error type when it failed. Token counts come from the
server where it reports them (TGI: one token per event; OpenAI: the final `usage` chunk asked for
with `stream_options.include_usage`) and fall back to counting chunks.

Fixed output lengths ("ignore EOS") are asked for in whatever way the server understands:

- `ignore_eos`: `"ignore_eos": true` in the body (llama.cpp's server, vLLM);
- `hf-generation-config`: `generation_config` with `min_new_tokens` (`transformers serve`);
- `none`: only the maximum (`max_new_tokens` / `max_tokens`). TGI's HTTP API has no way to
  ignore EOS, so a request may finish early; the report shows requested vs produced tokens.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from genserve.bench.choices import APIS, FIXED_LENGTH_MODES  # noqa: F401 (re-exported)
from genserve.bench.prompts import RequestSpec


@dataclass(slots=True)
class RequestRecord:
    input_len: int
    requested_output: int
    start: float
    chunk_times: list[float] = field(default_factory=list)  # arrival of each token-bearing chunk
    output_tokens: int = 0
    end: float | None = None
    error: str | None = None  # error type; None when the request succeeded
    cancelled: bool = False  # still running when the run's time limit came

    @property
    def ok(self) -> bool:
        return self.error is None and not self.cancelled and self.end is not None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def itls(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:], strict=False)]

    @property
    def e2e(self) -> float | None:
        return None if self.end is None else self.end - self.start


@dataclass(frozen=True, slots=True)
class Target:
    """Where and how to send requests."""

    base_url: str
    api: str = "tgi"
    model: str = "tgi"  # the OpenAI `model` field
    fixed_length: str = "none"
    timeout_s: float = 600.0


@dataclass(slots=True)
class _Event:
    tokens: int = 0  # output tokens carried by this chunk
    done: bool = False
    error: str | None = None
    total_tokens: int | None = None  # the server's own count, on the final chunk


def request_body(target: Target, spec: RequestSpec) -> tuple[str, dict[str, Any]]:
    """(path, JSON body) for one greedy request of `spec.output_len` tokens."""
    n = spec.output_len
    if target.api == "tgi":
        params: dict[str, Any] = {"max_new_tokens": n, "do_sample": False, "details": True}
        return "/generate_stream", {"inputs": spec.prompt, "parameters": params}
    body: dict[str, Any] = {
        "model": target.model,
        "max_tokens": n,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if target.fixed_length == "ignore_eos":
        body["ignore_eos"] = True
    elif target.fixed_length == "hf-generation-config":
        cfg = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False}
        body["generation_config"] = json.dumps(cfg)
    if target.api == "openai-chat":
        body["messages"] = [{"role": "user", "content": spec.prompt}]
        return "/v1/chat/completions", body
    body["prompt"] = spec.prompt
    return "/v1/completions", body


def parse_event(api: str, data: str) -> _Event:
    """One SSE `data:` payload -> what it means for the request."""
    if data.strip() == "[DONE]":
        return _Event(done=True)
    try:
        obj = json.loads(data)
    except json.JSONDecodeError:
        return _Event(error="bad_json")
    if not isinstance(obj, dict):
        return _Event(error="bad_json")
    if "error" in obj:
        err = obj.get("error_type") or obj["error"]
        if isinstance(err, dict):
            err = err.get("type") or err.get("code") or "error"
        return _Event(error=str(err)[:60])
    if api == "tgi":
        details = obj.get("details") or {}
        final = obj.get("generated_text") is not None
        total = details.get("generated_tokens") if final else None
        return _Event(tokens=1, done=final, total_tokens=total)
    return _openai_event(api, obj)


def _openai_event(api: str, obj: dict) -> _Event:
    usage = obj.get("usage") or None
    total = usage.get("completion_tokens") if usage else None
    tokens = 0
    for choice in obj.get("choices") or []:
        if api == "openai-chat":
            text = (choice.get("delta") or {}).get("content")
        else:
            text = choice.get("text")
        if text:
            tokens += 1
    return _Event(tokens=tokens, total_tokens=total)


async def send(
    session: aiohttp.ClientSession, target: Target, spec: RequestSpec, records: list[RequestRecord]
) -> RequestRecord:
    """Send one streaming request, its record appended to `records` first (so a request cut off
    by the run's time limit is still counted). Never raises for server or network failures."""
    rec = RequestRecord(spec.input_len, spec.output_len, time.perf_counter())
    records.append(rec)
    path, body = request_body(target, spec)
    try:
        async with session.post(target.base_url + path, json=body) as resp:
            if resp.status != 200:
                rec.error = f"http_{resp.status}"
                await resp.read()
                return rec
            await _read_stream(resp, target.api, rec)
    except asyncio.CancelledError:
        rec.cancelled = True
        raise
    except TimeoutError:
        rec.error = "timeout"
    except aiohttp.ClientConnectionError as exc:
        rec.error = "connection_" + type(exc).__name__
    except aiohttp.ClientError as exc:
        rec.error = "client_" + type(exc).__name__
    return rec


async def _read_stream(resp: aiohttp.ClientResponse, api: str, rec: RequestRecord) -> None:
    total, finished = None, False
    async for raw in resp.content:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue  # blank separators and `:` keep-alive comments
        ev = parse_event(api, line[5:].strip())
        if ev.error is not None:
            rec.error = ev.error
            return
        if ev.tokens:
            rec.chunk_times.append(time.perf_counter())
            rec.output_tokens += ev.tokens
        if ev.total_tokens is not None:
            total = ev.total_tokens
        if ev.done:
            finished = True
            break
    rec.end = time.perf_counter()
    if total is not None:
        rec.output_tokens = total
    if not finished and api == "tgi":
        rec.error = "stream_incomplete"
    elif not rec.chunk_times:
        rec.error = "no_tokens"


def make_session(target: Target) -> aiohttp.ClientSession:
    """One session per run; no connection limit (the load shape decides the concurrency). A new
    connection per request: a kept-alive one that the server has closed meanwhile would fail the
    next request with a reset that is the client's fault, not the server's."""
    timeout = aiohttp.ClientTimeout(total=target.timeout_s, sock_connect=30)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    return aiohttp.ClientSession(timeout=timeout, connector=connector)
