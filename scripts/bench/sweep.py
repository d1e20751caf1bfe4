"""What a ``pvemu bench`` run measures: the sweep of modes x sizes x
workloads (x multicall-buffer limits for mode xen) and its plan of points."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from pvemu.guest.modes import MODE_NAMES, SAFE_MODES
from pvemu.guest.proc_workloads import PROCESS_WORKLOADS
from pvemu.scripts import checks
from pvemu.scripts.results import Point
from pvemu.scripts.workloads import MPROTECT, RUN_WORKLOADS

DEFAULT_MODES: Final = SAFE_MODES
DEFAULT_PAGES: Final = (512, 4096)
DEFAULT_VCPUS: Final = 2


class UsageError(Exception):
    """A bad combination of options: exit 2."""


@dataclass(frozen=True)
class Sweep:
    """What a run measures. Recorded in the run's config and in baselines."""

    modes: tuple[str, ...] = DEFAULT_MODES
    pages: tuple[int, ...] = DEFAULT_PAGES
    workloads: tuple[str, ...] = (MPROTECT,)
    #: Buffer limits for mode xen; ``None`` in a list means "the guest's
    #: default" (the point's key then omits that parameter).
    mc_entries: tuple[int | None, ...] = ()
    mc_bytes: tuple[int | None, ...] = ()
    mc_records: tuple[int | None, ...] = ()
    vcpus: int = DEFAULT_VCPUS

    def as_json(self) -> dict[str, Any]:
        return {
            "modes": list(self.modes),
            "pages": list(self.pages),
            "workloads": list(self.workloads),
            "mc_entries": list(self.mc_entries),
            "mc_bytes": list(self.mc_bytes),
            "mc_records": list(self.mc_records),
            "vcpus": self.vcpus,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Sweep:
        try:
            sweep = cls(
                modes=tuple(str(m) for m in doc["modes"]),
                pages=tuple(int(p) for p in doc["pages"]),
                workloads=tuple(str(w) for w in doc.get("workloads", [MPROTECT])),
                mc_entries=_optional_ints(doc.get("mc_entries", [])),
                mc_bytes=_optional_ints(doc.get("mc_bytes", [])),
                mc_records=_optional_ints(doc.get("mc_records", [])),
                vcpus=int(doc.get("vcpus", DEFAULT_VCPUS)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"malformed sweep {doc!r}: {exc!r}") from exc
        sweep.check()
        return sweep

    def check(self) -> None:
        unknown = [m for m in self.modes if m not in MODE_NAMES]
        if unknown or not self.modes:
            raise UsageError(f"unknown mode(s) {unknown}; choose from {', '.join(MODE_NAMES)}")
        limits = (*self.mc_entries, *self.mc_bytes, *self.mc_records)
        numbers = (*self.pages, *(n for n in limits if n is not None), self.vcpus)
        if not self.pages or any(n <= 0 for n in numbers):
            raise UsageError("pages, --mc-* values and vcpus must be positive")
        checks.check_vcpus(self.vcpus)
        checks.check_mc_bytes(self.mc_bytes)
        for workload in self.workloads:
            if workload not in RUN_WORKLOADS and not workload.startswith("trace:"):
                names = ", ".join(RUN_WORKLOADS)
                raise UsageError(f"unknown workload {workload!r}: {names} or trace:FILE")
            if workload.startswith("trace:") and not Path(workload[6:]).is_file():
                raise UsageError(f"no trace file {workload[6:]!r}")
            if workload in RUN_WORKLOADS:
                checks.check_domain_pages(max(self.pages), workload=workload)
            if workload in PROCESS_WORKLOADS:
                checks.check_process_vcpus(workload, self.vcpus)

    def buffer_grid(self) -> list[dict[str, int]]:
        """Every combination of the given buffer limits (``[{}]`` if none)."""
        grid: list[dict[str, int]] = [{}]
        for name, values in (
            ("mc_entries", self.mc_entries),
            ("mc_bytes", self.mc_bytes),
            ("mc_records", self.mc_records),
        ):
            if values:
                grid = [
                    {**combo, name: value} if value is not None else dict(combo)
                    for combo in grid
                    for value in values
                ]
        return grid

    def plan(self) -> list[Point]:
        """The points, in run order. Buffer limits apply to mode xen only;
        trace workloads do not sweep pages (their key says ``pages=0``);
        forkexec runs its default rounds."""
        points: dict[str, Point] = {}
        for workload in dict.fromkeys(self.workloads):
            for mode in dict.fromkeys(self.modes):
                sizes = self.pages if workload in RUN_WORKLOADS else (0,)
                for pages in dict.fromkeys(sizes):
                    for params in self.buffer_grid() if mode == "xen" else [{}]:
                        point = Point(workload, mode, pages, dict(params))
                        points.setdefault(point.key, point)
        return list(points.values())

    @property
    def needs_hypervisor(self) -> bool:
        return any(m != "native" for m in self.modes)

    def largest_guest_mib(self) -> int:
        """The memory of the sweep's largest guest (fork's holds its copies
        too; a trace's is sized from the largest pages, as the runner does)."""
        largest = max(self.pages)
        named = [w for w in self.workloads if w in RUN_WORKLOADS] or [MPROTECT]
        return max(checks.guest_memory(w, largest) for w in named)


def _optional_ints(values: Sequence[Any]) -> tuple[int | None, ...]:
    return tuple(None if v is None else int(v) for v in values)
