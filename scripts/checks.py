"""Checks of a command line against pvemu's limits, made before any process starts.

A run that cannot succeed must fail at once, in one line that says what to
do, not after minutes of work or as a guest's traceback. Every limit here is
read from the code that enforces it (the wire protocol, the hypervisor's
defaults, Linux's multicall buffer); each check is a pure function of the
parsed values, raising :class:`~pvemu.scripts.errors.UserError` (exit 2).
The host's RAM is a parameter, so tests can pass any machine.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

from pvemu.guest.mm_workloads import MAX_MM_PAGES, MM_WORKLOADS
from pvemu.guest.modes import MODE_NAMES
from pvemu.guest.multicall import MMU_UPDATE_BYTES, MMUEXT_OP_BYTES
from pvemu.hypervisor.limits import ServerLimits
from pvemu.scripts.errors import UserError
from pvemu.shared import wire

MIB: Final = 1 << 20
#: 4 KiB frames (and guest pages) per MiB.
FRAMES_PER_MIB: Final = MIB // 4096

# --- limits ------------------------------------------------------------------------------

#: A domain's memory: Hello.memory_mib is 1 .. this (16 GiB).
MAX_DOMAIN_MIB: Final = wire.MAX_MEMORY_MIB
#: vCPUs of one domain: Hello.vcpus is 1 .. this.
MAX_VCPUS: Final = wire.MAX_VCPUS
#: vCPUs a race guest needs beside its writers: the kernel's loop and the
#: background flusher (``guest.race.run_race``).
RACE_OTHER_VCPUS: Final = 2
#: User threads of ``pvemu race``: the rest of a domain's vCPUs.
MAX_WRITERS: Final = MAX_VCPUS - RACE_OTHER_VCPUS
#: Machine frames are numbered in uint32 arrays (the free pool, the frame
#: table's slots): a hypervisor has at most 2**32 frames (16 TiB).
MAX_MACHINE_MIB: Final = (1 << 32) // FRAMES_PER_MIB
#: Host bytes the hypervisor spends per machine frame before any domain
#: exists (the frame table, 16 bytes, the free pool and the shuffle that
#: builds it; 33 bytes measured at the peak, rounded up).
BOOKKEEPING_BYTES_PER_FRAME: Final = 40
#: The largest entry the xen mode queues in its multicall buffer: an
#: ``mmuext_op`` (24 bytes; an ``mmu_update`` record takes 16). Linux's
#: ``a + n >= max_arg_bytes`` test needs one byte more for it to ever fit.
LARGEST_MC_ENTRY_BYTES: Final = max(MMUEXT_OP_BYTES, MMU_UPDATE_BYTES)
MIN_MC_BYTES: Final = LARGEST_MC_ENTRY_BYTES + 1
#: Connections each ``pvemu load`` guest holds (one per vCPU; two vCPUs),
#: and the two single-vCPU guests beside them (the probe, the big batch).
LOAD_CONNECTIONS_PER_GUEST: Final = 2
LOAD_OTHER_GUESTS: Final = 2
#: Load guests the hypervisor's connection limit (1024 by default) admits.
MAX_LOAD_GUESTS: Final = (
    ServerLimits().max_connections - LOAD_OTHER_GUESTS
) // LOAD_CONNECTIONS_PER_GUEST
#: Memory of the probe's and the big batch's domains in ``pvemu load``.
PROBE_MEMORY_MIB: Final = 4
BIGBATCH_MEMORY_MIB: Final = 8
#: Room the harnesses leave in the hypervisor beyond their domains.
HEADROOM_MIB: Final = 64
#: The smallest memory ``pvemu race`` has always given its hypervisor.
RACE_MIN_MEMORY_MIB: Final = 512


def memory_for(pages: int) -> int:
    """Guest memory for a region: the pages, their tables, and headroom."""
    return max(16, (pages * 4096 * 5 // 4) // MIB + 16)


def max_pages_for(memory_mib: int) -> int:
    """The largest region :func:`memory_for` fits in ``memory_mib``."""
    # memory_for(p) <= m  <=>  p * 5120 // MIB <= m - 16  <=>  p * 5120 < (m - 15) * MIB
    return max(0, ((memory_mib - 15) * MIB - 1) // 5120)


#: The largest ``--pages`` whose guest fits in one domain (about 12.8 GiB).
MAX_PAGES: Final = max_pages_for(MAX_DOMAIN_MIB)
#: The workload whose guest fills more than its region: fork's child copies
#: every other page on its first write (copy-on-write).
FORK: Final = "fork"
#: vCPUs the process workloads need: syscalls on vCPU 0, user code on vCPU 1.
PROCESS_VCPUS: Final = 2


#: The guest workload of ``pvemu race --workload fork``.
RACE_FORK: Final = "race-fork"


def workload_pages(workload: str, pages: int) -> int:
    """Pages of memory a workload's guest fills for a region of ``pages``:
    the region, for fork the child's copies of half of it, for the fork race
    a copy of every page (the writers' and the child's COW faults)."""
    if workload == RACE_FORK:
        return 2 * pages
    return pages + (pages + 1) // 2 if workload == FORK else pages


def guest_memory(workload: str, pages: int) -> int:
    """Guest memory in MiB for ``workload`` over ``pages``."""
    return memory_for(workload_pages(workload, pages))


def max_workload_pages(workload: str, memory_mib: int) -> int:
    """The largest region of ``workload`` whose guest fits in ``memory_mib``."""
    fits = max_pages_for(memory_mib)
    if workload in MM_WORKLOADS:  # regions stay below a neighbour in their 1 GiB
        return min(fits, MAX_MM_PAGES)
    if workload == RACE_FORK:
        return fits // 2
    if workload != FORK:
        return fits
    pages = fits * 2 // 3 + 1  # p + ceil(p/2) <= fits; at most one step too far
    while pages > 0 and workload_pages(workload, pages) > fits:
        pages -= 1
    return pages


def host_memory_mib() -> int:
    """This host's RAM in MiB."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // MIB


