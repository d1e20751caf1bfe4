"""Replay a trace in the guest kernel, measured like the mprotect workload.

A trace (:mod:`pvemu.shared.trace`, made from strace's output by
:mod:`pvemu.scripts.strace`) keeps the program's own addresses. The replay
relocates them into the guest (:class:`~pvemu.shared.addrmap.AddressMap`:
each original range the trace maps is placed by the guest's ``mmap`` and
remembered; later calls are translated through that map, split where a range
crosses placements) and populates pages by the *touch-on-grant* policy: user
writes (or reads, for read-only memory) to the first pages of every range
that becomes accessible. Both policies, and what cannot be reproduced, are in
``docs/traces.md``.

A schema-2 trace names processes: each runs as a kernel process (the
program as one the replay spawns, children made by ``Kernel.fork``), execs
with ``Kernel.exec`` and exits with ``Kernel.exit_process``; its syscalls
name it (``pid=``) and its user accesses run on the user vCPU with its tree
loaded (a context switch when another is). A schema-1 trace replays as it
always did, in process 1.

The replay only talks to :class:`guest.kernel.Kernel`; what it measures and
reports is :mod:`pvemu.guest.replay_result`.
"""

from __future__ import annotations

import errno
import os
import tempfile
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Final

from pvemu.shared.addrmap import AddressMap
from pvemu.shared.trace import (
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_GROWSDOWN,
    MAP_LOCKED,
    MAP_NONBLOCK,
    MAP_POPULATE,
    MAP_PRIVATE,
    MAP_SHARED,
    MAP_STACK,
    MREMAP_DONTUNMAP,
    MREMAP_FIXED,
    POPULATE_ADVICES,
    PROT_EXEC,
    PROT_READ,
    PROT_WRITE,
    ROOT_PID,
    Brk,
    Event,
    Exec,
    Exit,
    Fork,
    Madvise,
    Mlock,
    Mmap,
    Mprotect,
    Mremap,
    Munlock,
    Munmap,
    Trace,
    Vfork,
    check_trace,
    load_trace,
)

from .kernel import Kernel, SegmentationFault
from .replay_result import (
    PROCESS_COUNTS,
    PROCESS_PHASES,
    REPLAY_PHASES,
    PhaseMeter,
    TraceResult,
)
from .vma_tree import MMAP_MIN_ADDR, PAGE_SIZE, TASK_SIZE, page_align
from .workload import WorkloadError, WorkloadResult

__all__ = [
    "RELOCATIONS",
    "DEFAULT_TOUCH_LIMIT",
    "DEFAULT_MAX_RESIDENT",
    "DEFAULT_FORK_TOUCH",
    "replay_trace",
    "run_trace_workload",
]

#: ``preserve``: place each range at the program's own address when free
#: (same page-table layout as the original); ``compact``: let the guest's
#: top-down allocator choose (next to the range's neighbour when possible).
RELOCATIONS: Final = ("preserve", "compact")
#: Pages touched, at most, per range that becomes accessible.
DEFAULT_TOUCH_LIMIT: Final = 64
#: Pages the replay keeps populated at once, at most (frames are finite).
DEFAULT_MAX_RESIDENT: Final = 2048
#: Pages each side of a fork writes when it next runs (write-after-fork).
DEFAULT_FORK_TOUCH: Final = 8
#: Where a schema-2 replay forks (as the guest's other syscalls run).
_SYSCALL_VCPU: Final = 0
#: How many ``events N%`` steps a replay reports (then ``verify``), so that a
#: parent's progress bar moves inside a long trace, not only between modes.
PROGRESS_STEPS: Final = 20
_PROT_ACCESS: Final = PROT_READ | PROT_WRITE | PROT_EXEC
#: The mmap flags a replay keeps: the kernel populates (and locks) with them.
_POPULATE_FLAGS: Final = MAP_POPULATE | MAP_NONBLOCK | MAP_LOCKED


@dataclass(eq=False)
class _Space:
    """One address space of the replayed program: the kernel process whose
    tree it is (None: process 1, a schema-1 replay), the map of original
    ranges into it, the pages populated in it and the byte each holds, its
    program's break, and the trace processes running in it (more than one
    while a vfork child runs in its parent's)."""

    kpid: int | None
    map: AddressMap = field(default_factory=AddressMap)
    touched: dict[int, int] = field(default_factory=dict)
    brk_start: int | None = None
    brk_cur: int = 0
    users: set[int] = field(default_factory=set)

    def forked(self, kpid: int, child: int) -> _Space:
        """The child's copy: same map, same pages and bytes, same break."""
        return _Space(
            kpid, self.map.copy(), dict(self.touched), self.brk_start, self.brk_cur, {child}
        )


