"""The guest kernel's mm: VMAs, demand paging, mprotect, munmap, msync.

It follows Linux after the seed patch: ``change_protection`` walks one PTE
page at a time under that page's lock, inside a lazy-MMU section, and does
start -> ``pte_modify`` -> (``pte_mkwrite``) -> commit for every present PTE;
the TLB is flushed once for the whole call, as ``tlb_finish_mmu`` does. What
each hook costs is the pv-ops backend's business (``guest.pvops``): the same
kernel runs natively, with unbatched traps, writable page tables, Linux's Xen
batching, whole-page batching, and the unsafe naive commit.

Where the backend has the range form (``batched``, ``naive``, ``native``),
a PTE page's run of present PTEs is read once, changed and committed as
arrays (``guest.ptes``); the per-PTE loop stays, for the modes that
reproduce Linux's loop and as the reference the range form is tested
against (``Kernel(per_pte=True)``).

The kernel runs processes (``guest.process``): each has its own tree, VMAs
and locks. The booted tree is process 1 and every call without a ``pid``
is about it; a user access on a vCPU runs in the process loaded there
(:meth:`Kernel.switch_to`).
"""

from __future__ import annotations

import errno
import mmap as mman
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from pvemu.shared import abi
from pvemu.shared.x86 import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_NX,
    _PAGE_PRESENT,
    _PAGE_RW,
    _PAGE_USER,
    ENTRIES_PER_TABLE,
    L2_PAGETABLE_SHIFT,
    L3_PAGETABLE_SHIFT,
    L4_PAGETABLE_SHIFT,
    PAGE_SHIFT,
    PAGE_SIZE,
    PF_INSTR,
    PF_WRITE,
    PTE_MFN_MASK,
    PTE_SIZE,
    is_canonical,
    maddr_of_entry,
    make_pte,
    va_indexes,
)

from .client import Domain
from .machine import Machine, NativeMachine
from .modes import make_backend, make_native_backend
from .modes import mode as _mode
from .mremap import PageTableMover
from .pagetree import (
    USER_L4_SLOTS,
    alloc_table_entries,
    pin_entries,
    release_table_entries,
    unpin_entries,
    walk_user_tree,
)
from .process import IDLE_PID, INIT_PID, NoSuchProcess, Process
from .ptes import (
    _PAGE_PROTNONE,
    can_change_writable,
    flush_offsets,
    present_run,
    pte_modify,
    pte_needs_flush,
    pte_present,
    ptes_can_change_writable,
    ptes_modify,
    ptes_present,
    read_ptes,
)
from .pvops import HypercallFailed, PvOps, TlbGather
from .tlb import MmuGather, tlb_flush_all_op

if TYPE_CHECKING:
    from .ptes import Indexes, Ptes
from .vma import AddressSpace
from .vma_tree import (
    MADV_POPULATE_READ,
    MADV_POPULATE_WRITE,
    FileBacking,
    MprotectError,
    MremapError,
    ProtChange,
    Vma,
)

TABLE_FLAGS: Final = _PAGE_PRESENT | _PAGE_RW | _PAGE_USER
#: Linux's MADV_FREE (Python's mmap module lacks it on some builds).
MADV_FREE: Final = 8
#: User accesses sent per run_user request.
ACCESS_BATCH: Final = 256
_RW: Final = np.uint64(_PAGE_RW)
_MFN: Final = np.uint64(PTE_MFN_MASK)
#: Where exec puts the new image's stack (its argument pages end here).
STACK_TOP: Final = 0x7FFF_F000_0000
_A: Final = np.uint64(_PAGE_ACCESSED)
#: Index shifts of the L4, L3 and L2 entries on the way to a PTE page.
_UPPER_SHIFTS: Final = (L4_PAGETABLE_SHIFT, L3_PAGETABLE_SHIFT, L2_PAGETABLE_SHIFT)
_INDEX_MASK: Final = ENTRIES_PER_TABLE - 1
#: Index shift of each level's entries (what span one entry covers).
_LEVEL_SHIFTS: Final = {4: L4_PAGETABLE_SHIFT, 3: L3_PAGETABLE_SHIFT, 2: L2_PAGETABLE_SHIFT}


class SegmentationFault(Exception):
    """A user access the kernel cannot satisfy (SIGSEGV)."""

    def __init__(self, addr: int, reason: str) -> None:
        super().__init__(f"segmentation fault at {addr:#x}: {reason}")
        self.addr = addr
        self.reason = reason


def vm_page_prot(vma: Vma) -> int:
    """The PTE protection bits of a VMA (``vm_page_prot``).

    Private writable mappings are installed read-only (write access comes
    from the fault handler or ``pte_mkwrite``); shared file mappings that
    want write-notify also lose RW so the first write marks the page dirty.
    """
    if not vma.prot:
        return _PAGE_PROTNONE | _PAGE_ACCESSED
    flags = _PAGE_PRESENT | _PAGE_USER | _PAGE_ACCESSED
    if vma.writable and vma.is_shared and not vma.wants_writenotify:
        flags |= _PAGE_RW
    if not vma.executable:
        flags |= _PAGE_NX
    return flags


def read_file_page(path: str, offset: int) -> bytes:
    """One page of a file (short at end of file): a local disk read."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(PAGE_SIZE)


@dataclass
class PhaseCounter:
    """What a phase cost: the kernel's own view, independent of the machine."""

    page_faults: int = 0
    segfaults: int = 0
    #: Write faults on a present read-only private page: copied because
    #: another PTE still maps its frame (``wp_page_copy``, after fork) ...
    cow_copies: int = 0
    #: ... or made writable in place, this PTE being its only mapper
    #: (``wp_page_reuse``: after fork once the other mapper is gone, or a
    #: page first read, then written).
    cow_reuses: int = 0
    #: Pages faulted in by MAP_POPULATE, MADV_POPULATE_* and mlock (GUP:
    #: the fault handler without a user fault; not in ``page_faults``).
    populated: int = 0


@dataclass
class FilePage:
    """One page of a file in the page cache (shared by all its mappings)."""

    mfn: int
    dirty: bool = False


@dataclass
class _PageCache:
    pages: dict[tuple[str, int], FilePage] = field(default_factory=dict)


