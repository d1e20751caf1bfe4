"""The kernel's PTE rules, each in two forms: one PTE (the reference) and a
run of a PTE page as numpy arrays (the range form of ``change_pte_range``).

Linux reads and changes PTEs one at a time (``modify_prot_start_ptes`` and
``modify_prot_commit_ptes`` are loops over the single-PTE hooks); a Python
loop over 512 entries costs far more than the hypercall that carries them,
so the batched modes read a PTE page once and apply each rule to all its
entries at once. The array forms here are exactly the scalar ones, entry by
entry (``tests/test_range_form.py`` proves it); both forms live side by side
so that a change to one shows next to the other.

Arrays are native-endian ``uint64`` (the guest's ``array('Q')`` record queue
is too; the wire's little-endian blob is made from it once, at flush).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import numpy as np

from pvemu.shared.x86 import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_GLOBAL,
    _PAGE_NX,
    _PAGE_PRESENT,
    _PAGE_RW,
    _PAGE_USER,
    ENTRIES_PER_TABLE,
    PAGE_SHIFT,
    PTE_MFN_MASK,
    PTE_SIZE,
)

if TYPE_CHECKING:
    import numpy.typing as npt

    from .machine import Machine

    #: PTE values (or anything u64) of a run.
    Ptes = npt.NDArray[np.uint64]
    #: Entry indexes in a PTE page.
    Indexes = npt.NDArray[np.intp]
    #: Per-entry truth values.
    Mask = npt.NDArray[np.bool_]

#: Linux reuses the Global bit as PROTNONE in a non-present PTE.
_PAGE_PROTNONE: Final = _PAGE_GLOBAL
#: Bits ``pte_modify`` keeps: the frame, A, D and the software bits.
PAGE_CHG_MASK: Final = PTE_MFN_MASK | _PAGE_ACCESSED | _PAGE_DIRTY | 0xE00

_U64: Final = np.uint64
_P: Final = _U64(_PAGE_PRESENT)
_RW: Final = _U64(_PAGE_RW)
_USER: Final = _U64(_PAGE_USER)
_DIRTY: Final = _U64(_PAGE_DIRTY)
_NX: Final = _U64(_PAGE_NX)
_MFN: Final = _U64(PTE_MFN_MASK)
_PRESENT_BITS: Final = _U64(_PAGE_PRESENT | _PAGE_PROTNONE)
_CHG: Final = _U64(PAGE_CHG_MASK)
_ZERO: Final = _U64(0)
#: Bits whose loss, or gain, makes ``pte_needs_flush`` true (given old P).
_FLUSH_IF_LOST: Final = _U64(_PAGE_PRESENT | _PAGE_RW | _PAGE_DIRTY | _PAGE_USER | PTE_MFN_MASK)
_FLUSH_IF_GAINED: Final = _U64(_PAGE_NX | PTE_MFN_MASK)
#: 0 .. 511: slices of it are the indexes of a run with every entry present.
_SLOTS: Final = np.arange(ENTRIES_PER_TABLE, dtype=np.intp)
_SLOTS.flags.writeable = False


# --- one PTE --------------------------------------------------------------------------


def pte_present(pte: int) -> bool:
    """Present for the kernel: P, or a PROT_NONE entry that keeps its page."""
    return bool(pte & (_PAGE_PRESENT | _PAGE_PROTNONE)) and bool(pte & PTE_MFN_MASK)


def pte_modify(pte: int, newprot: int) -> int:
    """Keep the frame and A/D, take everything else from ``newprot``."""
    return (pte & PAGE_CHG_MASK) | (newprot & ~PAGE_CHG_MASK)


def can_change_writable(private: bool, pte: int) -> bool:
    """Modern ``can_change_pte_writable``: exclusive anonymous pages, or
    already-dirty pages of a shared mapping (2008's ``dirty_accountable``).
    A private page is exclusive unless another process maps it (after
    fork): the kernel checks that apart, with its map counts."""
    if not pte & _PAGE_PRESENT:
        return False
    return private or bool(pte & _PAGE_DIRTY)


def pte_needs_flush(old: int, new: int) -> bool:
    """x86's rule: flush only when access is taken away (or the frame moves)."""
    if not old & _PAGE_PRESENT:
        return False
    if not new & _PAGE_PRESENT or (old ^ new) & PTE_MFN_MASK:
        return True
    if old & _PAGE_RW and not new & _PAGE_RW:
        return True
    if old & _PAGE_DIRTY and not new & _PAGE_DIRTY:
        return True
    return bool(new & _PAGE_NX and not old & _PAGE_NX) or bool(
        old & _PAGE_USER and not new & _PAGE_USER
    )


# --- a run of a PTE page --------------------------------------------------------------


def read_ptes(machine: Machine, table: int, first: int, count: int) -> Ptes:
    """Entries ``first .. first + count`` of the PTE page in frame ``table``:
    one read of the memory the guest sees (a copy, so later hardware A/D
    updates do not show through; read-only)."""
    data = machine.read_bytes((table << PAGE_SHIFT) | (first * PTE_SIZE), count * PTE_SIZE)
    ptes: Ptes = np.frombuffer(data, dtype="<u8")
    return ptes


def ptes_present(ptes: Ptes) -> Mask:
    """:func:`pte_present` of each entry."""
    mask: Mask = ((ptes & _PRESENT_BITS) != _ZERO) & ((ptes & _MFN) != _ZERO)
    return mask


def present_run(window: Ptes, first: int) -> tuple[Indexes, Indexes, Ptes]:
    """The present entries of ``window`` (entries ``first ..`` of a PTE page):
    their offsets in the window, their indexes in the page, their values.
    When all are present (the common case) these are views, not copies."""
    count = len(window)
    present_bits = window & _PRESENT_BITS
    frames = window & _MFN
    if np.count_nonzero(present_bits) == count and np.count_nonzero(frames) == count:
        return _SLOTS[:count], _SLOTS[first : first + count], window
    offsets = np.flatnonzero((present_bits != _ZERO) & (frames != _ZERO))
    return offsets, offsets + first, window[offsets]


def ptes_modify(ptes: Ptes, newprot: int) -> Ptes:
    """:func:`pte_modify` of each entry."""
    out: Ptes = ptes & _CHG
    out |= _U64(newprot & ~PAGE_CHG_MASK)
    return out


def ptes_can_change_writable(private: bool, ptes: Ptes) -> Mask:
    """:func:`can_change_writable` of each entry."""
    present: Mask = (ptes & _P) != _ZERO
    if private:
        return present
    mask: Mask = present & ((ptes & _DIRTY) != _ZERO)
    return mask


def ptes_need_flush(old: Ptes, new: Ptes) -> Mask:
    """:func:`pte_needs_flush` of each pair."""
    hits = _flush_hits(old, new)
    hits *= old & _P
    mask: Mask = hits != _ZERO
    return mask


def flush_offsets(old: Ptes, new: Ptes, limit: int) -> Indexes:
    """The positions of the first ``limit`` pairs that :func:`pte_needs_flush`."""
    hits = _flush_hits(old, new)
    if not np.count_nonzero(hits):  # the usual answer when access is only added
        return _SLOTS[:0]
    hits *= old & _P
    offsets: Indexes = np.flatnonzero(hits)[:limit]
    return offsets


def _flush_hits(old: Ptes, new: Ptes) -> Ptes:
    """Non-zero where :func:`pte_needs_flush` holds if the old entry is
    present (P: only a present entry can be cached in a TLB): P, RW, D or U
    taken away, NX added, or the frame changed."""
    hits: Ptes = (old & _FLUSH_IF_LOST) | (new & _FLUSH_IF_GAINED)
    hits &= old ^ new
    return hits


def pte_maddrs(table: int, indexes: Indexes) -> list[int]:
    """The machine addresses of entries ``indexes`` of the PTE page ``table``
    (for the per-PTE bookkeeping that has no array form)."""
    maddrs: list[int] = ((indexes * PTE_SIZE) | (table << PAGE_SHIFT)).tolist()
    return maddrs


def mmu_update_records(table: int, indexes: Indexes, cmd: int, vals: Ptes) -> Ptes:
    """The ``mmu_update`` records ``ptep | cmd := val`` for entries
    ``indexes`` of the PTE page ``table``, in the wire's layout: one flat
    array of ``ptr, val`` u64 pairs (Xen's ``struct mmu_update[]``)."""
    records: Ptes = np.empty(2 * len(indexes), dtype=_U64)
    ptrs = indexes * PTE_SIZE  # a PTE page's offsets and a frame's address fit in int64
    ptrs |= (table << PAGE_SHIFT) | cmd
    records[0::2] = ptrs
    records[1::2] = vals
    return records


__all__ = [
    "PAGE_CHG_MASK",
    "can_change_writable",
    "flush_offsets",
    "mmu_update_records",
    "pte_maddrs",
    "pte_modify",
    "pte_needs_flush",
    "pte_present",
    "present_run",
    "ptes_can_change_writable",
    "ptes_modify",
    "ptes_need_flush",
    "ptes_present",
    "read_ptes",
]
