"""The mode registry is the one list of modes; the docs and CLI read it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pvemu.guest.modes import (
    LINUX_RECORDS_PER_FLUSH,
    MODE_NAMES,
    MODES,
    SAFE_MODES,
    UNSAFE_MODES,
    docs_table,
    lazy_for_mode,
    mode,
)
from pvemu.shared import abi

DOCS = Path(__file__).resolve().parent.parent / "docs"
README = DOCS.parent / "README.md"


def test_the_architecture_doc_shows_the_registry_table() -> None:
    text = (DOCS / "architecture.md").read_text()
    shown = text.split("<!-- modes table -->\n")[1].split("<!-- end modes table -->")[0]
    assert shown == docs_table()


def test_the_readme_lists_every_mode_in_registry_order() -> None:
    rows = re.findall(r"^\| `(\w+)` \|", README.read_text(), flags=re.M)
    listed = [name for name in rows if name in MODES]
    assert listed == list(MODE_NAMES)


def test_the_registry_matches_design_section_5() -> None:
    assert MODE_NAMES == ("native", "trap", "ptwr", "xen", "batched", "naive")
    assert {"naive"} == UNSAFE_MODES
    assert SAFE_MODES == ("native", "trap", "ptwr", "xen", "batched")
    per = LINUX_RECORDS_PER_FLUSH
    assert per == 31
    traps = {name: m.traps_per_pte_page(512, per) for name, m in MODES.items()}
    assert traps == {
        "native": 0,
        "trap": 1025,
        "ptwr": 1025,
        "xen": 18,
        "batched": 1,
        "naive": 1,
    }
    assert mode("naive").commit_cmd == abi.MMU_NORMAL_PT_UPDATE
    assert mode("xen").commit_cmd == mode("batched").commit_cmd == abi.MMU_PT_UPDATE_PRESERVE_AD
    assert [m.name for m in MODES.values() if not m.needs_hypervisor] == ["native"]
    assert [m.name for m in MODES.values() if m.tunable] == ["xen"]


def test_the_commit_command_reaches_the_lazy_machinery() -> None:
    for name, m in MODES.items():
        lazy = lazy_for_mode(name)
        assert (lazy.buffer is None) == (m.buffer == "none")
        if lazy.buffer is not None:
            assert lazy.commit_cmd == m.commit_cmd


def test_an_unknown_mode_names_the_choices() -> None:
    with pytest.raises(ValueError, match="choose from native, trap"):
        mode("fast")
