"""The batched mmu_update path: a run of L1 records validated and applied
with numpy array operations over the frame table and machine memory.

The per-record path (``hypercalls._pt_update`` -> ``PageTypes.mod_l1_entry``)
is the reference; this module covers the records a guest sends by the
hundred (mprotect, munmap, populate of an L1) and leaves every other record
to it. :func:`apply_run` takes the longest prefix of a window of records in
which every record

* is ``MMU_NORMAL_PT_UPDATE``, ``MMU_PT_UPDATE_PRESERVE_AD``,
  ``MMU_PT_UPDATE_NO_TRANSLATE`` or (outside a multicall) pvemu's
  ``MMU_PT_XCHG_PVEMU``, whose rule is the same L1 write with the old
  entry handed back, aimed at an entry of a validated L1
  (type count > 0) that the caller owns, at an address no earlier record of
  the prefix wrote;
* writes a non-present entry, or a present one without disallowed bits
  that is the old entry up to the fast-path bits (no reference work), or a
  present one whose frame the caller owns, with a non-zero count and, when
  the entry is writable, a frame already of the writable type (so no type
  change, no validation, no TLB flush); and
* drops, for an old present entry replaced other than by the fast path, a
  reference to a frame that is writable-typed whenever the old entry was
  writable.

Sequential equality holds because, within such a prefix, nothing one record
does changes what decides another: targets are distinct entries, so each
old value is the one in memory before the batch; no frame changes type (a
write-typed get on a writable frame never retypes, a put never takes a
writable frame's type count below the mappings that audit() counts, and a
validated L1 is never write-typed or write-put); and every count stays
above zero, since the general count of an owned frame includes its
allocation and every put drops a reference a mapping held (the invariants
``audit()`` recomputes). The record that ends the prefix - an error or
anything not covered - goes to the per-record path, which reports or
applies it exactly as before. An exchange's old value is the entry the
window read, which no earlier record of the prefix wrote (distinct
targets) and the hardware model cannot change mid-call.

Two lanes do the work. Most windows are runs of records into one L1 (a
PTE page) that only change flags of present entries (mprotect): the one-frame
lane checks the target frame once and the window with three reductions and
an order test, about 20 numpy calls whatever the window's size. An entry
keeping its frame needs no owner or count check there: a present entry of a
validated L1 already holds a general reference to a frame of the L1's owner,
and its writable type when it is RW (what ``audit()`` checks); only a frame
gaining RW is looked up. Anything else (records into several frames, clears,
new mappings, exchanges, errors, repeated addresses) goes to the general lane, which
computes each record's verdict from the frame table and cuts the window at
the first record it does not cover.

Values are handled as int64 views of the u64 words (a frame index is then an
``intp`` with no conversion); every shift is masked, so bit 63 set in a value
never leaks into a frame number, and a target address with bit 63 set gives
a negative frame number, which is out of range.

Sans-I/O, like the rest of the core: plain functions over arrays.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import numpy as np
from numpy.typing import NDArray

from pvemu.shared import abi
from pvemu.shared.x86 import (
    _PAGE_GLOBAL,
    _PAGE_GUEST_KERNEL,
    _PAGE_PRESENT,
    _PAGE_RW,
    _PAGE_USER,
    ENTRIES_PER_TABLE,
    PAGE_AD,
    PAGE_SHIFT,
    PTE_MFN_MASK,
)

from .frametable import VALIDATED
from .pagetypes import FASTPATH_WHITELIST, L1_DISALLOW_MASK

if TYPE_CHECKING:
    from array import array
    from collections.abc import Sequence

    from .domain import Domain, MachineState
    from .frametable import FrameTable

Words = NDArray[np.int64]
Mask = NDArray[np.bool_]

#: Use the array path at all (tests set it False to force the reference path).
ENABLED = True
#: Fewest records worth a numpy pass: below it the per-record path is faster.
MIN_RUN = 16
#: A run into one frame shorter than this, followed by records into other
#: frames, sends the whole window to the general lane.
MIN_SEGMENT = 32
#: After a window whose first record the array path could not take, the next
#: this-many records (doubling while it keeps happening, up to MAX_BACKOFF)
#: go straight to the per-record path: a batch the array path mostly cannot
#: take costs one wasted pass per BACKOFF records, not one per record.
BACKOFF = 16
MAX_BACKOFF = 1024
#: Largest window one pass looks at (bounds the work wasted by an early cut).
MAX_WINDOW = 4096

_INDEX_MASK: Final = ENTRIES_PER_TABLE - 1
_FRAME_BITS: Final = PTE_MFN_MASK >> PAGE_SHIFT
#: A record's target frame and command: its ``ptr`` without the entry index.
_KEY_MASK: Final = ~(_INDEX_MASK << 3)
_ADDR_MASK: Final = ~7
_NOT_WHITELISTED: Final = ~FASTPATH_WHITELIST & ((1 << 64) - 1)
_P_OR_DISALLOWED: Final = _PAGE_PRESENT | L1_DISALLOW_MASK
#: What a flag change in the one-frame lane may not touch (with the value's
#: disallowed bits excluded, only RW is then left outside the fast-path bits).
_FIXED: Final = PTE_MFN_MASK | _PAGE_PRESENT | L1_DISALLOW_MASK

_PT_CMDS: Final = (
    abi.MMU_NORMAL_PT_UPDATE,
    abi.MMU_PT_UPDATE_PRESERVE_AD,
    abi.MMU_PT_UPDATE_NO_TRANSLATE,
)
#: By command (``ptr & 7``): does the array path take it, and which old bits
#: a write keeps (PRESERVE_AD's merge).
_CMD_OK: Final = np.isin(np.arange(8), _PT_CMDS)
#: The same with ``MMU_PT_XCHG_PVEMU``, where its old entries can go back.
_CMD_OK_XCHG: Final = np.isin(np.arange(8), (*_PT_CMDS, abi.MMU_PT_XCHG_PVEMU))
_CMD_KEEP: Final = np.zeros(8, dtype=np.int64)
_CMD_KEEP[abi.MMU_PT_UPDATE_PRESERVE_AD] = PAGE_AD

#: ``adjust_guest_l1e`` as bits to OR in, by (U, GUEST_KERNEL) of the value:
#: no U -> U|GK; U without GK -> GLOBAL; both -> nothing.
_ADJUST: Final[Words] = np.array(
    [
        _PAGE_USER | _PAGE_GUEST_KERNEL,  # U=0, GK=0
        _PAGE_GLOBAL,  # U=1, GK=0
        _PAGE_USER | _PAGE_GUEST_KERNEL,  # U=0, GK=1
        0,  # U=1, GK=1
    ],
    dtype=np.int64,
)
_GK_TO_BIT1: Final = 51  # bit 52 (GUEST_KERNEL) -> bit 1; U is bit 2
_ONES: Final = np.ones(MAX_WINDOW, dtype=np.uint32)
_ONES.flags.writeable = False


def records_array(reqs: Sequence[int]) -> Words:
    """The flat records (ptr0, val0, ...) as int64 bit patterns: a view of
    the request's blob, or a copy of any other sequence."""
    if isinstance(reqs, memoryview):
        return np.frombuffer(reqs, dtype=np.int64)
    return np.array(reqs, dtype=np.uint64).view(np.int64)


