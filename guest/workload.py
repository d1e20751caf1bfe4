"""The canonical mprotect workload, measured phase by phase.

A region of N pages at a 2 MiB-aligned address, anonymous private,
read-write: ``populate`` writes one byte to every page (demand paging),
``protect_ro`` is one ``mprotect(PROT_READ)`` of the whole region and
``protect_rw`` one ``mprotect(PROT_READ | PROT_WRITE)``. Each phase reports
the hypervisor's counters (what it handled), the guest's (what it issued) and
wall time; afterwards every page is read back and ``audit()`` is run.
"""

from __future__ import annotations

import mmap as mman
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

from pvemu.shared.counts import PhaseCounts
from pvemu.shared.timeline import now_ns
from pvemu.shared.x86 import PAGE_SIZE

from .kernel import Kernel

PHASES: Final = ("populate", "protect_ro", "protect_rw")
#: 1 GiB: 2 MiB aligned, away from the boot tables' first 2 MiB.
REGION_ADDR: Final = 0x4000_0000


class WorkloadError(Exception):
    """The workload read back wrong data: the kernel or hypervisor is broken."""


@dataclass
class PhaseResult:
    counts: PhaseCounts
    guest_traps: int
    wall_s: float
    #: When the phase ran (``shared.timeline.now_ns`` stamps, for a timeline;
    #: not part of the JSON result).
    started_ns: int = field(default=0, compare=False)
    ended_ns: int = field(default=0, compare=False)

    def as_dict(self) -> dict[str, Any]:
        return {**self.counts, "guest_traps": self.guest_traps, "wall_s": round(self.wall_s, 6)}


@dataclass
class WorkloadResult:
    mode: str
    pages: int
    phases: dict[str, PhaseResult] = field(default_factory=dict)
    audit: list[str] = field(default_factory=list)
    unsafe: bool = False

    @property
    def counts_agree(self) -> bool:
        return all(p.counts.traps == p.guest_traps for p in self.phases.values())

    @property
    def audit_clean(self) -> bool:
        return not self.audit

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "unsafe": self.unsafe,
            "pages": self.pages,
            "phases": {name: phase.as_dict() for name, phase in self.phases.items()},
            "counts_agree": self.counts_agree,
            "audit_clean": self.audit_clean,
            "audit": self.audit,
        }


def _snapshot(stats: dict[str, Any]) -> tuple[PhaseCounts, int]:
    """The running totals of a ``stats`` reply, named as a phase reports them,
    and the guest's own trap count."""
    hyp = stats["hypervisor"]["total"]
    counts = PhaseCounts(
        traps=hyp.get("traps", 0),
        hypercalls=hyp.get("hypercalls", 0),
        multicall_entries=hyp.get("multicall_entries", 0),
        records=hyp.get("mmu_update_records", 0),
        ptwr=hyp.get("ptwr", 0),
        page_faults=stats["kernel"]["page_faults"],
        flush_ops=hyp.get("tlb_flush_ops", 0),
    )
    return counts, stats["guest"]["total"].get("traps", 0)


async def measure(
    kernel: Kernel,
    result: WorkloadResult,
    name: str,
    action: Callable[[], Awaitable[None]],
    on_step: Callable[[str], None] | None = None,
) -> None:
    """Run ``action`` as phase ``name`` of ``result``: the counters' change
    and the wall time. A phase measured again (a loop) adds up."""
    if on_step is not None:
        on_step(name)
    before, guest_before = _snapshot(await kernel.stats())
    started_ns = now_ns()
    started = time.perf_counter()
    await action()
    wall = time.perf_counter() - started
    ended_ns = now_ns()
    after, guest_after = _snapshot(await kernel.stats())
    phase = PhaseResult(after - before, guest_after - guest_before, wall, started_ns, ended_ns)
    earlier = result.phases.get(name)
    if earlier is not None:
        phase = PhaseResult(
            earlier.counts + phase.counts,
            earlier.guest_traps + phase.guest_traps,
            earlier.wall_s + phase.wall_s,
            earlier.started_ns,
            ended_ns,
        )
    result.phases[name] = phase


async def run_mprotect_workload(
    kernel: Kernel, pages: int, *, vcpu: int = 1, on_step: Callable[[str], None] | None = None
) -> WorkloadResult:
    """Run the three phases; ``vcpu`` runs the user thread (the kernel's
    syscalls run on vCPU 0). ``on_step`` hears each phase's name as it
    starts, then ``check`` (``pvemu run``'s progress bar moves with them)."""
    if pages <= 0:
        raise ValueError("pages must be positive")
    vcpu = min(vcpu, kernel.machine.nr_vcpus - 1)
    length = pages * PAGE_SIZE
    rw = mman.PROT_READ | mman.PROT_WRITE
    addr = await kernel.mmap(length, rw, mman.MAP_PRIVATE | mman.MAP_ANONYMOUS, addr=REGION_ADDR)
    if addr != REGION_ADDR:
        raise WorkloadError(f"region landed at {addr:#x}, not {REGION_ADDR:#x}")
    result = WorkloadResult(kernel.mode, pages, unsafe=kernel.unsafe)
    pattern = [(addr + i * PAGE_SIZE, "w", bytes([(i * 7 + 1) & 0xFF])) for i in range(pages)]

    async def populate() -> None:
        await kernel.run_user(vcpu, pattern)

    async def protect_ro() -> None:
        await kernel.mprotect(addr, length, mman.PROT_READ)

    async def protect_rw() -> None:
        await kernel.mprotect(addr, length, rw)

    for name, action in (
        ("populate", populate),
        ("protect_ro", protect_ro),
        ("protect_rw", protect_rw),
    ):
        await measure(kernel, result, name, action, on_step)

    if on_step is not None:
        on_step("check")
    reads = await kernel.run_user(vcpu, [(va, "r", 1) for va, _, _ in pattern])
    expected = [data for _, _, data in pattern]
    if reads != expected:
        bad = next(i for i, (a, b) in enumerate(zip(reads, expected, strict=True)) if a != b)
        raise WorkloadError(f"page {bad} read back {reads[bad]!r}, wrote {expected[bad]!r}")
    result.audit = await kernel.audit()
    return result
