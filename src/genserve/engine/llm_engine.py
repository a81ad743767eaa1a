"""The synchronous engine: step() = schedule -> run -> sample -> update -> detokenize -> stop.

It owns every per-request piece of state (detokenizer, stop checker, sampler generator) and
frees it in one place when a request ends, however it ends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from genserve.config import CacheConfig, ModelConfig, SchedulerConfig
from genserve.engine.block_manager import BlockManager
from genserve.engine.model_runner import ModelRunner
from genserve.engine.request import FinishReason, Request, RequestStatus, TokenEvent, TopToken
from genserve.engine.scheduler import Scheduler
from genserve.engine.scheduler_output import SchedulerOutput
from genserve.models.loader import load_config, load_model, parse_dtype, resolve_model_dir
from genserve.sampling.sampler import Sampler
from genserve.sampling.stopping import StopChecker
from genserve.sampling.watermark import WatermarkConfig
from genserve.tokenization.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger(__name__)

FINISH_STATUS = {
    FinishReason.LENGTH: RequestStatus.FINISHED_LENGTH,
    FinishReason.EOS_TOKEN: RequestStatus.FINISHED_STOPPED,
    FinishReason.STOP_SEQUENCE: RequestStatus.FINISHED_STOPPED,
}


@dataclass(slots=True)
class _Live:
    """Engine-side state of one unfinished request."""

    request: Request
    detok: IncrementalDetokenizer
    stop: StopChecker
    prompt_logprobs: list[float | None] = field(default_factory=list)


@dataclass(slots=True)
class StepStats:
    num_scheduled: int = 0
    num_tokens: int = 0
    num_prefill_tokens: int = 0
    duration_s: float = 0.0


class LLMEngine:
    def __init__(
        self,
        model: torch.nn.Module,
        model_config: ModelConfig,
        tokenizer: Tokenizer,
        dtype: torch.dtype,
        cache_config: CacheConfig | None = None,
        scheduler_config: SchedulerConfig | None = None,
        watermark: WatermarkConfig | None = None,
        model_id: str = "",
    ) -> None:
        self.model_id = model_id
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.dtype = dtype
        cache_config = cache_config or CacheConfig()
        self.runner = ModelRunner(model, model_config, cache_config, dtype)
        self.block_manager = BlockManager(
            self.runner.num_blocks, cache_config.block_size, cache_config.enable_prefix_caching
        )
        self.scheduler_config = scheduler_config or SchedulerConfig(
            max_model_len=min(model_config.max_position_embeddings, self.runner.capacity_tokens)
        )
        self.scheduler = Scheduler(self.scheduler_config, self.block_manager)
        self.sampler = Sampler(model_config.vocab_size, watermark)
        self.eos_token_ids = frozenset(tokenizer.eos_token_ids) | frozenset(
            model_config.eos_token_ids
        )
        self._live: dict[str, _Live] = {}
        self._rejected: list[TokenEvent] = []  # error events for requests add_request refused
        self.last_step = StepStats()
        # test-only: called with the SchedulerOutput before the model runs (fault injection)
        self.fault_hook: Callable[[SchedulerOutput], None] | None = None

    @classmethod
    def from_model(
        cls,
        model_id: str | None = None,
        revision: str | None = None,
        dtype: str | None = None,
        cache_config: CacheConfig | None = None,
        scheduler_config: SchedulerConfig | None = None,
        watermark: WatermarkConfig | None = None,
    ) -> LLMEngine:
        """Resolve, load and wire everything. Raises ModelLoadError for user-facing problems."""
        t0 = time.perf_counter()
        model_dir = resolve_model_dir(model_id, revision)
        torch_dtype = parse_dtype(dtype)
        cfg = load_config(model_dir)
        model = load_model(model_dir, torch_dtype, cfg)
        tokenizer = Tokenizer.from_dir(model_dir)
        if model_id is None:
            from genserve.models.default_model import DEFAULT_MODEL_ID

            model_id = DEFAULT_MODEL_ID
        engine = cls(
            model, cfg, tokenizer, torch_dtype, cache_config, scheduler_config, watermark,
            model_id=model_id,
        )  # fmt: skip
        log.info(
            "loaded %s (%s, %s) from %s in %.1fs",
            model_id,
            cfg.architecture,
            str(torch_dtype).removeprefix("torch."),
            Path(model_dir),
            time.perf_counter() - t0,
        )
        return engine

    # ------------------------------------------------------------------------- requests
    @property
    def kv_capacity_tokens(self) -> int:
        return self.runner.capacity_tokens

    @property
    def max_model_len(self) -> int:
        return self.scheduler_config.max_model_len

    @property
    def max_request_tokens(self) -> int:
        """The most tokens (prompt + generation) one request may hold in the KV cache."""
        bm = self.block_manager
        blocks = bm.num_usable_blocks
        if self.scheduler_config.max_batch_total_tokens is not None:
            blocks = min(blocks, self.scheduler_config.max_batch_total_tokens // bm.block_size)
        return blocks * bm.block_size

    def add_request(self, request: Request) -> None:
        """Queue a request. One that could never fit the KV cache is not queued (it would
        livelock): it fails with an error event at the next step. Raises only if nothing was
        recorded."""
        need = request.num_prompt_tokens + request.stopping.max_new_tokens
        if need > self.max_request_tokens:
            message = (
                f"the request needs {need} tokens of KV cache and at most "
                f"{self.max_request_tokens} fit"
            )
            self._rejected.append(
                TokenEvent(request.request_id, -1, "", None, False, 0, error=message)
            )
            return
        detok = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids)
        stop = StopChecker(request.stopping, self.eos_token_ids)
        self.scheduler.add_request(request)
        self._live[request.request_id] = _Live(request, detok, stop)

    def abort(self, request_id: str) -> bool:
        """Abort an unfinished request; its blocks are free when this returns."""
        if self.scheduler.abort(request_id) is None:
            return False
        self._release(request_id)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished or bool(self._rejected)

    def _release(self, request_id: str) -> None:
        self._live.pop(request_id, None)
        self.sampler.release(request_id)

    # ----------------------------------------------------------------------------- step
    def step(self) -> list[TokenEvent]:
        t0 = time.perf_counter()
        events, self._rejected = self._rejected, []
        out = self.scheduler.schedule()
        if out.is_empty:
            return events
        samplers = [s.request for s in out.scheduled if s.samples]
        prompt_rows = [
            s
            for s in out.scheduled
            if s.request.prefill_logprobs and s.start < s.request.num_prompt_tokens
        ]
        try:
            if self.fault_hook is not None:
                self.fault_hook(out)
            greedy = bool(samplers) and self.sampler.greedy_only(samplers)
            result, prompt_lps = self.runner.execute(
                out, prompt_rows, greedy=greedy,
                logprobs=greedy and self.sampler.wants_logprobs(samplers),
            )  # fmt: skip
            if greedy:  # the runner chose: (token ids, logprobs)
                sampled = self.sampler.greedy_output(samplers, *result)
            else:
                sampled = self.sampler(result, samplers) if samplers else None
        except Exception as e:  # noqa: BLE001 - isolate the failure to this step's requests
            log.exception("engine step failed; failing %d requests", len(out.scheduled))
            failed = self._fail([s.request for s in out.scheduled], f"{type(e).__name__}: {e}")
            return events + failed
        for s in prompt_rows:  # a preempted request recomputes its prompt: keep one copy
            live = self._live[s.request.request_id]
            del live.prompt_logprobs[s.start :]
            live.prompt_logprobs.extend(prompt_lps[s.request.request_id])
        self.scheduler.update(out)
        if sampled is not None:
            for i, req in enumerate(samplers):
                try:
                    event = self._on_token(
                        req, sampled.token_ids[i], sampled.logprobs[i], sampled.top_tokens[i]
                    )
                except Exception as e:  # noqa: BLE001 - e.g. a detokenizer bug: this request only
                    log.exception("post-processing %s failed", req.request_id)
                    event = self._fail([req], f"{type(e).__name__}: {e}")[0]
                events.append(event)
        self.last_step = StepStats(
            len(out.scheduled),
            out.num_tokens,
            sum(s.num_new_tokens for s in out.scheduled if s.num_new_tokens > 1),
            time.perf_counter() - t0,
        )
        return events

    def _on_token(self, req: Request, token: int, logprob: float | None, top: list) -> TokenEvent:
        live = self._live[req.request_id]
        req.append_output_token(token)
        piece = live.detok.step(token)
        reason = live.stop(token, piece, self.sampler.grammars.done(req))
        if reason is not None:
            piece += live.detok.flush()
        tok = self.tokenizer
        event = TokenEvent(
            request_id=req.request_id,
            token_id=token,
            text=piece,
            logprob=logprob,
            special=tok.is_special(token),
            index=req.num_output_tokens - 1,
            top_tokens=[TopToken(i, tok.token_text(i), lp, tok.is_special(i)) for i, lp in top],
            num_prompt_tokens=req.num_prompt_tokens,
            num_cached_tokens=req.num_cached_tokens,
        )
        if event.index == 0 and req.prefill_logprobs:
            event.prompt_logprobs = [None, *live.prompt_logprobs]
        if reason is not None:
            event.finish_reason = reason
            event.generated_text = live.detok.final_text(skip_special_tokens=True)
            self.scheduler.finish(req, FINISH_STATUS[reason])
            self._release(req.request_id)
        return event

    def _fail(self, requests: list[Request], message: str) -> list[TokenEvent]:
        events = []
        for req in requests:
            self.scheduler.finish(req, RequestStatus.FINISHED_ERROR)
            self._release(req.request_id)
            events.append(
                TokenEvent(
                    req.request_id, -1, "", None, False, req.num_output_tokens, error=message
                )
            )
        return events
