"""The VMA tree of one guest address space, with Linux's syscall semantics.

Pure, sans-I/O code: this module only decides *which* virtual ranges exist
and with which protection, exactly as Linux's ``mmap``/``mprotect``/
``munmap``/``msync`` would (argument checks, errnos and their order, VMA
split and merge, address selection).  It never touches page tables: every
operation returns what the kernel layer must do to the page tables
(``change_protection`` ranges, ranges to zap, ranges to write back).

Behaviour reproduced from Linux (x86-64, 4-level paging, checked against a
6.18 kernel where noted):

* ``TASK_SIZE`` is ``(1 << 47) - PAGE_SIZE``: x86-64 keeps the last user page
  unmapped, so ``MAP_FIXED`` at ``(1 << 47) - PAGE_SIZE`` fails with ENOMEM.
* ``mmap`` ignores unknown ``prot`` bits (only ``mprotect`` validates them),
  ignores the file for ``MAP_ANONYMOUS`` and returns EBADF for a file mapping
  without a file; a length larger than ``TASK_SIZE`` is ENOMEM (only 0 is
  EINVAL); ``MAP_SHARED | MAP_PRIVATE`` is ``MAP_SHARED_VALIDATE``, accepted
  for files (unknown flags then give EOPNOTSUPP) and EINVAL for anonymous
  memory; a hint below ``mmap_min_addr`` is raised to it, ``MAP_FIXED`` below
  it is EPERM (an unprivileged process).
* ``mprotect`` walks the VMAs in address order and changes each one before
  looking at the next: a hole (ENOMEM) or a VMA that may not become writable
  (EACCES) stops the walk *after* the earlier VMAs were changed.  The raised
  :class:`MprotectError` carries the changes already made so the kernel can
  still run ``change_protection`` on them.
* ``munmap`` accepts holes; only unaligned/zero/out-of-range arguments fail.
* VMAs merge when they are adjacent, have the same protection and flags, the
  same backing object (the same *open file*, compared by identity like
  Linux's ``struct file *``; for ``MAP_SHARED | MAP_ANONYMOUS`` the same shmem
  object) and contiguous ``pgoff``.

Not modelled (documented deviations): ``VM_ACCOUNT`` and ``anon_vma`` (Linux
keeps an anonymous VMA that was made writable and then faulted apart from
its never-writable neighbours; here they merge), ``max_map_count``, address
randomisation, THP alignment of large anonymous mappings, ``VM_LOCKED`` and
the other flags that do not change placement or protection (they are
accepted and ignored, as Linux ignores unknown legacy flags).  ``MAP_32BIT``,
``MAP_GROWSDOWN`` and ``MAP_HUGETLB`` on anonymous memory raise
``NotImplementedError``.
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
    "MS_ASYNC",
    "MS_INVALIDATE",
    "MS_SYNC",
    "page_align",
    "prot_string",
    "FileBacking",
    "Vma",
    "vmas_mergeable",
    "ProtChange",
    "MmapResult",
    "MsyncResult",
    "MprotectError",
    "AddressSpace",
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
#: Largest file size / offset of a regular file (MAX_LFS_FILESIZE on 64-bit).
_MAX_LFS_FILESIZE = (1 << 63) - 1

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

# Flags MAP_SHARED_VALIDATE accepts for a regular file (measured on Linux 6.18:
# the legacy flags, MAP_32BIT, MAP_ABOVE4G and MAP_UNINITIALIZED / huge-size
# bits); anything else is EOPNOTSUPP, MAP_SYNC and MAP_FIXED_NOREPLACE included.
_SHARED_VALIDATE_OK = (
    MAP_SHARED_VALIDATE
    | MAP_FIXED
    | MAP_ANONYMOUS
    | MAP_32BIT
    | 0x80  # MAP_ABOVE4G
    | MAP_GROWSDOWN
    | 0x800  # MAP_DENYWRITE
    | 0x1000  # MAP_EXECUTABLE
    | 0x2000  # MAP_LOCKED
    | 0x4000  # MAP_NORESERVE
    | 0x8000  # MAP_POPULATE
    | 0x10000  # MAP_NONBLOCK
    | 0x20000  # MAP_STACK
    | MAP_HUGETLB
    | 0x7C000000  # MAP_UNINITIALIZED and the MAP_HUGE_* size bits
)

MS_ASYNC = 1
MS_INVALIDATE = 2
MS_SYNC = 4


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
    unique per mmap call; ``None`` otherwise.
    """

    start: int
    end: int
    prot: int
    flags: int
    file: FileBacking | None = None
    pgoff: int = 0
    shmem_id: int | None = None

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