class _Replay:
    """One replay: the address spaces of the trace's processes (the current
    event's in ``space``), and one handler per event kind (``on_*``)."""

    def __init__(
        self,
        kernel: Kernel,
        trace: Trace,
        result: TraceResult,
        *,
        touch_limit: int,
        max_resident: int,
        relocation: str,
        scratch: str,
        fork_touch: int = DEFAULT_FORK_TOUCH,
        on_step: Callable[[str], None] | None = None,
    ) -> None:
        self.kernel = kernel
        self.on_step = on_step
        self.trace = trace
        self.result = result
        self.touch_limit = touch_limit
        self.max_resident = max_resident
        self.relocation = relocation
        self.scratch = scratch
        self.fork_touch = fork_touch
        phases = REPLAY_PHASES + (PROCESS_PHASES if trace.has_processes else ())
        self.meter = PhaseMeter(kernel, phases)
        #: The vCPU user code runs on (the syscalls run on vCPU 0).
        self.vcpu = min(1, kernel.machine.nr_vcpus - 1)
        #: The current event's address space.
        self.space = _Space(None, users={ROOT_PID})
        #: Each running trace process's address space (schema 2).
        self.spaces: dict[int, _Space] = {}
        #: Address spaces that exist, each once.
        self.live: list[_Space] = [self.space]
        #: Processes that write after a fork when they next run.
        self.fork_pending: set[int] = set()
        #: Whether two processes ever existed (shared pages may differ then).
        self.forked = False
        self.files: dict[str, str] = {}
        self.out_of_memory = False
        self.index = 0
        self._byte = 0

    # --- bookkeeping --------------------------------------------------------------------

    def _error(self, event: Event, what: str, exc: BaseException) -> None:
        self.result.errors += 1
        if len(self.result.error_samples) < 20:
            code = getattr(exc, "errno", None)
            self.result.error_samples.append(
                {
                    "event": self.index,
                    "op": event.OP,
                    "call": what,
                    "errno": errno.errorcode.get(code, str(code)) if code else None,
                    "message": str(exc),
                }
            )

    def _room(self, event: Event, what: str, pages: int) -> bool:
        """Whether the guest has the frames for a populate of up to
        ``pages`` pages (with its page tables). If not, the call is an error
        (ENOMEM) and the replay stops populating: the guest kernel does not
        recover from running out of frames inside a populate."""
        need = pages + pages // 512 + 8
        if not self.out_of_memory and need <= self.kernel.free_frame_count():
            return True
        self.out_of_memory = True
        self._error(event, what, OSError(errno.ENOMEM, f"no frames to populate {pages} pages"))
        return False

    def _accessible_pages(self, start: int, end: int) -> int:
        return sum(
            (ve - vs) // PAGE_SIZE
            for vs, ve, prot, _ in self._vma_pieces(start, end)
            if prot & _PROT_ACCESS
        )

    def _untracked(self, op: str) -> None:
        self.result.untracked[op] = self.result.untracked.get(op, 0) + 1

    def _resident(self) -> int:
        """Pages populated in every address space (a forked copy's count too:
        its PTEs are the tree's)."""
        return sum(len(space.touched) for space in self.live)

    def _forget(self, start: int, end: int) -> None:
        touched = self.space.touched
        if (end - start) // PAGE_SIZE <= len(touched):
            for va in range(start, end, PAGE_SIZE):
                touched.pop(va, None)
        else:
            for va in [va for va in touched if start <= va < end]:
                del touched[va]

    def _vma_list(self) -> list[tuple[int, int, int, int]]:
        return self.kernel.vmas(pid=self.space.kpid)

    def _guest_free(self, start: int, end: int, vmas: list[tuple[int, int, int, int]]) -> bool:
        if start < MMAP_MIN_ADDR or end > TASK_SIZE or start % PAGE_SIZE:
            return False
        i = bisect_right([v[0] for v in vmas], start) - 1
        if i >= 0 and vmas[i][1] > start:
            return False
        return i + 1 >= len(vmas) or vmas[i + 1][0] >= end

    def _vma_pieces(self, start: int, end: int) -> list[tuple[int, int, int, int]]:
        """(start, end, prot, flags) of the VMAs in ``[start, end)``, clipped."""
        out = []
        for vs, ve, prot, flags in self._vma_list():
            if ve > start and vs < end:
                out.append((max(vs, start), min(ve, end), prot, flags))
        return out

    # --- guest system calls (errors recorded, never swallowed silently) ----------------------

    async def _mmap(
        self,
        event: Event,
        length: int,
        prot: int,
        flags: int,
        *,
        addr: int | None,
        path: str | None = None,
        offset: int = 0,
    ) -> int | None:
        try:
            return await self.kernel.mmap(
                length, prot, flags, addr=addr, path=path, offset=offset, pid=self.space.kpid
            )
        except OSError as exc:
            self._error(event, "mmap", exc)
            return None

    async def _munmap(self, event: Event, start: int, end: int) -> bool:
        try:
            await self.kernel.munmap(start, end - start, pid=self.space.kpid)
        except OSError as exc:
            self._error(event, "munmap", exc)
            return False
        self._forget(start, end)
        return True

    async def _mprotect(self, event: Event, start: int, end: int, prot: int) -> bool:
        try:
            await self.kernel.mprotect(start, end - start, prot, pid=self.space.kpid)
        except OSError as exc:
            self._error(event, "mprotect", exc)
            return False
        return True

    # --- placement ---------------------------------------------------------------------

    def _guest_flags(self, event: Mmap) -> tuple[int, str | None, int]:
        """Guest mmap flags, file and offset for an original mapping: a
        private file mapping becomes anonymous (its cost is the same: the
        page is filled from a file of zeros); a shared one maps a scratch
        file of zeros, so write-notify and writeback stay as Linux has them.
        MAP_POPULATE (with MAP_NONBLOCK) and MAP_LOCKED are kept: the kernel
        populates with them."""
        keep = event.flags & _POPULATE_FLAGS
        if event.shared and not event.anonymous:
            key = event.path or f"fd{event.fd}"
            scratch = self.files.get(key)
            if scratch is None:
                scratch = os.path.join(self.scratch, f"file{len(self.files)}")
                self.files[key] = scratch
                with open(scratch, "wb"):
                    pass
            size = event.offset + page_align(event.length)
            if os.path.getsize(scratch) < size:
                os.truncate(scratch, size)
            return MAP_SHARED | keep, scratch, event.offset
        mtype = MAP_SHARED if event.shared else MAP_PRIVATE
        return mtype | MAP_ANONYMOUS | keep, None, 0

    async def _place(
        self,
        event: Event,
        start: int,
        end: int,
        prot: int,
        flags: int,
        *,
        path: str | None = None,
        offset: int = 0,
        stack: bool = False,
    ) -> int | None:
        """Map the original ``[start, end)`` somewhere free in the guest and
        remember where. Candidates, first free one wins: the original address
        (policy ``preserve``), right after the guest image of the original
        left neighbour, right before that of the right neighbour; else the
        guest's own top-down choice."""
        length = end - start
        overlap, _ = self.space.map.runs(start, end)
        for run in overlap:  # only if the map went stale: keep it consistent
            await self._munmap(event, run.start, run.end)
        self.space.map.remove(start, end)
        hint = self._hint(start, end)
        guest = await self._mmap(
            event, length, prot & _PROT_ACCESS, flags, addr=hint, path=path, offset=offset
        )
        if guest is None:
            return None
        if guest != start:
            self.result.relocated += 1
        self.space.map.insert(start, end, guest, stack=stack)
        return guest

    def _hint(self, start: int, end: int) -> int | None:
        """Where the original ``[start, end)`` should go in the guest: the
        first free candidate of :meth:`_place` (None: the guest chooses)."""
        length = end - start
        candidates: list[int] = []
        if self.relocation == "preserve":
            candidates.append(start)
        left = self.space.map.translate(start - 1) if start else None
        if left is not None:
            candidates.append(left + 1)
        right = self.space.map.translate(end)
        if right is not None:
            candidates.append(right - length)
        vmas = self._vma_list()
        return next((c for c in candidates if self._guest_free(c, c + length, vmas)), None)

    def _free_gap(self, length: int) -> int | None:
        """The highest free guest range of ``length`` bytes below
        ``TASK_SIZE`` (None if there is none): where a MREMAP_FIXED move goes
        when no candidate of :meth:`_hint` is free."""
        top = TASK_SIZE
        for start, end, _, _ in reversed(self._vma_list()):
            if top - end >= length:
                return top - length
            top = min(top, start)
        return top - length if top - length >= MMAP_MIN_ADDR else None

    # --- population ------------------------------------------------------------------------

    def _populated(self, start: int, end: int) -> None:
        """The kernel populated the accessible pages of ``[start, end)``
        (MAP_POPULATE, MAP_LOCKED, MADV_POPULATE_*, mlock): they are resident
        now, holding zeros unless the replay wrote them before, so
        touch-on-grant leaves them alone and ``verify`` reads them back. A
        page the kernel could not populate (a failed call) reads zeros too;
        once the guest is out of frames nothing is recorded."""
        if self.out_of_memory:
            return
        touched = self.space.touched
        for vs, ve, prot, _ in self._vma_pieces(start, end):
            if prot & _PROT_ACCESS:
                for va in range(vs, ve, PAGE_SIZE):
                    touched.setdefault(va, 0)
        self.result.peak_resident = max(self.result.peak_resident, self._resident())

    async def _grant(self, start: int, end: int, prot: int, stack: bool) -> None:
        """Touch-on-grant: up to ``touch_limit`` untouched pages of a range
        that just became accessible (from the top for stacks), while fewer
        than ``max_resident`` pages are populated."""
        if not prot & _PROT_ACCESS or self.out_of_memory or start >= end:
            return
        budget = min(self.touch_limit, self.max_resident - self._resident())
        if budget <= 0:
            if self.touch_limit > 0:
                self.result.budget_exhausted += 1
            return
        pages = range(start, end, PAGE_SIZE)
        chosen: list[int] = []
        for va in reversed(pages) if stack else pages:
            if va not in self.space.touched:
                chosen.append(va)
                if len(chosen) == budget:
                    break
        if not chosen:
            return
        await self.meter.enter("touch")
        accesses: list[tuple[int, str, bytes | int]] = []
        written: dict[int, int] = {}
        for va in chosen:
            if prot & PROT_WRITE:
                self._byte = self._byte % 255 + 1
                written[va] = self._byte
                accesses.append((va, "w", bytes([self._byte])))
            else:
                accesses.append((va, "r", 1))
        await self._user(accesses, written)

    async def _user(
        self, accesses: list[tuple[int, str, bytes | int]], written: dict[int, int]
    ) -> None:
        """Run the accesses; record what each page now holds. ``pages``
        counts the pages populated for the first time (not a copy's sources)."""
        event = self.trace.events[self.index]
        fresh = {va for va, _, _ in accesses if va not in self.space.touched}
        await self._load(self.space)
        try:
            reads = await self.kernel.run_user(self.vcpu, accesses)
        except SegmentationFault as exc:
            self._error(event, "user access", exc)
            return
        except MemoryError as exc:  # the guest ran out of frames: stop populating
            self.out_of_memory = True
            self._error(event, "user access", exc)
            return
        it = iter(reads)
        for va, kind, _ in accesses:
            if kind == "r":
                self.space.touched[va] = next(it)[0]
            elif va in written:
                self.space.touched[va] = written[va]
        self.result.pages += len(fresh)
        self.result.peak_resident = max(self.result.peak_resident, self._resident())

    # --- events ----------------------------------------------------------------------------

    async def on_mmap(self, e: Mmap) -> None:
        start, end = e.addr, e.addr + page_align(e.length)
        flags, path, offset = self._guest_flags(e)
        stack = bool(e.flags & (MAP_STACK | MAP_GROWSDOWN))
        await self.meter.enter("mmap")
        populates = (
            bool(flags & MAP_LOCKED) or flags & (MAP_NONBLOCK | MAP_POPULATE) == MAP_POPULATE
        )
        pages = (end - start) // PAGE_SIZE
        if populates and e.prot & _PROT_ACCESS and not self._room(e, "mmap", pages):
            flags &= ~_POPULATE_FLAGS  # mapped, not populated
            populates = False
        guest: int | None = None
        if e.flags & MAP_FIXED:
            runs, uncovered = self.space.map.runs(start, end)
            if runs and not uncovered and all(a.end == b.start for a, b in pairwise(runs)):
                # MAP_FIXED over the program's own mappings: the kernel's one
                # call unmaps them (zap, tables, flush) and maps in their place.
                target = runs[0].start
                prot = e.prot & _PROT_ACCESS
                guest = await self._mmap(
                    e, end - start, prot, flags | MAP_FIXED, addr=target, path=path, offset=offset
                )
                if guest is None:
                    return
                self._forget(target, target + (end - start))
                self.space.map.remove(start, end)
                self.space.map.insert(start, end, guest, stack=stack)
        if guest is None:
            guest = await self._place(
                e, start, end, e.prot, flags, path=path, offset=offset, stack=stack
            )
        if guest is None:
            return
        if populates:
            self._populated(guest, guest + (end - start))
        await self._grant(guest, guest + (end - start), e.prot, stack)

    async def on_mprotect(self, e: Mprotect) -> None:
        start, end = e.addr, e.addr + page_align(e.length)
        runs, uncovered = self.space.map.runs(start, end)
        if uncovered:
            self._untracked("mprotect")
        if not runs:
            return
        await self.meter.enter("mprotect")
        prot = e.prot & _PROT_ACCESS
        grants: list[tuple[int, int, bool]] = []
        for run in runs:
            before = self._vma_pieces(run.start, run.end)
            if await self._mprotect(e, run.start, run.end, prot) and prot:
                grants += [(s, t, run.stack) for s, t, p, _ in before if not p & _PROT_ACCESS]
        for s, t, stack in grants:
            await self._grant(s, t, prot, stack)

    async def on_munmap(self, e: Munmap) -> None:
        start, end = e.addr, e.addr + page_align(e.length)
        runs, uncovered = self.space.map.runs(start, end)
        if uncovered:
            self._untracked("munmap")
        if runs:
            await self.meter.enter("munmap")
            for run in runs:
                await self._munmap(e, run.start, run.end)
        self.space.map.remove(start, end)

    async def on_brk(self, e: Brk) -> None:
        if self.space.brk_start is None:
            self.space.brk_start = self.space.brk_cur = e.result
            return
        old, new = page_align(self.space.brk_cur), page_align(e.result)
        self.space.brk_cur = e.result
        if new > old:
            await self.meter.enter("brk")
            rw = PROT_READ | PROT_WRITE
            guest = await self._place(e, old, new, rw, MAP_PRIVATE | MAP_ANONYMOUS)
            if guest is not None:
                await self._grant(guest, guest + (new - old), rw, False)
        elif new < old:
            runs, _ = self.space.map.runs(new, old)
            if runs:
                await self.meter.enter("brk")
                for run in runs:
                    await self._munmap(e, run.start, run.end)
            self.space.map.remove(new, old)

    async def on_madvise(self, e: Madvise) -> None:
        """The kernel's own madvise on each guest run: MADV_POPULATE_READ and
        MADV_POPULATE_WRITE populate the pages (``madvise_populate``: they
        are resident then); MADV_FREE cleans them (they stay, with their
        data: pvemu has no reclaim); every other advice a trace keeps drops
        them with ``madvise_dontneed`` (MADV_DONTNEED_LOCKED is DONTNEED
        without mlock; MADV_REMOVE's zap, approximated: docs/traces.md)."""
        runs, uncovered = self.space.map.runs(e.addr, e.addr + page_align(e.length))
        if uncovered:
            self._untracked("madvise")
        if not runs:
            return
        await self.meter.enter("madvise")
        if e.advice in POPULATE_ADVICES:
            write = e.advice == "MADV_POPULATE_WRITE"
            for run in runs:
                if not self._room(e, "madvise", self._accessible_pages(run.start, run.end)):
                    return
                try:
                    await self.kernel.madvise_populate(
                        run.start, run.length, write=write, pid=self.space.kpid
                    )
                except OSError as exc:  # the pages before the failure are populated
                    self._error(e, "madvise", exc)
                self._populated(run.start, run.end)
            return
        free = e.advice == "MADV_FREE"
        advise = self.kernel.madvise_free if free else self.kernel.madvise_dontneed
        for run in runs:
            try:
                await advise(run.start, run.length, pid=self.space.kpid)
            except OSError as exc:  # the pieces before the failure are done
                self._error(e, "madvise", exc)
            if not free:
                self._forget(run.start, run.end)

    async def on_mlock(self, e: Mlock | Munlock) -> None:
        """``Kernel.mlock`` (which populates: the pages are resident then) or
        ``Kernel.munlock`` on each guest run of the range (the address
        rounded down, as Linux does)."""
        start = e.addr - e.addr % PAGE_SIZE
        runs, uncovered = self.space.map.runs(start, page_align(e.addr + e.length))
        if uncovered:
            self._untracked(e.OP)
        if not runs:
            return
        await self.meter.enter("mlock")
        for run in runs:
            if isinstance(e, Mlock) and not self._room(
                e, "mlock", self._accessible_pages(run.start, run.end)
            ):
                return
            try:
                if isinstance(e, Mlock):
                    await self.kernel.mlock(run.start, run.length, pid=self.space.kpid)
                else:
                    await self.kernel.munlock(run.start, run.length, pid=self.space.kpid)
            except OSError as exc:
                self._error(e, e.OP, exc)
            if isinstance(e, Mlock):
                self._populated(run.start, run.end)

    async def on_mremap(self, e: Mremap) -> None:
        """``Kernel.mremap`` on the guest image of the old range, which must
        be one guest run (docs/traces.md, "mremap"). A range the original
        moved goes where :meth:`_hint` says (asked for with MREMAP_FIXED,
        which takes the same page-table steps as the guest's own choice of
        that free range), a MREMAP_FIXED target over the program's own
        mappings to their guest image (the kernel unmaps it); the map then
        follows whatever address the guest returned."""
        old_start = e.addr
        old_len, new_len = page_align(e.old_length), page_align(e.length)
        kept = min(old_len, new_len)
        # What Linux needs mapped (check_prep_vma): the kept range to grow or
        # move it, else only the first page (a shrunk tail is unmapped
        # whatever is there, the same size is a no-op).
        need = kept if new_len > old_len or e.flags & (MREMAP_FIXED | MREMAP_DONTUNMAP) else 0
        runs, uncovered = self.space.map.runs(old_start, old_start + max(need, PAGE_SIZE))
        if not runs or uncovered:
            self._untracked("mremap")  # (part of) memory the trace never mapped
            return
        await self.meter.enter("mremap")
        if len(runs) > 1:
            split = OSError(errno.EFAULT, "the old range is not one guest range: not replayed")
            self._error(e, "mremap", split)
            return
        source = runs[0].start
        call_len = old_len
        whole, holes = self.space.map.runs(old_start, old_start + old_len)
        if new_len < old_len and (len(whole) > 1 or holes):
            # The tail Linux unmaps (whatever is there) is not the guest
            # image's tail: unmap its pieces, then mremap what is kept.
            tail, _ = self.space.map.runs(old_start + kept, old_start + old_len)
            for run in tail:
                await self._munmap(e, run.start, run.end)
            self.space.map.remove(old_start + kept, old_start + old_len)
            call_len = kept
        pieces = self._vma_pieces(source, source + PAGE_SIZE)
        prot = pieces[0][2] if pieces else 0
        moved = e.new_addr != old_start
        dest_start, dest_end = e.new_addr, e.new_addr + new_len
        flags, target = e.flags, None
        if moved and e.flags & MREMAP_FIXED:
            target = await self._fixed_target(e, dest_start, dest_end)
            if target is None:
                self._error(e, "mremap", OSError(errno.ENOMEM, "no free guest range"))
                return
        elif moved:
            target = self._hint(dest_start, dest_end)
            if target is not None and not e.flags & MREMAP_DONTUNMAP:
                flags |= MREMAP_FIXED  # DONTUNMAP takes the address as a hint
        try:
            guest = await self.kernel.mremap(
                source, call_len, new_len, flags, target, pid=self.space.kpid
            )
        except OSError as exc:
            self._error(e, "mremap", exc)
            self._resync()
            return
        self._follow(source, call_len, new_len, guest)
        space = self.space
        if moved:
            if old_len and not e.flags & MREMAP_DONTUNMAP:
                space.map.remove(old_start, old_start + old_len)
        else:
            space.map.remove(old_start, old_start + max(old_len, new_len))
        space.map.remove(dest_start, dest_end)
        space.map.insert(dest_start, dest_end, guest, stack=runs[0].stack)
        if guest != dest_start and (moved or guest != source):
            self.result.relocated += 1
        if new_len > old_len:
            await self._grant(guest + old_len, guest + new_len, prot, runs[0].stack)

    async def _fixed_target(self, e: Mremap, start: int, end: int) -> int | None:
        """The guest address for a MREMAP_FIXED move to the original
        ``[start, end)``: the guest image of the program's mapping there if
        it is one guest run (the kernel's mremap unmaps it, as Linux does);
        else the covered pieces are unmapped first and the range is placed
        afresh (a free candidate, else the highest free guest range)."""
        runs, uncovered = self.space.map.runs(start, end)
        if len(runs) == 1 and not uncovered:
            return runs[0].start
        for run in runs:
            await self._munmap(e, run.start, run.end)
        self.space.map.remove(start, end)
        hint = self._hint(start, end)
        return hint if hint is not None else self._free_gap(end - start)

    def _follow(self, source: int, old_len: int, new_len: int, guest: int) -> None:
        """The populated pages after the guest's mremap of ``[source, source
        + old_len)`` to ``guest``: the kept ones now live at the new address
        (the PTEs moved, with their frames), a shrunk tail and whatever a
        MREMAP_FIXED destination held are gone. Insertion order (which pages
        were populated last) is kept."""
        if guest == source:
            self._forget(source + new_len, source + old_len)
            return
        kept, shift = min(old_len, new_len), guest - source
        self.space.touched = {
            (va + shift if source <= va < source + kept else va): data
            for va, data in self.space.touched.items()
            if not (guest <= va < guest + new_len or source + kept <= va < source + old_len)
        }

    def _resync(self) -> None:
        """After a failed mremap (which may have done part of its work, as
        Linux's does): drop the map's segments and the populated pages the
        guest no longer maps, so later events stay consistent."""
        vmas = self._vma_list()
        starts = [v[0] for v in vmas]

        def mapped(va: int) -> bool:
            i = bisect_right(starts, va) - 1
            return i >= 0 and vmas[i][1] > va

        for seg in self.space.map.segments():
            at, end = seg.guest, seg.guest + (seg.end - seg.start)
            holes: list[tuple[int, int]] = []
            for vs, ve, _, _ in vmas:
                if ve <= at or vs >= end:
                    continue
                if vs > at:
                    holes.append((at, vs))
                at = max(at, ve)
            if at < end:
                holes.append((at, end))
            for lo, hi in holes:
                self.space.map.remove(seg.start + (lo - seg.guest), seg.start + (hi - seg.guest))
        self.space.touched = {va: b for va, b in self.space.touched.items() if mapped(va)}

    async def on_exec(self, e: Exec) -> None:
        """A new program (schema 1): its address space starts empty."""
        if len(self.space.map):
            await self.meter.enter("munmap")
            for seg in self.space.map.segments():
                await self._munmap(e, seg.guest, seg.guest + (seg.end - seg.start))
            self.space.map.clear()
        self.space.brk_start = None
        self.space.brk_cur = 0

    # --- processes (schema 2) -----------------------------------------------------------------

    async def _load(self, space: _Space, *, measured: bool = True) -> None:
        """Make ``space``'s tree the one loaded on the user vCPU: a context
        switch (its own phase) unless it already is."""
        if space.kpid is None or self.kernel.loaded(self.vcpu) == space.kpid:
            return
        resume = self.meter.current
        if measured:
            await self.meter.enter("context_switch")
        await self.kernel.switch_to(self.vcpu, space.kpid)
        if measured:
            self.result.processes["context_switches"] += 1
            if resume is not None:
                await self.meter.enter(resume)

    async def _end(self, space: _Space) -> None:
        """The last process in ``space`` is gone: tear its tree down
        (``exit_process`` on the user vCPU, where the leaver ran)."""
        await self.meter.enter("exit")
        assert space.kpid is not None
        await self.kernel.exit_process(space.kpid, vcpu=self.vcpu)
        self.live.remove(space)

    async def _write_after_fork(self, pid: int) -> None:
        """Write-after-fork: the first time a process runs after a fork, it
        writes the ``fork_touch`` pages it populated last in private writable
        memory, as a process returning from fork writes its stack and data:
        each a copy-on-write fault (a copy while the other side still maps
        the frame, a reuse once it is the only mapper)."""
        self.fork_pending.discard(pid)
        space = self.space
        vmas = self._vma_list()
        starts = [v[0] for v in vmas]
        chosen: list[int] = []
        for va in reversed(space.touched):
            i = bisect_right(starts, va) - 1
            if i < 0 or vmas[i][1] <= va:
                continue
            _, _, prot, flags = vmas[i]
            if prot & PROT_WRITE and not flags & MAP_SHARED:
                chosen.append(va)
                if len(chosen) == self.fork_touch:
                    break
        if not chosen:
            return
        await self.meter.enter("cow")
        accesses: list[tuple[int, str, bytes | int]] = []
        written: dict[int, int] = {}
        for va in sorted(chosen):
            self._byte = self._byte % 255 + 1
            written[va] = self._byte
            accesses.append((va, "w", bytes([self._byte])))
        await self._user(accesses, written)

    async def on_fork(self, e: Fork) -> None:
        """``Kernel.fork`` of the parent's address space (on the syscall
        vCPU); the child's is a copy with the same pages."""
        parent = self.space
        await self.meter.enter("fork")
        assert parent.kpid is not None
        kpid = await self.kernel.fork(parent.kpid, vcpu=_SYSCALL_VCPU)
        child = parent.forked(kpid, e.child)
        self.spaces[e.child] = child
        self.live.append(child)
        self.forked = True
        self.result.processes["forks"] += 1
        if self.fork_touch > 0:
            self.fork_pending |= {e.pid, e.child}

    async def on_vfork(self, e: Vfork) -> None:
        """The child runs in the parent's address space: nothing to copy."""
        self.space.users.add(e.child)
        self.spaces[e.child] = self.space
        self.forked = True
        self.result.processes["vforks"] += 1

    async def on_process_exec(self, e: Exec) -> None:
        """``Kernel.exec`` on the user vCPU, the process loaded there first.
        A process alone in its address space execs in place; one sharing
        it (a vfork child) first gets a kernel process of its own
        (``Kernel.spawn``: an empty tree, which the exec then replaces)."""
        space = self.space
        if space.users == {e.pid}:
            await self._load(space)
            await self.meter.enter("exec")
            assert space.kpid is not None
            kpid = space.kpid
            await self.kernel.exec(kpid, vcpu=self.vcpu)
            self.live.remove(space)
        else:
            space.users.discard(e.pid)
            await self.meter.enter("exec")
            kpid = await self.kernel.spawn(vcpu=_SYSCALL_VCPU)
            await self._load(_Space(kpid))
            await self.meter.enter("exec")
            await self.kernel.exec(kpid, vcpu=self.vcpu)
            if not space.users:  # its owner exited before: the tree goes now
                await self._end(space)
        self.space = self.spaces[e.pid] = _Space(kpid, users={e.pid})
        self.live.append(self.space)
        self.result.processes["execs"] += 1

    async def on_exit(self, e: Exit) -> None:
        """``Kernel.exit_process`` of the process's address space, from the
        user vCPU where it ran; a vfork child leaving its parent's address
        space tears nothing down."""
        space = self.spaces.pop(e.pid)
        space.users.discard(e.pid)
        self.fork_pending.discard(e.pid)
        self.result.processes["exits"] += 1
        if not space.users:
            await self._load(space)
            await self._end(space)

    async def _event(self, event: Event) -> None:
        if self.trace.has_processes:
            self.space = self.spaces[event.pid]
            if event.pid in self.fork_pending:
                await self._write_after_fork(event.pid)
        match event:
            case Mmap():
                await self.on_mmap(event)
            case Mprotect():
                await self.on_mprotect(event)
            case Munmap():
                await self.on_munmap(event)
            case Mremap():
                await self.on_mremap(event)
            case Brk():
                await self.on_brk(event)
            case Madvise():
                await self.on_madvise(event)
            case Mlock() | Munlock():
                await self.on_mlock(event)
            case Exec() if self.trace.has_processes:
                await self.on_process_exec(event)
            case Exec():
                await self.on_exec(event)
            case Fork():
                await self.on_fork(event)
            case Vfork():
                await self.on_vfork(event)
            case Exit():
                await self.on_exit(event)

    async def run(self) -> None:
        replayed: Counter[str] = Counter()
        total = len(self.trace.events)
        reported = 0
        counters = self.kernel.counters
        copies, reuses = counters.cow_copies, counters.cow_reuses
        if self.trace.has_processes:
            # The program's process exists before its first event, as the
            # one strace forked did: made outside every phase.
            self.space.kpid = await self.kernel.spawn(vcpu=_SYSCALL_VCPU)
            self.spaces[ROOT_PID] = self.space
            self.result.processes = dict.fromkeys(PROCESS_COUNTS, 0)
        for index, event in enumerate(self.trace.events):
            self.index = index
            if self.on_step is not None:
                reported = self._report(index, total, reported)
            await self._event(event)
            replayed[event.OP] += 1
        if self.on_step is not None:
            self._report(total, total, reported)
        await self.meter.close()
        if self.trace.has_processes:
            self.result.processes["cow_copies"] = counters.cow_copies - copies
            self.result.processes["cow_reuses"] = counters.cow_reuses - reuses
        self.result.replayed = {op: replayed.get(op, 0) for op in self.trace.ops()}
        self.result.phases = dict(self.meter.phases)

    def _report(self, done: int, total: int, reported: int) -> int:
        """Report each ``PROGRESS_STEPS``-th of the events once ``done`` of
        ``total`` have run; returns how many steps are reported so far."""
        reached = PROGRESS_STEPS if total == 0 else done * PROGRESS_STEPS // total
        assert self.on_step is not None
        while reported < reached:
            reported += 1
            self.on_step(f"events {reported * 100 // PROGRESS_STEPS}%")
        return reported

    async def verify(self) -> None:
        """Read back every populated page that is still readable, in every
        address space that is left (its tree loaded on the user vCPU). Once
        processes have forked, pages of shared mappings are left out: another
        process may have written them since."""
        for space in self.live:
            self.space = space
            await self._load(space, measured=False)
            vmas = self._vma_list()
            starts = [v[0] for v in vmas]
            pages = []
            for va in sorted(space.touched):
                i = bisect_right(starts, va) - 1
                if i < 0 or vmas[i][1] <= va or not vmas[i][2] & _PROT_ACCESS:
                    continue
                if self.forked and vmas[i][3] & MAP_SHARED:
                    continue
                pages.append(va)
            reads = await self.kernel.run_user(self.vcpu, [(va, "r", 1) for va in pages])
            for va, data in zip(pages, reads, strict=True):
                if data[0] != space.touched[va]:
                    where = "" if space.kpid is None else f" of process {space.kpid}"
                    raise WorkloadError(
                        f"page {va:#x}{where} read back {data[0]:#x}, "
                        f"expected {space.touched[va]:#x}"
                    )


