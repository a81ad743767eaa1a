"""`genserve launch` flag checks (TGI's messages, env vars) and `genserve generate` errors."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from genserve.cli import build_parser
from genserve.server.launcher import ArgumentValidation, check_arguments, resolve_token_limits


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "genserve.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def parse(argv: list[str], environ: dict[str, str] | None = None):
    return build_parser(environ or {}).parse_args(["launch", *argv])


def test_tgi_defaults():
    a = parse([])
    assert (a.hostname, a.port, a.max_concurrent_requests, a.max_best_of) == (
        "0.0.0.0",
        3000,
        128,
        2,
    )
    assert (a.max_stop_sequences, a.max_top_n_tokens, a.payload_limit) == (4, 5, 2_000_000)
    assert (a.validation_workers, a.max_client_batch_size, a.graceful_termination_timeout) == (
        2,
        4,
        90,
    )
    assert a.json_output is False and a.enable_prefill_logprobs is False


def test_env_vars_and_flags():
    a = parse(
        ["--port", "8080"],
        {"MAX_BEST_OF": "3", "JSON_OUTPUT": "true", "PORT": "1", "MODEL_ID": "m"},
    )
    assert (a.port, a.max_best_of, a.json_output, a.model_id) == (8080, 3, True, "m")
    assert parse(["--json-output"]).json_output is True
    assert parse(["-p", "9"]).port == 9


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--max-input-tokens", "10", "--max-total-tokens", "10"],
            "`max_input_tokens`(10) must be < `max_total_tokens`(10)",
        ),
        (["--validation-workers", "0"], "`validation_workers` must be > 0"),
        (
            ["--max-total-tokens", "100", "--max-batch-total-tokens", "50"],
            "`max_total_tokens` must be <= `max_batch_total_tokens`. Given: 100 and 50",
        ),
        (
            ["--max-input-tokens", "5", "--max-input-length", "5"],
            "Cannot set both `max_input_tokens` and `max_input_length`, use `max_input_tokens`",
        ),
    ],
)
def test_contradictions_fail_with_tgi_message(argv, message):
    with pytest.raises(ArgumentValidation) as exc:
        check_arguments(parse(argv))
    assert str(exc.value) == message


def test_launch_fails_at_start_with_one_line():
    done = run_cli("launch", env={"MAX_INPUT_TOKENS": "20", "MAX_TOTAL_TOKENS": "10"})
    assert done.returncode == 1
    assert (
        done.stderr.strip().splitlines()[-1]
        == "error: `max_input_tokens`(20) must be < `max_total_tokens`(10)"
    )
    assert "Traceback" not in done.stderr


def test_token_limit_defaults():
    assert resolve_token_limits(parse([]), max_model_len=2048, kv_tokens=1000) == (999, 1000)
    assert resolve_token_limits(parse(["--max-total-tokens", "64"]), 2048, 1000) == (63, 64)
    with pytest.raises(ArgumentValidation):
        resolve_token_limits(parse(["--max-total-tokens", "4096"]), 2048, 10000)


@pytest.mark.skipif(
    importlib.util.find_spec("genserve.llm") is None, reason="genserve.llm not there yet"
)
def test_generate_bad_model_is_one_line_error(tmp_path):
    done = run_cli("generate", "hi", "--model-id", str(tmp_path / "nope"))
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr


def test_generate_prints_the_answer(tiny_llama_dir):
    done = run_cli(
        "generate",
        "Hello",
        "--model-id",
        str(tiny_llama_dir),
        "--max-new-tokens",
        "4",
        "--dtype",
        "float32",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    raw = run_cli(
        "generate", "Hello", "--model-id", str(tiny_llama_dir), "--max-new-tokens", "4", "--raw"
    )
    assert raw.returncode == 0, raw.stderr
