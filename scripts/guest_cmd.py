"""``pvemu guest``: boot one guest against a running hypervisor and run the
canonical mprotect workload in one pv-ops mode."""

from __future__ import annotations

import argparse
import json
import sys

from pvemu.guest.modes import MODE_NAMES, UNSAFE_MODES
from pvemu.scripts.argtypes import positive_int
from pvemu.scripts.report import add_format_options, output_format

EPILOG = """\
modes: native (bare metal, no hypervisor), trap (unbatched traps), ptwr
(writable page tables), xen (Linux's multicall batching), batched (a whole PTE
page per hypercall) and naive (UNSAFE: commits without PRESERVE_AD and loses
A/D bits; only for showing the race).

example (two terminals):
  pvemu hypervisor --socket /tmp/hv.sock
  pvemu guest --socket /tmp/hv.sock --mode xen --pages 4096
"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--socket", metavar="PATH", help="the hypervisor's socket (not for native)")
    parser.add_argument(
        "--workload",
        type=_workload,
        default="mprotect",
        help="mprotect (the canonical workload), race (pvemu race's scenario) or "
        "trace:FILE (replay a recorded program)",
    )
    parser.add_argument(
        "--mode", choices=MODE_NAMES, default="xen", help="pv-ops mode (default xen)"
    )
    parser.add_argument(
        "--pages", type=positive_int, default=4096, help="region size (default 4096)"
    )
    parser.add_argument("--vcpus", type=positive_int, default=2, help="vCPUs (default 2)")
    parser.add_argument("--memory-mib", type=positive_int, default=None, help="guest memory")
    add_format_options(parser)
    # pvemu run's progress bar: one line per workload step on this fd.
    parser.add_argument("--progress-fd", type=int, default=None, help=argparse.SUPPRESS)
    race = parser.add_argument_group("race workload (see pvemu race)")
    race.add_argument("--writers", type=positive_int, default=2, help="user threads (default 2)")
    race.add_argument("--iterations", type=positive_int, default=40, help="RW/RO toggles")
    race.add_argument("--seed", type=int, default=1, help="writers' random seed")
    buffer = parser.add_argument_group("multicall buffer (mode xen only)")
    buffer.add_argument("--mc-entries", type=positive_int, default=None, help="entries (Linux: 32)")
    buffer.add_argument("--mc-bytes", type=positive_int, default=None, help="argument bytes (512)")
    buffer.add_argument(
        "--mc-records", type=positive_int, default=None, help="cap on records per flush (none)"
    )


def _workload(text: str) -> str:
    if text in ("mprotect", "race") or (text.startswith("trace:") and len(text) > len("trace:")):
        return text
    raise argparse.ArgumentTypeError(f"expected mprotect or trace:FILE, got {text!r}")


def buffer_params(args: argparse.Namespace) -> dict[str, int]:
    """The xen multicall-buffer limits given on the command line."""
    params = {
        "max_entries": args.mc_entries,
        "max_arg_bytes": args.mc_bytes,
        "records_per_flush": args.mc_records,
    }
    return {k: v for k, v in params.items() if v is not None}


def memory_for(pages: int) -> int:
    """Guest memory for a region: the pages, their tables, and headroom."""
    return max(16, (pages * 4096 * 5 // 4) // (1 << 20) + 16)


def run(args: argparse.Namespace) -> int:
    import trio

    from pvemu.guest.client import HypervisorError
    from pvemu.guest.kernel import boot
    from pvemu.guest.workload import run_mprotect_workload

    if args.mode != "native" and not args.socket:
        print("pvemu guest: --socket is required for every mode but native", file=sys.stderr)
        return 2
    params = buffer_params(args)
    if params and args.mode != "xen":
        print("pvemu guest: --mc-* options apply to mode xen only", file=sys.stderr)
        return 2

    from pvemu.scripts.progress import phase_reporter

    on_step = phase_reporter(args.progress_fd)
    race = args.workload == "race"
    vcpus = max(args.vcpus, args.writers + 2) if race else args.vcpus

    async def main() -> dict[str, object]:
        async with boot(
            args.socket,
            mode=args.mode,
            memory_mib=args.memory_mib or memory_for(args.pages),
            vcpus=vcpus,
            **params,
        ) as kernel:
            if race:
                from pvemu.guest.race import run_race

                outcome = await run_race(
                    kernel,
                    pages=args.pages,
                    writers=args.writers,
                    iterations=args.iterations,
                    seed=args.seed,
                )
                return outcome.as_dict()
            if args.workload.startswith("trace:"):
                from pvemu.guest.replay import run_trace_workload

                result = await run_trace_workload(kernel, args.workload[len("trace:") :])
            else:
                result = await run_mprotect_workload(kernel, args.pages, on_step=on_step)
        return result.as_dict()

    try:
        result = trio.run(main)
    except BaseException as exc:
        failure = _guest_failure(exc, (OSError, HypervisorError))
        if failure is None:
            raise
        print(f"pvemu guest: {failure}", file=sys.stderr)
        return 1
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

        print_table(args.pages, [result], fmt, wide=args.wide)
        if args.mode in UNSAFE_MODES and fmt == "table":
            print(f"note: mode {args.mode} is UNSAFE (loses A/D bits)")
    return 0 if result["counts_agree"] and result["audit_clean"] else 3


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
