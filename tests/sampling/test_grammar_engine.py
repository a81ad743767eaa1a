"""Constrained generation end to end through `LLMEngine`: every output of 20 JSON schemas
(tiny random model, sampled) parses and validates, regex outputs fullmatch, the real SmolLM2
follows schemas from a realistic prompt, unconstrained rows of a mixed batch keep their greedy
tokens, and preemption by recompute changes no constrained output."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from grammar_schemas import REGEXES, SCHEMAS

from genserve.config import CacheConfig, SchedulerConfig
from genserve.engine.llm_engine import LLMEngine
from genserve.engine.request import FinishReason, Request, TokenEvent
from genserve.sampling.grammar import CompiledGrammar, GrammarCompiler
from genserve.sampling.grammar_spec import GrammarSpec
from genserve.sampling.params import SamplingParams, StoppingParams

MAX_NEW = 256  # far more than any test schema needs to close
TOKENS: dict[str, list[int]] = {}  # generated ids by request id, filled by `run`


def make_engine(model_dir, num_blocks=1024, block_size=16) -> LLMEngine:
    return LLMEngine.from_model(
        str(model_dir),
        dtype="float32",
        cache_config=CacheConfig(block_size=block_size, num_blocks=num_blocks),
        scheduler_config=SchedulerConfig(max_num_batched_tokens=2048, max_num_seqs=128),
    )


def run(engine: LLMEngine, requests: list[Request]) -> dict[str, TokenEvent]:
    """Final events by request id; `TOKENS[request_id]`: every generated id."""
    for r in requests:
        engine.add_request(r)
    finals: dict[str, TokenEvent] = {}
    ids = TOKENS
    for r in requests:
        ids[r.request_id] = []
    while engine.has_unfinished():
        for ev in engine.step():
            assert ev.error is None, ev.error
            ids[ev.request_id].append(ev.token_id)
            if ev.finished:
                finals[ev.request_id] = ev
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_usable_blocks, "blocks leaked"
    assert not engine.sampler.grammars._matchers, "matchers leaked"
    return finals


def constrained(
    rid: str, prompt: list[int], grammar: CompiledGrammar, seed: int, max_new: int = MAX_NEW
) -> Request:
    params = SamplingParams(do_sample=True, seed=seed, grammar=grammar)
    return Request(rid, prompt, params, StoppingParams(max_new_tokens=max_new))


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir) -> tuple[LLMEngine, GrammarCompiler]:
    engine = make_engine(tiny_llama_dir)
    compiler = GrammarCompiler.for_tokenizer(engine.tokenizer, engine.eos_token_ids)
    assert compiler is not None
    return engine, compiler


@pytest.fixture(scope="module")
def tiny_outputs(tiny) -> dict[str, TokenEvent]:
    """One batch: 20 schemas x 3 seeds and 5 regexes x 2 seeds, all sampled."""
    engine, compiler = tiny
    prompt = engine.tokenizer.encode("Give me some JSON:")
    requests = []
    for name, schema in SCHEMAS.items():
        grammar = compiler.compile(GrammarSpec.json_schema(schema))
        requests += [constrained(f"json/{name}/{s}", prompt, grammar, s) for s in range(3)]
    for name, pattern in REGEXES.items():
        grammar = compiler.compile(GrammarSpec.regex(pattern))
        requests += [constrained(f"regex/{name}/{s}", prompt, grammar, s) for s in range(2)]
    return run(engine, requests)


def _check_json(finals: dict[str, TokenEvent], rid: str, schema: dict) -> dict:
    event = finals[rid]
    assert event.finish_reason == FinishReason.STOP_SEQUENCE, (rid, event.generated_text)
    doc = json.loads(event.generated_text)
    jsonschema.validate(doc, schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    return doc


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schemas_on_tiny_model(tiny_outputs, name):
    for seed in range(3):
        _check_json(tiny_outputs, f"json/{name}/{seed}", SCHEMAS[name])


@pytest.mark.parametrize("name", list(REGEXES))
def test_regexes_fullmatch(tiny_outputs, name):
    for seed in range(2):
        event = tiny_outputs[f"regex/{name}/{seed}"]
        assert re.fullmatch(REGEXES[name], event.generated_text), event.generated_text
        assert event.finish_reason in (FinishReason.STOP_SEQUENCE, FinishReason.EOS_TOKEN)


def test_mixed_batch_keeps_unconstrained_greedy_tokens(tiny):
    engine, compiler = tiny
    tok = engine.tokenizer

    def plain(i: int) -> Request:
        prompt = tok.encode(f"Story number {i}:")
        return Request(f"plain{i}", prompt, SamplingParams(), StoppingParams(24, ignore_eos=True))

    alone = run(engine, [plain(i) for i in range(4)])
    alone_ids = {f"plain{i}": TOKENS.pop(f"plain{i}") for i in range(4)}
    grammar = compiler.compile(GrammarSpec.json_schema(SCHEMAS["nested_object"]))
    prompt = tok.encode("JSON:")
    mixed = [plain(i) for i in range(4)]
    mixed += [constrained(f"g{s}", prompt, grammar, s) for s in range(3)]
    greedy = SamplingParams(grammar=grammar)  # a greedy constrained row too
    mixed.append(Request("g-greedy", prompt, greedy, StoppingParams(max_new_tokens=MAX_NEW)))
    together = run(engine, mixed)
    assert set(together) >= set(alone)
    for i in range(4):
        assert TOKENS[f"plain{i}"] == alone_ids[f"plain{i}"]
    _check_json(together, "g-greedy", SCHEMAS["nested_object"])


def test_preemption_keeps_constrained_outputs(tiny_llama_dir, tiny, record_preemptions):
    """Requests recomputed after preemption keep their generated ids; their matchers stay in
    step, so every output is the one an unpreempted run gives."""
    _, compiler = tiny
    big_engine = make_engine(tiny_llama_dir)
    grammar = compiler.compile(GrammarSpec.json_schema(SCHEMAS["array_of_objects"]))
    prompt = big_engine.tokenizer.encode("Some items as JSON, please:")

    def batch() -> list[Request]:
        return [constrained(f"p{s}", prompt, grammar, s, max_new=120) for s in range(8)]

    big = run(big_engine, batch())
    big_ids = {f"p{s}": TOKENS.pop(f"p{s}") for s in range(8)}
    small_engine = make_engine(tiny_llama_dir, num_blocks=40, block_size=4)
    preempted = record_preemptions(small_engine)
    small = run(small_engine, batch())
    assert preempted, "the test cache was meant to force preemption"
    for s in range(8):
        assert TOKENS[f"p{s}"] == big_ids[f"p{s}"]
        assert small[f"p{s}"].generated_text == big[f"p{s}"].generated_text
        _check_json(small, f"p{s}", SCHEMAS["array_of_objects"])


REAL_PROMPTS = {
    "flat": "Extract the person as JSON. Text: Maria Lopez is 34 years old.",
    "enums": "A ticket is waiting for review, it is urgent (priority 1) and tagged red. "
    "Describe its status, priority and color as JSON.",
    "refs_defs": "A line goes from (1, 2) to (10, -3). Give its start and end points as JSON.",
    "array_of_objects": "Order: 2 of ABC123 and 5 of XYZ789. List the items as JSON.",
    "optional_12": "User 17 is Ann, an admin from Oslo, Norway (NO). Describe her as JSON.",
}


def test_smollm2_follows_schemas(smollm2_dir):
    torch.manual_seed(0)
    engine = make_engine(smollm2_dir, num_blocks=512)
    compiler = GrammarCompiler.for_tokenizer(engine.tokenizer, engine.eos_token_ids)
    requests = []
    for name, text in REAL_PROMPTS.items():
        grammar = compiler.compile(GrammarSpec.json_schema(SCHEMAS[name]))
        messages = [{"role": "user", "content": text}]
        prompt = engine.tokenizer.encode(_chat(engine, messages), add_special_tokens=False)
        for s in range(2):
            params = SamplingParams(do_sample=True, temperature=0.7, seed=s, grammar=grammar)
            requests.append(Request(f"{name}/{s}", prompt, params, StoppingParams(MAX_NEW)))
    finals = run(engine, requests)
    docs = {rid: _check_json(finals, rid, SCHEMAS[rid.split("/")[0]]) for rid in finals}
    assert any(d["name"].startswith("Maria") for r, d in docs.items() if r.startswith("flat"))


def _chat(engine: LLMEngine, messages: list[dict]) -> str:
    from genserve.tokenization.chat_template import ChatTemplate

    template = ChatTemplate.from_tokenizer(engine.tokenizer)
    return template.render(messages, add_generation_prompt=True)
