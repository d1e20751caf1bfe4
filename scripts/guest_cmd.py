"""``pvemu guest``: boot one guest against a running hypervisor and run one
workload (the canonical mprotect, a process workload, the race or a trace)
in one pv-ops mode."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Final

from pvemu.guest.modes import MODE_NAMES, UNSAFE_MODES
from pvemu.guest.proc_workloads import PROCESS_WORKLOADS
from pvemu.scripts import checks
from pvemu.scripts.argtypes import output_file, positive_int
from pvemu.scripts.errors import UserError
from pvemu.scripts.hypervisor_cmd import DEFAULT_SOCKET
from pvemu.scripts.report import add_format_options, output_format
from pvemu.scripts.workloads import DEFAULT_LOOPS, RUN_WORKLOADS, effective_loops
from pvemu.scripts.workloads import HELP as WORKLOAD_HELP

if TYPE_CHECKING:
    from pvemu.guest.machine import Machine
    from pvemu.guest.workload import WorkloadResult
    from pvemu.shared.timeline import Timeline

EPILOG = f"""\
modes: native (bare metal, no hypervisor), trap (unbatched traps), ptwr
(writable page tables), xen (Linux's multicall batching), batched (a whole PTE
page per hypercall) and naive (UNSAFE: commits without PRESERVE_AD and loses
A/D bits; only for showing the race).

{WORKLOAD_HELP}
Also: race, race-fork and race-munmap (pvemu race's scenarios) and
trace:FILE (replay a recorded program).

--timeline FILE records, as Chrome trace-event JSON, each trap's round trip
as this guest saw it (one track per vCPU) and the workload's phases; give the
hypervisor --timeline too to see its side of each trap (docs/timeline.md).

example (two terminals):
  pvemu hypervisor
  pvemu guest --mode xen --pages 4096 --timeline guest.json
"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--socket",
        metavar="PATH",
        default=DEFAULT_SOCKET,
        help="connect to the hypervisor running there; not used by mode native "
        f"(default {DEFAULT_SOCKET}, the hypervisor's default)",
    )
    parser.add_argument(
        "--timeline",
        metavar="FILE",
        type=output_file,
        help="write this guest's traps and phases there as trace-event JSON",
    )
    parser.add_argument(
        "--workload",
        type=_workload,
        default="mprotect",
        help=f"{', '.join(RUN_WORKLOADS)} (phases below; default mprotect), race, "
        "race-fork or race-munmap (pvemu race's scenarios: --workload mprotect, fork and "
        "munmap) or trace:FILE "
        "(replay a recorded program)",
    )
    parser.add_argument(
        "--loops",
        type=positive_int,
        default=None,
        metavar="N",
        help=f"forkexec only: fork+exec+exit rounds (default {DEFAULT_LOOPS})",
    )
    parser.add_argument(
        "--mode", choices=MODE_NAMES, default="xen", help="pv-ops mode (default xen)"
    )
    parser.add_argument(
        "--pages", type=positive_int, default=4096, help="region size (default 4096)"
    )
    parser.add_argument(
        "--vcpus",
        type=positive_int,
        default=2,
        help=f"vCPUs (default 2, at most {checks.MAX_VCPUS})",
    )
    parser.add_argument(
        "--memory-mib",
        type=positive_int,
        default=None,
        metavar="N",
        help=f"guest memory in MiB (default: enough for --pages; at most {checks.MAX_DOMAIN_MIB})",
    )
    add_format_options(parser)
    # pvemu run's progress bar: one line per workload step on this fd.
    parser.add_argument("--progress-fd", type=int, default=None, help=argparse.SUPPRESS)
    race = parser.add_argument_group("race workload (see pvemu race)")
    race.add_argument(
        "--writers",
        type=positive_int,
        default=2,
        help=f"user threads (default 2, at most {checks.MAX_WRITERS})",
    )
    race.add_argument(
        "--iterations", type=positive_int, default=40, help="RW/RO toggles (race), forks or unmaps"
    )
    race.add_argument("--seed", type=int, default=1, help="writers' random seed")
    buffer = parser.add_argument_group("multicall buffer (mode xen only)")
    buffer.add_argument("--mc-entries", type=positive_int, default=None, help="entries (Linux: 32)")
    buffer.add_argument(
        "--mc-bytes",
        type=positive_int,
        default=None,
        help=f"argument bytes (512; at least {checks.MIN_MC_BYTES})",
    )
    buffer.add_argument(
        "--mc-records", type=positive_int, default=None, help="cap on records per flush (none)"
    )


