"""The ``pvemu`` command line: argparse with one subcommand per row of a table.

Adding a subcommand: put it in its own module with ``configure(parser)`` (adds
its arguments) and ``run(args) -> int`` (does the work, returns the exit
status), import the module here and add one :class:`Subcommand` row to
:data:`SUBCOMMANDS`. Keep heavy imports (trio, rich, matplotlib) inside ``run``
so that ``pvemu --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, NoReturn

from pvemu.scripts import (
    bench_cmd,
    completion_cmd,
    guest_cmd,
    hypervisor_cmd,
    load_cmd,
    race_cmd,
    run_cmd,
    trace_cmd,
)
from pvemu.scripts.error_path import DEBUG_ENV, exit_status, one_line
from pvemu.scripts.errors import EXIT_USAGE
from pvemu.shared import abi

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

DIST_NAME = "pvemu"
FALLBACK_VERSION = "0.1.0+unknown"

DESCRIPTION = """\
pvemu is a paravirtual hypervisor emulator for studying batched page-table
hypercalls, modelled on Xen's PV MMU interface. It reproduces the semantics of
mmu_update, mmuext_op, multicall and update_va_mapping so that guest batching
strategies can be compared by the traps they cost."""

EPILOG = """examples:
  pvemu info        list the hypercalls and feature flags pvemu implements
  pvemu --version   print the installed version
  eval "$(pvemu completion bash)"   tab completion in this shell
"""


@dataclass(frozen=True)
class Subcommand:
    """One ``pvemu <name>`` subcommand."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def package_version() -> str:
    """The installed distribution's version, or a marker when not installed."""
    try:
        return version(DIST_NAME)
    except PackageNotFoundError:
        return FALLBACK_VERSION


# --- pvemu info -------------------------------------------------------------------

#: Feature flags whose behaviour the hypervisor core implements: (name, bit, meaning).
IMPLEMENTED_FEATURES: tuple[tuple[str, int, str], ...] = (
    (
        "XENFEAT_mmu_pt_update_preserve_ad",
        abi.XENFEAT_mmu_pt_update_preserve_ad,
        "mmu_update honours MMU_PT_UPDATE_PRESERVE_AD",
    ),
    (
        "XENFEAT_pvemu_mmu_pt_xchg",
        abi.XENFEAT_pvemu_mmu_pt_xchg,
        "pvemu extension, not Xen: mmu_update command 4 (MMU_PT_XCHG_PVEMU) "
        "exchanges L1 entries and returns the old ones",
    ),
)


def _configure_info(parser: argparse.ArgumentParser) -> None:
    """``pvemu info [--json]``: the tables, or one document for tools."""
    parser.add_argument(
        "--json", action="store_true", help="one JSON document on stdout (with metadata)"
    )


def info_body() -> dict[str, object]:
    """What ``info --json`` reports besides the metadata block."""
    return {
        "pvemu_version": package_version(),
        "hypercalls": [
            {"nr": nr, "name": name} for nr, name in sorted(abi.HYPERCALL_NAMES.items())
        ],
        "implicit_hypercalls": [
            {"nr": nr, "name": name} for nr, name in sorted(abi.IMPLICIT_HYPERCALL_NAMES.items())
        ],
        "unknown_hypercall_rc": -abi.ENOSYS,
        "features": [
            {"bit": bit, "name": name, "meaning": meaning}
            for name, bit, meaning in IMPLEMENTED_FEATURES
        ],
    }


def _run_info(args: argparse.Namespace) -> int:
    if args.json:
        import json

        from pvemu.scripts.bench.documents import INFO_SCHEMA
        from pvemu.scripts.bench.provenance import document

        print(json.dumps(document(INFO_SCHEMA, {}, info_body())))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stdout)

    calls = Table(title="Hypercalls served")
    calls.add_column("nr", justify="right")
    calls.add_column("hypercall")
    for nr, name in sorted(abi.HYPERCALL_NAMES.items()):
        calls.add_row(str(nr), name)

    features = Table(title="Feature flags")
    features.add_column("bit", justify="right")
    features.add_column("flag")
    features.add_column("meaning")
    for name, bit, meaning in IMPLEMENTED_FEATURES:
        features.add_row(str(bit), name, meaning)

    console.print(f"pvemu {package_version()}: Xen PV MMU ABI implemented")
    console.print(calls)
    for nr, name in sorted(abi.IMPLICIT_HYPERCALL_NAMES.items()):
        console.print(
            f"Counted, not served: {name} ({nr}), the return to user space that "
            "a run_user with resume carries."
        )
    console.print(f"Any other hypercall number returns -ENOSYS ({-abi.ENOSYS}).")
    console.print(features)
    return 0


