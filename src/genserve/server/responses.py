"""GenerationResult -> TGI's JSON bodies and `x-*` headers (`generate_internal`)."""

from __future__ import annotations

import time

from genserve.server.generation import GenerationResult, token_of, top_tokens_of
from genserve.server.protocol import (
    BestOfSequence,
    Details,
    GenerateResponse,
    StreamDetails,
    StreamResponse,
)


def generate_response(
    best: GenerationResult,
    others: list[GenerationResult] | None,
    want_details: bool,
    add_prompt: str | None,
) -> GenerateResponse:
    prefix = add_prompt or ""
    details = None
    if want_details:
        sequences = None
        if others is not None:
            sequences = [
                BestOfSequence(
                    generated_text=prefix + r.generated_text,
                    finish_reason=r.finish_reason,
                    generated_tokens=len(r.tokens),
                    seed=r.valid.seed_reported,
                    prefill=r.prefill,
                    tokens=r.tokens,
                    top_tokens=r.top_tokens or None,
                )
                for r in others
            ]
        details = Details(
            finish_reason=best.finish_reason,
            generated_tokens=len(best.tokens),
            seed=best.valid.seed_reported,
            prefill=best.prefill,
            tokens=best.tokens,
            top_tokens=best.top_tokens or None,
            best_of_sequences=sequences,
        )
    return GenerateResponse(generated_text=prefix + best.generated_text, details=details)


def generate_headers(result: GenerationResult, compute_type: str) -> dict[str, str]:
    """Timings as TGI: `x-compute-time` in float seconds, the other times integer ms."""
    t = result.timing
    now = time.perf_counter()
    total = now - t.arrival
    validation = t.queued - t.arrival
    queue = max(t.first_token - t.queued, 0.0)
    inference = now - t.first_token
    n = len(result.tokens)
    per_token = inference / n if n else 0.0

    def ms(seconds: float) -> str:
        return str(int(seconds * 1000))

    return {
        "x-compute-type": compute_type,
        "x-compute-time": repr(total),
        "x-compute-characters": str(len(result.valid.inputs)),
        "x-total-time": ms(total),
        "x-validation-time": ms(validation),
        "x-queue-time": ms(queue),
        "x-inference-time": ms(inference),
        "x-time-per-token": ms(per_token),
        "x-prompt-tokens": str(result.valid.input_length),
        "x-generated-tokens": str(n),
    }


def stream_headers(inputs: str, compute_type: str) -> dict[str, str]:
    return {
        "x-compute-type": compute_type,
        "x-compute-characters": str(len(inputs)),
        "X-Accel-Buffering": "no",
    }


def stream_token(
    index: int,
    ev,
    top_n: int,
    final_text: str | None = None,
    details: StreamDetails | None = None,
) -> StreamResponse:
    return StreamResponse(
        index=index,
        token=token_of(ev),
        top_tokens=(top_tokens_of(ev) or None) if top_n > 0 else None,
        generated_text=final_text,
        details=details,
    )
