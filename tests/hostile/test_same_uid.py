"""Hostile guests: another process of the hypervisor's user cannot reach into it.

The hypervisor and an attacking guest both run as uid 65534 (so this needs
root); the hypervisor being non-dumpable keeps its descriptors and memory out
of the attacker's reach, which a dumpable control process of that user shows
would otherwise be open.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest
import trio

from pvemu.guest.client import connect
from tests.hostile.scene import MACHINE_MIB, changed_words, counts, furnish, memory
from tests.hvproc import hypervisor_process

#: The repository, whose package folders the interpreter of uid 65534 imports.
REPO: Final = Path(__file__).resolve().parents[2]

NOBODY: Final = 65534

ATTACKER: Final = textwrap.dedent(
    """
    import ctypes, errno, json, os, sys, trio
    from pvemu.guest.client import connect

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    SYS_pidfd_open, SYS_pidfd_getfd = 434, 438

    def outcome(call):
        try:
            call()
        except OSError as exc:
            return errno.errorcode.get(exc.errno, str(exc.errno))
        return "ok"

    def opening(path):
        return lambda: os.close(os.open(path, os.O_RDONLY))

    def getfd(pid, target):
        def go():
            pidfd = libc.syscall(SYS_pidfd_open, pid, 0)
            if pidfd < 0:
                raise OSError(ctypes.get_errno(), "pidfd_open")
            try:
                got = libc.syscall(SYS_pidfd_getfd, pidfd, target, 0)
                if got < 0:
                    raise OSError(ctypes.get_errno(), "pidfd_getfd")
                os.close(got)
            finally:
                os.close(pidfd)
        return go

    async def main(path, hv, control):
        async with connect(path, memory_mib=1, name="same-uid guest") as dom:
            report = {
                "control_fd_dir": outcome(lambda: os.listdir(f"/proc/{control}/fd")),
                "control_fd_open": outcome(opening(f"/proc/{control}/fd/0")),
                "control_getfd": outcome(getfd(control, 0)),
                "hv_fd_dir": outcome(lambda: os.listdir(f"/proc/{hv}/fd")),
                "hv_fd_open": sorted({outcome(opening(f"/proc/{hv}/fd/{n}")) for n in range(64)}),
                "hv_mem": outcome(opening(f"/proc/{hv}/mem")),
                "hv_getfd": sorted({outcome(getfd(hv, n)) for n in range(64)}),
                "audit": await dom.audit(),
            }
        print(json.dumps(report))

    trio.run(main, sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    """
)


@pytest.fixture(scope="module")
def importable_tree() -> Iterator[Path]:
    """A directory where ``pvemu`` is the repository's packages (symlinks):
    what the editable install's finder does, for an interpreter that does
    not run the venv's site hooks. Removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="pvemu-import-"))
    try:
        package = root / "pvemu"
        package.mkdir()
        for name in ("shared", "hypervisor", "guest", "scripts"):
            (package / name).symlink_to(REPO / name)
        root.chmod(0o755)
        package.chmod(0o755)
        yield root
    finally:
        shutil.rmtree(root)


def interpreter_for(uid: int, tree: Path) -> tuple[str, dict[str, str]] | None:
    """A Python that ``uid`` can execute and that imports the project."""
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": os.pathsep.join([str(tree), sysconfig.get_paths()["purelib"]]),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in dict.fromkeys(
        [sys.executable, f"/usr/bin/{version}", f"/usr/local/bin/{version}"]
    ):
        try:
            check = subprocess.run(
                [
                    candidate,
                    "-c",
                    "import pvemu.guest.client, pvemu.hypervisor.server, pvemu.scripts.cli",
                ],
                user=uid,
                env=env,
                cwd="/",
                capture_output=True,
                timeout=60,
                check=False,
            )
        except OSError:
            continue
        if check.returncode == 0:
            return candidate, env
    return None


async def test_same_uid_guest_cannot_open_the_hypervisors_fds(importable_tree: Path) -> None:
    """The hypervisor makes itself non-dumpable, so a guest running as the
    same user cannot take another domain's memfd out of /proc/PID/fd or with
    pidfd_getfd. A dumpable process of that user, the control, shows the
    same attempts would otherwise work."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run the hypervisor and the attacker as uid 65534")
    found = interpreter_for(NOBODY, importable_tree)
    if found is None:
        pytest.skip("no Python interpreter that uid 65534 can run imports the project")
    python, env = found
    report: dict[str, Any] = {}
    with hypervisor_process(
        memory_mib=MACHINE_MIB, tag="nobody", user=NOBODY, python=python, env=env
    ) as hv:
        # Non-dumpable: its /proc entries now belong to root, not to its user.
        assert os.stat(f"/proc/{hv.proc.pid}/fd").st_uid == 0
        assert os.stat(f"/proc/{hv.proc.pid}").st_uid == NOBODY
        control = await trio.lowlevel.open_process(
            ["sleep", "60"], user=NOBODY, stdin=subprocess.DEVNULL
        )
        try:
            async with connect(hv.socket_path, memory_mib=1, name="victim") as victim:
                tree = await furnish(victim)
                before = memory(victim)
                stats_before = counts(await victim.stats())
                done = await trio.run_process(
                    [python, "-c", ATTACKER, hv.socket_path, str(hv.proc.pid), str(control.pid)],
                    user=NOBODY,
                    env=env,
                    cwd="/",
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
                assert done.returncode == 0, done.stderr.decode()
                report = json.loads(done.stdout)
                assert changed_words(before, memory(victim), victim) == []
                assert counts(await victim.stats()) == stats_before
                assert await victim.audit() == []
                assert tree.needle in memory(victim)
        finally:
            control.kill()
            with trio.CancelScope(shield=True):
                await control.wait()
    assert report == {
        "control_fd_dir": "ok",
        "control_fd_open": "ok",
        "control_getfd": "ok",
        "hv_fd_dir": "EACCES",
        "hv_fd_open": ["EACCES"],
        "hv_mem": "EACCES",
        "hv_getfd": ["EPERM"],
        "audit": [],
    }
