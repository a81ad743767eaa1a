"""Grammar engine units: TGI's request checks, compile errors and cache, matchers that follow a
request's generated ids, and the batched mask in the sampler (a constrained row never picks a
forbidden token; unconstrained rows are untouched)."""

from __future__ import annotations

import json

import pytest
import torch
from grammar_schemas import OPTIONAL_12, SCHEMAS

from genserve.engine.request import FinishReason, Request
from genserve.sampling.grammar import GrammarCompiler
from genserve.sampling.grammar_spec import GrammarError, GrammarKind, GrammarSpec, from_tgi
from genserve.sampling.params import SamplingParams, StoppingParams
from genserve.sampling.sampler import Sampler
from genserve.sampling.stopping import StopChecker
from genserve.tokenization.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_dir(smollm2_tokenizer_dir)


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    compiler = GrammarCompiler.for_tokenizer(tokenizer)
    assert compiler is not None and compiler.eos_token_ids == (2,)
    return compiler


def ids(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


# ----------------------------------------------------------------------- TGI's request form

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


def test_tgi_forms_give_one_spec():
    spec = GrammarSpec.json_schema(SCHEMA)
    assert from_tgi("json", SCHEMA) == spec
    assert from_tgi("json_object", json.dumps(SCHEMA)) == spec  # a string is parsed again
    assert from_tgi("json_schema", {"name": "x", "schema": SCHEMA, "strict": True}) == spec
    assert from_tgi("regex", "a+") == GrammarSpec(GrammarKind.REGEX, "a+")


@pytest.mark.parametrize(
    ("kind", "value", "message"),
    [
        ("json", 3, "grammar is not supported"),
        ("json", [SCHEMA], "grammar is not supported"),
        ("json", "{not json", "grammar is not valid: Expecting property name enclosed in"),
        ("json", {"type": "object"}, "grammar is not valid: Grammar must have a 'properties'"),
        ("json", "true", "grammar is not valid: Grammar must have a 'properties' field"),
        ("json", {"type": "strin", "properties": {}}, "grammar is not valid: 'strin' is not"),
        ("json", {"properties": {"a": {"minimum": "x"}}}, "grammar is not valid: 'x' is not of"),
        ("json_schema", {"schema": "{}"}, "grammar is not valid: '{}' is not of type"),
    ],
)
def test_tgi_messages(kind, value, message):
    with pytest.raises(GrammarError) as err:
        from_tgi(kind, value)
    assert str(err.value).startswith(message), str(err.value)


# ----------------------------------------------------------------------- compiling


def _compile_error(compiler: GrammarCompiler, spec: GrammarSpec) -> str:
    with pytest.raises(GrammarError) as err:
        compiler.compile(spec)
    message = str(err.value)
    assert message.startswith("grammar is not valid: "), message
    return message


@pytest.mark.parametrize(
    ("schema_or_regex", "names"),
    [
        ("a(b", "unclosed group"),
        ("[z-a]", "invalid character class range"),
        ("(?=x)", "look-around"),
        ("[^\\s\\S]", "no output can ever satisfy it"),
        ({"properties": {"a": {"type": "array", "uniqueItems": True}}}, "uniqueItems"),
        ({"properties": {"a": {"type": "string", "format": "nope"}}}, "Unknown format: nope"),
        ({"properties": {"a": {"$ref": "#/$defs/missing"}}}, "/$defs/missing"),
        (
            {
                "properties": {"a": {"type": "integer", "minimum": 5, "maximum": 1}},
                "required": ["a"],
            },
            "unsatisfiable",
        ),
    ],
)
def test_bad_grammars_name_the_problem(compiler, schema_or_regex, names):
    if isinstance(schema_or_regex, str):
        spec = GrammarSpec.regex(schema_or_regex)
    else:
        spec = GrammarSpec.json_schema({"type": "object", **schema_or_regex})
    assert names in _compile_error(compiler, spec)


def test_every_test_schema_compiles_and_is_cached(compiler):
    for schema in SCHEMAS.values():
        spec = GrammarSpec.json_schema(schema)
        assert compiler.compile(spec) is compiler.compile(GrammarSpec.json_schema(schema))
    assert compiler.compile(GrammarSpec.json_object()).spec.kind is GrammarKind.JSON_OBJECT


def test_cache_is_lru(tokenizer):
    small = GrammarCompiler(tokenizer.backend, [2], cache_size=2)
    a, b, c = (small.compile(GrammarSpec.regex(r)) for r in ("a", "b", "c"))
    assert small.compile(GrammarSpec.regex("c")) is c
    assert small.compile(GrammarSpec.regex("b")) is b
    assert small.compile(GrammarSpec.regex("a")) is not a  # evicted, compiled again


def test_for_tokenizer_needs_a_tokenizers_backend():
    assert GrammarCompiler.for_tokenizer(object()) is None


# ----------------------------------------------------------------------- matchers


def test_matcher_follows_generated_ids_and_rewinds(compiler, tokenizer):
    grammar = compiler.compile(GrammarSpec.json_schema(SCHEMAS["flat"]))
    doc = ids(tokenizer, '{"name": "Bo", "age": 7}')
    matcher = grammar.matcher()
    matcher.advance(doc[:3])
    matcher.advance(doc[:3])  # idempotent: a recomputed (preempted) request re-syncs freely
    assert matcher.num_consumed == 3 and not matcher.done
    matcher.advance(doc[:2])  # fewer ids than seen: rewind and replay
    assert matcher.num_consumed == 2 and matcher.error is None
    matcher.advance(doc)
    assert matcher.done and matcher.accepting and matcher.error is None
    assert not grammar.matcher().done  # every request starts fresh from the shared template


def test_regex_that_may_continue_is_accepting_but_not_done(compiler, tokenizer):
    matcher = compiler.compile(GrammarSpec.regex("a+")).matcher()
    matcher.advance(ids(tokenizer, "aa"))
    assert matcher.accepting and not matcher.done  # more "a"s or EOS may follow
    closed = compiler.compile(GrammarSpec.regex("(yes|no)")).matcher()
    closed.advance(ids(tokenizer, "yes"))
    assert closed.done


def test_twelve_optional_properties_compile(compiler, tokenizer):
    grammar = compiler.compile(GrammarSpec.json_schema(OPTIONAL_12))
    matcher = grammar.matcher()
    matcher.advance(ids(tokenizer, '{"role": "guest", "tags": ["x"], "notes": null}'))
    assert matcher.done and matcher.error is None


# ----------------------------------------------------------------------- the batched mask


def _request(rid: str, grammar=None, **params) -> Request:
    return Request(rid, [1, 2, 3], SamplingParams(grammar=grammar, **params))


def _allowed(compiler, spec: GrammarSpec, vocab: int) -> torch.Tensor:
    """The set of allowed ids at the start state, from the sampler's own mask step."""
    sampler = Sampler(vocab)
    request = _request("probe", compiler.compile(spec))
    sampler(torch.zeros(1, vocab), [request])
    scores = sampler._plan.pipeline(torch.zeros(1, vocab), [request])
    return torch.isfinite(scores[0])


@pytest.mark.parametrize("sample", [False, True])
def test_constrained_rows_never_pick_forbidden_tokens(compiler, tokenizer, sample):
    vocab = tokenizer.vocab_size + 64  # padded embedding rows past the tokenizer
    spec = GrammarSpec.regex("(yes|no|maybe)")
    allowed = _allowed(compiler, spec, vocab)
    assert not allowed[tokenizer.vocab_size :].any()
    assert 0 < int(allowed.sum()) < 50
    grammar = compiler.compile(spec)
    sampler = Sampler(vocab)
    params = {"do_sample": True, "seed": 5, "temperature": 1.5} if sample else {}
    for step in range(20):
        logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(step)) * 5
        logits[:, ~allowed] += 30.0  # every forbidden token is far more likely
        logits[:, -1] = 1e4  # and a padded row most of all
        requests = [_request(f"r{i}-{step}", grammar, **params) for i in range(4)]
        out = sampler(logits, requests)
        assert all(allowed[t] for t in out.token_ids), out.token_ids
        assert all(lp is not None and lp > -1e9 for lp in out.logprobs)


