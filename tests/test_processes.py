"""Processes in the guest kernel: one tree, VMAs and locks per process.

What a context switch, a spawn and an exit cost in every mode, that one
process never sees another's pages, that an exit gives every frame back,
and a property test of random spawn / switch / mmap / write / mprotect /
munmap / exit sequences over several processes and vCPUs with ``audit()``
clean after every step.
"""

from __future__ import annotations

import mmap
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from pvemu.guest.client import Domain
from pvemu.guest.kernel import Kernel, SegmentationFault, boot, kernel_for
from pvemu.guest.modes import MODE_NAMES
from pvemu.guest.process import IDLE_PID, INIT_PID, NoSuchProcess
from pvemu.hypervisor import Hypervisor
from pvemu.shared import abi
from tests.hvproc import HypervisorProcess, hypervisor_process
from tests.loopback import loopback_domain

RW = mmap.PROT_READ | mmap.PROT_WRITE
ANON = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
PAGE = 4096
PROT_NONE = 0
VA = 0x4000_0000
HV_MODES = [m for m in MODE_NAMES if m != "native"]
#: Frames the booted tree holds before any process runs: L4, L3, L2, L1 on a
#: PV domain, a bare L4 natively.
BOOT_TABLES = {"native": 1, "pv": 4}


async def make_kernel(mode: str, memory_mib: int = 16) -> AsyncIterator[Kernel]:
    if mode == "native":
        async with boot(mode="native", memory_mib=memory_mib) as kernel:
            yield kernel
        return
    hv = Hypervisor(memory_mib + 16)
    domain = await loopback_domain(hv, memory_mib=memory_mib, vcpus=2)
    yield kernel_for(domain, mode)


@pytest.fixture(params=MODE_NAMES)
async def kernel(request: pytest.FixtureRequest) -> AsyncIterator[Kernel]:
    async for k in make_kernel(request.param):
        yield k


async def traps(kernel: Kernel) -> int:
    """Traps so far, as the hypervisor counted them (checked against the guest's)."""
    stats = await kernel.stats()
    counted = int(stats["hypervisor"]["total"]["traps"])
    assert counted == stats["guest"]["total"]["traps"]
    return counted


async def cost(kernel: Kernel, step: Any) -> int:
    """The traps one awaited step costs."""
    before = await traps(kernel)
    await step
    return await traps(kernel) - before


# --- what each operation costs ---------------------------------------------------------------


async def test_switch_is_one_trap_and_a_switch_to_the_loaded_tree_is_free(kernel: Kernel) -> None:
    one = 0 if kernel.mode == "native" else 1
    pid = await kernel.spawn()
    assert kernel.process(pid).cpus == set()
    assert await cost(kernel, kernel.switch_to(1, pid)) == one
    assert kernel.loaded(1) == pid
    assert kernel.process(pid).cpus == {1}
    assert kernel.process(INIT_PID).cpus == {0}
    assert await cost(kernel, kernel.switch_to(1, pid)) == 0  # already loaded
    assert await cost(kernel, kernel.switch_to(0, pid)) == one
    assert await cost(kernel, kernel.switch_to(1, INIT_PID)) == one
    assert kernel.process(pid).cpus == {0}
    assert kernel.process(INIT_PID).cpus == {1}
    assert await kernel.audit() == []


@pytest.mark.parametrize("mode", ["xen", "batched", "naive"])
async def test_the_switch_is_one_multicall_entry_of_two_ops(mode: str) -> None:
    """``xen_write_cr3``: NEW_BASEPTR and NEW_USER_BASEPTR merge into one
    ``mmuext_op`` entry, flushed at the end of the switch."""
    async for kernel in make_kernel(mode):
        pid = await kernel.spawn()
        stats = kernel.backends[1].stats()["batching"]
        entries, ops = stats["entries"], stats["mmuext_ops"]
        await kernel.switch_to(1, pid)
        stats = kernel.backends[1].stats()["batching"]
        assert (stats["entries"] - entries, stats["mmuext_ops"] - ops) == (1, 2)
        assert stats["flushes"]["context_switch"] == 1


