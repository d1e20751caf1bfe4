"""The ``pvemu`` command line (scripts/cli.py)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pvemu.scripts import cli

if TYPE_CHECKING:
    import argparse

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _plain_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixed width and no forced colour, so help and tables render the same everywhere."""
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.delenv("FORCE_COLOR", raising=False)


def test_help_describes_pvemu_and_lists_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: pvemu")
    assert "paravirtual hypervisor emulator" in out
    for command in cli.SUBCOMMANDS:
        assert command.name in out
        assert command.help in out


def test_no_subcommand_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "usage: pvemu" in captured.err
    assert "info" in captured.err


def test_unknown_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["no-such-command"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"pvemu {cli.package_version()}\n"


def test_version_is_the_installed_distribution() -> None:
    # `make test` installs the project (editable), so the metadata matches pyproject.
    with (REPO / "pyproject.toml").open("rb") as f:
        assert cli.package_version() == tomllib.load(f)["project"]["version"]


def test_version_fallback_when_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> str:
        raise PackageNotFoundError(name)

    monkeypatch.setattr(cli, "version", missing)
    assert cli.package_version() == "0.1.0+unknown"


def test_info_lists_served_hypercalls_and_features(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    rows = {
        (int(cells[0]), cells[1])
        for line in out.splitlines()
        if len(cells := [c.strip() for c in line.strip("│ ").split("│")]) == 2
        and cells[0].isdigit()
    }
    assert rows == {
        (1, "mmu_update"),
        (13, "multicall"),
        (14, "update_va_mapping"),
        (21, "vm_assist"),
        (22, "update_va_mapping_otherdomain"),
        (26, "mmuext_op"),
    }
    assert "XENFEAT_mmu_pt_update_preserve_ad" in out
    assert "XENFEAT_pvemu_mmu_pt_xchg" in out
    assert "-ENOSYS (-38)" in out
    # Honest: nothing beyond what the core serves.
    for absent in ("grant_table_op", "XENFEAT_writable_page_tables", "memory_op"):
        assert absent not in out


def test_info_json_has_the_metadata_block_and_the_same_abi(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import json

    assert cli.main(["info", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "pvemu-info/1"
    assert doc["run"]["pvemu_version"] == cli.package_version()
    assert {"created_utc", "git_sha", "host", "machine"} <= doc["run"].keys()
    assert {(h["nr"], h["name"]) for h in doc["hypercalls"]} >= {
        (1, "mmu_update"),
        (26, "mmuext_op"),
    }
    assert doc["implicit_hypercalls"] == [{"nr": 23, "name": "iret"}]
    assert doc["unknown_hypercall_rc"] == -38
    assert [(f["bit"], f["name"]) for f in doc["features"]] == [
        (5, "XENFEAT_mmu_pt_update_preserve_ad"),
        (63, "XENFEAT_pvemu_mmu_pt_xchg"),
    ]


def test_info_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: pvemu info")


def test_subcommands_come_from_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[int] = []

    def configure(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--pages", type=int, default=1)

    def run(args: argparse.Namespace) -> int:
        seen.append(args.pages)
        return 7

    extra = cli.Subcommand("demo", "a demo subcommand", configure, run)
    parser = cli.build_parser([*cli.SUBCOMMANDS, extra])
    args = parser.parse_args(["demo", "--pages", "4"])
    assert args.run(args) == 7
    assert seen == [4]
    assert "a demo subcommand" in parser.format_help()


def test_subcommand_names_are_unique() -> None:
    names = [command.name for command in cli.SUBCOMMANDS]
    assert len(names) == len(set(names))


def test_python_dash_m_scripts_version() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pvemu.scripts", "--version"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"pvemu {cli.package_version()}\n"
