"""The VMA data model and the sorted VMA tree of one address space.

Pure, sans-I/O code.  The constants of the mm syscalls, :class:`Vma` (one
immutable virtual memory area) and :class:`FileBacking`, what the syscalls
return (:class:`ProtChange`, :class:`MmapResult`, :class:`MsyncResult`,
:class:`MprotectError`), Linux's VMA merge rule, and :class:`VmaTree`: the
VMAs kept sorted, with the lookups, splicing, unmapping, merged insertion and
free-gap searches the syscalls are built from.  The syscalls themselves,
Linux's ``mmap``/``mprotect``/``munmap``/``msync`` semantics, are
:class:`~pvemu.guest.vma.AddressSpace` in :mod:`.vma`.
"""

from __future__ import annotations

import errno
import mmap as _mmap
import os
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field, replace

__all__ = [
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "TASK_SIZE",
    "MMAP_MIN_ADDR",
    "MMAP_STACK_GAP",
    "PROT_NONE",
    "PROT_READ",
    "PROT_WRITE",
    "PROT_EXEC",
    "PROT_SEM",
    "PROT_GROWSDOWN",
    "PROT_GROWSUP",
    "MAP_SHARED",
    "MAP_PRIVATE",
    "MAP_SHARED_VALIDATE",
    "MAP_TYPE",
    "MAP_FIXED",
    "MAP_ANONYMOUS",
    "MAP_32BIT",
    "MAP_GROWSDOWN",
    "MAP_HUGETLB",
    "MAP_FIXED_NOREPLACE",
    "MAP_LOCKED",
    "MAP_POPULATE",
    "MAP_NONBLOCK",
    "MADV_POPULATE_READ",
    "MADV_POPULATE_WRITE",
    "MS_ASYNC",
    "MS_INVALIDATE",
    "MS_SYNC",
    "MREMAP_MAYMOVE",
    "MREMAP_FIXED",
    "MREMAP_DONTUNMAP",
    "page_align",
    "prot_string",
    "FileBacking",
    "Vma",
    "vmas_mergeable",
    "ProtChange",
    "MadviseResult",
    "MmapResult",
    "MsyncResult",
    "MprotectError",
    "PageMove",
    "Unmap",
    "MremapStep",
    "MremapResult",
    "MremapError",
    "VmaTree",
]

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
_PAGE_OFFSET_MASK = PAGE_SIZE - 1
_U64 = (1 << 64) - 1

#: x86-64 TASK_SIZE_MAX with 4-level paging: the top user page is a guard page.
TASK_SIZE = (1 << 47) - PAGE_SIZE
#: Lowest address a hint may name / MAP_FIXED may use (vm.mmap_min_addr, LSM default).
MMAP_MIN_ADDR = 0x10000
#: Linux's minimum gap between mmap_base and TASK_SIZE (room for the stack).
MMAP_STACK_GAP = 128 << 20

PROT_NONE = 0
PROT_READ: int = _mmap.PROT_READ
PROT_WRITE: int = _mmap.PROT_WRITE
PROT_EXEC: int = _mmap.PROT_EXEC
PROT_SEM = 0x8
PROT_GROWSDOWN = 0x01000000
PROT_GROWSUP = 0x02000000
_PROT_ACCESS = PROT_READ | PROT_WRITE | PROT_EXEC

MAP_SHARED: int = _mmap.MAP_SHARED
MAP_PRIVATE: int = _mmap.MAP_PRIVATE
MAP_SHARED_VALIDATE = 0x03
MAP_TYPE = 0x0F
MAP_FIXED = 0x10
MAP_ANONYMOUS: int = _mmap.MAP_ANONYMOUS
MAP_32BIT = 0x40
MAP_GROWSDOWN = 0x100
MAP_HUGETLB = 0x40000
MAP_FIXED_NOREPLACE = 0x100000
MAP_LOCKED = 0x2000
MAP_POPULATE = 0x8000
MAP_NONBLOCK = 0x10000

MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23

MS_ASYNC = 1
MS_INVALIDATE = 2
MS_SYNC = 4

MREMAP_MAYMOVE = 1
MREMAP_FIXED = 2
MREMAP_DONTUNMAP = 4


def page_align(n: int) -> int:
    """Round ``n`` up to a page multiple, wrapping at 2**64 like ``PAGE_ALIGN``."""
    return (n + _PAGE_OFFSET_MASK) & ~_PAGE_OFFSET_MASK & _U64


def prot_string(prot: int) -> str:
    """``rwx`` letters as in /proc/self/maps (``-`` for a missing bit)."""
    return (
        ("r" if prot & PROT_READ else "-")
        + ("w" if prot & PROT_WRITE else "-")
        + ("x" if prot & PROT_EXEC else "-")
    )


def _err(code: int, what: str) -> OSError:
    return OSError(code, f"{os.strerror(code)}: {what}")


