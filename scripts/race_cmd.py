"""``pvemu race``: the A/D race of the seed patch, in every mode, for real.

A hypervisor process (small preemption quantum, so user writes land between
the slices of a kernel batch) and one guest process per mode. The default
workload (``mprotect``): vCPU 0 toggles a shared file mapping RW <-> RO and
writes it back while vCPUs 1..W write into it. ``--workload fork``: vCPU 0
cleans a private anonymous region (MADV_FREE) and forks, again and again,
while vCPUs 1..W write into it. ``--workload munmap``: vCPU 0 maps a shared
file mapping and unmaps it (munmap, every other time MADV_DONTNEED first)
while vCPUs 1..W write into it. Reports what each mode lost.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from pvemu.guest.modes import MODE_NAMES, UNSAFE_MODES
from pvemu.scripts import checks
from pvemu.scripts.argtypes import mode_list, positive_int
from pvemu.scripts.guest_cmd import RACE_WORKLOADS
from pvemu.scripts.procs import child_error, maybe_hypervisor, run_child
from pvemu.scripts.report import Tabular, add_format_options, output_format, print_tabular

EPILOG = """\
workloads: mprotect (default) toggles a shared file mapping RW <-> RO and
writes it back (msync) while the writers store into it; fork cleans a private
anonymous region with MADV_FREE and forks at once, again and again, while the
writers store into it; each child reads its snapshot, writes some pages and
exits; munmap maps a shared file mapping and unmaps it while the writers store
into it (munmap; every other iteration MADV_DONTNEED first, then munmap): a
writer stops at its first SIGSEGV, and after each unmap the file must hold
every store that completed (docs/race.md).

columns: writes (stores that completed), lost dirty (D bits set by hardware
that vanished unseen), lost writes (mprotect: pages whose file held less than
the last completed store after an msync; fork: a page older than the last
store completed before the parent's read or, in a child, before the fork
began; munmap: completed stores missing from the file after the unmap),
leaked writes (fork: a child's store seen by the parent, or a store
issued after fork returned seen by the child), stale TLB (stores through a
stale TLB entry after the guest's flush; stores still in flight before the
flush are legal and shown in the JSON), faults and traps. In the fork race a
lost D bit loses no data: pvemu has no reclaim and no swap. In the munmap race
it does: a shared page whose D bit is lost at the unmap is never written back
(naive's lost dirty there counts every D bit it clears with a plain write,
seen or not; lost writes counts the ones that cost data).

Exit status 1 if any mode other than naive lost anything, or if a mode's
guest did not run (its row then says DID NOT RUN and why: that is no loss of
data). naive is UNSAFE by design: it commits without PRESERVE_AD and is
expected to lose data. Sizes, writers and memory are checked before any
process starts (exit 2).

examples:
  pvemu race --modes xen,naive --iterations 80 --json
  pvemu race --workload fork --pages 48 --iterations 30
  pvemu race --workload munmap --modes batched,naive --iterations 60
