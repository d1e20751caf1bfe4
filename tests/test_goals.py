"""The speed-goal report (``make bench-goals``), run at toy sizes: its
plumbing and its document, never its timings."""

from __future__ import annotations

import json
import subprocess
import sys


def test_goals_quick_reports_every_goal_from_real_runs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pvemu.scripts.goals", "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["schema"] == "pvemu.goals/1"
    goals = doc["goals"]
    assert [g["unit"] for g in goals] == ["ns", "x", "x", "min"]
    for goal in goals:
        assert goal["measured"] > 0
        expected = (
            goal["measured"] <= goal["target"]
            if goal["at_most"]
            else goal["measured"] >= goal["target"]
        )
        assert goal["met"] is expected
        assert goal["command"]
    # Each measurement names the command that took it.
    assert "--modes trap,batched" in goals[1]["command"]
    assert goals[2]["command"] == "make bench-rtt"


def test_goals_refuses_nonpositive_sizes() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pvemu.scripts.goals", "--large", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "must be positive" in done.stderr
    assert "Traceback" not in done.stderr
