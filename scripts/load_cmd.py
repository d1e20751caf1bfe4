"""``pvemu load``: many guest processes against one hypervisor, a latency
probe, and one enormous batch in the middle.

It answers two questions about the hypervisor under load: how many page-table
records per second it sustains for many guests at once, and whether its
preemption quantum keeps a latency-sensitive guest's traps short while
another guest sends a million-record batch (Xen's hypercall continuations).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from pvemu.hypervisor.scheduler import POLICIES
from pvemu.scripts import checks
from pvemu.scripts.argtypes import HYPERVISOR_MODES, hypervisor_mode, positive_float, positive_int
from pvemu.scripts.errors import EXIT_FAILURE, UserError
from pvemu.scripts.load_worker import PRIORITIES
from pvemu.scripts.procs import STOP_GRACE_S
from pvemu.scripts.report import Tabular, add_format_options, output_format, print_tabular
from pvemu.scripts.results import percentile
from pvemu.shared.wire import MAX_MMU_UPDATES

if TYPE_CHECKING:
    from pvemu.scripts.progress import Progress

DEFAULT_GUESTS: Final = 32
DEFAULT_RECORDS: Final = 1_000_000
P99_GOAL_MS: Final = 2.0

EPILOG = f"""\
Phases: boot every guest (each populates its region), let the load guests
toggle their regions RW<->RO with mprotect, sample the probe's one-record
mmu_update latency without the big batch for --baseline seconds, then send
the big batch from its own guest and keep sampling until it completes.

Reported: aggregate mmu_update records/s of the load guests, the big batch's
own records/s, the probe's median and p99 latency without and during the big
batch (goal: p99 <= {P99_GOAL_MS:g} ms), and the hypervisor's memory. The exit
status is 1 if the big batch failed, a guest failed, audit() found a problem,
or the probe took no sample during the batch (too short for --interval-ms:
give more --records); the latency goal is reported, never enforced.

Load guests run with --guest-priority idle (Linux SCHED_IDLE) by default: on a
real machine a trap runs the hypervisor at once and a waking vCPU is boosted
ahead of busy ones, while here the hypervisor and the probe are processes
among 33 others and would queue behind the load guests' own Python for a
time slice of the host's scheduler. 'low' is nice 19, 'normal' competes.

example:
  pvemu load --guests 32 --records 1000000 --json > load.json
"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--guests",
        type=positive_int,
        default=DEFAULT_GUESTS,
        help=f"load guest processes running mprotect (default {DEFAULT_GUESTS}, at most "
        f"{checks.MAX_LOAD_GUESTS}: each holds {checks.LOAD_CONNECTIONS_PER_GUEST} of the "
        "hypervisor's 1024 connections)",
    )
    parser.add_argument(
        "--pages",
        type=positive_int,
        default=256,
        help=f"region of each load guest (default 256, at most {checks.MAX_PAGES:,})",
    )
    parser.add_argument(
        "--mode",
        type=hypervisor_mode,
        default="xen",
        help=f"pv-ops mode of the load guests: {', '.join(HYPERVISOR_MODES)} (default xen)",
    )
    parser.add_argument(
        "--memory-mib",
        type=positive_int,
        default=None,
        metavar="N",
        help="the hypervisor's machine memory in MiB (default: every guest's domain, "
        f"the probe's {checks.PROBE_MEMORY_MIB} and the big batch's "
        f"{checks.BIGBATCH_MEMORY_MIB}, plus {checks.HEADROOM_MIB}; at least those domains)",
    )
    parser.add_argument(
        "--records",
        type=positive_int,
        default=DEFAULT_RECORDS,
        help=f"records in the big batch, at most {MAX_MMU_UPDATES} (default {DEFAULT_RECORDS})",
    )
    parser.add_argument(
        "--quantum",
        type=positive_int,
        default=32,
        help="the hypervisor's preemption quantum in entries (default 32: see "
        "docs/robustness.md for a sweep)",
    )
    parser.add_argument(
        "--scheduler",
        choices=tuple(POLICIES),
        default="fair",
        help="the hypervisor's slice scheduler (default fair; fifo to compare)",
    )
    parser.add_argument(
        "--baseline",
        type=positive_float,
        default=5.0,
        metavar="SECONDS",
        help="probe sampling under load before the big batch (default 5)",
    )
    parser.add_argument(
        "--interval-ms",
        type=positive_float,
        default=10.0,
        help="pause between probe hypercalls (default 10: a probe that asks for more "
        "than its fair share of the hypervisor gets no priority, as under Xen)",
    )
    parser.add_argument(
        "--guest-priority",
        choices=PRIORITIES,
        default="idle",
        help="host scheduling of the load guests: idle (SCHED_IDLE), low (nice 19) or "
        "normal (default idle)",
    )
    add_format_options(parser)


