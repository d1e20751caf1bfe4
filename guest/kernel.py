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
from typing import Any, Final

import numpy as np
import trio

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
from .pvops import PvOps, TlbGather
from .vma import AddressSpace
from .vma_tree import FileBacking, MprotectError, ProtChange, Vma

TABLE_FLAGS: Final = _PAGE_PRESENT | _PAGE_RW | _PAGE_USER
#: User accesses sent per run_user request.
ACCESS_BATCH: Final = 256
_RW: Final = np.uint64(_PAGE_RW)
_MFN: Final = np.uint64(PTE_MFN_MASK)
#: L4 slots of the user half (below the Xen slots): what exit walks.
USER_L4_SLOTS: Final = 256
#: Index shifts of the L4, L3 and L2 entries on the way to a PTE page.
_UPPER_SHIFTS: Final = (L4_PAGETABLE_SHIFT, L3_PAGETABLE_SHIFT, L2_PAGETABLE_SHIFT)
_INDEX_MASK: Final = ENTRIES_PER_TABLE - 1


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

    def mmap(
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
    ) -> int:
        """Linux mmap; ``flags`` and ``prot`` from Python's ``mmap`` module.

        ``path`` maps a file; ``writable`` is how it was opened (O_RDWR or
        O_RDONLY; default: O_RDWR when this process may write it), which
        decides whether a shared mapping may ever be made writable (EACCES).
        ``pid`` is the calling process (default 1), as for every system call.
        """
        mm = self.process(pid).mm
        backing = None
        if path is not None:
            if not os.path.isfile(path):
                raise OSError(errno.ENOENT, f"{os.strerror(errno.ENOENT)}: {path}")
            if writable is None:
                writable = os.access(path, os.W_OK)
            backing = self._files.setdefault((path, writable), FileBacking(path, writable))
        result = mm.do_mmap(length, prot, flags, addr=addr, file=backing, offset=offset)
        if result.unmapped:
            raise OSError(errno.EINVAL, "MAP_FIXED over existing mappings is not supported")
        return result.addr

    async def mprotect(self, addr: int, length: int, prot: int, *, pid: int | None = None) -> None:
        """Linux mprotect: VMA split/merge, then change_protection per piece."""
        proc = self.process(pid)
        try:
            changes = proc.mm.mprotect(addr, length, prot)
        except MprotectError as exc:
            await self._change_protection(exc.changes, proc)
            raise
        await self._change_protection(changes, proc)

    async def munmap(self, addr: int, length: int, *, pid: int | None = None) -> None:
        proc = self.process(pid)
        removed = proc.mm.munmap(addr, length)
        flush: list[int] = []
        for vma in removed:
            await self._zap_range(vma, flush, proc)
        if flush:
            await self.backend.flush_tlb(flush)

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

        Its L4 is a zeroed frame (fresh, or recycled and cleared: one more
        trap) pinned with ``MMUEXT_PIN_L4_TABLE``, as boot pins the first
        tree: one trap in every hypervisor mode, none natively. Nothing
        loads it yet (:meth:`switch_to`)."""
        backend = self.backends[vcpu]
        l4 = await self._new_frame(backend)
        await backend.pin_table(l4, 4)
        pid = self._next_pid
        self._next_pid += 1
        self.processes[pid] = Process(pid, l4)
        return pid

    async def switch_to(self, vcpu: int, pid: int) -> None:
        """Context switch ``vcpu`` to process ``pid`` (0: the kernel's own
        tree, as ``leave_mm`` loads): its L4 becomes the kernel and the user
        base pointer in one ``mmuext_op`` (one trap; in the batching modes
        one multicall entry of two ops, flushed at the end of the switch).
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
        user_l4 = 0 if proc.pid == IDLE_PID else proc.l4
        try:
            await self.backends[vcpu].switch_mm(proc.l4, user_l4, pin=pin)
        except BaseException:
            if pin:
                self._idle = None
            raise
        prev.cpus.discard(vcpu)
        proc.cpus.add(vcpu)
        self._loaded[vcpu] = proc

    async def exit_process(self, pid: int, *, vcpu: int = 0) -> None:
        """Tear down process ``pid``'s address space (exit_mmap), from ``vcpu``.

        As ``xen_exit_mmap`` does: every vCPU that has the tree loaded first
        switches to the kernel's own tree (``xen_drop_mm_ref``, one switch
        each), then the tree is unpinned (one ``mmuext_op``: the L4, then
        each table pinned on its own), and only then is it taken apart: on
        unpinned, plain memory, so freeing pages and tables costs no trap.
        Every data frame and table frame goes back to the kernel's pool;
        shared file pages stay in the page cache (dirty ones written back).
        """
        proc = self.process(pid)
        for cpu in sorted(proc.cpus):
            await self.switch_to(cpu, IDLE_PID)
        await self.backends[vcpu].unpin_tree(proc.l4, list(proc.pinned))
        for vma in proc.mm.vmas():
            self._release_range(vma, proc)
        self._free_frames.extend(self._user_tables(proc.l4))
        self._free_frames.append(proc.l4)
        proc.alive = False
        proc.ptl.clear()
        proc.pinned.clear()
        del self.processes[pid]

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

    def _user_tables(self, l4: int) -> list[int]:
        """The L3, L2 and L1 frames under the user half of ``l4`` (read, no trap)."""
        tables: list[int] = []
        level_tables = [l4]
        for _ in range(3):
            children: list[int] = []
            for table in level_tables:
                slots = USER_L4_SLOTS if table == l4 else ENTRIES_PER_TABLE
                entries = read_ptes(self.machine, table, 0, slots)
                present = entries[(entries & np.uint64(_PAGE_PRESENT)) != 0]
                children.extend(((present & _MFN) >> np.uint64(PAGE_SHIFT)).tolist())
            tables.extend(children)
            level_tables = children
        return tables

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
            mfn = await self._new_frame(backend)
            if vma.file is not None:
                await self._fill_from_file(mfn, vma, va, backend)
            if write and vma.writable:  # an exclusive anonymous page
                prot |= _PAGE_RW | _PAGE_DIRTY
        await backend.set_pte(ptep, make_pte(mfn, prot & ~PTE_MFN_MASK))

    async def _write_fault(self, vma: Vma, va: int, ptep: int, pte: int, backend: PvOps) -> None:
        """Write to a present read-only page of a writable VMA.

        A shared file page is write-notified: it becomes writable but stays
        clean, and the store the user retries sets D in hardware. Between two
        writebacks that D bit is the page's only dirty record (dirtiness is
        transferred to the page at writeback and unmap, ``pte_dirty`` ->
        ``set_page_dirty``): exactly the state the seed patch must not lose.
        An exclusive anonymous page is simply made writable and dirty.
        """
        if vma.file is not None and vma.is_shared:
            await backend.set_pte(ptep, pte | _PAGE_RW | _PAGE_ACCESSED)
            return
        await backend.set_pte(ptep, pte | _PAGE_RW | _PAGE_DIRTY | _PAGE_ACCESSED)

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
            await self.backend.flush_tlb(gather.vas)

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
                backend.fold_tlb_flush(gather.vas)
            await backend.lazy_leave()
            backend.note_unlock(l1)

    async def _change_pte_each(
        self, vma: Vma, l1: int, first: int, count: int, start: int, gather: TlbGather
    ) -> None:
        """Linux's loop: start -> pte_modify -> (pte_mkwrite) -> commit for
        each present PTE of entries ``first .. first + count`` of ``l1``.

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
            if try_writable and not new & _PAGE_RW and can_change_writable(private, old):
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
            np.bitwise_or(new, _RW, out=new, where=ptes_can_change_writable(vma.is_private, old))
        await backend.modify_prot_commit_ptes(l1, indexes, old, new)
        room = gather.room
        if room > 0:
            gather.add_run(start, offsets[flush_offsets(old, new, room)])

    # --- munmap / msync --------------------------------------------------------------------

    async def _zap_range(self, vma: Vma, to_flush: list[int], proc: Process) -> None:
        va = vma.start
        while va < vma.end:
            stop = min(vma.end, (va | ((1 << 21) - 1)) + 1)
            l1 = self._lookup_l1(va, proc)
            if l1 is not None:
                async with proc.lock(l1):
                    for page_va in range(va, stop, PAGE_SIZE):
                        ptep = maddr_of_entry(l1, va_indexes(page_va).l1)
                        if not pte_present(self.machine.read_u64(ptep)):
                            continue
                        old = await self.backend.ptep_get_and_clear(ptep)
                        if old & _PAGE_PRESENT:
                            to_flush.append(page_va)
                        self._release_page(vma, page_va, old)
                    self.backend.note_unlock(l1)
            va = stop

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
            self._free_frames.append((old & PTE_MFN_MASK) >> PAGE_SHIFT)

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
                        await backend.flush_tlb([page_va])
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

    async def _new_frame(self, backend: PvOps) -> int:
        """A zeroed frame: fresh from the domain, or recycled and cleared."""
        if self._free_frames:
            mfn = self._free_frames.pop()
            await backend.clear_frame(mfn)
            return mfn
        return self.machine.alloc_frame()

    async def _file_page(self, vma: Vma, va: int, backend: PvOps) -> FilePage:
        assert vma.file is not None
        key = (vma.file.path, vma.pgoff_at(va))
        page = self._cache.pages.get(key)
        if page is None:
            mfn = await self._new_frame(backend)
            await self._fill_from_file(mfn, vma, va, backend)
            page = self._cache.pages[key] = FilePage(mfn)
        return page

    async def _fill_from_file(self, mfn: int, vma: Vma, va: int, backend: PvOps) -> None:
        assert vma.file is not None
        data = read_file_page(vma.file.path, vma.file_offset(va))
        if data.strip(b"\0"):
            await backend.write_frame(mfn, data.ljust(PAGE_SIZE, b"\0"))

    def _lookup_l1(self, va: int, proc: Process | None = None) -> int | None:
        """The L1 frame covering ``va`` (a VMA's, so canonical) in ``proc``'s
        tree (default process 1), or None (tables are read, no trap)."""
        read = self.machine.read_u64
        table = (proc if proc is not None else self.process(INIT_PID)).l4
        for shift in _UPPER_SHIFTS:
            entry = read((table << PAGE_SHIFT) | (((va >> shift) & _INDEX_MASK) * PTE_SIZE))
            if not entry & _PAGE_PRESENT:
                return None
            table = (entry & PTE_MFN_MASK) >> PAGE_SHIFT
        return table

    async def _ensure_tables(self, va: int, backend: PvOps, proc: Process) -> int:
        """Build missing L3/L2/L1 tables for ``va`` in ``proc``'s tree
        (pinned before use)."""
        idx = va_indexes(va)
        table = proc.l4
        for level, index in ((4, idx.l4), (3, idx.l3), (2, idx.l2)):
            entry_maddr = maddr_of_entry(table, index)
            entry = self.machine.read_u64(entry_maddr)
            if not entry & _PAGE_PRESENT:
                child = await self._new_frame(backend)
                await backend.pin_table(child, level - 1)
                proc.pinned[child] = level - 1
                await backend.set_upper(entry_maddr, make_pte(child, TABLE_FLAGS))
                table = child
            else:
                table = (entry & PTE_MFN_MASK) >> PAGE_SHIFT
        return table

    def _lock(self, l1: int, proc: Process | None = None) -> trio.Lock:
        """The PTE lock of PTE page ``l1`` of ``proc`` (default process 1)."""
        return (proc if proc is not None else self.process(INIT_PID)).lock(l1)

    # --- accounting -----------------------------------------------------------------------------

    async def stats(self) -> dict[str, Any]:
        """Machine counters (guest and hypervisor side) plus the kernel's own."""
        stats = await self.machine.stats()
        stats["kernel"] = {
            "mode": self.mode,
            "page_faults": self.counters.page_faults,
            "segfaults": self.counters.segfaults,
            **self.backend.stats(),
        }
        return stats

    async def audit(self) -> list[str]:
        return await self.machine.audit()


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
