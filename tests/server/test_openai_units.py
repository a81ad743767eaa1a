"""Units of the OpenAI layer that need no server: stop trimming in streams, the mapping to TGI's
parameters, OpenAI's extras, per-choice seeds."""

from __future__ import annotations

import pytest

from genserve.sampling.params import SamplingParams, StoppingParams
from genserve.server.errors import ValidationError
from genserve.server.openai_request import choices_of, extras_of, generate_parameters
from genserve.server.openai_run import StopTrimmer, trim_stop
from genserve.server.protocol_openai import ChatRequest, CompletionRequest
from genserve.server.validation import ValidRequest


def stream(pieces: list[str], stops: list[str]) -> str:
    trimmer = StopTrimmer(stops)
    out = "".join(trimmer.push(p) for p in pieces)
    return out + trimmer.flush()


@pytest.mark.parametrize(
    ("pieces", "stops", "expected"),
    [
        (["Hello", " wor", "ld"], ["world"], "Hello "),
        (["a", "b", "c"], ["bd"], "abc"),  # a held-back prefix that is not a stop comes out
        (["x<", "/s", ">y"], ["</s>"], "x"),
        (["abc"], [], "abc"),
        (["no stop here"], ["zz", ""], "no stop here"),
        (["ab", "cab", "d"], ["cabd", "b"], "a"),  # the earliest stop wins
    ],
)
def test_stop_trimmer(pieces, stops, expected):
    assert stream(pieces, stops) == expected
    assert trim_stop("".join(pieces), stops, "stop_sequence") == expected
    assert trim_stop("".join(pieces), stops, "length") == "".join(pieces)


def test_held_back_text_waits():
    trimmer = StopTrimmer(["STOP"])
    assert trimmer.push("abST") == "ab"
    assert trimmer.push("X") == "STX"


def chat(**kw) -> ChatRequest:
    return ChatRequest.model_validate({"messages": [{"role": "user", "content": "x"}], **kw})


def test_generate_parameters():
    greedy = generate_parameters(chat(temperature=0, top_p=0.5), 7, None)
    assert (greedy.do_sample, greedy.temperature, greedy.top_p) == (False, None, None)
    assert greedy.max_new_tokens == 7 and greedy.details
    assert not generate_parameters(chat(top_p=0.0), None, None).do_sample
    sampled = generate_parameters(chat(top_p=1.0, stop="x"), None, 2)
    assert (sampled.do_sample, sampled.top_p, sampled.stop, sampled.top_n_tokens) == (
        True,
        None,
        ["x"],
        2,
    )
    assert chat(max_tokens=3, max_completion_tokens=5).max_new_tokens == 5


def test_extras_and_their_errors():
    extras = extras_of(chat(n=2, presence_penalty=1.5, logit_bias={"5": -100}), 10)
    assert (extras.n, extras.presence_penalty, extras.logit_bias) == (2, 1.5, {5: -100.0})
    for bad, match in [
        (dict(n=0), "`n` must be strictly positive"),
        (dict(presence_penalty=-2.5), "`presence_penalty`"),
        (dict(logit_bias={"x": 1}), "keys must be token ids"),
        (dict(logit_bias={"10": 1}), "must be >= 0 and < 10"),
        (dict(logit_bias={"1": 101}), "values must be >= -100"),
        (dict(top_p=1.5), "`top_p` must be >= 0.0 and <= 1.0"),
    ]:
        with pytest.raises(ValidationError, match=match):
            extras_of(chat(**bad), 10)
    prompt = CompletionRequest.model_validate({"prompt": "a"})
    assert prompt.prompt == ["a"]


def test_choices_get_derived_seeds_and_openai_penalties():
    valid = ValidRequest(
        inputs="x", input_ids=[1], input_length=1,
        sampling=SamplingParams(do_sample=True, seed=2**64 - 1, frequency_penalty=0.5),
        stopping=StoppingParams(), best_of=1, details=True, decoder_input_details=False,
        return_full_text=False, top_n_tokens=0, adapter_id=None, max_new_tokens_chunk=1,
    )  # fmt: skip
    extras = extras_of(chat(n=3, presence_penalty=0.25, logit_bias={"3": 2}), 10)
    seeded = choices_of(valid, extras, seeded=True)
    assert [c.sampling.seed for c in seeded] == [2**64 - 1, 0, 1]
    assert all(c.sampling.openai_penalties and c.sampling.presence_penalty == 0.25 for c in seeded)
    assert all(c.sampling.logit_bias == {3: 2.0} for c in seeded)
    unseeded = choices_of(valid, extras, seeded=False)
    assert len({c.sampling.seed for c in unseeded}) == 3
    assert valid.sampling.presence_penalty == 0.0  # the validated request is left alone
