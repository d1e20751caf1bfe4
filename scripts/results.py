"""Benchmark results: the records a ``pvemu bench`` run produces.

A *run* is one ``pvemu bench`` sweep: metadata (time, git commit, host,
versions, the full configuration) and its *points*. A point is one
(workload, mode, pages, multicall-buffer params) configuration; it holds the
exact counts per phase (deterministic: taken from the first repeat and
checked equal in every other) and the wall time of each repeat per phase.

Their JSON forms are in ``scripts/bench/documents.py``, the SQLite store in
``scripts/bench/store.py`` and the comparison of two runs in
``scripts/bench/comparison.py``; ``docs/benchmarks.md`` documents them.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from pvemu.shared.counts import PHASE_FIELDS

#: Counts the gate compares: the per-phase counters of ``pvemu guest --json``,
#: the fields of ``shared.counts.PhaseCounts`` (the same tuple as ``PHASE_FIELDS``).
GATED_COUNTS: Final = PHASE_FIELDS
#: Every count kept per phase: the gated ones and the guest's own trap count.
COUNT_FIELDS: Final = (*GATED_COUNTS, "guest_traps")
#: Multicall-buffer parameters, named as the point keys and JSON name them,
#: with the ``pvemu guest`` option each one maps to.
BUFFER_PARAMS: Final = {
    "mc_entries": "--mc-entries",
    "mc_bytes": "--mc-bytes",
    "mc_records": "--mc-records",
}


class ResultsError(Exception):
    """A results file or store that cannot be used (missing, wrong schema)."""


def param_words(params: dict[str, int]) -> list[str]:
    """``name=value`` of each buffer parameter, sorted by name."""
    return [f"{name}={params[name]}" for name in sorted(params)]


def point_key(workload: str, mode: str, pages: int, params: dict[str, int]) -> str:
    """The stable name of a point, e.g. ``mprotect xen pages=600 mc_bytes=256``."""
    return " ".join([workload, mode, f"pages={pages}", *param_words(params)])


@dataclass(frozen=True)
class Timing:
    """Median and p10/p90 of the repeats, in seconds."""

    median: float
    p10: float
    p90: float
    n: int


def percentile(samples: Sequence[float], q: float) -> float:
    """The sample at quantile ``q`` (nearest rank, no interpolation): a p99 is
    a latency some request really had."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(samples: Sequence[float]) -> Timing:
    """Median, p10 and p90 (inclusive quantiles) of one phase's wall times."""
    if not samples:
        raise ValueError("no samples")
    median = statistics.median(samples)
    if len(samples) < 2:
        return Timing(median, median, median, len(samples))
    deciles = statistics.quantiles(samples, n=10, method="inclusive")
    return Timing(median, deciles[0], deciles[-1], len(samples))


@dataclass
class Point:
    """One configuration of a sweep and what it measured."""

    workload: str
    mode: str
    pages: int
    params: dict[str, int] = field(default_factory=dict)
    valid: bool = True
    reason: str = ""
    unsafe: bool = False
    #: phase -> count name -> value (first repeat; identical in every repeat).
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    #: phase -> wall seconds of each repeat, in run order.
    samples: dict[str, list[float]] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return point_key(self.workload, self.mode, self.pages, self.params)

    def timing(self, phase: str) -> Timing | None:
        samples = self.samples.get(phase)
        return summarize(samples) if samples else None

    def total_timing(self, phases: Sequence[str]) -> Timing | None:
        """Timing of several phases added up repeat by repeat."""
        columns = [self.samples.get(p, []) for p in phases]
        if not columns or not all(columns) or len({len(c) for c in columns}) != 1:
            return None
        return summarize([sum(values) for values in zip(*columns, strict=True)])

    def invalidate(self, reason: str) -> None:
        if self.valid:
            self.valid = False
            self.reason = reason


@dataclass
class Run:
    """One sweep: metadata and points."""

    created_utc: str
    git_sha: str | None
    git_dirty: bool | None
    host: str
    python: str
    packages: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    points: list[Point] = field(default_factory=list)
    id: int | None = None
    #: Where the run came from, for messages: ``run #3``, a file name.
    origin: str = ""

    @property
    def valid(self) -> bool:
        return all(p.valid for p in self.points)

    def by_key(self) -> dict[str, Point]:
        return {p.key: p for p in self.points}

    @property
    def injected(self) -> bool:
        """True if guest arguments were injected (a deliberately altered run)."""
        return bool(self.config.get("inject"))
