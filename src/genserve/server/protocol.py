"""Pydantic models that mirror TGI's JSON (`router/src/lib.rs`) field for field.

Request models are strict, like serde: a string where a number is expected, a float where an
integer is expected, or `null` for a non-nullable field is a deserialization error, not a
coercion. Unknown fields are ignored, as serde does by default.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

U32 = Annotated[int, Field(ge=0, le=2**32 - 1)]
U64 = Annotated[int, Field(ge=0, le=2**64 - 1)]
I32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
USize = Annotated[int, Field(ge=0, le=2**64 - 1)]

FinishReasonStr = Literal["length", "eos_token", "stop_sequence"]


class _Request(BaseModel):
    # serde_json has no NaN/Infinity: a non-finite number is a body error, never a parameter
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class GrammarType(_Request):
    """`{"type": "json"|"json_object"|"json_schema"|"regex", "value": ...}`."""

    type: Literal["json", "json_object", "json_schema", "regex"]
    value: Any

    @model_validator(mode="after")
    def _serde_shape(self) -> GrammarType:
        """What serde refuses while deserializing: a non-string regex, a `json_schema` value
        that is not `{"name"?, "schema", "strict"?}`."""
        if self.type == "regex" and not isinstance(self.value, str):
            raise ValueError("invalid type for `regex`: expected a string")
        if self.type == "json_schema":
            value = self.value
            if not isinstance(value, dict) or "schema" not in value:
                raise ValueError("missing field `schema`")
            if not isinstance(value.get("name", ""), str | None):
                raise ValueError("invalid type for `name`: expected a string")
        return self


class GenerateParameters(_Request):
    """Every field has serde's default: present-but-omitted means the default below."""

    adapter_id: str | None = None
    best_of: USize | None = None
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    frequency_penalty: float | None = None
    grammar: GrammarType | None = None
    max_new_tokens: U32 | None = None
    repetition_penalty: float | None = None
    return_full_text: bool | None = None
    seed: U64 | None = None
    stop: list[str] = Field(default_factory=list)
    temperature: float | None = None
    top_k: I32 | None = None
    top_n_tokens: U32 | None = None
    top_p: float | None = None
    truncate: USize | None = None
    typical_p: float | None = None
    watermark: bool = False


def default_parameters() -> GenerateParameters:
    """TGI's `default_parameters()`: used when the `parameters` object is absent (it samples)."""
    return GenerateParameters(do_sample=True, max_new_tokens=None, details=False)


class GenerateRequest(_Request):
    inputs: str
    parameters: GenerateParameters = Field(default_factory=default_parameters)


class CompatGenerateRequest(GenerateRequest):
    stream: bool = False


class GenerateVertexInstance(_Request):
    inputs: str
    parameters: GenerateParameters | None = None


class VertexRequest(_Request):
    instances: list[GenerateVertexInstance]


class VertexResponse(BaseModel):
    predictions: list[str]


# --- responses -------------------------------------------------------------------------------


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None
    special: bool


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None


class SimpleToken(BaseModel):
    id: int
    text: str
    start: int
    stop: int


class BestOfSequence(BaseModel):
    generated_text: str
    finish_reason: FinishReasonStr
    generated_tokens: int
    seed: int | None = None
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] | None = None


class Details(BaseModel):
    finish_reason: FinishReasonStr
    generated_tokens: int
    seed: int | None = None
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] | None = None
    best_of_sequences: list[BestOfSequence] | None = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: FinishReasonStr
    generated_tokens: int
    seed: int | None = None
    input_length: int


class StreamResponse(BaseModel):
    index: int
    token: Token
    top_tokens: list[Token] | None = None
    generated_text: str | None = None
    details: StreamDetails | None = None


class ErrorResponse(BaseModel):
    error: str
    error_type: str


class Info(BaseModel):
    model_id: str
    model_sha: str | None = None
    model_pipeline_tag: str | None = None
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_tokens: int
    max_total_tokens: int
    validation_workers: int
    max_client_batch_size: int
    router: str = "text-generation-router"
    version: str
    sha: str | None = None
    docker_label: str | None = None


def dump(model: BaseModel) -> dict[str, Any]:
    """Serialize the way serde does: `top_tokens` and `best_of_sequences` are skipped when None
    (`skip_serializing_if`), and so is a GenerateResponse's `details` (a stream event keeps its
    `"details": null`); every other None stays as `null`."""
    data = model.model_dump(mode="json")
    _drop_skipped(data)
    if isinstance(model, GenerateResponse) and data.get("details") is None:
        data.pop("details", None)
    return data


_SKIP_IF_NONE = ("top_tokens", "best_of_sequences")


def _drop_skipped(obj: Any) -> None:
    if isinstance(obj, dict):
        for key in _SKIP_IF_NONE:
            if key in obj and obj[key] is None:
                del obj[key]
        for value in obj.values():
            _drop_skipped(value)
    elif isinstance(obj, list):
        for value in obj:
            _drop_skipped(value)