def domains_memory(args: argparse.Namespace) -> int:
    """MiB of every domain the run creates: the load guests', the probe's,
    the big batch's, and Xen's own frame."""
    guests: int = args.guests
    return (
        guests * checks.memory_for(args.pages)
        + checks.PROBE_MEMORY_MIB
        + checks.BIGBATCH_MEMORY_MIB
        + 1
    )


def check(args: argparse.Namespace, host_mib: int) -> None:
    """Everything that would stop the run part-way, before any process starts."""
    checks.check_guests(args.guests)
    checks.check_pages(args.pages, host_mib)
    if args.records > MAX_MMU_UPDATES:
        raise UserError(f"--records {args.records:,}: at most {MAX_MMU_UPDATES} (the wire's)")
    need = domains_memory(args)
    what = f"{args.guests} guests of {checks.memory_for(args.pages)} MiB, the probe and the batch"
    checks.check_enough_memory(args.memory_mib, need, what)
    checks.check_machine_memory(args.memory_mib or need + checks.HEADROOM_MIB, host_mib)


@dataclass
class Worker:
    """A worker process and what it has said so far."""

    name: str
    proc: Any  # trio.Process
    #: Where the worker's stderr goes: its one-line error, if it fails.
    stderr_path: Path | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    _buffer: bytes = b""

    def error(self) -> str:
        """The worker's own error line, for the user."""
        from pvemu.scripts.procs import child_error

        text = ""
        if self.stderr_path is not None:
            with contextlib.suppress(OSError):
                text = self.stderr_path.read_text(errors="replace")
        return child_error(text, self.proc.returncode)

    async def read_events(self) -> None:
        assert self.proc.stdout is not None
        while True:
            chunk = await self.proc.stdout.receive_some(1 << 16)
            if not chunk:
                return
            self._buffer += chunk
            *lines, self._buffer = self._buffer.split(b"\n")
            self.events.extend(json.loads(line) for line in lines if line.strip())

    def event(self, name: str) -> dict[str, Any] | None:
        return next((e for e in self.events if e["event"] == name), None)

    async def tell(self, command: str) -> None:
        import trio

        assert self.proc.stdin is not None
        # A worker that has exited already cannot hear; its exit status says why.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.proc.stdin.send_all(command.encode() + b"\n")


def latency_summary(samples_ns: list[int]) -> dict[str, Any]:
    ms = [s / 1e6 for s in samples_ns]
    if not ms:
        return {"n": 0}
    return {
        "n": len(ms),
        "median_ms": round(statistics.median(ms), 3),
        "p99_ms": round(percentile(ms, 0.99), 3),
        "max_ms": round(max(ms), 3),
        "slowest_ms": [round(x, 3) for x in sorted(ms)[-5:]],
    }


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process (KiB); empty once it has gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


async def _wait_for(
    condition: Callable[[], bool], workers: list[Worker], seconds: float, what: str
) -> None:
    """Poll ``condition``; fail early if a worker dies without its result."""
    import trio

    with trio.move_on_after(seconds):
        while not condition():
            for worker in workers:
                if worker.proc.returncode is not None and worker.event("result") is None:
                    raise LoadError(
                        f"{worker.name} exited with {worker.proc.returncode}: {worker.error()}"
                    )
            await trio.sleep(0.02)
        return
    raise LoadError(f"timed out waiting for {what}")


