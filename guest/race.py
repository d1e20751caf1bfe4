"""The race the seed patch is about, run for real (``pvemu race``).

A shared file mapping; user threads on vCPUs 1..W keep writing sequence
numbers into their own pages while the kernel on vCPU 0 toggles the region
RW -> RO -> RW and writes it back. Hardware sets A/D in the real page tables
as the writes land, interleaved with the kernel's batches (the hypervisor
serves the writers between slices of a batch), so a commit that does not
preserve A/D (mode ``naive``) loses Dirty bits, and the page is then never
written back.

Oracles (docs/sources.md §3):

* ``lost_dirty`` - D bits set by hardware that vanished without the guest
  seeing them (counted where the page tables live).
* ``lost_writes`` - after each writeback (and the final msync), every page
  must hold on disk at least the last value whose store had completed before
  the writeback began (values only grow, one writer per page): msync's
  contract. ``lost_writes`` counts the pages ever found short.
A background flusher on its own vCPU (W+1) also writes the region back every
few milliseconds, concurrently with everything else, as Linux's writeback
threads do.

* ``stale_tlb_writes`` - stores through a stale TLB entry after the guest had
  flushed that page (a missed shootdown); stores in flight before the flush
  are legal and reported apart.
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

RW: Final = mman.PROT_READ | mman.PROT_WRITE
#: Where the shared file is mapped (2 MiB aligned).
RACE_ADDR: Final = 0x8000_0000
#: Stores a writer makes before looking at the stop flag again.
WRITES_PER_BATCH: Final = 16
#: How long the kernel leaves the region writable each iteration.
RW_WINDOW_S: Final = 0.004
#: Period of the background flusher.
FLUSHER_PERIOD_S: Final = 0.003


@dataclass
class RaceResult:
    mode: str
    pages: int
    writers: int
    iterations: int
    seed: int
    unsafe: bool = False
    writes: int = 0
    segfaults: int = 0
    writebacks: int = 0
    background_writebacks: int = 0
    lost_writes: int = 0
    lost_dirty: int = 0
    stale_tlb_writes: int = 0
    stale_tlb_writes_in_flight: int = 0
    page_faults: int = 0
    traps: int = 0
    counts_agree: bool = True
    audit: list[str] = field(default_factory=list)
    short_pages: set[int] = field(default_factory=set, repr=False)

    @property
    def lost_anything(self) -> bool:
        return bool(self.lost_writes or self.lost_dirty or self.stale_tlb_writes)

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "unsafe": self.unsafe,
            "pages": self.pages,
            "writers": self.writers,
            "iterations": self.iterations,
            "seed": self.seed,
            "writes": self.writes,
            "segfaults": self.segfaults,
            "writebacks": self.writebacks,
            "background_writebacks": self.background_writebacks,
            "lost_dirty": self.lost_dirty,
            "lost_writes": self.lost_writes,
            "stale_tlb_writes": self.stale_tlb_writes,
            "stale_tlb_writes_in_flight": self.stale_tlb_writes_in_flight,
            "page_faults": self.page_faults,
            "traps": self.traps,
            "counts_agree": self.counts_agree,
            "audit_clean": not self.audit,
            "audit": self.audit,
        }


class Ledger:
    """Per page, the last store that completed (what msync must make
    durable, what a fork's child must see at least) and the last one
    issued (a value no process may see before its store was issued)."""

    def __init__(self, pages: int) -> None:
        self.last = [0] * pages
        self.started = [0] * pages

    def expected(self) -> list[int]:
        return list(self.last)

    def issued(self) -> list[int]:
        return list(self.started)


def _file_values(path: str, pages: int) -> list[int]:
    with open(path, "rb") as f:
        data = f.read()
    return [struct.unpack_from("<Q", data, p * PAGE_SIZE)[0] for p in range(pages)]


async def run_writer(
    kernel: Kernel,
    vcpu: int,
    my_pages: list[int],
    ledger: Ledger,
    result: RaceResult,
    rng: random.Random,
    stop: trio.Event,
) -> None:
    seq = 0
    while not stop.is_set():
        batch = [rng.choice(my_pages) for _ in range(WRITES_PER_BATCH)]
        for page in batch:
            seq += 1
            value = seq * 64 + vcpu  # grows per page: one writer owns each page
            ledger.started[page] = value
            try:
                await kernel.write(
                    RACE_ADDR + page * PAGE_SIZE, struct.pack("<Q", value), vcpu=vcpu
                )
            except SegmentationFault:
                result.segfaults += 1  # read-only right now: try again later
                break
            ledger.last[page] = value
            result.writes += 1
        await trio.lowlevel.checkpoint()  # a user thread gets preempted too


async def _flusher(
    kernel: Kernel, vcpu: int, pages: int, result: RaceResult, stop: trio.Event
) -> None:
    """Periodic writeback (the kernel's flusher thread) on its own vCPU."""
    while not stop.is_set():
        await kernel.msync(RACE_ADDR, pages * PAGE_SIZE, vcpu=vcpu)
        result.background_writebacks += 1
        await trio.sleep(FLUSHER_PERIOD_S)


async def _writeback_and_check(
    kernel: Kernel, path: str, ledger: Ledger, result: RaceResult
) -> None:
    expected = ledger.expected()
    await kernel.msync(RACE_ADDR, result.pages * PAGE_SIZE)
    result.writebacks += 1
    on_disk = await trio.to_thread.run_sync(_file_values, path, result.pages)
    for page, (want, got) in enumerate(zip(expected, on_disk, strict=True)):
        if got < want:
            result.short_pages.add(page)
    result.lost_writes = len(result.short_pages)


async def run_race(
    kernel: Kernel,
    *,
    pages: int = 64,
    writers: int = 1,
    iterations: int = 40,
    seed: int = 1,
    directory: str | None = None,
) -> RaceResult:
    """Run the scenario on ``kernel``: vCPU 0 runs the kernel's loop, 1..W the
    writers, W+1 the background flusher (the guest needs W+2 vCPUs)."""
    if writers < 1 or writers + 2 > kernel.machine.nr_vcpus:
        raise ValueError(f"need 1..{kernel.machine.nr_vcpus - 2} writers for this guest")
    if pages < writers:
        raise ValueError("need at least one page per writer")
    result = RaceResult(kernel.mode, pages, writers, iterations, seed, unsafe=kernel.unsafe)
    fd, path = tempfile.mkstemp(prefix="pvemu-race-", suffix=".bin", dir=directory)
    try:
        os.ftruncate(fd, pages * PAGE_SIZE)
        os.close(fd)
        addr = await kernel.mmap(pages * PAGE_SIZE, RW, mman.MAP_SHARED, addr=RACE_ADDR, path=path)
        assert addr == RACE_ADDR
        before = await kernel.stats()
        ledger = Ledger(pages)
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            for w in range(writers):
                mine = [p for p in range(pages) if p % writers == w]
                rng = random.Random(seed * 1000 + w)
                nursery.start_soon(run_writer, kernel, w + 1, mine, ledger, result, rng, stop)
            nursery.start_soon(_flusher, kernel, writers + 1, pages, result, stop)
            for _ in range(iterations):
                await kernel.mprotect(RACE_ADDR, pages * PAGE_SIZE, mman.PROT_READ)
                await _writeback_and_check(kernel, path, ledger, result)
                await kernel.mprotect(RACE_ADDR, pages * PAGE_SIZE, RW)
                await trio.sleep(RW_WINDOW_S)  # let the writers run on a writable region
            stop.set()
        await _writeback_and_check(kernel, path, ledger, result)  # the final msync
        await collect_verdicts(kernel, before, result)
    finally:
        os.unlink(path)
    return result


async def collect_verdicts(kernel: Kernel, before: dict[str, Any], result: RaceResult) -> None:
    """The hardware oracles, the traps and faults since ``before`` (a
    ``stats()``), whether guest and hypervisor counted alike, the audit."""
    after = await kernel.stats()
    hardware = after["hypervisor"].get("hardware", {})
    result.lost_dirty = hardware.get("lost_dirty", 0)
    result.stale_tlb_writes = hardware.get("stale_tlb_writes", 0)
    result.stale_tlb_writes_in_flight = hardware.get("stale_tlb_writes_in_flight", 0)
    hyp, guest = after["hypervisor"]["total"], after["guest"]["total"]
    result.traps = hyp["traps"] - before["hypervisor"]["total"]["traps"]
    result.counts_agree = guest["traps"] == hyp["traps"]
    result.page_faults = after["kernel"]["page_faults"] - before["kernel"]["page_faults"]
    result.audit = await kernel.audit()