def apply_run(
    m: MachineState,
    dom: Domain,
    recs: Words,
    start: int,
    stop: int,
    olds: array[int] | None = None,
) -> int:
    """Apply the longest covered prefix of records ``start .. stop - 1`` of
    ``recs`` (flat ptr, val pairs) for ``dom`` acting on itself; return how
    many records it applied (0 .. stop - start).

    Applied means exactly what the per-record path would have done for them:
    memory, counts, the oracle's view of each write. The caller counts them.
    ``olds``: where the old entries of applied ``MMU_PT_XCHG_PVEMU`` records
    go, in record order; None leaves those records to the per-record path
    (which refuses them: a multicall entry).
    """
    table = dom.memory.entries.view(np.int64)
    done = start
    while done < stop:
        ptr = recs[2 * done : 2 * stop : 2]
        val = recs[2 * done + 1 : 2 * stop : 2]
        first = int(ptr[0]) & _KEY_MASK
        segment = len(ptr)
        if int(np.bitwise_or.reduce(ptr ^ first)) & _KEY_MASK:  # not all one key
            segment = int(np.argmin((ptr & _KEY_MASK) == first))
            if segment < MIN_SEGMENT:
                return done - start + _general(m, dom, table, ptr, val, olds)
            ptr, val = ptr[:segment], val[:segment]
        if first & 7 == abi.MMU_PT_XCHG_PVEMU and olds is not None:
            applied = _general(m, dom, table, ptr, val, olds)
        else:
            applied = _one_frame(m, dom, table, ptr, val, first)
        done += applied
        if applied < segment:
            break
    return done - start