async def test_switch_loads_both_base_pointers() -> None:
    hv = Hypervisor(32)
    domain = await loopback_domain(hv, memory_mib=16, vcpus=2)
    kernel = kernel_for(domain, "trap")
    pid = await kernel.spawn()
    await kernel.switch_to(1, pid)
    dom = hv.domain(domain.domid)
    proc = kernel.process(pid)
    assert (dom.cr3[1], dom.user_cr3[1], dom.hw.cr3(1)) == (proc.l4, proc.user_l4, proc.l4)
    await kernel.switch_to(1, IDLE_PID)  # the kernel's own tree: no user base
    assert kernel._idle is not None
    assert (dom.cr3[1], dom.user_cr3[1]) == (kernel._idle.l4, None)
    assert await kernel.audit() == []


async def test_spawn_is_one_pin(kernel: Kernel) -> None:
    one = 0 if kernel.mode == "native" else 1
    before = kernel.free_frame_count()
    spawn = kernel.spawn()
    assert await cost(kernel, spawn) == one  # both L4s pinned in one mmuext_op
    assert kernel.free_frame_count() == before - 2
    assert sorted(kernel.processes) == [INIT_PID, INIT_PID + 1]
    assert await kernel.audit() == []


async def populate(kernel: Kernel, pid: int, vcpu: int) -> None:
    """Two regions in different L3 slots (so several tables are built and
    pinned), each page written with its own byte."""
    await kernel.switch_to(vcpu, pid)
    for base in (VA, VA + (1 << 39) + (1 << 30)):
        addr = await kernel.mmap(3 * PAGE, RW, ANON, addr=base, pid=pid)
        for page in range(3):
            await kernel.write(addr + page * PAGE, bytes([pid, page]), vcpu=vcpu)


async def test_exit_costs_a_switch_away_and_one_unpin(kernel: Kernel) -> None:
    """Loaded on one vCPU: that vCPU switches to the kernel's own tree (one
    trap; the first time, the tree is pinned in the same call), then the
    whole tree is unpinned in one batch (2·2 + 2 + 2 + 3 = 11 entries);
    freeing pages and tables is free."""
    one = 0 if kernel.mode == "native" else 1
    pid = await kernel.spawn()
    await populate(kernel, pid, vcpu=1)
    assert len(kernel.process(pid).pinned) == 2  # each region's PTE page: PIN_L1
    assert await cost(kernel, kernel.exit_process(pid)) == 2 * one
    assert kernel.loaded(1) == IDLE_PID
    with pytest.raises(NoSuchProcess):
        kernel.process(pid)
    assert await kernel.audit() == []
    # Not loaded anywhere: the unpin alone.
    other = await kernel.spawn()
    await populate(kernel, other, vcpu=1)
    await kernel.switch_to(1, INIT_PID)
    assert await cost(kernel, kernel.exit_process(other)) == one
    assert await kernel.audit() == []


@pytest.mark.parametrize("mode", HV_MODES)
async def test_exit_unpins_in_one_batch_the_l4s_first(mode: str) -> None:
    """``__xen_pgd_unpin``: one multicall whose first entry unpins both L4s
    (the hypervisor drops the tree's type references) before any table is
    remapped writable; after it every table frame takes plain stores."""
    async for kernel in make_kernel(mode):
        pid = await kernel.spawn()
        await populate(kernel, pid, vcpu=0)
        await kernel.switch_to(0, INIT_PID)
        domain = kernel.machine
        assert isinstance(domain, Domain)
        proc = kernel.process(pid)
        tables = [proc.l4, *proc.pinned]
        before = domain.vcpu_counters(0).hypercalls.copy()
        await kernel.exit_process(pid)
        after = domain.vcpu_counters(0).hypercalls
        assert after - before == {abi.HYPERVISOR_multicall: 1}
        for mfn in tables:
            assert await domain.kernel_write(mfn << 12, b"plain") == 0
        assert await kernel.audit() == []


