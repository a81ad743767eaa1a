"""Hard limits on hostile input: each answered with a clear 4xx, never a 5xx, never a stack
trace in a body. Also: the API key check and CORS as configured."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from reliability_util import assert_clean, reliable_server, wait_until

KEY = "Secret-Key-123"
ORIGIN = "https://allowed.example"
READ_TIMEOUT = 1.0
AUTH = {"Authorization": f"Bearer {KEY}"}


# httptools (the default) and the pure-Python h11 fallback enforce the same limits
@pytest.fixture(scope="module", params=["auto", "h11"])
def served(tiny_llama_dir, request):
    with reliable_server(
        tiny_llama_dir,
        http_parser=request.param,
        payload_limit=100_000,
        request_read_timeout=READ_TIMEOUT,
        api_key=KEY,
        cors_allow_origin=(ORIGIN,),
        max_total_tokens=64,
    ) as s:
        yield s


@pytest.fixture()
def client(served):
    with httpx.Client(base_url=served.url, timeout=30, headers=AUTH) as c:
        yield c


def _clear_4xx(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert "Traceback" not in r.text and 'File "' not in r.text
    body = r.json()
    assert set(body) == {"error", "error_type"} and body["error"]
    return body


DEEP = "[" * 50_000 + "]" * 50_000
HUGE_INT = 2**70


@pytest.mark.parametrize(
    ("path", "payload", "status"),
    [
        ("/generate", {"inputs": "x" * 200_000}, 413),
        ("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 2**32}}, 422),
        ("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 2**31}}, 422),
        ("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": -1}}, 422),
        ("/generate", {"inputs": "word " * 200, "parameters": {"max_new_tokens": 1}}, 422),
        ("/generate", {"inputs": "hi", "parameters": {"stop": ["a"] * 5}}, 422),
        ("/generate", {"inputs": "hi", "parameters": {"best_of": 3, "do_sample": True}}, 422),
        ("/generate", {"inputs": "hi", "parameters": {"best_of": HUGE_INT}}, 422),
        ("/generate", {"inputs": "hi", "parameters": {"top_n_tokens": 10**6}}, 422),
        ("/generate", {"inputs": "hi", "parameters": {"truncate": HUGE_INT}}, 422),
        ("/generate", {"inputs": "hi", "parameters": {"seed": -5}}, 422),
        ("/generate", {"inputs": "hi", "parameters": {"temperature": float("inf")}}, 422),
        ("/generate", {"inputs": "hi", "parameters": {"top_p": float("nan")}}, 422),
        ("/generate_stream", {"inputs": "hi", "parameters": {"best_of": 2}}, 200),
        ("/vertex", {"instances": [{"inputs": "hi"}] * 10_000}, 413),
        ("/tokenize", {"inputs": "x" * 200_000}, 413),
        # fan-out past the concurrency cap could never be admitted: 422, not a 429 to retry
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "n": 10**6},
            422,
        ),
        ("/v1/completions", {"prompt": ["a", "b"], "n": 129}, 422),
        ("/v1/completions", {"prompt": ["a"] * 50}, 422),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 200_000}]}, 413),
        ("/v1/chat/completions", {"messages": [], "max_tokens": 2**40}, 422),
    ],
)
def test_hostile_bodies_get_a_clear_4xx(client, path, payload, status):
    r = client.post(path, content=json.dumps(payload), headers={"content-type": "application/json"})
    if status == 200:  # errors inside a stream are SSE events (TGI)
        assert r.status_code == 200 and '"error_type":"validation"' in r.text
        return
    _clear_4xx(r, status)


@pytest.mark.parametrize(
    "path",
    ["/", "/generate", "/generate_stream", "/vertex", "/invocations", "/tokenize",
     "/v1/chat/completions", "/v1/completions", "/chat_tokenize"],
)  # fmt: skip
def test_deeply_nested_json_is_400(client, path):
    r = client.post(path, content=DEEP, headers={"content-type": "application/json"})
    _clear_4xx(r, 400)


def test_nested_grammar_schema_is_4xx(client):
    nested = '{"a":' * 2000 + "1" + "}" * 2000
    text = '{"inputs":"x","parameters":{"grammar":{"type":"json","value":' + nested + "}}}"
    r = client.post("/generate", content=text, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500


def test_lying_content_length_and_bad_bytes(client):
    r = client.post("/generate", content=b"\xff\xfe{", headers={"content-type": "application/json"})
    _clear_4xx(r, 400)
    r = client.post("/generate", content=b"{}", headers={"content-type": "text/plain"})
    _clear_4xx(r, 415)
    big = {"content-type": "application/json", "content-length": str(10**12)}
    with socket.create_connection(("127.0.0.1", client.base_url.port)) as s:
        head = "".join(f"{k}: {v}\r\n" for k, v in {**big, **AUTH}.items())
        s.sendall(f"POST /generate HTTP/1.1\r\nHost: x\r\n{head}\r\n{{".encode())
        assert s.recv(4096).startswith(b"HTTP/1.1 413")


def test_url_and_header_size(client):
    _clear_4xx(client.get("/" + "x" * 9000), 414)
    _clear_4xx(client.get("/health", headers={"x-big": "a" * 20_000}), 431)
    # larger than the HTTP parser buffers: refused before any route runs
    with socket.create_connection(("127.0.0.1", client.base_url.port)) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        try:
            for _ in range(9):  # just past 64 KiB, so nothing is left unread at close
                s.sendall(b"x-pad: " + b"a" * 8000 + b"\r\n")
                time.sleep(0.005)
        except OSError:  # the server answered and closed while we were still sending
            pass
        reply = s.recv(4096)
    assert reply.split(b"\r\n", 1)[0] in (b"HTTP/1.1 431 Request Header Fields Too Large",)


def _raw(port: int, data: bytes) -> tuple[bytes, float]:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(30)
        s.sendall(data)
        t0 = time.monotonic()
        reply = b""
        while chunk := s.recv(4096):  # until the server closes the connection
            reply += chunk
        return reply, time.monotonic() - t0


def test_slow_head_is_408_and_closed(served):
    reply, waited = _raw(served.port, b"POST /generate HTTP/1.1\r\nHost: x\r\n")
    assert reply.startswith(b"HTTP/1.1 408 "), reply
    assert waited >= READ_TIMEOUT * 0.5


def test_slow_body_is_408(served):
    head = (
        "POST /generate HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        f"authorization: Bearer {KEY}\r\ncontent-length: 100\r\n\r\n"
    )
    reply, _ = _raw(served.port, head.encode() + b'{"inputs":')
    assert reply.startswith(b"HTTP/1.1 408 "), reply
    assert b'"error_type":"validation"' in reply


def test_idle_connection_is_closed(served):
    with socket.create_connection(("127.0.0.1", served.port)) as s:
        s.settimeout(30)
        t0 = time.monotonic()
        assert s.recv(100) == b""  # closed by the server, without a word
        assert time.monotonic() - t0 >= READ_TIMEOUT * 0.5


def test_api_key(served):
    body = {"inputs": "hi", "parameters": {"max_new_tokens": 1}}
    with httpx.Client(base_url=served.url, timeout=30) as c:
        assert c.post("/generate", json=body).status_code == 401
        wrong = {"Authorization": f"Bearer {KEY}x"}
        assert c.post("/generate", json=body, headers=wrong).status_code == 401
        upper = {"Authorization": f"BEARER {KEY.upper()}"}  # TGI compares case-insensitively
        assert c.post("/generate", json=body, headers=upper).status_code == 200
        assert c.post("/generate", json=body, headers=AUTH).status_code == 200
        assert c.get("/health").status_code == 200  # probes are never protected
        assert c.get("/live").status_code == 200


def test_cors_as_configured(served):
    pre = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    with httpx.Client(base_url=served.url, timeout=30) as c:
        ok = c.options("/generate", headers={"Origin": ORIGIN, **pre})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
        bad = c.options("/generate", headers={"Origin": "https://evil.example", **pre})
        assert bad.status_code == 400 and "access-control-allow-origin" not in bad.headers
        r = c.get("/info", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers


def test_nothing_leaked(served):
    assert_clean(served)


def _exchange(sock: socket.socket, request: bytes) -> tuple[bytes, dict, bytes]:
    """One request on an open keep-alive connection: (status line, headers, body)."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    headers = {k.strip().lower().decode(): v.strip().decode() for k, v in
               (line.split(b":", 1) for line in lines[1:])}  # fmt: skip
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return lines[0], headers, body