def _one_frame(m: MachineState, dom: Domain, table: Words, ptr: Words, val: Words, key: int) -> int:
    """Records that all share ``key`` (one target frame, one command): flag
    changes of present entries here, the rest through the general lane."""
    mfn, cmd = key >> PAGE_SHIFT, key & 7
    ft = m.frames
    if cmd not in _PT_CMDS or not _is_own_l1(ft, mfn, dom.domid):
        return 0  # the first record fails (or is not covered) like all of them
    row = table[ft.slot[mfn]]
    index = (ptr >> 3) & _INDEX_MASK
    old = row[index]
    # adjust_guest_l1e only sets fast-path bits, so the raw value will do
    # for every test but the stored value. Whole-window facts come from three
    # reductions: bits set in any changed entry, in every value, in any value.
    changed = old ^ val
    any_changed = int(np.bitwise_or.reduce(changed))
    every_val = int(np.bitwise_and.reduce(val))
    any_val = int(np.bitwise_or.reduce(val))
    # Every value present without disallowed bits, every old entry present
    # with the same frame, no entry twice: else the general lane decides.
    if (
        any_changed & _FIXED
        or not every_val & _PAGE_PRESENT
        or any_val & L1_DISALLOW_MASK
        or not _distinct(index)
    ):
        return _general(m, dom, table, ptr, val)
    # Only RW can differ outside the fast-path bits now: get_page and
    # put_page cancel; the writable type is taken or dropped where RW flips.
    if any_changed & _PAGE_RW and not _flip_writable(m, changed, old, val, every_val, any_val):
        return _general(m, dom, table, ptr, val)  # a retype: not this lane's
    if every_val & _PAGE_USER and every_val & (_PAGE_GUEST_KERNEL | _PAGE_GLOBAL):
        new = val  # what the guest read back: adjust_guest_l1e changes nothing
    else:
        new = _adjusted(val)
    if cmd == abi.MMU_PT_UPDATE_PRESERVE_AD:
        new = new | (old & PAGE_AD)
    row[index] = new
    dom.oracle.pte_written_in_frame(mfn, index, new)
    return len(ptr)


def _flip_writable(
    m: MachineState, changed: Words, old: Words, val: Words, every_val: int, any_val: int
) -> bool:
    """Take the writable type of each frame whose entry gains RW, drop it
    where RW goes; False (nothing done) if a gaining frame is not writable-
    typed yet (a retype, which the per-record path does)."""
    fa = m.frames.arrays
    if np.bitwise_and.reduce(changed) & _PAGE_RW and (
        every_val & _PAGE_RW or not any_val & _PAGE_RW
    ):
        # Every entry flips the same way (mprotect): no per-entry selection.
        gained, lost = (val, None) if every_val & _PAGE_RW else (None, old)
    else:
        flips = changed & _PAGE_RW
        gained, lost = val[(flips & val) != 0], old[(flips & old) != 0]
    if gained is not None and len(gained):
        frames = (gained >> PAGE_SHIFT) & _FRAME_BITS
        writable = (fa.type[frames] == abi.PGT_writable_page) & (fa.flags[frames] & VALIDATED)
        if np.count_nonzero(writable) < len(frames):
            return False
        np.add.at(fa.type_count, frames, _ones(len(frames)))
    if lost is not None and len(lost):
        frames = (lost >> PAGE_SHIFT) & _FRAME_BITS
        np.subtract.at(fa.type_count, frames, _ones(len(frames)))
    return True


