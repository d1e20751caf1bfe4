"""Hostile guests: every rejection rule of ``mmuext_op`` (§3).

The foreigndom lookup and XSM, then each command: PIN (not owned, already
pinned, typed differently, failing validation at any depth), UNPIN,
NEW_BASEPTR, SET_LDT, the cache flushes, MARK_SUPER, unknown commands,
CLEAR_PAGE and COPY_PAGE.
"""

from __future__ import annotations

from typing import Final

import pytest

from pvemu.shared import abi
from tests.hostile.rejection import (
    BAD_L1_ENTRIES,
    EXT,
    Offence,
    Rule,
    bad_chain,
    check_rejection,
    const,
    copy_into_spare,
    ext_on,
    op,
    rule_cases,
    rules,
    with_bad_l1,
)
from tests.hostile.scene import BEYOND, UNKNOWN_DOMID, Scene
from tests.hvproc import HypervisorProcess

RULES: Final[tuple[Rule, ...]] = (
    # --- mmuext_op (§3)
    *rules(
        abi.ESRCH,
        "§3 foreigndom lookup fails (the own numeric domid, an unknown one)",
        EXT,
        (
            "ext_fd_is_own_numeric_domid",
            lambda s: Offence(op=(abi.MMUEXT_TLB_FLUSH_LOCAL, 0, 0), foreigndom=s.a.dom.domid),
        ),
        ("ext_fd_unknown", op(abi.MMUEXT_TLB_FLUSH_LOCAL, const(0), fd=UNKNOWN_DOMID)),
        scope="call",
    ),
    *rules(
        abi.EPERM,
        "§3 XSM denies a foreign FD (on a flush, and on PIN, whose owner FD names)",
        EXT,
        (
            "ext_flush_with_victim_fd",
            lambda s: Offence(op=(abi.MMUEXT_TLB_FLUSH_ALL, 0, 0), foreigndom=s.v.dom.domid),
        ),
        (
            "ext_pin_with_victim_fd",
            lambda s: Offence(op=(abi.MMUEXT_PIN_L1_TABLE, s.v.l1, 0), foreigndom=s.v.dom.domid),
        ),
        scope="xsm",
    ),
    *rules(
        abi.EINVAL,
        "§3 PIN: not owned / not RAM",
        EXT,
        ("pin_victim_l1", op(abi.MMUEXT_PIN_L1_TABLE, lambda s: s.v.l1)),
        ("pin_victim_marker", op(abi.MMUEXT_PIN_L1_TABLE, lambda s: s.v.marker)),
        ("pin_xen_frame", op(abi.MMUEXT_PIN_L4_TABLE, lambda s: s.a.xen)),
        ("pin_free_frame", op(abi.MMUEXT_PIN_L1_TABLE, Scene.free_frame)),
        ("pin_beyond_ram", op(abi.MMUEXT_PIN_L1_TABLE, const(BEYOND))),
    ),
    *rules(
        abi.EINVAL,
        "§3 PIN: already pinned (the refs taken are dropped again)",
        EXT,
        ("pin_already_pinned", op(abi.MMUEXT_PIN_L4_TABLE, lambda s: s.a.l4)),
    ),
    *rules(
        abi.EINVAL,
        "§3 PIN: frame already typed differently with refs",
        EXT,
        ("pin_l1_as_l2", op(abi.MMUEXT_PIN_L2_TABLE, lambda s: s.a.l1)),
        (
            "pin_rw_mapped_data_as_l1",
            lambda s: Offence(
                op=(abi.MMUEXT_PIN_L1_TABLE, s.a.data[0], 0), writable=(s.a.data[0],)
            ),
        ),
    ),
    *(
        rule
        for name, err, entry in BAD_L1_ENTRIES
        for rule in rules(
            err,
            "§3 PIN: validation failure -> that error",
            EXT,
            (f"pin_fails_validation_{name}", with_bad_l1(entry, ext_on(abi.MMUEXT_PIN_L1_TABLE))),
        )
    ),
    *rules(
        abi.EBUSY,
        "§3 PIN / NEW_BASEPTR: a validation failure deeper down -> that error",
        EXT,
        ("pin_l2_fails_nested_validation", bad_chain(2, ext_on(abi.MMUEXT_PIN_L2_TABLE))),
        ("new_baseptr_fails_deep_validation", bad_chain(4, ext_on(abi.MMUEXT_NEW_BASEPTR))),
    ),
    *rules(
        abi.EINVAL,
        "§3 UNPIN: not owned / not pinned",
        EXT,
        ("unpin_not_pinned", op(abi.MMUEXT_UNPIN_TABLE, lambda s: s.a.l1)),
        ("unpin_victim_root", op(abi.MMUEXT_UNPIN_TABLE, lambda s: s.v.l4)),
        ("unpin_xen_frame", op(abi.MMUEXT_UNPIN_TABLE, lambda s: s.a.xen)),
    ),
    *rules(
        abi.EINVAL,
        "§3 NEW_BASEPTR / NEW_USER_BASEPTR: the frame cannot become the root",
        EXT,
        ("new_baseptr_victim_root", op(abi.MMUEXT_NEW_BASEPTR, lambda s: s.v.l4)),
        ("new_baseptr_own_l1", op(abi.MMUEXT_NEW_BASEPTR, lambda s: s.a.l1)),
        ("new_user_baseptr_victim_root", op(abi.MMUEXT_NEW_USER_BASEPTR, lambda s: s.v.l4)),
    ),
    *rules(
        abi.EINVAL,
        "§3 SET_LDT: nr_ents > 8192, base not page-aligned or not a guest address",
        EXT,
        ("set_ldt_too_many_entries", op(abi.MMUEXT_SET_LDT, const(0x10000), 8193)),
        ("set_ldt_unaligned", op(abi.MMUEXT_SET_LDT, const(0x10008), 1)),
        ("set_ldt_in_xen_range", op(abi.MMUEXT_SET_LDT, const(abi.HYPERVISOR_VIRT_START), 1)),
    ),
    *rules(
        abi.EACCES,
        "§3 cache flush not permitted",
        EXT,
        ("flush_cache", op(abi.MMUEXT_FLUSH_CACHE, const(0))),
        ("flush_cache_global", op(abi.MMUEXT_FLUSH_CACHE_GLOBAL, const(0))),
    ),
    *rules(
        abi.EOPNOTSUPP,
        "§3 MARK_SUPER / UNMARK_SUPER",
        EXT,
        ("mark_super", op(abi.MMUEXT_MARK_SUPER, lambda s: s.a.data[1])),
        ("unmark_super", op(abi.MMUEXT_UNMARK_SUPER, lambda s: s.a.data[1])),
    ),
    *rules(
        abi.ENOSYS,
        "§3 unknown cmd",
        EXT,
        *(
            (f"ext_unknown_cmd_{cmd}", op(cmd, lambda s: s.a.data[1]))
            for cmd in (14, 21, 2**32 - 1)
        ),
    ),
    *rules(
        abi.EINVAL,
        "§3 CLEAR_PAGE: not owned RAM, or typed (a page table)",
        EXT,
        ("clear_victim_page", op(abi.MMUEXT_CLEAR_PAGE, lambda s: s.v.marker)),
        ("clear_xen_frame", op(abi.MMUEXT_CLEAR_PAGE, lambda s: s.a.xen)),
        ("clear_own_page_table", op(abi.MMUEXT_CLEAR_PAGE, lambda s: s.a.l1)),
    ),
    *rules(
        abi.EINVAL,
        "§3 COPY_PAGE: bad src; bad dst or dst not writable-typable",
        EXT,
        ("copy_from_victim", copy_into_spare(lambda s: s.v.marker)),
        ("copy_from_xen_frame", copy_into_spare(lambda s: s.a.xen)),
        (
            "copy_to_victim",
            lambda s: Offence(op=(abi.MMUEXT_COPY_PAGE, s.v.data[1], s.a.marker)),
        ),
        (
            "copy_to_own_page_table",
            lambda s: Offence(op=(abi.MMUEXT_COPY_PAGE, s.a.l1, s.a.marker)),
        ),
    ),
)


@pytest.mark.parametrize(("rule", "path"), rule_cases(RULES))
async def test_rejection_rule(hvp: HypervisorProcess, rule: Rule, path: str) -> None:
    """The rule's errno and ``done``; nothing else moved; no leaked ref or type."""
    await check_rejection(hvp, rule, path)
