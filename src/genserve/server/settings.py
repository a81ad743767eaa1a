"""What the HTTP layer is configured with (built once by `genserve launch`, passed down)."""

from __future__ import annotations

from dataclasses import dataclass

from genserve.server.validation import ValidationLimits

VERSION = "3.3.6-dev0"  # the TGI API version spoken (`/info` `version`)
ROUTER = "text-generation-router"


@dataclass(frozen=True, slots=True)
class ServerSettings:
    model_id: str
    max_input_tokens: int
    max_total_tokens: int
    model_sha: str | None = None
    model_pipeline_tag: str | None = None
    max_concurrent_requests: int = 128
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    validation_workers: int = 2
    max_client_batch_size: int = 4
    api_key: str | None = None
    cors_allow_origin: tuple[str, ...] = ()
    payload_limit: int = 2_000_000
    enable_prefill_logprobs: bool = False
    disable_grammar_support: bool = False
    compute_type: str = "cpu"
    docker_label: str | None = None
    sha: str | None = None
    tokenizer_config_path: str | None = None  # its chat_template/bos/eos replace the model's
    # reliability (docs/operations.md): prompt tokens waiting for their first token before
    # 429 (None: unbounded), drain time on SIGTERM, slow-client deadline for a request's
    # head and body
    max_queued_tokens: int | None = None
    graceful_termination_timeout: float = 90.0
    request_read_timeout: float = 30.0

    @property
    def limits(self) -> ValidationLimits:
        return ValidationLimits(
            max_best_of=self.max_best_of,
            max_stop_sequences=self.max_stop_sequences,
            max_top_n_tokens=self.max_top_n_tokens,
            max_input_tokens=self.max_input_tokens,
            max_total_tokens=self.max_total_tokens,
            disable_grammar_support=self.disable_grammar_support,
        )

    @property
    def compat_return_full_text(self) -> bool:
        """`/` defaults `return_full_text` from the Hub pipeline tag; none known means true."""
        return self.model_pipeline_tag in (None, "text-generation")
