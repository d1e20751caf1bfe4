"""Running a sweep: one hypervisor process for the whole sweep, one
``pvemu guest`` process per point per repeat (rounds interleaved), each
guest's JSON document folded into its point."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from pvemu.scripts import checks
from pvemu.scripts.bench.sweep import Sweep
from pvemu.scripts.procs import HypervisorProcess, child_error, hypervisor_process, run_child
from pvemu.scripts.results import BUFFER_PARAMS, Point

DEFAULT_REPEAT: Final = 3
DEFAULT_TIMEOUT_S: Final = 3600.0


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


def run_guest(
    cmd: Sequence[str], timeout: float, tmpdir: Path | None = None
) -> tuple[dict[str, Any] | None, str]:
    """Run one guest process: (its JSON document, "") or (None, why it failed).
    Its temporary files go in ``tmpdir``; interrupted, it is stopped first."""
    try:
        done = run_child(cmd, tmpdir=tmpdir, timeout=timeout)
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
    return None, f"guest exit {done.returncode}: {child_error(done.stderr, done.returncode)}"


def record_repeat(point: Point, doc: dict[str, Any] | None, error: str) -> None:
    """Fold one repeat's guest document into ``point`` (or invalidate it)."""
    if doc is None:
        point.invalidate(error)
        return
    _cross_check(point, doc)
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
        point.invalidate(f"counts differ between repeats (phase {_changed_phase(point, counts)})")


def _cross_check(point: Point, doc: dict[str, Any]) -> None:
    """Invalidate ``point`` unless the guest's own checks held."""
    if not doc.get("counts_agree"):
        point.invalidate("guest- and hypervisor-side counts disagree")
    if not doc.get("audit_clean"):
        audit = doc.get("audit") or ["?"]
        point.invalidate(f"audit() not clean: {audit[0]}")
    trace = doc.get("trace")
    if isinstance(trace, dict) and not trace.get("replay_clean", True):
        point.invalidate(f"trace replay hit {trace.get('errors', '?')} syscall error(s)")


def _changed_phase(point: Point, counts: dict[str, dict[str, int]]) -> str:
    """The first phase whose counts differ from the point's first repeat."""
    phases = dict.fromkeys([*counts, *point.counts])
    return next((p for p in phases if counts.get(p) != point.counts.get(p)), "?")


@dataclass
class SweepOptions:
    repeat: int = DEFAULT_REPEAT
    timeout: float = DEFAULT_TIMEOUT_S
    #: mode -> extra guest arguments that do not change the point key.
    inject: dict[str, list[str]] = field(default_factory=dict)
    progress: bool = True
    #: The hypervisor's memory in MiB; None for :func:`hypervisor_memory`.
    memory_mib: int | None = None


def hypervisor_memory(sweep: Sweep) -> int:
    """What a sweep gives its hypervisor without ``--memory-mib``: twice the
    largest guest, and room."""
    return sweep.largest_guest_mib() * 2 + checks.HEADROOM_MIB


def execute(sweep: Sweep, options: SweepOptions) -> list[Point]:
    """Run every point ``options.repeat`` times, in interleaved rounds."""
    from pvemu.scripts.progress import Progress

    points = sweep.plan()
    max_pages = max(sweep.pages)
    total = len(points) * options.repeat
    progress = Progress("pvemu bench", total, enabled=options.progress)
    with contextlib.ExitStack() as stack:
        # Under $TMPDIR, removed on the way out, also when interrupted.
        tmpdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="pvemu-bench-"))
        hv: HypervisorProcess | None = None
        if sweep.needs_hypervisor:
            memory = options.memory_mib or hypervisor_memory(sweep)
            hv = stack.enter_context(hypervisor_process(Path(tmpdir), memory))
        with progress:
            for round_ in range(options.repeat):
                for point in points:
                    progress.update(description=f"{point.key} [{round_ + 1}/{options.repeat}]")
                    if point.valid:
                        _measure(point, hv, sweep, max_pages, options, Path(tmpdir))
                    progress.update(advance=1)
            progress.update(description="sweep done")
    return points


def _measure(
    point: Point,
    hv: HypervisorProcess | None,
    sweep: Sweep,
    max_pages: int,
    options: SweepOptions,
    tmpdir: Path,
) -> None:
    cmd = guest_command(
        point,
        socket_path=hv.socket_path if hv is not None else None,
        vcpus=sweep.vcpus,
        memory_pages=max_pages,
        extra=options.inject.get(point.mode, []),
    )
    doc, error = run_guest(cmd, options.timeout, tmpdir)
    if doc is None and hv is not None and not hv.alive():
        error = f"{error}; the hypervisor exited ({hv.log_tail() or 'no log'})"
    record_repeat(point, doc, error)
