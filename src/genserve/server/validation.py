"""GenerateRequest -> ValidRequest with TGI's checks, in TGI's order, with TGI's messages.

Mirrors `router/src/validation.rs` (`Validation::validate`, `validate_input`,
`validate_best_of`). No engine import: the result is plain data plus the engine-side
`SamplingParams` / `StoppingParams`, and tokenization goes through an injected callable.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from genserve.sampling.grammar import CompiledGrammar, GrammarCompiler
from genserve.sampling.grammar_spec import GrammarError, GrammarSpec, from_tgi
from genserve.sampling.params import SamplingParams, StoppingParams
from genserve.server.errors import ValidationError
from genserve.server.protocol import GenerateParameters, GenerateRequest, GrammarType

DEFAULT_GENERATION_LENGTH = 1024
GRAMMAR_COMPILE_TIMEOUT_S = 10.0  # llguidance's limits bound compiles far below this

Encode = Callable[[str, bool], list[int]]


@dataclass(frozen=True, slots=True)
class ValidationLimits:
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_input_tokens: int = 4095
    max_total_tokens: int = 4096
    disable_grammar_support: bool = False
    # the most tokens one request may hold in the KV cache; a request past it could never run
    kv_capacity_tokens: int | None = None


@dataclass(slots=True)
class ValidRequest:
    inputs: str
    input_ids: list[int]
    input_length: int
    sampling: SamplingParams
    stopping: StoppingParams
    best_of: int
    details: bool
    decoder_input_details: bool
    return_full_text: bool
    top_n_tokens: int
    adapter_id: str | None
    max_new_tokens_chunk: int  # TGI's first-chunk size (<= 1024), for `tgi_request_max_new_tokens`

    @property
    def seed_reported(self) -> int | None:
        """TGI reports the seed only when the request was sampled."""
        return self.sampling.seed if self.sampling.sampling else None


@dataclass(slots=True)
class _Checked:
    sampling: SamplingParams
    best_of: int
    truncate: int | None


class Validator:
    def __init__(
        self,
        limits: ValidationLimits,
        encode: Encode,
        workers: int = 2,
        grammars: GrammarCompiler | None = None,  # None: every grammar is refused
    ) -> None:
        self.limits = limits
        self._encode = encode
        self._grammars = grammars
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="validate")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def tokenize(self, inputs: str, add_special_tokens: bool = True) -> list[int]:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, self._encode, inputs, add_special_tokens)
        except Exception as exc:  # the tokenizer's own failure, as TGI's `Tokenizer(String)`
            raise ValidationError(f"tokenizer error {exc}") from exc

    async def validate(
        self, request: GenerateRequest, add_special_tokens: bool = True
    ) -> ValidRequest:
        params = request.parameters
        checked = self.check_parameters(params, request.inputs)
        ids = await self.tokenize(request.inputs, add_special_tokens)
        input_ids, chunk, max_new_tokens = self.check_lengths(
            ids, checked.truncate, params.max_new_tokens
        )
        if params.grammar is not None:
            checked.sampling.grammar = await self.compile_grammar(params.grammar)
        return ValidRequest(
            inputs=request.inputs,
            input_ids=input_ids,
            input_length=len(input_ids),
            sampling=checked.sampling,
            stopping=StoppingParams(
                max_new_tokens=max_new_tokens, stop_sequences=list(params.stop)
            ),
            best_of=checked.best_of,
            details=params.details,
            decoder_input_details=params.decoder_input_details,
            return_full_text=bool(params.return_full_text),
            top_n_tokens=checked.sampling.top_n_tokens,
            adapter_id=params.adapter_id,
            max_new_tokens_chunk=chunk,
        )

    async def compile_grammar(self, grammar: GrammarType | GrammarSpec) -> CompiledGrammar:
        """A grammar for `SamplingParams.grammar`: TGI's `GrammarType` (TGI's checks and
        messages) or a `GrammarSpec` (chat: any JSON object, tool calls). Compiled in the
        pool (cached specs return at once); every problem is a 422 naming it."""
        compiler = self._grammars
        if self.limits.disable_grammar_support or compiler is None:
            raise ValidationError("grammar is not supported")

        def build() -> CompiledGrammar:
            if isinstance(grammar, GrammarSpec):
                return compiler.compile(grammar)
            return compiler.compile(from_tgi(grammar.type, grammar.value))

        future = asyncio.get_running_loop().run_in_executor(self._pool, build)
        try:
            return await asyncio.wait_for(future, GRAMMAR_COMPILE_TIMEOUT_S)
        except GrammarError as exc:
            raise ValidationError(str(exc)) from None
        except TimeoutError:
            raise ValidationError(
                f"grammar is not valid: it did not compile in {GRAMMAR_COMPILE_TIMEOUT_S:g} s"
            ) from None

    def check_parameters(self, p: GenerateParameters, inputs: str) -> _Checked:
        """Steps 1-13 of `Validation::validate`, before tokenization."""
        lim = self.limits
        best_of = 1 if p.best_of is None else p.best_of
        sampling = (
            p.do_sample
            or p.temperature is not None
            or p.top_k is not None
            or p.top_p is not None
            or p.typical_p is not None
        )
        if best_of > 1 and not sampling:
            raise ValidationError("you must use sampling when `best_of` is > 1")
        temperature = 1.0 if p.temperature is None else p.temperature
        if not temperature > 0.0:  # `not >` also rejects NaN
            raise ValidationError("`temperature` must be strictly positive")
        repetition_penalty = 1.0 if p.repetition_penalty is None else p.repetition_penalty
        if not repetition_penalty > 0.0:
            raise ValidationError("`repetition_penalty` must be strictly positive")
        frequency_penalty = 0.0 if p.frequency_penalty is None else p.frequency_penalty
        if not -2.0 <= frequency_penalty <= 2.0:
            raise ValidationError("`frequency_penalty` must be >= -2.0 and <= 2.0")
        if p.top_p is not None and not 0.0 < p.top_p < 1.0:
            raise ValidationError("`top_p` must be > 0.0 and < 1.0")
        if p.typical_p is not None and not 0.0 < p.typical_p < 1.0:
            raise ValidationError("`typical_p` must be > 0.0 and < 1.0")
        if p.top_k is not None and p.top_k <= 0:
            raise ValidationError("`top_k` must be strictly positive")
        if p.max_new_tokens == 0:
            raise ValidationError("`max_new_tokens` must be strictly positive")
        if len(p.stop) > lim.max_stop_sequences:
            raise ValidationError(
                f"`stop` supports up to {lim.max_stop_sequences} stop sequences. Given: {len(p.stop)}"
            )
        if p.seed is None:
            seed = random.getrandbits(64)
        elif best_of > 1:
            raise ValidationError("`seed` must not be set when `best_of` > 1")
        else:
            seed = p.seed
        top_n = 0 if p.top_n_tokens is None else p.top_n_tokens
        if top_n > lim.max_top_n_tokens:
            raise ValidationError(
                f"`top_n_tokens` must be >= 0 and <= {lim.max_top_n_tokens}. Given: {top_n}"
            )
        if not inputs:
            raise ValidationError("`inputs` cannot be empty")
        if p.truncate is not None and (p.truncate == 0 or p.truncate > lim.max_input_tokens):
            raise ValidationError(
                "`truncate` must be strictly positive and less than "
                f"{lim.max_input_tokens}. Given: {p.truncate}"
            )
        sampling_params = SamplingParams(
            do_sample=p.do_sample,
            temperature=temperature,
            top_k=0 if p.top_k is None else p.top_k,
            top_p=1.0 if p.top_p is None else p.top_p,
            typical_p=1.0 if p.typical_p is None else p.typical_p,
            repetition_penalty=repetition_penalty,
            frequency_penalty=frequency_penalty,
            seed=seed,
            watermark=p.watermark,
            top_n_tokens=top_n,
        )
        return _Checked(sampling=sampling_params, best_of=best_of, truncate=p.truncate)

    def check_lengths(
        self, ids: list[int], truncate: int | None, max_new_tokens: int | None
    ) -> tuple[list[int], int, int]:
        """`validate_input`: truncation keeps the last tokens; the total check uses TGI's first
        chunk (<= 1024) and runs before the input-length check.

        Returns (input_ids, chunk, max_new_tokens for the engine). TGI serves long requests in
        1024-token chunks re-queued with re-tokenized text; the engine here runs the whole
        request at once, bounded by `max_total_tokens`.
        """
        lim = self.limits
        if not ids:  # text a tokenizer normalizes away: the engine cannot run an empty prompt
            raise ValidationError("`inputs` cannot be empty")
        input_length = min(len(ids), truncate) if truncate is not None else len(ids)
        if max_new_tokens is not None:
            chunk = total_new = max_new_tokens
        else:
            limit = lim.max_total_tokens
            if lim.kv_capacity_tokens is not None:  # unset means "as much as fits"
                limit = min(limit, lim.kv_capacity_tokens)
            total_new = max(limit - input_length, 0)
            chunk = min(total_new, DEFAULT_GENERATION_LENGTH)
        if input_length + chunk > lim.max_total_tokens:
            raise ValidationError(
                f"`inputs` tokens + `max_new_tokens` must be <= {lim.max_total_tokens}. "
                f"Given: {input_length} `inputs` tokens and {chunk} `max_new_tokens`"
            )
        if input_length > lim.max_input_tokens:
            raise ValidationError(
                f"`inputs` must have less than {lim.max_input_tokens} tokens. Given: {input_length}"
            )
        input_ids = ids[len(ids) - input_length :]
        engine_max_new = max(1, min(total_new, lim.max_total_tokens - input_length))
        cap = lim.kv_capacity_tokens
        if cap is not None and input_length + engine_max_new > cap:
            raise ValidationError(
                f"`inputs` tokens + `max_new_tokens` must be <= {cap} (the KV cache capacity). "
                f"Given: {input_length} `inputs` tokens and {engine_max_new} `max_new_tokens`"
            )
        return input_ids, chunk, engine_max_new

    def validate_best_of(self, best_of: int) -> int:
        lim = self.limits
        if lim.max_best_of == 1 and best_of != 1:
            raise ValidationError("`best_of` != 1 is not allowed for this endpoint")
        if best_of > lim.max_best_of:
            raise ValidationError(
                f"`best_of` must be > 0 and <= {lim.max_best_of}. Given: {best_of}"
            )
        return best_of
