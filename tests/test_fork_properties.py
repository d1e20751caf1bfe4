"""Random fork / exit / exec / write / mprotect / munmap / madvise(MADV_DONTNEED,
MADV_POPULATE_READ/WRITE) / mlock / munlock / mmap(MAP_FIXED, MAP_POPULATE)
sequences over several processes, against a model of what each process must read, with
``audit()`` after every step; at the end every process exits and every
frame is back in the pool."""

from __future__ import annotations

import errno
import mmap
from collections.abc import Coroutine
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pvemu.guest.kernel import Kernel, SegmentationFault, boot, kernel_for
from pvemu.guest.pagetree import walk_user_tree
from pvemu.guest.process import INIT_PID
from pvemu.guest.vma_tree import MAP_FIXED, MAP_POPULATE
from pvemu.hypervisor import Hypervisor
from pvemu.shared.x86 import PAGE_SIZE
from tests.loopback import loopback_domain

#: 24 pages across a PTE-page boundary: 12 before it, 12 after.
PAGES = 24
BASE = 0x4000_0000 + (512 - 12) * PAGE_SIZE
RW = mmap.PROT_READ | mmap.PROT_WRITE

op = st.one_of(
    st.tuples(st.just("fork"), st.integers(0, 7)),
    st.tuples(st.just("exit"), st.integers(0, 7)),
    st.tuples(st.just("exec"), st.integers(0, 7)),
    st.tuples(st.just("write"), st.integers(0, 7), st.integers(0, PAGES - 1), st.integers(1, 255)),
    st.tuples(
        st.just("mprotect"),
        st.integers(0, 7),
        st.integers(0, PAGES - 1),
        st.integers(1, 8),
        st.sampled_from([mmap.PROT_READ, RW, 0]),
    ),
    st.tuples(st.just("munmap"), st.integers(0, 7), st.integers(0, PAGES - 1), st.integers(1, 12)),
    st.tuples(st.just("dontneed"), st.integers(0, 7), st.integers(0, PAGES - 1), st.integers(1, 8)),
    st.tuples(
        st.just("populate"),
        st.integers(0, 7),
        st.integers(0, PAGES - 1),
        st.integers(1, 12),
        st.booleans(),
    ),
    st.tuples(
        st.sampled_from(["mlock", "munlock"]),
        st.integers(0, 7),
        st.integers(0, PAGES - 1),
        st.integers(1, 12),
    ),
    st.tuples(
        st.just("fixed"),
        st.integers(0, 7),
        st.integers(0, PAGES - 1),
        st.integers(1, 12),
        st.booleans(),
    ),
)


class Model:
    """What each live process must read: page -> byte (0 for untouched),
    and its protections (page -> prot; absent: unmapped)."""

    def __init__(self) -> None:
        self.data: dict[int, dict[int, int]] = {INIT_PID: {}}
        self.prot: dict[int, dict[int, int]] = {INIT_PID: dict.fromkeys(range(PAGES), RW)}
        #: The pages under VM_LOCKED, per process.
        self.locked: dict[int, set[int]] = {INIT_PID: set()}

    def pick(self, index: int) -> int:
        pids = sorted(self.data)
        return pids[index % len(pids)]


