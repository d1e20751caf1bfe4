"""``pvemu race --workload munmap``: unmap a shared file mapping while it is
being written.

A file of ``pages`` pages; user threads on vCPUs 1..W store into their own
pages of a ``MAP_SHARED`` mapping of it while the kernel on vCPU 0 zaps the
mapping under them. Each iteration: map the file at :data:`RACE_ADDR`, start
one round of the writers (each stores once into each of its pages, in a
fresh random order), and once part of the round has completed zap the
mapping while they go on: ``munmap``, or in odd iterations first
``madvise(MADV_DONTNEED)`` of the range, then ``munmap``. The iteration ends
when every writer has finished its round.

How a writer reacts: its first store after the zap cleared that PTE faults.
After munmap the fault is a SIGSEGV (no VMA): the writer stops for the
iteration, that store did not happen. After MADV_DONTNEED the fault maps the
page again (the VMA is still there) and the store goes through.

Why one store per page per round: the mapping is new each iteration, so a
page's one store faults (a write-notify fault installs its PTE writable and
clean) and, retried, walks the page tables and sets D. No store ever goes
through a cached TLB entry, so every store that completed went through a
present PTE, before the zap cleared it: its data must reach the file. That
makes the oracle exact with no guess about when a PTE was cleared.

Oracles (docs/race.md, "munmap"):

* ``lost_writes`` - after each iteration (the mapping gone, the writers
  stopped) the file on disk must hold, per page, at least the last store
  that completed (values only grow, one writer per page). A shared file
  page's Dirty bit goes to the page cache when its PTE is zapped and the page
  is written to the file; one whose D bit is lost is never written back.
  Counted once per lost store.
* ``lost_dirty``, ``stale_tlb_writes`` - the hardware model's, as in the
  mprotect race: a D bit set by hardware that vanished unseen; a store
  through a TLB entry the guest had flushed.

``naive`` zaps with ``MMU_NORMAL_PT_UPDATE`` records of 0 and takes the old
values from its plain read of the PTE page: a store between that read and
the hypercall (a writer retrying its faulted store into a PTE installed
clean) sets D, the clear overwrites it, the page stays clean and its data
never reaches the file.
"""

from __future__ import annotations

import mmap as mman
import os
import random
import struct
import tempfile
from dataclasses import dataclass, field
from typing import Any, Final

import trio

from pvemu.shared.x86 import PAGE_SIZE

from .kernel import Kernel, SegmentationFault
from .race import RACE_ADDR, RW, Ledger, RaceResult, collect_verdicts

_U64: Final = struct.Struct("<Q")


@dataclass
class MunmapRaceResult(RaceResult):
    """:class:`RaceResult` for the munmap race: zaps instead of writebacks."""

    munmaps: int = 0
    dontneeds: int = 0
    #: The lost stores as (page, value): each counted once.
    lost_stores: set[tuple[int, int]] = field(default_factory=set, repr=False)

    def as_dict(self) -> dict[str, Any]:
        out = super().as_dict()
        for key in ("writebacks", "background_writebacks"):
            del out[key]
        out["workload"] = "munmap"
        out.update(munmaps=self.munmaps, dontneeds=self.dontneeds)
        return out


def short_stores(on_disk: list[int], completed: list[int]) -> set[tuple[int, int]]:
    """The stores ``completed`` (per page, the last one) that the file
    contents ``on_disk`` lack, as (page, value)."""
    return {
        (page, want)
        for page, (got, want) in enumerate(zip(on_disk, completed, strict=True))
        if got < want
    }


def _file_values(path: str, pages: int) -> list[int]:
    with open(path, "rb") as f:
        data = f.read()
    return [_U64.unpack_from(data, p * PAGE_SIZE)[0] for p in range(pages)]


