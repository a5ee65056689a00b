"""Samples from the other processes of one server, summed into one exposition.

With ``[server] workers``, sessions run in worker processes and grouped writes in
the writer process; Prometheus scrapes the main process only.  At each scrape the
main process asks every worker (over its AMP control link) and the writer process
(over its link) for a :func:`encode`\\ d snapshot of their registry, and
:class:`Federation` adds them to its own: samples with the same name and labels are
summed, which is what a total over processes means for counters, histograms and the
gauges LightMail keeps (connections open, sessions open).

Why this and not prometheus-client's multiprocess mode: that mode picks its value
class from an environment variable when the library is imported (one setting for
every registry of the process, embedders' and tests' included), and puts each
increment through a lock and an mmap'ed file; here an increment stays an in-memory
addition and the cost is paid at scrape time, a few kilobytes per process.

A worker that ends takes its counts with it: its last snapshot's counters and
histograms are kept (``retire``) and added to every later exposition, so that the
totals never go down; what it counted after its last scrape is lost (the next
scrape is at most a scrape interval away).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.metrics_core import Metric

#: One sample: (sample name, sorted label pairs).
_Key = tuple[str, tuple[tuple[str, str], ...]]
#: One family, decoded: (name, type, help, {sample key: value}).
Family = tuple[str, str, str, dict[_Key, float]]

#: Types whose samples only grow: kept when their process ends.
_MONOTONIC = ("counter", "histogram", "summary")


def families(metrics: Iterable[Metric]) -> list[Family]:
    """A registry's families (``registry.collect()``) as plain data; the
    ``_created`` timestamps are left out (they cannot be summed)."""
    out = []
    for metric in metrics:
        samples = {}
        for sample in metric.samples:
            if sample.name.endswith("_created"):
                continue
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        out.append((metric.name, metric.type, metric.documentation, samples))
    return out


def encode(data: list[Family]) -> bytes:
    plain = [[name, kind, doc, [[key[0], dict(key[1]), value]
                                for key, value in samples.items()]]
             for name, kind, doc, samples in data]
    return zlib.compress(json.dumps(plain, separators=(",", ":")).encode())


def decode(data: bytes) -> list[Family]:
    plain = json.loads(zlib.decompress(data))
    return [(name, kind, doc, {(sample, tuple(sorted(labels.items()))): float(value)
                               for sample, labels, value in samples})
            for name, kind, doc, samples in plain]


class Federation:
    """The latest snapshot of each other process, and what ended ones left."""

    def __init__(self) -> None:
        self.sources: dict[str, list[Family]] = {}
        self.carried: list[list[Family]] = []

    def update(self, source: str, snapshot: bytes) -> None:
        self.sources[source] = decode(snapshot)

    def retire(self, source: str) -> None:
        """``source`` has ended: keep its counters and histograms, drop its gauges."""
        last = self.sources.pop(source, None)
        if last is not None:
            self.carried.append([family for family in last if family[1] in _MONOTONIC])

    def merged(self, local: list[Family]) -> Iterator[Metric]:
        """``local`` plus every other process's families, summed sample by sample."""
        total: dict[str, Family] = {}
        for data in [local, *self.sources.values(), *self.carried]:
            for name, kind, doc, samples in data:
                if name not in total:
                    total[name] = (name, kind, doc, {})
                into = total[name][3]
                for key, value in samples.items():
                    into[key] = into.get(key, 0.0) + value
        for name, kind, doc, samples in total.values():
            metric = Metric(name, doc, kind)
            for (sample, labels), value in samples.items():
                metric.add_sample(sample, dict(labels), value)
            yield metric


class MergedCollector:
    """A collector for ``generate_latest``: the merged families, computed once."""

    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> list[Metric]:
        return self.metrics

    def describe(self) -> list[Any]:
        return []
