"""A process's page-table tree as Linux on Xen PV pins and unpins it.

Linux pins a new mm's tree in one multicall batch (``__xen_pgd_pin``) and
unpins it in one (``__xen_pgd_unpin``) before tearing it down. Both walk
the user half of the tree depth first (each L3 page, then each L2 page
under it, then that L2's L1 pages) and touch the kernel L4 last. For each
page-table page the batch carries an ``update_va_mapping`` of the page's
address in the kernel's linear map (read-only before a pin, writable
again after an unpin: Xen refuses a writable mapping of a frame typed as
a page table), and for each L1 page a ``PIN_L1`` / ``UNPIN`` (the split
PTE locks). Nothing merges in the walk, because ``update_va_mapping`` and
``mmuext_op`` entries alternate, so a tree with P1 PTE pages, P2 PMD pages
and P3 PUD pages costs

* pin: 2·P1 + P2 + P3 + 4 multicall entries (the last four: the kernel L4's
  remap and ``PIN_L4``, the user L4's remap and ``PIN_L4``);
* unpin: 2·P1 + P2 + P3 + 3 (the two L4 unpins merge into one
  ``mmuext_op`` entry, then the user L4's remap, the walk, the kernel L4's
  remap last);

and a batch flushes whenever Linux's 32 slots fill, so ⌈E/32⌉ hypercalls.
This module builds those entry lists (sans I/O); the backends send them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

import numpy as np

from pvemu.shared import abi
from pvemu.shared.x86 import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_NX,
    _PAGE_PRESENT,
    _PAGE_RW,
    ENTRIES_PER_TABLE,
    LINEAR_MAP_BASE,
    PAGE_SHIFT,
    PTE_MFN_MASK,
    make_pte,
)

#: L4 slots of the user half (below the hypervisor's slots).
USER_L4_SLOTS: Final = 256
_PRESENT: Final = np.uint64(_PAGE_PRESENT)
_MFN: Final = np.uint64(PTE_MFN_MASK)
_SHIFT: Final = np.uint64(PAGE_SHIFT)

#: A linear-map mapping of a page-table page: read-only (pinned) or writable.
_LINEAR_RO: Final = _PAGE_PRESENT | _PAGE_ACCESSED | _PAGE_NX
_LINEAR_RW: Final = _LINEAR_RO | _PAGE_RW | _PAGE_DIRTY

#: One multicall entry as the backends queue it: ``("uvm", va, val, flags)``
#: or ``("ext", cmd, mfn, extend)`` (``extend``: may merge into a previous
#: ``mmuext_op`` entry, as ``xen_extend_mmuext_op`` does).
Entry = tuple[str, int, int, int]

#: Reads ``count`` entries of a table: (frame, first, count) -> bytes.
ReadTable = Callable[[int, int, int], bytes]


@dataclass(frozen=True, slots=True)
class TreePage:
    """One page-table page of a tree: its frame and level (1 = PTE page)."""

    mfn: int
    level: int


def _children(read: ReadTable, table: int, slots: int) -> list[int]:
    entries = np.frombuffer(read(table, 0, slots), dtype="<u8")
    present = entries[(entries & _PRESENT) != 0]
    children: list[int] = ((present & _MFN) >> _SHIFT).tolist()
    return children


def walk_user_tree(read: ReadTable, l4: int) -> list[TreePage]:
    """The page-table pages under the user half of ``l4``, in the order
    Linux's pin walk visits them: depth first, each table before the
    tables it points to (tables are read, no trap)."""
    order: list[TreePage] = []
    for l3 in _children(read, l4, USER_L4_SLOTS):
        order.append(TreePage(l3, 3))
        for l2 in _children(read, l3, ENTRIES_PER_TABLE):
            order.append(TreePage(l2, 2))
            order.extend(TreePage(l1, 1) for l1 in _children(read, l2, ENTRIES_PER_TABLE))
    return order


def linear_va(pfn: int) -> int:
    """The address of pseudo-physical frame ``pfn`` in the kernel's linear map."""
    return LINEAR_MAP_BASE + (pfn << PAGE_SHIFT)


