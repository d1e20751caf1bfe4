"""A cost model: what the counted events would cost on real hardware.

pvemu's wall times measure Python and Unix sockets, not a CPU. The counts are
exact, so an *estimate* of real time is a weighted sum of them::

    est = hypercalls    x hypercall cost      (one guest->hypervisor entry each,
                                               the iret after each fault included)
        + ptwr          x ptwr cost           (trapped PTE write, decoded and emulated)
        + trapped faults x page-fault cost    (a #PF that enters the hypervisor first)
        + records       x per-record cost     (mmu_update validation, per PTE)
        + flush ops     x per-flush cost      (INVLPG or full flush)
        + PTEs changed  x native PTE cost     (the work bare metal does too)

Trapped faults are ``traps - hypercalls - ptwr`` (docs/sources.md §1: a trap is a
hypercall, an emulated page-table write or a reflected page fault), so the
bare-metal ``native`` mode, which takes no traps, pays only the native PTE
work. Every default and its source is in ``docs/cost-model.md``; a JSON file
with the same field names replaces any of them (``--cost-model FILE``).

The process workloads (fork, exec, forkexec) are estimated the same way,
phase by phase (:func:`ptes_changed` says what bare metal writes in each);
:data:`PUBLISHED` keeps, for scale, the lmbench process figures the Xen
paper reported, as recalled and not checked against the paper.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Final

from pvemu.guest.proc_workloads import DEFAULT_LOOPS

#: Fields whose values are cycles (converted with ``cpu_ghz``); the rest are ns.
CYCLE_FIELDS: Final = ("hypercall_cycles", "ptwr_cycles", "page_fault_cycles")


class CostModelError(ValueError):
    """A cost-model file that cannot be used (unknown field, bad value)."""


@dataclass(frozen=True)
class CostModel:
    """Costs per event. Cycles are converted at ``cpu_ghz``."""

    name: str
    cpu_ghz: float
    hypercall_cycles: float
    ptwr_cycles: float
    page_fault_cycles: float
    record_ns: float
    flush_op_ns: float
    native_pte_ns: float

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name == "name":
                continue
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise CostModelError(f"{f.name} must be a non-negative number, got {value!r}")
        if self.cpu_ghz <= 0:
            raise CostModelError(f"cpu_ghz must be positive, got {self.cpu_ghz!r}")

    def ns(self, cycles: float) -> float:
        """Cycles to nanoseconds at this model's clock."""
        return cycles / self.cpu_ghz

    def breakdown_ns(self, counts: dict[str, int], ptes: int) -> dict[str, float]:
        """Estimated nanoseconds per term, for one phase's counts.

        ``counts`` has the per-phase counters of ``pvemu guest --json``
        (traps, hypercalls, ptwr, records, flush_ops); ``ptes`` is the number
        of PTEs the phase changes (the native work every mode does).
        """
        hypercalls = counts.get("hypercalls", 0)
        ptwr = counts.get("ptwr", 0)
        faults = max(0, counts.get("traps", 0) - hypercalls - ptwr)
        return {
            "hypercalls": hypercalls * self.ns(self.hypercall_cycles),
            "ptwr": ptwr * self.ns(self.ptwr_cycles),
            "page_faults": faults * self.ns(self.page_fault_cycles),
            "records": counts.get("records", 0) * self.record_ns,
            "flush_ops": counts.get("flush_ops", 0) * self.flush_op_ns,
            "native_ptes": ptes * self.native_pte_ns,
        }

    def estimate_ns(self, counts: dict[str, int], ptes: int) -> float:
        """Estimated nanoseconds on real hardware for one phase."""
        return sum(self.breakdown_ns(counts, ptes).values())

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


#: The defaults; docs/cost-model.md gives the source of every number.
DEFAULT: Final = CostModel(
    name="default",
    cpu_ghz=2.93,  # Xeon X5570, the machine of the SplitX measurement
    hypercall_cycles=2000.0,  # direct cost of one VM exit (SplitX, WIOV 2011)
    ptwr_cycles=4000.0,  # pvemu assumption: a fault plus decode and emulation
    page_fault_cycles=2000.0,  # pvemu assumption: one transition, as a hypercall
    record_ns=50.0,  # pvemu assumption: per-record validation, no published number
    flush_op_ns=100.0,  # single-page INVLPG (arch/x86/mm/tlb.c comment)
    native_pte_ns=17.0,  # native mprotect at large sizes (lore/linux-mm, 2026)
)


