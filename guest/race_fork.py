"""``pvemu race --workload fork``: fork while the parent's threads write.

A private anonymous region of process 1; user threads on vCPUs 1..W keep
storing increasing sequence numbers into their own pages (the mprotect
race's writers) while the kernel on vCPU 0 repeats: ``madvise(MADV_FREE)``
of the region, fork, run the child on vCPU 0 (it reads every page, writes
some and reads them back), exit the child, read every page of the parent,
then leave the writers a few milliseconds.

Why MADV_FREE: Linux installs every writable private anonymous PTE dirty
(``do_anonymous_page``, ``wp_page_reuse``, ``wp_page_copy``), so the
hardware has no Dirty bit to set in one and fork could lose none in any
mode. MADV_FREE cleans them and leaves them writable: the first store after
it sets D in hardware, maybe while fork write-protects that PTE. ``naive``
commits the write-protect as a value read before that store
(``MMU_NORMAL_PT_UPDATE``) and loses the D bit; the other modes keep it.

Oracles (docs/race.md, "fork"):

* ``lost_dirty``, ``stale_tlb_writes`` - the hardware model's, as in the
  mprotect race.
* ``lost_writes`` - a page older than it must be: the parent's, older than
  the last store that completed before the parent's read began (pages ever
  found short, ``lost_writes_parent``); the child's, older than the last
  store that completed before fork began, or not holding the child's own
  store (per fork and page, ``lost_writes_child``).
* ``leaked_writes`` - a value a process must not see: a child's in the
  parent; in the child, a parent store issued after fork returned (its PTE
  was write-protected and every TLB flushed by then, so it must have gone to
  the parent's copy).

A lost D bit loses no data here: pvemu has neither reclaim (which drops a
clean MADV_FREE page) nor swap (which drops a clean page whose swap copy is
current), so ``naive`` loses Dirty bits and no write, and the oracles say
exactly that.
"""

from __future__ import annotations

import mmap as mman
import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import trio

from pvemu.shared.x86 import PAGE_SIZE

from .kernel import Kernel
from .process import INIT_PID
from .race import RACE_ADDR, RW, Ledger, RaceResult, collect_verdicts

#: Set in every value a child stores: the writers' values never reach it.
CHILD_TAG: Final = 1 << 63
#: The child stores into one page in this many (a different set each fork).
CHILD_WRITE_STRIDE: Final = 8
_U64: Final = struct.Struct("<Q")


@dataclass
class ForkRaceResult(RaceResult):
    """:class:`RaceResult` for the fork race: no writeback, forks instead."""

    forks: int = 0
    child_writes: int = 0
    lost_writes_parent: int = 0
    lost_writes_child: int = 0
    leaked_writes: int = 0

    @property
    def lost_anything(self) -> bool:
        return super().lost_anything or bool(self.leaked_writes)

    def as_dict(self) -> dict[str, Any]:
        out = super().as_dict()
        for key in ("segfaults", "writebacks", "background_writebacks"):
            del out[key]
        out["workload"] = "fork"
        out.update(
            forks=self.forks,
            child_writes=self.child_writes,
            lost_writes_parent=self.lost_writes_parent,
            lost_writes_child=self.lost_writes_child,
            leaked_writes=self.leaked_writes,
        )
        return out


@dataclass
class ForkOracle:
    """The data oracles over what each process read (values only grow per
    page; a child's carry :data:`CHILD_TAG`)."""

    short_parent_pages: set[int] = field(default_factory=set)
    short_child_reads: int = 0
    leaked: int = 0

    def parent_read(
        self, values: Sequence[int], completed: Sequence[int], issued: Sequence[int]
    ) -> None:
        """The parent read ``values``; ``completed``: the last stores done
        before the read began; ``issued``: the last ones issued before it ended."""
        for page, (got, done, sent) in enumerate(zip(values, completed, issued, strict=True)):
            if got & CHILD_TAG or got > sent:
                self.leaked += 1
            elif got < done:
                self.short_parent_pages.add(page)

    def child_read(
        self,
        values: Sequence[int],
        before_fork: Sequence[int],
        issued_by_fork_end: Sequence[int],
        own: dict[int, int],
    ) -> None:
        """A child read ``values``: each page at least the last store completed
        before fork began, no store issued after fork returned, and its own
        stores (``own``: page -> value) exactly."""
        for page, got in enumerate(values):
            mine = own.get(page)
            if mine is not None:
                if got != mine:
                    self.short_child_reads += 1
            elif got & CHILD_TAG or got > issued_by_fork_end[page]:
                self.leaked += 1
            elif got < before_fork[page]:
                self.short_child_reads += 1

    def report(self, result: ForkRaceResult) -> None:
        result.lost_writes_parent = len(self.short_parent_pages)
        result.lost_writes_child = self.short_child_reads
        result.lost_writes = result.lost_writes_parent + result.lost_writes_child
        result.leaked_writes = self.leaked
        result.short_pages = set(self.short_parent_pages)


class _Rounds:
    """Per writer, the rounds it finished: a round stores once into each of
    its pages (a fresh random order each round), so one that began after a
    fork has made every one of its pages writable again (each store to a
    page the fork write-protected faults, and the fault makes it writable)."""

    def __init__(self, writers: int) -> None:
        self.done = [0] * writers
        self._changed = trio.Event()

    def finished(self, index: int) -> None:
        self.done[index] += 1
        self._changed.set()

    async def one_whole_round_since(self, mark: list[int]) -> None:
        """Wait until every writer has finished a round it began after
        ``mark`` (a copy of :attr:`done`): the one in progress then ends
        at +1, a whole one at +2."""
        while any(d < m + 2 for d, m in zip(self.done, mark, strict=True)):
            self._changed = trio.Event()
            await self._changed.wait()