async def run_ops(kernel: Kernel, ops: list[tuple[object, ...]]) -> None:
    start_free = kernel.free_frame_count()
    booted = 1 + len(walk_user_tree(kernel._read_table, kernel.process().l4))
    await kernel.mmap(PAGES * PAGE_SIZE, RW, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, addr=BASE)
    model = Model()
    for step in ops:
        kind = step[0]
        if not model.data:
            break
        pid = model.pick(int(step[1]))  # type: ignore[call-overload]
        if kind == "fork":
            child = await kernel.fork(pid)
            model.data[child] = dict(model.data[pid])
            model.prot[child] = dict(model.prot[pid])
            model.locked[child] = set()  # fork does not inherit memory locks
        elif kind == "exit":
            await kernel.exit_process(pid)
            del model.data[pid], model.prot[pid], model.locked[pid]
        elif kind == "exec":
            await kernel.switch_to(1, pid)
            await kernel.exec(pid, vcpu=1)
            model.data[pid], model.prot[pid], model.locked[pid] = {}, {}, set()
        elif kind == "write":
            _, _, page, value = step
            assert isinstance(page, int)
            assert isinstance(value, int)
            await kernel.switch_to(1, pid)
            try:
                await kernel.write(BASE + page * PAGE_SIZE, bytes([value]), vcpu=1)
            except SegmentationFault:
                assert model.prot[pid].get(page) != RW
            else:
                assert model.prot[pid].get(page) == RW
                model.data[pid][page] = value
        else:
            _, _, first, count, *rest = step
            assert isinstance(first, int)
            assert isinstance(count, int)
            count = min(count, PAGES - first)
            addr = BASE + first * PAGE_SIZE
            if kind == "mprotect":
                prot = rest[0]
                assert isinstance(prot, int)
                try:
                    await kernel.mprotect(addr, count * PAGE_SIZE, prot, pid=pid)
                except OSError as exc:
                    if exc.errno != errno.ENOMEM:  # a hole: pages before it changed
                        raise
                    for page in range(first, first + count):
                        if page not in model.prot[pid]:
                            break
                        model.prot[pid][page] = prot
                else:
                    for page in range(first, first + count):
                        model.prot[pid][page] = prot
            elif kind == "dontneed":
                # a hole is ENOMEM at the end; a locked VMA stops the walk (EINVAL)
                want = 0
                for page in range(first, first + count):
                    if page not in model.prot[pid]:
                        want = errno.ENOMEM
                    elif page in model.locked[pid]:
                        want = errno.EINVAL
                        break
                    else:
                        model.data[pid].pop(page, None)  # private anonymous: zero-fill next
                await expect(want, kernel.madvise_dontneed(addr, count * PAGE_SIZE, pid=pid))
            elif kind == "populate":
                write = bool(rest[0])
                need = RW if write else mmap.PROT_READ
                want = 0
                for page in range(first, first + count):
                    if page not in model.prot[pid]:
                        want = errno.ENOMEM
                        break
                    if model.prot[pid][page] & need != need:
                        want = errno.EINVAL
                        break
                call = kernel.madvise_populate(addr, count * PAGE_SIZE, write=write, pid=pid)
                await expect(want, call)
            elif kind in ("mlock", "munlock"):
                # a hole stops the flag change (ENOMEM); mlock then stops at PROT_NONE
                want = 0
                for page in range(first, first + count):
                    if page not in model.prot[pid]:
                        want = errno.ENOMEM
                        break
                    if kind == "mlock":
                        model.locked[pid].add(page)
                    else:
                        model.locked[pid].discard(page)
                pages = range(first, first + count)
                if kind == "mlock" and not want and any(model.prot[pid][p] == 0 for p in pages):
                    want = errno.ENOMEM
                if kind == "mlock":
                    call = kernel.mlock(addr, count * PAGE_SIZE, pid=pid)
                else:
                    call = kernel.munlock(addr, count * PAGE_SIZE, pid=pid)
                await expect(want, call)
            elif kind == "fixed":
                flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED
                flags |= MAP_POPULATE if rest[0] else 0
                assert await kernel.mmap(count * PAGE_SIZE, RW, flags, addr=addr, pid=pid) == addr
                for page in range(first, first + count):
                    model.prot[pid][page] = RW
                    model.data[pid].pop(page, None)
                    model.locked[pid].discard(page)
            else:
                await kernel.munmap(addr, count * PAGE_SIZE, pid=pid)
                for page in range(first, first + count):
                    model.prot[pid].pop(page, None)
                    model.data[pid].pop(page, None)
                    model.locked[pid].discard(page)
        assert await kernel.audit() == [], step
    for pid in sorted(model.data):
        readable = sorted(p for p, prot in model.prot[pid].items() if prot & mmap.PROT_READ)
        if readable:
            await kernel.switch_to(1, pid)
            reads = await kernel.run_user(1, [(BASE + p * PAGE_SIZE, "r", 1) for p in readable])
            assert reads == [bytes([model.data[pid].get(p, 0)]) for p in readable], pid
    for pid in sorted(model.data):
        await kernel.exit_process(pid)
    assert await kernel.audit() == []
    # Every frame is back, the booted tree's too, but the kernel's own tree
    # (one frame, built the first time a vCPU left a process).
    idle = 1 if kernel._idle is not None else 0
    assert kernel.free_frame_count() == start_free + booted - idle


async def expect(code: int, call: Coroutine[Any, Any, None]) -> None:
    """Run a system call that must fail with ``code`` (0: succeed)."""
    if not code:
        await call
        return
    with pytest.raises(OSError) as info:
        await call
    assert info.value.errno == code


SETTINGS = settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@SETTINGS
@given(ops=st.lists(op, min_size=1, max_size=14))
async def test_native_processes(ops: list[tuple[object, ...]]) -> None:
    async with boot(mode="native", memory_mib=32) as kernel:
        await run_ops(kernel, ops)


@pytest.mark.parametrize("mode", ["xen", "batched", "trap", "ptwr"])
@SETTINGS
@given(ops=st.lists(op, min_size=1, max_size=14))
async def test_pv_processes(mode: str, ops: list[tuple[object, ...]]) -> None:
    hv = Hypervisor(48)
    domain = await loopback_domain(hv, memory_mib=32, vcpus=2)
    await run_ops(kernel_for(domain, mode), ops)