async def replay_trace(
    kernel: Kernel,
    trace: Trace,
    *,
    touch_limit: int = DEFAULT_TOUCH_LIMIT,
    max_resident: int = DEFAULT_MAX_RESIDENT,
    relocation: str = "preserve",
    fork_touch: int = DEFAULT_FORK_TOUCH,
    name: str = "",
    on_step: Callable[[str], None] | None = None,
) -> TraceResult:
    """Replay ``trace`` in ``kernel``, phase by phase (``REPLAY_PHASES``,
    and ``PROCESS_PHASES`` for a trace of processes), then read back every
    populated page and run ``audit()``.

    Raises TraceError if the trace is not a consistent one
    (:func:`~pvemu.shared.trace.check_trace`) and WorkloadError if a page
    reads back wrong (a broken kernel); syscalls that fail are counted in
    ``TraceResult.errors``. ``on_step`` hears ``events N%``
    ``PROGRESS_STEPS`` times, then ``verify``.
    """
    if touch_limit < 0 or max_resident < 0 or fork_touch < 0:
        raise ValueError("touch_limit, max_resident and fork_touch must be >= 0")
    if relocation not in RELOCATIONS:
        raise ValueError(f"relocation must be one of {RELOCATIONS}, not {relocation!r}")
    check_trace(trace.events, trace.schema)
    policy: dict[str, int | str] = {
        "touch_limit": touch_limit,
        "max_resident": max_resident,
        "relocation": relocation,
    }
    if trace.has_processes:
        policy["fork_touch"] = fork_touch
    result = TraceResult(
        kernel.mode,
        0,
        unsafe=kernel.unsafe,
        trace=name,
        command=list(trace.command),
        policy=policy,
    )
    with tempfile.TemporaryDirectory(prefix="pvemu-trace-") as scratch:
        replay = _Replay(
            kernel,
            trace,
            result,
            touch_limit=touch_limit,
            max_resident=max_resident,
            relocation=relocation,
            scratch=scratch,
            fork_touch=fork_touch,
            on_step=on_step,
        )
        await replay.run()
        if on_step is not None:
            on_step("verify")
        await replay.verify()
    result.audit = await kernel.audit()
    return result


async def run_trace_workload(
    kernel: Kernel,
    path: str | os.PathLike[str],
    *,
    touch_limit: int = DEFAULT_TOUCH_LIMIT,
    max_resident: int = DEFAULT_MAX_RESIDENT,
    relocation: str = "preserve",
    fork_touch: int = DEFAULT_FORK_TOUCH,
    on_step: Callable[[str], None] | None = None,
) -> WorkloadResult:
    """``pvemu guest --workload trace:FILE``: load the trace and replay it.

    Returns a :class:`TraceResult` (typed as its base class, so callers can
    keep one variable for every workload)."""
    trace = load_trace(path)
    return await replay_trace(
        kernel,
        trace,
        touch_limit=touch_limit,
        max_resident=max_resident,
        relocation=relocation,
        fork_touch=fork_touch,
        name=os.fspath(path),
        on_step=on_step,
    )