class LoadError(UserError):
    """A worker failed or the run could not proceed: one line, exit 1."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_FAILURE)


async def stop_workers(workers: list[Worker], grace: float = STOP_GRACE_S) -> None:
    """SIGTERM every worker still running, SIGKILL those left after ``grace``
    seconds, and reap them all: shielded, so it also runs when cancelled or
    interrupted."""
    import trio

    with trio.CancelScope(shield=True):
        running = [w for w in workers if w.proc.returncode is None]
        for worker in running:
            worker.proc.terminate()
        with trio.move_on_after(grace):
            for worker in running:
                await worker.proc.wait()
        for worker in running:
            if worker.proc.returncode is None:
                worker.proc.kill()
            await worker.proc.wait()


def worker_commands(args: argparse.Namespace, socket_path: str) -> list[tuple[str, list[str]]]:
    """(name, command line) of every worker: the load guests, the big batch
    and the probe, in the order they start."""
    base = [sys.executable, "-m", "pvemu.scripts.load_worker"]
    common = ["--socket", socket_path]
    load = ["mprotect", *common, "--mode", args.mode, "--pages", str(args.pages)]
    load += ["--priority", args.guest_priority]
    specs = [(f"load{i}", [*base, *load]) for i in range(args.guests)]
    specs.append(("bigbatch", [*base, "bigbatch", *common, "--records", str(args.records)]))
    specs.append(("probe", [*base, "probe", *common, "--interval-ms", str(args.interval_ms)]))
    return specs


@dataclass
class MemorySampler:
    """The hypervisor's peak RSS, sampled every 0.1 s while the run lasts."""

    pid: int
    peak_rss_kib: int = 0

    async def run(self) -> None:
        import trio

        while True:
            self.peak_rss_kib = max(self.peak_rss_kib, memory_kib(self.pid).get("VmRSS", 0))
            await trio.sleep(0.1)


def _progress(args: argparse.Namespace) -> Progress:
    """Four steps (boot, probe, big batch, stop) on stderr: a bar with an ETA
    on a terminal, a plain line every few seconds in a log."""
    from pvemu.scripts.progress import Progress

    return Progress("pvemu load", 4)


async def run_load(
    args: argparse.Namespace, socket_path: str, hv_pid: int, tmpdir: Path | None = None
) -> dict[str, Any]:
    """Drive the phases; return the report document. Workers keep their
    stderr and temporary files in ``tmpdir`` (default: a folder of their own)."""
    import trio

    from pvemu.scripts.procs import child_environment

    before_guests = memory_kib(hv_pid)
    sampler = MemorySampler(hv_pid)
    with contextlib.ExitStack() as stack:
        if tmpdir is None:
            tmpdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pvemu-load-")))
        async with trio.open_nursery() as nursery:
            workers: list[Worker] = []
            try:
                for name, cmd in worker_commands(args, socket_path):
                    stderr_path = tmpdir / f"{name}.stderr"
                    with stderr_path.open("w") as stderr:
                        proc = await trio.lowlevel.open_process(
                            cmd,
                            stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE,
                            stderr=stderr,
                            env=child_environment(tmpdir),
                            # No PR_SET_PDEATHSIG: trio starts the process from a
                            # worker thread, whose exit would signal it. A worker
                            # stops on EOF on stdin, which our death gives it.
                        )
                    worker = Worker(name, proc, stderr_path)
                    workers.append(worker)
                    nursery.start_soon(worker.read_events)
                nursery.start_soon(sampler.run)
                await _drive_phases(args, workers)
                with trio.fail_after(60):
                    for worker in workers:
                        await worker.proc.wait()
            finally:
                await stop_workers(workers)
            nursery.cancel_scope.cancel()
    memory = {
        "before_guests": before_guests,
        "peak_rss_kib": sampler.peak_rss_kib,
        "end": memory_kib(hv_pid),
    }
    failed = [
        f"{w.name} exited {w.proc.returncode}: {w.error()}" for w in workers if w.proc.returncode
    ]
    by_name = {w.name: w for w in workers}
    loads = [w for w in workers if w.name.startswith("load")]
    return report(args, by_name["probe"], by_name["bigbatch"], loads, memory, failed)


async def _drive_phases(args: argparse.Namespace, workers: list[Worker]) -> None:
    """Boot, probe under load, the big batch, stop: each phase waits for the
    workers' events and fails early if one dies."""
    import trio

    by_name = {w.name: w for w in workers}
    probe, big = by_name["probe"], by_name["bigbatch"]
    with _progress(args) as progress:
        progress.update(description=f"booting {len(workers)} guests")
        await _wait_for(
            lambda: all(w.event("ready") for w in workers),
            workers,
            600,
            "the guests to boot",
        )
        progress.update(advance=1, description=f"probing under load ({args.baseline:g} s)")
        await probe.tell("go")
        await trio.sleep(args.baseline)
        progress.update(advance=1, description=f"big batch of {args.records:,} records")
        await big.tell("go")
        await _wait_for(lambda: big.event("result") is not None, workers, 900, "the batch")
        await trio.sleep(min(1.0, args.baseline))
        progress.update(advance=1, description="stopping guests")
        for worker in workers:
            await worker.tell("stop")
        await _wait_for(
            lambda: all(w.event("result") for w in workers if w is not big),
            workers,
            120,
            "the guests' results",
        )