@dataclass(frozen=True, slots=True, eq=False)
class FileBacking:
    """One *open file* (Linux's ``struct file``) that mappings can refer to.

    Compared by identity: two mappings merge only if they map the same
    ``FileBacking`` object, as Linux merges only VMAs with the same
    ``vm_file``.  Open the file once and reuse the object to get the merging
    Linux gives for several mmaps of one file descriptor.

    Args:
        path: the file on disk.
        writable: opened with write access (O_RDWR); decides VM_MAYWRITE of
            shared mappings.
        readable: opened with read access; every mapping needs it (EACCES).
    """

    path: str
    writable: bool
    readable: bool = True


@dataclass(frozen=True, slots=True)
class Vma:
    """One virtual memory area ``[start, end)``; immutable.

    ``prot`` holds ``PROT_READ | PROT_WRITE | PROT_EXEC`` bits.  ``flags`` is
    ``MAP_PRIVATE`` or ``MAP_SHARED``, plus ``MAP_ANONYMOUS`` for anonymous
    memory.  ``pgoff`` is the offset, in pages, of ``start`` in the backing
    object: the file for file mappings, the shmem object for shared anonymous
    memory, and ``start >> PAGE_SHIFT`` for private anonymous memory (as in
    Linux).  ``shmem_id`` identifies the shmem object behind a
    ``MAP_SHARED | MAP_ANONYMOUS`` mapping (Linux's "/dev/zero (deleted)"),
    unique per mmap call; ``None`` otherwise.  ``locked`` is VM_LOCKED
    (mlock, MAP_LOCKED): like the protection it splits and merges VMAs.
    """

    start: int
    end: int
    prot: int
    flags: int
    file: FileBacking | None = None
    pgoff: int = 0
    shmem_id: int | None = None
    locked: bool = False

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def npages(self) -> int:
        return (self.end - self.start) >> PAGE_SHIFT

    @property
    def is_shared(self) -> bool:
        return bool(self.flags & MAP_SHARED)

    @property
    def is_private(self) -> bool:
        return not self.flags & MAP_SHARED

    @property
    def is_anonymous(self) -> bool:
        """MAP_ANONYMOUS memory, private or shared (no file on disk)."""
        return self.file is None

    @property
    def readable(self) -> bool:
        return bool(self.prot & PROT_READ)

    @property
    def writable(self) -> bool:
        return bool(self.prot & PROT_WRITE)

    @property
    def executable(self) -> bool:
        return bool(self.prot & PROT_EXEC)

    @property
    def may_write(self) -> bool:
        """VM_MAYWRITE: private mappings, shared anonymous memory, shared
        mappings of a file opened for writing."""
        if self.is_private or self.file is None:
            return True
        return self.file.writable

    @property
    def wants_writenotify(self) -> bool:
        """Linux's ``vma_wants_writenotify`` for this model: a shared, writable
        mapping of a file with dirty accounting (writeback).  Its PTEs are
        installed read-only until the first write so the page gets marked
        dirty; shmem (shared anonymous memory) has no writeback, so no."""
        return self.is_shared and self.writable and self.file is not None

    @property
    def dirty_accountable(self) -> bool:
        """2.6.26's ``dirty_accountable`` in ``change_protection``: the same
        predicate as :attr:`wants_writenotify`."""
        return self.wants_writenotify

    def contains(self, addr: int) -> bool:
        return self.start <= addr < self.end

    def pgoff_at(self, addr: int) -> int:
        """Page offset in the backing object of the page holding ``addr``."""
        return self.pgoff + ((addr - self.start) >> PAGE_SHIFT)

    def file_offset(self, addr: int) -> int:
        """Byte offset in the backing object of ``addr``."""
        return (self.pgoff << PAGE_SHIFT) + (addr - self.start)

    def piece(self, start: int, end: int) -> Vma:
        """The sub-range ``[start, end)`` with its ``pgoff`` adjusted."""
        if not (self.start <= start < end <= self.end):
            raise ValueError(f"{start:#x}-{end:#x} is not inside {self}")
        return replace(self, start=start, end=end, pgoff=self.pgoff_at(start))

    def with_prot(self, prot: int) -> Vma:
        return replace(self, prot=prot)

    def maps_line(self) -> str:
        """A /proc/self/maps style line."""
        kind = "s" if self.is_shared else "p"
        if self.file is not None:
            name = self.file.path
        elif self.shmem_id is not None:
            name = "/dev/zero (deleted)"
        else:
            name = ""
        head = f"{self.start:08x}-{self.end:08x} {prot_string(self.prot)}{kind}"
        offset = self.pgoff << PAGE_SHIFT if not self.is_anonymous or self.is_shared else 0
        return f"{head} {offset:08x} {name}".rstrip()

    def __str__(self) -> str:
        return self.maps_line()


