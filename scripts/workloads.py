"""The workloads ``pvemu run``, ``pvemu guest`` and ``pvemu bench`` run by
name, and what the command line needs to know of each: what ``--help``
says of its phases, how many progress steps a guest reports, which phases
its headline compares, and which function runs it in the guest.

The phases themselves come from the guest's modules (``guest.workload``,
``guest.proc_workloads``); tables and JSON take them from each result, in
the order the workload measured them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from pvemu.guest.mm_workloads import MAX_MM_PAGES, MM_PHASES, MM_WORKLOADS
from pvemu.guest.proc_workloads import DEFAULT_LOOPS as DEFAULT_LOOPS
from pvemu.guest.proc_workloads import PROCESS_PHASES, PROCESS_WORKLOADS
from pvemu.guest.workload import PHASES as MPROTECT_PHASES

if TYPE_CHECKING:
    from pvemu.guest.kernel import Kernel
    from pvemu.guest.workload import WorkloadResult

MPROTECT: Final = "mprotect"
FORKEXEC: Final = "forkexec"
#: What ``pvemu run --workload`` and ``pvemu bench --workload`` take by name
#: (``pvemu guest`` takes race and trace:FILE too).
RUN_WORKLOADS: Final = (MPROTECT, *PROCESS_WORKLOADS, *MM_WORKLOADS)
#: Every phase each workload reports, in the order it measures them.
PHASES: Final = {MPROTECT: MPROTECT_PHASES, **PROCESS_PHASES, **MM_PHASES}
#: The phases forkexec measures once per round (populate runs once, first).
FORKEXEC_ROUND: Final = PROCESS_PHASES[FORKEXEC][1:]


@dataclass(frozen=True)
class Headline:
    """What a workload's headline compares: the phases whose traps depend on
    the mode (populate and copy-on-write cost the same in every hypervisor
    mode), named as the sentence names them."""

    phases: tuple[str, ...]
    what: str
    #: "costs" for one operation, "cost" for several.
    verb: str


HEADLINES: Final = {
    MPROTECT: Headline(("protect_ro", "protect_rw"), "mprotect RO + RW", "cost"),
    "fork": Headline(("fork",), "fork", "costs"),
    "exec": Headline(("exec",), "exec", "costs"),
    FORKEXEC: Headline(("fork", "exec", "exit"), "fork + exec + exit", "cost"),
    "munmap": Headline(("munmap",), "munmap", "costs"),
    "dontneed": Headline(("dontneed",), "MADV_DONTNEED", "costs"),
    "mremap": Headline(("mremap_pmd", "mremap_ptes"), "two mremap moves", "cost"),
    "populate": Headline(
        ("map_populate", "populate_write"), "MAP_POPULATE + MADV_POPULATE_WRITE", "cost"
    ),
}

#: The epilog paragraph of ``pvemu run`` and ``pvemu guest``.
HELP: Final = f"""\
workloads (--workload), each measured phase by phase over a region of N
anonymous private pages (--pages):
  mprotect  populate (write every page: demand paging), protect_ro (one
            mprotect to read-only), protect_rw (one back to read-write)
  fork      populate; fork (copy the tree, write-protect every parent PTE,
            pin the child's tree); context_switch (vCPU 1 runs the child);
            cow_copy (the child writes every other page: a copy each);
            exit (the child's tree unpinned and freed); cow_reuse (the
            parent writes the other pages, now only its own)
  exec      context_switch (a new process on vCPU 1); populate; exec (a new
            image with one argument page, the old tree torn down); exit
  forkexec  a shell running commands: populate, then --loops rounds
            (default {DEFAULT_LOOPS}) of fork, context_switch, exec, exit and
            cow_reuse (the shell rewrites its pages); phases add up over rounds
  munmap    populate; munmap (zap_pte_range per PTE page, the PTE pages
            freed, one TLB flush)
  dontneed  populate; dontneed (one madvise(MADV_DONTNEED): the same zap,
            the tables kept); refault (every page written again)
  mremap    populate; mremap_pmd (moved to a 2 MiB-aligned address: each
            full 2 MiB as a whole PTE page, the rest PTE by PTE);
            mremap_ptes (moved back 7 pages off: every PTE one by one)
  populate  map_populate (mmap with MAP_POPULATE: no user fault);
            dontneed; populate_write (madvise(MADV_POPULATE_WRITE)); touch
            (every page written from user space: no fault left)
The process workloads need 2 vCPUs (syscalls on 0, user code on 1). Their
headline, and that of munmap, dontneed, mremap and populate (at most
{MAX_MM_PAGES:,} pages), compares the mode-dependent phases (fork; exec;
fork + exec + exit; munmap; dontneed; both moves; both populates) of the
safe mode with the fewest traps against xen, Linux on Xen PV."""


def progress_steps(workload: str, loops: int | None = None) -> int:
    """Steps one guest of ``workload`` counts on a progress bar: boot, each
    phase as it starts (forkexec's round phases once per round), the check."""
    if workload == FORKEXEC:
        rounds = DEFAULT_LOOPS if loops is None else loops
        return 1 + 1 + rounds * len(FORKEXEC_ROUND) + 1
    return 1 + len(PHASES[workload]) + 1


def effective_loops(workload: str, loops: int | None) -> int | None:
    """forkexec's rounds (its default unless given); None for the others."""
    if workload != FORKEXEC:
        return None
    return DEFAULT_LOOPS if loops is None else loops


async def run_workload(
    kernel: Kernel,
    workload: str,
    pages: int,
    *,
    loops: int | None = None,
    on_step: Callable[[str], None] | None = None,
) -> WorkloadResult:
    """Run one of :data:`RUN_WORKLOADS` in ``kernel``."""
    from pvemu.guest import mm_workloads, proc_workloads
    from pvemu.guest.workload import run_mprotect_workload

    if workload == MPROTECT:
        return await run_mprotect_workload(kernel, pages, on_step=on_step)
    if workload == "fork":
        return await proc_workloads.run_fork_workload(kernel, pages, on_step=on_step)
    if workload == "exec":
        return await proc_workloads.run_exec_workload(kernel, pages, on_step=on_step)
    if workload == FORKEXEC:
        rounds = effective_loops(workload, loops)
        assert rounds is not None
        return await proc_workloads.run_forkexec_workload(
            kernel, pages, loops=rounds, on_step=on_step
        )
    if workload in MM_WORKLOADS:
        run = getattr(mm_workloads, f"run_{workload}_workload")
        result: WorkloadResult = await run(kernel, pages, on_step=on_step)
        return result
    raise ValueError(f"unknown workload {workload!r}")