def max_machine_mib(host_mib: int) -> int:
    """The largest hypervisor memory a host with ``host_mib`` of RAM can
    emulate: the frame bookkeeping must fit in RAM, and frames in uint32."""
    by_ram = host_mib * MIB // (BOOKKEEPING_BYTES_PER_FRAME * FRAMES_PER_MIB)
    return min(MAX_MACHINE_MIB, by_ram)


# --- sizes and counts ----------------------------------------------------------------------


def _guest_words(workload: str) -> str:
    if workload == RACE_FORK:
        return " (room for 2 copies of each page)"
    return " (fork's child copies half the pages)" if workload == FORK else ""


def check_domain_pages(pages: int, option: str = "--pages", workload: str = "mprotect") -> None:
    """A guest region must fit in one domain (and, for the mm workloads, in
    the 1 GiB that holds the region, mremap's copy and the neighbour VMA)."""
    if workload in MM_WORKLOADS and pages > MAX_MM_PAGES:
        raise UserError(
            f"{option} {pages:,}: the {workload} workload keeps its region and mremap's "
            f"copy of it in one 1 GiB: give {option} {MAX_MM_PAGES:,} or fewer"
        )
    limit = max_workload_pages(workload, MAX_DOMAIN_MIB)
    if pages > limit:
        raise UserError(
            f"{option} {pages:,} needs a {guest_memory(workload, pages):,} MiB guest"
            f"{_guest_words(workload)}, more than a domain's {MAX_DOMAIN_MIB:,} MiB (16 GiB): "
            f"give {option} {limit:,} or fewer"
        )


def check_pages(
    pages: int, host_mib: int, option: str = "--pages", workload: str = "mprotect"
) -> None:
    """A guest region must fit in one domain, and the domain in the host."""
    check_domain_pages(pages, option, workload)
    need = guest_memory(workload, pages)
    if need > host_mib:
        raise UserError(
            f"{option} {pages:,} needs a {need:,} MiB guest{_guest_words(workload)}, more than "
            f"this host's {host_mib:,} MiB of RAM: give {option} "
            f"{max_workload_pages(workload, host_mib):,} or fewer"
        )


def check_guest_memory(memory_mib: int, option: str = "--memory-mib") -> None:
    """A guest's own memory is one domain's: at most 16 GiB."""
    if memory_mib > MAX_DOMAIN_MIB:
        raise UserError(
            f"{option} {memory_mib:,} is more than a domain may have: "
            f"give {option} {MAX_DOMAIN_MIB} (16 GiB) or less"
        )


def check_machine_memory(memory_mib: int, host_mib: int, option: str = "--memory-mib") -> None:
    """The hypervisor's memory must be one this host can emulate."""
    limit = max_machine_mib(host_mib)
    if memory_mib > limit:
        raise UserError(
            f"{option} {memory_mib:,} is more than this host can emulate: at most "
            f"{limit:,} MiB with {host_mib:,} MiB of RAM (the frame table costs "
            f"{BOOKKEEPING_BYTES_PER_FRAME} bytes a 4 KiB frame); give {option} {limit} or less"
        )


def check_enough_memory(given: int | None, need: int, what: str) -> None:
    """A hypervisor given ``--memory-mib`` must hold the domains it will serve."""
    if given is not None and given < need:
        raise UserError(
            f"not enough machine memory: {what} need {need:,} MiB and --memory-mib "
            f"gives {given:,}; give --memory-mib {need} or more"
        )


