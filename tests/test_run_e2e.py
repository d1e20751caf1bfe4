"""``pvemu run`` and ``pvemu guest`` end to end, as a user runs them: real
processes over the real socket, JSON on stdout."""

from __future__ import annotations

import json
import subprocess
import sys

from pvemu.guest.modes import MODE_NAMES
from tests.hvproc import hypervisor_process
from tests.test_kernel_counts import expected_traps


def test_pvemu_run_json_all_modes() -> None:
    pages = 34
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pvemu.scripts",
            "run",
            "--pages",
            str(pages),
            "--json",
            "--modes",
            ",".join(MODE_NAMES),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["schema"] == "pvemu-run/1"
    assert doc["pages"] == pages
    assert [r["mode"] for r in doc["results"]] == list(MODE_NAMES)
    for result in doc["results"]:
        assert result["counts_agree"] is True
        assert result["audit_clean"] is True
        assert result["unsafe"] is (result["mode"] == "naive")
        for phase, counts in result["phases"].items():
            assert counts["traps"] == expected_traps(result["mode"], pages, phase), (
                result["mode"],
                phase,
            )
            for key in ("hypercalls", "ptwr", "page_faults", "records", "flush_ops", "wall_s"):
                assert key in counts


def test_pvemu_guest_against_a_running_hypervisor() -> None:
    with hypervisor_process(tag="guest") as hvp:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pvemu.scripts",
                "guest",
                "--socket",
                hvp.socket_path,
                "--mode",
                "xen",
                "--pages",
                "600",
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert result["phases"]["protect_ro"]["traps"] == expected_traps("xen", 600, "protect_ro")
        human = subprocess.run(
            [
                sys.executable,
                "-m",
                "pvemu.scripts",
                "guest",
                "--socket",
                hvp.socket_path,
                "--mode",
                "batched",
                "--pages",
                "8",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert human.returncode == 0, human.stderr
        assert "protect_ro" in human.stdout
    nowhere = ["--socket", "/tmp/pvemu-no-such-dir/hv.sock"]
    missing = subprocess.run(
        [sys.executable, "-m", "pvemu.scripts", "guest", "--mode", "xen", *nowhere],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert missing.returncode == 1
    assert "is not running" in missing.stderr