def _post(path: str, payload: dict, extra: dict) -> bytes:
    body = json.dumps(payload).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in extra.items())
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n{head}\r\n"
    ).encode() + body


@pytest.fixture()
def full(served):
    """Every concurrency permit taken (set on the server's loop, where permits live)."""
    permits = served.service.permits
    saved = permits.in_use
    served.on_loop(lambda: setattr(permits, "in_use", permits.limit))
    wait_until(lambda: permits.in_use == permits.limit, 10, "permits taken")
    yield
    served.on_loop(lambda: setattr(permits, "in_use", saved))
    wait_until(lambda: permits.in_use == saved, 10, "permits back")


def test_overload_refusal_keeps_the_connection(served, full):
    """Over the cap the refusal comes before the body is read (by the HTTP protocol itself
    under httptools): TGI's 429 JSON with Retry-After, the body read and dropped, and the
    same connection serves the next request."""
    payload = {"inputs": "x" * 50_000, "parameters": {"max_new_tokens": 1}}
    state, answered = served.app.state, []
    fast = state.fast_shed
    state.fast_shed = lambda *a: answered.append(reply := fast(*a)) or reply
    try:
        _refusals(served, payload)
    finally:
        state.fast_shed = fast
    # under httptools the protocol answered the three refusals; under h11 the ASGI middleware
    httptools = served.server.config.http.__name__ == "TimedHttpToolsProtocol"
    assert sum(isinstance(r, bytes) for r in answered) == (3 if httptools else 0)


