"""The reward server's metrics: per-reward counters kept as plain state that adds up over replicas, and two
views of it, JSON (``GET /metrics/json``) and Prometheus' text format (``GET /metrics``).

A :class:`BatcherMetrics` counts what one batcher did; :meth:`BatcherMetrics.state` is a plain dict (counters,
gauges, maxima, histogram buckets, recent latencies) that :func:`merge` adds up over the replicas of a reward
(one on the single-process server, any number on Ray Serve). :func:`json_view` and :func:`prometheus_text`
render the merged state; nothing is computed twice.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: upper bounds of the request latency histogram (seconds from arrival at the batcher to the answer)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
#: upper bounds of the batch size histogram (samples per scoring call)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
#: how many recent latencies each replica keeps for the JSON view's percentiles
RECENT_LATENCIES = 2048

COUNTERS = (
    "requests",
    "samples",
    "failed_requests",
    "batches",
    "rejected_overloaded",
    "dropped_abandoned",
    "deadline_exceeded",
    "compute_seconds",
)
GAUGES = ("queue_depth",)
MAXIMA = ("batch_samples_max", "batch_requests_max")
HISTOGRAMS = {"latency_seconds": LATENCY_BUCKETS, "batch_samples": BATCH_BUCKETS}


@dataclass
class Histogram:
    """Counts of observations per bucket (the last bucket is +Inf) and their sum."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = self.counts or [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def state(self) -> dict[str, Any]:
        return {"counts": list(self.counts), "sum": self.total}


@dataclass
class BatcherMetrics:
    """What one batcher did (see the module docstring)."""

    requests: int = 0
    samples: int = 0
    failed_requests: int = 0
    batches: int = 0
    batch_samples_max: int = 0
    batch_requests_max: int = 0
    queue_depth: int = 0
    rejected_overloaded: int = 0
    dropped_abandoned: int = 0
    deadline_exceeded: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_LATENCIES))
    compute_seconds: float = 0.0
    latency_histogram: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    batch_histogram: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))

    def count(self, key: str, n: int) -> None:
        if n:
            self.counts[key] = self.counts.get(key, 0) + n

    def observe_batch(self, samples: int, latencies: Iterable[float]) -> None:
        self.batch_histogram.observe(samples)
        for seconds in latencies:
            self.latencies.append(seconds)
            self.latency_histogram.observe(seconds)

    def state(self) -> dict[str, Any]:
        """Plain, summable state (:func:`merge`)."""
        return {
            **{key: getattr(self, key) for key in (*COUNTERS, *GAUGES, *MAXIMA)},
            "counts": dict(self.counts),
            "latency_seconds": self.latency_histogram.state(),
            "batch_samples": self.batch_histogram.state(),
            "recent_latencies": list(self.latencies),
            "replicas": 1,
        }

    def snapshot(self) -> dict[str, Any]:
        """The JSON view of this batcher alone."""
        return json_view(self.state())


def merge(states: Iterable[Mapping[str, Any]], live: Iterable[bool] | None = None) -> dict[str, Any]:
    """Add up the states of a reward's replicas: counters and histograms summed, maxima maxed, recent latencies
    pooled. A replica marked not ``live`` (stopped, or silent too long) keeps its counters but not its gauges."""
    states = list(states)
    alive = list(live) if live is not None else [True] * len(states)
    merged: dict[str, Any] = {key: 0 for key in (*COUNTERS, *GAUGES, *MAXIMA)}
    merged.update(counts={}, recent_latencies=[], replicas=0)
    merged.update({name: {"counts": [0] * (len(b) + 1), "sum": 0.0} for name, b in HISTOGRAMS.items()})
    for state, is_live in zip(states, alive, strict=True):
        for key in COUNTERS:
            merged[key] += state.get(key, 0)
        for key in GAUGES:
            merged[key] += state.get(key, 0) if is_live else 0
        for key in MAXIMA:
            merged[key] = max(merged[key], state.get(key, 0))
        for key, value in state.get("counts", {}).items():
            merged["counts"][key] = merged["counts"].get(key, 0) + value
        for name in HISTOGRAMS:
            if name in state:
                merged[name]["counts"] = [
                    a + b for a, b in zip(merged[name]["counts"], state[name]["counts"], strict=True)
                ]
                merged[name]["sum"] += state[name]["sum"]
        merged["recent_latencies"] += state.get("recent_latencies", [])
        merged["replicas"] += 1 if is_live else 0
    merged["recent_latencies"] = merged["recent_latencies"][-RECENT_LATENCIES * max(1, len(states)) :]
    return merged


def json_view(state: Mapping[str, Any]) -> dict[str, Any]:
    """One reward's merged state as ``GET /metrics/json`` shows it (means and latency percentiles)."""
    lat = sorted(state.get("recent_latencies", []))

    def pct(q: float) -> float | None:
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None

    batches, requests = state["batches"], state["requests"]
    return {
        "requests": requests,
        "samples": state["samples"],
        "failed_requests": state["failed_requests"],
        "batches": batches,
        "mean_batch_samples": state["samples"] / batches if batches else None,
        "mean_batch_requests": requests / batches if batches else None,
        "max_batch_samples": state["batch_samples_max"],
        "max_batch_requests": state["batch_requests_max"],
        "queue_depth": state["queue_depth"],
        "rejected_overloaded": state["rejected_overloaded"],
        "dropped_abandoned": state["dropped_abandoned"],
        "deadline_exceeded": state["deadline_exceeded"],
        "compute_seconds": state["compute_seconds"],
        "latency_seconds": {"p50": pct(0.5), "p95": pct(0.95), "max": lat[-1] if lat else None},
        "counts": dict(state.get("counts", {})),
        "replicas": state.get("replicas", 1),
    }


