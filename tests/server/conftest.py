"""Default `server` and `client` fixtures, used by the OpenAI-route tests: the real server on the
tiny model (one per test module) and the `openai` SDK pointed at it. Modules that need another
server define their own `server` fixture, which takes precedence."""

from __future__ import annotations

import openai
import pytest
from real_server import real_server


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with real_server(tiny_llama_dir, max_concurrent_requests=8) as (url, engine):
        yield url, engine


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="-", max_retries=0, timeout=60)
