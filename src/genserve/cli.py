"""`genserve launch` (TGI's launcher flags) and `genserve generate "prompt"`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger("genserve")


def _user_errors() -> tuple[type[BaseException], ...]:
    """Model-loading problems are printed as one line, never as a traceback."""
    errors: list[type[BaseException]] = []
    try:
        from genserve.models.loader import ModelLoadError

        errors.append(ModelLoadError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from genserve.models.gguf import GGUFError

        errors.append(GGUFError)
    except ImportError:  # pragma: no cover
        pass
    from genserve.server.launcher import ArgumentValidation

    errors.append(ArgumentValidation)
    return tuple(errors)


def build_parser(environ: dict[str, str]) -> argparse.ArgumentParser:
    from genserve.server.launcher import add_launch_arguments

    parser = argparse.ArgumentParser(prog="genserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    launch = sub.add_parser("launch", help="serve TGI's HTTP API")
    add_launch_arguments(launch, environ)
    gen = sub.add_parser("generate", help="generate text for one prompt and print it")
    gen.add_argument("prompt")
    gen.add_argument("--model-id", default=environ.get("MODEL_ID"))
    gen.add_argument("--revision", default=environ.get("REVISION"))
    gen.add_argument("--dtype", default=environ.get("DTYPE"))
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--do-sample", action="store_true")
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    from genserve.bench.cli import add_bench_arguments

    bench = sub.add_parser("bench", help="load-test a TGI/OpenAI server (see bench/README.md)")
    add_bench_arguments(bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    environ = dict(os.environ)
    args = build_parser(environ).parse_args(argv)
    try:
        if args.command == "launch":
            return launch(args, environ)
        if args.command == "bench":
            from genserve.bench.cli import run as bench

            return bench(args)
        return generate(args)
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def launch(args: argparse.Namespace, environ: dict[str, str]) -> int:
    from genserve.server import launcher

    launcher.setup_logging(args.json_output)
    launcher.check_arguments(args)  # before any model work: bad flags fail at once

    from genserve.engine.async_engine import AsyncEngine
    from genserve.server.app import build_app
    from genserve.server.lifecycle import serve
    from genserve.server.settings import ServerSettings

    engine = AsyncEngine.from_model(args.model_id, **launcher.engine_kwargs(args))
    kv_tokens = int(getattr(engine, "kv_capacity_tokens", 0) or 0)
    max_input, max_total = launcher.resolve_token_limits(args, engine.max_model_len, kv_tokens)
    origins = tuple(o.strip() for o in (args.cors_allow_origin or "").split(",") if o.strip())
    settings = ServerSettings(
        model_id=str(getattr(engine, "model_id", None) or args.model_id),
        max_input_tokens=max_input,
        max_total_tokens=max_total,
        max_concurrent_requests=args.max_concurrent_requests,
        max_best_of=args.max_best_of,
        max_stop_sequences=args.max_stop_sequences,
        max_top_n_tokens=args.max_top_n_tokens,
        validation_workers=args.validation_workers,
        max_client_batch_size=args.max_client_batch_size,
        api_key=args.api_key,
        cors_allow_origin=origins,
        payload_limit=args.payload_limit,
        enable_prefill_logprobs=args.enable_prefill_logprobs,
        disable_grammar_support=args.disable_grammar_support,
        compute_type=launcher.compute_type(environ),
        tokenizer_config_path=args.tokenizer_config_path,
        max_queued_tokens=launcher.resolve_max_queued_tokens(args, kv_tokens, max_input),
        graceful_termination_timeout=args.graceful_termination_timeout,
        request_read_timeout=args.request_read_timeout,
    )
    host = launcher.bind_host(args.hostname)
    _log_start(engine, settings, kv_tokens, host, args.port)
    app = build_app(engine, settings)
    # SIGTERM/SIGINT drain (docs/operations.md), then exit 0
    serve(app, host, args.port, keep_alive_timeout=args.keep_alive_timeout,
          read_timeout=args.request_read_timeout)  # fmt: skip
    return 0


def _log_start(engine: Any, settings: Any, kv_tokens: int, host: str, port: int) -> None:
    logger.info(
        "Loaded model %s (dtype %s, device %s)",
        settings.model_id,
        str(getattr(engine.engine, "dtype", "?")).removeprefix("torch."),
        getattr(getattr(engine.engine, "runner", None), "device", "cpu"),
    )
    logger.info(
        "KV cache capacity: %d tokens; max_input_tokens %d, max_total_tokens %d",
        kv_tokens,
        settings.max_input_tokens,
        settings.max_total_tokens,
    )
    shown = "127.0.0.1" if host == "0.0.0.0" else host
    logger.info("Serving the TGI API on http://%s:%d (docs at /docs)", shown, port)


def generate(args: argparse.Namespace) -> int:
    from genserve.llm import LLM

    llm = LLM(model_id=args.model_id, dtype=args.dtype)
    prompt = args.prompt if args.raw else _chat_prompt(llm, args.prompt)
    kwargs: dict[str, Any] = {"max_new_tokens": args.max_new_tokens}
    if args.do_sample or args.temperature is not None:
        kwargs["do_sample"] = True
    if args.temperature is not None:
        kwargs["temperature"] = args.temperature
    if args.seed is not None:
        kwargs["seed"] = args.seed
    (out,) = llm.generate([prompt], **kwargs)
    if out.error is not None:
        print(f"error: {out.error}", file=sys.stderr)
        return 1
    print(out.text.strip() if not args.raw else out.text)
    return 0


def _chat_prompt(llm: Any, user_text: str) -> str:
    """The prompt as the model's chat template renders one user turn (plain text if none)."""
    if not getattr(llm.tokenizer, "chat_template", None):
        return user_text
    return llm.apply_chat_template([{"role": "user", "content": user_text}])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