class Kernel:
    """One guest kernel and its processes, over a machine and a backend."""

    def __init__(
        self, machine: Machine, backends: Sequence[PvOps], *, per_pte: bool = False
    ) -> None:
        """``per_pte`` keeps ``change_protection`` on the per-PTE loop even
        where the backend has the range form: the reference the range form
        is proven equal to."""
        self.machine = machine
        self.per_pte = per_pte
        #: One backend per vCPU (lazy-MMU state is per CPU); system calls run
        #: on vCPU 0, a page fault on the vCPU that took it.
        self.backends = list(backends)
        self.backend = self.backends[0]
        self.counters = PhaseCounter()
        self._cache = _PageCache()
        self._files: dict[tuple[str, bool], FileBacking] = {}
        self._free_frames: list[int] = []
        #: Mappings of each private frame that more than one PTE maps (after
        #: fork); a frame not here has one. A write fault copies such a page.
        self._mapcount: dict[int, int] = {}
        init = Process(INIT_PID, machine.l4_mfn, cpus=set(range(machine.nr_vcpus)))
        #: Live processes by pid; the booted tree is ``init`` (pid 1).
        self.processes: dict[int, Process] = {INIT_PID: init}
        #: The process whose tree each vCPU has loaded.
        self._loaded: list[Process] = [init] * machine.nr_vcpus
        #: The kernel's own tree (``init_mm``), built the first time a vCPU
        #: must leave a process.
        self._idle: Process | None = None
        self._next_pid = INIT_PID + 1

    @property
    def mm(self) -> AddressSpace:
        """The address space of process 1 (the booted one)."""
        return self.process(INIT_PID).mm

    @property
    def mode(self) -> str:
        return self.backend.name

    @property
    def unsafe(self) -> bool:
        """The mode loses hardware-set A/D bits by design (the registry says)."""
        return _mode(self.mode).unsafe

    # --- system calls -------------------------------------------------------------

    async def mmap(
        self,
        length: int,
        prot: int,
        flags: int,
        *,
        addr: int | None = None,
        path: str | None = None,
        offset: int = 0,
        writable: bool | None = None,
        pid: int | None = None,
        vcpu: int = 0,
    ) -> int:
        """Linux mmap, run on ``vcpu``; ``flags`` and ``prot`` from Python's
        ``mmap`` module.

        ``path`` maps a file; ``writable`` is how it was opened (O_RDWR or
        O_RDONLY; default: O_RDWR when this process may write it), which
        decides whether a shared mapping may ever be made writable (EACCES).
        ``pid`` is the calling process (default 1), as for every system call.
        A ``MAP_FIXED`` mapping over existing ones unmaps them first exactly
        as munmap does (zap, free the tables nothing needs, one flush);
        ``MAP_POPULATE`` (without ``MAP_NONBLOCK``) and ``MAP_LOCKED`` then
        populate it (:meth:`_populate`). docs/architecture.md, "populate,
        mlock and MAP_FIXED".
        """
        proc = self.process(pid)
        mm = proc.mm
        backing = None if path is None else self._open(path, writable)
        result = mm.do_mmap(length, prot, flags, addr=addr, file=backing, offset=offset, defer=True)
        assert result.vma is not None
        backend = self.backends[vcpu]
        if result.unmapped:
            await self.unmap_pieces(result.unmapped, backend, proc)
        mm.insert(result.vma)
        if mm.mmap_populates(flags):  # mm_populate: errors ignored
            for piece in mm.accessible_pieces(result.vma.start, result.vma.end):
                await self._populate(piece, piece.is_private and piece.writable, backend, proc)
        return result.addr

    def _open(self, path: str, writable: bool | None) -> FileBacking:
        """The open file ``path`` (O_RDWR if ``writable``, default: when this
        process may write it), one object per path and mode."""
        if not os.path.isfile(path):
            raise OSError(errno.ENOENT, f"{os.strerror(errno.ENOENT)}: {path}")
        if writable is None:
            writable = os.access(path, os.W_OK)
        return self._files.setdefault((path, writable), FileBacking(path, writable))

    async def mprotect(self, addr: int, length: int, prot: int, *, pid: int | None = None) -> None:
        """Linux mprotect: VMA split/merge, then change_protection per piece;
        a locked private piece made writable is then write-populated
        (``mprotect_fixup``: COW broken, as mlock would have)."""
        proc = self.process(pid)
        try:
            changes = proc.mm.mprotect(addr, length, prot)
        except MprotectError as exc:
            await self._change_protection(exc.changes, proc)
            await self._populate_locked(exc.changes, proc)
            raise
        await self._change_protection(changes, proc)
        await self._populate_locked(changes, proc)

    async def _populate_locked(self, changes: Sequence[ProtChange], proc: Process) -> None:
        for change in changes:
            vma = change.vma
            gains_write = vma.writable and not change.old_prot & mman.PROT_WRITE
            if vma.locked and vma.is_private and gains_write:
                await self._populate(vma, True, self.backend, proc)

    async def munmap(
        self, addr: int, length: int, *, vcpu: int = 0, pid: int | None = None
    ) -> None:
        """Linux munmap, run on ``vcpu`` (``unmap_region``, one ``mmu_gather``):
        the VMAs go, every PTE page under them is zapped (``zap_pte_range``),
        the page-table pages no VMA needs any more are freed
        (``free_pgtables``), then the TLBs are flushed once and only then are
        the frames reused (``tlb_finish_mmu``). docs/architecture.md, "munmap
        and MADV_DONTNEED"."""
        proc = self.process(pid)
        removed = proc.mm.munmap(addr, length)
        await self.unmap_pieces(removed, self.backends[vcpu], proc)

    async def unmap_pieces(self, removed: Sequence[Vma], backend: PvOps, proc: Process) -> None:
        """The page-table half of one ``do_munmap`` of the VMA pieces
        ``removed`` (munmap's, and each unmap inside an mremap): zap, free
        the tables no VMA needs, flush once, then free the frames."""
        gather = MmuGather()
        for vma in removed:
            await self._unmap_vma(vma, backend, gather, proc)
        if removed:
            await self._free_pgtables(removed, backend, gather, proc)
        await self._tlb_finish_mmu(backend, gather, proc)

    async def madvise_dontneed(
        self, addr: int, length: int, *, vcpu: int = 0, pid: int | None = None
    ) -> None:
        """Linux's ``madvise(MADV_DONTNEED)``, run on ``vcpu``: each VMA piece
        zapped as munmap zaps (``zap_page_range_single``: its own gather, its
        own flush), no page-table page freed. A private page is gone (the
        next read faults in a zero page, or the file's data for a private
        file mapping); a shared file page leaves the mapping, its data (a
        Dirty bit included) stays in the page cache and the file."""
        proc = self.process(pid)
        result = proc.mm.madvise_dontneed(addr, length)
        backend = self.backends[vcpu]
        for vma in result.ranges:
            gather = MmuGather()
            await self._unmap_vma(vma, backend, gather, proc)
            await self._tlb_finish_mmu(backend, gather, proc)
        result.raise_if_error()

    async def msync(self, addr: int, length: int, *, vcpu: int = 0, pid: int | None = None) -> None:
        """Write dirty pages of shared file mappings back to their files.

        ``vcpu`` is the CPU doing it: a background flusher runs on its own
        vCPU (its own lazy-MMU state), concurrently with system calls on 0.
        """
        proc = self.process(pid)
        result = proc.mm.msync(addr, length)
        for vma in result.ranges:
            await self._writeback_range(vma, self.backends[vcpu], proc)
        result.raise_if_error()

    async def madvise_free(
        self, addr: int, length: int, *, vcpu: int = 0, pid: int | None = None
    ) -> None:
        """Linux's ``madvise(MADV_FREE)`` on private anonymous memory, run on
        ``vcpu``.

        Each PTE page's part is cleaned under its lock in one lazy-MMU
        section (``madvise_free_pte_range``): a present PTE that is young or
        dirty and whose page no other PTE maps is taken with a trapped
        ``ptep_get_and_clear`` and reinstalled old and clean but still
        writable (``set_pte``); the TLB is flushed once at the end. From
        then on the Dirty bit the hardware sets at the next store is all
        that says the page was written again: the state a lost D bit would
        hurt (reclaim may drop a clean lazy-free page; pvemu has no reclaim,
        so the pages stay). Pages another process maps are left alone
        (Linux skips a shared folio it would have to clean).
        """
        proc = self.process(pid)
        result = proc.mm.madvise_free(addr, length)
        backend = self.backends[vcpu]
        gather = TlbGather()
        for vma in result.ranges:
            va = vma.start
            while va < vma.end:
                stop = min(vma.end, (va | ((1 << 21) - 1)) + 1)
                l1 = self._lookup_l1(va, proc)
                if l1 is not None:
                    await self._free_pte_range(l1, va, stop, backend, gather, proc)
                va = stop
        if gather:
            await backend.flush_tlb(gather.vas, proc.cpumask)
        result.raise_if_error()

    async def madvise_populate(
        self, addr: int, length: int, *, write: bool, vcpu: int = 0, pid: int | None = None
    ) -> None:
        """Linux's ``madvise(MADV_POPULATE_WRITE)`` (``write``) or
        ``MADV_POPULATE_READ``, run on ``vcpu``: every page of the range
        faulted in through the fault handler, without a user fault
        (:meth:`_populate`); errnos as :meth:`AddressSpace.madvise_populate`
        (what came before the error stays populated)."""
        proc = self.process(pid)
        result = proc.mm.madvise_populate(addr, length, write=write)
        for piece in result.ranges:
            await self._populate(piece, write, self.backends[vcpu], proc)
        result.raise_if_error()

    async def mlock(self, addr: int, length: int, *, vcpu: int = 0, pid: int | None = None) -> None:
        """Linux mlock, run on ``vcpu``: VM_LOCKED on the range's VMAs, then
        populated as MAP_POPULATE does (a private writable VMA written, the
        rest read); a page already present costs nothing (Linux only does
        the folio's mlock accounting). No RLIMIT_MEMLOCK. Errnos: see
        :meth:`AddressSpace.mlock`."""
        proc = self.process(pid)
        result = proc.mm.mlock(addr, length)
        for piece in result.ranges:
            await self._populate(
                piece, piece.is_private and piece.writable, self.backends[vcpu], proc
            )
        result.raise_if_error()

    async def munlock(self, addr: int, length: int, *, pid: int | None = None) -> None:
        """Linux munlock: VM_LOCKED cleared (VMAs split and merged); no PTE
        changes."""
        self.process(pid).mm.mlock(addr, length, lock=False).raise_if_error()

    async def madvise(
        self, addr: int, length: int, advice: int, *, vcpu: int = 0, pid: int | None = None
    ) -> None:
        """Linux madvise for the advice pvemu models (MADV_DONTNEED,
        MADV_FREE, MADV_POPULATE_READ, MADV_POPULATE_WRITE); EINVAL for any
        other."""
        if advice == mman.MADV_DONTNEED:
            await self.madvise_dontneed(addr, length, vcpu=vcpu, pid=pid)
        elif advice == MADV_FREE:
            await self.madvise_free(addr, length, vcpu=vcpu, pid=pid)
        elif advice in (MADV_POPULATE_READ, MADV_POPULATE_WRITE):
            write = advice == MADV_POPULATE_WRITE
            await self.madvise_populate(addr, length, write=write, vcpu=vcpu, pid=pid)
        else:
            raise OSError(errno.EINVAL, f"{os.strerror(errno.EINVAL)}: madvise advice {advice}")

    async def _free_pte_range(
        self, l1: int, start: int, end: int, backend: PvOps, gather: TlbGather, proc: Process
    ) -> None:
        """One PTE page's part of a MADV_FREE: see :meth:`madvise_free`."""
        first = (start >> PAGE_SHIFT) % ENTRIES_PER_TABLE
        young_or_dirty = _PAGE_ACCESSED | _PAGE_DIRTY
        async with proc.lock(l1):
            await backend.lazy_enter()
            window = read_ptes(self.machine, l1, first, (end - start) >> PAGE_SHIFT)
            for offset in np.flatnonzero(ptes_present(window)).tolist():
                pte = int(window[offset])
                mfn = (pte & PTE_MFN_MASK) >> PAGE_SHIFT
                if not pte & young_or_dirty or self._mapcount.get(mfn, 1) > 1:
                    continue
                ptep = maddr_of_entry(l1, first + offset)
                old = await backend.ptep_get_and_clear(ptep)
                await backend.set_pte(ptep, old & ~young_or_dirty)
                gather.add(start + (offset << PAGE_SHIFT))
            await backend.lazy_leave()
            backend.note_unlock(l1)

    # --- mremap (guest.mremap moves the page tables) ---------------------------------------

    async def mremap(
        self,
        old_addr: int,
        old_len: int,
        new_len: int,
        flags: int = 0,
        new_addr: int | None = None,
        *,
        pid: int | None = None,
    ) -> int:
        """Linux mremap (``MREMAP_*`` flags): the VMA half decides
        (:meth:`AddressSpace.mremap`), then the page tables follow step by
        step (:mod:`.mremap`: destination and tail unmapped as munmap does,
        PTEs or whole PTE pages moved). On an error the steps already taken
        are still applied, as Linux does not undo them."""
        proc = self.process(pid)
        try:
            result = proc.mm.mremap(old_addr, old_len, new_len, flags, new_addr)
        except MremapError as exc:
            await PageTableMover(self, proc).apply(exc.steps)
            raise
        await PageTableMover(self, proc).apply(result.steps)
        return result.addr

    # --- the rest of the system calls ---------------------------------------------------------

    def vmas(self, *, pid: int | None = None) -> list[tuple[int, int, int, int]]:
        """(start, end, prot, flags) per VMA, like /proc/<pid>/maps."""
        return [(v.start, v.end, v.prot, v.flags) for v in self.process(pid).mm.vmas()]

    # --- processes -------------------------------------------------------------------

    def process(self, pid: int | None = None) -> Process:
        """The live process ``pid`` (default 1); NoSuchProcess if none."""
        proc = self.processes.get(INIT_PID if pid is None else pid)
        if proc is None:
            raise NoSuchProcess(INIT_PID if pid is None else pid)
        return proc

    def loaded(self, vcpu: int) -> int:
        """The pid whose tree ``vcpu`` has loaded (0: the kernel's own)."""
        return self._loaded[vcpu].pid

    async def spawn(self, *, vcpu: int = 0) -> int:
        """A new process with an empty address space; returns its pid.

        Its kernel and user L4 are zeroed frames pinned with
        ``MMUEXT_PIN_L4_TABLE`` in one ``mmuext_op``, as boot pins the first
        tree: one trap in every hypervisor mode, none natively. Nothing
        loads it yet (:meth:`switch_to`)."""
        l4 = await self._new_frame(vcpu)
        user_l4 = await self._new_frame(vcpu)
        pins = [("ext", abi.MMUEXT_PIN_L4_TABLE, root, 1) for root in (l4, user_l4)]
        await self.backends[vcpu].send_batch(pins)
        return self._add_process(Process(self._take_pid(), l4, user_l4=user_l4))

    def _take_pid(self) -> int:
        pid = self._next_pid
        self._next_pid += 1
        return pid

    def _add_process(self, proc: Process) -> int:
        self.processes[proc.pid] = proc
        return proc.pid

    async def switch_to(self, vcpu: int, pid: int) -> None:
        """Context switch ``vcpu`` to process ``pid`` (0: the kernel's own
        tree, as ``leave_mm`` loads): its kernel and user L4 become the base
        pointers in one ``mmuext_op`` (one trap; in the batching modes one
        multicall entry of two ops, flushed at the end of the switch).
        Natively a local CR3 load, no trap. Loading the tree already loaded
        costs nothing (``switch_mm`` sees ``prev == next``)."""
        if not 0 <= vcpu < self.machine.nr_vcpus:
            raise ValueError(f"no vCPU {vcpu}")
        pin = False
        if pid == IDLE_PID:
            if self._idle is None:
                # init_mm: an empty L4, pinned in the same call that loads it.
                proc = self._idle = Process(IDLE_PID, self.machine.alloc_frame())
                pin = True
            else:
                proc = self._idle
        else:
            proc = self.process(pid)
        prev = self._loaded[vcpu]
        if prev is proc:
            return
        try:
            await self.backends[vcpu].switch_mm(proc.l4, self._user_base(proc), pin=pin)
        except BaseException:
            if pin:
                self._idle = None
            raise
        self._note_loaded(vcpu, proc)

    @staticmethod
    def _user_base(proc: Process) -> int:
        if proc.pid == IDLE_PID:
            return 0
        return proc.user_l4 if proc.user_l4 is not None else proc.l4

    def _note_loaded(self, vcpu: int, proc: Process) -> None:
        self._loaded[vcpu].cpus.discard(vcpu)
        proc.cpus.add(vcpu)
        proc.cpumask |= 1 << vcpu
        self._loaded[vcpu] = proc

    async def fork(self, pid: int | None = None, *, vcpu: int = 0) -> int:
        """Linux's fork of process ``pid`` (default 1), run on ``vcpu``;
        returns the child's pid (docs/architecture.md, "fork").

        ``dup_mmap``: the VMAs are copied; for every private VMA each PTE
        page of the parent is copied in one lazy-MMU section
        (``copy_pte_range``): a writable PTE is write-protected in the parent
        (an atomic RMW on a pinned table: a trapped ``lock btr`` in Linux's
        modes, one ``PRESERVE_AD`` record per PTE page in ``batched``) and
        installed read-only and old in the child, whose tables nothing has
        typed yet (built with plain stores); each page's frame gains a
        mapping (copy-on-write). Shared mappings are not copied: the child
        faults them in from the page cache. Then the child's tree is pinned
        in one batch and the parent's TLBs are flushed (``flush_tlb_mm``);
        ``batched`` folds both into the last PTE page's multicall.
        """
        parent = self.process(pid)
        backend = self.backends[vcpu]
        child = Process(
            self._take_pid(),
            await self._new_frame(vcpu),
            mm=parent.mm.fork(),
            user_l4=await self._new_frame(vcpu),
        )
        pieces: list[tuple[Vma, int, int, int, int]] = []
        for vma in parent.mm.vmas():
            if vma.file is not None and vma.is_shared:
                continue
            va = vma.start
            while va < vma.end:
                stop = min(vma.end, (va | ((1 << 21) - 1)) + 1)
                parent_l1 = self._lookup_l1(va, parent)
                if parent_l1 is not None:
                    child_l1 = await self._build_unpinned(va, child, vcpu)
                    pieces.append((vma, va, stop, parent_l1, child_l1))
                va = stop
        pages = walk_user_tree(self._read_table, child.l4)
        pin = pin_entries(pages, child.l4, child.user_l4, self.machine.pfn_of)
        child.pinned = {page.mfn for page in pages if page.level == 1}
        folded = backend.folds_tlb_flush and bool(pieces)
        for i, (vma, va, stop, parent_l1, child_l1) in enumerate(pieces):
            flush_all = ("ext", *tlb_flush_all_op(vcpu, parent.cpumask))
            fold = [*pin, flush_all] if folded and i == len(pieces) - 1 else None
            await self._copy_pte_range(vma, parent, parent_l1, child_l1, va, stop, backend, fold)
        if not folded:
            await backend.send_batch(pin)
            await backend.flush_tlb_all(parent.cpumask)
        return self._add_process(child)

    async def _copy_pte_range(
        self,
        vma: Vma,
        parent: Process,
        parent_l1: int,
        child_l1: int,
        start: int,
        end: int,
        backend: PvOps,
        fold: list[tuple[str, int, int, int]] | None,
    ) -> None:
        """``copy_pte_range``: one PTE page's part of ``[start, end)``, under
        the parent's PTE lock, in one lazy-MMU section (``fold``: a batch to
        queue in the section before it is left)."""
        first = (start >> PAGE_SHIFT) % ENTRIES_PER_TABLE
        count = (end - start) >> PAGE_SHIFT
        cow = vma.is_private
        async with parent.lock(parent_l1):
            await backend.lazy_enter()
            window = read_ptes(self.machine, parent_l1, first, count)
            _, indexes, seen = present_run(window, first)
            wrprotect = (seen & _RW != 0) if cow else np.zeros(len(seen), dtype=bool)
            child_vals = np.where(wrprotect, seen & ~_RW, seen) & ~_A  # pte_mkold
            if backend.range_form and not self.per_pte:
                await backend.fork_copy_run(
                    parent_l1, child_l1, indexes, seen, wrprotect, child_vals
                )
            else:
                parent_base, child_base = parent_l1 << PAGE_SHIFT, child_l1 << PAGE_SHIFT
                each = zip(indexes.tolist(), wrprotect.tolist(), child_vals.tolist(), strict=True)
                for index, mark, val in each:
                    if mark:
                        await backend.ptep_set_wrprotect(parent_base | (index * PTE_SIZE))
                    await backend.set_pte_unpinned(child_base | (index * PTE_SIZE), val)
            for mfn in ((seen & _MFN) >> np.uint64(PAGE_SHIFT)).tolist():
                self._mapcount[mfn] = self._mapcount.get(mfn, 1) + 1
            if fold is not None:
                backend.fold_batch(fold)
            await backend.lazy_leave()
            backend.note_unlock(parent_l1)

    async def exec(self, pid: int, *, vcpu: int, arg_pages: int = 1) -> None:
        """Linux's execve of process ``pid``, running on ``vcpu``.

        A fresh address space (new kernel and user L4) gets a stack VMA ending
        at :data:`STACK_TOP` whose ``arg_pages`` argument pages are filled
        and installed before anything pins the tree (``copy_strings``: one
        ``set_pte`` each, an ``mmu_update`` not in a lazy section; the tables
        are plain stores). Then ``activate_mm``: the new tree is pinned (one
        batch) and loaded; the old address space is torn down as at exit,
        but this vCPU has already left it (:meth:`exit_process`).
        ``batched`` sends the pin and the switch as one multicall.
        """
        if arg_pages < 1:
            raise ValueError("exec needs at least one argument page")
        old = self.process(pid)
        if self._loaded[vcpu] is not old:
            raise ValueError(f"process {pid} is not running on vCPU {vcpu}")
        backend = self.backends[vcpu]
        new = Process(pid, await self._new_frame(vcpu), user_l4=await self._new_frame(vcpu))
        length = arg_pages * PAGE_SIZE
        rw = mman.PROT_READ | mman.PROT_WRITE
        stack = new.mm.do_mmap(
            length, rw, mman.MAP_PRIVATE | mman.MAP_ANONYMOUS, addr=STACK_TOP - length
        ).addr
        vma = new.mm.find(stack)
        assert vma is not None
        for i in range(arg_pages):
            va = stack + i * PAGE_SIZE
            l1 = await self._build_unpinned(va, new, vcpu)
            mfn = await self._new_frame(vcpu)
            await self._store(mfn << PAGE_SHIFT, _argument_page(pid, i), vcpu)
            pte = make_pte(mfn, vm_page_prot(vma) | _PAGE_RW | _PAGE_DIRTY)
            await backend.set_pte_unpinned(maddr_of_entry(l1, va_indexes(va).l1), pte)
        pages = walk_user_tree(self._read_table, new.l4)
        pin = pin_entries(pages, new.l4, new.user_l4, self.machine.pfn_of)
        new.pinned = {page.mfn for page in pages if page.level == 1}
        assert new.user_l4 is not None
        if backend.folds_tlb_flush:
            await backend.switch_mm(new.l4, new.user_l4, before=pin)
        else:
            await backend.send_batch(pin)
            await backend.switch_mm(new.l4, new.user_l4)
        self._note_loaded(vcpu, new)
        self.processes[pid] = new
        await self._exit_mmap(old, vcpu)

    async def exit_process(self, pid: int, *, vcpu: int = 0) -> None:
        """Tear down process ``pid``'s address space (exit_mmap), from ``vcpu``.

        As ``xen_exit_mmap`` does: every vCPU that has the tree loaded first
        switches to the kernel's own tree (``xen_drop_mm_ref``, one switch
        each), then the whole tree is unpinned in one batch (both L4s, each
        PTE page pinned on its own, every table's linear mapping made
        writable again), and only then is it taken apart: on unpinned, plain
        memory, so freeing pages and tables costs no trap. Every frame no
        other process maps goes back to the kernel's pool; shared file pages
        stay in the page cache (dirty ones written back).
        """
        proc = self.process(pid)
        await self._exit_mmap(proc, vcpu)
        del self.processes[pid]

    async def _exit_mmap(self, proc: Process, vcpu: int) -> None:
        for cpu in sorted(proc.cpus):
            await self.switch_to(cpu, IDLE_PID)
        pages = walk_user_tree(self._read_table, proc.l4)
        unpin = unpin_entries(pages, proc.l4, proc.user_l4, proc.pinned, self.machine.pfn_of)
        await self.backends[vcpu].send_batch(unpin)
        for vma in proc.mm.vmas():
            self._release_range(vma, proc)
        self._free_frames.extend(page.mfn for page in pages)
        self._free_frames.append(proc.l4)
        if proc.user_l4 is not None:
            self._free_frames.append(proc.user_l4)
        proc.ptl.clear()
        proc.pinned.clear()

    def _release_range(self, vma: Vma, proc: Process) -> None:
        """Release every page ``vma`` maps in ``proc``'s (unpinned) tree."""
        va = vma.start
        while va < vma.end:
            stop = min(vma.end, (va | ((1 << 21) - 1)) + 1)
            l1 = self._lookup_l1(va, proc)
            if l1 is not None:
                first = (va >> PAGE_SHIFT) % ENTRIES_PER_TABLE
                window = read_ptes(self.machine, l1, first, (stop - va) >> PAGE_SHIFT)
                for offset in np.flatnonzero(ptes_present(window)).tolist():
                    self._release_page(vma, va + (offset << PAGE_SHIFT), int(window[offset]))
            va = stop

    def _read_table(self, table: int, first: int, count: int) -> bytes:
        return self.machine.read_bytes((table << PAGE_SHIFT) | (first * PTE_SIZE), count * PTE_SIZE)

    def free_frame_count(self) -> int:
        """Frames nothing uses: the domain's never-used ones plus the kernel's pool."""
        return self.machine.free_frames() + len(self._free_frames)

    # --- user accesses --------------------------------------------------------------

    async def write(self, addr: int, data: bytes, *, vcpu: int = 1) -> None:
        chunks = []
        offset = 0
        while offset < len(data):
            va = addr + offset
            room = PAGE_SIZE - (va & (PAGE_SIZE - 1))
            chunks.append((va, "w", data[offset : offset + room]))
            offset += room
        await self.run_user(vcpu, chunks)

    async def read(self, addr: int, n: int, *, vcpu: int = 1) -> bytes:
        chunks: list[tuple[int, str, bytes | int]] = []
        offset = 0
        while offset < n:
            va = addr + offset
            take = min(n - offset, PAGE_SIZE - (va & (PAGE_SIZE - 1)))
            chunks.append((va, "r", take))
            offset += take
        reads = await self.run_user(vcpu, chunks)
        return b"".join(reads)

    async def execute(self, addr: int, *, vcpu: int = 1) -> None:
        await self.run_user(vcpu, [(addr, "x", 1)])

    async def run_user(
        self, vcpu: int, accesses: Sequence[tuple[int, str, bytes | int]]
    ) -> list[bytes]:
        """Run accesses on ``vcpu``, servicing page faults; returns the reads.

        After a fault is handled the kernel returns to user mode, which on
        64-bit PV is ``HYPERVISOR_iret``: the request that retries the
        faulting access says so (``resume``). A fault that ends in a
        SegmentationFault never returns to that code, so it has no iret.
        """
        if not 0 <= vcpu < self.machine.nr_vcpus:
            raise ValueError(f"no vCPU {vcpu}")
        reads: list[bytes] = []
        position = 0
        batch_size = ACCESS_BATCH
        resume = False
        while position < len(accesses):
            batch = accesses[position : position + batch_size]
            outcome = await self.machine.run_user(vcpu, batch, resume=resume)
            reads.extend(outcome["reads"])
            done = outcome["executed"]
            fault = outcome["fault"]
            resume = fault is not None
            if fault is not None:
                await self.handle_fault(fault["va"], fault["error_code"], vcpu=vcpu)
                # Faults come in runs (first touch of a region): send a little
                # more than got through, not a full batch that the next fault
                # throws away. Counts are the same; requests get smaller.
                batch_size = min(ACCESS_BATCH, 2 * done + 2)
            else:
                batch_size = ACCESS_BATCH
            position += done
        return reads

    # --- page faults ----------------------------------------------------------------

    async def handle_fault(self, va: int, error_code: int, *, vcpu: int = 0) -> None:
        """Resolve a user page fault taken on ``vcpu`` or raise SegmentationFault.

        The VMA is checked again under the PTE-page lock: an mprotect or
        munmap on another CPU may have changed it while this fault waited
        (pvemu has no mmap_lock; the PTE lock orders the two instead).
        """
        self.counters.page_faults += 1
        backend = self.backends[vcpu]
        proc = self._loaded[vcpu]
        write = bool(error_code & PF_WRITE)
        self._vma_allowing(va, error_code, proc)  # fail fast, before building tables
        page_va = va & ~(PAGE_SIZE - 1)
        async with proc.table_lock:
            l1 = await self._ensure_tables(page_va, backend, proc)
        ptep = maddr_of_entry(l1, va_indexes(page_va).l1)
        async with proc.lock(l1):
            vma = self._vma_allowing(va, error_code, proc)
            pte = self.machine.read_u64(ptep)
            if not pte & _PAGE_PRESENT:
                await self._install(vma, page_va, ptep, pte, write, backend)
            elif write and not pte & _PAGE_RW:
                await self._write_fault(vma, page_va, ptep, pte, backend)
            # else: spurious (another vCPU fixed it, or a stale TLB): retry
            backend.note_unlock(l1)

    def _vma_allowing(self, va: int, error_code: int, proc: Process) -> Vma:
        """The VMA of ``proc`` that allows this access, or SegmentationFault."""
        vma = proc.mm.find(va) if is_canonical(va) else None
        write = bool(error_code & PF_WRITE)
        execute = bool(error_code & PF_INSTR)
        if vma is None:
            raise self._segv(va, "no mapping")
        if (
            (write and not vma.writable)
            or (execute and not vma.executable)
            or not vma.prot & (mman.PROT_READ | mman.PROT_WRITE | mman.PROT_EXEC)
        ):
            kind = "write" if write else "exec" if execute else "read"
            raise self._segv(va, f"{kind} not allowed")
        return vma

    def _segv(self, va: int, reason: str) -> SegmentationFault:
        self.counters.segfaults += 1
        return SegmentationFault(va, reason)

    async def _install(
        self, vma: Vma, va: int, ptep: int, pte: int, write: bool, backend: PvOps
    ) -> None:
        prot = vm_page_prot(vma)
        if pte_present(pte):  # PROT_NONE entry made accessible again: keep the page
            await backend.set_pte(ptep, pte_modify(pte, prot))
            return
        if vma.file is not None and vma.is_shared:
            page = await self._file_page(vma, va, backend)
            mfn = page.mfn
            if write and vma.writable:  # do_shared_fault + page_mkwrite
                prot |= _PAGE_RW  # clean: the retried store sets D (see _write_fault)
        else:
            mfn = await self._new_frame(backend.vcpu)
            if vma.file is not None:
                await self._fill_from_file(mfn, vma, va, backend.vcpu)
            if write and vma.writable:  # an exclusive anonymous page
                prot |= _PAGE_RW | _PAGE_DIRTY
        await backend.set_pte(ptep, make_pte(mfn, prot & ~PTE_MFN_MASK))

    async def _populate(self, vma: Vma, write: bool, backend: PvOps, proc: Process) -> None:
        """Fault in every page of the VMA piece ``vma`` as GUP does
        (``__get_user_pages`` -> ``faultin_page`` -> ``handle_mm_fault``):
        the fault handler's work without a user fault, so no #PF bounce, no
        iret, no ``page_faults`` count (``populated`` counts the pages).
        ``write`` write-faults (a private page is then exclusive, writable
        and dirty: COW broken); else a read fault where nothing is present."""
        va = vma.start
        while va < vma.end:
            stop = min(vma.end, (va | ((1 << 21) - 1)) + 1)
            await self._populate_pte_range(vma, va, stop, write, backend, proc)
            va = stop

    async def _populate_pte_range(
        self, vma: Vma, start: int, end: int, write: bool, backend: PvOps, proc: Process
    ) -> None:
        """One PTE page's part of a populate, under its lock: its tables
        built as a fault builds them, then each missing page installed with
        ``set_pte`` (Linux on Xen PV: order-0 anonymous folios, so one
        immediate ``mmu_update`` per page) or, where the backend batches
        populate (``batched``, ``naive``), all of them in one lazy-MMU
        section: one hypercall for the PTE page. A write populate of a
        present read-only page is a write fault (:meth:`_write_fault`)."""
        async with proc.table_lock:
            l1 = await self._ensure_tables(start, backend, proc)
        first = (start >> PAGE_SHIFT) % ENTRIES_PER_TABLE
        async with proc.lock(l1):
            window = read_ptes(self.machine, l1, first, (end - start) >> PAGE_SHIFT)
            present = (window & np.uint64(_PAGE_PRESENT)) != 0
            if write:
                readonly = present & ((window & _RW) == 0)
                for offset in np.flatnonzero(readonly).tolist():
                    va = start + (offset << PAGE_SHIFT)
                    ptep = maddr_of_entry(l1, first + offset)
                    await self._write_fault(vma, va, ptep, int(window[offset]), backend)
                    self._mark_written(vma, va)
                    self.counters.populated += 1
            missing = np.flatnonzero(~present).tolist()
            lazy = backend.batches_populate and bool(missing)
            if lazy:
                await backend.lazy_enter()
            try:
                for offset in missing:
                    va = start + (offset << PAGE_SHIFT)
                    ptep = maddr_of_entry(l1, first + offset)
                    await self._install(vma, va, ptep, int(window[offset]), write, backend)
                    if write:
                        self._mark_written(vma, va)
                    self.counters.populated += 1
            finally:
                # out of frames mid-way: what was queued is still sent, and
                # the section closed, so the next call starts clean
                if lazy:
                    await backend.lazy_leave()
                backend.note_unlock(l1)

    def _mark_written(self, vma: Vma, va: int) -> None:
        """GUP's FOLL_WRITE touch of a shared file page: the page is dirty
        (``set_page_dirty``), as no user store will set D in its PTE."""
        if vma.file is not None and vma.is_shared and vma.writable:
            self._cache.pages[(vma.file.path, vma.pgoff_at(va))].dirty = True

    async def _write_fault(self, vma: Vma, va: int, ptep: int, pte: int, backend: PvOps) -> None:
        """Write to a present read-only page of a writable VMA.

        A shared file page is write-notified: it becomes writable but stays
        clean, and the store the user retries sets D in hardware. Between two
        writebacks that D bit is the page's only dirty record (dirtiness is
        transferred to the page at writeback and unmap, ``pte_dirty`` ->
        ``set_page_dirty``): exactly the state the seed patch must not lose.
        A private page another process still maps (after fork) is copied
        (``wp_page_copy``); one only this PTE maps is made writable and
        dirty where it is (``wp_page_reuse``).
        """
        if vma.file is not None and vma.is_shared:
            await backend.set_pte(ptep, pte | _PAGE_RW | _PAGE_ACCESSED)
            return
        mfn = (pte & PTE_MFN_MASK) >> PAGE_SHIFT
        if vma.is_private and self._mapcount.get(mfn, 1) > 1:
            self.counters.cow_copies += 1
            await self._copy_on_write(va, ptep, mfn, backend)
            return
        if vma.is_private:
            self.counters.cow_reuses += 1
        await backend.set_pte(ptep, pte | _PAGE_RW | _PAGE_DIRTY | _PAGE_ACCESSED)

    async def _copy_on_write(self, va: int, ptep: int, mfn: int, backend: PvOps) -> None:
        """``wp_page_copy``: the page is copied into a new frame (plain
        memory), the PTE taken with ``ptep_clear_flush`` (a trapped
        get-and-clear and a one-page flush), the new writable dirty PTE
        installed (``set_pte``), and the old frame loses this mapping."""
        data = self.machine.read_bytes(mfn << PAGE_SHIFT, PAGE_SIZE)
        new = self._free_frames.pop() if self._free_frames else self.machine.alloc_frame()
        await self._store(new << PAGE_SHIFT, data, backend.vcpu)
        old = await backend.ptep_get_and_clear(ptep)
        await backend.flush_tlb([va], self._loaded[backend.vcpu].cpumask)
        flags = (old & ~PTE_MFN_MASK) | _PAGE_RW | _PAGE_DIRTY | _PAGE_ACCESSED
        await backend.set_pte(ptep, make_pte(new, flags & ~PTE_MFN_MASK))
        self._unmap_frame(mfn)

    def _unmap_frame(self, mfn: int) -> bool:
        """One mapping of private frame ``mfn`` is gone; True (and the frame
        back in the pool) if it was the last."""
        count = self._mapcount.get(mfn, 1)
        if count > 2:
            self._mapcount[mfn] = count - 1
        elif count == 2:
            del self._mapcount[mfn]
        else:
            self._free_frames.append(mfn)
            return True
        return False

    # --- change_protection -------------------------------------------------------------

    async def _change_protection(self, changes: Sequence[ProtChange], proc: Process) -> None:
        """mprotect's page-table half, with one deferred TLB flush at the end."""
        ranges: list[tuple[Vma, int, int]] = []
        for change in changes:
            va = change.start
            while va < change.end:
                stop = min(change.end, (va | ((1 << 21) - 1)) + 1)
                ranges.append((change.vma, va, stop))
                va = stop
        gather = TlbGather()
        for i, (vma, start, end) in enumerate(ranges):
            last = i == len(ranges) - 1
            await self._change_pte_range(vma, start, end, gather, last, proc)
        if gather and not self.backend.folds_tlb_flush:
            await self.backend.flush_tlb(gather.vas, proc.cpumask)

    async def _change_pte_range(
        self, vma: Vma, start: int, end: int, gather: TlbGather, last: bool, proc: Process
    ) -> None:
        """One PTE page's part of ``[start, end)`` under its lock, in one
        lazy-MMU section: as one run (the range form) or PTE by PTE."""
        l1 = self._lookup_l1(start, proc)
        if l1 is None:
            return
        backend = self.backend
        first = (start >> PAGE_SHIFT) % ENTRIES_PER_TABLE
        count = (end - start) >> PAGE_SHIFT
        async with proc.lock(l1):
            await backend.lazy_enter()
            if backend.range_form and not self.per_pte:
                await self._change_pte_run(vma, l1, first, count, start, gather)
            else:
                await self._change_pte_each(vma, l1, first, count, start, gather)
            if last and gather and backend.folds_tlb_flush:
                backend.fold_tlb_flush(gather.vas, proc.cpumask)
            await backend.lazy_leave()
            backend.note_unlock(l1)

    async def _change_pte_each(
        self, vma: Vma, l1: int, first: int, count: int, start: int, gather: TlbGather
    ) -> None:
        """Linux's loop: start -> pte_modify -> (pte_mkwrite) -> commit for
        each present PTE of entries ``first .. first + count`` of ``l1``.
        A private page another process still maps (after fork) is not
        exclusive, so it is never made writable here: its write fault copies it.

        Which entries are present is read once for the page, not PTE by PTE:
        under the PTE lock only the hardware writes them, and it sets A and
        D, never P or the frame. Each start still reads its PTE when its turn
        comes (in ``xen`` a buffer flush, an ``await``, may come between two)."""
        newprot = vm_page_prot(vma)
        try_writable = vma.writable
        private = vma.is_private
        backend = self.backend
        base = l1 << PAGE_SHIFT
        window = read_ptes(self.machine, l1, first, count)
        for offset in np.flatnonzero(ptes_present(window)).tolist():
            index = first + offset
            ptep = base | (index * PTE_SIZE)
            old = await backend.modify_prot_start(ptep)
            new = pte_modify(old, newprot)
            if (
                try_writable
                and not new & _PAGE_RW
                and can_change_writable(private, old)
                and not (private and self._mapcount.get((old & PTE_MFN_MASK) >> PAGE_SHIFT, 1) > 1)
            ):
                new |= _PAGE_RW
            await backend.modify_prot_commit(ptep, old, new)
            if pte_needs_flush(old, new):
                gather.add(start + (offset << PAGE_SHIFT))

    async def _change_pte_run(
        self, vma: Vma, l1: int, first: int, count: int, start: int, gather: TlbGather
    ) -> None:
        """The same as :meth:`_change_pte_each` over arrays: one read of the
        entries, the present ones started as one run (``modify_prot_start_ptes``),
        ``pte_modify`` and the writable decision on all of them at once, the
        run committed (``modify_prot_commit_ptes``)."""
        backend = self.backend
        window = read_ptes(self.machine, l1, first, count)
        offsets, indexes, seen = present_run(window, first)
        if not len(indexes):
            return
        old = await backend.modify_prot_start_ptes(l1, indexes, seen)
        new = ptes_modify(old, vm_page_prot(vma))
        if vma.writable:
            writable = ptes_can_change_writable(vma.is_private, old)
            if vma.is_private and self._mapcount:  # a page another process maps stays COW
                shared = np.fromiter(self._mapcount, dtype=np.uint64, count=len(self._mapcount))
                writable &= ~np.isin((old & _MFN) >> np.uint64(PAGE_SHIFT), shared)
            np.bitwise_or(new, _RW, out=new, where=writable)
        await backend.modify_prot_commit_ptes(l1, indexes, old, new)
        room = gather.room
        if room > 0:
            gather.add_run(start, offsets[flush_offsets(old, new, room)])

    # --- munmap / msync --------------------------------------------------------------------

    async def _unmap_vma(self, vma: Vma, backend: PvOps, gather: MmuGather, proc: Process) -> None:
        """``unmap_page_range`` over one VMA piece: each PTE page it covers
        that exists is zapped (``zap_pte_range``)."""
        va = vma.start
        while va < vma.end:
            stop = min(vma.end, (va | ((1 << 21) - 1)) + 1)
            l1 = self._lookup_l1(va, proc)
            if l1 is not None:
                await self._zap_pte_range(vma, l1, va, stop, backend, gather, proc)
            va = stop

    async def _zap_pte_range(
        self,
        vma: Vma,
        l1: int,
        start: int,
        end: int,
        backend: PvOps,
        gather: MmuGather,
        proc: Process,
    ) -> None:
        """One PTE page's part of a zap, under its lock, in one lazy-MMU
        section: its present entries cleared in one backend call
        (``zap_ptes``: Linux's per-PTE XCHG loop, or a whole-page batch),
        the gather's range widened over them; after the section, each page
        let go of (:meth:`_release_zapped`). pvemu has no swap or migration
        entries, so there is no non-present entry to ``pte_clear``."""
        first = (start >> PAGE_SHIFT) % ENTRIES_PER_TABLE
        async with proc.lock(l1):
            await backend.lazy_enter()
            window = read_ptes(self.machine, l1, first, (end - start) >> PAGE_SHIFT)
            offsets, indexes, seen = present_run(window, first)
            old = seen
            if len(indexes) and self.per_pte:
                old = await PvOps.zap_ptes(backend, l1, indexes, seen)
            elif len(indexes):
                old = await backend.zap_ptes(l1, indexes, seen)
            await backend.lazy_leave()
            backend.note_unlock(l1)
        if len(indexes):
            gather.add_range(
                start + (int(offsets[0]) << PAGE_SHIFT),
                start + ((int(offsets[-1]) + 1) << PAGE_SHIFT),
            )
            self._release_zapped(vma, start, offsets, old, gather)

    def _release_zapped(
        self, vma: Vma, start: int, offsets: Indexes, old: Ptes, gather: MmuGather
    ) -> None:
        """The pages a zap cleared: a shared file page's Dirty bit goes to
        the page cache, and the page to the file once the TLBs are flushed
        (a store through a stale TLB entry until then must reach the file
        too); a private frame loses a mapping once the TLBs are flushed
        (``tlb_remove_page``)."""
        if vma.file is not None and vma.is_shared:
            for offset, pte in zip(offsets.tolist(), old.tolist(), strict=True):
                va = start + (offset << PAGE_SHIFT)
                page = self._cache.pages[(vma.file.path, vma.pgoff_at(va))]
                if pte & _PAGE_DIRTY:
                    page.dirty = True
                if page.dirty:
                    gather.deferred.append(partial(self._write_if_dirty, vma, va, page))
            return
        gather.frames.extend(((old & _MFN) >> np.uint64(PAGE_SHIFT)).tolist())

    async def _free_pgtables(
        self, removed: Sequence[Vma], backend: PvOps, gather: MmuGather, proc: Process
    ) -> None:
        """``free_pgtables`` after an unmap: every page-table page under the
        removed pieces whose whole span no VMA overlaps any more (so it is
        empty) is taken out, bottom up: its entry cleared (``pmd_clear`` &
        co: one ``mmu_update``; an L4 entry in both L4s), the page released
        (``xen_release_ptpage``: unpin an L1, remap writable, one batch),
        the gather's range widened by one page at the span's start (as
        ``pte_free_tlb`` does) and the frame queued to be freed after the
        flush. A table that still has an entry (the booted tree's, which no
        VMA accounts for) is kept."""
        spans = sorted((vma.start, vma.end) for vma in removed)
        async with proc.table_lock:
            for lo, hi in spans:
                await self._free_level(proc.l4, 4, lo, hi, backend, gather, proc)

    async def _free_level(
        self,
        table: int,
        level: int,
        lo: int,
        hi: int,
        backend: PvOps,
        gather: MmuGather,
        proc: Process,
    ) -> bool:
        """Free the children of ``table`` (a level-``level`` page) under
        ``[lo, hi)`` that nothing needs; True if ``table`` is left empty."""
        rest = (backend, gather, proc)
        shift = _LEVEL_SHIFTS[level]
        size = 1 << shift
        first = (lo >> shift) & _INDEX_MASK
        last = ((hi - 1) >> shift) & _INDEX_MASK
        entries = read_ptes(self.machine, table, first, last - first + 1)
        for offset in np.flatnonzero(entries & np.uint64(_PAGE_PRESENT)).tolist():
            index = first + offset
            span = (lo & ~((size << 9) - 1)) + index * size
            child = (int(entries[offset]) & PTE_MFN_MASK) >> PAGE_SHIFT
            if level > 2:
                sub_lo, sub_hi = max(lo, span), min(hi, span + size)
                if not await self._free_level(child, level - 1, sub_lo, sub_hi, *rest):
                    continue
            if proc.mm.intersecting(span, span + size):
                continue
            if level == 2 and read_ptes(self.machine, child, 0, ENTRIES_PER_TABLE).any():
                continue
            entry = maddr_of_entry(table, index)
            links = [(entry, 0)]
            if level == 4 and proc.user_l4 is not None:
                links.append((maddr_of_entry(proc.user_l4, index), 0))
            await backend.set_upper(links)
            pinned = child in proc.pinned
            release = release_table_entries(child, level - 1, pinned, self.machine.pfn_of)
            await backend.send_batch(release)
            proc.pinned.discard(child)
            proc.ptl.pop(child, None)
            gather.add_range(span, span + PAGE_SIZE)
            gather.tables.append(child)
        user_slots = USER_L4_SLOTS if level == 4 else ENTRIES_PER_TABLE
        return not read_ptes(self.machine, table, 0, user_slots).any()

    async def _tlb_finish_mmu(self, backend: PvOps, gather: MmuGather, proc: Process) -> None:
        """``tlb_finish_mmu``: flush the gathered range on the mm's CPUs
        (``guest.tlb``), then free what waited for it."""
        if gather:
            await backend.flush_tlb(gather.vas(), proc.cpumask)
        for mfn in gather.frames:
            self._unmap_frame(mfn)
        self._free_frames.extend(gather.tables)
        for work in gather.deferred:
            work()
        gather.frames.clear()
        gather.tables.clear()
        gather.deferred.clear()

    def _write_if_dirty(self, vma: Vma, va: int, page: FilePage) -> None:
        if page.dirty:
            self._write_page_to_file(vma, va, page)

    def _release_page(self, vma: Vma, va: int, old: int) -> None:
        """The page ``old`` mapped at ``va`` is no longer mapped: a file
        page's dirtiness goes to the page cache (written back), any other
        frame back to the kernel's pool."""
        if vma.file is not None and vma.is_shared:
            page = self._cache.pages[(vma.file.path, vma.pgoff_at(va))]
            if old & _PAGE_DIRTY:
                page.dirty = True
            if page.dirty:
                self._write_page_to_file(vma, va, page)
        else:
            self._unmap_frame((old & PTE_MFN_MASK) >> PAGE_SHIFT)

    async def _writeback_range(self, vma: Vma, backend: PvOps, proc: Process) -> None:
        """Write back every dirty page of the range (clear_page_dirty_for_io +
        writepage): a page is dirty if its PTE has D or the page was marked.

        page_mkclean takes the PTE with a trapped get_and_clear (the D bit
        comes back atomically), flushes the TLB, and reinstalls it clean and
        read-only, so the next store faults and is noticed; then the page is
        written. A store that lands after the clear waits on the lock.
        """
        assert vma.file is not None
        read = self.machine.read_u64
        for page_va in range(vma.start, vma.end, PAGE_SIZE):
            page = self._cache.pages.get((vma.file.path, vma.pgoff_at(page_va)))
            if page is None:
                continue
            l1 = self._lookup_l1(page_va, proc)
            if l1 is None:
                continue
            ptep = maddr_of_entry(l1, va_indexes(page_va).l1)
            # Under the lock: another CPU may hold this PTE cleared mid-update
            # (an mprotect's get_and_clear, a flusher's page_mkclean); msync
            # must wait for it rather than take the cleared PTE for clean.
            async with proc.lock(l1):
                if not (read(ptep) & _PAGE_DIRTY or page.dirty):
                    backend.note_unlock(l1)
                    continue
                if pte_present(read(ptep)):
                    old = await backend.ptep_get_and_clear(ptep)
                    if old & _PAGE_DIRTY:
                        page.dirty = True
                    if old & _PAGE_PRESENT:
                        await backend.flush_tlb([page_va], proc.cpumask)
                    await backend.set_pte(ptep, old & ~(_PAGE_RW | _PAGE_DIRTY))
                if page.dirty:
                    self._write_page_to_file(vma, page_va, page)
                backend.note_unlock(l1)

    def _write_page_to_file(self, vma: Vma, va: int, page: FilePage) -> None:
        assert vma.file is not None
        data = self.machine.read_bytes(page.mfn << PAGE_SHIFT, PAGE_SIZE)
        offset = vma.file_offset(va)
        size = os.path.getsize(vma.file.path)
        data = data[: max(0, min(PAGE_SIZE, size - offset))]
        if data:
            with open(vma.file.path, "r+b") as f:
                f.seek(offset)
                f.write(data)
        page.dirty = False

    # --- frames, tables and the page cache -------------------------------------------------

    async def _new_frame(self, vcpu: int) -> int:
        """A zeroed frame: fresh from the domain, or recycled and cleared
        with a plain store (``clear_page`` through the linear map: no trap)."""
        if self._free_frames:
            mfn = self._free_frames.pop()
            await self._store(mfn << PAGE_SHIFT, _ZERO_PAGE, vcpu)
            return mfn
        return self.machine.alloc_frame()

    async def _store(self, maddr: int, data: bytes, vcpu: int) -> None:
        """A plain kernel store through the linear map (no trap); refused
        only if the frame is a live page table, a kernel bug."""
        rc = await self.machine.kernel_write(maddr, data, vcpu=vcpu)
        if rc:
            raise HypercallFailed(f"kernel store at {maddr:#x} refused: {abi.errno_name(rc)}")

    async def _file_page(self, vma: Vma, va: int, backend: PvOps) -> FilePage:
        assert vma.file is not None
        key = (vma.file.path, vma.pgoff_at(va))
        page = self._cache.pages.get(key)
        if page is None:
            mfn = await self._new_frame(backend.vcpu)
            await self._fill_from_file(mfn, vma, va, backend.vcpu)
            page = self._cache.pages[key] = FilePage(mfn)
        return page

    async def _fill_from_file(self, mfn: int, vma: Vma, va: int, vcpu: int) -> None:
        """Read a file page into ``mfn``: the page cache fills it with plain
        stores (no trap)."""
        assert vma.file is not None
        data = read_file_page(vma.file.path, vma.file_offset(va))
        if data.strip(b"\0"):
            await self._store(mfn << PAGE_SHIFT, data, vcpu)

    def _lookup_l1(self, va: int, proc: Process | None = None) -> int | None:
        """The L1 frame covering ``va`` (a VMA's, so canonical) in ``proc``'s
        tree (default process 1), or None (tables are read, no trap)."""
        return self._lookup_table(va, proc)

    def _lookup_table(self, va: int, proc: Process | None = None, down_to: int = 1) -> int | None:
        """The level-``down_to`` table covering ``va`` (1: the PTE page, 2: the
        PMD page) in ``proc``'s tree, or None (reads only)."""
        read = self.machine.read_u64
        table = (proc if proc is not None else self.process(INIT_PID)).l4
        for shift in _UPPER_SHIFTS[: 4 - down_to]:
            entry = read((table << PAGE_SHIFT) | (((va >> shift) & _INDEX_MASK) * PTE_SIZE))
            if not entry & _PAGE_PRESENT:
                return None
            table = (entry & PTE_MFN_MASK) >> PAGE_SHIFT
        return table

    async def _ensure_tables(
        self, va: int, backend: PvOps, proc: Process, *, down_to: int = 1
    ) -> int:
        """Build the missing tables for ``va`` in ``proc``'s pinned tree down
        to level ``down_to`` (1: L3/L2/L1, returning the PTE page; 2: L3/L2,
        returning the PMD page, as mremap's ``alloc_new_pmd``).

        As ``xen_alloc_ptpage`` on a pinned mm: the new table's linear
        mapping is made read-only and a PTE page is also pinned (one batch),
        then the entry pointing to it is written with ``mmu_update``, which
        validates it (an L4 entry goes to both L4s in the same call)."""
        idx = va_indexes(va)
        table = proc.l4
        for level, index in ((4, idx.l4), (3, idx.l3), (2, idx.l2))[: 4 - down_to]:
            entry_maddr = maddr_of_entry(table, index)
            entry = self.machine.read_u64(entry_maddr)
            if not entry & _PAGE_PRESENT:
                child = await self._new_frame(backend.vcpu)
                await backend.send_batch(alloc_table_entries(child, level - 1, self.machine.pfn_of))
                if level == 2:
                    proc.pinned.add(child)
                link = make_pte(child, TABLE_FLAGS)
                links = [(entry_maddr, link)]
                if level == 4 and proc.user_l4 is not None:
                    links.append((maddr_of_entry(proc.user_l4, index), link))
                await backend.set_upper(links)
                table = child
            else:
                table = (entry & PTE_MFN_MASK) >> PAGE_SHIFT
        return table

    async def _build_unpinned(self, va: int, proc: Process, vcpu: int) -> int:
        """Missing tables for ``va`` in a tree nothing has pinned (fork's
        child, exec's new mm): zeroed frames linked with plain stores, an L4
        entry mirrored into the user L4. Returns the PTE page."""
        idx = va_indexes(va)
        table = proc.l4
        for level, index in ((4, idx.l4), (3, idx.l3), (2, idx.l2)):
            entry_maddr = maddr_of_entry(table, index)
            entry = self.machine.read_u64(entry_maddr)
            if entry & _PAGE_PRESENT:
                table = (entry & PTE_MFN_MASK) >> PAGE_SHIFT
                continue
            child = await self._new_frame(vcpu)
            link = make_pte(child, TABLE_FLAGS).to_bytes(8, "little")
            await self._store(entry_maddr, link, vcpu)
            if level == 4 and proc.user_l4 is not None:
                await self._store(maddr_of_entry(proc.user_l4, index), link, vcpu)
            table = child
        return table

    # --- accounting -----------------------------------------------------------------------------

    async def stats(self) -> dict[str, Any]:
        """Machine counters (guest and hypervisor side) plus the kernel's own."""
        stats = await self.machine.stats()
        stats["kernel"] = {
            "mode": self.mode,
            "page_faults": self.counters.page_faults,
            "segfaults": self.counters.segfaults,
            "populated": self.counters.populated,
            **self.backend.stats(),
        }
        return stats

    async def audit(self) -> list[str]:
        return await self.machine.audit()


