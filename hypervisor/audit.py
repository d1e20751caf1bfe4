"""``audit()``: recompute every count from the page tables and compare.

The incremental bookkeeping in ``pagetypes`` is what Xen trusts; this module
trusts nothing but the tables themselves (docs/sources.md §7) and lists every
disagreement, so property tests can run it after every single operation.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pvemu.shared import abi
from pvemu.shared.x86 import _PAGE_PRESENT, _PAGE_RW, ENTRIES_PER_TABLE

from .frametable import NO_OWNER, PAGE_TABLE_TYPES, PINNED, VALIDATED
from .pagetypes import FIRST_XEN_SLOT, L1_DISALLOW_MASK, L2_DISALLOW_MASK, LAST_XEN_SLOT, frame_of

if TYPE_CHECKING:
    from .domain import MachineState


@dataclass(frozen=True, slots=True)
class _Refs:
    """The references to each frame that the tables justify, per MFN:
    ``gen`` general references, ``typed`` type references (pins, base
    pointers, upper-level entries), ``writable`` writable L1 mappings."""

    gen: array[int]
    typed: array[int]
    writable: array[int]

    @classmethod
    def zeroed(cls, nr_frames: int) -> _Refs:
        return cls(
            array("I", [0]) * nr_frames, array("I", [0]) * nr_frames, array("I", [0]) * nr_frames
        )


def audit_machine(m: MachineState, xen_mfn: int) -> list[str]:
    """Every disagreement between the bookkeeping and the tables, in the
    order the checks find them: frame ownership and pins, base pointers, the
    entries of every referenced page table, then each frame's counts against
    the references those found."""
    problems: list[str] = []
    refs = _Refs.zeroed(m.frames.nr_frames)
    _check_frames(m, refs, problems)
    _check_base_pointers(m, refs, problems)
    _check_page_tables(m, xen_mfn, refs, problems)
    _check_counts(m, refs, problems)
    return problems


def _check_frames(m: MachineState, refs: _Refs, problems: list[str]) -> None:
    """Free frames hold no state, owned ones a live owner, pinned ones a
    page-table type; counts each allocation and pin."""
    ft = m.frames
    gen, typed = refs.gen, refs.typed
    for mfn in range(ft.nr_frames):
        owner = ft.owner[mfn]
        if owner == NO_OWNER:
            if ft.count[mfn] or ft.type_count[mfn] or ft.flags[mfn]:
                problems.append(f"free frame has state: {ft.describe(mfn)}")
            continue
        gen[mfn] += 1  # PGC_allocated
        if owner != abi.DOMID_XEN and owner not in m.domains:
            problems.append(f"frame owned by a dead domain: {ft.describe(mfn)}")
        if ft.flags[mfn] & PINNED:
            gen[mfn] += 1
            typed[mfn] += 1
            if ft.type[mfn] not in PAGE_TABLE_TYPES:
                problems.append(f"pinned frame is not a page table: {ft.describe(mfn)}")


def _check_base_pointers(m: MachineState, refs: _Refs, problems: list[str]) -> None:
    """Each vCPU's (user) base pointer is an own L4 and the hardware's CR3
    is the base pointer; counts each base pointer's references."""
    ft = m.frames
    gen, typed = refs.gen, refs.typed
    for domid, dom in m.domains.items():
        for kind, bases in (("cr3", dom.cr3), ("user cr3", dom.user_cr3)):
            for vcpu, base in enumerate(bases):
                if base is None:
                    continue
                gen[base] += 1
                typed[base] += 1
                if ft.owner[base] != domid or ft.type[base] != abi.PGT_l4_page_table:
                    problems.append(
                        f"dom{domid} vcpu{vcpu} {kind} not an own L4: {ft.describe(base)}"
                    )
        for vcpu, base in enumerate(dom.cr3):
            if dom.hw.cr3(vcpu) != base:
                problems.append(f"dom{domid} vcpu{vcpu} hardware CR3 differs from base pointer")


