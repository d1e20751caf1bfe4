"""``pvemu bench``: the benchmark harness.

``pvemu bench [run]`` sweeps modes x sizes x multicall-buffer limits x
workloads in real processes (one hypervisor process for the sweep, one guest
process per point per repeat), stores the run in SQLite and prints a table.
``pvemu bench compare`` diffs counts exactly against a baseline (the CI gate),
``pvemu bench plot`` draws the run, ``pvemu bench list`` lists stored runs.
Exit codes: 0 ok, 1 count regression, 2 usage error, 3 invalid run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from pvemu.guest.modes import MODE_NAMES, SAFE_MODES
from pvemu.scripts.argtypes import mode_list, positive_int
from pvemu.scripts.procs import HypervisorProcess, hypervisor_process
from pvemu.scripts.results import (
    BUFFER_PARAMS,
    DEFAULT_DB,
    EXIT_INVALID,
    EXIT_OK,
    EXIT_USAGE,
    Comparison,
    Point,
    ResultsError,
    Run,
    load_json_file,
)

if TYPE_CHECKING:
    from rich.table import Table

    from pvemu.scripts.costmodel import CostModel

#: The help line of the ``bench`` row in scripts/cli.py.
HELP: Final = "sweep modes x sizes x buffer limits, store, compare (CI gate) and plot"

DEFAULT_MODES: Final = SAFE_MODES
DEFAULT_PAGES: Final = (512, 4096)
DEFAULT_REPEAT: Final = 3
DEFAULT_VCPUS: Final = 2
DEFAULT_TIMEOUT_S: Final = 3600.0
DEFAULT_BASELINE: Final = Path("benchmarks") / "baseline.json"
MPROTECT: Final = "mprotect"
#: Packages whose versions each run records.
RECORDED_PACKAGES: Final = ("pvemu", "trio", "msgpack", "structlog", "rich", "matplotlib", "numpy")
#: Where the project's source lives (for the git commit of the measured code).
SOURCE_ROOT: Final = Path(__file__).resolve().parent.parent

EPILOG = f"""\
actions:
  run (default)  sweep and store; the table goes to stdout, progress to stderr
  compare        diff counts against a baseline file or a stored run (the CI gate)
  plot           PNG + SVG plots of a run
  list           the stored runs

A sweep is modes x pages x workloads; for mode xen also x every combination
of the --mc-* lists. Each point runs --repeat times in fresh guest processes
(rounds interleaved); counts come from the first repeat and must be equal in
every repeat, times are reported as the median and p10-p90 of the repeats.
A point is invalid if the guest's and the hypervisor's counts disagree, if
audit() is not clean, or if repeats disagree; an invalid run exits 3.

modes: {", ".join(MODE_NAMES)} (naive is UNSAFE)

examples:
  pvemu bench                                   # default sweep, stored in {DEFAULT_DB}
  pvemu bench --pages 512 --modes xen,batched --repeat 5
  pvemu bench --modes xen --mc-bytes 128,256,512,1024 --cost-model default
  pvemu bench --pages 65536 --modes xen,batched --repeat 1
  pvemu bench compare --baseline 3 --against latest
  pvemu bench compare --baseline {DEFAULT_BASELINE}
  pvemu bench plot --out .pvemu/plots