@dataclass
class AppMetrics:
    """What the routes count, whatever the backend: refusals by status, departed clients, idempotent reuses, and
    per-reward route counters (e.g. ``/get_reward``'s failure scores)."""

    started: float = field(default_factory=time.time)
    rejected: dict[int, int] = field(default_factory=dict)
    abandoned: int = 0
    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def count(self, reward: str, key: str, n: int) -> None:
        per_reward = self.counts.setdefault(reward, {})
        per_reward[key] = per_reward.get(key, 0) + n


def app_json(app: AppMetrics, reused: int, rewards: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The whole ``GET /metrics/json`` answer: the app's counters and each reward's merged state."""
    views = {}
    for name, state in rewards.items():
        view = json_view(state)
        view["counts"] = {**view["counts"], **app.counts.get(name, {})}
        views[name] = view
    return {
        "uptime_s": time.time() - app.started,
        "rejected": {str(k): v for k, v in sorted(app.rejected.items())},
        "abandoned": app.abandoned,
        "idempotent_reuses": reused,
        "rewards": views,
    }


def prometheus_text(
    app: AppMetrics, reused: int, rewards: Mapping[str, Mapping[str, Any]]
) -> tuple[bytes, str]:
    """``GET /metrics``: the same numbers in Prometheus' text format, through ``prometheus_client``; returns the
    body and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    def families() -> Iterable[Any]:
        yield GaugeMetricFamily(
            "rh_trl_uptime_seconds", "Seconds since the server started", time.time() - app.started
        )
        rejected = CounterMetricFamily(
            "rh_trl_rejected_requests", "Requests refused, by HTTP status (4xx, 429, 503)", labels=["status"]
        )
        for status, n in sorted(app.rejected.items()):
            rejected.add_metric([str(status)], n)
        yield rejected
        yield CounterMetricFamily(
            "rh_trl_abandoned_requests", "Requests whose client went away before the answer", app.abandoned
        )
        yield CounterMetricFamily(
            "rh_trl_idempotent_reuses", "Retries answered from a call with the same Idempotency-Key", reused
        )
        per_reward: dict[str, tuple[str, str]] = {
            "requests": ("counter", "Requests scored"),
            "samples": ("counter", "Samples scored"),
            "failed_requests": ("counter", "Requests whose scoring failed"),
            "batches": ("counter", "Scoring calls (batches)"),
            "rejected_overloaded": ("counter", "Requests refused with 429 because the queue was full"),
            "dropped_abandoned": (
                "counter",
                "Requests dropped from the queue because their client went away",
            ),
            "deadline_exceeded": ("counter", "Batches stopped at compute_timeout_s"),
            "compute_seconds": ("counter", "Seconds spent scoring"),
            "queue_depth": ("gauge", "Samples waiting for a batch"),
            "replicas": ("gauge", "Replicas reporting"),
        }
        for key, (kind, help_text) in per_reward.items():
            family_type = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            family = family_type(f"rh_trl_reward_{key}", help_text, labels=["reward"])
            for name, state in rewards.items():
                family.add_metric([name], state.get(key, 0))
            yield family
        none = CounterMetricFamily(
            "rh_trl_reward_samples_without_reward",
            "Samples answered with no reward (null)",
            labels=["reward"],
        )
        counts = CounterMetricFamily(
            "rh_trl_reward_events",
            "The reward's and the routes' counters (too_long, ...)",
            labels=["reward", "event"],
        )
        for name, state in rewards.items():
            merged = {**state.get("counts", {}), **app.counts.get(name, {})}
            none.add_metric([name], merged.get("none", 0) + merged.get("too_long", 0))
            for key, n in sorted(merged.items()):
                counts.add_metric([name, key], n)
        yield none
        yield counts
        for hist, help_text in (
            ("latency_seconds", "Seconds from a request's arrival at its reward's queue to its answer"),
            ("batch_samples", "Samples per scoring call"),
        ):
            family = HistogramMetricFamily(f"rh_trl_reward_{hist}", help_text, labels=["reward"])
            for name, state in rewards.items():
                data = state[hist]
                cumulative, buckets = 0, []
                for bound, n in zip((*HISTOGRAMS[hist], math.inf), data["counts"], strict=True):
                    cumulative += n
                    buckets.append(("+Inf" if bound == math.inf else repr(float(bound)), cumulative))
                family.add_metric([name], buckets, data["sum"])
            yield family

    class Collector:
        def collect(self) -> Iterable[Any]:
            return families()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())  # type: ignore[arg-type]
    return generate_latest(registry), CONTENT_TYPE_LATEST