def split_probe_samples(
    samples: list[tuple[int, int]], start_ns: int, end_ns: int
) -> tuple[list[int], list[int]]:
    """The probe's latencies (ns) ended before the big batch began, and those
    whose round trip overlapped it: a trap already in flight when the batch
    starts waits behind its slices as much as one sent after. (Counting only
    traps sent inside the batch left a batch shorter than the probe's
    interval with no sample at random, and the run not ok.)"""
    without = [d for s, d in samples if s + d < start_ns]
    during = [d for s, d in samples if s <= end_ns and s + d >= start_ns]
    return without, during


def report(
    args: argparse.Namespace,
    probe: Worker,
    big: Worker,
    loads: list[Worker],
    memory: dict[str, Any],
    failed: list[str],
) -> dict[str, Any]:
    """The JSON document: throughput, latency by phase, memory, verdicts."""
    batch = big.event("result") or {}
    probe_result = probe.event("result") or {}
    samples = [(int(s), int(d)) for s, d in probe_result.get("samples", [])]
    start, end = int(batch.get("start_ns", 0)), int(batch.get("end_ns", 0))
    without, during = split_probe_samples(samples, start, end)
    load_results = [w.event("result") or {} for w in loads]
    records = sum(int(r.get("records", 0)) for r in load_results)
    rate = sum(
        int(r["records"]) / ((int(r["end_ns"]) - int(r["start_ns"])) / 1e9)
        for r in load_results
        if r.get("end_ns", 0) > r.get("start_ns", 0)
    )
    batch_s = (end - start) / 1e9 if end > start else 0.0
    during_summary = latency_summary(during)
    audit = list(probe_result.get("audit", ["the probe reported no audit"]))
    ok = (
        not failed
        and batch.get("rc") == 0
        and batch.get("done") == args.records
        and not audit
        and bool(during)
    )
    return {
        "schema": 1,
        "config": {
            "guests": args.guests,
            "pages": args.pages,
            "mode": args.mode,
            "records": args.records,
            "quantum": args.quantum,
            "scheduler": args.scheduler,
            "guest_priority": args.guest_priority,
            "interval_ms": args.interval_ms,
        },
        "load": {
            "mprotects": sum(int(r.get("mprotects", 0)) for r in load_results),
            "records": records,
            "records_per_s": round(rate),
        },
        "big_batch": {
            "rc": batch.get("rc"),
            "done": batch.get("done"),
            "seconds": round(batch_s, 3),
            "records_per_s": round(args.records / batch_s) if batch_s else 0,
        },
        "probe": {
            "without_big_batch": latency_summary(without),
            "during_big_batch": during_summary,
        },
        "p99_goal_ms": P99_GOAL_MS,
        "p99_goal_met": bool(during) and float(during_summary["p99_ms"]) <= P99_GOAL_MS,
        "hypervisor_memory_kib": {
            "rss_before_guests": memory["before_guests"].get("VmRSS", 0),
            "peak_rss": memory["peak_rss_kib"],
            "hwm": memory["end"].get("VmHWM", 0),
        },
        "audit": audit,
        "failed": failed,
        "ok": ok,
    }


def load_headline(doc: dict[str, Any]) -> str:
    """The run in one sentence: throughput, and the probe's p99 during the batch."""
    cfg, during = doc["config"], doc["probe"]["during_big_batch"]
    text = f"headline: {cfg['guests']} guests sustained {doc['load']['records_per_s']:,} records/s"
    if during["n"]:
        goal = "met" if doc["p99_goal_met"] else "NOT met"
        text += (
            f"; the probe's p99 during the {cfg['records']:,}-record batch was "
            f"{during['p99_ms']} ms (goal <= {doc['p99_goal_ms']} ms: {goal})"
        )
    else:
        text += "; the probe took no sample during the big batch"
    return text


