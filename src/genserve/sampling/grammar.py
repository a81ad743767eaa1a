"""Grammar-constrained decoding on llguidance: compile a spec once, give each request a matcher.

    compiler = GrammarCompiler.for_tokenizer(tokenizer)        # one per served tokenizer
    grammar = compiler.compile(GrammarSpec.json_schema(schema))  # cached by (kind, value)
    SamplingParams(..., grammar=grammar)                       # the sampler does the rest

Why llguidance (numbers in bench/grammar.py's docstring): it compiles lazily, so a schema costs
~0.4-2.6 ms where outlines-core builds a whole token-level DFA index up front (30-540 ms on the
same schemas, 1.3-1.5 s on twelve optional properties: TGI issue #2902) and xgrammar 0.5-330
ms; it implements every schema keyword the tests use (outlines-core refuses `allOf`); its masks
cost tens of microseconds per token; and it is one dependency-free wheel.

JSON whitespace is TGI's (outlines' default): at most one space between tokens, so a model can
neither loop on whitespace nor be forced into one spacing style. llguidance's parser limits bound
both compile work (lexer fuel, grammar size) and per-token mask work, so no grammar hangs.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import llguidance as llg
import tokenizers
import torch

from genserve.sampling.grammar_spec import GrammarError, GrammarKind, GrammarSpec

log = logging.getLogger(__name__)

JSON_OPTIONS = {"whitespace_pattern": "[ ]?"}  # defaults: a schema's "x-guidance" may override
ANY_OBJECT_SCHEMA = '{"type":"object"}'
CACHE_SIZE = 64  # compiled grammars kept (TGI's shard keeps 32 FSMs)


def _limits() -> llg.LLParserLimits:
    """llguidance's defaults bound the work (~20 ms of lexer build, ~14 ms per mask at most);
    terse errors keep schema internals out of 422 messages."""
    return llg.LLParserLimits(verbose_errors=False)


class CompiledGrammar:
    """An immutable, shareable compiled grammar; `matcher()` starts a request on it."""

    __slots__ = ("spec", "eos_token_ids", "tokenizer_vocab_size", "_template")

    def __init__(
        self, spec: GrammarSpec, template: llg.LLMatcher, eos_token_ids: tuple[int, ...], vocab: int
    ) -> None:
        self.spec = spec
        self.eos_token_ids = eos_token_ids
        self.tokenizer_vocab_size = vocab  # ids at or past it (padded model rows) are never allowed
        self._template = template  # at the start state, never advanced

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self, self._template.deep_copy())

    def __repr__(self) -> str:
        return f"CompiledGrammar({self.spec.kind.value}, {self.spec.value[:60]!r})"


class GrammarMatcher:
    """One request's position in its grammar.

    It follows the request's *generated* ids only (never the prompt): `advance(ids)` consumes
    the ids it has not seen yet, so a request preempted and recomputed (generated ids kept)
    stays in step however often it is called, and a shorter list than seen rewinds and replays.
    """

    __slots__ = ("grammar", "ll", "num_consumed", "_warned")

    def __init__(self, grammar: CompiledGrammar, ll: llg.LLMatcher) -> None:
        self.grammar = grammar
        self.ll = ll  # the llguidance matcher (filled in batches by `grammar_mask`)
        self.num_consumed = 0
        self._warned = False

    def advance(self, output_token_ids: Sequence[int]) -> None:
        n = len(output_token_ids)
        if n == self.num_consumed:
            return
        if n < self.num_consumed:
            self.ll.reset()
            self.num_consumed = 0
        if not self.ll.consume_tokens(list(output_token_ids[self.num_consumed :])):
            self._warn()
        self.num_consumed = n

    @property
    def done(self) -> bool:
        """Nothing but EOS may follow: the output is complete (or the matcher failed)."""
        return self.ll.is_stopped()

    @property
    def accepting(self) -> bool:
        return self.ll.is_accepting()

    @property
    def error(self) -> str | None:
        return self.ll.get_error() or None

    def _warn(self) -> None:
        if not self._warned:  # a masked row cannot pick a forbidden token: this is a bug
            self._warned = True
            log.warning("grammar matcher failed: %s", self.ll.get_error())


class GrammarCompiler:
    """Compiles specs for one tokenizer, with an LRU cache keyed by (kind, value). Thread-safe:
    the server compiles in worker threads. llguidance's tokenizer view costs ~1 s to build, so
    it is built on the first compile, not at start-up."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        eos_token_ids: Iterable[int],
        cache_size: int = CACHE_SIZE,
    ) -> None:
        self.backend = tokenizer
        self.eos_token_ids = tuple(sorted(set(eos_token_ids)))
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[GrammarKind, str], CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self._tok_lock = threading.Lock()
        self._lltok: llg.LLTokenizer | None = None

    @classmethod
    def for_tokenizer(
        cls, tokenizer: Any, extra_eos_token_ids: Iterable[int] = ()
    ) -> GrammarCompiler | None:
        """For a `genserve.tokenization.tokenizer.Tokenizer`; None for anything without a
        `tokenizers` backend (then grammars are not supported)."""
        backend = getattr(tokenizer, "backend", None)
        if not isinstance(backend, tokenizers.Tokenizer):
            return None
        eos = [*getattr(tokenizer, "eos_token_ids", ()), *extra_eos_token_ids]
        return cls(backend, eos)

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """Raises GrammarError naming the problem (invalid or unsupported schema, invalid regex,
        a grammar that can produce nothing)."""
        key = (spec.kind, spec.value)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        try:
            compiled = self._build(spec)  # outside the lock: compiles may run in parallel
        except GrammarError:
            raise
        except Exception as exc:  # noqa: BLE001 - llguidance failing is the grammar's 422, not a 500
            log.warning("compiling %r failed", spec, exc_info=True)
            raise GrammarError(f"grammar is not valid: {exc}") from None
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def clear(self) -> None:
        """Forget every compiled grammar (requests holding one keep it)."""
        with self._lock:
            self._cache.clear()

    def tokenizer(self) -> llg.LLTokenizer:
        with self._tok_lock:
            if self._lltok is None:
                eos = list(self.eos_token_ids) or None
                self._lltok = llg.LLTokenizer(self.backend.to_str(), eos_token=eos)
            return self._lltok

    def _build(self, spec: GrammarSpec) -> CompiledGrammar:
        lltok = self.tokenizer()
        matcher = llg.LLMatcher(lltok, grammar_text(spec), log_level=0, limits=_limits())
        if matcher.is_error():
            raise GrammarError(f"grammar is not valid: {matcher.get_error()}")
        eos = tuple(lltok.eos_tokens)
        if not matcher.is_accepting() and not _allows_more_than(matcher, eos, lltok.vocab_size):
            raise GrammarError("grammar is not valid: no output can ever satisfy it")
        return CompiledGrammar(spec, matcher, eos, lltok.vocab_size)


