"""What a trace replay measures and reports: its phases, the meter that
counts each phase's traps, and :class:`TraceResult`.

The counts are the :class:`~pvemu.shared.counts.PhaseCounts` of the mprotect
workload (:mod:`pvemu.guest.workload`), so a replay reads like ``pvemu run``'s
phases; the replay itself is :mod:`pvemu.guest.replay`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Final

from pvemu.shared.counts import PhaseCounts

from .kernel import Kernel
from .workload import PhaseResult, WorkloadResult, _snapshot

__all__ = ["REPLAY_PHASES", "PROCESS_PHASES", "PROCESS_COUNTS", "TraceResult", "PhaseMeter"]

#: Phases of a replay, in report order. Each accumulates every event of its
#: kind (``mlock``: mlock and munlock); ``touch`` is the user accesses of the
#: population policy (and the data copy of a moved mremap).
REPLAY_PHASES: Final = (
    "mmap",
    "mprotect",
    "munmap",
    "mremap",
    "brk",
    "madvise",
    "mlock",
    "touch",
)
#: The phases a trace of processes adds: ``fork`` (Kernel.fork), ``cow``
#: (the writes after a fork: copy-on-write faults), ``context_switch`` (the
#: user vCPU loading another process's tree), ``exec`` and ``exit``.
PROCESS_PHASES: Final = ("fork", "cow", "context_switch", "exec", "exit")
#: What a trace of processes counts besides the phases' traps.
PROCESS_COUNTS: Final = (
    "forks",
    "vforks",
    "execs",
    "exits",
    "context_switches",
    "cow_copies",
    "cow_reuses",
)


@dataclass
class TraceResult(WorkloadResult):
    """A :class:`WorkloadResult` plus what the replay did and could not do.

    ``pages`` is the number of pages the population policy touched.
    ``errors`` counts guest syscalls that failed although the program saw
    them succeed (the first ones are kept in ``error_samples``); a clean
    replay has none. ``processes`` (:data:`PROCESS_COUNTS`; empty for a
    schema-1 trace) counts the process events run, the context switches
    the replay made and the copy-on-write faults the kernel took.
    """

    trace: str = ""
    command: list[str] = field(default_factory=list)
    replayed: dict[str, int] = field(default_factory=dict)
    untracked: dict[str, int] = field(default_factory=dict)
    relocated: int = 0
    errors: int = 0
    error_samples: list[dict[str, Any]] = field(default_factory=list)
    peak_resident: int = 0
    budget_exhausted: int = 0
    policy: dict[str, Any] = field(default_factory=dict)
    processes: dict[str, int] = field(default_factory=dict)

    @property
    def replay_clean(self) -> bool:
        return self.errors == 0

    def as_dict(self) -> dict[str, Any]:
        out = super().as_dict()
        out["workload"] = "trace"
        out["trace"] = {
            "file": self.trace,
            "command": self.command,
            "replayed": self.replayed,
            "untracked": self.untracked,
            "relocated": self.relocated,
            "touched_pages": self.pages,
            "peak_resident": self.peak_resident,
            "budget_exhausted": self.budget_exhausted,
            "errors": self.errors,
            "error_samples": self.error_samples,
            "replay_clean": self.replay_clean,
            "policy": self.policy,
        }
        if self.processes:
            out["trace"]["processes"] = self.processes
        return out


class PhaseMeter:
    """Per-phase counts and wall time; a phase is measured from when the
    replay enters it until it enters another, and accumulates."""

    def __init__(self, kernel: Kernel, phases: tuple[str, ...] = REPLAY_PHASES) -> None:
        self.kernel = kernel
        self.current: str | None = None
        self.before: tuple[PhaseCounts, int] = (PhaseCounts(), 0)
        self.started = 0.0
        self.phases = {name: PhaseResult(PhaseCounts(), 0, 0.0) for name in phases}

    async def enter(self, phase: str) -> None:
        if phase == self.current:
            return
        await self.close()
        self.before = _snapshot(await self.kernel.stats())
        self.current = phase
        self.started = time.perf_counter()

    async def close(self) -> None:
        if self.current is None:
            return
        wall = time.perf_counter() - self.started
        after, guest_after = _snapshot(await self.kernel.stats())
        before, guest_before = self.before
        phase = self.phases[self.current]
        phase.counts += after - before
        phase.guest_traps += guest_after - guest_before
        phase.wall_s += wall
        self.current = None
