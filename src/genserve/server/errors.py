"""TGI's `InferError`: each kind has an HTTP status, an `error_type` and a metrics label."""

from __future__ import annotations

from typing import Any


class InferError(Exception):
    status: int = 500
    error_type: str = "unknown"
    metric_label: str | None = None  # `tgi_request_failure{err=...}`; None = not counted

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, Any]:
        return {"error": self.message, "error_type": self.error_type}


class ValidationError(InferError):
    """A request TGI's `Validation` rejects. `reason` is TGI's `ValidationError` text."""

    status = 422
    error_type = "validation"
    metric_label = "validation"

    def __init__(self, reason: str) -> None:
        super().__init__(f"Input validation error: {reason}")
        self.reason = reason


class ToolError(InferError):
    """TGI's `InferError::ToolError`: 422 `{"error": "Tool error: ...", "error_type": "tool_error"}`."""

    status = 422
    error_type = "tool_error"
    metric_label = "tool_error"

    def __init__(self, reason: str) -> None:
        super().__init__(f"Tool error: {reason}")


class OverloadedError(InferError):
    status = 429
    error_type = "overloaded"
    metric_label = "overloaded"

    def __init__(self) -> None:
        super().__init__("Model is overloaded")


class GenerationError(InferError):
    status = 424
    error_type = "generation"
    metric_label = "generation"

    def __init__(self, reason: str) -> None:
        super().__init__(f"Request failed during generation: {reason}")


class IncompleteGenerationError(InferError):
    status = 500
    error_type = "incomplete_generation"
    metric_label = "incomplete"

    def __init__(self) -> None:
        super().__init__("Incomplete generation")


class IncompleteGenerationStreamError(InferError):
    status = 500
    error_type = "incomplete_generation_stream"
    metric_label = "incomplete"

    def __init__(self) -> None:
        super().__init__("Incomplete generation stream")


class RequestBodyError(InferError):
    """The body is not the JSON the route expects (axum's `Json` rejection in TGI).

    TGI answers these in plain text; we keep TGI's statuses (400 malformed JSON, 415 missing
    content type, 422 wrong shape, 413 too large) and wrap axum's wording in the usual JSON
    error shape so every client can parse it.
    """

    error_type = "validation"
    metric_label = None

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class TemplateError(InferError):
    """The chat template failed (or there is none): TGI's `InferError::TemplateError`."""

    status = 422
    error_type = "template_error"
    metric_label = "template"

    def __init__(self, reason: str) -> None:
        super().__init__(f"Template error: {reason}")
        self.reason = reason
