"""`genserve launch`: TGI's launcher flags (each also read from its UPPER_SNAKE env var),
TGI's argument checks and messages, then the engine, the app and uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import sys
from typing import Any

logger = logging.getLogger("genserve.launcher")


class ArgumentValidation(ValueError):
    """TGI's `LauncherError::ArgumentValidation`."""


# (flag, type, default, help); bool flags use type=bool. The env var is the UPPER_SNAKE name.
FLAGS: list[tuple[str, Any, Any, str]] = [
    (
        "--model-id",
        str,
        None,
        "Hub id, local HF dir or .gguf file (default: SmolLM2-135M-Instruct)",
    ),
    ("--revision", str, None, "Hub revision"),
    ("--dtype", str, None, "float32, bfloat16 or float16 (default: bfloat16 where the CPU has it)"),
    ("--hostname", str, "0.0.0.0", "IP address to listen on"),
    ("--port", int, 3000, "port to listen on"),
    ("--max-concurrent-requests", int, 128, "requests in flight before 429"),
    ("--max-best-of", int, 2, "largest best_of allowed"),
    ("--max-stop-sequences", int, 4, "most stop sequences per request"),
    ("--max-top-n-tokens", int, 5, "largest top_n_tokens allowed"),
    ("--max-input-tokens", int, None, "longest prompt (default max_total_tokens - 1)"),
    ("--max-input-length", int, None, "legacy alias of --max-input-tokens"),
    (
        "--max-total-tokens",
        int,
        None,
        "prompt + generation (default: what the KV cache and model hold)",
    ),
    ("--max-batch-prefill-tokens", int, None, "tokens per engine step"),
    ("--max-batch-total-tokens", int, None, "tokens in flight (default: the KV cache capacity)"),
    ("--max-batch-size", int, None, "requests per batch"),
    ("--validation-workers", int, 2, "tokenizer threads"),
    ("--api-key", str, None, "require `Authorization: Bearer <key>` on the inference routes"),
    ("--cors-allow-origin", str, None, "comma-separated allowed origins (default: any)"),
    ("--payload-limit", int, 2_000_000, "largest request body in bytes"),
    ("--json-output", bool, False, "log as JSON lines"),
    ("--enable-prefill-logprobs", bool, False, "honour decoder_input_details"),
    ("--disable-grammar-support", bool, False, "reject every grammar"),
    ("--max-client-batch-size", int, 4, "most prompts per /v1/completions request"),
    ("--graceful-termination-timeout", int, 90, "seconds to finish requests on shutdown"),
    (
        "--max-queued-tokens",
        int,
        None,
        "prompt tokens waiting for their first token before new requests get 429 "
        "(default: the KV cache capacity; 0: unbounded)",
    ),
    ("--request-read-timeout", float, 30.0, "seconds a client has to send a request (else 408)"),
    ("--keep-alive-timeout", float, 5.0, "seconds an idle keep-alive connection stays open"),
    ("--tokenizer-config-path", str, None, "tokenizer_config.json overriding the model's"),
    ("--watermark-gamma", float, None, "watermark gamma (default 0.5)"),
    ("--watermark-delta", float, None, "watermark delta (default 2.0)"),
    (
        "--kv-cache-memory",
        str,
        None,
        "KV cache budget, e.g. 2GiB (default: a share of free memory)",
    ),
]


