"""TGI's own Python client, curl -N and @huggingface/inference (node) against the real server."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from real_server import real_server
from tgi_schema import validate

pytestmark = pytest.mark.filterwarnings("ignore:The `dict` method is deprecated")

REPO = Path(__file__).resolve().parents[2]
NPM_DIR = REPO / ".cache" / "npm-hf-inference-v3"
# 3.x posts TGI's native request to the endpoint itself; 4.x moved to /v1/completions.
NPM_PACKAGE = "@huggingface/inference@3.15.0"


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with real_server(tiny_llama_dir, enable_prefill_logprobs=True) as (url, engine):
        yield url, engine


def test_text_generation_client(server):
    from text_generation import Client

    client = Client(server[0], timeout=60)
    resp = client.generate("Hello there", max_new_tokens=6, decoder_input_details=False)
    assert resp.details.generated_tokens == 6 and resp.details.finish_reason.value == "length"
    streamed = list(client.generate_stream("Hello there", max_new_tokens=6))
    assert [r.token.id for r in streamed] == [t.id for t in resp.details.tokens]
    assert streamed[-1].generated_text == resp.generated_text
    best = client.generate("Hello there", max_new_tokens=4, best_of=2, do_sample=True)
    assert len(best.details.best_of_sequences) == 1
    assert best.details.seed is not None


def test_text_generation_async_client(server):
    from text_generation import AsyncClient

    async def go():
        client = AsyncClient(server[0], timeout=60)
        resp = await client.generate("Hi", max_new_tokens=3, top_n_tokens=2)
        tokens = [r async for r in client.generate_stream("Hi", max_new_tokens=3)]
        return resp, tokens

    resp, tokens = asyncio.run(go())
    assert len(resp.details.top_tokens) == 3 and len(resp.details.top_tokens[0]) == 2
    assert [t.token.id for t in tokens] == [t.id for t in resp.details.tokens]


def test_curl_n_streams_as_tokens_arrive(server):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    body = json.dumps({"inputs": "How do you make cheese?", "parameters": {"max_new_tokens": 40}})
    cmd = [
        curl,
        "-sN",
        f"{server[0]}/generate_stream",
        "-X",
        "POST",
        "-d",
        body,
        "-H",
        "Content-Type: application/json",
    ]
    arrivals = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(b"data:"):
                arrivals.append((time.perf_counter(), json.loads(line[5:])))
    assert len(arrivals) == 40
    assert arrivals[-1][0] - arrivals[0][0] > 0
    assert arrivals[-1][1]["generated_text"] is not None


def _npm_module() -> Path:
    if (NPM_DIR / "node_modules" / "@huggingface" / "inference").is_dir():
        return NPM_DIR
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        pytest.skip("node/npm are not installed")
    NPM_DIR.mkdir(parents=True, exist_ok=True)
    (NPM_DIR / "package.json").write_text('{"name": "genserve-test-js", "private": true}')
    done = subprocess.run(
        [npm, "install", "--silent", NPM_PACKAGE],
        cwd=NPM_DIR,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        pytest.skip(f"npm install {NPM_PACKAGE} failed: {done.stderr[-300:]}")
    return NPM_DIR


def test_huggingface_inference_js_stream(server):
    module = _npm_module()
    script = Path(__file__).with_name("hf_inference_stream.mjs")
    done = subprocess.run(
        ["node", str(script), str(module), server[0], "How do you make cheese?", "12"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(events) == 12
    assert events[-1]["details"]["generated_tokens"] == 12
    assert events[-1]["generated_text"].startswith("How do you make cheese?")


def test_every_route_body_matches_tgi_schema(server):
    import httpx

    url = server[0]
    with httpx.Client(base_url=url, timeout=60) as c:
        p = {"max_new_tokens": 3, "details": True, "decoder_input_details": True, "top_n_tokens": 2}
        r = c.post("/generate", json={"inputs": "a b c", "parameters": p})
        validate(r.json(), "GenerateResponse")
        prefill = r.json()["details"]["prefill"]
        assert len(prefill) == int(r.headers["x-prompt-tokens"]) and prefill[0]["logprob"] is None
        validate(
            c.post("/", json={"inputs": "a", "parameters": p}).json(),
            "GenerateResponse",
            array=True,
        )
        validate(
            c.post("/invocations", json={"inputs": "a"}).json(), "GenerateResponse", array=True
        )
        bo = {"max_new_tokens": 3, "details": True, "best_of": 2, "do_sample": True}
        validate(
            c.post("/generate", json={"inputs": "a", "parameters": bo}).json(), "GenerateResponse"
        )
        r = c.post(
            "/generate_stream",
            json={
                "inputs": "a",
                "parameters": {"max_new_tokens": 3, "details": True, "top_n_tokens": 1},
            },
        )
        for block in r.text.split("\n\n")[:-1]:
            validate(json.loads(block[5:]), "StreamResponse")
        validate(c.post("/tokenize", json={"inputs": "Hello world"}).json(), "TokenizeResponse")
        validate(c.get("/info").json(), "Info")
        validate(c.post("/generate", json={"inputs": ""}).json(), "ErrorResponse")