def test_unconstrained_rows_are_untouched(compiler):
    vocab = 49152
    grammar = compiler.compile(GrammarSpec.json_schema(SCHEMAS["enums"]))
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(0))
    plain = [_request(f"p{i}", top_n_tokens=2) for i in range(3)]
    alone = Sampler(vocab)(logits[:3].clone(), plain)
    mixed_requests = [plain[0], _request("g0", grammar), plain[1], _request("g1", grammar)]
    mixed_requests.append(plain[2])
    rows = torch.stack([logits[0], logits[3], logits[1], logits[4], logits[2]])
    mixed = Sampler(vocab)(rows, mixed_requests)
    assert [mixed.token_ids[i] for i in (0, 2, 4)] == alone.token_ids
    assert [mixed.top_tokens[i] for i in (0, 2, 4)] == alone.top_tokens
    assert [mixed.logprobs[i] for i in (0, 2, 4)] == alone.logprobs


def test_a_matcher_with_nothing_allowed_may_still_end(compiler, tokenizer):
    grammar = compiler.compile(GrammarSpec.regex("(yes|no)"))
    request = _request("r", grammar)
    request.append_output_token(ids(tokenizer, "zzz")[0])  # not allowed: the matcher fails
    out = Sampler(tokenizer.vocab_size)(torch.randn(1, tokenizer.vocab_size), [request])
    assert out.token_ids == [2]  # EOS, never a sample from an all -inf row


def test_release_forgets_the_matcher_and_the_plan(compiler, tokenizer):
    vocab = tokenizer.vocab_size
    sampler = Sampler(vocab)
    sampler(torch.zeros(1, vocab), [_request("r")])  # an unconstrained "r" ...
    sampler.release("r")
    request = _request("r", compiler.compile(GrammarSpec.regex("(yes|no)")))
    logits = torch.zeros(1, vocab)
    logits[0, ids(tokenizer, "maybe")[0]] = 100.0
    out = sampler(logits, [request])  # ... then a constrained one with the same id
    assert tokenizer.decode(out.token_ids) in ("yes", "no", "y", "n")
    assert sampler.grammars.matcher(request) is sampler.grammars.matcher(request)
    sampler.release("r")
    assert not sampler.grammars._matchers


# ----------------------------------------------------------------------- stopping


def test_stop_checker_grammar_done_after_length_and_eos():
    stop = StopChecker(StoppingParams(max_new_tokens=3), [2])
    assert stop(5, "a", grammar_done=False) is None
    assert stop(2, "", grammar_done=True) is FinishReason.EOS_TOKEN
    stop = StopChecker(StoppingParams(max_new_tokens=2, stop_sequences=["x"]), [2])
    assert stop(5, "a", grammar_done=True) is FinishReason.STOP_SEQUENCE
    assert stop.stop_sequence is None
    stop = StopChecker(StoppingParams(max_new_tokens=1), [2])
    assert stop(5, "a", grammar_done=True) is FinishReason.LENGTH