def check_vcpus(vcpus: int, option: str = "--vcpus") -> None:
    if vcpus > MAX_VCPUS:
        raise UserError(f"{option} {vcpus:,}: a domain has at most {MAX_VCPUS} vCPUs")


def check_process_vcpus(workload: str, vcpus: int, option: str = "--vcpus") -> None:
    """A process workload runs its syscalls on vCPU 0 and user code on vCPU 1."""
    if vcpus < PROCESS_VCPUS:
        raise UserError(
            f"{option} {vcpus}: the {workload} workload needs {PROCESS_VCPUS} vCPUs or more "
            f"(syscalls on vCPU 0, user code on vCPU 1); give {option} {PROCESS_VCPUS}"
        )


def check_loops(workload: str, loops: int | None) -> None:
    """``--loops`` counts forkexec's fork+exec+exit rounds; nothing else loops."""
    if loops is not None and workload != "forkexec":
        raise UserError(
            f"--loops counts the forkexec workload's rounds; drop it for --workload {workload}"
        )


def check_writers(writers: int, pages: int) -> None:
    """Each writer is a vCPU of the race guest and owns at least one page."""
    if writers > MAX_WRITERS:
        raise UserError(
            f"--writers {writers:,}: at most {MAX_WRITERS} (a domain's {MAX_VCPUS} vCPUs, "
            f"less the kernel loop's and the flusher's)"
        )
    if writers > pages:
        raise UserError(f"--writers {writers:,} need a page each: give --pages {writers} or more")


def check_guests(guests: int) -> None:
    if guests > MAX_LOAD_GUESTS:
        raise UserError(
            f"--guests {guests:,}: at most {MAX_LOAD_GUESTS} (each guest holds "
            f"{LOAD_CONNECTIONS_PER_GUEST} of the hypervisor's "
            f"{ServerLimits().max_connections} connections)"
        )


def check_mc_bytes(values: Iterable[int | None], option: str = "--mc-bytes") -> None:
    """Every multicall entry the xen mode queues must fit in the buffer."""
    small = sorted({v for v in values if v is not None and v < MIN_MC_BYTES})
    if small:
        raise UserError(
            f"{option} {small[0]}: the buffer must hold its largest entry "
            f"({LARGEST_MC_ENTRY_BYTES}-byte mmuext_op); give {MIN_MC_BYTES} or more"
        )


def check_modes(modes: Sequence[str], option: str = "--modes") -> None:
    unknown = [m for m in modes if m not in MODE_NAMES]
    if unknown or not modes:
        raise UserError(
            f"{option}: unknown mode(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(MODE_NAMES)}"
        )


def check_trace_file(path: str) -> None:
    if not Path(path).is_file():
        raise UserError(f"no trace file {path}")


# --- files and programs ------------------------------------------------------------------


def _probe_folder(folder: Path) -> str | None:
    """Why no file can be created in ``folder`` (None if one can): a real
    attempt, because access() says yes to root even on /proc."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


def output_file_problem(path: str) -> str | None:
    """Why this command could not write the file ``path`` (None if it can):
    its folder must exist and take files."""
    target = Path(path).absolute()
    if target.is_dir():
        return f"{path} is a folder; give a file name"
    folder = target.parent
    if not folder.is_dir():
        return f"no folder {folder}; create it first"
    why = _probe_folder(folder)
    return None if why is None else f"cannot write in {folder} ({why})"


def output_folder_problem(path: str) -> str | None:
    """Why this command could not create (if needed) and write in the folder
    ``path`` (None if it can): the nearest existing folder on its path must
    take new entries."""
    existing = Path(path).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    why = _probe_folder(existing)
    return None if why is None else f"cannot write in {existing} ({why})"


def check_output_file(path: str, option: str) -> None:
    problem = output_file_problem(path)
    if problem is not None:
        raise UserError(f"{option} {path}: {problem}")


def check_output_folder(path: str, option: str) -> None:
    problem = output_folder_problem(path)
    if problem is not None:
        raise UserError(f"{option} {path}: {problem}")


def check_program(name: str, what: str = "program") -> str:
    """The path of the program ``name`` runs as (searched on PATH unless it
    names a path), or a UserError."""
    if os.sep in name:
        if os.path.isfile(name) and os.access(name, os.X_OK):
            return name
        raise UserError(f"no such {what}: {name} (not an executable file)")
    found = shutil.which(name)
    if found is None:
        raise UserError(f"no such {what}: {name} (not found on PATH)")
    return found