def vmas_mergeable(a: Vma, b: Vma) -> bool:
    """Whether ``b`` directly follows ``a`` and Linux would merge the two."""
    return (
        a.end == b.start
        and a.prot == b.prot
        and a.flags == b.flags
        and a.file is b.file
        and a.shmem_id == b.shmem_id
        and a.locked == b.locked
        and b.pgoff == a.pgoff + a.npages
    )


def _merged(a: Vma, b: Vma) -> Vma:
    return replace(a, end=b.end)


@dataclass(frozen=True, slots=True)
class ProtChange:
    """One ``change_protection`` call the kernel must make.

    ``vma`` describes exactly ``[start, end)`` after the change (new ``prot``,
    ``pgoff`` of ``start``), so the kernel can ask it ``wants_writenotify``,
    ``is_anonymous`` and so on.  One per original VMA piece whose protection
    really changed (Linux's ``mprotect_fixup`` skips VMAs already at the new
    protection).
    """

    start: int
    end: int
    old_prot: int
    new_prot: int
    vma: Vma


@dataclass(frozen=True, slots=True)
class MmapResult:
    """What ``do_mmap`` did: the address and, for MAP_FIXED, the pieces of
    earlier mappings it replaced (the kernel must zap and write them back as
    for munmap)."""

    addr: int
    unmapped: list[Vma] = field(default_factory=list)
    #: With ``do_mmap(defer=True)``: the new VMA, not yet in the tree (the
    #: kernel zaps ``unmapped`` first, then calls ``insert``).
    vma: Vma | None = None


@dataclass(frozen=True, slots=True)
class MsyncResult:
    """What ``msync`` must do: write back ``ranges`` (pieces of shared,
    writable file mappings, only for MS_SYNC) and then fail with ``errno``
    if it is non-zero (ENOMEM when the range had unmapped holes: Linux syncs
    what is mapped and reports the hole at the end)."""

    ranges: list[Vma]
    errno: int = 0

    def raise_if_error(self) -> None:
        if self.errno:
            raise _err(self.errno, "msync range has unmapped holes")


@dataclass(frozen=True, slots=True)
class MadviseResult:
    """What ``madvise(MADV_FREE)`` must do: clean the pages of ``ranges``
    (pieces of private anonymous mappings; for MADV_DONTNEED, zap them,
    any mapping) and then fail with ``errno`` if
    it is non-zero: EINVAL where the walk met a mapping it may not advise
    (the earlier ones were advised already, as in Linux), ENOMEM when the
    range had unmapped holes (reported after the rest was advised)."""

    ranges: list[Vma]
    errno: int = 0
    #: The advice, for the error message.
    advice: str = "MADV_FREE"
    #: What the mapping the walk stopped at (EINVAL) was not.
    refused: str = "private anonymous and unlocked"
    #: The whole error message, when the defaults do not fit (mlock).
    message: str = ""

    def raise_if_error(self) -> None:
        if self.errno and self.message:
            raise _err(self.errno, self.message)
        if self.errno == errno.EINVAL:
            raise _err(self.errno, f"{self.advice} of a mapping that is not {self.refused}")
        if self.errno:
            raise _err(self.errno, "madvise range has unmapped holes")


class MprotectError(OSError):
    """An mprotect failure.  ``changes`` lists the protection changes already
    applied to the VMAs before the failing one (Linux does not roll them
    back); the kernel must still run change_protection on them."""

    changes: list[ProtChange]

    def __init__(self, code: int, message: str, changes: list[ProtChange] | None = None) -> None:
        super().__init__(code, message)
        self.changes = [] if changes is None else changes


@dataclass(frozen=True, slots=True)
class PageMove:
    """One ``move_page_tables`` call an mremap needs: the pages of
    ``[src, src + length)`` go to ``[dst, dst + length)``.

    ``vma`` is the source piece as it was (its ``pgoff`` and backing tell the
    kernel what the pages are); ``new_vma`` is the VMA that now holds the
    destination; ``dontunmap`` says the source VMA stays (empty) in place.
    """

    src: int
    dst: int
    length: int
    vma: Vma
    new_vma: Vma
    dontunmap: bool = False


@dataclass(frozen=True, slots=True)
class Unmap:
    """One ``do_munmap`` inside an mremap: the pieces it removed (the kernel
    zaps them and flushes once, as for one munmap call)."""

    pieces: list[Vma]


#: One thing an mremap did, in order: an unmap or a move of page tables.
MremapStep = Unmap | PageMove


@dataclass(frozen=True, slots=True)
class MremapResult:
    """What ``mremap`` did: the address it returns and the steps the kernel
    must apply to the page tables, in Linux's order (the destination
    unmapped, the shrunk tail unmapped, the pages moved, the source
    unmapped)."""

    addr: int
    steps: list[MremapStep] = field(default_factory=list)


