"""Trap counts, one definition for every layer.

A trap is every guest -> hypervisor transition (docs/sources.md §1): each top-level
hypercall (a multicall is one, whatever it carries), each emulated page-table
write and each page fault reflected to the guest. :func:`trap_count` is that
formula; the hypervisor's per-vCPU counters and the guest's own count both
use it, so the two sides cannot drift apart.

:class:`PhaseCounts` is what one phase of a workload cost, as ``pvemu run
--json`` and ``pvemu guest --json`` report it per phase and as ``pvemu bench``
stores and gates it. Its field names are those JSON keys; :data:`PHASE_FIELDS`
(the fields, in table order) is the one list of them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Final


def trap_count(hypercalls: int, ptwr: int, page_faults: int) -> int:
    """Traps: top-level hypercalls + emulated page-table writes + page faults."""
    return hypercalls + ptwr + page_faults


@dataclass(frozen=True, slots=True)
class PhaseCounts(Mapping[str, int]):
    """The counters of one workload phase (hypervisor side; ``page_faults`` is
    the guest kernel's). Read-only; also a ``Mapping`` keyed by field name, so
    ``counts["traps"]`` and ``dict(counts)`` give the JSON form."""

    traps: int = 0
    hypercalls: int = 0
    multicall_entries: int = 0
    #: mmu_update records (``mmu_update_records`` in the stats reply).
    records: int = 0
    ptwr: int = 0
    page_faults: int = 0
    #: TLB flush operations (``tlb_flush_ops`` in the stats reply).
    flush_ops: int = 0

    def __add__(self, other: PhaseCounts) -> PhaseCounts:
        return PhaseCounts(*(self[f] + other[f] for f in PHASE_FIELDS))

    def __sub__(self, other: PhaseCounts) -> PhaseCounts:
        return PhaseCounts(*(self[f] - other[f] for f in PHASE_FIELDS))

    def __getitem__(self, name: str) -> int:
        if name not in _FIELD_SET:
            raise KeyError(name)
        value: int = getattr(self, name)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(PHASE_FIELDS)

    def __len__(self) -> int:
        return len(PHASE_FIELDS)


#: The per-phase counters in table order: the JSON keys of a phase, the
#: columns of the run and trace tables, and the counts ``pvemu bench`` gates.
PHASE_FIELDS: Final[tuple[str, ...]] = tuple(f.name for f in fields(PhaseCounts))
_FIELD_SET: Final = frozenset(PHASE_FIELDS)