INFO = Subcommand(
    name="info",
    help="list the ABI numbers the emulator implements",
    configure=_configure_info,
    run=_run_info,
)

HYPERVISOR = Subcommand(
    name="hypervisor",
    help="serve the hypervisor on a Unix socket",
    configure=hypervisor_cmd.configure,
    run=hypervisor_cmd.run,
)

GUEST = Subcommand(
    name="guest",
    help="boot one guest against a running hypervisor and run a workload",
    configure=guest_cmd.configure,
    run=guest_cmd.run,
)

RUN = Subcommand(
    name="run",
    help="the main comparison: every pv-ops mode in real processes, side by side",
    configure=run_cmd.configure,
    run=run_cmd.run,
)

RACE = Subcommand(
    name="race",
    help="the A/D race of the seed patch: what each mode loses under concurrent writes",
    configure=race_cmd.configure,
    run=race_cmd.run,
)

BENCH = Subcommand(
    name="bench",
    help=bench_cmd.HELP,
    configure=bench_cmd.configure,
    run=bench_cmd.run,
)

TRACE = Subcommand(
    name="trace",
    help=trace_cmd.HELP,
    configure=trace_cmd.configure,
    run=trace_cmd.run,
)

LOAD = Subcommand(
    name="load",
    help="many guests, a latency probe and a million-record batch against one hypervisor",
    configure=load_cmd.configure,
    run=load_cmd.run,
)

COMPLETION = Subcommand(
    name="completion",
    help="print a shell completion script (bash, zsh, tcsh)",
    configure=completion_cmd.configure,
    run=completion_cmd.run,
)

#: Every subcommand, in the order ``pvemu --help`` lists them.
SUBCOMMANDS: tuple[Subcommand, ...] = (
    RUN,
    BENCH,
    RACE,
    TRACE,
    LOAD,
    HYPERVISOR,
    GUEST,
    INFO,
    COMPLETION,
)


# --- entry point ------------------------------------------------------------------

#: Where the parser notes the innermost (sub)command it parsed, so that an
#: error names it: ``pvemu bench compare: ...``. Removed before ``run``.
PROG_DEST = "_pvemu_prog"

DEBUG_HELP = f"on an error, print the traceback too (or set {DEBUG_ENV}=1)"


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line ``PROG: message`` (exit 2)
    instead of the usage block, and unrecognised arguments blamed on the
    subcommand that was given them."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {one_line(message)} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if not hasattr(parsed, PROG_DEST):  # the innermost parser returns first
            setattr(parsed, PROG_DEST, self.prog)
        return parsed, extras

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            prog = getattr(parsed, PROG_DEST, self.prog)
            message = f"unrecognized arguments: {' '.join(extras)}"
            print(f"{prog}: {message} (see '{prog} --help')", file=sys.stderr)
            raise SystemExit(EXIT_USAGE)
        return parsed


def build_parser(subcommands: Sequence[Subcommand] = SUBCOMMANDS) -> argparse.ArgumentParser:
    parser = Parser(
        prog="pvemu",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pvemu {package_version()}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(title="subcommands", dest="command", metavar="COMMAND")
    for command in subcommands:
        child = sub.add_parser(command.name, help=command.help, description=command.help)
        command.configure(child)
        # SUPPRESS: 'pvemu --debug run' is not undone by the subcommand's default.
        child.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP
        )
        child.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``pvemu``; returns the exit status instead of raising SystemExit.

    Every error ends here as one line on stderr (:mod:`pvemu.scripts.error_path`);
    SIGTERM interrupts as SIGINT does, and both exit 130 once children and
    temporary files are gone."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    debug = bool(vars(args).pop("debug", False))
    if debug:  # the children this command starts print their tracebacks too
        os.environ[DEBUG_ENV] = "1"
    prog = str(vars(args).pop(PROG_DEST, f"pvemu {args.command}"))
    run: Callable[[argparse.Namespace], int] = args.run
    return exit_status(prog, lambda: run(args), debug=debug)
