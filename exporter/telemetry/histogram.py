"""Histograms written by the event loop alone, read by the scrape: a custom collector.

prometheus_client's Histogram takes a lock for every observation (so that a scrape on
another thread sees each one whole); six of them per request were 5% of the relay's CPU.
Here only the event loop's thread observes, and the scrape (a thread, or a forked child)
copies each series' bucket counts in one list copy, which the GIL makes atomic: a scrape can
miss an observation that is half-recorded (its sum not yet added), never see a bucket
count fall, and the +Inf bucket always equals the count. The exposition is the same as
prometheus_client's Histogram: `_bucket{le}` cumulative, `_count`, `_sum`, exemplars.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString


class Series:
    """One label set: counts per bucket (the last is +Inf), their sum, and per bucket the
    latest exemplar."""

    __slots__ = ("_bounds", "counts", "exemplars", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.exemplars: list[Exemplar | None] = [None] * (len(bounds) + 1)

    def observe(self, value: float, exemplar: dict[str, str] | None = None) -> None:
        bucket = bisect_left(self._bounds, value)  # le: the first bound >= value
        self.counts[bucket] += 1
        self.sum += value
        if exemplar is not None:
            self.exemplars[bucket] = Exemplar(exemplar, value, time.time())


class LoopHistogram(Collector):
    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 buckets: Sequence[float], registry: CollectorRegistry | None = None) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._bounds = tuple(float(b) for b in buckets)
        self._les = [floatToGoString(b) for b in self._bounds] + ["+Inf"]
        self._series: dict[tuple[str, ...], Series] = {}
        if registry is not None:
            registry.register(self)

    def labels(self, *values: str) -> Series:
        series = self._series.get(values)
        if series is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}")
            series = self._series[values] = Series(self._bounds)
        return series

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, series in list(self._series.items()):
            counts = series.counts[:]  # one copy: consistent buckets for this scrape
            exemplars = series.exemplars[:]
            total, buckets = 0, []
            for le, count, exemplar in zip(self._les, counts, exemplars, strict=True):
                total += count
                buckets.append((le, float(total), exemplar) if exemplar is not None
                               else (le, float(total)))
            family.add_metric(values, buckets, series.sum)
        yield family