"""

REPORTED = ("iterations", "writes", "lost_dirty", "lost_writes", "stale_tlb_writes", "traps")
#: The fork race's columns: its leaked writes too.
FORK_REPORTED = (
    "iterations",
    "writes",
    "lost_dirty",
    "lost_writes",
    "leaked_writes",
    "stale_tlb_writes",
    "traps",
)
#: What each workload's guest runs (``pvemu guest --workload``).
WORKLOADS = RACE_WORKLOADS


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--workload",
        choices=tuple(WORKLOADS),
        default="mprotect",
        help="mprotect (default: RW/RO toggles and msync of a shared file mapping), "
        "fork (MADV_FREE and fork of a private anonymous region) or munmap (munmap and "
        "MADV_DONTNEED of a shared file mapping)",
    )
    parser.add_argument(
        "--modes",
        type=mode_list,
        default=MODE_NAMES,
        help=f"comma-separated (default {','.join(MODE_NAMES)})",
    )
    parser.add_argument(
        "--pages",
        type=positive_int,
        default=64,
        help=f"region size (64; at most {checks.MAX_PAGES:,}, a 16 GiB guest; half that "
        "for fork, whose pages may all be copied)",
    )
    parser.add_argument(
        "--writers",
        type=positive_int,
        default=2,
        help=f"user threads, one vCPU each (default 2, at most {checks.MAX_WRITERS}: a "
        f"domain's {checks.MAX_VCPUS} vCPUs less the kernel loop's and the flusher's)",
    )
    parser.add_argument(
        "--iterations", type=positive_int, default=40, help="RW/RO toggles, forks or unmaps (40)"
    )
    parser.add_argument("--seed", type=int, default=1, help="writers' random seed (default 1)")
    parser.add_argument("--quantum", type=positive_int, default=8, help="hypervisor quantum (8)")
    parser.add_argument(
        "--memory-mib",
        type=positive_int,
        default=None,
        metavar="N",
        help=f"the hypervisor's machine memory in MiB (default: {checks.RACE_MIN_MEMORY_MIB}, "
        "or twice the guest's plus 64 when more; at least the guest's plus 1)",
    )
    add_format_options(parser)


def _run_mode(
    mode: str, socket_path: str, args: argparse.Namespace, tmpdir: Path
) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pvemu.scripts", "guest", "--mode", mode]
    cmd += ["--workload", WORKLOADS[args.workload]]
    cmd += ["--pages", str(args.pages), "--writers", str(args.writers)]
    cmd += ["--iterations", str(args.iterations), "--seed", str(args.seed), "--json"]
    if mode != "native":
        cmd += ["--socket", socket_path]
    # The guest's shared file (pvemu-race-*.bin) goes in tmpdir, removed even
    # when the guest is killed before its own cleanup.
    done = run_child(cmd, tmpdir=tmpdir)
    if done.returncode not in (0, 3) or not done.stdout.strip():
        error = child_error(done.stderr, done.returncode)
        return {"mode": mode, "unsafe": mode in UNSAFE_MODES, "error": error}
    from pvemu.scripts.bench.provenance import without_metadata

    return without_metadata(json.loads(done.stdout))


def _ran(result: dict[str, Any]) -> bool:
    """Whether the mode's guest ran the race: one that never started (or
    crashed) lost nothing, it measured nothing."""
    return "error" not in result


def _lost(result: dict[str, Any]) -> bool:
    """A mode that ran lost data or failed its own checks."""
    if not result.get("audit_clean", False) or not result.get("counts_agree", False):
        return True
    lost = ("lost_dirty", "lost_writes", "leaked_writes", "stale_tlb_writes")
    return any(result.get(k, 0) for k in lost)


def race_headline(results: list[dict[str, Any]]) -> str:
    """What the race showed, in one sentence: which modes kept everything,
    what the UNSAFE ones lost, and which never ran."""
    ran = [r for r in results if _ran(r)]
    safe = [r for r in ran if r["mode"] not in UNSAFE_MODES]
    kept = [r["mode"] for r in safe if not _lost(r)]
    failed = [r["mode"] for r in safe if _lost(r)]
    parts = []
    if safe:
        parts.append(f"{len(kept)} of {len(safe)} safe mode(s) lost nothing")
    if failed:
        parts.append(f"LOST DATA or failed checks: {', '.join(failed)}")
    for r in ran:
        if r["mode"] in UNSAFE_MODES:
            parts.append(
                f"{r['mode']} (UNSAFE) lost {r['lost_dirty']:,} dirty bit(s) and "
                f"{r['lost_writes']:,} write(s) of {r['writes']:,}, as expected"
            )
            if r.get("workload") == "fork":
                parts[-1] += " (without reclaim or swap a lost D bit loses no anonymous data)"
            elif r.get("workload") == "munmap":
                parts[-1] += (
                    " (a shared page whose D bit is lost is never written back; lost dirty"
                    " counts every D bit its zap overwrote, read first or not)"
                )
    not_run = [r["mode"] for r in results if not _ran(r)]
    if not_run:
        parts.append(f"did not run (guest failed to start or crashed): {', '.join(not_run)}")
    return "headline: " + ("; ".join(parts) or "no mode ran")


def race_tabular(args: argparse.Namespace, results: list[dict[str, Any]]) -> Tabular:
    fork = args.workload == "fork"
    reported = FORK_REPORTED if fork else REPORTED
    headers = {"stale_tlb_writes": "stale tlb"}
    if fork:
        headers["iterations"] = "forks"
        title = (
            f"fork race: {args.pages} private pages, {args.writers} writers, "
            f"{args.iterations} MADV_FREE + forks, seed {args.seed}"
        )
    elif args.workload == "munmap":
        headers["iterations"] = "unmaps"
        title = (
            f"munmap race: {args.pages} shared pages, {args.writers} writers, "
            f"{args.iterations} unmaps (every other after MADV_DONTNEED), seed {args.seed}"
        )
    else:
        title = (
            f"A/D race: {args.pages} shared pages, {args.writers} writers, "
            f"{args.iterations} RW/RO toggles, seed {args.seed}"
        )
    tab = Tabular(
        title=title,
        header=[headers.get(c, c.replace("_", " ")) for c in ("mode", *reported)]
        + ["faults", "verdict"],
        csv_header=["mode", *reported, "page_faults", "verdict"],
        keys=1,
        left=frozenset({"verdict"}),
        priority=("lost dirty", "lost writes", "leaked writes", "stale tlb", "verdict"),
        headline=race_headline(results),
    )
    for r in results:
        name = r["mode"] + (" (UNSAFE)" if r.get("unsafe") else "")
        if not _ran(r):
            tab.rows.append([name, *["-"] * (len(reported) + 1), f"DID NOT RUN: {r['error']}"])
            continue
        if not _lost(r):
            verdict = "nothing lost"
        else:
            verdict = "expected loss" if r["mode"] in UNSAFE_MODES else "LOST DATA"
        tab.rows.append([name, *(str(r[k]) for k in reported), str(r["page_faults"]), verdict])
    return tab


def hypervisor_memory(pages: int, workload: str = "mprotect") -> int:
    """What ``race`` gives the hypervisor without ``--memory-mib``."""
    guest = checks.guest_memory(WORKLOADS[workload], pages)
    return max(checks.RACE_MIN_MEMORY_MIB, guest * 2 + checks.HEADROOM_MIB)


def check(args: argparse.Namespace, host_mib: int) -> None:
    """Everything that would keep a guest from starting, before anything does."""
    checks.check_modes(args.modes)
    checks.check_pages(args.pages, host_mib, workload=WORKLOADS[args.workload])
    checks.check_writers(args.writers, args.pages)
    if args.memory_mib is not None:
        checks.check_machine_memory(args.memory_mib, host_mib)
        need = checks.guest_memory(WORKLOADS[args.workload], args.pages) + 1
        checks.check_enough_memory(args.memory_mib, need, f"a {args.pages:,}-page guest and Xen")


def run(args: argparse.Namespace) -> int:
    from pvemu.scripts.progress import Progress

    check(args, checks.host_memory_mib())
    memory = args.memory_mib or hypervisor_memory(args.pages, args.workload)
    results: list[dict[str, Any]] = []
    needs_hypervisor = any(m != "native" for m in args.modes)
    with (
        tempfile.TemporaryDirectory(prefix="pvemu-race-") as tmp,
        maybe_hypervisor(needs_hypervisor, Path(tmp), memory, quantum=args.quantum) as hv,
        Progress("pvemu race", len(args.modes)) as progress,
    ):
        socket_path = hv.socket_path if hv is not None else ""
        for n, mode in enumerate(args.modes):
            progress.update(description=f"mode {mode} ({n + 1}/{len(args.modes)})")
            results.append(_run_mode(mode, socket_path, args, Path(tmp)))
            progress.update(advance=1)
    failed = [r["mode"] for r in results if _ran(r) and r["mode"] not in UNSAFE_MODES and _lost(r)]
    not_run = [r for r in results if not _ran(r)]
    fmt = output_format(args)
    if fmt == "json":
        from pvemu.scripts.bench.documents import RACE_SCHEMA
        from pvemu.scripts.bench.provenance import document

        keys = ("workload", "pages", "writers", "iterations", "seed", "quantum")
        config = {k: getattr(args, k) for k in keys}
        config["modes"] = list(args.modes)
        print(json.dumps(document(RACE_SCHEMA, config, {"results": results})))
    else:
        print_tabular(race_tabular(args, results), fmt, wide=args.wide)
        if failed:
            print(f"modes that must not lose anything did: {', '.join(failed)}", file=sys.stderr)
        for r in not_run:
            print(f"mode {r['mode']} did not run: {r['error']}", file=sys.stderr)
    return 1 if failed or not_run else 0