@pytest.mark.parametrize(("mode", "hypercalls"), [("trap", 2), ("xen", 2), ("batched", 1)])
async def test_a_big_unpin(mode: str, hypercalls: int) -> None:
    """25 PTE pages under one PMD page: 2·25 + 1 + 1 + 3 = 55 entries, two
    batches of Linux's 32 slots (``trap`` keeps Linux's explicit batches
    too); ``batched`` has no limit."""
    async for kernel in make_kernel(mode):
        pid = await kernel.spawn()
        await kernel.switch_to(1, pid)
        for i in range(25):
            await kernel.mmap(PAGE, RW, ANON, addr=VA + i * (1 << 21), pid=pid)
            await kernel.write(VA + i * (1 << 21), b"x", vcpu=1)
        assert len(kernel.process(pid).pinned) == 25
        await kernel.switch_to(1, INIT_PID)
        assert await cost(kernel, kernel.exit_process(pid)) == hypercalls
        assert await kernel.audit() == []


async def test_exit_returns_every_frame(kernel: Kernel) -> None:
    await kernel.switch_to(1, IDLE_PID)  # build the kernel's own tree first
    await kernel.switch_to(1, INIT_PID)
    start = kernel.free_frame_count()
    pids = [await kernel.spawn() for _ in range(3)]
    for i, pid in enumerate(pids):
        await populate(kernel, pid, vcpu=i % 2)
    await kernel.mprotect(VA, PAGE, PROT_NONE, pid=pids[0])  # a PROT_NONE page too
    assert kernel.free_frame_count() < start
    for pid in pids:
        await kernel.exit_process(pid)
        assert await kernel.audit() == []
    assert kernel.free_frame_count() == start
    # The frames are reusable: a new process gets zeroed pages.
    pid = await kernel.spawn()
    await kernel.switch_to(0, pid)
    addr = await kernel.mmap(4 * PAGE, RW, ANON, addr=VA, pid=pid)
    assert await kernel.read(addr, 4 * PAGE, vcpu=0) == bytes(4 * PAGE)
    assert await kernel.audit() == []


async def test_exit_writes_back_a_shared_file_page(kernel: Kernel, tmp_path: Path) -> None:
    """A shared file page stays in the page cache (another process may map
    it); the exit writes its dirtiness back to the file."""
    path = tmp_path / "shared"
    path.write_bytes(bytes(2 * PAGE))
    a, b = await kernel.spawn(), await kernel.spawn()
    for pid, vcpu in ((a, 0), (b, 1)):
        await kernel.mmap(2 * PAGE, RW, mmap.MAP_SHARED, addr=VA, path=str(path), pid=pid)
        await kernel.switch_to(vcpu, pid)
    await kernel.write(VA, b"from a", vcpu=0)
    assert await kernel.read(VA, 6, vcpu=1) == b"from a"  # one page, two processes
    await kernel.exit_process(a)
    assert path.read_bytes()[:6] == b"from a"
    assert await kernel.read(VA, 6, vcpu=1) == b"from a"
    await kernel.write(VA + PAGE, b"from b", vcpu=1)
    await kernel.exit_process(b)
    assert path.read_bytes()[PAGE : PAGE + 6] == b"from b"
    assert await kernel.audit() == []


async def test_init_can_exit_too(kernel: Kernel) -> None:
    start = kernel.free_frame_count()
    addr = await kernel.mmap(2 * PAGE, RW, ANON, addr=VA)
    await kernel.write(addr, b"init", vcpu=1)
    await kernel.exit_process(INIT_PID)
    assert {kernel.loaded(v) for v in range(2)} == {IDLE_PID}
    assert await kernel.audit() == []
    boot_tables = BOOT_TABLES["native" if kernel.mode == "native" else "pv"]
    assert kernel.free_frame_count() == start + boot_tables - 1  # less the kernel's own L4
    with pytest.raises(NoSuchProcess):
        kernel.vmas()


# --- isolation --------------------------------------------------------------------------