_ZERO_PAGE: Final = bytes(PAGE_SIZE)


def _argument_page(pid: int, index: int) -> bytes:
    """What exec copies into argument page ``index`` (``copy_strings``)."""
    return f"argv page {index} of pid {pid}\0".encode().ljust(PAGE_SIZE, b"\0")


def kernel_for(domain: Domain, mode_name: str, **mode_params: int) -> Kernel:
    """A kernel in a hypervisor mode over an already booted domain (over the
    socket, or the tests' in-process loopback)."""
    backends = [make_backend(mode_name, domain, v, **mode_params) for v in range(domain.nr_vcpus)]
    return Kernel(domain, backends)


@asynccontextmanager
async def boot(
    socket_path: str | None = None,
    *,
    mode: str = "xen",
    memory_mib: int = 64,
    vcpus: int = 2,
    **mode_params: int,
) -> AsyncIterator[Kernel]:
    """Boot a guest kernel in ``mode``; ``native`` needs no hypervisor."""
    if not _mode(mode).needs_hypervisor:
        if mode_params:
            raise ValueError(f"mode {mode!r} takes no buffer parameters")
        machine = NativeMachine(memory_mib, vcpus)
        yield Kernel(machine, [make_native_backend(machine, v) for v in range(vcpus)])
        return
    if socket_path is None:
        raise ValueError(f"mode {mode!r} needs a hypervisor socket")
    from .client import connect

    async with connect(socket_path, memory_mib=memory_mib, vcpus=vcpus, name=mode) as domain:
        yield kernel_for(domain, mode, **mode_params)
