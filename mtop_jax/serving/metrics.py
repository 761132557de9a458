"""The server's counters, gauges and histograms, written in Prometheus' text format.

A few dozen lines instead of a client library: the server is one process with one
event loop, and the batcher thread only adds to numbers (a lock keeps each sample whole).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


class Counter:
    """A monotonic count per label set."""

    kind = "counter"

    def __init__(self, name: str, help_text: str):
        self.name, self.help, self.values = name, help_text, {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        return self.values.get(tuple(sorted(labels.items())), 0.0)

    def samples(self) -> list[str]:
        with self._lock:
            return [f"{self.name}{_labels(dict(k))} {_number(v)}"
                    for k, v in sorted(self.values.items())]


class Gauge(Counter):
    """A value that goes up and down."""

    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        with self._lock:
            self.values[tuple(sorted(labels.items()))] = value


class Histogram:
    """Observations counted into cumulative ``le`` buckets, with their sum and count."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]):
        self.name, self.help = name, help_text
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # the last one: above every bound (+Inf)
        self.sum, self.count = 0.0, 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += 1
            self.sum += value
            self.count += 1

    def samples(self) -> list[str]:
        with self._lock:
            out, total = [], 0
            for bound, n in zip((*self.buckets, float("inf")), self.counts):
                total += n
                le = "+Inf" if bound == float("inf") else _number(bound)
                out.append(f'{self.name}_bucket{{le="{le}"}} {total}')
            out += [f"{self.name}_sum {_number(self.sum)}", f"{self.name}_count {self.count}"]
            return out


class Metrics:
    """Everything ``/metrics`` shows."""

    def __init__(self, batch_buckets: Sequence[int]):
        """``batch_buckets``: the predictor's, so that the batch-size histogram counts the
        forward passes of each compiled batch size."""
        self.requests = Counter("mtop_requests_total", "HTTP requests answered, by path "
                                                       "and status code")
        self.latency = Histogram("mtop_request_latency_seconds",
                                 "Time from receiving a /v1/predict request to answering it",
                                 LATENCY_BUCKETS)
        self.batch_size = Histogram("mtop_batch_size_texts", "Texts per forward pass",
                                    sorted({1, *batch_buckets}))
        self.queue_depth = Gauge("mtop_queue_depth", "Requests waiting or being computed")
        self.texts = Counter("mtop_texts_total", "Texts answered")
        self.compiles = Counter("mtop_compiles_total", "XLA programs lowered, by phase "
                                                       "(warmup: before ready)")
        self.ready = Gauge("mtop_ready", "1 once every bucket is compiled and warm")
        for phase in ("warmup", "serving"):  # shown from the start, 0 included
            self.compiles.inc(0, phase=phase)
        self.ready.set(0)
        self.queue_depth.set(0)

    def render(self) -> str:
        lines = []
        for m in (self.requests, self.latency, self.batch_size, self.queue_depth, self.texts,
                  self.compiles, self.ready):
            lines += [f"# HELP {m.name} {m.help}", f"# TYPE {m.name} {m.kind}", *m.samples()]
        return "\n".join(lines) + "\n"


def parse(text: str) -> dict[str, float]:
    """``{"name{labels}": value}`` of a Prometheus text page (for tests and benchmarks)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out
