"""Counters, gauges and histograms rendered in the Prometheus text format (``GET /metrics``).

A few dozen lines instead of a client library: nodes and the coordinator export a handful of
series and never need pushing, multiprocess modes or exemplars.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

LATENCY_BUCKETS_MS = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()):
        self.name, self.help, self.labelnames = name, help, tuple(labels)

    def _key(self, labels: dict) -> tuple:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {sorted(labels)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class _Value(_Metric):
    """Values kept here, or read at render time from ``read`` (label values tuple -> value) when
    the truth lives elsewhere (a queue's length, a tier's counters)."""

    def __init__(self, name, help, labels=(), read: Callable[[], dict[tuple, float]] | None = None):
        super().__init__(name, help, labels)
        self.values: dict[tuple, float] = {}
        self.read = read

    def render(self) -> list[str]:
        values = self.read() if self.read else self.values
        return self.header() + [f"{self.name}{_labels(self.labelnames, k)} {_number(v)}" for k, v in sorted(values.items())]


class Counter(_Value):
    kind = "counter"

    def inc(self, amount: float = 1.0, **labels) -> None:
        key = self._key(labels)
        self.values[key] = self.values.get(key, 0.0) + amount


class Gauge(_Value):
    kind = "gauge"

    def set(self, value: float, **labels) -> None:
        self.values[self._key(labels)] = float(value)


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name, help, labels=(), buckets: Sequence[float] = LATENCY_BUCKETS_MS):
        super().__init__(name, help, labels)
        self.buckets = tuple(sorted(buckets))
        self.series: dict[tuple, list] = {}  # labels -> [bucket counts..., sum, count]

    def observe(self, value: float, **labels) -> None:
        key = self._key(labels)
        row = self.series.setdefault(key, [0] * len(self.buckets) + [0.0, 0])
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                row[i] += 1
        row[-2] += value
        row[-1] += 1

    def render(self) -> list[str]:
        lines = self.header()
        for key, row in sorted(self.series.items()):
            for bound, count in zip(self.buckets, row):
                le = 'le="' + _number(bound) + '"'
                lines.append(f"{self.name}_bucket{_labels(self.labelnames, key, le)} {count}")
            inf = 'le="+Inf"'
            lines.append(f"{self.name}_bucket{_labels(self.labelnames, key, inf)} {row[-1]}")
            lines.append(f"{self.name}_sum{_labels(self.labelnames, key)} {_number(row[-2])}")
            lines.append(f"{self.name}_count{_labels(self.labelnames, key)} {row[-1]}")
        return lines


class Registry:
    def __init__(self):
        self.metrics: list[_Metric] = []

    def _add(self, metric):
        self.metrics.append(metric)
        return metric

    def counter(self, name, help, labels=(), read=None) -> Counter:
        return self._add(Counter(name, help, labels, read))

    def gauge(self, name, help, labels=(), read=None) -> Gauge:
        return self._add(Gauge(name, help, labels, read))

    def histogram(self, name, help, labels=(), buckets=LATENCY_BUCKETS_MS) -> Histogram:
        return self._add(Histogram(name, help, labels, buckets))

    def render(self) -> str:
        return "\n".join(line for m in self.metrics for line in m.render()) + "\n"


def parse_text(text: str) -> dict[str, float]:
    """``{'name{labels}': value}`` of a rendered exposition (for tests and benchmarks)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out
