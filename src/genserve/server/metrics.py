"""Prometheus metrics under TGI's names and types (reference section 3).

TGI's exporter writes counters without prometheus_client's `_total` suffix
(`tgi_request_count 3`), so counters are rendered here by hand; histograms and gauges go through
prometheus_client with TGI's buckets. Each app gets its own registry (tests run several apps in
one process).
"""

from __future__ import annotations

from collections import defaultdict

from prometheus_client import (
    CollectorRegistry,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# names ending in `duration`: 35 geometric buckets 0.0001 * 1.5^k, k = 1..35
DURATION_BUCKETS = tuple(0.0001 * 1.5**k for k in range(1, 36))

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _linear(top: int) -> tuple[float, ...]:
    step = max(top, 100) / 100
    return tuple(step * k for k in range(1, 101))


class _Counter:
    """A counter with optional labels, rendered in TGI's form (no `_total`)."""

    def __init__(self, name: str, doc: str) -> None:
        self.name = name
        self.doc = doc
        self.values: dict[tuple[tuple[str, str], ...], float] = defaultdict(float)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        self.values[tuple(sorted(labels.items()))] += amount

    def get(self, **labels: str) -> float:
        return self.values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> str:
        lines = [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} counter"]
        if not self.values:
            lines.append(f"{self.name} 0")
        for labels, value in sorted(self.values.items()):
            label_text = ",".join(f'{k}="{v}"' for k, v in labels)
            suffix = "{" + label_text + "}" if label_text else ""
            lines.append(f"{self.name}{suffix} {value:g}")
        return "\n".join(lines) + "\n"


class ServerMetrics:
    def __init__(self, max_input_tokens: int, max_total_tokens: int) -> None:
        disable_created_metrics()  # TGI exports no `_created` series
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.request_count = _Counter("tgi_request_count", "Requests received")
        self.request_success = _Counter("tgi_request_success", "Requests that succeeded")
        self.request_failure = _Counter("tgi_request_failure", "Requests that failed, by error")
        self.counters = (self.request_count, self.request_success, self.request_failure)

        def duration(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, registry=reg, buckets=DURATION_BUCKETS)

        self.request_duration = duration("tgi_request_duration", "End-to-end request time (s)")
        self.validation_duration = duration("tgi_request_validation_duration", "Validation (s)")
        self.queue_duration = duration("tgi_request_queue_duration", "Time in the queue (s)")
        self.inference_duration = duration("tgi_request_inference_duration", "Inference (s)")
        self.time_per_token = duration(
            "tgi_request_mean_time_per_token_duration", "Mean time per generated token (s)"
        )
        self.generated_tokens = Histogram(
            "tgi_request_generated_tokens",
            "Generated tokens per request",
            registry=reg,
            buckets=_linear(max_total_tokens),
        )
        self.input_length = Histogram(
            "tgi_request_input_length",
            "Input tokens per request",
            registry=reg,
            buckets=_linear(max_input_tokens),
        )
        self.max_new_tokens = Histogram(
            "tgi_request_max_new_tokens",
            "max_new_tokens per request (TGI's first chunk)",
            registry=reg,
            buckets=_linear(max_total_tokens),
        )
        self.queue_size = Gauge("tgi_queue_size", "Requests waiting", registry=reg)
        self.batch_size = Gauge("tgi_batch_current_size", "Requests running", registry=reg)
        self.batch_max_total_tokens = Gauge(
            "tgi_batch_max_total_tokens", "KV cache capacity in tokens", registry=reg
        )
        self.ttft = duration(
            "genserve_request_time_to_first_token_duration", "Time to first token (s)"
        )
        self.itl = duration("genserve_request_inter_token_latency_duration", "Between tokens (s)")

    def failure(self, label: str | None) -> None:
        if label is not None:
            self.request_failure.inc(err=label)

    def render(self) -> bytes:
        text = "".join(c.render() for c in self.counters)
        return text.encode() + generate_latest(self.registry)