def _refusals(served, payload: dict) -> None:
    with socket.create_connection(("127.0.0.1", served.port)) as s:
        s.settimeout(30)
        for path in ("/generate", "/v1/completions", "/generate"):
            body = payload if path == "/generate" else {"prompt": "hi", "max_tokens": 1}
            status, headers, reply = _exchange(s, _post(path, body, AUTH))
            assert status == b"HTTP/1.1 429 Too Many Requests", (path, status)
            assert json.loads(reply) == {"error": "Model is overloaded", "error_type": "overloaded"}
            assert headers["retry-after"] == "1"
        # what the ASGI app would answer first still comes first
        status, _, _ = _exchange(s, _post("/generate", payload, {}))  # no key: 401
        assert status.startswith(b"HTTP/1.1 401")
        status, headers, _ = _exchange(s, _post("/generate", payload, {**AUTH, "Origin": ORIGIN}))
        assert (
            status.startswith(b"HTTP/1.1 429") and headers["access-control-allow-origin"] == ORIGIN
        )
        status, _, _ = _exchange(s, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 200")  # the connection is still in sync


def test_overload_refusals_are_counted(served, full):
    def refused() -> float:
        text = httpx.get(f"{served.url}/metrics", timeout=30).text
        lines = [
            x for x in text.splitlines() if x.startswith('tgi_request_failure{err="overloaded"}')
        ]
        return float(lines[0].split()[-1]) if lines else 0.0

    before = refused()
    with socket.create_connection(("127.0.0.1", served.port)) as s:
        s.settimeout(30)
        for _ in range(3):
            _exchange(s, _post("/generate", {"inputs": "hi"}, AUTH))
    assert refused() == before + 3
