"""Property tests on the HTTP edge: body parsing and validation never raise anything but their
typed errors, and what they accept respects every limit (TGI's order of checks kept)."""

from __future__ import annotations

import json
import math

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from genserve.server.body import parse_json
from genserve.server.errors import RequestBodyError, ValidationError
from genserve.server.protocol import GenerateRequest
from genserve.server.validation import ValidationLimits, Validator

LIMITS = ValidationLimits(
    max_best_of=2,
    max_stop_sequences=4,
    max_top_n_tokens=5,
    max_input_tokens=63,
    max_total_tokens=64,
    kv_capacity_tokens=48,
)
VALIDATOR = Validator(LIMITS, lambda text, special: [1] * len(text.split()), workers=1)
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))

edge_floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1.0, 1e-45, 2.0, -2.0, 2.0000001, 0.9999999, 1e38]),
)
edge_ints = st.one_of(
    st.integers(min_value=-(2**65), max_value=2**65),
    st.sampled_from([0, 1, 2, 3, 5, 6, 47, 48, 63, 64, 65, 2**31, 2**32, 2**64]),
)
maybe = lambda s: st.one_of(st.none(), s)  # noqa: E731

parameters = st.fixed_dictionaries(
    {},
    optional={
        "best_of": maybe(edge_ints),
        "temperature": maybe(edge_floats),
        "repetition_penalty": maybe(edge_floats),
        "frequency_penalty": maybe(edge_floats),
        "top_k": maybe(edge_ints),
        "top_p": maybe(edge_floats),
        "typical_p": maybe(edge_floats),
        "do_sample": st.booleans(),
        "max_new_tokens": maybe(edge_ints),
        "stop": st.lists(st.text(max_size=5), max_size=6),
        "seed": maybe(edge_ints),
        "top_n_tokens": maybe(edge_ints),
        "truncate": maybe(edge_ints),
        "details": st.booleans(),
        "watermark": st.booleans(),
    },
)
requests = st.fixed_dictionaries(
    {"inputs": st.text(alphabet="ab ", max_size=200)}, optional={"parameters": parameters}
)


def _body(obj: dict) -> str:
    return json.dumps(obj)  # NaN / Infinity become the non-JSON literals clients might send


def _parse(obj: dict) -> GenerateRequest | None:
    try:
        return parse_json(_body(obj), GenerateRequest)
    except RequestBodyError as err:
        assert err.status in (400, 422)
        event(f"body error {err.status}")
        return None


@SETTINGS
@given(requests)
def test_accepted_requests_respect_every_limit(obj):
    req = _parse(obj)
    if req is None:
        return
    p = req.parameters
    try:
        checked = VALIDATOR.check_parameters(p, req.inputs)
        ids = list(range(len(req.inputs.split())))
        input_ids, chunk, max_new = VALIDATOR.check_lengths(ids, checked.truncate, p.max_new_tokens)
    except ValidationError as err:
        assert err.status == 422 and err.message.startswith("Input validation error: ")
        event("rejected by validation")
        return
    event("accepted")
    s = checked.sampling
    assert all(math.isfinite(x) for x in (s.temperature, s.repetition_penalty, s.top_p))
    assert s.temperature > 0 and s.repetition_penalty > 0 and -2 <= s.frequency_penalty <= 2
    assert 0 < s.top_p <= 1 and 0 < s.typical_p <= 1 and s.top_k >= 0
    assert 0 <= s.top_n_tokens <= LIMITS.max_top_n_tokens
    assert 0 <= s.seed < 2**64
    assert len(p.stop) <= LIMITS.max_stop_sequences
    assert checked.best_of <= 1 or s.sampling  # TGI: best_of 0 is served as 1
    assert 1 <= len(input_ids) <= LIMITS.max_input_tokens
    assert input_ids == ids[len(ids) - len(input_ids) :]  # truncation keeps the last tokens
    assert max_new >= 1 and chunk <= LIMITS.max_total_tokens
    assert len(input_ids) + max_new <= min(LIMITS.max_total_tokens, LIMITS.kv_capacity_tokens)


def _first_tgi_error(p: dict) -> str | None:
    """An oracle for the first few checks of `Validation::validate`, in TGI's order."""
    sampling = any(p.get(k) is not None for k in ("temperature", "top_k", "top_p", "typical_p"))
    if (p.get("best_of") or 1) > 1 and not (p.get("do_sample") or sampling):
        return "you must use sampling when `best_of` is > 1"
    t = p.get("temperature")
    if t is not None and not t > 0:
        return "`temperature` must be strictly positive"
    r = p.get("repetition_penalty")
    if r is not None and not r > 0:
        return "`repetition_penalty` must be strictly positive"
    f = p.get("frequency_penalty")
    if f is not None and not -2 <= f <= 2:
        return "`frequency_penalty` must be >= -2.0 and <= 2.0"
    return None


small_finite = st.floats(min_value=-3, max_value=3, allow_nan=False)


@SETTINGS
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "best_of": st.integers(1, 2),
            "do_sample": st.booleans(),
            "temperature": small_finite,
            "repetition_penalty": small_finite,
            "frequency_penalty": small_finite,
        },
    )
)
def test_check_order_is_tgis(params):
    req = parse_json(_body({"inputs": "a b", "parameters": params}), GenerateRequest)
    expected = _first_tgi_error(params)
    try:
        VALIDATOR.check_parameters(req.parameters, req.inputs)
        got = None
    except ValidationError as err:
        got = err.reason
    if expected is not None:
        assert got == expected
    else:
        assert got is None or not got.startswith(("you must", "`temperature`", "`repetition"))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)


@SETTINGS
@given(st.one_of(st.binary(max_size=300), json_values.map(_body).map(str.encode)))
def test_any_body_is_a_request_or_a_typed_error(raw):
    try:
        parse_json(raw, GenerateRequest)
    except RequestBodyError as err:
        assert err.status in (400, 422)
        assert "Traceback" not in err.message
