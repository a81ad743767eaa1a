"""schemathesis against our own OpenAPI document (`/api-doc/openapi.json`), real engine:
for every operation, schema-valid and schema-invalid requests; no 5xx, and no response that
breaks the document (status code, content type, body or SSE event schema).

`GENSERVE_SCHEMATHESIS_EXAMPLES` sets the cases per operation and mode (CI: a few hundred per
route in all); `bench/soak.py` runs thousands, against TGI's document too."""

from __future__ import annotations

import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from reliability_util import assert_clean, reliable_server
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

EXAMPLES = int(os.environ.get("GENSERVE_SCHEMATHESIS_EXAMPLES", "75"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)


@pytest.fixture(scope="module")
def served(tiny_llama_dir):
    # short generations: every accepted case runs at most 16 tokens through the engine
    with reliable_server(tiny_llama_dir, max_total_tokens=16, request_read_timeout=10) as s:
        yield s


@pytest.fixture(scope="module")
def schema(served):
    return schemathesis.openapi.from_url(f"{served.url}/api-doc/openapi.json")


def _operations(schema) -> list:
    return [result.ok() for result in schema.get_all_operations()]


def fuzz_operation(operation, base_url: str, mode: GenerationMode, examples: int) -> list[str]:
    """Run `examples` cases; return one line per distinct failure (with a curl to replay)."""
    failures: dict[str, str] = {}

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,  # CI is reproducible; bench/soak.py explores at random
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case) -> None:
        response = case.call(base_url=base_url, timeout=60)
        try:
            case.validate_response(response, checks=CHECKS)
        except BaseException as exc:  # noqa: BLE001 - a FailureGroup: collect, keep going
            title = str(exc).split("\n- ", 1)[-1].split("\n", 1)[0]
            failures.setdefault(title, f"{title}: {case.as_curl_command()[:500]}")

    run()
    return list(failures.values())


def test_our_openapi_document(served, schema, record_property):
    operations = _operations(schema)
    paths = {op.path for op in operations}
    assert {"/generate", "/generate_stream", "/", "/live", "/ready"} <= paths
    problems = []
    for op in operations:
        post = op.method.upper() == "POST"
        for mode in MODES if post else MODES[:1]:  # a GET without parameters has no bad input
            found = fuzz_operation(op, served.url, mode, EXAMPLES if post else 3)
            problems += [f"{op.label} [{mode.value}] {f}" for f in found]
    record_property("schemathesis_operations", len(operations))
    assert not problems, "\n".join(problems)
    assert_clean(served)
    r = httpx.post(f"{served.url}/generate", json={"inputs": "Hi", "parameters": {}}, timeout=60)
    assert r.status_code == 200  # healthy after the fuzzing