class MprotectError(OSError):
    """An mprotect failure.  ``changes`` lists the protection changes already
    applied to the VMAs before the failing one (Linux does not roll them
    back); the kernel must still run change_protection on them."""

    changes: list[ProtChange]

    def __init__(self, code: int, message: str, changes: list[ProtChange] | None = None) -> None:
        super().__init__(code, message)
        self.changes = [] if changes is None else changes


def _mprotect_error(code: int, what: str, changes: list[ProtChange] | None = None) -> MprotectError:
    return MprotectError(code, f"{os.strerror(code)}: {what}", changes)


class AddressSpace:
    """The VMAs of one process, kept sorted (two parallel lists + bisect).

    Args:
        task_size: end of the user address space.
        mmap_min_addr: lowest mappable address (hints are raised to it,
            MAP_FIXED below it is EPERM).
        mmap_base: top of the top-down search (default: Linux's
            no-randomisation value, ``task_size - 128 MiB``).
        legacy_base: start of the bottom-up fallback search (default:
            ``TASK_UNMAPPED_BASE``, a third of ``task_size``).
    """

    def __init__(
        self,
        *,
        task_size: int = TASK_SIZE,
        mmap_min_addr: int = MMAP_MIN_ADDR,
        mmap_base: int | None = None,
        legacy_base: int | None = None,
    ) -> None:
        if task_size <= 0 or task_size & _PAGE_OFFSET_MASK:
            raise ValueError("task_size must be a positive page multiple")
        if mmap_base is None:
            gap = min(MMAP_STACK_GAP, (task_size // 6) * 5)
            mmap_base = (task_size - gap) & ~_PAGE_OFFSET_MASK
        if legacy_base is None:
            legacy_base = page_align(task_size // 3)
        if not 0 <= mmap_min_addr < task_size or not 0 < mmap_base <= task_size:
            raise ValueError("mmap_min_addr/mmap_base outside the address space")
        self.task_size = task_size
        self.mmap_min_addr = mmap_min_addr
        self.mmap_base = mmap_base
        self.legacy_base = legacy_base
        self._starts: list[int] = []
        self._vmas: list[Vma] = []
        self._next_shmem_id = 1

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

    # ------------------------------------------------------------------ mmap

    def mmap(
        self,
        length: int,
        prot: int,
        flags: int,
        *,
        addr: int | None = None,
        file: FileBacking | None = None,
        offset: int = 0,
        fixed: bool = False,
    ) -> int:
        """Linux ``mmap``; returns the address.

        With ``fixed=True`` (or ``MAP_FIXED`` in ``flags``) whatever was mapped
        in the range is unmapped first: use :meth:`do_mmap` to learn which
        pieces were replaced.
        """
        return self.do_mmap(
            length, prot, flags, addr=addr, file=file, offset=offset, fixed=fixed
        ).addr

    def do_mmap(
        self,
        length: int,
        prot: int,
        flags: int,
        *,
        addr: int | None = None,
        file: FileBacking | None = None,
        offset: int = 0,
        fixed: bool = False,
    ) -> MmapResult:
        """Linux ``mmap``, also returning the pieces a MAP_FIXED mapping replaced.

        Checks, in Linux's order: unaligned ``offset`` (EINVAL); a file mapping
        without a file (EBADF; for MAP_ANONYMOUS the file is ignored);
        MAP_HUGETLB on a regular file (EINVAL); length 0 (EINVAL); length
        overflowing or larger than the address space (ENOMEM); placement
        (MAP_FIXED beyond the address space: ENOMEM, unaligned: EINVAL, below
        ``mmap_min_addr``: EPERM; no room: ENOMEM); MAP_FIXED_NOREPLACE over
        a mapping (EEXIST); file offset + length past the largest file size
        (EOVERFLOW); the mapping type (EINVAL), unknown flags with
        MAP_SHARED_VALIDATE (EOPNOTSUPP), PROT_WRITE on a shared mapping of a
        file not opened for writing, or a file not opened for reading (EACCES).
        Unknown ``prot`` bits are ignored, as Linux's mmap ignores them.
        """
        hint = 0 if addr is None else addr & _U64
        length &= _U64
        prot &= _U64
        flags &= _U64
        offset &= _U64
        if fixed:
            flags |= MAP_FIXED
        if offset & _PAGE_OFFSET_MASK:
            raise _err(errno.EINVAL, f"mmap offset {offset:#x} is not page aligned")
        anonymous = bool(flags & MAP_ANONYMOUS)
        if anonymous:
            file = None  # Linux ignores the fd of an anonymous mapping
        elif file is None:
            raise _err(errno.EBADF, "mmap of a file mapping without a file")
        if flags & MAP_HUGETLB:
            if file is not None:
                raise _err(errno.EINVAL, "MAP_HUGETLB on a file outside hugetlbfs")
            raise NotImplementedError("MAP_HUGETLB is not modelled")
        pgoff = offset >> PAGE_SHIFT

        # do_mmap()
        if length == 0:
            raise _err(errno.EINVAL, "mmap of length 0")
        if flags & MAP_FIXED_NOREPLACE:
            flags |= MAP_FIXED
        if not flags & MAP_FIXED:
            hint = self._round_hint_to_min(hint)
        length = page_align(length)
        if length == 0:
            raise _err(errno.ENOMEM, "mmap length overflows")
        start = self._get_unmapped_area(hint, length, flags)
        end = start + length
        if flags & MAP_FIXED_NOREPLACE and not self._range_free(start, end):
            raise _err(errno.EEXIST, f"MAP_FIXED_NOREPLACE over a mapping at {start:#x}")

        mtype = flags & MAP_TYPE
        shmem_id: int | None = None
        if file is not None:
            if (
                length > _MAX_LFS_FILESIZE
                or pgoff > _MAX_LFS_FILESIZE >> PAGE_SHIFT
                or _MAX_LFS_FILESIZE - length < pgoff << PAGE_SHIFT
            ):
                raise _err(errno.EOVERFLOW, f"file offset {offset:#x} + length too large")
            if mtype in (MAP_SHARED, MAP_SHARED_VALIDATE):
                if mtype == MAP_SHARED_VALIDATE and flags & ~_SHARED_VALIDATE_OK:
                    raise _err(errno.EOPNOTSUPP, f"MAP_SHARED_VALIDATE with flags {flags:#x}")
                if prot & PROT_WRITE and not file.writable:
                    raise _err(errno.EACCES, f"PROT_WRITE shared mapping of read-only {file.path}")
                vflags = MAP_SHARED
            elif mtype == MAP_PRIVATE:
                vflags = MAP_PRIVATE
            else:
                raise _err(errno.EINVAL, f"mmap type {mtype:#x}")
            if not file.readable:
                raise _err(errno.EACCES, f"{file.path} is not open for reading")
            if flags & MAP_GROWSDOWN:
                raise _err(errno.EINVAL, "MAP_GROWSDOWN on a file mapping")
        else:
            if mtype == MAP_SHARED:
                if flags & MAP_GROWSDOWN:
                    raise _err(errno.EINVAL, "MAP_GROWSDOWN on shared anonymous memory")
                pgoff = 0
                shmem_id = self._next_shmem_id
                self._next_shmem_id += 1
                vflags = MAP_SHARED | MAP_ANONYMOUS
            elif mtype == MAP_PRIVATE:
                if flags & MAP_GROWSDOWN:
                    raise NotImplementedError("MAP_GROWSDOWN is not modelled")
                pgoff = start >> PAGE_SHIFT
                vflags = MAP_PRIVATE | MAP_ANONYMOUS
            else:
                raise _err(errno.EINVAL, f"mmap type {mtype:#x} for anonymous memory")

        # mmap_region()
        unmapped = self._unmap_range(start, end) if flags & MAP_FIXED else []
        self._insert_merged(Vma(start, end, prot & _PROT_ACCESS, vflags, file, pgoff, shmem_id))
        return MmapResult(start, unmapped)

    def _round_hint_to_min(self, hint: int) -> int:
        hint &= ~_PAGE_OFFSET_MASK
        if hint and hint < self.mmap_min_addr:
            return page_align(self.mmap_min_addr)
        return hint

    def _get_unmapped_area(self, hint: int, length: int, flags: int) -> int:
        if length > self.task_size:
            raise _err(errno.ENOMEM, f"mmap length {length:#x} exceeds the address space")
        if flags & MAP_FIXED:
            addr = hint
        else:
            if flags & MAP_32BIT:
                raise NotImplementedError("MAP_32BIT placement is not modelled")
            addr = self._search(hint, length)
        if addr > self.task_size - length:
            raise _err(errno.ENOMEM, f"mapping at {addr:#x} exceeds the address space")
        if addr & _PAGE_OFFSET_MASK:
            raise _err(errno.EINVAL, f"MAP_FIXED address {addr:#x} is not page aligned")
        if addr < self.mmap_min_addr:
            raise _err(errno.EPERM, f"mapping at {addr:#x} below mmap_min_addr")
        return addr

    def _search(self, hint: int, length: int) -> int:
        """x86-64 ``arch_get_unmapped_area_topdown`` without randomisation."""
        if hint:
            hint &= ~_PAGE_OFFSET_MASK
            if hint <= self.task_size - length and self._range_free(hint, hint + length):
                return hint
        low = max(PAGE_SIZE, self.mmap_min_addr)
        found = self._gap_topdown(length, low, self.mmap_base)
        if found is None:
            found = self._gap_bottomup(length, max(low, self.legacy_base), self.task_size)
        if found is None:
            raise _err(errno.ENOMEM, f"no free range of {length:#x} bytes")
        return found

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

    # ------------------------------------------------------------------ mprotect

    def mprotect(self, addr: int, length: int, prot: int) -> list[ProtChange]:
        """Linux ``mprotect``; returns the changes for ``change_protection``.

        Checks, in Linux's order: PROT_GROWSDOWN|PROT_GROWSUP together
        (EINVAL); unaligned ``addr`` (EINVAL); length 0 (success, nothing
        else is checked); a range that wraps (ENOMEM); unknown ``prot`` bits
        (EINVAL; PROT_SEM is accepted and ignored); no VMA at ``addr``
        (ENOMEM; PROT_GROWSDOWN/UP on a VMA that cannot grow: EINVAL).  Then
        each VMA in the range, in order: a hole before it (ENOMEM) or
        PROT_WRITE on a VMA without VM_MAYWRITE (EACCES) stops the walk, the
        VMAs before it keep their new protection (see
        :class:`MprotectError`); a range ending in a hole is ENOMEM after all
        VMAs were changed.  A range beyond ``task_size`` is a hole.
        """
        addr &= _U64
        length &= _U64
        prot &= _U64
        grows = prot & (PROT_GROWSDOWN | PROT_GROWSUP)
        prot &= ~(PROT_GROWSDOWN | PROT_GROWSUP)
        if grows == PROT_GROWSDOWN | PROT_GROWSUP:
            raise _mprotect_error(errno.EINVAL, "PROT_GROWSDOWN with PROT_GROWSUP")
        if addr & _PAGE_OFFSET_MASK:
            raise _mprotect_error(errno.EINVAL, f"mprotect address {addr:#x} not page aligned")
        if length == 0:
            return []
        length = page_align(length)
        end = (addr + length) & _U64
        if end <= addr:
            raise _mprotect_error(errno.ENOMEM, "mprotect range wraps around")
        if prot & ~(_PROT_ACCESS | PROT_SEM):
            raise _mprotect_error(errno.EINVAL, f"unknown prot bits {prot:#x}")
        prot &= _PROT_ACCESS

        vmas = self._vmas
        i = self._index_after(addr)
        if i == len(vmas) or vmas[i].start >= end:
            raise _mprotect_error(errno.ENOMEM, f"nothing mapped in {addr:#x}-{end:#x}")
        if grows & PROT_GROWSDOWN:
            raise _mprotect_error(errno.EINVAL, "PROT_GROWSDOWN on a VMA that cannot grow")
        if vmas[i].start > addr:
            raise _mprotect_error(errno.ENOMEM, f"{addr:#x} is not mapped")
        if grows & PROT_GROWSUP:
            raise _mprotect_error(errno.EINVAL, "PROT_GROWSUP on a VMA that cannot grow")

        changes: list[ProtChange] = []
        tmp = vmas[i].start
        nstart = addr
        while i < len(vmas) and vmas[i].start < end:
            vma = vmas[i]
            if vma.start != tmp:
                raise _mprotect_error(errno.ENOMEM, f"{tmp:#x} is not mapped", changes)
            if prot & PROT_WRITE and not vma.may_write:
                raise _mprotect_error(
                    errno.EACCES,
                    f"PROT_WRITE on a read-only shared mapping at {vma.start:#x}",
                    changes,
                )
            i, tmp = self._mprotect_fixup(i, nstart, min(vma.end, end), prot, changes)
            i += 1
            nstart = tmp
        if tmp < end:
            raise _mprotect_error(errno.ENOMEM, f"{tmp:#x} is not mapped", changes)
        return changes

    def _mprotect_fixup(
        self, i: int, start: int, end: int, prot: int, changes: list[ProtChange]
    ) -> tuple[int, int]:
        """Give ``[start, end)`` of VMA ``i`` the protection ``prot``, splitting
        and merging; returns the index and end of the VMA now holding it."""
        vmas = self._vmas
        vma = vmas[i]
        if vma.prot == prot:
            return i, vma.end
        mid = vma.piece(start, end).with_prot(prot)
        changes.append(ProtChange(start, end, vma.prot, prot, mid))
        left = vma.piece(vma.start, start) if start > vma.start else None
        right = vma.piece(end, vma.end) if end < vma.end else None
        lo, hi = i, i + 1
        if left is None and lo > 0 and vmas_mergeable(vmas[lo - 1], mid):
            lo -= 1
            mid = _merged(vmas[lo], mid)
        if right is None and hi < len(vmas) and vmas_mergeable(mid, vmas[hi]):
            mid = _merged(mid, vmas[hi])
            hi += 1
        new = [mid]
        if left is not None:
            new.insert(0, left)
        if right is not None:
            new.append(right)
        self._splice(lo, hi, new)
        return (lo + 1 if left is not None else lo), mid.end

    # ------------------------------------------------------------------ munmap

    def munmap(self, addr: int, length: int) -> list[Vma]:
        """Linux ``munmap``; returns the removed pieces in address order.

        EINVAL for an unaligned ``addr``, ``addr`` beyond ``task_size``, a
        range running past ``task_size``, or length 0.  Unmapped holes in the
        range are fine (nothing to remove there).
        """
        addr &= _U64
        length &= _U64
        if addr & _PAGE_OFFSET_MASK:
            raise _err(errno.EINVAL, f"munmap address {addr:#x} not page aligned")
        if addr > self.task_size or length > self.task_size - addr:
            raise _err(errno.EINVAL, f"munmap range {addr:#x}+{length:#x} outside user space")
        length = page_align(length)
        if length == 0:
            raise _err(errno.EINVAL, "munmap of length 0")
        return self._unmap_range(addr, addr + length)

    # ------------------------------------------------------------------ msync

    def msync(self, addr: int, length: int, flags: int = MS_SYNC) -> MsyncResult:
        """Linux ``msync``: what to write back, and the error to report after.

        EINVAL for unknown flags, an unaligned ``addr`` or MS_ASYNC with
        MS_SYNC; ENOMEM (raised) for a wrapping range.  A hole makes the
        result's ``errno`` ENOMEM; with plain MS_ASYNC the walk stops there.
        Only MS_SYNC writes back, and only shared mappings of files opened
        for writing (a read-only shared mapping has no VM_SHARED).
        """
        addr &= _U64
        length &= _U64
        if flags & ~(MS_ASYNC | MS_INVALIDATE | MS_SYNC):
            raise _err(errno.EINVAL, f"msync flags {flags:#x}")
        if addr & _PAGE_OFFSET_MASK:
            raise _err(errno.EINVAL, f"msync address {addr:#x} not page aligned")
        if flags & MS_ASYNC and flags & MS_SYNC:
            raise _err(errno.EINVAL, "msync with MS_ASYNC and MS_SYNC")
        end = addr + page_align(length)
        if end > _U64:
            raise _err(errno.ENOMEM, "msync range wraps around")
        ranges: list[Vma] = []
        if end == addr:
            return MsyncResult(ranges)
        unmapped_error = 0
        start = addr
        i = self._index_after(start)
        while True:
            if i >= len(self._vmas):
                return MsyncResult(ranges, errno.ENOMEM)
            vma = self._vmas[i]
            if start < vma.start:
                if flags == MS_ASYNC:
                    return MsyncResult(ranges, errno.ENOMEM)
                start = vma.start
                if start >= end:
                    return MsyncResult(ranges, errno.ENOMEM)
                unmapped_error = errno.ENOMEM
            if flags & MS_SYNC and vma.file is not None and vma.is_shared and vma.may_write:
                ranges.append(vma.piece(start, min(end, vma.end)))
            start = vma.end
            if start >= end:
                return MsyncResult(ranges, unmapped_error)
            i += 1

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
