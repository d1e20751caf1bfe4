"""The comparison of two runs, the CI gate: every gated count diffed exactly
(any increase is a regression, exit 1), times reported as ratios of medians
and never judged by the exit status."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from pvemu.scripts.bench.documents import COMPARE_SCHEMA, timing_json
from pvemu.scripts.results import GATED_COUNTS, Point, Run, Timing

#: What ``pvemu bench compare`` checks against by default.
DEFAULT_BASELINE: Final = Path("benchmarks") / "baseline.json"

#: Exit codes shared by ``pvemu bench`` and ``pvemu bench compare``.
EXIT_OK: Final = 0
EXIT_REGRESSION: Final = 1
EXIT_USAGE: Final = 2
EXIT_INVALID: Final = 3

#: Fewer repeats than this on either side: timings are shown, never judged.
MIN_REPEATS_FOR_SIGNIFICANCE: Final = 3


@dataclass(frozen=True)
class CountChange:
    key: str
    phase: str
    metric: str
    baseline: int | None
    new: int | None

    @property
    def delta(self) -> int:
        return (self.new or 0) - (self.baseline or 0)

    @property
    def regression(self) -> bool:
        """An increase, or a count one side lacks (the gate cannot vouch for it)."""
        if self.baseline is None or self.new is None:
            return True
        return self.delta > 0


@dataclass(frozen=True)
class TimeRatio:
    key: str
    phase: str
    baseline: Timing
    new: Timing

    @property
    def ratio(self) -> float:
        """New median over baseline median (> 1 is slower)."""
        return self.new.median / self.baseline.median if self.baseline.median > 0 else 1.0

    @property
    def judgeable(self) -> bool:
        return min(self.baseline.n, self.new.n) >= MIN_REPEATS_FOR_SIGNIFICANCE

    @property
    def significant(self) -> bool:
        """The p10-p90 bands of the two sides do not overlap."""
        if not self.judgeable:
            return False
        return self.new.p10 > self.baseline.p90 or self.new.p90 < self.baseline.p10

    def describe(self) -> str:
        """pyperf-style wording, e.g. ``1.07x slower (within noise)``."""
        r = self.ratio
        if r >= 1.0:
            text = "same speed" if r == 1.0 else f"{r:.2f}x slower"
        else:
            text = f"{1 / r:.2f}x faster"
        if not self.judgeable:
            return f"{text} (too few repeats to judge)"
        return f"{text} ({'significant' if self.significant else 'within noise'})"


@dataclass
class Comparison:
    """Counts diffed exactly and times as ratios; :attr:`status` is the exit code."""

    baseline: str
    against: str
    changes: list[CountChange] = field(default_factory=list)
    times: list[TimeRatio] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    new_points: list[str] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)
    compared: int = 0

    @property
    def regressions(self) -> list[CountChange]:
        return [c for c in self.changes if c.regression]

    @property
    def improvements(self) -> list[CountChange]:
        return [c for c in self.changes if not c.regression]

    @property
    def status(self) -> int:
        """3 invalid run, 1 count regression, 2 baseline points not measured
        (or nothing comparable at all: a gate that compared nothing must not pass),
        else 0."""
        if self.invalid:
            return EXIT_INVALID
        if self.regressions:
            return EXIT_REGRESSION
        if self.missing or self.compared == 0:
            return EXIT_USAGE
        return EXIT_OK

    def as_json(self) -> dict[str, Any]:
        def change(c: CountChange) -> dict[str, Any]:
            return {
                "key": c.key,
                "phase": c.phase,
                "metric": c.metric,
                "baseline": c.baseline,
                "new": c.new,
                "delta": c.delta,
            }

        return {
            "schema": COMPARE_SCHEMA,
            "baseline": self.baseline,
            "against": self.against,
            "status": self.status,
            "compared_points": self.compared,
            "regressions": [change(c) for c in self.regressions],
            "improvements": [change(c) for c in self.improvements],
            "missing": self.missing,
            "new_points": self.new_points,
            "invalid": self.invalid,
            "timings": [
                {
                    "key": t.key,
                    "phase": t.phase,
                    "ratio": round(t.ratio, 4),
                    "significant": t.significant,
                    "note": t.describe(),
                    "baseline": timing_json(t.baseline),
                    "new": timing_json(t.new),
                }
                for t in self.times
            ],
        }


def compare_runs(baseline: Run, against: Run) -> Comparison:
    """Diff every gated count of every baseline point exactly; ratio the times."""
    result = Comparison(baseline=baseline.origin, against=against.origin)
    result.invalid = [*_invalid_points(against), *_invalid_points(baseline)]
    new = against.by_key()
    old = baseline.by_key()
    result.missing = [key for key in old if key not in new]
    result.new_points = [key for key in new if key not in old]
    for key, before in old.items():
        after = new.get(key)
        if after is not None:
            result.compared += 1
            _compare_point(result, key, before, after)
    return result


def _invalid_points(run: Run) -> list[str]:
    return [f"{run.origin}: {p.key}: {p.reason}" for p in run.points if not p.valid]


def _compare_point(result: Comparison, key: str, before: Point, after: Point) -> None:
    """Add one point's count changes and time ratios, phase by phase."""
    for phase in dict.fromkeys([*before.counts, *after.counts]):
        b = before.counts.get(phase, {})
        a = after.counts.get(phase, {})
        for metric in GATED_COUNTS:
            if metric not in b and metric not in a:
                continue
            if b.get(metric) != a.get(metric):
                result.changes.append(CountChange(key, phase, metric, b.get(metric), a.get(metric)))
        tb, ta = before.timing(phase), after.timing(phase)
        if tb is not None and ta is not None:
            result.times.append(TimeRatio(key, phase, tb, ta))
