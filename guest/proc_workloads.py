"""Process workloads: fork with copy-on-write, exec, and a shell's fork+exec loop.

Each is measured phase by phase like the mprotect workload
(:func:`~pvemu.guest.workload.measure`), over a region of N anonymous
private pages at the same 2 MiB-aligned address. The guest's syscalls run
on vCPU 0, user code on vCPU 1; which process runs where is the workload's
choice (pvemu has no scheduler). Data is checked: a child sees the parent's
pages as they were at fork and its own writes, the parent never sees the
child's writes, and ``audit()`` runs at the end.

* ``fork``: process 1 writes every page (``populate``), forks
  (``fork``); vCPU 1 switches to the child (``context_switch``), which
  writes every other page (``cow_copy``: the parent still maps them) and
  exits (``exit``); the parent then writes the pages the child did not
  (``cow_reuse``: it is their last mapper now).
* ``exec``: a new process runs on vCPU 1 (``context_switch``), writes every
  page (``populate``), execs (``exec``: one argument page, the old tree torn
  down) and exits (``exit``).
* ``forkexec``: process 1 writes every page, then ``loops`` times: forks,
  runs the child on vCPU 1, which execs and exits, and writes every page
  again (each fork left them read-only: ``cow_reuse``). Phases add up over
  the loops.
"""

from __future__ import annotations

import mmap as mman
from collections.abc import Callable
from typing import Final

from pvemu.shared.x86 import PAGE_SIZE

from .kernel import Kernel
from .process import INIT_PID
from .workload import REGION_ADDR, WorkloadError, WorkloadResult, measure

#: The workloads this module runs, by name (``pvemu run --workload``).
PROCESS_WORKLOADS: Final = ("fork", "exec", "forkexec")
#: Phases each one reports, in order.
PROCESS_PHASES: Final = {
    "fork": ("populate", "fork", "context_switch", "cow_copy", "exit", "cow_reuse"),
    "exec": ("context_switch", "populate", "exec", "exit"),
    "forkexec": ("populate", "fork", "context_switch", "exec", "exit", "cow_reuse"),
}
#: fork+exec iterations of ``forkexec`` unless told otherwise.
DEFAULT_LOOPS: Final = 4

_SYSCALL_VCPU: Final = 0
_USER_VCPU: Final = 1
_RW: Final = mman.PROT_READ | mman.PROT_WRITE
_PRIVATE_ANON: Final = mman.MAP_PRIVATE | mman.MAP_ANONYMOUS

Step = Callable[[str], None] | None


def _writes(pages: range, tag: int) -> list[tuple[int, str, bytes | int]]:
    return [(REGION_ADDR + i * PAGE_SIZE, "w", bytes([(i * 7 + tag) & 0xFF])) for i in pages]


async def _expect(kernel: Kernel, vcpu: int, expected: dict[int, int], who: str) -> None:
    """Read one byte of each page ``expected`` names on ``vcpu`` and compare."""
    order = sorted(expected)
    reads = await kernel.run_user(vcpu, [(REGION_ADDR + i * PAGE_SIZE, "r", 1) for i in order])
    for page, data in zip(order, reads, strict=True):
        if data != bytes([expected[page]]):
            raise WorkloadError(f"{who} read {data!r} at page {page}, expected {expected[page]}")


def _pattern(pages: range, tag: int) -> dict[int, int]:
    return {i: (i * 7 + tag) & 0xFF for i in pages}


def _check_size(kernel: Kernel, pages: int) -> None:
    if pages <= 0:
        raise ValueError("pages must be positive")
    if kernel.machine.nr_vcpus < 2:
        raise ValueError("process workloads need 2 vCPUs (syscalls on 0, user code on 1)")


