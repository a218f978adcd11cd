"""The project's own Prometheus metrics, fed by a Batcher's observer hook.

BentoML serves every metric of the process on `/metrics` (multiprocess mode: each worker writes to
the directory in PROMETHEUS_MULTIPROC_DIR, which BentoML sets when a worker starts). So
prometheus_client is imported here only when a service starts, never at import time: imported
earlier, it would settle into single-process mode and its metrics would never reach `/metrics`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Items per forward pass or per queue round; seconds a request waits or a round computes.
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Token positions computed per real token in one forward pass (1.0 = no padding, as the packed Qwen3 path).
PADDING_BUCKETS = (1.0, 1.05, 1.1, 1.25, 1.5, 2, 3, 5, 10, 20)

_METRICS: dict[str, Any] = {}


def _metrics() -> dict[str, Any]:
    """The metric objects, created once per process (a registry refuses the same name twice)."""
    if not _METRICS:
        from prometheus_client import Counter, Histogram

        _METRICS.update(
            items=Counter(
                "embed_items", "Inputs through the model: texts, (query, document) pairs, images", ["service", "item"]
            ),
            tokens=Counter("embed_tokens", "Real tokens the model read (padding not counted)", ["service"]),
            padded_tokens=Counter(
                "embed_padded_tokens",
                "Token positions the model computed, padding included (padded / real = padding overhead)",
                ["service"],
            ),
            padding_ratio=Histogram(
                "embed_padding_ratio",
                "Per forward pass over text: token positions computed / real tokens",
                ["service"],
                buckets=PADDING_BUCKETS,
            ),
            forward_batch=Histogram(
                "embed_forward_batch_size",
                "Inputs per forward pass (micro-batch)",
                ["service", "item"],
                buckets=SIZE_BUCKETS,
            ),
            round_batch=Histogram(
                "embed_queue_batch_size", "Inputs taken from the queue in one round", ["service"], buckets=SIZE_BUCKETS
            ),
            queued=Histogram(
                "embed_queue_seconds",
                "Time a request waited in the queue before the model took it",
                ["service"],
                buckets=SECONDS_BUCKETS,
            ),
            computed=Histogram(
                "embed_compute_seconds", "Time the model spent on one queue round", ["service"], buckets=SECONDS_BUCKETS
            ),
        )
    return _METRICS


class PrometheusBatchMetrics:
    """A BatchObserver that records into the metrics above, labelled with the service's seed name."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.metrics = _metrics()

    def round_done(self, items: int, queued_seconds: Sequence[float], compute_seconds: float) -> None:
        metrics, service = self.metrics, self.service
        metrics["round_batch"].labels(service).observe(items)
        for seconds in queued_seconds:
            metrics["queued"].labels(service).observe(seconds)
        metrics["computed"].labels(service).observe(compute_seconds)

    def forward_done(self, kind: str, items: int, tokens: int, padded_tokens: int) -> None:
        metrics, service = self.metrics, self.service
        metrics["items"].labels(service, kind).inc(items)
        metrics["forward_batch"].labels(service, kind).observe(items)
        if tokens:
            metrics["tokens"].labels(service).inc(tokens)
            metrics["padded_tokens"].labels(service).inc(padded_tokens)
            metrics["padding_ratio"].labels(service).observe(padded_tokens / tokens)