def ptes_changed(workload: str, phase: str, pages: int, loops: int = DEFAULT_LOOPS) -> int:
    """PTEs bare metal writes in one phase of a workload over ``pages``
    pages: the native term, which every mode pays. Traces: 0 (not known).

    mprotect changes one PTE per page in each phase. fork writes two per
    page (the parent's write-protect, the child's copy); exit and exec zap
    every PTE of the tree they tear down (exec also installs its argument
    page); a copy-on-write fault replaces one PTE; a switch writes none.
    forkexec's round phases add up over ``loops`` rounds. munmap and
    MADV_DONTNEED clear every PTE; a PTE moved by mremap is cleared and
    written again, except under a PMD entry moved whole (no PTE written).
    """
    copies, reuses = (pages + 1) // 2, pages // 2
    per_phase: dict[str, dict[str, int]] = {
        "mprotect": {"populate": pages, "protect_ro": pages, "protect_rw": pages},
        "fork": {
            "populate": pages,
            "fork": 2 * pages,
            "cow_copy": copies,
            "exit": pages,
            "cow_reuse": reuses,
        },
        "exec": {"populate": pages, "exec": pages + 1, "exit": 1},
        "forkexec": {
            "populate": pages,
            "fork": loops * 2 * pages,
            "exec": loops * (pages + 1),
            "exit": loops,
            "cow_reuse": loops * pages,
        },
        "munmap": {"populate": pages, "munmap": pages},
        "dontneed": {"populate": pages, "dontneed": pages, "refault": pages},
        "mremap": {"populate": pages, "mremap_pmd": 2 * (pages % 512), "mremap_ptes": 2 * pages},
        "populate": {"map_populate": pages, "dontneed": pages, "populate_write": pages},
    }
    return per_phase.get(workload, {}).get(phase, 0)


@dataclass(frozen=True)
class Published:
    """One lmbench row of Barham et al., "Xen and the Art of
    Virtualization" (SOSP 2003), Table 3 as recalled: microseconds on
    native Linux (UP), XenoLinux, VMware Workstation and User-Mode Linux.
    UNCONFIRMED: the values were not checked against the paper."""

    name: str
    linux_us: float
    xenolinux_us: float
    vmware_us: float
    uml_us: float
    #: What pvemu measures that comes nearest, or why nothing does.
    pvemu: str

    @property
    def xen_over_linux(self) -> float:
        return self.xenolinux_us / self.linux_us


#: The lmbench rows for the process workloads and their phases (32-bit
#: XenoLinux on Linux 2.4.21, dual 2.4 GHz Xeon, as recalled; not today's
#: 64-bit PV design). docs/cost-model.md has the table and its caveats.
PUBLISHED: Final = (
    Published("fork proc", 110, 198, 874, 21_000, "fork workload: fork + context_switch + exit"),
    Published(
        "exec proc", 530, 768, 2_300, 33_000, "forkexec, per round: fork + switch + exec + exit"
    ),
    Published("sh proc", 4_000, 4_800, 10_000, 58_000, "none (fork + /bin/sh -c)"),
    Published("ctx switch 2p/0K", 0.77, 1.97, 18.1, 15.5, "context_switch (its base pointers)"),
    Published("prot fault", 1.06, 1.40, 7.53, 21.8, "none (a SIGSEGV on a protected page)"),
    Published("page fault", 1.42, 2.73, 12.4, 26.3, "populate, per page"),
    Published("mmap lat", 68.0, 139, 620, 1_400, "none (mmap and munmap of a file)"),
)
#: Where :data:`PUBLISHED` comes from, and how sure it is.
PUBLISHED_SOURCE: Final = (
    "Barham et al., Xen and the Art of Virtualization, SOSP 2003 (lmbench; values recalled, "
    "UNCONFIRMED)"
)


def published_note() -> str:
    """One line for under a table of process workloads: the published
    native vs XenoLinux fork and exec, for scale."""
    rows = {p.name: p for p in PUBLISHED}
    fork, execs = rows["fork proc"], rows["exec proc"]
    return (
        f"  published, for scale (recalled, UNCONFIRMED): lmbench fork proc {fork.linux_us:g} µs "
        f"Linux vs {fork.xenolinux_us:g} µs XenoLinux, exec proc {execs.linux_us:g} vs "
        f"{execs.xenolinux_us:g} µs (Barham et al., SOSP 2003, 32-bit; docs/cost-model.md)"
    )


def published_json() -> list[dict[str, Any]]:
    """:data:`PUBLISHED` as ``benchmarks/costs.json`` keeps it."""
    return [asdict(p) for p in PUBLISHED]


def from_dict(doc: dict[str, Any], *, base: CostModel = DEFAULT) -> CostModel:
    """A model from a JSON object: given fields replace ``base``'s."""
    known = {f.name for f in fields(CostModel)}
    unknown = sorted(set(doc) - known - {"schema", "sources", "published"})
    if unknown:
        raise CostModelError(f"unknown cost-model field(s): {', '.join(unknown)}")
    values = {k: v for k, v in doc.items() if k in known}
    if "name" in values and not isinstance(values["name"], str):
        raise CostModelError("name must be a string")
    return replace(base, **values)


def load(spec: str) -> CostModel:
    """``default`` or the path of a JSON file (fields as in :class:`CostModel`)."""
    if spec == "default":
        return DEFAULT
    path = Path(spec)
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise CostModelError(f"cannot read cost model {spec}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise CostModelError(f"cost model {spec} is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise CostModelError(f"cost model {spec} must be a JSON object")
    if "name" not in doc:
        doc = {**doc, "name": path.stem}
    return from_dict(doc)