def report_tabular(doc: dict[str, Any]) -> Tabular:
    cfg = doc["config"]
    title = (
        f"{cfg['guests']} guests x {cfg['pages']} pages ({cfg['mode']}), "
        f"{cfg['records']:,}-record batch, q={cfg['quantum']}, {cfg['scheduler']}"
    )
    tab = Tabular(title=title, header=["measure", "value"], keys=1, headline=load_headline(doc))
    tab.rows.append(["load guests: mmu_update records/s", f"{doc['load']['records_per_s']:,}"])
    tab.rows.append(["load guests: mprotect calls", f"{doc['load']['mprotects']:,}"])
    big = doc["big_batch"]
    tab.rows.append(
        ["big batch: rc / done", f"{big['rc']} / {big['done']:,}" if big["done"] else "failed"]
    )
    tab.rows.append(
        ["big batch: seconds (records/s)", f"{big['seconds']} ({big['records_per_s']:,})"]
    )
    for phase, label in (("without_big_batch", "without"), ("during_big_batch", "during")):
        lat = doc["probe"][phase]
        if lat["n"]:
            tab.rows.append(
                [
                    f"probe {label} the batch: median / p99 ms (n)",
                    f"{lat['median_ms']} / {lat['p99_ms']} ({lat['n']})",
                ]
            )
    goal = "met" if doc["p99_goal_met"] else "NOT met"
    tab.rows.append([f"p99 goal <= {doc['p99_goal_ms']} ms", goal])
    mem = doc["hypervisor_memory_kib"]
    tab.rows.append(
        [
            "hypervisor RSS before / peak MiB",
            f"{mem['rss_before_guests'] / 1024:.0f} / {mem['peak_rss'] / 1024:.0f}",
        ]
    )
    tab.rows.append(["audit", "clean" if not doc["audit"] else f"{len(doc['audit'])} problems"])
    tab.notes = [*doc["failed"], *doc["audit"]]
    tab.csv_header = ["measure", "value"]
    tab.csv_rows = [[name, value] for name, value in flat_measures(doc)]
    return tab


def flat_measures(doc: Any, prefix: str = "") -> list[tuple[str, str]]:
    """The report's figures as (dotted JSON path, raw value) rows, for CSV:
    ``probe.during_big_batch.p99_ms``, ``load.records_per_s`` ..."""
    if isinstance(doc, dict):
        return [
            row
            for key, value in doc.items()
            if key != "schema"
            for row in flat_measures(value, f"{prefix}{key}.")
        ]
    if isinstance(doc, list):
        return [(prefix.rstrip("."), ";".join(str(v) for v in doc))]
    return [(prefix.rstrip("."), "" if doc is None else str(doc))]


def print_report(doc: dict[str, Any], fmt: str = "table", *, wide: bool = False) -> None:
    print_tabular(report_tabular(doc), fmt, wide=wide)


def run(args: argparse.Namespace) -> int:
    import trio

    from pvemu.scripts.procs import hypervisor_process

    check(args, checks.host_memory_mib())
    memory_mib = args.memory_mib or domains_memory(args) + checks.HEADROOM_MIB
    extra = ["--max-batch", str(max(args.records, 65536)), "--max-domains", str(args.guests + 8)]
    extra += ["--scheduler", args.scheduler]
    started = time.monotonic()
    # The hypervisor, the workers' stderr and anything they leave are in one
    # folder under $TMPDIR, removed on the way out, also when interrupted.
    with (
        tempfile.TemporaryDirectory(prefix="pvemu-load-") as tmp,
        hypervisor_process(Path(tmp), memory_mib, quantum=args.quantum, extra=extra) as hv,
    ):
        doc = trio.run(run_load, args, hv.socket_path, hv.proc.pid, Path(tmp))
    doc["wall_s"] = round(time.monotonic() - started, 1)
    fmt = output_format(args)
    if fmt == "json":
        from pvemu.scripts.bench.documents import LOAD_SCHEMA
        from pvemu.scripts.bench.provenance import document

        body = {k: v for k, v in doc.items() if k != "schema"}
        print(json.dumps(document(LOAD_SCHEMA, doc["config"], body), indent=2))
    else:
        print_report(doc, fmt, wide=args.wide)
    return 0 if doc["ok"] else 1
