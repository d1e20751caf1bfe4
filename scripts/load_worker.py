"""One guest process of ``pvemu load``: a load guest, the latency probe, or the
guest that sends one enormous batch.

Run as ``python -m pvemu.scripts.load_worker ROLE --socket PATH ...``. The worker
prints JSON lines on stdout (``{"event": "ready"}`` once booted, then one
``{"event": "result", ...}``) and obeys lines on stdin (``go``, ``stop``; EOF
means stop). Timestamps are ``time.monotonic_ns()``, one clock for every
process on the machine, so the harness can line up probe samples with the big
batch.
"""

from __future__ import annotations

import argparse
import json
import mmap as mman
import os
import sys
import time
from typing import Any, Final

import trio

from pvemu.scripts.checks import BIGBATCH_MEMORY_MIB, PROBE_MEMORY_MIB
from pvemu.scripts.error_path import exit_status
from pvemu.shared import wire
from pvemu.shared.x86 import (
    _PAGE_PRESENT,
    _PAGE_RW,
    _PAGE_USER,
    PTE_MFN_MASK,
    maddr_of_entry,
    make_pte,
)

ROLES: Final = ("mprotect", "probe", "bigbatch")
PRIORITIES: Final = ("idle", "low", "normal")
USER_RW: Final = _PAGE_PRESENT | _PAGE_RW | _PAGE_USER
USER_RO: Final = _PAGE_PRESENT | _PAGE_USER
#: Entries of the boot L1 the probe and the big batch rewrite (0 is left alone).
FIRST_ENTRY: Final = 1
ENTRIES: Final = 500


def set_priority(priority: str) -> None:
    """Host scheduling of this process: ``idle`` runs only when nothing else
    wants the CPU and is preempted at once by anything that wakes."""
    if priority == "idle":
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    elif priority == "low":
        os.nice(19)


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


class Control:
    """The harness's commands on stdin, as trio events."""

    def __init__(self) -> None:
        self.go = trio.Event()
        self.stop = trio.Event()

    async def listen(self) -> None:
        stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        buffered = b""
        async with stream:
            while not self.stop.is_set():
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                buffered += chunk
                *lines, buffered = buffered.split(b"\n")
                for line in lines:
                    if line.strip() == b"go":
                        self.go.set()
                    elif line.strip() == b"stop":
                        self.stop.set()
        self.go.set()
        self.stop.set()


def boot_l1(domain: Any) -> int:
    """The MFN of the first L1 of the boot tree (maps VA 0 .. 2 MiB)."""
    mfn: int = domain.l4_mfn
    for _level in range(3):
        mfn = (domain.read_u64(maddr_of_entry(mfn, 0)) & PTE_MFN_MASK) >> 12
    return mfn


async def mprotect_guest(args: argparse.Namespace, control: Control) -> None:
    """Toggle a populated region RW <-> RO until told to stop."""
    from pvemu.guest.kernel import boot
    from pvemu.guest.workload import REGION_ADDR
    from pvemu.scripts.checks import memory_for

    length = args.pages * 4096
    rw = mman.PROT_READ | mman.PROT_WRITE
    async with boot(
        args.socket, mode=args.mode, memory_mib=memory_for(args.pages), vcpus=2
    ) as kernel:
        addr = await kernel.mmap(
            length, rw, mman.MAP_PRIVATE | mman.MAP_ANONYMOUS, addr=REGION_ADDR
        )
        await kernel.run_user(1, [(addr + i * 4096, "w", b"x") for i in range(args.pages)])
        emit("ready")
        before = (await kernel.stats())["hypervisor"]["total"]
        started = time.monotonic_ns()
        mprotects = 0
        while not control.stop.is_set():
            await kernel.mprotect(addr, length, mman.PROT_READ if mprotects % 2 == 0 else rw)
            mprotects += 1
        ended = time.monotonic_ns()
        after = (await kernel.stats())["hypervisor"]["total"]
        emit(
            "result",
            mprotects=mprotects,
            records=after.get("mmu_update_records", 0) - before.get("mmu_update_records", 0),
            hypercalls=after.get("hypercalls", 0) - before.get("hypercalls", 0),
            start_ns=started,
            end_ns=ended,
        )


