"""Tests for guest.vma: Linux mmap/mprotect/munmap/msync semantics on VMAs."""

from __future__ import annotations

import errno
import itertools
import os
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from pvemu.guest.vma import AddressSpace
from pvemu.guest.vma_tree import (
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MAP_GROWSDOWN,
    MAP_HUGETLB,
    MAP_PRIVATE,
    MAP_SHARED,
    MAP_SHARED_VALIDATE,
    MMAP_MIN_ADDR,
    MMAP_STACK_GAP,
    MS_ASYNC,
    MS_INVALIDATE,
    MS_SYNC,
    PAGE_SIZE,
    PROT_EXEC,
    PROT_GROWSDOWN,
    PROT_GROWSUP,
    PROT_NONE,
    PROT_READ,
    PROT_SEM,
    PROT_WRITE,
    TASK_SIZE,
    FileBacking,
    MprotectError,
    ProtChange,
    Vma,
    page_align,
    vmas_mergeable,
)

if TYPE_CHECKING:
    from collections.abc import Callable

P = PAGE_SIZE
ANON = MAP_PRIVATE | MAP_ANONYMOUS
SHM = MAP_SHARED | MAP_ANONYMOUS
RW = PROT_READ | PROT_WRITE
RO = PROT_READ
RX = PROT_READ | PROT_EXEC
B = 0x1000_0000  # a fixed base for deterministic layouts
MAP_SYNC = 0x80000
MAP_32BIT = 0x40


def expect(code: int, fn: Callable[..., object], *args: object, **kwargs: object) -> OSError:
    with pytest.raises(OSError, match=re.escape(os.strerror(code))) as info:
        fn(*args, **kwargs)
    assert info.value.errno == code, info.value
    return info.value