async def test_processes_see_only_their_own_pages(kernel: Kernel) -> None:
    a, b = await kernel.spawn(), await kernel.spawn()
    for pid, vcpu in ((a, 0), (b, 1)):
        assert await kernel.mmap(2 * PAGE, RW, ANON, addr=VA, pid=pid) == VA
        await kernel.switch_to(vcpu, pid)
    await kernel.write(VA, b"A" * 10, vcpu=0)
    await kernel.write(VA, b"B" * 10, vcpu=1)
    assert await kernel.read(VA, 10, vcpu=0) == b"A" * 10
    assert await kernel.read(VA, 10, vcpu=1) == b"B" * 10
    # Swap vCPUs, then both on one vCPU in turn.
    await kernel.switch_to(0, b)
    await kernel.switch_to(1, a)
    assert await kernel.read(VA, 10, vcpu=0) == b"B" * 10
    assert await kernel.read(VA, 10, vcpu=1) == b"A" * 10
    for pid, data in ((a, b"A"), (b, b"B"), (a, b"A")):
        await kernel.switch_to(1, pid)
        assert await kernel.read(VA, 10, vcpu=1) == data * 10
        assert await kernel.read(VA + PAGE, 1, vcpu=1) == b"\0"
    # Process 1 has no mapping there at all.
    await kernel.switch_to(0, INIT_PID)
    with pytest.raises(SegmentationFault):
        await kernel.read(VA, 1, vcpu=0)
    # One process's mprotect and munmap leave the other alone.
    await kernel.mprotect(VA, PAGE, mmap.PROT_READ, pid=a)
    await kernel.switch_to(0, b)
    await kernel.write(VA, b"b", vcpu=0)
    await kernel.munmap(VA, 2 * PAGE, pid=b)
    assert await kernel.read(VA, 10, vcpu=1) == b"A" * 10
    with pytest.raises(SegmentationFault):
        await kernel.write(VA, b"a", vcpu=1)
    assert kernel.vmas(pid=b) == []
    assert kernel.vmas(pid=a) == [
        (VA, VA + PAGE, mmap.PROT_READ, ANON),
        (VA + PAGE, VA + 2 * PAGE, RW, ANON),
    ]
    assert await kernel.audit() == []


# --- random sequences ---------------------------------------------------------------------

SLOTS = (VA, VA + (1 << 21), VA + (1 << 30), 0x7F00_0000_0000)
SLOT_PAGES = 3
PROTS = (PROT_NONE, mmap.PROT_READ, RW)

ops = st.one_of(
    st.tuples(st.just("spawn")),
    st.tuples(st.just("switch"), st.integers(0, 1), st.integers(0, 7)),
    st.tuples(st.just("mmap"), st.integers(0, 7), st.integers(0, len(SLOTS) - 1)),
    st.tuples(
        st.just("write"),
        st.integers(0, 1),
        st.integers(0, len(SLOTS) - 1),
        st.integers(0, SLOT_PAGES - 1),
        st.integers(1, 255),
    ),
    st.tuples(
        st.just("read"),
        st.integers(0, 1),
        st.integers(0, len(SLOTS) - 1),
        st.integers(0, SLOT_PAGES - 1),
    ),
    st.tuples(
        st.just("mprotect"),
        st.integers(0, 7),
        st.integers(0, len(SLOTS) - 1),
        st.integers(0, SLOT_PAGES - 1),
        st.sampled_from(PROTS),
    ),
    st.tuples(st.just("munmap"), st.integers(0, 7), st.integers(0, len(SLOTS) - 1)),
    st.tuples(st.just("exit"), st.integers(0, 7)),
)


@dataclass
class Model:
    """What each live process should see: per slot, each page's protection and byte."""

    slots: dict[int, dict[int, tuple[list[int], list[int]]]] = field(default_factory=dict)

    def pick(self, index: int) -> int:
        pids = sorted(self.slots)
        return pids[index % len(pids)]


async def check_step(kernel: Kernel) -> None:
    assert await kernel.audit() == []
    await traps(kernel)  # the guest's and the hypervisor's counts agree


async def run_sequence(mode: str, steps: list[tuple[Any, ...]]) -> None:
    async for kernel in make_kernel(mode, memory_mib=8):
        start = kernel.free_frame_count()
        model = Model({INIT_PID: {}})
        for step in steps:
            await apply(kernel, model, step)
            await check_step(kernel)
        # Every process reads back what it wrote.
        for pid, slots in model.slots.items():
            await kernel.switch_to(0, pid)
            for slot, (prots, data) in slots.items():
                for page in range(SLOT_PAGES):
                    if prots[page] & mmap.PROT_READ:
                        va = SLOTS[slot] + page * PAGE
                        assert await kernel.read(va, 1, vcpu=0) == bytes([data[page]])
        for pid in sorted(model.slots):
            await kernel.exit_process(pid)
            await check_step(kernel)
        boot_tables = BOOT_TABLES["native" if mode == "native" else "pv"]
        assert kernel.free_frame_count() == start + boot_tables - 1  # less init_mm's L4


