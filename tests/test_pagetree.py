"""The pin and unpin batches: Linux's entry counts, order and shapes."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from pvemu.guest.multicall import McBuffer
from pvemu.guest.pagetree import (
    TreePage,
    linear_va,
    pin_entries,
    tree_counts,
    unpin_entries,
    walk_user_tree,
)
from pvemu.guest.pvops import queue_entries
from pvemu.shared import abi
from pvemu.shared.x86 import _PAGE_PRESENT, _PAGE_RW, LINEAR_MAP_BASE, PTE_MFN_MASK, make_pte


def identity(mfn: int) -> int:
    return mfn


def tree_of(l1_counts: list[int]) -> list[TreePage]:
    """A walk: per item an L3 with one L2 holding that many L1s; frames
    numbered in walk order."""
    pages: list[TreePage] = []
    mfn = 100
    for l1s in l1_counts:
        pages += [TreePage(mfn, 3), TreePage(mfn + 1, 2)]
        pages += [TreePage(mfn + 2 + i, 1) for i in range(l1s)]
        mfn += 2 + l1s
    return pages


shapes = st.lists(st.integers(0, 40), min_size=0, max_size=4)


@given(shapes)
def test_pin_and_unpin_have_linuxs_entry_counts(shape: list[int]) -> None:
    pages = tree_of(shape)
    p1, p2, p3 = tree_counts(pages)
    pin = pin_entries(pages, 1, 2, identity)
    unpin = unpin_entries(pages, 1, 2, {p.mfn for p in pages if p.level == 1}, identity)
    buffer = McBuffer(max_entries=None, max_arg_bytes=None)
    queue_entries(buffer, pin)
    assert buffer.pending_entries == 2 * p1 + p2 + p3 + 4
    buffer = McBuffer(max_entries=None, max_arg_bytes=None)
    queue_entries(buffer, unpin)
    assert buffer.pending_entries == 2 * p1 + p2 + p3 + 3  # the two L4 unpins merge


def test_pin_remaps_before_it_pins_and_unpin_unpins_before_it_remaps() -> None:
    pages = [TreePage(10, 3), TreePage(11, 2), TreePage(12, 1)]
    pin = pin_entries(pages, 1, 2, identity)
    assert pin == [
        ("uvm", linear_va(10), make_pte(10, pin[0][2] & ~PTE_MFN_MASK), 0),
        ("uvm", linear_va(11), pin[1][2], 0),
        ("uvm", linear_va(12), pin[2][2], 0),
        ("ext", abi.MMUEXT_PIN_L1_TABLE, 12, 1),
        ("uvm", linear_va(1), pin[4][2], abi.UVMF_TLB_FLUSH),
        ("ext", abi.MMUEXT_PIN_L4_TABLE, 1, 1),
        ("uvm", linear_va(2), pin[6][2], abi.UVMF_TLB_FLUSH),
        ("ext", abi.MMUEXT_PIN_L4_TABLE, 2, 1),
    ]
    assert all(e[2] & _PAGE_PRESENT and not e[2] & _PAGE_RW for e in pin if e[0] == "uvm")
    unpin = unpin_entries(pages, 1, 2, {12}, identity)
    assert [e[:2] for e in unpin] == [
        ("ext", abi.MMUEXT_UNPIN_TABLE),
        ("ext", abi.MMUEXT_UNPIN_TABLE),
        ("uvm", linear_va(2)),
        ("uvm", linear_va(10)),
        ("uvm", linear_va(11)),
        ("ext", abi.MMUEXT_UNPIN_TABLE),
        ("uvm", linear_va(12)),
        ("uvm", linear_va(1)),
    ]
    assert all(e[2] & _PAGE_RW for e in unpin if e[0] == "uvm")
    # A PTE page never pinned on its own (the booted tree's) is only remapped.
    assert ("ext", abi.MMUEXT_UNPIN_TABLE, 12, 1) not in unpin_entries(
        pages, 1, None, set(), identity
    )
    assert linear_va(3) == LINEAR_MAP_BASE + 3 * 4096


def test_walk_is_depth_first_over_the_user_half() -> None:
    """Tables laid out in a fake memory: L4 slots 0 and 300 (300 is above the
    user half: not walked), L3 -> two L2s, the first with two L1s."""
    memory: dict[int, np.ndarray] = {}

    def table(mfn: int, entries: dict[int, int]) -> None:
        words = np.zeros(512, dtype="<u8")
        for index, child in entries.items():
            words[index] = make_pte(child, _PAGE_PRESENT | _PAGE_RW)
        memory[mfn] = words

    table(1, {0: 10, 300: 99})
    table(10, {5: 20, 6: 30})
    table(20, {0: 21, 7: 22})
    table(30, {})

    def read(mfn: int, first: int, count: int) -> bytes:
        return memory[mfn][first : first + count].tobytes()

    assert walk_user_tree(read, 1) == [
        TreePage(10, 3),
        TreePage(20, 2),
        TreePage(21, 1),
        TreePage(22, 1),
        TreePage(30, 2),
    ]