def layout(asp: AddressSpace) -> list[tuple[int, int, int]]:
    """(start, end, prot) of every VMA, relative to B in pages."""
    return [((v.start - B) // P, (v.end - B) // P, v.prot) for v in asp.vmas()]


def anon_at(asp: AddressSpace, page: int, npages: int, prot: int = RW) -> int:
    return asp.mmap(npages * P, prot, ANON, addr=B + page * P, fixed=True)


@pytest.fixture
def asp() -> AddressSpace:
    return AddressSpace()


@pytest.fixture
def rw_file() -> FileBacking:
    return FileBacking("/tmp/data.bin", writable=True)


@pytest.fixture
def ro_file() -> FileBacking:
    return FileBacking("/tmp/data.bin", writable=False)


# --------------------------------------------------------------------------- Vma


def test_constants_match_linux_x86_64() -> None:
    assert TASK_SIZE == 0x7FFF_FFFF_F000
    assert MMAP_MIN_ADDR == 0x10000
    assert AddressSpace().mmap_base == TASK_SIZE - MMAP_STACK_GAP == 0x7FFF_F7FF_F000


def test_vma_predicates(rw_file: FileBacking, ro_file: FileBacking) -> None:
    anon = Vma(B, B + P, RW, ANON, None, B >> 12)
    assert anon.is_anonymous
    assert anon.is_private
    assert not anon.is_shared
    assert anon.may_write
    assert not anon.wants_writenotify
    assert not anon.dirty_accountable
    shm = Vma(B, B + P, RW, SHM, None, 0, shmem_id=1)
    assert shm.is_anonymous
    assert shm.is_shared
    assert shm.may_write
    assert not shm.wants_writenotify  # shmem has no writeback
    shared_rw = Vma(B, B + P, RW, MAP_SHARED, rw_file, 3)
    assert shared_rw.may_write
    assert shared_rw.wants_writenotify
    assert shared_rw.dirty_accountable
    assert not shared_rw.is_anonymous
    assert not shared_rw.with_prot(RO).wants_writenotify  # not writable now
    assert shared_rw.with_prot(RO).may_write
    shared_ro = Vma(B, B + P, RO, MAP_SHARED, ro_file, 0)
    assert not shared_ro.may_write
    assert not shared_ro.wants_writenotify
    private_ro_file = Vma(B, B + P, RW, MAP_PRIVATE, ro_file, 0)
    assert private_ro_file.may_write
    assert not private_ro_file.wants_writenotify


def test_vma_piece_and_offsets(rw_file: FileBacking) -> None:
    v = Vma(B, B + 4 * P, RW, MAP_SHARED, rw_file, 10)
    assert v.npages == 4
    assert v.length == 4 * P
    piece = v.piece(B + P, B + 3 * P)
    assert (piece.start, piece.end, piece.pgoff, piece.file) == (B + P, B + 3 * P, 11, rw_file)
    assert v.file_offset(B + P + 5) == 11 * P + 5
    assert v.pgoff_at(B + 3 * P) == 13
    assert v.contains(B)
    assert not v.contains(B + 4 * P)
    with pytest.raises(ValueError, match="not inside"):
        v.piece(B, B + 5 * P)
    assert v.maps_line() == f"{B:08x}-{B + 4 * P:08x} rw-s 0000a000 /tmp/data.bin"


def test_file_backing_compares_by_identity() -> None:
    a = FileBacking("/f", True)
    b = FileBacking("/f", True)
    assert a == a
    assert a != b
    assert len({a, b}) == 2


def test_page_align_wraps_like_c() -> None:
    assert page_align(1) == P
    assert page_align(P) == P
    assert page_align(0) == 0
    assert page_align((1 << 64) - 1) == 0


# --------------------------------------------------------------------------- mmap errnos


def test_mmap_offset_not_page_aligned(asp: AddressSpace, rw_file: FileBacking) -> None:
    expect(errno.EINVAL, asp.mmap, P, RW, MAP_SHARED, file=rw_file, offset=100)
    expect(errno.EINVAL, asp.mmap, P, RW, ANON, offset=1)  # checked for anonymous too
    assert len(asp) == 0


def test_mmap_length_zero_and_too_large(asp: AddressSpace) -> None:
    expect(errno.EINVAL, asp.mmap, 0, RW, ANON)
    # Linux: only 0 is EINVAL; a length beyond TASK_SIZE (or wrapping) is ENOMEM.
    expect(errno.ENOMEM, asp.mmap, TASK_SIZE + P, RW, ANON)
    expect(errno.ENOMEM, asp.mmap, 1 << 47, RW, ANON)
    expect(errno.ENOMEM, asp.mmap, (1 << 64) - 1, RW, ANON)
    expect(errno.ENOMEM, asp.mmap, -1, RW, ANON)  # size_t
    assert len(asp) == 0


def test_mmap_file_mapping_without_file_is_ebadf(asp: AddressSpace) -> None:
    expect(errno.EBADF, asp.mmap, P, RW, MAP_SHARED)
    expect(errno.EBADF, asp.mmap, P, RW, MAP_PRIVATE)
    expect(errno.EBADF, asp.mmap, 0, RW, MAP_SHARED)  # the fd is looked up first


def test_mmap_anonymous_ignores_the_file(asp: AddressSpace, rw_file: FileBacking) -> None:
    addr = asp.mmap(P, RW, ANON, file=rw_file, offset=5 * P)
    vma = asp.find(addr)
    assert vma is not None
    assert vma.file is None
    assert vma.pgoff == addr >> 12


@pytest.mark.parametrize(
    "flags", [MAP_ANONYMOUS, MAP_ANONYMOUS | 0x6, SHM | MAP_PRIVATE, 0x8 | 0x20]
)
def test_mmap_bad_type_anonymous(asp: AddressSpace, flags: int) -> None:
    expect(errno.EINVAL, asp.mmap, P, RW, flags)


@pytest.mark.parametrize("flags", [0, 0x6, 0x4])
def test_mmap_bad_type_file(asp: AddressSpace, rw_file: FileBacking, flags: int) -> None:
    expect(errno.EINVAL, asp.mmap, P, RO, flags, file=rw_file)


def test_mmap_shared_validate(asp: AddressSpace, rw_file: FileBacking) -> None:
    addr = asp.mmap(P, RW, MAP_SHARED | MAP_PRIVATE, file=rw_file)
    vma = asp.find(addr)
    assert vma is not None
    assert vma.flags == MAP_SHARED
    assert vma.is_shared
    # Unknown flags are refused only under MAP_SHARED_VALIDATE.
    expect(errno.EOPNOTSUPP, asp.mmap, P, RW, MAP_SHARED_VALIDATE | MAP_SYNC, file=rw_file)
    expect(
        errno.EOPNOTSUPP,
        asp.mmap,
        P,
        RW,
        MAP_SHARED_VALIDATE | MAP_FIXED_NOREPLACE,
        addr=B,
        file=rw_file,
    )
    assert asp.mmap(P, RW, MAP_SHARED | MAP_SYNC, file=rw_file)
    assert asp.mmap(P, RW, MAP_SHARED_VALIDATE | 0x4000, file=rw_file)  # MAP_NORESERVE


def test_mmap_eacces(asp: AddressSpace, ro_file: FileBacking) -> None:
    expect(errno.EACCES, asp.mmap, P, RW, MAP_SHARED, file=ro_file)
    expect(errno.EACCES, asp.mmap, P, PROT_WRITE, MAP_SHARED_VALIDATE, file=ro_file)
    assert len(asp) == 0
    assert asp.mmap(P, RO, MAP_SHARED, file=ro_file)
    assert asp.mmap(P, RW, MAP_PRIVATE, file=ro_file)  # copy-on-write: fine
    write_only = FileBacking("/w", writable=True, readable=False)
    expect(errno.EACCES, asp.mmap, P, RO, MAP_SHARED, file=write_only)
    expect(errno.EACCES, asp.mmap, P, RO, MAP_PRIVATE, file=write_only)


def test_mmap_enomem_is_checked_before_eacces(asp: AddressSpace, ro_file: FileBacking) -> None:
    expect(errno.ENOMEM, asp.mmap, 1 << 48, RW, MAP_SHARED, file=ro_file)
    expect(errno.EPERM, asp.mmap, P, RW, MAP_SHARED, file=ro_file, addr=P, fixed=True)


def test_mmap_unknown_prot_bits_are_ignored(asp: AddressSpace) -> None:
    # Linux's mmap does not validate prot (only mprotect does).
    addr = asp.mmap(P, RW | 0x10 | PROT_SEM | PROT_GROWSDOWN, ANON)
    vma = asp.find(addr)
    assert vma is not None
    assert vma.prot == RW


def test_mmap_file_offset_overflow(asp: AddressSpace, ro_file: FileBacking) -> None:
    expect(errno.EOVERFLOW, asp.mmap, P, RO, MAP_PRIVATE, file=ro_file, offset=-P)
    expect(errno.EOVERFLOW, asp.mmap, P, RO, MAP_PRIVATE, file=ro_file, offset=(1 << 63) - P)
    addr = asp.mmap(P, RO, MAP_PRIVATE, file=ro_file, offset=(1 << 63) - 2 * P)
    vma = asp.find(addr)
    assert vma is not None
    assert vma.pgoff == ((1 << 63) - 2 * P) >> 12


def test_mmap_fixed_errnos(asp: AddressSpace) -> None:
    expect(errno.ENOMEM, asp.mmap, P, RW, ANON, addr=TASK_SIZE, fixed=True)
    expect(errno.ENOMEM, asp.mmap, 2 * P, RW, ANON, addr=TASK_SIZE - P, fixed=True)
    expect(errno.ENOMEM, asp.mmap, P, RW, ANON, addr=1 << 47, fixed=True)
    expect(errno.EINVAL, asp.mmap, P, RW, ANON, addr=B + 1, fixed=True)
    expect(errno.ENOMEM, asp.mmap, P, RW, ANON, addr=TASK_SIZE + 1, fixed=True)  # ENOMEM first
    expect(errno.EPERM, asp.mmap, P, RW, ANON, addr=MMAP_MIN_ADDR - P, fixed=True)
    expect(errno.EPERM, asp.mmap, P, RW, ANON, addr=0, fixed=True)
    expect(errno.EPERM, asp.mmap, P, RW, ANON | MAP_FIXED, addr=P)
    assert len(asp) == 0
    assert asp.mmap(P, RW, ANON, addr=TASK_SIZE - P, fixed=True) == TASK_SIZE - P
    assert asp.mmap(P, RW, ANON, addr=MMAP_MIN_ADDR, fixed=True) == MMAP_MIN_ADDR


def test_mmap_fixed_noreplace(asp: AddressSpace) -> None:
    anon_at(asp, 2, 2)
    expect(errno.EEXIST, asp.mmap, 2 * P, RO, ANON | MAP_FIXED_NOREPLACE, addr=B + 3 * P)
    assert asp.mmap(P, RW, ANON | MAP_FIXED_NOREPLACE, addr=B + 4 * P) == B + 4 * P
    assert layout(asp) == [(2, 5, RW)]


def test_mmap_unmodelled_flags(asp: AddressSpace, rw_file: FileBacking) -> None:
    expect(errno.EINVAL, asp.mmap, P, RW, MAP_SHARED | MAP_HUGETLB, file=rw_file)
    expect(errno.EINVAL, asp.mmap, P, RW, MAP_SHARED | MAP_GROWSDOWN, file=rw_file)
    expect(errno.EINVAL, asp.mmap, P, RW, SHM | MAP_GROWSDOWN)
    with pytest.raises(NotImplementedError):
        asp.mmap(P, RW, ANON | MAP_HUGETLB)
    with pytest.raises(NotImplementedError):
        asp.mmap(P, RW, ANON | MAP_GROWSDOWN)
    with pytest.raises(NotImplementedError):
        asp.mmap(P, RW, ANON | MAP_32BIT)


def test_mmap_no_room_is_enomem() -> None:
    top = 0x20000 + 8 * P
    small = AddressSpace(task_size=top, mmap_min_addr=0x20000, mmap_base=top)
    assert small.mmap(4 * P, RW, ANON) == top - 4 * P
    expect(errno.ENOMEM, small.mmap, 8 * P, RW, ANON)
    small.mmap(4 * P, RO, ANON)
    assert len(small) == 2
    expect(errno.ENOMEM, small.mmap, P, RW, ANON)


# --------------------------------------------------------------------------- placement


def test_length_rounded_up_to_pages(asp: AddressSpace) -> None:
    addr = asp.mmap(1, RW, ANON)
    vma = asp.find(addr)
    assert vma is not None
    assert vma.length == P
    addr = asp.mmap(P + 1, RW, ANON, addr=B)
    assert addr == B
    assert asp.find(B + P) is not None
    assert asp.find(B + 2 * P) is None


def test_topdown_below_mmap_base_and_merging(asp: AddressSpace) -> None:
    a = asp.mmap(10 * P, RW, ANON)
    assert a == asp.mmap_base - 10 * P
    b = asp.mmap(P, RW, ANON)
    assert b == a - P
    assert len(asp) == 1  # adjacent, compatible: merged like Linux
    c = asp.mmap(P, RO, ANON)
    assert c == b - P
    assert len(asp) == 2


def test_topdown_fills_the_highest_hole(asp: AddressSpace) -> None:
    top = asp.mmap(10 * P, RW, ANON)
    asp.munmap(top + 2 * P, 3 * P)
    assert asp.mmap(2 * P, RO, ANON) == top + 3 * P  # highest fit: end of the hole
    assert asp.mmap(4 * P, RO, ANON) == top - 4 * P  # the hole left is too small


def test_hint_honoured(asp: AddressSpace) -> None:
    assert asp.mmap(2 * P, RW, ANON, addr=B) == B
    assert asp.mmap(P, RW, ANON, addr=B + 0x123 + 4 * P) == B + 4 * P  # rounded down
    assert asp.mmap(P, RW, ANON, addr=P) == MMAP_MIN_ADDR  # raised to mmap_min_addr
    assert asp.mmap(P, RW, ANON, addr=TASK_SIZE - P) == TASK_SIZE - P  # above mmap_base: ok


def test_hint_ignored(asp: AddressSpace) -> None:
    anon_at(asp, 0, 4)
    base = asp.mmap_base
    assert asp.mmap(P, RW, ANON, addr=B + 2 * P) == base - P  # occupied
    assert asp.mmap(4 * P, RO, ANON, addr=B - 2 * P) == base - 5 * P  # overlaps
    assert asp.mmap(2 * P, RW, ANON, addr=TASK_SIZE - P) == base - 7 * P  # past TASK_SIZE
    assert asp.mmap(P, RO, ANON, addr=1 << 47) == base - 8 * P
    assert asp.mmap(P, RX, ANON, addr=0) == base - 9 * P  # 0: no hint


def test_bottomup_fallback_above_mmap_base() -> None:
    small = AddressSpace(task_size=0x100000, mmap_min_addr=0x10000, mmap_base=0x80000)
    assert small.legacy_base == 0x56000
    assert small.mmap(0x70000, RW, ANON) == 0x10000  # fills [min, mmap_base)
    assert small.mmap(0x10000, RO, ANON) == 0x80000  # bottom-up from the legacy base
    assert small.mmap(0x70000, RX, ANON) == 0x90000
    expect(errno.ENOMEM, small.mmap, P, RW, ANON)


def test_map_fixed_replaces(asp: AddressSpace, rw_file: FileBacking) -> None:
    anon_at(asp, 0, 8)
    result = asp.do_mmap(2 * P, RO, MAP_SHARED, addr=B + 3 * P, file=rw_file, offset=P, fixed=True)
    assert result.addr == B + 3 * P
    assert [(v.start, v.end, v.prot, v.pgoff) for v in result.unmapped] == [
        (B + 3 * P, B + 5 * P, RW, (B >> 12) + 3)
    ]
    assert layout(asp) == [(0, 3, RW), (3, 5, RO), (5, 8, RW)]
    mid = asp.find(B + 4 * P)
    assert mid is not None
    assert mid.file is rw_file
    assert mid.pgoff == 1
    # Replacing across several VMAs; the new mapping merges with compatible neighbours.
    result = asp.do_mmap(4 * P, RW, ANON | MAP_FIXED, addr=B + 2 * P)
    assert [(v.start - B) // P for v in result.unmapped] == [2, 3, 5]
    assert [v.end - v.start for v in result.unmapped] == [P, 2 * P, P]
    assert layout(asp) == [(0, 8, RW)]
    assert asp.mmap(P, RW, ANON, addr=B + 20 * P, fixed=True) == B + 20 * P  # nothing there


# --------------------------------------------------------------------------- mprotect errnos


def test_mprotect_argument_errnos(asp: AddressSpace) -> None:
    anon_at(asp, 0, 4)
    expect(errno.EINVAL, asp.mprotect, B + 1, P, RO)
    expect(errno.EINVAL, asp.mprotect, B + 1, 0, RO)  # alignment before the length-0 check
    assert asp.mprotect(B, 0, 0x100) == []  # length 0: success before the prot check
    assert asp.mprotect(0x7000_0000_0000, 0, RO) == []  # even unmapped
    expect(errno.EINVAL, asp.mprotect, B, P, 0x10)
    expect(errno.EINVAL, asp.mprotect, 0x3000_0000, P, 0x100)  # prot checked before VMAs
    expect(errno.EINVAL, asp.mprotect, B, P, PROT_GROWSDOWN | PROT_GROWSUP | RO)
    expect(errno.ENOMEM, asp.mprotect, (1 << 64) - P, 2 * P, RO)  # wraps
    expect(errno.ENOMEM, asp.mprotect, B, (1 << 64) - 1, RO)  # PAGE_ALIGN wraps
    expect(errno.ENOMEM, asp.mprotect, -P, P, RO)  # unsigned long: wraps too
    assert layout(asp) == [(0, 4, RW)]


def test_mprotect_prot_sem_is_accepted(asp: AddressSpace) -> None:
    anon_at(asp, 0, 1)
    [change] = asp.mprotect(B, P, RO | PROT_SEM)
    assert change.new_prot == RO
    assert layout(asp) == [(0, 1, RO)]


def test_mprotect_grows_flags(asp: AddressSpace) -> None:
    anon_at(asp, 0, 2)
    expect(errno.EINVAL, asp.mprotect, B, P, RO | PROT_GROWSDOWN)
    expect(errno.EINVAL, asp.mprotect, B, P, RO | PROT_GROWSUP)
    expect(errno.ENOMEM, asp.mprotect, B + 8 * P, P, RO | PROT_GROWSDOWN)  # no VMA: ENOMEM
    assert layout(asp) == [(0, 2, RW)]


def test_mprotect_unmapped_is_enomem(asp: AddressSpace) -> None:
    expect(errno.ENOMEM, asp.mprotect, B, P, RO)
    anon_at(asp, 2, 2)
    err = expect(errno.ENOMEM, asp.mprotect, B, 4 * P, RO)  # hole at the start
    assert isinstance(err, MprotectError)
    assert err.changes == []
    expect(errno.ENOMEM, asp.mprotect, TASK_SIZE, P, RO)  # beyond TASK_SIZE: a hole
    expect(errno.ENOMEM, asp.mprotect, 1 << 47, P, RO)
    assert layout(asp) == [(2, 4, RW)]


def test_mprotect_hole_in_the_middle_changes_earlier_vmas(asp: AddressSpace) -> None:
    anon_at(asp, 0, 3)
    asp.munmap(B + P, P)
    err = expect(errno.ENOMEM, asp.mprotect, B, 3 * P, RO)
    assert isinstance(err, MprotectError)
    assert [(c.start, c.end, c.old_prot, c.new_prot) for c in err.changes] == [(B, B + P, RW, RO)]
    assert layout(asp) == [(0, 1, RO), (2, 3, RW)]  # as Linux leaves it


def test_mprotect_trailing_hole(asp: AddressSpace) -> None:
    anon_at(asp, 0, 2)
    err = expect(errno.ENOMEM, asp.mprotect, B + P, 3 * P, RO)
    assert isinstance(err, MprotectError)
    assert [(c.start, c.end) for c in err.changes] == [(B + P, B + 2 * P)]
    assert layout(asp) == [(0, 1, RW), (1, 2, RO)]


def test_mprotect_eacces_on_read_only_shared_file(
    asp: AddressSpace, ro_file: FileBacking, rw_file: FileBacking
) -> None:
    asp.mmap(P, RO, MAP_SHARED, addr=B, file=ro_file, fixed=True)
    err = expect(errno.EACCES, asp.mprotect, B, P, RW)
    assert isinstance(err, MprotectError)
    assert err.changes == []
    expect(errno.EACCES, asp.mprotect, B, P, PROT_WRITE | PROT_EXEC)
    assert asp.mprotect(B, P, RX)[0].new_prot == RX  # no write: fine
    assert asp.mprotect(B, P, PROT_NONE)[0].new_prot == PROT_NONE
    # A writable file: PROT_WRITE is allowed on a shared mapping.
    asp.mmap(P, RO, MAP_SHARED, addr=B + 4 * P, file=rw_file, fixed=True)
    [change] = asp.mprotect(B + 4 * P, P, RW)
    assert change.vma.wants_writenotify
    assert change.vma.dirty_accountable
    # Private mappings of the read-only file may become writable (COW).
    asp.mmap(P, RO, MAP_PRIVATE, addr=B + 8 * P, file=ro_file, fixed=True)
    [change] = asp.mprotect(B + 8 * P, P, RW)
    assert not change.vma.wants_writenotify


def test_mprotect_eacces_after_earlier_vma_changed(asp: AddressSpace, ro_file: FileBacking) -> None:
    anon_at(asp, 0, 1, RO)
    asp.mmap(P, RO, MAP_SHARED, addr=B + P, file=ro_file, fixed=True)
    anon_at(asp, 2, 1, RO)
    err = expect(errno.EACCES, asp.mprotect, B, 3 * P, RW)
    assert isinstance(err, MprotectError)
    assert [(c.start, c.end, c.new_prot) for c in err.changes] == [(B, B + P, RW)]
    assert layout(asp) == [(0, 1, RW), (1, 2, RO), (2, 3, RO)]


# --------------------------------------------------------------------------- split / merge


@pytest.mark.parametrize(
    ("first", "count", "expected"),
    [
        (0, 2, [(0, 2, RO), (2, 8, RW)]),  # split at the start
        (3, 2, [(0, 3, RW), (3, 5, RO), (5, 8, RW)]),  # in the middle
        (6, 2, [(0, 6, RW), (6, 8, RO)]),  # at the end
        (0, 8, [(0, 8, RO)]),  # whole: no split
    ],
)
def test_mprotect_split_and_merge_back(
    asp: AddressSpace, first: int, count: int, expected: list[tuple[int, int, int]]
) -> None:
    anon_at(asp, 0, 8)
    [change] = asp.mprotect(B + first * P, count * P, RO)
    assert (change.start, change.end, change.old_prot, change.new_prot) == (
        B + first * P,
        B + (first + count) * P,
        RW,
        RO,
    )
    assert (change.vma.start, change.vma.end, change.vma.prot) == (change.start, change.end, RO)
    assert change.vma.pgoff == (B >> 12) + first
    assert layout(asp) == expected
    asp.mprotect(B + first * P, count * P, RW)
    assert layout(asp) == [(0, 8, RW)]
    assert len(asp) == 1
    [vma] = asp.vmas()
    assert vma.pgoff == B >> 12


def test_mprotect_length_rounded_up(asp: AddressSpace) -> None:
    anon_at(asp, 0, 4)
    [change] = asp.mprotect(B + P, P + 1, RO)
    assert (change.start, change.end) == (B + P, B + 3 * P)


def test_mprotect_same_prot_is_no_change(asp: AddressSpace) -> None:
    anon_at(asp, 0, 4)
    assert asp.mprotect(B + P, P, RW) == []
    assert layout(asp) == [(0, 4, RW)]


def test_mprotect_across_several_vmas(asp: AddressSpace) -> None:
    anon_at(asp, 0, 8)
    asp.mprotect(B + 2 * P, 2 * P, RO)
    asp.mprotect(B + 4 * P, 2 * P, PROT_NONE)
    asp.mprotect(B + 6 * P, 1 * P, RX)
    assert layout(asp) == [(0, 2, RW), (2, 4, RO), (4, 6, 0), (6, 7, RX), (7, 8, RW)]
    changes = asp.mprotect(B + P, 7 * P, RO)
    # One change per original piece whose prot changes, in address order;
    # the RO piece is skipped (mprotect_fixup's early return).
    assert [((c.start - B) // P, (c.end - B) // P, c.old_prot) for c in changes] == [
        (1, 2, RW),
        (4, 6, PROT_NONE),
        (6, 7, RX),
        (7, 8, RW),
    ]
    assert layout(asp) == [(0, 1, RW), (1, 8, RO)]
    changes = asp.mprotect(B, 8 * P, RW)
    assert [((c.start - B) // P, (c.end - B) // P) for c in changes] == [(1, 8)]
    assert layout(asp) == [(0, 8, RW)]


def test_mprotect_merges_with_previous_and_next(asp: AddressSpace) -> None:
    anon_at(asp, 0, 2, RO)
    anon_at(asp, 2, 2, RW)
    anon_at(asp, 4, 2, RO)
    assert len(asp) == 3
    asp.mprotect(B + 2 * P, 2 * P, RO)
    assert layout(asp) == [(0, 6, RO)]


def test_file_mappings_merge_only_with_contiguous_pgoff(
    asp: AddressSpace, rw_file: FileBacking
) -> None:
    asp.mmap(2 * P, RW, MAP_SHARED, addr=B, file=rw_file, offset=0, fixed=True)
    asp.mmap(2 * P, RW, MAP_SHARED, addr=B + 2 * P, file=rw_file, offset=2 * P, fixed=True)
    assert layout(asp) == [(0, 4, RW)]  # same open file, contiguous offsets: one VMA
    asp.mmap(2 * P, RW, MAP_SHARED, addr=B + 4 * P, file=rw_file, offset=8 * P, fixed=True)
    assert layout(asp) == [(0, 4, RW), (4, 6, RW)]  # offset jumps: kept apart
    other = FileBacking(rw_file.path, writable=True)  # another open() of the same path
    asp.mmap(2 * P, RW, MAP_SHARED, addr=B + 6 * P, file=other, offset=10 * P, fixed=True)
    assert len(asp) == 3
    # Split a file VMA and put it back: pgoff continuity lets the pieces merge.
    [change] = asp.mprotect(B + P, 2 * P, RO)
    assert change.vma.pgoff == 1
    assert change.vma.file is rw_file
    assert [(v.start - B) // P for v in asp.vmas()] == [0, 1, 3, 4, 6]
    assert [v.pgoff for v in asp.vmas()] == [0, 1, 3, 8, 10]
    asp.mprotect(B + P, 2 * P, RW)
    assert layout(asp) == [(0, 4, RW), (4, 6, RW), (6, 8, RW)]


def test_private_and_shared_file_mappings_do_not_merge(
    asp: AddressSpace, rw_file: FileBacking
) -> None:
    asp.mmap(P, RW, MAP_SHARED, addr=B, file=rw_file, offset=0, fixed=True)
    asp.mmap(P, RW, MAP_PRIVATE, addr=B + P, file=rw_file, offset=P, fixed=True)
    anon_at(asp, 2, 1)
    assert len(asp) == 3


def test_shared_anonymous_mappings(asp: AddressSpace) -> None:
    a = asp.mmap(2 * P, RW, SHM, addr=B, fixed=True)
    asp.mmap(2 * P, RW, SHM, addr=B + 2 * P, fixed=True)
    first, second = asp.vmas()
    assert first.shmem_id != second.shmem_id  # each its own /dev/zero object
    assert (first.pgoff, second.pgoff) == (0, 0)
    assert "/dev/zero (deleted)" in first.maps_line()
    [change] = asp.mprotect(a + P, P, RO)
    assert change.vma.pgoff == 1
    assert change.vma.shmem_id == first.shmem_id
    asp.mprotect(a + P, P, RW)
    assert layout(asp) == [(0, 2, RW), (2, 4, RW)]  # pieces rejoin, objects stay apart


# --------------------------------------------------------------------------- munmap


def test_munmap_errnos(asp: AddressSpace) -> None:
    expect(errno.EINVAL, asp.munmap, B + 1, P)
    expect(errno.EINVAL, asp.munmap, B, 0)
    expect(errno.EINVAL, asp.munmap, 1 << 47, P)
    expect(errno.EINVAL, asp.munmap, TASK_SIZE - P, 2 * P)
    expect(errno.EINVAL, asp.munmap, TASK_SIZE - 2 * P, 2 * P + 1)
    expect(errno.EINVAL, asp.munmap, B, -1)
    assert asp.munmap(B, P) == []  # nothing mapped: fine


def test_munmap_split_and_holes(asp: AddressSpace) -> None:
    anon_at(asp, 0, 10)
    removed = asp.munmap(B + 4 * P, P + 1)  # rounded to two pages, middle split
    assert [((v.start - B) // P, (v.end - B) // P, v.pgoff) for v in removed] == [
        (4, 6, (B >> 12) + 4)
    ]
    assert layout(asp) == [(0, 4, RW), (6, 10, RW)]
    asp.mprotect(B + 7 * P, P, RO)
    removed = asp.munmap(B + 2 * P, 7 * P)  # across a hole and three VMAs
    assert [((v.start - B) // P, (v.end - B) // P, v.prot) for v in removed] == [
        (2, 4, RW),
        (6, 7, RW),
        (7, 8, RO),
        (8, 9, RW),
    ]
    assert layout(asp) == [(0, 2, RW), (9, 10, RW)]
    assert asp.munmap(B, P)[0].end == B + P  # at the start
    assert asp.munmap(B + P, 9 * P)[-1].start == B + 9 * P  # whole rest
    assert len(asp) == 0


def test_munmap_returns_file_info(asp: AddressSpace, rw_file: FileBacking) -> None:
    asp.mmap(4 * P, RW, MAP_SHARED, addr=B, file=rw_file, offset=16 * P, fixed=True)
    [piece] = asp.munmap(B + 2 * P, 8 * P)
    assert piece.file is rw_file
    assert piece.pgoff == 18
    assert piece.wants_writenotify
    assert layout(asp) == [(0, 2, RW)]


# --------------------------------------------------------------------------- msync


def test_msync(asp: AddressSpace, rw_file: FileBacking, ro_file: FileBacking) -> None:
    asp.mmap(2 * P, RW, MAP_SHARED, addr=B, file=rw_file, offset=0, fixed=True)
    anon_at(asp, 2, 1)
    asp.mmap(P, RO, MAP_SHARED, addr=B + 3 * P, file=ro_file, fixed=True)
    asp.mmap(P, RW, MAP_PRIVATE, addr=B + 4 * P, file=rw_file, fixed=True)
    result = asp.msync(B + P, 4 * P)
    assert result.errno == 0
    assert [(v.start, v.end, v.pgoff) for v in result.ranges] == [(B + P, B + 2 * P, 1)]
    assert asp.msync(B, 2 * P, MS_ASYNC).ranges == []
    assert asp.msync(B, 0).ranges == []


def test_msync_errnos_and_holes(asp: AddressSpace, rw_file: FileBacking) -> None:
    expect(errno.EINVAL, asp.msync, B, P, 8)
    expect(errno.EINVAL, asp.msync, B + 1, P)
    expect(errno.EINVAL, asp.msync, B, P, MS_ASYNC | MS_SYNC)
    expect(errno.ENOMEM, asp.msync, (1 << 64) - P, 2 * P)
    asp.mmap(P, RW, MAP_SHARED, addr=B, file=rw_file, fixed=True)
    asp.mmap(P, RW, MAP_SHARED, addr=B + 2 * P, file=rw_file, offset=2 * P, fixed=True)
    result = asp.msync(B, 4 * P, MS_SYNC | MS_INVALIDATE)
    assert result.errno == errno.ENOMEM  # reported after syncing what is mapped
    assert [v.start for v in result.ranges] == [B, B + 2 * P]
    with pytest.raises(OSError, match="holes") as info:
        result.raise_if_error()
    assert info.value.errno == errno.ENOMEM
    assert asp.msync(B, 3 * P, MS_ASYNC).errno == errno.ENOMEM
    assert asp.msync(B + 5 * P, P).errno == errno.ENOMEM
    asp.msync(B, P).raise_if_error()


# --------------------------------------------------------------------------- madvise


def test_madvise_free_takes_private_anonymous_pieces(asp: AddressSpace) -> None:
    anon_at(asp, 0, 2)
    anon_at(asp, 2, 2, RO)  # another VMA, still private anonymous
    result = asp.madvise_free(B + P, 2 * P)
    assert result.errno == 0
    assert [(v.start, v.end) for v in result.ranges] == [(B + P, B + 2 * P), (B + 2 * P, B + 3 * P)]
    assert asp.madvise_free(B, 0).ranges == []
    assert [v.end for v in asp.madvise_free(B, 1).ranges] == [B + P]  # length rounds up


def test_madvise_free_errnos_stop_or_report_like_linux(
    asp: AddressSpace, rw_file: FileBacking
) -> None:
    expect(errno.EINVAL, asp.madvise_free, B + 1, P)
    expect(errno.EINVAL, asp.madvise_free, (1 << 64) - P, 2 * P)
    expect(errno.EINVAL, asp.madvise_free, B, (1 << 64) - 1)
    anon_at(asp, 0, 1)
    asp.mmap(P, RW, SHM, addr=B + P, fixed=True)
    anon_at(asp, 2, 1)
    asp.mmap(P, RW, MAP_PRIVATE, addr=B + 3 * P, file=rw_file, fixed=True)
    anon_at(asp, 5, 1)
    stopped = asp.madvise_free(B, 3 * P)  # shmem: EINVAL after the first page
    assert (stopped.errno, [v.start for v in stopped.ranges]) == (errno.EINVAL, [B])
    with pytest.raises(OSError, match="not private anonymous"):
        stopped.raise_if_error()
    assert asp.madvise_free(B + 3 * P, P).errno == errno.EINVAL  # a private file mapping
    holes = asp.madvise_free(B + 4 * P, 2 * P)  # a hole, then a page: advised, then ENOMEM
    assert (holes.errno, [v.start for v in holes.ranges]) == (errno.ENOMEM, [B + 5 * P])
    with pytest.raises(OSError, match="holes"):
        holes.raise_if_error()
    assert asp.madvise_free(B + 6 * P, P).errno == errno.ENOMEM
    asp.madvise_free(B + 2 * P, P).raise_if_error()


# --------------------------------------------------------------------------- scale


def test_thousands_of_vmas_stay_fast() -> None:
    asp = AddressSpace()
    n = 4000
    base = asp.mmap(2 * n * P, RW, ANON)
    t0 = time.perf_counter()
    for i in range(n):
        asp.mprotect(base + 2 * i * P, P, RO)
    assert len(asp) == 2 * n
    for i in range(n):
        assert asp.find(base + (2 * i + 1) * P) is not None
    for _ in range(200):
        asp.mmap(P, RO, ANON)
    changes = asp.mprotect(base, 2 * n * P, RW)
    assert len(changes) == n
    assert len(asp) == 2
    assert time.perf_counter() - t0 < 10


# --------------------------------------------------------------------------- model check

MIN_PAGE = 16
WINDOW = 48
TOP_PAGE = MIN_PAGE + WINDOW  # task_size in pages


@dataclass(frozen=True)
class Page:
    prot: int
    flags: int
    file: FileBacking | None
    pgoff: int
    shmem_id: int | None

    @property
    def may_write(self) -> bool:
        return not (self.flags & MAP_SHARED and self.file is not None and not self.file.writable)


def page_of(vma: Vma, page: int) -> Page:
    return Page(vma.prot, vma.flags, vma.file, vma.pgoff_at(page * P), vma.shmem_id)


KINDS = ["anon", "shm", "file_a", "file_b", "file_ro_shared", "file_ro_private"]


class VmaMachine(RuleBasedStateMachine):
    """Random mmap/mprotect/munmap/msync against a page-granular model."""

    def __init__(self) -> None:
        super().__init__()
        self.asp = AddressSpace(
            task_size=TOP_PAGE * P, mmap_min_addr=MIN_PAGE * P, mmap_base=TOP_PAGE * P
        )
        self.pages: dict[int, Page] = {}
        self.files = {
            "file_a": FileBacking("/a", writable=True),
            "file_b": FileBacking("/b", writable=True),
            "ro": FileBacking("/ro", writable=False),
        }
        self.shmem_ids: set[int] = set()

    def check_pieces(self, pieces: list[Vma], expected: dict[int, Page]) -> None:
        got: dict[int, Page] = {}
        last_end = -1
        for v in pieces:
            assert v.start < v.end
            assert v.start >= last_end
            last_end = v.end
            for page in range(v.start // P, v.end // P):
                got[page] = page_of(v, page)
        assert got == expected

    @initialize(
        page=st.integers(MIN_PAGE, TOP_PAGE - 16),
        npages=st.integers(1, 16),
        prot=st.integers(0, 7),
        kind=st.sampled_from(["anon", "file_a"]),
    )
    def populate(self, page: int, npages: int, prot: int, kind: str) -> None:
        self.mmap(kind, npages, 0, prot, ("fixed", page), -1)

    @rule(
        kind=st.sampled_from(KINDS),
        npages=st.integers(1, 12),
        shave=st.integers(0, P - 1),
        prot=st.integers(0, 7) | st.just(RW | 0x10),
        place=st.one_of(
            st.tuples(st.just("fixed"), st.integers(8, TOP_PAGE + 2)),
            st.tuples(st.just("hint"), st.integers(0, TOP_PAGE + 2)),
            st.tuples(st.just("none"), st.just(0)),
        ),
        offset=st.one_of(st.just(-1), st.integers(0, 8)),
    )
    def mmap(
        self,
        kind: str,
        npages: int,
        shave: int,
        prot: int,
        place: tuple[str, int],
        offset: int,
    ) -> None:
        how, where = place
        length = npages * P - shave
        file: FileBacking | None = None
        if kind == "anon":
            flags = ANON
        elif kind == "shm":
            flags = SHM
        elif kind in ("file_a", "file_b"):
            flags, file = MAP_SHARED, self.files[kind]
        else:
            flags = MAP_SHARED if kind == "file_ro_shared" else MAP_PRIVATE
            file = self.files["ro"]
        # -1: an offset that keeps the file contiguous with the address
        off_pages = (where - MIN_PAGE if how != "none" else 0) if offset < 0 else offset
        off_pages = max(off_pages, 0)

        # Expected outcome.
        expected_err = 0
        start = -1
        if how == "fixed":
            start = where
            if start + npages > TOP_PAGE:
                expected_err = errno.ENOMEM
            elif start < MIN_PAGE:
                expected_err = errno.EPERM
        else:
            hint = where if how == "hint" else 0
            if hint and hint < MIN_PAGE:
                hint = MIN_PAGE
            if (
                hint
                and hint + npages <= TOP_PAGE
                and all(p not in self.pages for p in range(hint, hint + npages))
            ):
                start = hint
            else:
                for cand in range(TOP_PAGE - npages, MIN_PAGE - 1, -1):
                    if all(p not in self.pages for p in range(cand, cand + npages)):
                        start = cand
                        break
                else:
                    expected_err = errno.ENOMEM
        if not expected_err and kind == "file_ro_shared" and prot & PROT_WRITE:
            expected_err = errno.EACCES

        addr = None if how == "none" else where * P
        if expected_err:
            expect(
                expected_err,
                self.asp.do_mmap,
                length,
                prot,
                flags,
                addr=addr,
                file=file,
                offset=off_pages * P,
                fixed=how == "fixed",
            )
            return
        result = self.asp.do_mmap(
            length, prot, flags, addr=addr, file=file, offset=off_pages * P, fixed=how == "fixed"
        )
        assert result.addr == start * P
        replaced = {p: self.pages.pop(p) for p in range(start, start + npages) if p in self.pages}
        self.check_pieces(result.unmapped, replaced)
        shmem_id = None
        if kind == "shm":
            vma = self.asp.find(start * P)
            assert vma is not None
            assert vma.shmem_id is not None
            assert vma.shmem_id not in self.shmem_ids
            shmem_id = vma.shmem_id
            self.shmem_ids.add(shmem_id)
        for i in range(npages):
            if kind == "anon":
                pgoff = start + i
            elif kind == "shm":
                pgoff = i
            else:
                pgoff = off_pages + i
            self.pages[start + i] = Page(prot & 7, flags, file, pgoff, shmem_id)

    def draw_span(self, data: st.DataObject) -> tuple[int, int]:
        """(first page, page count): mostly inside one run of mapped pages,
        sometimes running past its end, sometimes anything at all."""
        bias = data.draw(st.integers(0, 5), label="bias")
        runs: list[tuple[int, int]] = []
        for p in sorted(self.pages):
            if runs and runs[-1][1] == p:
                runs[-1] = (runs[-1][0], p + 1)
            else:
                runs.append((p, p + 1))
        if runs and bias < 5:
            lo, hi = data.draw(st.sampled_from(runs), label="run")
            first = data.draw(st.integers(lo, hi - 1), label="first")
            top = hi if bias < 4 else hi + 12
            last = data.draw(st.integers(first + 1, top), label="last")
            return first, last - first
        first = data.draw(st.integers(6, TOP_PAGE + 4), label="first")
        return first, data.draw(st.integers(0, 20), label="npages")

    @rule(
        data=st.data(),
        shave=st.integers(0, P - 1),
        prot=st.integers(0, 7),
    )
    def mprotect(self, data: st.DataObject, shave: int, prot: int) -> None:
        first, npages = self.draw_span(data)
        length = npages * P - shave if npages else 0
        before = self.asp.vmas()
        # Linux: a missing VMA at the start changes nothing; afterwards the walk
        # changes page after page and stops at a hole or a non-VM_MAYWRITE VMA.
        expected_err = 0
        changed: dict[int, tuple[int, Page]] = {}
        if npages:
            if first not in self.pages:
                expected_err = errno.ENOMEM
            else:
                for p in range(first, first + npages):
                    page = self.pages.get(p)
                    if page is None:
                        expected_err = errno.ENOMEM
                        break
                    if prot & PROT_WRITE and not page.may_write:
                        expected_err = errno.EACCES
                        break
                    if page.prot != prot:
                        changed[p] = (page.prot, page)
                    self.pages[p] = Page(prot, page.flags, page.file, page.pgoff, page.shmem_id)
        if expected_err:
            err = expect(expected_err, self.asp.mprotect, first * P, length, prot)
            assert isinstance(err, MprotectError)
            changes = err.changes
        else:
            changes = self.asp.mprotect(first * P, length, prot)
        self.check_changes(changes, changed, before, prot)

    def check_changes(
        self,
        changes: list[ProtChange],
        changed: dict[int, tuple[int, Page]],
        before: list[Vma],
        prot: int,
    ) -> None:
        got: dict[int, tuple[int, Page]] = {}
        last_end = -1
        used_vmas: set[int] = set()
        for c in changes:
            assert c.start >= last_end
            assert c.start < c.end
            assert c.new_prot == prot
            assert c.old_prot != c.new_prot
            assert (c.vma.start, c.vma.end, c.vma.prot) == (c.start, c.end, prot)
            last_end = c.end
            # Exactly one change per original VMA, inside it.
            [idx] = [i for i, v in enumerate(before) if v.start <= c.start < v.end]
            assert c.end <= before[idx].end
            assert idx not in used_vmas
            used_vmas.add(idx)
            for p in range(c.start // P, c.end // P):
                got[p] = (c.old_prot, page_of(c.vma, p))
        assert {p: old for p, (old, _) in got.items()} == {
            p: old for p, (old, _) in changed.items()
        }
        for p, (_, page) in got.items():
            assert page == self.pages[p]

    @rule(data=st.data(), shave=st.integers(0, P - 1))
    def munmap(self, data: st.DataObject, shave: int) -> None:
        first, npages = self.draw_span(data)
        length = npages * P - shave if npages else 0
        if npages == 0 or first > TOP_PAGE or first + npages > TOP_PAGE:
            expect(errno.EINVAL, self.asp.munmap, first * P, length)
            return
        removed = self.asp.munmap(first * P, length)
        gone = {p: self.pages.pop(p) for p in range(first, first + npages) if p in self.pages}
        self.check_pieces(removed, gone)

    @rule(first=st.integers(MIN_PAGE, TOP_PAGE), npages=st.integers(1, 20))
    def msync(self, first: int, npages: int) -> None:
        result = self.asp.msync(first * P, npages * P, MS_SYNC)
        span = range(first, first + npages)
        has_hole = any(p not in self.pages for p in span)
        assert result.errno == (errno.ENOMEM if has_hole else 0)
        expected = {
            p: self.pages[p]
            for p in span
            if p in self.pages
            and self.pages[p].flags & MAP_SHARED
            and self.pages[p].file is not None
            and self.pages[p].may_write
        }
        self.check_pieces(result.ranges, expected)

    @invariant()
    def vmas_agree_with_model(self) -> None:
        vmas = self.asp.vmas()
        assert len(self.asp) == len(vmas)
        seen: dict[int, Page] = {}
        for prev, cur in itertools.pairwise(vmas):
            assert prev.end <= cur.start, "sorted and non-overlapping"
            assert not vmas_mergeable(prev, cur), f"should have merged: {prev} / {cur}"
        for v in vmas:
            assert v.start < v.end
            assert v.start % P == 0
            assert v.end % P == 0
            assert v.start >= MIN_PAGE * P
            assert v.end <= TOP_PAGE * P
            if v.is_anonymous and v.is_private:
                assert v.pgoff == v.start >> 12
            for p in range(v.start // P, v.end // P):
                seen[p] = page_of(v, p)
        assert seen == self.pages
        for p in range(MIN_PAGE - 1, TOP_PAGE + 1):
            found = self.asp.find(p * P + 7)
            assert (found is not None) == (p in self.pages)


VmaMachine.TestCase.settings = settings(
    max_examples=120,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestVmaMachine = VmaMachine.TestCase