class _Child:
    """The parent's latest child, and the steps a workload measures on it:
    forked on the syscall vCPU, run, exec'd and exited on the user vCPU."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.pid = 0

    async def fork(self) -> None:
        self.pid = await self.kernel.fork(INIT_PID, vcpu=_SYSCALL_VCPU)

    async def switch(self) -> None:
        await self.kernel.switch_to(_USER_VCPU, self.pid)

    async def exec(self) -> None:
        await self.kernel.exec(self.pid, vcpu=_USER_VCPU)

    async def exit(self) -> None:
        await self.kernel.exit_process(self.pid, vcpu=_USER_VCPU)


async def _map_region(kernel: Kernel, pages: int, pid: int) -> None:
    addr = await kernel.mmap(pages * PAGE_SIZE, _RW, _PRIVATE_ANON, addr=REGION_ADDR, pid=pid)
    if addr != REGION_ADDR:
        raise WorkloadError(f"region landed at {addr:#x}, not {REGION_ADDR:#x}")


async def run_fork_workload(kernel: Kernel, pages: int, *, on_step: Step = None) -> WorkloadResult:
    """fork, copy-on-write copies in the child, reuse in the parent."""
    _check_size(kernel, pages)
    result = WorkloadResult(kernel.mode, pages, unsafe=kernel.unsafe)
    await _map_region(kernel, pages, INIT_PID)
    everything, child_half = range(pages), range(0, pages, 2)
    rest = range(1, pages, 2)
    child = _Child(kernel)

    async def populate() -> None:
        await kernel.run_user(_USER_VCPU, _writes(everything, 1))

    async def cow_copy() -> None:
        await kernel.run_user(_USER_VCPU, _writes(child_half, 2))

    async def cow_reuse() -> None:
        await kernel.run_user(_SYSCALL_VCPU, _writes(rest, 3))

    await measure(kernel, result, "populate", populate, on_step)
    await measure(kernel, result, "fork", child.fork, on_step)
    await measure(kernel, result, "context_switch", child.switch, on_step)
    await measure(kernel, result, "cow_copy", cow_copy, on_step)
    if on_step is not None:
        on_step("check")
    seen_by_child = _pattern(everything, 1) | _pattern(child_half, 2)
    await _expect(kernel, _USER_VCPU, seen_by_child, "the child")
    await measure(kernel, result, "exit", child.exit, on_step)
    await measure(kernel, result, "cow_reuse", cow_reuse, on_step)
    await _expect(kernel, _SYSCALL_VCPU, _pattern(everything, 1) | _pattern(rest, 3), "the parent")
    result.audit = await kernel.audit()
    return result


async def run_exec_workload(kernel: Kernel, pages: int, *, on_step: Step = None) -> WorkloadResult:
    """A process of ``pages`` pages execs: its tree replaced and torn down."""
    _check_size(kernel, pages)
    result = WorkloadResult(kernel.mode, pages, unsafe=kernel.unsafe)
    pid = await kernel.spawn(vcpu=_SYSCALL_VCPU)
    await _map_region(kernel, pages, pid)

    async def switch() -> None:
        await kernel.switch_to(_USER_VCPU, pid)

    async def populate() -> None:
        await kernel.run_user(_USER_VCPU, _writes(range(pages), 1))

    async def execve() -> None:
        await kernel.exec(pid, vcpu=_USER_VCPU)

    async def exit_new_image() -> None:
        await kernel.exit_process(pid, vcpu=_USER_VCPU)

    await measure(kernel, result, "context_switch", switch, on_step)
    await measure(kernel, result, "populate", populate, on_step)
    await measure(kernel, result, "exec", execve, on_step)
    if on_step is not None:
        on_step("check")
    if kernel.vmas(pid=pid) == [] or kernel.process(pid).mm.find(REGION_ADDR) is not None:
        raise WorkloadError("exec kept the old address space")
    await measure(kernel, result, "exit", exit_new_image, on_step)
    result.audit = await kernel.audit()
    return result


async def run_forkexec_workload(
    kernel: Kernel, pages: int, *, loops: int = DEFAULT_LOOPS, on_step: Step = None
) -> WorkloadResult:
    """A shell of ``pages`` pages runs ``loops`` commands: fork, exec, exit."""
    _check_size(kernel, pages)
    if loops <= 0:
        raise ValueError("loops must be positive")
    result = WorkloadResult(kernel.mode, pages, unsafe=kernel.unsafe)
    await _map_region(kernel, pages, INIT_PID)
    everything = range(pages)
    child = _Child(kernel)

    async def populate() -> None:
        await kernel.run_user(_SYSCALL_VCPU, _writes(everything, 1))

    tag = 1
    await measure(kernel, result, "populate", populate, on_step)
    for _ in range(loops):
        tag += 1
        writes = _writes(everything, tag)

        async def rewrite(writes: list[tuple[int, str, bytes | int]] = writes) -> None:
            await kernel.run_user(_SYSCALL_VCPU, writes)

        await measure(kernel, result, "fork", child.fork, on_step)
        await measure(kernel, result, "context_switch", child.switch, on_step)
        await measure(kernel, result, "exec", child.exec, on_step)
        await measure(kernel, result, "exit", child.exit, on_step)
        await measure(kernel, result, "cow_reuse", rewrite, on_step)
    if on_step is not None:
        on_step("check")
    await _expect(kernel, _SYSCALL_VCPU, _pattern(everything, tag), "the shell")
    result.audit = await kernel.audit()
    return result


__all__ = [
    "DEFAULT_LOOPS",
    "PROCESS_PHASES",
    "PROCESS_WORKLOADS",
    "run_exec_workload",
    "run_fork_workload",
    "run_forkexec_workload",
]
