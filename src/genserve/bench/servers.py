"""Servers the bench starts and stops itself: one process group each, on a free localhost port.

Cold start is measured here: from `Popen` to the first successful one-token generation, polled
every 50 ms with a tiny request on the server's own API.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

POLL_S = 0.05


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server and how to talk to it."""

    name: str
    description: str
    api: str  # "tgi" | "openai-completions" | "openai-chat"
    fixed_length: str  # see `client.FIXED_LENGTH_MODES`
    argv: Callable[[int], list[str]]  # port -> command line
    model: str = "tgi"
    env: dict[str, str] = field(default_factory=dict)
    unavailable: str | None = None  # why it cannot run here, if it cannot


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`with ServerProcess(spec, log_dir) as srv:` starts the server and waits until it answers."""

    def __init__(self, spec: ServerSpec, log_dir: Path, ready_timeout_s: float = 600.0) -> None:
        self.spec = spec
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_dir) / f"{spec.name}.log"
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.cold_start_s: float | None = None

    def __enter__(self) -> ServerProcess:
        self.start()
        try:
            self.cold_start_s = self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.spec.env}
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        log.write(f"\n=== {' '.join(self.spec.argv(self.port))}\n".encode())
        log.flush()
        self._t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            self.spec.argv(self.port),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # its own process group, so stop() reaches its children
        )
        log.close()

    def wait_ready(self) -> float:
        """Seconds from start to the first successful generation."""
        assert self.proc is not None
        deadline = self._t0 + self.ready_timeout_s
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.spec.name} exited with {self.proc.returncode} before answering; "
                    f"see {self.log_path}"
                )
            if probe(self.base_url, self.spec.api, self.spec.model):
                return time.perf_counter() - self._t0
            time.sleep(POLL_S)
        raise TimeoutError(f"{self.spec.name} did not answer within {self.ready_timeout_s:.0f} s")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait(timeout=10)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group this script created for this one server
    except ProcessLookupError:
        pass


def probe(base_url: str, api: str, model: str, timeout_s: float = 30.0) -> bool:
    """One tiny non-streaming generation; True on a 200."""
    if api == "tgi":
        path, body = "/generate", {"inputs": "Hello there", "parameters": {"max_new_tokens": 1}}
    elif api == "openai-chat":
        msgs = [{"role": "user", "content": "Hello there"}]
        path, body = "/v1/chat/completions", {"model": model, "messages": msgs, "max_tokens": 1}
    else:
        path, body = "/v1/completions", {"model": model, "prompt": "Hello there", "max_tokens": 1}
    req = urllib.request.Request(
        base_url + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            resp.read()
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def measure_cold_start(spec: ServerSpec, log_dir: Path, runs: int) -> list[float]:
    """Start and stop the server `runs` times; the seconds each took to answer."""
    times = []
    for _ in range(runs):
        with ServerProcess(spec, log_dir) as srv:
            assert srv.cold_start_s is not None
            times.append(srv.cold_start_s)
        time.sleep(1.0)  # let the port and memory settle between starts
    return times
