"""``audit()``: recompute every count from the page tables and compare.

The incremental bookkeeping in ``pagetypes`` is what Xen trusts; this module
trusts nothing but the tables themselves (reference §6.8) and lists every
disagreement, so property tests can run it after every single operation.
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING

from pvemu.shared import abi
from pvemu.shared.x86 import _PAGE_PRESENT, _PAGE_RW, ENTRIES_PER_TABLE

from .frametable import NO_OWNER, PAGE_TABLE_TYPES, PINNED, VALIDATED
from .pagetypes import FIRST_XEN_SLOT, L1_DISALLOW_MASK, L2_DISALLOW_MASK, LAST_XEN_SLOT, frame_of

if TYPE_CHECKING:
    from .domain import MachineState


def audit_machine(m: MachineState, xen_mfn: int) -> list[str]:
    ft = m.frames
    n = ft.nr_frames
    problems: list[str] = []
    gen = array("I", [0]) * n
    typed = array("I", [0]) * n
    writable = array("I", [0]) * n

    for mfn in range(n):
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

    for mfn in range(n):
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
        owner = ft.owner[mfn]
        table = m.memory.table(mfn)
        if page_type == abi.PGT_l1_page_table:
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
            continue
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

    for mfn in range(n):
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
    return problems