def _check_page_tables(m: MachineState, xen_mfn: int, refs: _Refs, problems: list[str]) -> None:
    """A page table is validated exactly while referenced; the entries of
    every referenced one are checked and counted."""
    ft = m.frames
    for mfn in range(ft.nr_frames):
        page_type = ft.type[mfn]
        if page_type not in PAGE_TABLE_TYPES:
            continue
        if not ft.type_count[mfn]:
            if ft.flags[mfn] & VALIDATED:
                problems.append(f"unreferenced page table still validated: {ft.describe(mfn)}")
            continue
        if not ft.flags[mfn] & VALIDATED:
            problems.append(f"referenced page table not validated: {ft.describe(mfn)}")
            continue
        if page_type == abi.PGT_l1_page_table:
            _check_l1_entries(m, mfn, refs, problems)
        else:
            _check_upper_entries(m, mfn, page_type, xen_mfn, refs, problems)


def _check_l1_entries(m: MachineState, mfn: int, refs: _Refs, problems: list[str]) -> None:
    """L1 ``mfn``'s present entries: allowed flags, a frame of the table's
    owner, and no writable mapping of a page table in use."""
    ft = m.frames
    gen, writable = refs.gen, refs.writable
    owner = ft.owner[mfn]
    table = m.memory.table(mfn)
    for index in range(ENTRIES_PER_TABLE):
        entry = table[index]
        if not entry & _PAGE_PRESENT:
            continue
        where = f"L1 {mfn:#x}[{index}] = {entry:#x}"
        if entry & L1_DISALLOW_MASK:
            problems.append(f"{where}: disallowed flags")
        target = frame_of(entry)
        if not ft.valid(target) or ft.owner[target] != owner:
            problems.append(f"{where}: maps a frame the table owner does not own")
            continue
        gen[target] += 1
        if entry & _PAGE_RW:
            writable[target] += 1
            if ft.type[target] in PAGE_TABLE_TYPES and ft.type_count[target]:
                problems.append(f"{where}: page-table frame mapped writable")


def _check_upper_entries(
    m: MachineState, mfn: int, page_type: int, xen_mfn: int, refs: _Refs, problems: list[str]
) -> None:
    """An L2/L3/L4 ``mfn``'s entries: Xen's L4 slots intact; present entries
    with allowed flags, pointing at an own table one level down."""
    ft = m.frames
    gen, typed = refs.gen, refs.typed
    owner = ft.owner[mfn]
    table = m.memory.table(mfn)
    for index in range(ENTRIES_PER_TABLE):
        entry = table[index]
        if page_type == abi.PGT_l4_page_table and FIRST_XEN_SLOT <= index <= LAST_XEN_SLOT:
            if frame_of(entry) != xen_mfn or not entry & _PAGE_PRESENT:
                problems.append(f"L4 {mfn:#x}[{index}]: Xen slot overwritten ({entry:#x})")
            continue
        if not entry & _PAGE_PRESENT:
            continue
        where = f"L{page_type} {mfn:#x}[{index}] = {entry:#x}"
        if entry & L2_DISALLOW_MASK:
            problems.append(f"{where}: disallowed flags")
        target = frame_of(entry)
        if not ft.valid(target) or ft.owner[target] != owner:
            problems.append(f"{where}: child not owned by the table owner")
            continue
        if ft.type[target] != page_type - 1:
            problems.append(f"{where}: child is not an L{page_type - 1}")
        gen[target] += 1
        typed[target] += 1


def _check_counts(m: MachineState, refs: _Refs, problems: list[str]) -> None:
    """Each owned frame's general and type counts equal the references the
    tables justify, and only tables have table references, only writable
    pages writable mappings."""
    ft = m.frames
    gen, typed, writable = refs.gen, refs.typed, refs.writable
    for mfn in range(ft.nr_frames):
        if ft.owner[mfn] == NO_OWNER:
            continue
        if ft.count[mfn] != gen[mfn]:
            problems.append(f"general count {ft.count[mfn]} != {gen[mfn]}: {ft.describe(mfn)}")
        page_type = ft.type[mfn]
        expected = writable[mfn] if page_type == abi.PGT_writable_page else typed[mfn]
        if page_type not in PAGE_TABLE_TYPES and typed[mfn]:
            problems.append(f"{typed[mfn]} table references to a non-table: {ft.describe(mfn)}")
        if page_type != abi.PGT_writable_page and writable[mfn]:
            problems.append(
                f"{writable[mfn]} writable mappings of a non-writable: {ft.describe(mfn)}"
            )
        if ft.type_count[mfn] != expected:
            problems.append(f"type count {ft.type_count[mfn]} != {expected}: {ft.describe(mfn)}")
