"""HTTP behaviour against a scripted engine: framing, headers, errors, limits, disconnects."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from fake_engine import FakeEngine
from server_harness import serve
from tgi_schema import validate

from genserve.server import tgi_stream
from genserve.server.app import build_app
from genserve.server.settings import ServerSettings


def _settings(**kw) -> ServerSettings:
    base = dict(model_id="fake", max_input_tokens=64, max_total_tokens=128)
    return ServerSettings(**{**base, **kw})


@pytest.fixture(scope="module")
def fake():
    engine = FakeEngine(delay_s=0.002)
    with serve(build_app(engine, _settings(max_concurrent_requests=4))) as url:
        yield engine, url


@pytest.fixture()
def client(fake):
    with httpx.Client(base_url=fake[1], timeout=30) as c:
        yield c


def sse_events(text: str) -> list[dict]:
    assert text.endswith("\n\n")
    out = []
    for block in text.split("\n\n")[:-1]:
        if block == ":":
            continue
        assert block.startswith("data:{"), block  # no space after the colon
        out.append(json.loads(block[len("data:") :]))
    return out


def test_generate_details_schema_and_headers(client):
    r = client.post(
        "/generate",
        json={
            "inputs": "a b",
            "parameters": {"max_new_tokens": 3, "details": True, "top_n_tokens": 2},
        },
    )
    body = r.json()
    validate(body, "GenerateResponse")
    assert body["generated_text"] == " w0 w1 w2"
    d = body["details"]
    assert d["generated_tokens"] == 3 and d["finish_reason"] == "length" and d["seed"] is None
    assert len(d["top_tokens"]) == 3 and len(d["top_tokens"][0]) == 2
    assert "best_of_sequences" not in d
    for h in (
        "x-compute-type",
        "x-compute-time",
        "x-compute-characters",
        "x-total-time",
        "x-validation-time",
        "x-queue-time",
        "x-inference-time",
        "x-time-per-token",
        "x-prompt-tokens",
        "x-generated-tokens",
    ):
        assert h in r.headers
    assert r.headers["x-generated-tokens"] == "3" and r.headers["x-prompt-tokens"] == "3"
    assert r.headers["x-compute-characters"] == "3"
    float(r.headers["x-compute-time"])


def test_no_details_means_null_and_no_parameters_samples(client, fake):
    r = client.post("/generate", json={"inputs": "a", "parameters": {"max_new_tokens": 2}})
    assert r.json() == {"generated_text": " w0 w1"}  # TGI skips a None `details`
    client.post("/generate", json={"inputs": "a"})
    req = fake[0].requests[-1]
    assert req.sampling.do_sample is True and req.stopping.max_new_tokens == 128 - 2


def test_seed_returned_only_when_sampling(client):
    p = {"max_new_tokens": 1, "details": True, "seed": 7}
    assert (
        client.post("/generate", json={"inputs": "a", "parameters": p}).json()["details"]["seed"]
        is None
    )
    p["do_sample"] = True
    assert (
        client.post("/generate", json={"inputs": "a", "parameters": p}).json()["details"]["seed"]
        == 7
    )


def test_best_of(client, fake):
    p = {"max_new_tokens": 2, "best_of": 2, "do_sample": True, "details": True}
    body = client.post("/generate", json={"inputs": "a", "parameters": p}).json()
    validate(body, "GenerateResponse")
    (other,) = body["details"]["best_of_sequences"]
    mean = lambda toks: sum(t["logprob"] for t in toks) / len(toks)  # noqa: E731
    assert mean(body["details"]["tokens"]) >= mean(other["tokens"])
    assert body["details"]["seed"] != other["seed"]


def test_compat_route_array_and_full_text(client):
    r = client.post("/", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}})
    validate(r.json(), "GenerateResponse", array=True)
    assert r.json() == [{"generated_text": "hi w0 w1"}]
    r = client.post(
        "/", json={"inputs": "hi", "parameters": {"max_new_tokens": 2, "return_full_text": False}}
    )
    assert r.json()[0]["generated_text"] == " w0 w1"


def test_stream_framing_and_final_event(client):
    p = {"max_new_tokens": 3, "details": True, "stop": ["w1"], "top_n_tokens": 1}
    r = client.post("/generate_stream", json={"inputs": "a", "parameters": p})
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-accel-buffering"] == "no"
    assert "x-compute-type" in r.headers and r.headers["x-compute-characters"] == "1"
    events = sse_events(r.text)
    for ev in events:
        validate(ev, "StreamResponse")
    assert [e["index"] for e in events] == [1, 2]
    assert events[0]["generated_text"] is None and events[0]["details"] is None
    assert events[0]["top_tokens"][0]["id"] == 100
    assert events[-1]["generated_text"] == " w0 w1"
    assert events[-1]["details"]["finish_reason"] == "stop_sequence"
    assert events[-1]["details"]["input_length"] == 2
    r = client.post("/", json={"inputs": "a", "stream": True, "parameters": {"max_new_tokens": 1}})
    assert sse_events(r.text)[-1]["generated_text"] == "a w0"


def test_keep_alive_comment(fake, monkeypatch):
    monkeypatch.setattr(tgi_stream, "with_keepalive", _fast_keepalive)
    engine = FakeEngine(delay_s=0.12)
    with serve(build_app(engine, _settings())) as url:
        r = httpx.post(
            f"{url}/generate_stream", json={"inputs": "a", "parameters": {"max_new_tokens": 2}}
        )
    assert ":\n\n" in r.text
    assert len(sse_events(r.text)) == 2


def _fast_keepalive(source, interval=0.05):
    from genserve.server.streaming import with_keepalive

    return with_keepalive(source, 0.05)


def test_generation_error(fake):
    engine = FakeEngine(fail_at=1)
    with serve(build_app(engine, _settings())) as url:
        r = httpx.post(f"{url}/generate", json={"inputs": "a", "parameters": {"max_new_tokens": 3}})
        assert r.status_code == 424
        assert r.json() == {
            "error": "Request failed during generation: boom",
            "error_type": "generation",
        }
        r = httpx.post(
            f"{url}/generate_stream", json={"inputs": "a", "parameters": {"max_new_tokens": 3}}
        )
        events = sse_events(r.text)
        assert events[-1] == {
            "error": "Request failed during generation: boom",
            "error_type": "generation",
        }
        metrics = httpx.get(f"{url}/metrics").text
        assert 'tgi_request_failure{err="generation"} 2' in metrics


def test_overloaded_429():
    engine = FakeEngine(delay_s=0.05)
    with serve(build_app(engine, _settings(max_concurrent_requests=1))) as url:

        async def go():
            async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                body = {"inputs": "a", "parameters": {"max_new_tokens": 10}}
                return await asyncio.gather(*(c.post("/generate", json=body) for _ in range(4)))

        results = asyncio.run(go())
        codes = sorted(r.status_code for r in results)
        assert codes[0] == 200 and codes[-1] == 429
        over = next(r for r in results if r.status_code == 429)
        assert over.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
        assert 'tgi_request_failure{err="overloaded"}' in httpx.get(f"{url}/metrics").text


def _wait(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_disconnect_aborts_stream_and_non_stream():
    engine = FakeEngine(delay_s=0.05)
    with serve(build_app(engine, _settings())) as url:
        with httpx.stream(
            "POST",
            f"{url}/generate_stream",
            json={"inputs": "a", "parameters": {"max_new_tokens": 100}},
        ) as r:
            next(r.iter_raw())
        _wait(lambda: len(engine.aborted) == 1)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{url}/generate",
                json={"inputs": "a", "parameters": {"max_new_tokens": 100}},
                timeout=0.3,
            )
        _wait(lambda: len(engine.aborted) == 2)
        assert engine.num_running == 0


def test_api_key_cors_payload_limit():
    engine = FakeEngine()
    app = build_app(
        engine, _settings(api_key="Secret", payload_limit=200, cors_allow_origin=("http://ok",))
    )
    with serve(app) as url:
        body = {"inputs": "a", "parameters": {"max_new_tokens": 1}}
        r = httpx.post(f"{url}/generate", json=body)
        assert r.status_code == 401 and r.content == b""
        assert (
            httpx.post(
                f"{url}/generate", json=body, headers={"Authorization": "Bearer nope"}
            ).status_code
            == 401
        )
        ok = httpx.post(f"{url}/generate", json=body, headers={"Authorization": "BEARER secret"})
        assert ok.status_code == 200
        for path in ("/health", "/info", "/metrics", "/docs"):
            assert httpx.get(f"{url}{path}").status_code == 200
        big = {"inputs": "a" * 500}
        r = httpx.post(f"{url}/generate", json=big, headers={"Authorization": "Bearer secret"})
        assert r.status_code == 413
        pre = httpx.options(
            f"{url}/generate",
            headers={"Origin": "http://ok", "Access-Control-Request-Method": "POST"},
        )
        assert pre.headers["access-control-allow-origin"] == "http://ok"
        bad = httpx.options(
            f"{url}/generate",
            headers={"Origin": "http://evil", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in bad.headers


def test_small_routes(client, fake):
    assert client.get("/health").status_code == 200 and client.get("/health").content == b""
    assert client.get("/").status_code == 200 and client.get("/ping").status_code == 200
    info = client.get("/info").json()
    validate(info, "Info")
    assert info["max_concurrent_requests"] == 4 and info["router"] == "text-generation-router"
    toks = client.post("/tokenize", json={"inputs": "ab cd"}).json()
    validate(toks, "TokenizeResponse")
    assert [(t["text"], t["start"], t["stop"]) for t in toks] == [("ab", 0, 2), ("cd", 3, 5)]
    r = client.post(
        "/vertex", json={"instances": [{"inputs": "a", "parameters": {"max_new_tokens": 2}}]}
    )
    assert r.json() == {"predictions": [" w0 w1"]}
    r = client.post("/vertex", json={"instances": []})
    assert r.status_code == 422 and r.json()["error_type"] == "Input validation error"
    r = client.post("/invocations", json={"inputs": "a", "parameters": {"max_new_tokens": 1}})
    validate(r.json(), "GenerateResponse", array=True)
    r = client.post("/invocations", json={"nothing": 1})
    assert r.status_code == 422
    fake[0].healthy = False
    try:
        r = client.get("/health")
        assert r.status_code == 503 and r.json() == {
            "error": "unhealthy",
            "error_type": "healthcheck",
        }
    finally:
        fake[0].healthy = True


def test_metrics_names(client):
    client.post("/generate", json={"inputs": "a", "parameters": {"max_new_tokens": 2}})
    text = client.get("/metrics").text
    for name in (
        "tgi_request_count",
        "tgi_request_success",
        "tgi_request_duration_bucket",
        "tgi_request_validation_duration",
        "tgi_request_queue_duration",
        "tgi_request_inference_duration",
        "tgi_request_mean_time_per_token_duration",
        "tgi_request_generated_tokens",
        "tgi_request_input_length",
        "tgi_request_max_new_tokens",
        "tgi_queue_size",
        "tgi_batch_current_size",
        "tgi_batch_max_total_tokens",
        "genserve_request_time_to_first_token_duration",
        "genserve_request_inter_token_latency_duration",
    ):
        assert name in text, name
    assert "# TYPE tgi_request_count counter" in text
    assert "tgi_request_count_total" not in text and "_created" not in text


def test_openapi_describes_tgi_shapes(client):
    ours = client.get("/api-doc/openapi.json").json()
    assert client.get("/openapi.json").json() == ours
    assert "swagger" in client.get("/docs").text.lower()
    from tgi_schema import _components

    tgi = _components()
    for name in (
        "GenerateRequest",
        "CompatGenerateRequest",
        "GenerateParameters",
        "GenerateResponse",
        "Details",
        "BestOfSequence",
        "StreamResponse",
        "StreamDetails",
        "Token",
        "PrefillToken",
        "SimpleToken",
        "ErrorResponse",
        "Info",
    ):
        mine = ours["components"]["schemas"][name]
        assert set(mine["properties"]) == set(tgi[name]["properties"]), name
        assert set(mine.get("required", [])) >= set(tgi[name].get("required", [])) - {"router"}, (
            name
        )
    for path in (
        "/",
        "/generate",
        "/generate_stream",
        "/tokenize",
        "/info",
        "/health",
        "/metrics",
        "/invocations",
        "/vertex",
    ):
        assert path in ours["paths"], path
