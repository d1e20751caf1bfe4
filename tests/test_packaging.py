"""The distribution installs one top-level import package, ``pvemu``."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FOLDERS = ("shared", "hypervisor", "guest", "scripts")


def test_every_package_folder_is_mapped_under_pvemu() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {
        str(init.parent.relative_to(REPO))
        for folder in FOLDERS
        for init in (REPO / folder).rglob("__init__.py")
    }
    expected = {"pvemu." + path.replace("/", ".") for path in found}
    assert set(config["packages"]) == expected
    for name in config["packages"]:
        top = name.split(".")[1]
        assert config["package-dir"][f"pvemu.{top}"] == top


def test_only_pvemu_is_importable_outside_the_repository(tmp_path: Path) -> None:
    """From another directory the venv imports ``pvemu.*`` and none of the
    folder names on their own (they would collide in a shared venv)."""
    code = (
        "import importlib.util, pvemu.scripts.cli, pvemu.guest.client\n"
        f"print([n for n in {FOLDERS!r} if importlib.util.find_spec(n) is not None])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
