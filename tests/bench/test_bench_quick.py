"""`genserve bench`: the quick mode end to end against a tiny model, and its parts in isolation.

Never a speed threshold: these assert that the bench runs and reports sane fields.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp import web

from genserve.bench.client import RequestRecord, Target, parse_event
from genserve.bench.metrics import summarize
from genserve.bench.prompts import PromptBuilder, RequestSpec, shared_prefix_specs, sharegpt_lengths
from genserve.bench.report import compare_table, run_table
from genserve.bench.runner import LoadShape, Progress, RunOutcome, run_load


def _sane(row: dict) -> None:
    assert row["completed"] > 0, row
    assert row["errors"] == {}, row
    assert row["output_throughput"] > 0 and row["request_throughput"] > 0
    for key in ("ttft_ms", "e2e_ms"):
        d = row[key]
        assert 0 < d["p50"] <= d["p90"] <= d["p99"], (key, d)
    assert row["ttft_ms"]["p50"] <= row["e2e_ms"]["p99"]
    assert 0 < row["output_tokens_mean"] <= row["requested_output_mean"]


def test_quick_runs_and_reports_sane_fields(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    cmd = [sys.executable, "-m", "genserve.cli", "bench", "--quick", "--no-progress"]
    cmd += ["--model-id", str(tiny_llama_dir), "--json", str(out), "--log-dir", str(tmp_path)]
    plotting = importlib.util.find_spec("matplotlib") is not None  # the `bench` extra
    if plotting:
        cmd += ["--plot", str(png)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    rows = {(r["workload"], r["point"]): r for r in doc["rows"]}
    assert set(rows) >= {
        ("single", "c=1"),
        ("sweep", "c=1"),
        ("sweep", "c=4"),
        ("shared-prefix", "unique"),
        ("shared-prefix", "shared"),
    }
    for (workload, _), row in rows.items():
        if workload == "cold-start":
            assert 0 < row["cold_start_s"] < 300
        else:
            _sane(row)
    assert any(w == "cold-start" for w, _ in rows)
    assert doc["meta"]["exact_prompt_lengths"] is True
    assert rows[("single", "c=1")]["input_tokens_mean"] == 32
    assert "| genserve-fp32 | single |" in proc.stdout
    if plotting:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sharegpt_lengths_are_seeded_and_clipped() -> None:
    a, b = sharegpt_lengths(500, seed=3), sharegpt_lengths(500, seed=3)
    assert a == b and a != sharegpt_lengths(500, seed=4)
    assert all(4 <= i <= 1024 and 4 <= o <= 512 for i, o in a)
    ins = sorted(i for i, _ in a)
    assert 60 < ins[250] < 160  # median near 100


def test_prompts_have_exact_token_lengths(smollm2_tokenizer_dir: Path) -> None:
    builder = PromptBuilder(smollm2_tokenizer_dir, seed=0)
    assert builder.exact
    for n in (1, 7, 128, 1000):
        assert builder.count(builder.text(n)) == n
    specs = shared_prefix_specs(builder, 3, 100, 32, 8, shared=True)
    prefix = specs[0].prompt[:200]
    assert all(s.prompt.startswith(prefix) for s in specs)
    assert all(builder.count(s.prompt) == 132 for s in specs)


def test_parse_event_tgi_openai_and_errors() -> None:
    tok = parse_event("tgi", '{"token": {"id": 5, "text": "a"}, "generated_text": null}')
    assert (tok.tokens, tok.done) == (1, False)
    final = '{"token": {"id": 2}, "generated_text": "ab", "details": {"generated_tokens": 2}}'
    last = parse_event("tgi", final)
    assert last.done and last.total_tokens == 2
    err = parse_event("tgi", '{"error": "Model is overloaded", "error_type": "overloaded"}')
    assert err.error == "overloaded"
    usage = parse_event("openai-completions", '{"choices": [], "usage": {"completion_tokens": 9}}')
    assert usage.tokens == 0 and usage.total_tokens == 9
    chat = parse_event("openai-chat", '{"choices": [{"delta": {"content": "hi"}}]}')
    assert chat.tokens == 1
    assert parse_event("openai-chat", "[DONE]").done


def _fake_openai_app(tokens: int) -> web.Application:
    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chat = "messages" in body
        n = body["max_tokens"] if body.get("ignore_eos") else tokens
        for _ in range(n):
            choice = {"delta": {"content": "x"}} if chat else {"text": "x"}
            await resp.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
            await asyncio.sleep(0.001)
        usage = {"choices": [], "usage": {"completion_tokens": n}}
        await resp.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", completions)
    return app


@pytest.mark.parametrize("api", ["openai-completions", "openai-chat"])
def test_openai_client_against_a_fake_server(api: str, smollm2_tokenizer_dir: Path) -> None:
    async def go() -> RunOutcome:
        runner = web.AppRunner(_fake_openai_app(tokens=3))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            target = Target(f"http://127.0.0.1:{port}", api, "m", "ignore_eos")
            specs = [PromptBuilder(smollm2_tokenizer_dir).text(16) for _ in range(6)]
            reqs = [RequestSpec(p, 16, 5) for p in specs]
            return await run_load(target, reqs, LoadShape(concurrency=3), Progress(6, "", False))
        finally:
            await runner.cleanup()

    row = summarize(asyncio.run(go()))
    assert row["completed"] == 6 and row["output_tokens_mean"] == 5
    _sane(row)


def test_tables_and_ratio() -> None:
    def row(server: str, toks: float, ttft: float) -> dict:
        rec = RequestRecord(8, 8, 0.0, [ttft, ttft + 0.01], 8, ttft + 0.02)
        out = summarize(RunOutcome([rec], 0.0, 1.0, False))
        out.update(server=server, workload="sweep", point="c=4", output_throughput=toks)
        return out

    rows = [row("genserve-bf16", 300.0, 0.05), row("llama.cpp-f16", 200.0, 0.02)]
    rows.append({"server": "transformers", "workload": "*", "point": "", "skipped": "no"})
    table = compare_table(rows, ["genserve-bf16", "llama.cpp-f16", "transformers"])
    assert "1.50x (genserve-bf16 vs llama.cpp-f16; higher better)" in table
    assert "2.50x (genserve-bf16 vs llama.cpp-f16; lower better)" in table
    assert "transformers: skipped: no" in table
    assert "| genserve-bf16 | sweep | c=4 |" in run_table(rows)


def test_cut_off_requests_count_as_lower_bounds() -> None:
    done = RequestRecord(8, 4, 0.0, [0.1, 0.2, 0.3, 0.4], 4, 0.4)
    waiting = RequestRecord(8, 4, 0.0, cancelled=True)  # no token before the limit
    row = summarize(RunOutcome([done, waiting], 0.0, 2.0, True))
    assert row["completed"] == 1 and row["cancelled"] == 1
    assert row["ttft_ms"]["censored"] == 1
    assert row["ttft_ms"]["p99"] > 1900  # the waiting request is not left out
    assert row["ttft_ms"]["lower_bounds"] == ["mean", "p50", "p90", "p99"]
    assert "lower_bounds" not in row["itl_ms"]
    row.update(server="s", workload="sweep", point="c=2")
    assert ">=" in run_table([row])