async def _writer(
    kernel: Kernel,
    index: int,
    my_pages: list[int],
    ledger: Ledger,
    result: ForkRaceResult,
    rounds: _Rounds,
    rng: random.Random,
    stop: trio.Event,
) -> None:
    """A user thread of the parent on vCPU ``index + 1``: increasing values
    (as the mprotect race's writers) into each of its pages once per round."""
    vcpu = index + 1
    seq = 0
    order = list(my_pages)
    while not stop.is_set():
        rng.shuffle(order)
        for page in order:
            seq += 1
            value = seq * 64 + vcpu  # grows per page: one writer owns each page
            ledger.started[page] = value
            await kernel.write(RACE_ADDR + page * PAGE_SIZE, _U64.pack(value), vcpu=vcpu)
            ledger.last[page] = value
            result.writes += 1
        rounds.finished(index)
        await trio.lowlevel.checkpoint()  # a user thread gets preempted too


async def _read_all(kernel: Kernel, vcpu: int, pages: int) -> list[int]:
    """The first 8 bytes of every page, read by the process loaded on ``vcpu``."""
    reads = await kernel.run_user(vcpu, [(RACE_ADDR + p * PAGE_SIZE, "r", 8) for p in range(pages)])
    return [_U64.unpack(data)[0] for data in reads]


async def _run_child(
    kernel: Kernel,
    child: int,
    fork_number: int,
    before_fork: list[int],
    issued: list[int],
    oracle: ForkOracle,
    result: ForkRaceResult,
) -> None:
    """On vCPU 0: the child checks its snapshot, stores into some pages (each
    a copy-on-write fault while the parent's threads fault on theirs) and
    reads them back; then vCPU 0 goes back to the parent."""
    pages = result.pages
    await kernel.switch_to(0, child)
    oracle.child_read(await _read_all(kernel, 0, pages), before_fork, issued, {})
    own = {
        p: CHILD_TAG | fork_number
        for p in range(fork_number % CHILD_WRITE_STRIDE, pages, CHILD_WRITE_STRIDE)
    }
    writes = [(RACE_ADDR + p * PAGE_SIZE, "w", _U64.pack(v)) for p, v in own.items()]
    await kernel.run_user(0, writes)
    result.child_writes += len(writes)
    oracle.child_read(await _read_all(kernel, 0, pages), before_fork, issued, own)
    await kernel.switch_to(0, INIT_PID)


async def run_fork_race(
    kernel: Kernel,
    *,
    pages: int = 64,
    writers: int = 2,
    iterations: int = 40,
    seed: int = 1,
) -> ForkRaceResult:
    """Run the fork scenario on ``kernel``: vCPU 0 runs the kernel's loop and
    the children, 1..W the parent's writers (the guest needs W+1 vCPUs)."""
    if writers < 1 or writers + 1 > kernel.machine.nr_vcpus:
        raise ValueError(f"need 1..{kernel.machine.nr_vcpus - 1} writers for this guest")
    if pages < writers:
        raise ValueError("need at least one page per writer")
    result = ForkRaceResult(kernel.mode, pages, writers, iterations, seed, unsafe=kernel.unsafe)
    length = pages * PAGE_SIZE
    private = mman.MAP_PRIVATE | mman.MAP_ANONYMOUS
    if await kernel.mmap(length, RW, private, addr=RACE_ADDR) != RACE_ADDR:
        raise ValueError(f"the region did not land at {RACE_ADDR:#x}")
    await kernel.write(RACE_ADDR, bytes(length), vcpu=0)  # every page present (value 0)
    before = await kernel.stats()
    ledger = Ledger(pages)
    oracle = ForkOracle()
    stop = trio.Event()
    rounds = _Rounds(writers)
    async with trio.open_nursery() as nursery:
        for w in range(writers):
            mine = [p for p in range(pages) if p % writers == w]
            rng = random.Random(seed * 1000 + w)
            nursery.start_soon(_writer, kernel, w, mine, ledger, result, rounds, rng, stop)
        for n in range(iterations):
            # Every page is writable again (below): clean them all, then fork
            # at once. The writers' next stores set D in hardware while fork
            # write-protects the same PTEs.
            await kernel.madvise_free(RACE_ADDR, length)
            before_fork = ledger.expected()
            child = await kernel.fork(INIT_PID, vcpu=0)
            issued = ledger.issued()
            mark = list(rounds.done)
            result.forks += 1
            await _run_child(kernel, child, n, before_fork, issued, oracle, result)
            await kernel.exit_process(child, vcpu=0)
            completed = ledger.expected()
            values = await _read_all(kernel, 0, pages)
            oracle.parent_read(values, completed, ledger.issued())
            # Only a writable clean PTE gets its D from the hardware: wait
            # until the writers' faults have made every page writable again.
            await rounds.one_whole_round_since(mark)
        stop.set()
    completed = ledger.expected()  # the writers have stopped: all of them
    oracle.parent_read(await _read_all(kernel, 0, pages), completed, ledger.issued())
    oracle.report(result)
    await collect_verdicts(kernel, before, result)
    return result
