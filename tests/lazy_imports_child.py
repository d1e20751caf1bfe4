"""Run by tests/test_arrays.py in a fresh interpreter: every workload in
every mode, in-process, printing as JSON the modules each run imported after
its kernel booted (a first import inside a measured phase is timed as if it
were the hypervisor's or the guest's work)."""

from __future__ import annotations

import json
import sys

import trio

import pvemu.hypervisor.server
import pvemu.scripts.cli  # noqa: F401  (what the guest and hypervisor processes import first)
from pvemu.guest.kernel import Kernel, boot, kernel_for
from pvemu.guest.modes import MODE_NAMES
from pvemu.hypervisor import Hypervisor
from pvemu.scripts.workloads import RUN_WORKLOADS, run_workload
from tests.loopback import loopback_domain

PAGES = 40


async def run_one(kernel: Kernel, workload: str) -> list[str]:
    before = set(sys.modules)
    await run_workload(kernel, workload, PAGES, loops=1)
    return sorted(set(sys.modules) - before)


async def main() -> None:
    imported: dict[str, list[str]] = {}
    for workload in RUN_WORKLOADS:
        for mode in MODE_NAMES:
            if mode == "native":
                async with boot(mode="native", memory_mib=48) as kernel:
                    late = await run_one(kernel, workload)
            else:
                domain = await loopback_domain(Hypervisor(56), memory_mib=48, vcpus=2)
                late = await run_one(kernel_for(domain, mode), workload)
            if late:
                imported[f"{workload} {mode}"] = late
    print(json.dumps(imported))


trio.run(main)