async def probe_guest(args: argparse.Namespace, control: Control) -> None:
    """One-record mmu_updates at a steady pace: what a latency-sensitive guest
    sees while others load the hypervisor. Ends with a machine-wide audit."""
    from pvemu.guest.client import connect

    async with connect(args.socket, memory_mib=PROBE_MEMORY_MIB) as domain:
        l1 = boot_l1(domain)
        data = domain.alloc_frame()
        entry = maddr_of_entry(l1, FIRST_ENTRY)
        emit("ready")
        await control.go.wait()
        samples: list[tuple[int, int]] = []
        interval = args.interval_ms / 1000
        flip = 0
        while not control.stop.is_set():
            flags = USER_RW if flip else USER_RO
            started = time.monotonic_ns()
            rc, done = await domain.mmu_update([(entry, make_pte(data, flags))])
            samples.append((started, time.monotonic_ns() - started))
            if rc or done != 1:
                raise RuntimeError(f"probe mmu_update failed: rc={rc} done={done}")
            flip ^= 1
            await trio.sleep(interval)
        violations = await domain.audit()
        emit("result", samples=samples, audit=violations[:20])


def big_batch(l1: int, frames: list[int], records: int) -> list[tuple[int, int]]:
    """``records`` real PTE writes: passes over 500 entries of one L1, each
    pass mapping the frames the other way (read-only, then read-write)."""
    batch: list[tuple[int, int]] = []
    for i in range(records):
        slot = i % ENTRIES
        flags = USER_RO if (i // ENTRIES) % 2 == 0 else USER_RW
        batch.append(
            (maddr_of_entry(l1, FIRST_ENTRY + slot), make_pte(frames[slot % len(frames)], flags))
        )
    return batch


async def bigbatch_guest(args: argparse.Namespace, control: Control) -> None:
    """Send one mmu_update of ``--records`` records when told to."""
    from pvemu.guest.client import connect

    async with connect(args.socket, memory_mib=BIGBATCH_MEMORY_MIB) as domain:
        l1 = boot_l1(domain)
        frames = [domain.alloc_frame() for _ in range(64)]
        # Packed before "ready": the window the probe is judged in holds the
        # hypervisor's work, not this process's Python packing 1M records.
        blob = wire.pack_mmu_updates(big_batch(l1, frames, args.records))
        emit("ready")
        await control.go.wait()
        if control.stop.is_set():
            return
        started = time.monotonic_ns()
        rc, done = await domain.mmu_update(blob)
        ended = time.monotonic_ns()
        emit("result", rc=rc, done=done, records=args.records, start_ns=started, end_ns=ended)
        await control.stop.wait()


async def main_async(args: argparse.Namespace) -> None:
    control = Control()
    roles = {"mprotect": mprotect_guest, "probe": probe_guest, "bigbatch": bigbatch_guest}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(control.listen)
        await roles[args.role](args, control)
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("role", choices=ROLES)
    parser.add_argument("--socket", required=True, help="the hypervisor's socket")
    parser.add_argument("--mode", default="xen", help="pv-ops mode of a load guest")
    parser.add_argument("--pages", type=int, default=256, help="region of a load guest")
    parser.add_argument("--records", type=int, default=1_000_000, help="size of the big batch")
    parser.add_argument("--interval-ms", type=float, default=10.0, help="probe pacing")
    parser.add_argument("--priority", choices=PRIORITIES, default="normal", help="host scheduling")
    args = parser.parse_args(argv)

    def work() -> int:
        from pvemu.guest.client import HypervisorError
        from pvemu.scripts.error_path import leaves
        from pvemu.scripts.errors import EXIT_FAILURE, UserError

        set_priority(args.priority)
        try:
            trio.run(main_async, args)
        except Exception as exc:
            # The hypervisor refused or went away: the worker's one line says so.
            failures = leaves(exc)
            if all(isinstance(f, HypervisorError) for f in failures):
                raise UserError(str(failures[0]), EXIT_FAILURE) from exc
            raise
        return 0

    # One line on stderr on failure, which 'pvemu load' relays as this worker's error.
    return exit_status(f"pvemu load {args.role}", work)


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["PRIORITIES", "ROLES", "big_batch", "main", "set_priority"]