def _general(
    m: MachineState,
    dom: Domain,
    table: Words,
    ptr: Words,
    val: Words,
    olds: array[int] | None = None,
) -> int:
    """Any records: each one's verdict as in ``_pt_update``/``mod_l1_entry``
    (or ``_pt_xchg``, the same L1 rule) from the state before the window;
    apply the prefix before the first one not covered (see the module
    docstring for why that prefix is exact)."""
    fa = m.frames.arrays
    nr_frames = m.frames.nr_frames
    domid = dom.domid
    mfn = ptr >> PAGE_SHIFT
    cmd_ok = _CMD_OK if olds is None else _CMD_OK_XCHG
    ok = cmd_ok[ptr & 7] & (mfn >= 0) & (mfn < nr_frames)
    frames = np.where(ok, mfn, 0)
    ok &= (
        (fa.owner[frames] == domid)
        & (fa.type[frames] == abi.PGT_l1_page_table)
        & (fa.type_count[frames] != 0)
        & ((fa.flags[frames] & VALIDATED) != 0)
    )
    slots = np.where(ok, fa.slot[frames], 0)
    index = (ptr >> 3) & _INDEX_MASK
    old = table[slots, index]

    present = (val & _PAGE_PRESENT) != 0
    adjusted = _adjusted(val)
    ok &= ~present | ((val & L1_DISALLOW_MASK) == 0)
    slow = ~present | (((old ^ adjusted) & _NOT_WHITELISTED) != 0)
    get = present & slow
    new_frame = (adjusted >> PAGE_SHIFT) & _FRAME_BITS
    old_frame = (old >> PAGE_SHIFT) & _FRAME_BITS
    # put_page_from_l1e ignores a frame beyond RAM.
    put = ((old & _PAGE_PRESENT) != 0) & slow & (old_frame < nr_frames)
    new_rw = get & ((val & _PAGE_RW) != 0)
    old_rw = put & ((old & _PAGE_RW) != 0)
    if np.count_nonzero(get):
        # get_page_from_l1e: a frame of the caller in use, writable-typed if RW.
        in_ram = new_frame < nr_frames
        got = np.where(get & in_ram, new_frame, 0)
        ok &= ~get | (in_ram & (fa.owner[got] == domid) & (fa.count[got] != 0))
        writable = (fa.type[got] == abi.PGT_writable_page) & ((fa.flags[got] & VALIDATED) != 0)
        ok &= ~new_rw | writable
    if np.count_nonzero(old_rw):
        # put_page_type on a writable frame never tears a table down.
        ok &= ~old_rw | (fa.type[np.where(old_rw, old_frame, 0)] == abi.PGT_writable_page)

    maddr = ptr & _ADDR_MASK
    run = len(ptr) if np.count_nonzero(ok) == len(ptr) else int(np.argmin(ok))
    run = _before_repeat(maddr[:run])
    if run == 0:
        return 0
    if olds is not None:
        xchg = (ptr[:run] & 7) == abi.MMU_PT_XCHG_PVEMU
        if np.count_nonzero(xchg):
            # The guest sees these entries, D included, before they change.
            dom.oracle.guest_saw_all(maddr[:run][xchg].tolist())
            olds.frombytes(old[:run][xchg].tobytes())
    new = np.where(present, adjusted, val) | (old & _CMD_KEEP[ptr & 7])
    table[slots[:run], index[:run]] = new[:run]
    _count_delta(fa.count, new_frame[:run], get[:run], old_frame[:run], put[:run])
    _count_delta(fa.type_count, new_frame[:run], new_rw[:run], old_frame[:run], old_rw[:run])
    dom.oracle.pte_written_many(maddr[:run], new[:run])
    return run


def _ones(n: int) -> NDArray[np.uint32]:
    """``n`` ones for ``np.add.at`` (uint32 like the counts: the fast path)."""
    return _ONES[:n] if n <= len(_ONES) else np.ones(n, dtype=np.uint32)


def _distinct(index: Words) -> bool:
    """No entry index twice (the window's writes then commute)."""
    seen = np.zeros(ENTRIES_PER_TABLE, dtype=np.bool_)
    seen[index] = True
    return int(np.count_nonzero(seen)) == len(index)


def _adjusted(val: Words) -> Words:
    """``adjust_guest_l1e`` of every value (used only where it is present)."""
    bits: Words = _ADJUST[((val >> 2) & 1) | ((val >> _GK_TO_BIT1) & 2)]
    return val | bits


def _is_own_l1(ft: FrameTable, mfn: int, domid: int) -> bool:
    """``_pt_update``'s test for the L1 branch, on one frame."""
    return (
        ft.valid(mfn)
        and ft.owner[mfn] == domid
        and ft.type_count[mfn] != 0
        and bool(ft.flags[mfn] & VALIDATED)
        and ft.type[mfn] == abi.PGT_l1_page_table
    )


def _before_repeat(maddrs: Words) -> int:
    """How many leading records write addresses no record before them wrote."""
    if len(maddrs) < 2 or not np.count_nonzero(maddrs[1:] <= maddrs[:-1]):
        return len(maddrs)  # strictly increasing: the common case, no sort
    order = np.argsort(maddrs, kind="stable")
    ordered = maddrs[order]
    repeats = order[1:][ordered[1:] == ordered[:-1]]
    return int(repeats.min()) if len(repeats) else len(maddrs)


def _count_delta(
    counts: NDArray[np.uint32], gained: Words, gain: Mask, lost: Words, lose: Mask
) -> None:
    """counts[gained[i]] += 1 where gain, counts[lost[i]] -= 1 where lose
    (frames may repeat). A record that gains and loses the same frame (a
    flag change) nets zero and is skipped."""
    same = gain & lose & (gained == lost)
    gain = gain & ~same
    lose = lose & ~same
    if np.count_nonzero(gain):
        frames = gained[gain]
        np.add.at(counts, frames, _ones(len(frames)))
    if np.count_nonzero(lose):
        frames = lost[lose]
        np.subtract.at(counts, frames, _ones(len(frames)))


__all__ = ["ENABLED", "apply_run", "records_array"]