def _env_name(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_").upper()


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean value: {text!r}")


def add_launch_arguments(parser: argparse.ArgumentParser, environ: dict[str, str]) -> None:
    """Defaults come from the environment at call time (never at import time)."""
    for flag, kind, default, help_text in FLAGS:
        env = _env_name(flag)
        raw = environ.get(env)
        help_text = f"{help_text} [env: {env}]"
        if kind is bool:
            value = _parse_bool(raw) if raw is not None else default
            parser.add_argument(
                flag, nargs="?", const=True, default=value, type=_parse_bool, help=help_text
            )
            continue
        value = kind(raw) if raw is not None else default
        parser.add_argument(flag, type=kind, default=value, help=help_text)
    parser.add_argument("-p", dest="port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("-g", dest="graceful_termination_timeout", type=int, help=argparse.SUPPRESS)


def check_arguments(args: argparse.Namespace) -> None:
    """The launcher's checks that need no model (TGI's messages)."""
    if args.max_input_length is not None:
        if args.max_input_tokens is not None:
            raise ArgumentValidation(
                "Cannot set both `max_input_tokens` and `max_input_length`, use `max_input_tokens`"
            )
        args.max_input_tokens = args.max_input_length
    mi, mt = args.max_input_tokens, args.max_total_tokens
    if mi is not None and mt is not None and mi >= mt:
        raise ArgumentValidation(f"`max_input_tokens`({mi}) must be < `max_total_tokens`({mt})")
    if args.validation_workers == 0:
        raise ArgumentValidation("`validation_workers` must be > 0")
    mbt = args.max_batch_total_tokens
    if mbt is not None and mt is not None and mt > mbt:
        raise ArgumentValidation(
            f"`max_total_tokens` must be <= `max_batch_total_tokens`. Given: {mt} and {mbt}"
        )
    prefill = args.max_batch_prefill_tokens
    if prefill is not None and mbt is not None and prefill > mbt:
        raise ArgumentValidation("`max_batch_prefill_tokens` must be <= `max_batch_total_tokens`")
    path = getattr(args, "tokenizer_config_path", None)
    if path and not os.path.isfile(path):
        raise ArgumentValidation(f"`tokenizer_config_path` is not a file: {path}")
    for name in ("max_concurrent_requests", "max_best_of", "payload_limit", "max_queued_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise ArgumentValidation(f"`{name}` must be >= 0")


def resolve_token_limits(
    args: argparse.Namespace, max_model_len: int, kv_tokens: int
) -> tuple[int, int]:
    """TGI's defaults: max_total = min(KV capacity, model length); max_input = max_total - 1."""
    total = args.max_total_tokens
    if total is None:
        total = min(x for x in (max_model_len, kv_tokens, args.max_batch_total_tokens) if x)
        if args.max_input_tokens is not None and args.max_input_tokens >= total:
            total = args.max_input_tokens + 1
    inp = args.max_input_tokens if args.max_input_tokens is not None else total - 1
    if inp >= total:
        raise ArgumentValidation(f"`max_input_tokens`({inp}) must be < `max_total_tokens`({total})")
    if total > max_model_len:
        raise ArgumentValidation(
            f"`max_total_tokens`({total}) must be <= the model's maximum length ({max_model_len})"
        )
    if kv_tokens and total > kv_tokens:  # one such request could never run (TGI's message)
        raise ArgumentValidation(f"Not enough memory to handle `max_total_tokens={total}`")
    return inp, total


def resolve_max_queued_tokens(
    args: argparse.Namespace, kv_tokens: int, max_input: int
) -> int | None:
    """Default: what the KV cache holds (and at least one longest prompt); 0 means unbounded."""
    if args.max_queued_tokens == 0:
        return None
    if args.max_queued_tokens is not None:
        return args.max_queued_tokens
    return max(kv_tokens, max_input)


def bind_host(hostname: str) -> str:
    try:
        ipaddress.ip_address(hostname)
    except ValueError:
        logger.warning("Invalid hostname, defaulting to 0.0.0.0")
        return "0.0.0.0"
    return hostname


def compute_type(environ: dict[str, str]) -> str:
    """TGI's `x-compute-type`: env COMPUTE_TYPE, else `1-<gpu name>` on a GPU, else `cpu`."""
    if environ.get("COMPUTE_TYPE"):
        return environ["COMPUTE_TYPE"]
    try:
        import torch

        if torch.cuda.is_available():
            return "1-" + torch.cuda.get_device_name().lower().replace(" ", "-")
    except Exception:  # pragma: no cover - no usable torch.cuda
        pass
    return "cpu"


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "timestamp": self.formatTime(record),
                "level": record.levelname,
                "target": record.name,
                "fields": {"message": record.getMessage()},
            }
        )


def setup_logging(json_output: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(_JsonFormatter() if json_output else logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("LOG_LEVEL", "INFO").upper())


def parse_bytes(text: str) -> int:
    """`2GiB`, `512MiB`, `1.5GB`, `1000000` -> bytes."""
    units = {
        "kib": 2**10,
        "mib": 2**20,
        "gib": 2**30,
        "kb": 10**3,
        "mb": 10**6,
        "gb": 10**9,
        "b": 1,
    }
    low = text.strip().lower()
    for unit, factor in units.items():
        if low.endswith(unit):
            return int(float(low[: -len(unit)]) * factor)
    return int(low)


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`LLMEngine.from_model` keyword arguments from the launcher flags."""
    from genserve.config import CacheConfig, SchedulerConfig
    from genserve.sampling.watermark import WatermarkConfig

    kw: dict[str, Any] = {"revision": args.revision, "dtype": args.dtype}
    if args.kv_cache_memory:
        kw["cache_config"] = CacheConfig(memory_bytes=parse_bytes(args.kv_cache_memory))
    sched = {
        "max_num_batched_tokens": args.max_batch_prefill_tokens,
        "max_num_seqs": args.max_batch_size,
        "max_batch_total_tokens": args.max_batch_total_tokens,
    }
    sched = {k: v for k, v in sched.items() if v is not None}
    if sched:
        # an explicit SchedulerConfig must say the model length the engine would have derived
        kw["scheduler_config"] = SchedulerConfig(max_model_len=_model_len(args), **sched)
    if args.watermark_gamma is not None or args.watermark_delta is not None:
        defaults = WatermarkConfig()
        kw["watermark"] = WatermarkConfig(
            gamma=args.watermark_gamma if args.watermark_gamma is not None else defaults.gamma,
            delta=args.watermark_delta if args.watermark_delta is not None else defaults.delta,
        )
    return kw


def _model_len(args: argparse.Namespace) -> int:
    if args.max_total_tokens is not None:
        return args.max_total_tokens
    from genserve.models.loader import load_config, resolve_model_dir

    return load_config(resolve_model_dir(args.model_id, args.revision)).max_position_embeddings