async def apply(kernel: Kernel, model: Model, step: tuple[Any, ...]) -> None:
    kind = step[0]
    if kind == "spawn":
        model.slots[await kernel.spawn()] = {}
        return
    if not model.slots:
        return
    if kind == "switch":
        _, vcpu, index = step
        pid = IDLE_PID if index == 7 else model.pick(index)
        await kernel.switch_to(vcpu, pid)
        assert kernel.loaded(vcpu) == pid
    elif kind == "mmap":
        pid = model.pick(step[1])
        slot = step[2]
        if slot not in model.slots[pid]:
            await kernel.mmap(SLOT_PAGES * PAGE, RW, ANON, addr=SLOTS[slot], pid=pid)
            model.slots[pid][slot] = ([RW] * SLOT_PAGES, [0] * SLOT_PAGES)
    elif kind in ("write", "read"):
        vcpu, slot, page = step[1:4]
        pid = kernel.loaded(vcpu)
        mapped = model.slots.get(pid, {}).get(slot)
        va = SLOTS[slot] + page * PAGE
        wanted = mmap.PROT_WRITE if kind == "write" else mmap.PROT_READ
        if mapped is None or not mapped[0][page] & wanted:
            access = (
                kernel.write(va, bytes([step[4]]), vcpu=vcpu)
                if kind == "write"
                else kernel.read(va, 1, vcpu=vcpu)
            )
            with pytest.raises(SegmentationFault):
                await access
        elif kind == "write":
            await kernel.write(va, bytes([step[4]]), vcpu=vcpu)
            mapped[1][page] = step[4]
        else:
            assert await kernel.read(va, 1, vcpu=vcpu) == bytes([mapped[1][page]])
    elif kind == "mprotect":
        pid = model.pick(step[1])
        slot, page, prot = step[2:5]
        mapped = model.slots[pid].get(slot)
        if mapped is not None:
            await kernel.mprotect(SLOTS[slot] + page * PAGE, PAGE, prot, pid=pid)
            mapped[0][page] = prot
    elif kind == "munmap":
        pid = model.pick(step[1])
        slot = step[2]
        if model.slots[pid].pop(slot, None) is not None:
            await kernel.munmap(SLOTS[slot], SLOT_PAGES * PAGE, pid=pid)
    elif kind == "exit":
        pid = model.pick(step[1])
        await kernel.exit_process(pid)
        del model.slots[pid]
        assert all(kernel.loaded(v) != pid for v in range(kernel.machine.nr_vcpus))


@pytest.mark.parametrize("mode", MODE_NAMES)
@settings(max_examples=30, phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(steps=st.lists(ops, min_size=6, max_size=30))
async def test_random_process_sequences(mode: str, steps: list[tuple[Any, ...]]) -> None:
    await run_sequence(mode, steps)


# --- over a real hypervisor process ---------------------------------------------------------


@pytest.fixture(scope="module")
def hvp() -> Iterator[HypervisorProcess]:
    with hypervisor_process(tag="procs") as process:
        yield process


async def test_processes_over_the_socket(hvp: HypervisorProcess) -> None:
    async with boot(hvp.socket_path, mode="xen", memory_mib=16, vcpus=2) as kernel:
        start = kernel.free_frame_count()
        a, b = await kernel.spawn(), await kernel.spawn()
        for pid, vcpu in ((a, 0), (b, 1)):
            await kernel.mmap(2 * PAGE, RW, ANON, addr=VA, pid=pid)
            assert await cost(kernel, kernel.switch_to(vcpu, pid)) == 1
            await kernel.write(VA, bytes([pid]) * 8, vcpu=vcpu)
        await kernel.switch_to(0, b)
        await kernel.switch_to(1, a)
        assert await kernel.read(VA, 8, vcpu=0) == bytes([b]) * 8
        assert await kernel.read(VA, 8, vcpu=1) == bytes([a]) * 8
        assert await kernel.audit() == []
        assert await cost(kernel, kernel.exit_process(a)) == 2  # vCPU 1 leaves, then the unpin
        assert await cost(kernel, kernel.exit_process(b)) == 2
        assert await kernel.audit() == []
        assert kernel.free_frame_count() == start - 1  # the kernel's own L4 stays
