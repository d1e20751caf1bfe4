"""What a user of the command line expects: a quiet hypervisor console with
the record in --log-file and --timeline, one meaning for --socket (connect
to a running hypervisor), defaults that fit together."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from pvemu.scripts.cli import build_parser
from pvemu.scripts.hypervisor_cmd import DEFAULT_SOCKET
from tests.hvproc import hypervisor_process, short_socket_path

PVEMU = [sys.executable, "-m", "pvemu.scripts"]


def _guest(socket_path: str, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [*PVEMU, "guest", "--socket", socket_path, "--mode", "batched", "--pages", "16"]
    done = subprocess.run(
        [*cmd, "--json", *extra], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return done


def test_hypervisor_console_is_quiet_and_its_files_hold_the_record(tmp_path: Path) -> None:
    socket_path = short_socket_path("quiet")
    log_file, timeline = tmp_path / "hv.log", tmp_path / "hv.json"
    cmd = [*PVEMU, "hypervisor", "--socket", socket_path, "--memory-mib", "128"]
    cmd += ["--log-file", str(log_file), "--timeline", str(timeline)]
    with (tmp_path / "stderr").open("w") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("pvemu-hypervisor ready")
        _guest(socket_path)
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
        Path(socket_path).parent.rmdir()
    assert proc.returncode == 0
    assert rest == ""
    assert (tmp_path / "stderr").read_text() == ""  # no line per hypercall on the console
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    logged = [line for line in lines if line["event"] == "mmu_update"]
    traps = json.loads(timeline.read_text())["traceEvents"]
    recorded = [e for e in traps if e["ph"] == "X" and e["name"] == "mmu_update"]
    assert len(logged) == len(recorded) > 0
    assert {line["level"] for line in lines} >= {"info"}


def test_run_socket_connects_to_a_running_hypervisor(tmp_path: Path) -> None:
    """``run --socket`` starts no hypervisor of its own: its guests' domains
    are on the running one's timeline, and run's own timeline has the
    guests' side only."""
    served, seen = tmp_path / "served.json", tmp_path / "seen.json"
    with hypervisor_process("--timeline", str(served), tag="runsock") as hv:
        cmd = [*PVEMU, "run", "--socket", hv.socket_path, "--pages", "16"]
        cmd += ["--modes", "batched", "--json", "--timeline", str(seen)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        assert hv.stop() == 0
    served_spans = [e for e in json.loads(served.read_text())["traceEvents"] if e["ph"] == "X"]
    assert [e["args"]["name"] for e in served_spans if e["cat"] == "domain"] == ["batched"]
    seen_cats = {e.get("cat") for e in json.loads(seen.read_text())["traceEvents"]}
    assert {"guest", "phase"} <= seen_cats
    assert "trap" not in seen_cats


def test_guest_connects_to_the_hypervisors_default_socket() -> None:
    parser = build_parser()
    assert parser.parse_args(["guest"]).socket == DEFAULT_SOCKET
    assert parser.parse_args(["hypervisor"]).socket == DEFAULT_SOCKET


def test_trace_replay_compares_batched_by_default() -> None:
    args = build_parser().parse_args(["trace", "replay", "some.json"])
    assert "batched" in args.modes
    assert args.socket is None  # no socket: it starts a hypervisor of its own


def _complete(script: str, line: str) -> list[str]:
    """What bash offers for ``line`` (the cursor at its end) under ``script``."""
    words = line.split(" ")
    driver = (
        f"source {script}\n"
        f"COMP_WORDS=({' '.join(repr(w) for w in words)})\n"
        f"COMP_CWORD={len(words) - 1}\nCOMP_LINE={line!r}\nCOMP_POINT={len(line)}\n"
        "_shtab_pvemu\nprintf '%s\\n' \"${COMPREPLY[@]}\"\n"
    )
    done = subprocess.run(
        ["bash", "--norc", "--noprofile"],
        input=driver,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.split()


def test_bash_completion_knows_the_subcommands_and_their_options(tmp_path: Path) -> None:
    done = subprocess.run(
        [*PVEMU, "completion", "bash"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    script = tmp_path / "pvemu.bash"
    script.write_text(done.stdout)
    assert _complete(str(script), "pvemu ru") == ["run"]
    assert "--timeline" in _complete(str(script), "pvemu run --ti")
    assert set(_complete(str(script), "pvemu guest --mode ")) >= {"trap", "batched", "native"}
    assert _complete(str(script), "pvemu completion ") == ["bash", "zsh", "tcsh"]
    zsh = subprocess.run(
        [*PVEMU, "completion", "zsh"], capture_output=True, text=True, timeout=60, check=True
    )
    assert zsh.stdout.startswith("#compdef pvemu")


def test_an_unwritable_timeline_is_refused_before_any_work(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-folder" / "run.json")
    for argv in (["run", "--timeline", missing], ["guest", "--timeline", missing]):
        done = subprocess.run(
            [*PVEMU, *argv], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 2, argv
        assert "argument --timeline: no folder" in done.stderr
    assert not (tmp_path / "no-such-folder").exists()


def test_with_a_log_file_only_warnings_reach_the_console() -> None:
    import io

    import structlog

    from pvemu.shared import logs

    file, console = io.StringIO(), io.StringIO()
    level = logs._min_level  # what the other tests run with
    try:
        logs.configure_logging("auto", "info", console, file=file)
        log = structlog.get_logger("pvemu.test")
        log.info("mmu_update", records=3)
        log.warning("send_timeout", seconds=30)
    finally:
        structlog.reset_defaults()
        logs._min_level = level
    assert [json.loads(line)["event"] for line in file.getvalue().splitlines()] == [
        "mmu_update",
        "send_timeout",
    ]
    assert [json.loads(line)["event"] for line in console.getvalue().splitlines()] == [
        "send_timeout"
    ]