#: ``pvemu race --workload W`` runs each mode's guest with these.
RACE_WORKLOADS: Final = {"mprotect": "race", "fork": "race-fork", "munmap": "race-munmap"}
#: vCPUs a race guest needs beside its writers (the kernel's loop; the
#: mprotect race's background flusher too).
_RACE_OTHER_VCPUS: Final = {"race": checks.RACE_OTHER_VCPUS, "race-fork": 1, "race-munmap": 1}


def _workload(text: str) -> str:
    if text in (*RUN_WORKLOADS, *RACE_WORKLOADS.values()) or (
        text.startswith("trace:") and len(text) > len("trace:")
    ):
        return text
    names = ", ".join((*RUN_WORKLOADS, *RACE_WORKLOADS.values()))
    raise argparse.ArgumentTypeError(f"expected {names} or trace:FILE, got {text!r}")


def _is_process(workload: str) -> bool:
    return workload in PROCESS_WORKLOADS


def buffer_params(args: argparse.Namespace) -> dict[str, int]:
    """The xen multicall-buffer limits given on the command line."""
    params = {
        "max_entries": args.mc_entries,
        "max_arg_bytes": args.mc_bytes,
        "records_per_flush": args.mc_records,
    }
    return {k: v for k, v in params.items() if v is not None}


def check(args: argparse.Namespace, host_mib: int) -> None:
    """What would make this guest fail to start, before it connects."""
    checks.check_loops(args.workload, args.loops)
    checks.check_pages(args.pages, host_mib, workload=args.workload)
    checks.check_vcpus(args.vcpus)
    if _is_process(args.workload):
        checks.check_process_vcpus(args.workload, args.vcpus)
    if args.memory_mib is not None:
        checks.check_guest_memory(args.memory_mib)
    if args.workload in _RACE_OTHER_VCPUS:
        checks.check_writers(args.writers, args.pages)
    if args.workload.startswith("trace:"):
        checks.check_trace_file(args.workload[len("trace:") :])
    if args.mc_bytes is not None:
        checks.check_mc_bytes([args.mc_bytes])