def _remap(pfn_of: Callable[[int], int], mfn: int, writable: bool, flags: int) -> Entry:
    prot = _LINEAR_RW if writable else _LINEAR_RO
    return ("uvm", linear_va(pfn_of(mfn)), make_pte(mfn, prot), flags)


def pin_entries(
    pages: Iterable[TreePage],
    l4: int,
    user_l4: int | None,
    pfn_of: Callable[[int], int],
) -> list[Entry]:
    """``__xen_pgd_pin``'s batch: each page remapped read-only (each L1 also
    pinned), then the kernel L4 (remap with a TLB flush, ``PIN_L4``), then
    the user L4 the same way."""
    entries: list[Entry] = []
    for page in pages:
        entries.append(_remap(pfn_of, page.mfn, False, 0))
        if page.level == 1:
            entries.append(("ext", abi.MMUEXT_PIN_L1_TABLE, page.mfn, 1))
    for root in (l4, user_l4):
        if root is not None:
            entries.append(_remap(pfn_of, root, False, abi.UVMF_TLB_FLUSH))
            entries.append(("ext", abi.MMUEXT_PIN_L4_TABLE, root, 1))
    return entries


def unpin_entries(
    pages: Iterable[TreePage],
    l4: int,
    user_l4: int | None,
    pinned_l1s: set[int],
    pfn_of: Callable[[int], int],
) -> list[Entry]:
    """``__xen_pgd_unpin``'s batch: both L4s unpinned (one merged entry: Xen
    drops the tree's type references), the user L4 remapped writable, then
    per page of the walk: an L1 pinned on its own is unpinned, and every page
    is remapped writable; the kernel L4's remap comes last."""
    entries: list[Entry] = [("ext", abi.MMUEXT_UNPIN_TABLE, l4, 1)]
    if user_l4 is not None:
        entries.append(("ext", abi.MMUEXT_UNPIN_TABLE, user_l4, 1))
        entries.append(_remap(pfn_of, user_l4, True, abi.UVMF_TLB_FLUSH))
    for page in pages:
        if page.level == 1 and page.mfn in pinned_l1s:
            entries.append(("ext", abi.MMUEXT_UNPIN_TABLE, page.mfn, 1))
        entries.append(_remap(pfn_of, page.mfn, True, 0))
    entries.append(_remap(pfn_of, l4, True, abi.UVMF_TLB_FLUSH))
    return entries


def alloc_table_entries(
    mfn: int, level: int, pfn_of: Callable[[int], int], *, pinned: bool = False
) -> list[Entry]:
    """``xen_alloc_ptpage`` for a table added to a pinned tree: remapped
    read-only, and an L1 also pinned (its split PTE lock), in one batch.
    ``pinned``: the page is already marked pinned (an L1 mremap moves with
    its PMD entry), so only the remap is queued."""
    entries = [_remap(pfn_of, mfn, False, 0)]
    if level == 1 and not pinned:
        entries.append(("ext", abi.MMUEXT_PIN_L1_TABLE, mfn, 1))
    return entries


def release_table_entries(
    mfn: int, level: int, pinned: bool, pfn_of: Callable[[int], int]
) -> list[Entry]:
    """``xen_release_ptpage`` for a table ``free_pgtables`` took out of a
    pinned tree (its entry already cleared): an L1 pinned on its own is
    unpinned (its split PTE lock), then the page is remapped writable, in
    one batch; the frame is plain memory again."""
    entries: list[Entry] = []
    if level == 1 and pinned:
        entries.append(("ext", abi.MMUEXT_UNPIN_TABLE, mfn, 1))
    entries.append(_remap(pfn_of, mfn, True, 0))
    return entries


def tree_counts(pages: Iterable[TreePage]) -> tuple[int, int, int]:
    """(P1, P2, P3): PTE, PMD and PUD pages of a walk."""
    counts = [0, 0, 0, 0]
    for page in pages:
        counts[page.level] += 1
    return counts[1], counts[2], counts[3]


__all__ = [
    "USER_L4_SLOTS",
    "Entry",
    "TreePage",
    "alloc_table_entries",
    "linear_va",
    "pin_entries",
    "release_table_entries",
    "tree_counts",
    "unpin_entries",
    "walk_user_tree",
]