async def _tree_after_fork(kernel: Kernel, writes: list[int], readonly: list[int]) -> list[int]:
    """Every user-half entry of the parent's and the child's trees after
    writing ``writes`` pages, reading the rest, making ``readonly`` pages
    read-only, and forking."""
    await kernel.mmap(PAGES * PAGE_SIZE, RW, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, addr=BASE)
    accesses: list[tuple[int, str, bytes | int]] = [
        (BASE + p * PAGE_SIZE, "w", b"w") if p in writes else (BASE + p * PAGE_SIZE, "r", 1)
        for p in range(PAGES)
    ]
    await kernel.run_user(1, accesses)
    for page in readonly:
        await kernel.mprotect(BASE + page * PAGE_SIZE, PAGE_SIZE, mmap.PROT_READ)
    child = await kernel.fork()
    entries: list[int] = []
    for pid in (INIT_PID, child):
        for page in walk_user_tree(kernel._read_table, kernel.process(pid).l4):
            entries.extend(np.frombuffer(kernel._read_table(page.mfn, 0, 512), "<u8").tolist())
    assert await kernel.audit() == []
    return entries


@pytest.mark.parametrize("mode", ["native", "batched", "naive"])
@SETTINGS
@given(
    writes=st.lists(st.integers(0, PAGES - 1), max_size=PAGES),
    readonly=st.lists(st.integers(0, PAGES - 1), max_size=4),
)
async def test_fork_range_form_equals_the_per_pte_loop(
    mode: str, writes: list[int], readonly: list[int]
) -> None:
    """``fork_copy_run`` (a PTE page's write-protects and child installs as
    arrays) leaves exactly the page tables the per-PTE reference loop
    (``Kernel(per_pte=True)``: one ``ptep_set_wrprotect`` and one
    ``set_pte_unpinned`` per PTE) leaves, parent and child alike."""
    trees = []
    for per_pte in (False, True):
        if mode == "native":
            async with boot(mode="native", memory_mib=32) as booted:
                kernel = Kernel(booted.machine, booted.backends, per_pte=per_pte)
                trees.append(await _tree_after_fork(kernel, writes, readonly))
        else:
            hv = Hypervisor(48)
            domain = await loopback_domain(hv, memory_mib=32, vcpus=2)
            base = kernel_for(domain, mode)
            kernel = Kernel(domain, base.backends, per_pte=per_pte)
            trees.append(await _tree_after_fork(kernel, writes, readonly))
    assert trees[0] == trees[1]


@pytest.mark.parametrize("mode", ["xen", "batched"])
async def test_lock_populate_and_map_fixed_sequence(mode: str) -> None:
    """One sequence through every new rule of the model: a write populate
    after fork (COW copies), mlock over PROT_NONE (ENOMEM), MADV_DONTNEED
    refused by the lock (EINVAL), munlock, the child unlocked, a populate
    into a hole (ENOMEM), MAP_FIXED | MAP_POPULATE over written pages."""
    ops: list[tuple[object, ...]] = [
        ("write", 0, 3, 7),
        ("write", 0, 13, 9),
        ("fork", 0),
        ("populate", 0, 0, 12, True),
        ("mprotect", 0, 20, 2, 0),
        ("mlock", 0, 10, 12),
        ("dontneed", 0, 8, 4),
        ("dontneed", 1, 8, 4),
        ("munlock", 0, 0, 24),
        ("munmap", 1, 5, 2),
        ("populate", 1, 0, 12, False),
        ("fixed", 0, 2, 12, True),
        ("write", 1, 13, 5),
    ]
    hv = Hypervisor(48)
    domain = await loopback_domain(hv, memory_mib=32, vcpus=2)
    kernel = kernel_for(domain, mode)
    await run_ops(kernel, ops)
    assert kernel.counters.cow_copies >= 2
    assert kernel.counters.populated > 0


@pytest.mark.parametrize("mode", ["native", "trap", "ptwr", "xen", "batched", "naive"])
async def test_mprotect_keeps_a_shared_page_copy_on_write(mode: str) -> None:
    """mprotect RO then RW after fork: a page the child still maps is not
    exclusive, so change_protection leaves it read-only (per-PTE loop and
    range form alike) and the parent's store copies it; the child keeps
    its byte."""
    if mode == "native":
        async with boot(mode="native", memory_mib=32) as native:
            await _mprotect_after_fork(native)
        return
    hv = Hypervisor(48)
    await _mprotect_after_fork(kernel_for(await loopback_domain(hv, memory_mib=32, vcpus=2), mode))


async def _mprotect_after_fork(kernel: Kernel) -> None:
    await kernel.mmap(PAGES * PAGE_SIZE, RW, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, addr=BASE)
    await kernel.write(BASE, b"a", vcpu=1)
    await kernel.write(BASE + 20 * PAGE_SIZE, b"c", vcpu=1)
    child = await kernel.fork()
    await kernel.mprotect(BASE, PAGES * PAGE_SIZE, mmap.PROT_READ)
    await kernel.mprotect(BASE, PAGES * PAGE_SIZE, RW)
    await kernel.write(BASE, b"b", vcpu=1)
    await kernel.write(BASE + 20 * PAGE_SIZE, b"d", vcpu=1)
    assert kernel.counters.cow_copies == 2
    await kernel.switch_to(1, child)
    assert await kernel.read(BASE, 1, vcpu=1) == b"a"
    assert await kernel.read(BASE + 20 * PAGE_SIZE, 1, vcpu=1) == b"c"
    assert await kernel.audit() == []
