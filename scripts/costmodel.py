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
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Final

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


def from_dict(doc: dict[str, Any], *, base: CostModel = DEFAULT) -> CostModel:
    """A model from a JSON object: given fields replace ``base``'s."""
    known = {f.name for f in fields(CostModel)}
    unknown = sorted(set(doc) - known - {"schema", "sources"})
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