"""


class UsageError(Exception):
    """A bad combination of options: exit 2."""


# --- the sweep -------------------------------------------------------------------


@dataclass(frozen=True)
class Sweep:
    """What a run measures. Recorded in the run's config and in baselines."""

    modes: tuple[str, ...] = DEFAULT_MODES
    pages: tuple[int, ...] = DEFAULT_PAGES
    workloads: tuple[str, ...] = (MPROTECT,)
    #: Buffer limits for mode xen; ``None`` in a list means "the guest's
    #: default" (the point's key then omits that parameter).
    mc_entries: tuple[int | None, ...] = ()
    mc_bytes: tuple[int | None, ...] = ()
    mc_records: tuple[int | None, ...] = ()
    vcpus: int = DEFAULT_VCPUS

    def as_json(self) -> dict[str, Any]:
        return {
            "modes": list(self.modes),
            "pages": list(self.pages),
            "workloads": list(self.workloads),
            "mc_entries": list(self.mc_entries),
            "mc_bytes": list(self.mc_bytes),
            "mc_records": list(self.mc_records),
            "vcpus": self.vcpus,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Sweep:
        try:
            sweep = cls(
                modes=tuple(str(m) for m in doc["modes"]),
                pages=tuple(int(p) for p in doc["pages"]),
                workloads=tuple(str(w) for w in doc.get("workloads", [MPROTECT])),
                mc_entries=_optional_ints(doc.get("mc_entries", [])),
                mc_bytes=_optional_ints(doc.get("mc_bytes", [])),
                mc_records=_optional_ints(doc.get("mc_records", [])),
                vcpus=int(doc.get("vcpus", DEFAULT_VCPUS)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"malformed sweep {doc!r}: {exc!r}") from exc
        sweep.check()
        return sweep

    def check(self) -> None:
        unknown = [m for m in self.modes if m not in MODE_NAMES]
        if unknown or not self.modes:
            raise UsageError(f"unknown mode(s) {unknown}; choose from {', '.join(MODE_NAMES)}")
        limits = (*self.mc_entries, *self.mc_bytes, *self.mc_records)
        numbers = (*self.pages, *(n for n in limits if n is not None), self.vcpus)
        if not self.pages or any(n <= 0 for n in numbers):
            raise UsageError("pages, --mc-* values and vcpus must be positive")
        for workload in self.workloads:
            if workload != MPROTECT and not workload.startswith("trace:"):
                raise UsageError(f"unknown workload {workload!r}: mprotect or trace:FILE")
            if workload.startswith("trace:") and not Path(workload[6:]).is_file():
                raise UsageError(f"no trace file {workload[6:]!r}")

    def buffer_grid(self) -> list[dict[str, int]]:
        """Every combination of the given buffer limits (``[{}]`` if none)."""
        grid: list[dict[str, int]] = [{}]
        for name, values in (
            ("mc_entries", self.mc_entries),
            ("mc_bytes", self.mc_bytes),
            ("mc_records", self.mc_records),
        ):
            if values:
                grid = [
                    {**combo, name: value} if value is not None else dict(combo)
                    for combo in grid
                    for value in values
                ]
        return grid

    def plan(self) -> list[Point]:
        """The points, in run order. Buffer limits apply to mode xen only;
        trace workloads do not sweep pages (their key says ``pages=0``)."""
        points: dict[str, Point] = {}
        for workload in dict.fromkeys(self.workloads):
            for mode in dict.fromkeys(self.modes):
                sizes = self.pages if workload == MPROTECT else (0,)
                for pages in dict.fromkeys(sizes):
                    for params in self.buffer_grid() if mode == "xen" else [{}]:
                        point = Point(workload, mode, pages, dict(params))
                        points.setdefault(point.key, point)
        return list(points.values())

    @property
    def needs_hypervisor(self) -> bool:
        return any(m != "native" for m in self.modes)


# --- processes -------------------------------------------------------------------


def guest_command(
    point: Point,
    *,
    socket_path: str | None,
    vcpus: int,
    memory_pages: int,
    extra: Sequence[str] = (),
) -> list[str]:
    """The ``pvemu guest`` command line of one point."""
    pages = point.pages or memory_pages
    cmd = [
        sys.executable,
        "-m",
        "pvemu.scripts",
        "guest",
        "--mode",
        point.mode,
        "--pages",
        str(pages),
    ]
    cmd += ["--vcpus", str(vcpus), "--workload", point.workload, "--json"]
    if point.mode != "native":
        assert socket_path is not None
        cmd += ["--socket", socket_path]
    for name, value in sorted(point.params.items()):
        cmd += [BUFFER_PARAMS[name], str(value)]
    return [*cmd, *extra]


def run_guest(cmd: Sequence[str], timeout: float) -> tuple[dict[str, Any] | None, str]:
    """Run one guest process: (its JSON document, "") or (None, why it failed)."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return None, f"guest timed out after {timeout:g} s"
    if done.returncode in (0, 3) and done.stdout.strip():
        try:
            doc = json.loads(done.stdout)
        except json.JSONDecodeError:
            return None, "guest printed malformed JSON"
        if isinstance(doc, dict) and isinstance(doc.get("phases"), dict):
            return doc, ""
        return None, "guest printed an unexpected JSON document"
    lines = done.stderr.strip().splitlines()
    return None, f"guest exit {done.returncode}: {lines[-1] if lines else 'no output'}"


def record_repeat(point: Point, doc: dict[str, Any] | None, error: str) -> None:
    """Fold one repeat's guest document into ``point`` (or invalidate it)."""
    if doc is None:
        point.invalidate(error)
        return
    if not doc.get("counts_agree"):
        point.invalidate("guest- and hypervisor-side counts disagree")
    if not doc.get("audit_clean"):
        audit = doc.get("audit") or ["?"]
        point.invalidate(f"audit() not clean: {audit[0]}")
    trace = doc.get("trace")
    if isinstance(trace, dict) and not trace.get("replay_clean", True):
        point.invalidate(f"trace replay hit {trace.get('errors', '?')} syscall error(s)")
    counts: dict[str, dict[str, int]] = {}
    for phase, values in doc["phases"].items():
        counts[phase] = {
            k: v
            for k, v in values.items()
            if k != "wall_s" and isinstance(v, int) and not isinstance(v, bool)
        }
        wall = values.get("wall_s")
        if isinstance(wall, int | float):
            point.samples.setdefault(phase, []).append(float(wall))
    if not point.counts:
        point.counts = counts
        point.unsafe = bool(doc.get("unsafe", False))
    elif counts != point.counts:
        changed = next(
            (
                p
                for p in dict.fromkeys([*counts, *point.counts])
                if counts.get(p) != point.counts.get(p)
            ),
            "?",
        )
        point.invalidate(f"counts differ between repeats (phase {changed})")


@dataclass
class SweepOptions:
    repeat: int = DEFAULT_REPEAT
    timeout: float = DEFAULT_TIMEOUT_S
    #: mode -> extra guest arguments that do not change the point key.
    inject: dict[str, list[str]] = field(default_factory=dict)
    progress: bool = True


def execute(sweep: Sweep, options: SweepOptions) -> list[Point]:
    """Run every point ``options.repeat`` times, in interleaved rounds."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from pvemu.scripts.guest_cmd import memory_for

    points = sweep.plan()
    max_pages = max(sweep.pages)
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not options.progress,
    )
    with contextlib.ExitStack() as stack:
        tmpdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="pvemu-bench-", dir="/tmp"))
        hv: HypervisorProcess | None = None
        if sweep.needs_hypervisor:
            memory = memory_for(max_pages) * 2 + 64
            hv = stack.enter_context(hypervisor_process(Path(tmpdir), memory))
        with progress:
            task = progress.add_task("sweep", total=len(points) * options.repeat)
            for round_ in range(options.repeat):
                for point in points:
                    progress.update(
                        task, description=f"{point.key} [{round_ + 1}/{options.repeat}]"
                    )
                    if point.valid:
                        _measure(point, hv, sweep, max_pages, options)
                    progress.advance(task)
            progress.update(task, description="sweep done")
    return points


def _measure(
    point: Point, hv: HypervisorProcess | None, sweep: Sweep, max_pages: int, options: SweepOptions
) -> None:
    cmd = guest_command(
        point,
        socket_path=hv.socket_path if hv is not None else None,
        vcpus=sweep.vcpus,
        memory_pages=max_pages,
        extra=options.inject.get(point.mode, []),
    )
    doc, error = run_guest(cmd, options.timeout)
    if doc is None and hv is not None and not hv.alive():
        error = f"{error}; the hypervisor exited ({hv.log_tail() or 'no log'})"
    record_repeat(point, doc, error)


# --- metadata --------------------------------------------------------------------


def git_state(root: Path = SOURCE_ROOT) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the source tree. The commit is read from ``.git``
    directly; dirtiness asks ``git status`` without taking the index lock.
    Either is None when unknown (not a checkout, no git)."""
    return _git_head(root), _git_dirty(root)


def _git_dir(root: Path) -> Path | None:
    dot = root / ".git"
    if dot.is_dir():
        return dot
    if dot.is_file():
        text = dot.read_text().strip()
        if text.startswith("gitdir:"):
            return (root / text[len("gitdir:") :].strip()).resolve()
    return None


def _git_head(root: Path) -> str | None:
    gitdir = _git_dir(root)
    if gitdir is None:
        return None
    try:
        head = (gitdir / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head or None
        ref = head[len("ref:") :].strip()
        common = gitdir
        commondir = gitdir / "commondir"
        if commondir.is_file():
            common = (gitdir / commondir.read_text().strip()).resolve()
        for base in (gitdir, common):
            if (base / ref).is_file():
                return (base / ref).read_text().strip()
        packed = common / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                sha, _, name = line.partition(" ")
                if name == ref:
                    return sha
    except OSError:
        return None
    return None


def _git_dirty(root: Path) -> bool | None:
    if os.environ.get("PVEMU_BENCH_NO_GIT") or _git_dir(root) is None:
        return None
    cmd = ["git", "--no-optional-locks", "-C", str(root), "status", "--porcelain"]
    cmd += ["--untracked-files=no"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return bool(done.stdout.strip()) if done.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for name in RECORDED_PACKAGES:
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def new_run(config: dict[str, Any], points: list[Point]) -> Run:
    sha, dirty = git_state()
    return Run(
        created_utc=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        git_sha=sha,
        git_dirty=dirty,
        host=platform.node(),
        python=f"{platform.python_implementation()} {platform.python_version()}",
        packages=package_versions(),
        config={
            **config,
            "machine": {
                "cpus": os.cpu_count(),
                "cpu_model": _cpu_model(),
                "platform": platform.platform(),
            },
        },
        points=points,
    )


# --- argument parsing ------------------------------------------------------------


def _optional_ints(values: Sequence[Any]) -> tuple[int | None, ...]:
    return tuple(None if v is None else int(v) for v in values)


def _limit_list(text: str) -> tuple[int | None, ...]:
    """Comma-separated positive integers; ``default`` means the guest's own."""
    items = [v.strip() for v in text.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list of integers")
    return tuple(None if v == "default" else positive_int(v) for v in items)


def _int_list(text: str) -> tuple[int, ...]:
    values = tuple(positive_int(v.strip()) for v in text.split(",") if v.strip())
    if not values:
        raise argparse.ArgumentTypeError("expected a comma-separated list of integers")
    return values


def _inject(text: str) -> tuple[str, list[str]]:
    mode, sep, rest = text.partition("=")
    if not sep or mode not in MODE_NAMES or not rest.strip():
        raise argparse.ArgumentTypeError(f"expected MODE=ARGS with a known mode, got {text!r}")
    return mode, shlex.split(rest)


def _add_run_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """The sweep options; on the ``run`` action their defaults are suppressed
    so that ``pvemu bench --pages 64 run`` keeps the value."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    sweep = parser.add_argument_group("sweep")
    sweep.add_argument(
        "--modes",
        type=mode_list,
        default=default(None),
        help=f"comma-separated modes (default {','.join(DEFAULT_MODES)})",
    )
    sweep.add_argument(
        "--pages",
        type=_int_list,
        default=default(None),
        help="comma-separated region sizes in pages (default 512,4096; 65536 is a 256 MiB region)",
    )
    sweep.add_argument(
        "--workload",
        action="append",
        default=default(None),
        metavar="mprotect|trace:FILE",
        help="a workload; repeat the option or separate with commas (default mprotect)",
    )
    for name, option in BUFFER_PARAMS.items():
        what = {
            "mc_entries": "multicall entries (Linux: 32)",
            "mc_bytes": "multicall argument bytes (Linux: 512)",
            "mc_records": "cap on mmu_update records per flush (none)",
        }[name]
        sweep.add_argument(
            option,
            dest=name,
            type=_limit_list,
            default=default(None),
            help=f"mode xen only: comma-separated {what}; 'default' = the guest's",
        )
    sweep.add_argument(
        "--vcpus", type=positive_int, default=default(None), help="vCPUs per guest (default 2)"
    )
    sweep.add_argument(
        "--sweep-from",
        metavar="FILE",
        default=default(None),
        help="take the sweep (modes, pages, workloads, --mc-*) from a baseline file",
    )
    measure = parser.add_argument_group("measurement")
    measure.add_argument(
        "--repeat",
        type=positive_int,
        default=default(DEFAULT_REPEAT),
        help=f"guest processes per point, for timings (default {DEFAULT_REPEAT})",
    )
    measure.add_argument(
        "--timeout",
        type=float,
        default=default(DEFAULT_TIMEOUT_S),
        help=f"seconds one guest process may take (default {DEFAULT_TIMEOUT_S:g})",
    )
    measure.add_argument(
        "--cost-model",
        metavar="FILE|default",
        default=default(None),
        help="add an 'est. real us' column: counts x published costs (docs/cost-model.md)",
    )
    measure.add_argument(
        "--inject-guest-args",
        dest="inject",
        action="append",
        type=_inject,
        default=default(None),
        metavar="MODE=ARGS",
        help=(
            "pass ARGS to every MODE guest without changing the point keys, to simulate a "
            "regression (the gate's own test uses it); recorded in the run"
        ),
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--db", default=default(None), metavar="PATH", help=f"results database ({DEFAULT_DB})"
    )
    out.add_argument("--no-store", action="store_true", default=default(False), help="do not store")
    out.add_argument(
        "--tag", default=default(None), metavar="NAME", help="name the stored run (for compare)"
    )
    out.add_argument(
        "--output", "-o", default=default(None), metavar="FILE", help="also write the JSON here"
    )
    fmt = out.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", default=default(False), help="JSON on stdout")
    fmt.add_argument(
        "--markdown", action="store_true", default=default(False), help="markdown on stdout"
    )
    out.add_argument(
        "--quiet", "-q", action="store_true", default=default(False), help="no progress bar"
    )


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    _add_run_options(parser, suppress=False)
    actions = parser.add_subparsers(dest="bench_action", title="actions", metavar="[ACTION]")

    run_parser = actions.add_parser("run", help="sweep, store and print (the default)")
    _add_run_options(run_parser, suppress=True)

    compare = actions.add_parser(
        "compare",
        help="diff counts against a baseline; exit 1 on any increase",
        description=(
            "Counts are diffed exactly: any increase is a regression (exit 1). Times are "
            "ratios of medians with a note: 'significant' when the p10-p90 bands of the two "
            "sides do not overlap (both sides need 3+ repeats), never an exit status. "
            "Exit 0 ok, 1 count regression, 2 usage error or baseline points not measured, "
            "3 invalid run. RUN is a stored run id, 'latest', a --tag name or a JSON file."
        ),
    )
    compare.add_argument(
        "--baseline",
        metavar="FILE|RUN",
        default=None,
        help=f"what to compare against (default {DEFAULT_BASELINE})",
    )
    compare.add_argument(
        "--against", metavar="RUN", default="latest", help="the run to check (default latest)"
    )
    compare.add_argument(
        "--update-baseline",
        action="store_true",
        help="rewrite the baseline FILE with the --against run's counts (on purpose)",
    )
    compare.add_argument("--db", default=None, metavar="PATH", help=f"database ({DEFAULT_DB})")
    cfmt = compare.add_mutually_exclusive_group()
    cfmt.add_argument("--json", action="store_true", help="JSON on stdout")
    cfmt.add_argument("--markdown", action="store_true", help="markdown on stdout")

    plot = actions.add_parser("plot", help="PNG and SVG plots of a run")
    plot.add_argument(
        "--run", dest="run_ref", metavar="RUN", default="latest", help="default latest"
    )
    plot.add_argument("--out", required=True, metavar="DIR", help="output directory")
    plot.add_argument("--db", default=None, metavar="PATH", help=f"database ({DEFAULT_DB})")

    listing = actions.add_parser("list", help="list the stored runs")
    listing.add_argument("--db", default=None, metavar="PATH", help=f"database ({DEFAULT_DB})")
    listing.add_argument("--limit", type=positive_int, default=20, help="newest N (default 20)")


def sweep_from_args(args: argparse.Namespace) -> Sweep:
    explicit = {
        name: getattr(args, name, None)
        for name in ("modes", "pages", "workload", "mc_entries", "mc_bytes", "mc_records", "vcpus")
    }
    sweep_from = getattr(args, "sweep_from", None)
    if sweep_from is not None:
        given = [name for name, value in explicit.items() if value is not None]
        if given:
            raise UsageError(f"--sweep-from replaces the sweep options; drop {', '.join(given)}")
        from pvemu.scripts.results import baseline_sweep

        try:
            return Sweep.from_json(baseline_sweep(sweep_from))
        except ResultsError as exc:
            raise UsageError(str(exc)) from exc
    workloads: tuple[str, ...] = (MPROTECT,)
    if explicit["workload"]:
        workloads = tuple(
            w.strip() for item in explicit["workload"] for w in item.split(",") if w.strip()
        )
    sweep = Sweep(
        modes=explicit["modes"] or DEFAULT_MODES,
        pages=explicit["pages"] or DEFAULT_PAGES,
        workloads=workloads,
        mc_entries=explicit["mc_entries"] or (),
        mc_bytes=explicit["mc_bytes"] or (),
        mc_records=explicit["mc_records"] or (),
        vcpus=explicit["vcpus"] or DEFAULT_VCPUS,
    )
    sweep.check()
    if (sweep.mc_entries or sweep.mc_bytes or sweep.mc_records) and "xen" not in sweep.modes:
        raise UsageError("--mc-* options apply to mode xen only, and xen is not in --modes")
    return sweep


# --- rendering -------------------------------------------------------------------


def ptes_changed(point: Point, phase: str) -> int:
    """PTEs one phase changes, for the cost model's native term: every phase
    of the mprotect workload changes one PTE per page; traces are not known."""
    return point.pages if point.workload == MPROTECT else 0


def estimates_us(point: Point, model: CostModel) -> dict[str, float]:
    return {
        phase: model.estimate_ns(counts, ptes_changed(point, phase)) / 1000.0
        for phase, counts in point.counts.items()
    }


def run_document(run: Run, model: CostModel | None) -> dict[str, Any]:
    """``pvemu bench --json``: the run, plus cost-model estimates if asked."""
    from pvemu.scripts.results import run_to_json

    doc = run_to_json(run)
    if model is not None:
        doc["cost_model"] = model.as_dict()
        for point, entry in zip(run.points, doc["points"], strict=True):
            for phase, est in estimates_us(point, model).items():
                entry["phases"][phase]["estimate_us"] = round(est, 3)
    return doc


def _params_text(point: Point) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(point.params.items()))


TABLE_COUNTS: Final = (
    ("traps", "traps"),
    ("hypercalls", "hcalls"),
    ("multicall_entries", "mc.ent"),
    ("records", "records"),
    ("ptwr", "ptwr"),
    ("page_faults", "faults"),
    ("flush_ops", "flush"),
)
ESTIMATE_HEADER: Final = "est. real µs*"
ESTIMATE_NOTE: Final = (
    "* ESTIMATE, not a measurement: counts x per-event costs of cost model '{name}' "
    "(docs/cost-model.md)"
)


def point_label(point: Point) -> str:
    """``xen 600 mc_bytes=256``; trace workloads lead with the workload."""
    parts = [] if point.workload == MPROTECT else [point.workload]
    parts.append(point.mode + (" (UNSAFE)" if point.unsafe else ""))
    if point.pages:
        parts.append(str(point.pages))
    if point.params:
        parts.append(_params_text(point))
    return " ".join(parts)


def table_rows(run: Run, model: CostModel | None) -> tuple[list[str], list[list[str]]]:
    """Header and rows shared by the rich table and the markdown table."""
    header = ["point", "phase", "traps", "/PTE"]
    header += [short for name, short in TABLE_COUNTS if name != "traps"]
    header += ["median ms", "p10-p90 ms"]
    if model is not None:
        header.append(ESTIMATE_HEADER)
    header.append("ok")
    rows: list[list[str]] = []
    for point in run.points:
        estimates = estimates_us(point, model) if model is not None else {}
        ok = "yes" if point.valid else "NO"
        phases = list(dict.fromkeys([*point.counts, *point.samples]))
        if not phases:
            rows.append([point_label(point), "-", *["-"] * (len(header) - 3), ok])
            continue
        for i, phase in enumerate(phases):
            counts = point.counts.get(phase, {})
            timing = point.timing(phase)
            row = [point_label(point) if i == 0 else "", phase]
            row.append(str(counts.get("traps", "-")))
            row.append(f"{counts.get('traps', 0) / point.pages:.3f}" if point.pages else "-")
            row += [str(counts.get(name, "-")) for name, _ in TABLE_COUNTS if name != "traps"]
            if timing is None:
                row += ["-", "-"]
            else:
                row.append(f"{timing.median * 1e3:.2f}")
                row.append(f"{timing.p10 * 1e3:.2f}-{timing.p90 * 1e3:.2f}")
            if model is not None:
                row.append(f"{estimates[phase]:.1f}" if phase in estimates else "-")
            row.append(ok if i == 0 else "")
            rows.append(row)
    return header, rows


def rich_table(run: Run, model: CostModel | None) -> Table:
    from rich.table import Table

    header, rows = table_rows(run, model)
    repeats = run.config.get("repeat", "?")
    title = f"pvemu bench: exact counts per phase, wall time over {repeats} repeat(s)"
    table = Table(title=title)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i < 2 else "right", no_wrap=i == 0)
    last = 0
    for i, row in enumerate(rows):
        if row[0] and i > 0:
            table.rows[last].end_section = True
        table.add_row(*row)
        last = i
    return table


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _console() -> Any:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # logs and pipes: do not squeeze into 80 columns
    return console


def print_run(run: Run, model: CostModel | None, fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(run_document(run, model), indent=2))
        return
    if fmt == "markdown":
        header, rows = table_rows(run, model)
        print(markdown_table(header, rows))
        if model is not None:
            print()
            print(ESTIMATE_NOTE.format(name=model.name))
        return
    console = _console()
    console.print(rich_table(run, model))
    if model is not None:
        console.print(ESTIMATE_NOTE.format(name=model.name))


# --- actions ---------------------------------------------------------------------


def _err(message: str) -> None:
    print(f"pvemu bench: {message}", file=sys.stderr)


def _format(args: argparse.Namespace) -> str:
    if getattr(args, "json", False):
        return "json"
    if getattr(args, "markdown", False):
        return "markdown"
    return "table"


def _db_path(args: argparse.Namespace) -> Path:
    db = getattr(args, "db", None)
    return Path(db) if db else DEFAULT_DB


def action_run(args: argparse.Namespace) -> int:
    from pvemu.scripts import costmodel
    from pvemu.scripts.results import ResultStore

    sweep = sweep_from_args(args)
    model = None
    if getattr(args, "cost_model", None):
        try:
            model = costmodel.load(args.cost_model)
        except costmodel.CostModelError as exc:
            raise UsageError(str(exc)) from exc
    inject = {mode: extra for mode, extra in (getattr(args, "inject", None) or [])}
    options = SweepOptions(
        repeat=args.repeat,
        timeout=args.timeout,
        inject=inject,
        progress=not getattr(args, "quiet", False),
    )
    if inject:
        _err(f"WARNING: injected guest arguments {inject}: this run is deliberately altered")
    config: dict[str, Any] = {
        "sweep": sweep.as_json(),
        "repeat": options.repeat,
        "timeout_s": options.timeout,
        "inject": inject,
        "cost_model": model.as_dict() if model is not None else None,
    }
    started = time.perf_counter()
    try:
        points = execute(sweep, options)
    except KeyboardInterrupt:
        _err("interrupted: nothing was stored")
        return 130
    except RuntimeError as exc:
        _err(str(exc))
        return EXIT_INVALID
    config["elapsed_s"] = round(time.perf_counter() - started, 3)
    run = new_run(config, points)
    if not getattr(args, "no_store", False):
        with ResultStore(_db_path(args)) as store:
            run_id = store.save_run(run)
            if getattr(args, "tag", None):
                store.tag(args.tag, run_id)
        _err(f"stored as run #{run_id} in {_db_path(args)}")
    output = getattr(args, "output", None)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(run_document(run, model), indent=2) + "\n")
    print_run(run, model, _format(args))
    bad = [p for p in run.points if not p.valid]
    for point in bad:
        _err(f"INVALID point {point.key}: {point.reason}")
    return EXIT_INVALID if bad else EXIT_OK


def load_ref(ref: str, db: Path) -> Run:
    """A run from a JSON file (run or baseline) or from the store."""
    path = Path(ref)
    if path.is_file():
        return load_json_file(path)
    if ref.endswith(".json") or os.sep in ref:
        raise ResultsError(f"no such file: {ref}")
    if not db.is_file():
        raise ResultsError(f"no results database at {db} (run 'pvemu bench' first)")
    from pvemu.scripts.results import ResultStore

    with ResultStore(db) as store:
        return store.load_run(store.resolve(ref))


def comparison_tables(cmp: Comparison) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of the count changes and of the timings."""
    tables = []
    count_rows = [
        [
            c.key,
            c.phase,
            c.metric,
            "-" if c.baseline is None else str(c.baseline),
            "-" if c.new is None else str(c.new),
            f"{c.delta:+d}",
            "REGRESSION" if c.regression else "improved",
        ]
        for c in sorted(cmp.changes, key=lambda c: (not c.regression, c.key, c.phase, c.metric))
    ]
    if count_rows:
        header = ["point", "phase", "count", "baseline", "new", "delta", "verdict"]
        tables.append(("count changes", header, count_rows))
    time_rows = [
        [
            t.key,
            t.phase,
            f"{t.baseline.median * 1e3:.2f}",
            f"{t.new.median * 1e3:.2f}",
            f"{t.ratio:.3f}",
            t.describe(),
        ]
        for t in cmp.times
    ]
    if time_rows:
        header = ["point", "phase", "baseline ms", "new ms", "ratio", "timing (reported only)"]
        tables.append(("timings", header, time_rows))
    return tables


def _summary(cmp: Comparison) -> list[str]:
    lines = [f"compared {cmp.compared} point(s): {cmp.against} against {cmp.baseline}"]
    lines += [f"INVALID: {item}" for item in cmp.invalid]
    if cmp.regressions:
        lines.append(f"COUNT REGRESSION: {len(cmp.regressions)} count(s) increased")
    if cmp.improvements:
        lines.append(
            f"{len(cmp.improvements)} count(s) decreased: update the baseline on purpose "
            "(pvemu bench compare --update-baseline)"
        )
    if not cmp.changes and not cmp.invalid:
        lines.append("every count is exactly the baseline's")
    lines += [f"MISSING (baseline point not measured): {key}" for key in cmp.missing]
    if cmp.new_points:
        lines.append(f"{len(cmp.new_points)} point(s) not in the baseline (not gated)")
    return lines


def print_comparison(cmp: Comparison, fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(cmp.as_json(), indent=2))
        return
    tables = comparison_tables(cmp)
    if fmt == "markdown":
        for title, header, rows in tables:
            print(f"### {title}\n")
            print(markdown_table(header, rows))
            print()
        for line in _summary(cmp):
            print(f"- {line}")
        return
    from rich.table import Table

    console = _console()
    for title, header, rows in tables:
        table = Table(title=title)
        for name in header:
            table.add_column(name)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    for line in _summary(cmp):
        console.print(line, markup=False, highlight=False)


def action_compare(args: argparse.Namespace) -> int:
    from pvemu.scripts.results import compare_runs

    db = _db_path(args)
    baseline_ref = args.baseline or str(DEFAULT_BASELINE)
    against = load_ref(args.against, db)
    if args.update_baseline:
        return _update_baseline(Path(baseline_ref), against)
    baseline = load_ref(baseline_ref, db)
    cmp = compare_runs(baseline, against)
    if against.injected:
        _err(f"note: {against.origin} ran with injected guest arguments {against.config['inject']}")
    print_comparison(cmp, _format(args))
    return cmp.status


def _update_baseline(path: Path, against: Run) -> int:
    from pvemu.scripts.results import baseline_to_json, compare_runs

    if not against.valid:
        bad = next(p for p in against.points if not p.valid)
        _err(f"{against.origin} is invalid ({bad.key}: {bad.reason}); baseline not written")
        return EXIT_INVALID
    if against.injected:
        raise UsageError(f"{against.origin} ran with injected guest arguments; refusing")
    sweep = against.config.get("sweep")
    if not isinstance(sweep, dict):
        raise UsageError(f"{against.origin} records no sweep configuration")
    if path.is_file():
        with contextlib.suppress(ResultsError):
            for line in _summary(compare_runs(load_json_file(path), against)):
                _err(line)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(baseline_to_json(against, sweep), indent=2) + "\n")
    _err(f"wrote {path} from {against.origin} ({len(against.points)} points)")
    return EXIT_OK


def action_plot(args: argparse.Namespace) -> int:
    from pvemu.scripts.plots import render

    run = load_ref(args.run_ref, _db_path(args))
    invalid = [p.key for p in run.points if not p.valid]
    if invalid:
        _err(f"skipping {len(invalid)} invalid point(s): {', '.join(invalid)}")
    written, notes = render(run, Path(args.out))
    for note in notes:
        _err(note)
    for path in written:
        print(path)
    return EXIT_OK


def action_list(args: argparse.Namespace) -> int:
    from pvemu.scripts.results import ResultStore

    db = _db_path(args)
    if not db.is_file():
        raise ResultsError(f"no results database at {db}")
    with ResultStore(db) as store:
        rows = store.runs_summary(args.limit)
    header = ["run", "created (UTC)", "commit", "points", "valid"]
    body = [
        [
            str(r["id"]),
            r["created_utc"],
            (r["git_sha"] or "?")[:12] + ("+dirty" if r["git_dirty"] else ""),
            str(r["points"]),
            "yes" if r["valid"] else "NO",
        ]
        for r in rows
    ]
    print(markdown_table(header, body))
    return EXIT_OK


ACTIONS: Final = {
    None: action_run,
    "run": action_run,
    "compare": action_compare,
    "plot": action_plot,
    "list": action_list,
}


def run(args: argparse.Namespace) -> int:
    action = ACTIONS[getattr(args, "bench_action", None)]
    try:
        return action(args)
    except (UsageError, ResultsError) as exc:
        _err(str(exc))
        return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pvemu.scripts.bench_cmd``: the same as ``pvemu bench``."""
    parser = argparse.ArgumentParser(prog="pvemu bench", description=HELP)
    configure(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