def run(args: argparse.Namespace) -> int:
    import trio

    from pvemu.guest.client import HypervisorError
    from pvemu.guest.kernel import boot
    from pvemu.scripts.progress import phase_reporter
    from pvemu.scripts.workloads import run_workload
    from pvemu.shared.timeline import Timeline
    from pvemu.shared.trace import TraceError

    check(args, checks.host_memory_mib())
    params = buffer_params(args)
    if params and args.mode != "xen":
        raise UserError("--mc-* options apply to mode xen only")

    timeline = Timeline() if args.timeline else None
    on_step = phase_reporter(args.progress_fd)
    race = args.workload in _RACE_OTHER_VCPUS
    vcpus = max(args.vcpus, args.writers + _RACE_OTHER_VCPUS[args.workload]) if race else args.vcpus

    async def main() -> dict[str, object]:
        async with boot(
            args.socket,
            mode=args.mode,
            memory_mib=args.memory_mib or checks.guest_memory(args.workload, args.pages),
            vcpus=vcpus,
            **params,
        ) as kernel:
            if timeline is not None:
                _start_timeline(timeline, kernel.machine, args.mode)
            if race:
                from pvemu.guest.race import RaceResult, run_race
                from pvemu.guest.race_fork import run_fork_race
                from pvemu.guest.race_munmap import run_munmap_race

                sizes = {
                    "pages": args.pages,
                    "writers": args.writers,
                    "iterations": args.iterations,
                    "seed": args.seed,
                }
                outcome: RaceResult
                if args.workload == "race-fork":
                    outcome = await run_fork_race(kernel, **sizes)
                elif args.workload == "race-munmap":
                    outcome = await run_munmap_race(kernel, **sizes)
                else:
                    outcome = await run_race(kernel, **sizes)
                return outcome.as_dict()
            if args.workload.startswith("trace:"):
                from pvemu.guest.replay import run_trace_workload

                result = await run_trace_workload(
                    kernel, args.workload[len("trace:") :], on_step=on_step
                )
            else:
                result = await run_workload(
                    kernel, args.workload, args.pages, loops=args.loops, on_step=on_step
                )
                if timeline is not None:
                    _record_phases(timeline, kernel.machine, result)
        return {"workload": args.workload, **_loops_field(args), **result.as_dict()}

    try:
        result = trio.run(main)
    except BaseException as exc:
        failure = _guest_failure(exc, (OSError, HypervisorError, TraceError))
        if failure is None:
            raise
        print(f"pvemu guest: {failure}", file=sys.stderr)
        return 1
    finally:
        if timeline is not None:
            timeline.write(args.timeline)
    fmt = output_format(args)
    if fmt == "json":
        from pvemu.scripts.bench.documents import GUEST_SCHEMA
        from pvemu.scripts.bench.provenance import document

        config = {
            k: v
            for k, v in vars(args).items()
            if k not in ("run", "progress_fd", "json", "csv", "markdown", "wide")
        }
        print(json.dumps(document(GUEST_SCHEMA, config, result)))
    elif race:
        print(json.dumps(result, indent=2))
        return 0
    else:
        from pvemu.scripts.report import print_table

        loops = effective_loops(args.workload, args.loops)
        print_table(args.pages, [result], fmt, wide=args.wide, workload=args.workload, loops=loops)
        if args.mode in UNSAFE_MODES and fmt == "table":
            print(f"note: mode {args.mode} is UNSAFE (loses A/D bits)")
    return 0 if result["counts_agree"] and result["audit_clean"] else 3


def _loops_field(args: argparse.Namespace) -> dict[str, int]:
    """forkexec's rounds, for its JSON document."""
    loops = effective_loops(args.workload, args.loops)
    return {} if loops is None else {"loops": loops}


def _pid(machine: Machine) -> int:
    """The domain's id: the timeline's ``pid`` (a native guest has none)."""
    from pvemu.guest.client import Domain
    from pvemu.shared.timeline import NATIVE_PID

    return machine.domid if isinstance(machine, Domain) else NATIVE_PID


def _start_timeline(timeline: Timeline, machine: Machine, mode: str) -> None:
    """Name this guest's tracks and record its traps from now on."""
    from pvemu.guest.client import Domain
    from pvemu.shared.timeline import GUEST_TID

    pid = _pid(machine)
    name = f"dom{pid} {mode}" if isinstance(machine, Domain) else "native (no hypervisor)"
    timeline.name_process(pid, name, sort_index=pid)
    timeline.name_thread(pid, GUEST_TID, "workload phases", sort_index=-2)
    for vcpu in range(machine.nr_vcpus):
        timeline.name_thread(pid, vcpu, f"vCPU {vcpu}", sort_index=vcpu)
    if isinstance(machine, Domain):
        machine.timeline = timeline


def _record_phases(timeline: Timeline, machine: Machine, result: WorkloadResult) -> None:
    """One span per phase of the workload, with what it cost."""
    from pvemu.shared.timeline import GUEST_TID, PHASE

    pid = _pid(machine)
    for name, phase in result.phases.items():
        args = {**phase.counts, "guest_traps": phase.guest_traps}
        timeline.complete(name, PHASE, pid, GUEST_TID, phase.started_ns, phase.ended_ns, args)


def _guest_failure(
    exc: BaseException, kinds: tuple[type[BaseException], ...]
) -> BaseException | None:
    """The first expected failure behind ``exc``, also when several vCPU tasks
    of a nursery failed together (an exception group of only those kinds)."""
    if isinstance(exc, kinds):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        leaves = [_guest_failure(inner, kinds) for inner in exc.exceptions]
        if all(leaf is not None for leaf in leaves):
            return leaves[0]
    return None
