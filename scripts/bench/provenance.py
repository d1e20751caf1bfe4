"""Where a run came from: the git commit of the measured code, the host,
Python and package versions; :func:`new_run` stamps them on a run."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Final

from pvemu.scripts.results import Point, Run

#: Packages whose versions each run records.
RECORDED_PACKAGES: Final = ("pvemu", "trio", "msgpack", "structlog", "rich", "matplotlib", "numpy")
#: Where the project's source lives (for the git commit of the measured code):
#: this file is scripts/bench/provenance.py.
SOURCE_ROOT: Final = Path(__file__).resolve().parents[2]


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


def machine() -> dict[str, Any]:
    """The CPU and platform results were measured on."""
    return {"cpus": os.cpu_count(), "cpu_model": _cpu_model(), "platform": platform.platform()}


def new_run(config: dict[str, Any], points: list[Point]) -> Run:
    sha, dirty = git_state()
    return Run(
        created_utc=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        git_sha=sha,
        git_dirty=dirty,
        host=platform.node(),
        python=f"{platform.python_implementation()} {platform.python_version()}",
        packages=package_versions(),
        config={**config, "machine": machine()},
        points=points,
    )


def run_block(run: Run) -> dict[str, Any]:
    """The metadata block every ``--json`` document carries under ``"run"``:
    when, which commit, which host and CPU, which versions, what was asked."""
    return {
        "id": run.id,
        "created_utc": run.created_utc,
        "git_sha": run.git_sha,
        "git_dirty": run.git_dirty,
        "host": run.host,
        "machine": run.config.get("machine", {}),
        "python": run.python,
        "pvemu_version": run.packages.get("pvemu"),
        "packages": run.packages,
        "config": run.config,
    }


def document(schema: str, config: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    """A command's ``--json`` document: ``schema`` (name/version), the
    metadata block of :func:`run_block` (the same as ``pvemu bench --json``)
    with ``config`` (the command's options), then the command's own keys."""
    return {"schema": schema, "run": run_block(new_run(config, [])), **body}


def without_metadata(doc: dict[str, Any]) -> dict[str, Any]:
    """A child's ``pvemu guest --json`` document as a parent's result: its
    schema and metadata block dropped (the parent's document carries one)."""
    return {k: v for k, v in doc.items() if k not in ("schema", "run")}
