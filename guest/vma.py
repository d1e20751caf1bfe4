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
* ``mremap`` has the 6.17+ semantics (checked against a 6.18 kernel by
  ``tests/test_mremap_linux.py``): MREMAP_FIXED without resizing moves every
  VMA of the range; see :meth:`AddressSpace.mremap`.
* VMAs merge when they are adjacent, have the same protection and flags, the
  same backing object (the same *open file*, compared by identity like
  Linux's ``struct file *``; for ``MAP_SHARED | MAP_ANONYMOUS`` the same shmem
  object) and contiguous ``pgoff``.

Not modelled (documented deviations): ``VM_ACCOUNT`` and ``anon_vma`` (Linux
keeps an anonymous VMA that was made writable and then faulted apart from
its never-writable neighbours; here they merge), ``max_map_count``, address
randomisation, THP alignment of large anonymous mappings, ``RLIMIT_MEMLOCK``
(mlock never fails for the limit, as for a process with CAP_IPC_LOCK),
``VM_LOCKONFAULT`` and the other flags that do not change placement or
protection (they are accepted and ignored, as Linux ignores unknown legacy
flags).  ``MAP_LOCKED`` and ``mlock`` set ``VM_LOCKED`` (:attr:`Vma.locked`),
which splits and merges VMAs like the protection; ``fork`` clears it in the
child.  ``MAP_32BIT``,
``MAP_GROWSDOWN`` and ``MAP_HUGETLB`` on anonymous memory raise
``NotImplementedError``.