class MremapError(OSError):
    """An mremap failure after part of the work was done (a MREMAP_FIXED
    destination already unmapped, the first VMAs of a multi-VMA move
    already moved): ``steps`` lists it, Linux does not roll it back."""

    steps: list[MremapStep]

    def __init__(self, code: int, message: str, steps: list[MremapStep] | None = None) -> None:
        super().__init__(code, message)
        self.steps = [] if steps is None else steps


class VmaTree:
    """The VMAs of one address space, kept sorted (two parallel lists + bisect).

    No syscall semantics here: callers keep the VMAs disjoint (``_splice``
    replaces an index range of VMAs by new ones in address order).
    """

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._vmas: list[Vma] = []

    # ------------------------------------------------------------------ queries

    def __len__(self) -> int:
        return len(self._vmas)

    def vmas(self) -> list[Vma]:
        """All VMAs in address order (like /proc/self/maps)."""
        return list(self._vmas)

    def find(self, addr: int) -> Vma | None:
        """The VMA containing ``addr``, if any."""
        i = bisect_right(self._starts, addr) - 1
        if i >= 0 and self._vmas[i].end > addr:
            return self._vmas[i]
        return None

    def intersecting(self, start: int, end: int) -> list[Vma]:
        """The VMAs overlapping ``[start, end)``, whole, in address order."""
        out: list[Vma] = []
        i = self._index_after(start)
        while i < len(self._vmas) and self._vmas[i].start < end:
            out.append(self._vmas[i])
            i += 1
        return out

    def maps(self) -> str:
        """The whole map as /proc/self/maps text."""
        return "".join(v.maps_line() + "\n" for v in self._vmas)

    # ------------------------------------------------------------------ free gaps

    def _gap_topdown(self, length: int, low: int, high: int) -> int | None:
        """Highest ``addr`` with ``[addr, addr+length)`` free inside ``[low, high)``."""
        vmas = self._vmas
        j = bisect_left(self._starts, high) - 1
        gap_end = high
        if j >= 0 and vmas[j].end > high:  # a VMA straddles high
            gap_end = vmas[j].start
            j -= 1
        while gap_end - low >= length:
            gap_start = max(vmas[j].end if j >= 0 else 0, low)
            if gap_end - gap_start >= length:
                return gap_end - length
            if j < 0:
                return None
            gap_end = vmas[j].start
            j -= 1
        return None

    def _gap_bottomup(self, length: int, low: int, high: int) -> int | None:
        """Lowest ``addr`` with ``[addr, addr+length)`` free inside ``[low, high)``."""
        vmas = self._vmas
        i = self._index_after(low)
        gap_start = low
        while high - gap_start >= length:
            gap_end = min(vmas[i].start, high) if i < len(vmas) else high
            if gap_end - gap_start >= length:
                return gap_start
            if i >= len(vmas):
                return None
            gap_start = max(vmas[i].end, low)
            i += 1
        return None

    # ------------------------------------------------------------------ internals

    def _index_after(self, addr: int) -> int:
        """Index of the first VMA with ``end > addr``."""
        i = bisect_right(self._starts, addr) - 1
        if i >= 0 and self._vmas[i].end > addr:
            return i
        return i + 1

    def _range_free(self, start: int, end: int) -> bool:
        i = self._index_after(start)
        return i == len(self._vmas) or self._vmas[i].start >= end

    def _splice(self, lo: int, hi: int, new: list[Vma]) -> None:
        self._vmas[lo:hi] = new
        self._starts[lo:hi] = [v.start for v in new]

    def _unmap_range(self, start: int, end: int) -> list[Vma]:
        vmas = self._vmas
        lo = self._index_after(start)
        hi = lo
        while hi < len(vmas) and vmas[hi].start < end:
            hi += 1
        if lo == hi:
            return []
        removed = [v.piece(max(v.start, start), min(v.end, end)) for v in vmas[lo:hi]]
        keep: list[Vma] = []
        if vmas[lo].start < start:
            keep.append(vmas[lo].piece(vmas[lo].start, start))
        if vmas[hi - 1].end > end:
            keep.append(vmas[hi - 1].piece(end, vmas[hi - 1].end))
        self._splice(lo, hi, keep)
        return removed

    def _insert_merged(self, vma: Vma) -> None:
        """Insert ``vma`` (its range must be free), merging with neighbours."""
        vmas = self._vmas
        lo = hi = bisect_left(self._starts, vma.start)
        if lo > 0 and vmas_mergeable(vmas[lo - 1], vma):
            lo -= 1
            vma = _merged(vmas[lo], vma)
        if hi < len(vmas) and vmas_mergeable(vma, vmas[hi]):
            vma = _merged(vma, vmas[hi])
            hi += 1
        self._splice(lo, hi, [vma])