def new_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """[rows, ceil(V/32)] int32, bit j of word w = token 32*w + j (llguidance's layout; not
    `llguidance.torch`, which imports torch._dynamo: +2 s at start-up)."""
    return torch.zeros(rows, (vocab_size + 31) // 32, dtype=torch.int32)


def grammar_text(spec: GrammarSpec) -> str:
    """The spec in llguidance's grammar format."""
    try:
        if spec.kind is GrammarKind.JSON_SCHEMA:
            return llg.LLMatcher.grammar_from_json_schema(spec.value, defaults=JSON_OPTIONS)
        if spec.kind is GrammarKind.JSON_OBJECT:
            return llg.LLMatcher.grammar_from_json_schema(ANY_OBJECT_SCHEMA, defaults=JSON_OPTIONS)
        if spec.kind is GrammarKind.REGEX:
            return llg.LLMatcher.grammar_from_regex(spec.value)
        return llg.LLMatcher.grammar_from_lark(spec.value)
    except ValueError as exc:  # e.g. a boolean schema
        raise GrammarError(f"grammar is not valid: {exc}") from None


def _allows_more_than(matcher: llg.LLMatcher, eos: Sequence[int], vocab_size: int) -> bool:
    """Whether the first mask allows any token but EOS (it also warms the lexer)."""
    bitmask = new_bitmask(1, vocab_size)
    matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * 4)
    words = [w & 0xFFFFFFFF for w in bitmask[0].tolist()]  # plain ints: no tensor op (~30 ms)
    for token in eos:
        if token < vocab_size:
            words[token // 32] &= ~(1 << (token % 32))
    return any(words)