The data model and the sorted VMA tree are in :mod:`.vma_tree`; this module
re-exports every public name of it, so ``pvemu.guest.vma`` stays the one
import for users of the VMA layer.
"""

from __future__ import annotations

import copy
import errno
import os
from collections.abc import Callable
from dataclasses import replace

from .vma_tree import (
    _PAGE_OFFSET_MASK,
    _PROT_ACCESS,
    _U64,
    MAP_32BIT,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MAP_GROWSDOWN,
    MAP_HUGETLB,
    MAP_LOCKED,
    MAP_NONBLOCK,
    MAP_POPULATE,
    MAP_PRIVATE,
    MAP_SHARED,
    MAP_SHARED_VALIDATE,
    MAP_TYPE,
    MMAP_MIN_ADDR,
    MMAP_STACK_GAP,
    MREMAP_DONTUNMAP,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    MS_ASYNC,
    MS_INVALIDATE,
    MS_SYNC,
    PAGE_SHIFT,
    PAGE_SIZE,
    PROT_GROWSDOWN,
    PROT_GROWSUP,
    PROT_SEM,
    PROT_WRITE,
    TASK_SIZE,
    FileBacking,
    MadviseResult,
    MmapResult,
    MprotectError,
    MremapError,
    MremapResult,
    MremapStep,
    MsyncResult,
    PageMove,
    ProtChange,
    Unmap,
    Vma,
    VmaTree,
    _err,
    _merged,
    page_align,
    vmas_mergeable,
)

__all__ = ["AddressSpace"]

#: Largest file size / offset of a regular file (MAX_LFS_FILESIZE on 64-bit).
_MAX_LFS_FILESIZE = (1 << 63) - 1

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


def _mprotect_error(code: int, what: str, changes: list[ProtChange] | None = None) -> MprotectError:
    return MprotectError(code, f"{os.strerror(code)}: {what}", changes)


class AddressSpace(VmaTree):
    """The VMAs of one process, with Linux's mm syscalls on them.

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
        super().__init__()
        self.task_size = task_size
        self.mmap_min_addr = mmap_min_addr
        self.mmap_base = mmap_base
        self.legacy_base = legacy_base
        self._next_shmem_id = 1

    def fork(self) -> AddressSpace:
        """A copy for a child process (``dup_mmap``): the same VMAs (they are
        immutable, so shared) and layout; the page tables are the kernel's."""
        child = copy.copy(self)
        child._starts = list(self._starts)
        # dup_mmap: memory locks are not inherited (the VMAs are not re-merged)
        child._vmas = [replace(v, locked=False) if v.locked else v for v in self._vmas]
        return child

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
        defer: bool = False,
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

        With ``defer`` the new VMA is returned, not inserted: the kernel zaps
        the replaced pieces first (Linux frees their page tables before the
        new VMA is in place) and then calls :meth:`insert`.
        """
        hint = 0 if addr is None else addr & _U64
        length &= _U64
        prot &= _U64
        flags &= _U64
        offset &= _U64
        if fixed:
            flags |= MAP_FIXED
        file = self._mmap_backing(flags, file, offset)
        pgoff = offset >> PAGE_SHIFT

        # do_mmap()
        if length == 0:
            raise _err(errno.EINVAL, "mmap of length 0")
        if flags & MAP_FIXED_NOREPLACE:
            flags |= MAP_FIXED
        start, end = self._mmap_range(hint, length, flags)
        shmem_id: int | None = None
        if file is not None:
            vflags = self._file_vm_flags(file, prot, flags, end - start, pgoff, offset)
        else:
            vflags, pgoff, shmem_id = self._anonymous_vm_flags(flags, start)

        # mmap_region()
        unmapped = self._unmap_range(start, end) if flags & MAP_FIXED else []
        locked = bool(flags & MAP_LOCKED)
        vma = Vma(start, end, prot & _PROT_ACCESS, vflags, file, pgoff, shmem_id, locked)
        if defer:
            return MmapResult(start, unmapped, vma)
        self._insert_merged(vma)
        return MmapResult(start, unmapped)

    def insert(self, vma: Vma) -> None:
        """Put a VMA ``do_mmap(defer=True)`` returned in place (its range is
        free), merged with its neighbours."""
        self._insert_merged(vma)

    @staticmethod
    def mmap_populates(flags: int) -> bool:
        """Whether mmap with ``flags`` populates the new mapping (``do_mmap``:
        VM_LOCKED, or MAP_POPULATE without MAP_NONBLOCK)."""
        return bool(flags & MAP_LOCKED) or flags & (MAP_POPULATE | MAP_NONBLOCK) == MAP_POPULATE

    def accessible_pieces(self, start: int, end: int) -> list[Vma]:
        """``mm_populate``'s walk of ``[start, end)`` (errors ignored): the
        pieces of the VMAs there, PROT_NONE ones and holes skipped."""
        return [
            v.piece(max(v.start, start), min(v.end, end))
            for v in self.intersecting(start, end)
            if v.prot
        ]

    @staticmethod
    def _mmap_backing(flags: int, file: FileBacking | None, offset: int) -> FileBacking | None:
        """The checks before ``do_mmap`` proper (ksys_mmap_pgoff): the offset's
        alignment, the file (ignored for MAP_ANONYMOUS, required otherwise)
        and MAP_HUGETLB.  Returns the file the mapping will map, if any."""
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
        return file

    def _mmap_range(self, hint: int, length: int, flags: int) -> tuple[int, int]:
        """Where the mapping goes, ``[start, end)``: the hint raised to
        ``mmap_min_addr``, the length page-aligned (ENOMEM if that overflows),
        then placement; MAP_FIXED_NOREPLACE over a mapping is EEXIST."""
        if not flags & MAP_FIXED:
            hint = self._round_hint_to_min(hint)
        length = page_align(length)
        if length == 0:
            raise _err(errno.ENOMEM, "mmap length overflows")
        start = self._get_unmapped_area(hint, length, flags)
        end = start + length
        if flags & MAP_FIXED_NOREPLACE and not self._range_free(start, end):
            raise _err(errno.EEXIST, f"MAP_FIXED_NOREPLACE over a mapping at {start:#x}")
        return start, end

    @staticmethod
    def _file_vm_flags(
        file: FileBacking, prot: int, flags: int, length: int, pgoff: int, offset: int
    ) -> int:
        """The VMA flags of a file mapping, after its checks: the file range
        (EOVERFLOW), the mapping type (EINVAL), MAP_SHARED_VALIDATE's flags
        (EOPNOTSUPP), the file's access mode (EACCES), MAP_GROWSDOWN (EINVAL)."""
        if (
            length > _MAX_LFS_FILESIZE
            or pgoff > _MAX_LFS_FILESIZE >> PAGE_SHIFT
            or _MAX_LFS_FILESIZE - length < pgoff << PAGE_SHIFT
        ):
            raise _err(errno.EOVERFLOW, f"file offset {offset:#x} + length too large")
        mtype = flags & MAP_TYPE
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
        return vflags

    def _anonymous_vm_flags(self, flags: int, start: int) -> tuple[int, int, int | None]:
        """The VMA flags, ``pgoff`` and shmem object of anonymous memory at
        ``start``: a new shmem object for MAP_SHARED (pgoff 0), ``start``'s page
        number for MAP_PRIVATE; any other type is EINVAL."""
        mtype = flags & MAP_TYPE
        if mtype == MAP_SHARED:
            if flags & MAP_GROWSDOWN:
                raise _err(errno.EINVAL, "MAP_GROWSDOWN on shared anonymous memory")
            shmem_id = self._next_shmem_id
            self._next_shmem_id += 1
            return MAP_SHARED | MAP_ANONYMOUS, 0, shmem_id
        if mtype == MAP_PRIVATE:
            if flags & MAP_GROWSDOWN:
                raise NotImplementedError("MAP_GROWSDOWN is not modelled")
            return MAP_PRIVATE | MAP_ANONYMOUS, start >> PAGE_SHIFT, None
        raise _err(errno.EINVAL, f"mmap type {mtype:#x} for anonymous memory")

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
        vma = self._vmas[i]
        if vma.prot == prot:
            return i, vma.end
        mid = vma.piece(start, end).with_prot(prot)
        changes.append(ProtChange(start, end, vma.prot, prot, mid))
        return self._fixup(i, start, end, mid)

    def _fixup(self, i: int, start: int, end: int, mid: Vma) -> tuple[int, int]:
        """Replace ``[start, end)`` of VMA ``i`` by ``mid`` (the same range,
        other protection or flags), splitting and merging (``vma_modify``);
        returns the index and end of the VMA now holding it."""
        vmas = self._vmas
        vma = vmas[i]
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

    # ------------------------------------------------------------------ mlock

    def mlock(self, addr: int, length: int, *, lock: bool = True) -> MadviseResult:
        """Linux ``mlock`` (``lock``) or ``munlock``: VM_LOCKED set or
        cleared, then, for mlock, the pieces to populate.

        ``addr`` is rounded down to its page and the length grown to match
        (no EINVAL for alignment); a wrapping range is EINVAL, length 0 does
        nothing. ``apply_vma_lock_flags`` walks the VMAs in order, changing
        each: a hole (at ``addr`` too) stops the walk with ENOMEM *after* the
        earlier VMAs changed, and then nothing is populated. mlock then
        populates VMA by VMA (``__mm_populate`` without ignoring errors): a
        PROT_NONE VMA stops it with ENOMEM (GUP's EFAULT, which mlock
        reports as ENOMEM; its flag stays set). Checked on Linux 6.18.
        """
        addr &= _U64
        length &= _U64
        what = "mlock" if lock else "munlock"
        start = addr & ~_PAGE_OFFSET_MASK
        end = start + page_align(length + (addr - start))
        if end > _U64 or (length and end == start):
            raise _err(errno.EINVAL, f"{what} range wraps around")
        if end == start:
            return MadviseResult([], advice=what)
        vmas = self._vmas
        i = self._index_after(start)
        hole = MadviseResult([], errno.ENOMEM, what, message=f"{what} range has unmapped holes")
        if i == len(vmas) or vmas[i].start > start:
            return hole
        tmp = nstart = start
        while i < len(vmas) and vmas[i].start < end:
            vma = vmas[i]
            if vma.start > tmp:
                return hole
            if vma.locked != lock:
                stop = min(vma.end, end)
                i, tmp = self._fixup(i, nstart, stop, replace(vma.piece(nstart, stop), locked=lock))
            else:
                tmp = vma.end
            nstart = tmp
            i += 1
        if tmp < end:
            return hole
        if not lock:
            return MadviseResult([], advice=what)
        pieces: list[Vma] = []
        for vma in self.intersecting(start, end):
            if not vma.prot:
                message = f"mlock cannot populate PROT_NONE memory at {vma.start:#x}"
                return MadviseResult(pieces, errno.ENOMEM, what, message=message)
            pieces.append(vma.piece(max(vma.start, start), min(vma.end, end)))
        return MadviseResult(pieces, advice=what)

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

    # ------------------------------------------------------------------ mremap

    def mremap(
        self,
        old_addr: int,
        old_len: int,
        new_len: int,
        flags: int = 0,
        new_addr: int | None = None,
    ) -> MremapResult:
        """Linux ``mremap`` (6.17+ semantics); returns the address and the
        page-table steps (:class:`MremapResult`).

        Both lengths are page-aligned first. Argument checks, in Linux's
        order (``check_mremap_params``), all EINVAL: unknown flags,
        unaligned ``old_addr``, ``new_len`` 0; then,
        with MREMAP_FIXED or MREMAP_DONTUNMAP (which name a new address):
        unaligned ``new_addr``, no MREMAP_MAYMOVE, DONTUNMAP with
        ``old_len != new_len``, a new range beyond ``task_size``, source and
        destination overlapping.

        MREMAP_FIXED with ``old_len == new_len`` moves every VMA of the range
        (gaps between them kept; a gap at the start, or nothing there:
        EFAULT). Otherwise ``old_addr`` must be in a VMA (EFAULT); a shrink
        unmaps the tail (whatever is mapped there), same size returns
        ``old_addr``; growing or moving needs ``[old_addr, old_addr +
        old_len)`` inside that VMA (EFAULT) and ``old_len`` 0 only for shared
        mappings (EINVAL: duplicating a private mapping); growing happens in
        place when the VMA ends at the old range's end and the room after it
        is free, else the VMA moves with MREMAP_MAYMOVE (ENOMEM without).
        A moved private anonymous VMA takes ``pgoff`` from its new address,
        as Linux does for one with no ``anon_vma`` (not modelled).
        Failures after work was done raise :class:`MremapError` with it.
        """
        addr = old_addr & _U64
        old_len &= _U64
        new_len &= _U64
        flags &= _U64
        target = 0 if new_addr is None else new_addr & _U64
        implies_new = bool(flags & (MREMAP_FIXED | MREMAP_DONTUNMAP))
        old_len = page_align(old_len)
        new_len = page_align(new_len)
        if flags & ~(MREMAP_FIXED | MREMAP_MAYMOVE | MREMAP_DONTUNMAP):
            raise _err(errno.EINVAL, f"mremap flags {flags:#x}")
        if addr & _PAGE_OFFSET_MASK:
            raise _err(errno.EINVAL, f"mremap address {addr:#x} not page aligned")
        if new_len == 0:
            raise _err(errno.EINVAL, "mremap to length 0")
        if implies_new:
            if target & _PAGE_OFFSET_MASK:
                raise _err(errno.EINVAL, f"mremap new address {target:#x} not page aligned")
            if not flags & MREMAP_MAYMOVE:
                raise _err(errno.EINVAL, "MREMAP_FIXED/DONTUNMAP without MREMAP_MAYMOVE")
            if flags & MREMAP_DONTUNMAP and old_len != new_len:
                raise _err(errno.EINVAL, "MREMAP_DONTUNMAP with a new length")
            if new_len > self.task_size or target > self.task_size - new_len:
                raise _err(errno.EINVAL, f"mremap target {target:#x} beyond user space")
            if addr + old_len > target and target + new_len > addr:
                raise _err(errno.EINVAL, "mremap source and destination overlap")
        steps: list[MremapStep] = []
        try:
            if flags & MREMAP_FIXED and old_len == new_len:
                result = self._remap_move(addr, old_len, target, flags, steps)
            else:
                vma = self.find(addr)
                self._check_prep_vma(vma, addr, old_len, new_len, implies_new)
                assert vma is not None
                if implies_new:
                    result = self._mremap_to(vma, addr, old_len, new_len, target, flags, steps)
                else:
                    result = self._mremap_at(vma, addr, old_len, new_len, flags, steps)
        except MremapError:
            raise
        except OSError as exc:
            raise MremapError(exc.errno or errno.EINVAL, str(exc.strerror), steps) from None
        return MremapResult(result, steps)

    @staticmethod
    def _check_prep_vma(
        vma: Vma | None, addr: int, old_len: int, new_len: int, implies_new: bool
    ) -> None:
        """``check_prep_vma``: the VMA at ``addr`` (EFAULT if none) may give
        the range a new mapping: not a private duplicate (EINVAL), the old
        range inside it (EFAULT; for a shrink only what stays)."""
        if vma is None:
            raise _err(errno.EFAULT, f"mremap: nothing mapped at {addr:#x}")
        if not (new_len > old_len or implies_new):
            return
        if old_len == 0 and not vma.is_shared:
            raise _err(errno.EINVAL, "mremap duplicate (old_len 0) of a private mapping")
        kept = new_len if new_len < old_len else old_len
        if kept > vma.end - addr:
            raise _err(errno.EFAULT, f"mremap range at {addr:#x} runs past its VMA")

    def _mremap_at(
        self, vma: Vma, addr: int, old_len: int, new_len: int, flags: int, steps: list[MremapStep]
    ) -> int:
        """``mremap_at``: same size, shrink in place, or grow (in place or moved)."""
        if new_len == old_len:
            return addr
        if new_len < old_len:
            self._note_unmap(steps, self.munmap(addr + new_len, old_len - new_len))
            return addr
        delta = new_len - old_len
        if vma.end - addr == old_len and self._expandable(vma, delta):
            self._expand(vma, delta)
            return addr
        if not flags & MREMAP_MAYMOVE:
            raise _err(errno.ENOMEM, f"mremap cannot grow {addr:#x} in place")
        dest = self._remap_target(0, new_len, flags)
        return self._move_vma(vma, addr, old_len, new_len, dest, flags, steps)

    @staticmethod
    def _note_unmap(steps: list[MremapStep], pieces: list[Vma]) -> None:
        """Record one ``do_munmap`` (nothing if it removed nothing)."""
        if pieces:
            steps.append(Unmap(pieces))

    def _expandable(self, vma: Vma, delta: int) -> bool:
        end = vma.end + delta
        return end <= self.task_size and self._range_free(vma.end, end)

    def _expand(self, vma: Vma, delta: int) -> None:
        """``vma_merge_extend``: the VMA grows by ``delta`` and merges with
        the next one if it now touches a compatible one."""
        i = self._starts.index(vma.start)
        grown = replace(vma, end=vma.end + delta)
        hi = i + 1
        if hi < len(self._vmas) and vmas_mergeable(grown, self._vmas[hi]):
            grown = _merged(grown, self._vmas[hi])
            hi += 1
        self._splice(i, hi, [grown])

    def _remap_target(self, hint: int, length: int, flags: int) -> int:
        """``vrm_set_new_addr``: MREMAP_FIXED's address, else a free range
        (DONTUNMAP's new address is a hint)."""
        if flags & MREMAP_FIXED:
            return self._get_unmapped_area(hint, length, MAP_FIXED)
        return self._get_unmapped_area(hint if flags & MREMAP_DONTUNMAP else 0, length, 0)

    def _mremap_to(
        self,
        vma: Vma,
        addr: int,
        old_len: int,
        new_len: int,
        target: int,
        flags: int,
        steps: list[MremapStep],
    ) -> int:
        """``mremap_to``: MREMAP_FIXED unmaps the destination first, a shrink
        unmaps the tail, then the (rest of the) range moves."""
        if flags & MREMAP_FIXED:
            self._note_unmap(steps, self._unmap_range(target, target + new_len))
            found = self.find(addr)
            if found is None:
                raise _err(errno.EFAULT, f"mremap: nothing mapped at {addr:#x}")
            vma = found
        if new_len < old_len:
            self._note_unmap(steps, self.munmap(addr + new_len, old_len - new_len))
            old_len = new_len
        dest = self._remap_target(target, new_len, flags)
        return self._move_vma(vma, addr, old_len, new_len, dest, flags, steps)

    def _move_vma(
        self,
        vma: Vma,
        addr: int,
        old_len: int,
        new_len: int,
        dest: int,
        flags: int,
        steps: list[MremapStep],
    ) -> int:
        """``move_vma``: the new VMA (merged at the destination), the pages
        moved, the source unmapped unless MREMAP_DONTUNMAP."""
        pgoff = vma.pgoff_at(addr)
        if vma.is_private and vma.is_anonymous:
            pgoff = dest >> PAGE_SHIFT
        new_vma = replace(vma, start=dest, end=dest + new_len, pgoff=pgoff)
        self._insert_merged(new_vma)
        dontunmap = bool(flags & MREMAP_DONTUNMAP)
        if old_len:
            source = vma.piece(addr, addr + old_len)
            steps.append(PageMove(addr, dest, old_len, source, new_vma, dontunmap))
            if not dontunmap:
                self._note_unmap(steps, self._unmap_range(addr, addr + old_len))
        return dest

    def _remap_move(
        self, start: int, length: int, target: int, flags: int, steps: list[MremapStep]
    ) -> int:
        """``remap_move`` (6.17+): MREMAP_FIXED without resizing moves every
        VMA of ``[start, start + length)``, each to ``target`` plus its
        offset, so the gaps between them stay; the first must cover
        ``start`` (EFAULT)."""
        end = start + length
        moved = self.intersecting(start, end)
        if not moved or moved[0].start > start:
            raise _err(errno.EFAULT, f"mremap: nothing mapped at {start:#x}")
        result = target
        last_end = moved[0].end
        for i, vma in enumerate(moved):
            addr = max(vma.start, start)
            piece = min(end, vma.end) - addr
            offset = vma.start - last_end if i else 0
            last_end = vma.end
            current = self.find(addr)
            self._check_prep_vma(current, addr, piece, piece, True)
            assert current is not None
            dest = self._mremap_to(current, addr, piece, piece, target + offset, flags, steps)
            if i == 0:
                result = dest
            target = dest + piece
        return result

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

    # ------------------------------------------------------------------ madvise

    def madvise_free(self, addr: int, length: int) -> MadviseResult:
        """Linux ``madvise(addr, length, MADV_FREE)``: which pieces the kernel
        must clean (their pages may then be freed lazily, under memory
        pressure, unless written again).

        EINVAL for an unaligned ``addr`` or a wrapping range; length 0 does
        nothing. The VMAs are walked in address order (``madvise_walk_vmas``):
        one that is not private anonymous (a file or shmem mapping, which
        ``madvise_free_single_vma`` refuses) stops the walk with EINVAL after
        the earlier ones; a hole makes the result ENOMEM, reported at the end.
        """
        return self._madvise_walk(
            addr, length, lambda vma: vma.is_private and vma.is_anonymous and not vma.locked
        )

    def madvise_dontneed(self, addr: int, length: int) -> MadviseResult:
        """Linux ``madvise(addr, length, MADV_DONTNEED)``: which pieces the
        kernel must zap (``zap_page_range_single`` per VMA).

        The same argument checks and walk as :meth:`madvise_free`, but every
        kind of mapping may be advised (Linux refuses only VM_LOCKED,
        VM_PFNMAP and some hugetlb VMAs, none of which pvemu has): private
        pages are dropped (the next read is a zero page, or the file's data
        again for a private file mapping), shared file pages leave the
        mapping but keep their data in the page cache.
        """
        result = self._madvise_walk(addr, length, lambda vma: not vma.locked)
        return MadviseResult(result.ranges, result.errno, "MADV_DONTNEED", "unlocked")

    def madvise_populate(self, addr: int, length: int, *, write: bool) -> MadviseResult:
        """Linux ``madvise(MADV_POPULATE_READ / MADV_POPULATE_WRITE)`` (5.14+,
        ``madvise_populate``): the pieces to populate, VMA by VMA, no VMA
        changed.

        The argument checks of every madvise (EINVAL for an unaligned
        ``addr`` or a wrapping range; length 0 does nothing). Then the walk:
        a hole stops it with ENOMEM (at ``addr`` too; the pieces before it
        are still populated), a VMA the access is not allowed on (write: not
        PROT_WRITE; read: not PROT_READ, PROT_NONE included) with EINVAL.
        Checked on Linux 6.18; a file page beyond the end of the file
        (EFAULT there) is not modelled: pvemu reads zeros there.
        """
        advice = "MADV_POPULATE_WRITE" if write else "MADV_POPULATE_READ"
        addr &= _U64
        length &= _U64
        if addr & _PAGE_OFFSET_MASK:
            raise _err(errno.EINVAL, f"madvise address {addr:#x} not page aligned")
        aligned = page_align(length)
        end = addr + aligned
        if (length and not aligned) or end > _U64:
            raise _err(errno.EINVAL, "madvise range wraps around")
        pieces: list[Vma] = []
        start = addr
        i = self._index_after(start)
        while start < end:
            if i == len(self._vmas) or self._vmas[i].start > start:
                return MadviseResult(pieces, errno.ENOMEM, advice)
            vma = self._vmas[i]
            if not (vma.writable if write else vma.readable):
                refused = "writable" if write else "readable"
                return MadviseResult(pieces, errno.EINVAL, advice, refused)
            pieces.append(vma.piece(start, min(end, vma.end)))
            start = vma.end
            i += 1
        return MadviseResult(pieces, advice=advice)

    def _madvise_walk(
        self, addr: int, length: int, allowed: Callable[[Vma], bool]
    ) -> MadviseResult:
        """``madvise_walk_vmas``: the pieces of ``[addr, addr + length)`` to
        advise, in order; a VMA not ``allowed`` stops the walk (EINVAL), a
        hole is ENOMEM at the end."""
        addr &= _U64
        length &= _U64
        if addr & _PAGE_OFFSET_MASK:
            raise _err(errno.EINVAL, f"madvise address {addr:#x} not page aligned")
        aligned = page_align(length)
        end = addr + aligned
        if (length and not aligned) or end > _U64:
            raise _err(errno.EINVAL, "madvise range wraps around")
        ranges: list[Vma] = []
        if end == addr:
            return MadviseResult(ranges)
        unmapped_error = 0
        start = addr
        i = self._index_after(start)
        while True:
            if i >= len(self._vmas):
                return MadviseResult(ranges, errno.ENOMEM)
            vma = self._vmas[i]
            if start < vma.start:
                unmapped_error = errno.ENOMEM
                start = vma.start
                if start >= end:
                    return MadviseResult(ranges, errno.ENOMEM)
            if not allowed(vma):
                return MadviseResult(ranges, errno.EINVAL)
            ranges.append(vma.piece(start, min(end, vma.end)))
            start = vma.end
            if start >= end:
                return MadviseResult(ranges, unmapped_error)
            i += 1