class _Round:
    """One iteration's round: how many stores completed, and which writers
    are done (their round finished, or ended by a SIGSEGV)."""

    def __init__(self, writers: int) -> None:
        self.started = trio.Event()
        self.stored = 0
        self._finished = 0
        self._writers = writers
        self._all_done = trio.Event()
        self._waiters: list[tuple[int, trio.Event]] = []

    def store_done(self) -> None:
        self.stored += 1
        for target, event in self._waiters:
            if self.stored >= target:
                event.set()

    def writer_done(self) -> None:
        self._finished += 1
        if self._finished == self._writers:
            self._all_done.set()
            for _, event in self._waiters:
                event.set()

    async def reached(self, stores: int) -> None:
        """Wait until ``stores`` stores of the round have completed (or every
        writer is done, whichever first)."""
        if self.stored >= stores or self._all_done.is_set():
            return
        event = trio.Event()
        self._waiters.append((stores, event))
        await event.wait()

    async def all_done(self) -> None:
        await self._all_done.wait()


async def _writer(
    kernel: Kernel,
    vcpu: int,
    mine: list[int],
    ledger: Ledger,
    result: MunmapRaceResult,
    rng: random.Random,
    rounds: list[_Round],
) -> None:
    """Writer on ``vcpu``: per round one store into each of its pages, values
    growing per page; a SIGSEGV (the mapping is gone) ends its round."""
    seq = 0
    for current in rounds:
        await current.started.wait()
        for page in rng.sample(mine, len(mine)):
            seq += 1
            value = seq * 64 + vcpu  # grows per page: one writer owns each page
            ledger.started[page] = value
            try:
                await kernel.write(RACE_ADDR + page * PAGE_SIZE, _U64.pack(value), vcpu=vcpu)
            except SegmentationFault:
                result.segfaults += 1  # unmapped under it: this store never happened
                break
            ledger.last[page] = value
            result.writes += 1
            current.store_done()
        current.writer_done()


async def run_munmap_race(
    kernel: Kernel,
    *,
    pages: int = 64,
    writers: int = 2,
    iterations: int = 40,
    seed: int = 1,
    directory: str | None = None,
) -> MunmapRaceResult:
    """Run the munmap scenario on ``kernel``: vCPU 0 runs the kernel's loop,
    1..W the writers (the guest needs W+1 vCPUs). The file is made in
    ``directory`` (default: the temporary directory) and removed at the end."""
    if writers < 1 or writers + 1 > kernel.machine.nr_vcpus:
        raise ValueError(f"need 1..{kernel.machine.nr_vcpus - 1} writers for this guest")
    if pages < writers:
        raise ValueError("need at least one page per writer")
    result = MunmapRaceResult(kernel.mode, pages, writers, iterations, seed, unsafe=kernel.unsafe)
    length = pages * PAGE_SIZE
    fd, path = tempfile.mkstemp(prefix="pvemu-race-", suffix=".bin", dir=directory)
    try:
        os.ftruncate(fd, length)
        os.close(fd)
        before = await kernel.stats()
        ledger = Ledger(pages)
        rounds = [_Round(writers) for _ in range(iterations)]
        async with trio.open_nursery() as nursery:
            for w in range(writers):
                mine = [p for p in range(pages) if p % writers == w]
                rng = random.Random(seed * 1000 + w)
                nursery.start_soon(_writer, kernel, w + 1, mine, ledger, result, rng, rounds)
            for n, current in enumerate(rounds):
                if (
                    await kernel.mmap(length, RW, mman.MAP_SHARED, addr=RACE_ADDR, path=path)
                    != RACE_ADDR
                ):
                    raise ValueError(f"the mapping did not land at {RACE_ADDR:#x}")
                current.started.set()
                if n % 2:
                    await current.reached(pages // 3)
                    await kernel.madvise_dontneed(RACE_ADDR, length)
                    result.dontneeds += 1
                    await current.reached(2 * pages // 3)
                else:
                    await current.reached(pages // 2)
                await kernel.munmap(RACE_ADDR, length)
                result.munmaps += 1
                await current.all_done()
                on_disk = await trio.to_thread.run_sync(_file_values, path, pages)
                result.lost_stores |= short_stores(on_disk, ledger.expected())
        result.lost_writes = len(result.lost_stores)
        result.short_pages = {page for page, _ in result.lost_stores}
        await collect_verdicts(kernel, before, result)
    finally:
        os.unlink(path)
    return result
