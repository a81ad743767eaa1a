"""Start the real server (real engine, real model) for a test module."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from server_harness import serve

from genserve.server.app import build_app
from genserve.server.settings import ServerSettings

HAVE_ENGINE = importlib.util.find_spec("genserve.engine.async_engine") is not None
USE_FAKE = os.environ.get("GENSERVE_TEST_FAKE_ENGINE") == "1"  # development aid only


def make_engine(model_dir: Path, **engine_kw: Any) -> Any:
    if USE_FAKE:
        from fake_engine import FakeEngine

        return FakeEngine(delay_s=0.002)
    if not HAVE_ENGINE:
        pytest.skip("genserve.engine.async_engine is not there yet")
    from genserve.config import CacheConfig
    from genserve.engine.async_engine import AsyncEngine

    kw = {"dtype": "float32", "cache_config": CacheConfig(memory_bytes=64 << 20), **engine_kw}
    return AsyncEngine.from_model(str(model_dir), **kw)


@contextmanager
def real_server(
    model_dir: Path, engine_kw: dict | None = None, **settings: Any
) -> Iterator[tuple[str, Any]]:
    engine = make_engine(model_dir, **(engine_kw or {}))
    max_total = settings.pop("max_total_tokens", min(engine.max_model_len, 512))
    base = dict(
        model_id=str(getattr(engine, "model_id", model_dir)),
        max_input_tokens=max_total - 1,
        max_total_tokens=max_total,
    )
    app = build_app(engine, ServerSettings(**{**base, **settings}))
    with serve(app) as url:
        yield url, engine
