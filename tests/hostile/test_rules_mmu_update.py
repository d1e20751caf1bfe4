"""Hostile guests: every §6.7 rejection rule of ``mmu_update``.

The whole-call refusals (an unknown page-table owner or FD, §2.2), XSM's
refusal of foreign owners (§2.3), and each per-request rule: subcommands,
the ``ptr`` frame, L1 entries (also carried by update_va_mapping and ptwr),
L2/L3/L4 entries and their targets, targets failing validation, and
MACHPHYS_UPDATE.
"""

from __future__ import annotations

from typing import Final

import pytest

from pvemu.shared import abi
from pvemu.shared.x86 import (
    _PAGE_GLOBAL,
    _PAGE_PAT,
    _PAGE_PCD,
    _PAGE_PSE,
    _PAGE_PWT,
    PTE_MFN_MASK,
    maddr_of_entry,
)
from pvemu.shared.x86 import make_pte as pte
from tests.hostile.rejection import (
    BAD_L1_ENTRIES,
    L1,
    MMU,
    XCHG,
    Offence,
    Rule,
    as_l2_target,
    as_l3_target,
    at,
    bad_chain,
    check_rejection,
    const,
    l1,
    own_l1e5,
    own_l1e5_with_cmd,
    rec,
    ro_data1,
    rule_cases,
    rules,
    rw_data1_with,
    rw_own,
    unmap,
    upper,
    victim_pfd,
    with_bad_l1,
)
from tests.hostile.scene import BEYOND, TABLE, UNKNOWN_DOMID, USER_RO, USER_RW, Scene
from tests.hvproc import HypervisorProcess

S67 = "§6.7 mmu_update per request: "
WHOLE = "§6.7 mmu_update whole call: "
NOT_OWNED_PTR = S67 + "frame of ptr not owned by the PT owner / not RAM"
L1_FLAGS = S67 + "new L1 entry has PWT/PCD/PAT"
L1_NOT_FD = S67 + "new L1 maps a RAM frame not owned by FD (or unallocated)"
UPPER_FLAGS = S67 + "new L2/L3/L4 entry has PWT/PCD/PSE/G"
UPPER_NOT_OWNED = S67 + "new L2/L3/L4 target frame not owned by the domain"
UPPER_TYPED = S67 + "new L2/L3/L4 target typed differently with refs"
XCHG_NOT_L1 = "pvemu MMU_PT_XCHG_PVEMU: the target is not an entry of the caller's validated L1"
XCHG_IN_MULTICALL = "pvemu MMU_PT_XCHG_PVEMU in a multicall entry (no room for the olds)"

RULES: Final[tuple[Rule, ...]] = (
    # --- mmu_update, whole call (§2.2): done 0, nothing applied
    *rules(
        abi.ESRCH,
        WHOLE + "PFD (foreigndom >> 16) names a non-existent domain",
        MMU,
        ("pt_owner_unknown", rec(own_l1e5, ro_data1, (UNKNOWN_DOMID + 1) << 16 | abi.DOMID_SELF)),
        scope="call",
    ),
    *rules(
        abi.ESRCH,
        WHOLE + "FD is the caller's own numeric domid, or unknown",
        MMU,
        ("fd_is_own_numeric_domid", lambda s: Offence(s.a.l1e(5), ro_data1(s), s.a.dom.domid)),
        ("fd_unknown", rec(own_l1e5, ro_data1, UNKNOWN_DOMID)),
        scope="call",
    ),
    # --- XSM (§2.3 step 4): an unprivileged domain acts on itself only
    *rules(
        abi.EPERM,
        S67 + "XSM denies a foreign PT owner (also MACHPHYS_UPDATE with foreign PFD)",
        MMU,
        ("pt_owner_is_victim", lambda s: Offence(s.v.l1e(0), 0, victim_pfd(s))),
        (
            "machphys_pt_owner_is_victim",
            lambda s: Offence(s.a.data[1] << 12 | abi.MMU_MACHPHYS_UPDATE, 7, victim_pfd(s)),
        ),
        scope="xsm",
    ),
    *rules(
        abi.EPERM,
        S67 + "XSM denies a foreign FD",
        MMU,
        ("fd_is_victim", lambda s: Offence(s.a.l1e(5), pte(s.v.data[0], USER_RO), s.v.dom.domid)),
        scope="xsm",
    ),
    # --- per request
    *rules(
        abi.ENOSYS,
        S67 + "ptr & 7 in 5..7 (4 is pvemu's MMU_PT_XCHG_PVEMU)",
        MMU,
        *((f"subcommand_{cmd}", rec(own_l1e5_with_cmd(cmd), ro_data1)) for cmd in range(5, 8)),
    ),
    # --- pvemu's MMU_PT_XCHG_PVEMU: L1 entries only, and never in a multicall
    *rules(
        abi.EINVAL,
        XCHG_NOT_L1,
        XCHG,
        ("xchg_l2_entry", rec(at(lambda s: s.a.l2, 0), unmap)),
        ("xchg_l3_entry", rec(at(lambda s: s.a.l3, 0), unmap)),
        ("xchg_l4_entry", rec(at(lambda s: s.a.l4, 0), unmap)),
        ("xchg_l4_xen_slot", rec(at(lambda s: s.a.l4, 256), unmap)),
        ("xchg_untyped_own_frame", rec(at(lambda s: s.a.marker), unmap)),
        ("xchg_rw_mapped_data_frame", rec(at(lambda s: s.a.data[0]), unmap)),
    ),
    *rules(
        abi.EOPNOTSUPP,
        XCHG_IN_MULTICALL,
        ("multicall.mmu_update",),
        ("xchg_in_multicall", rec(own_l1e5_with_cmd(abi.MMU_PT_XCHG_PVEMU), unmap)),
    ),
    *rules(
        abi.EPERM,
        S67 + "XSM denies a foreign PT owner or FD (exchange too)",
        XCHG,
        ("xchg_pt_owner_is_victim", lambda s: Offence(s.v.l1e(0), 0, victim_pfd(s))),
        (
            "xchg_fd_is_victim",
            lambda s: Offence(s.a.l1e(5), pte(s.v.data[0], USER_RO), s.v.dom.domid),
        ),
        scope="xsm",
    ),
    *rules(
        abi.EINVAL,
        NOT_OWNED_PTR,
        (*MMU, *XCHG),
        ("ptr_in_victim_l1", rec(lambda s: s.v.l1e(0), unmap)),
        ("ptr_in_victim_untyped_frame", rec(at(lambda s: s.v.marker), unmap)),
        ("ptr_in_xen_frame", rec(at(lambda s: s.a.xen, 1), unmap)),
        ("ptr_in_free_frame", rec(at(Scene.free_frame), unmap)),
        ("ptr_beyond_ram", rec(const(BEYOND << 12), unmap)),
        ("ptr_top_of_address_space", rec(const((1 << 64) - 8), unmap)),
    ),
    *rules(
        abi.EINVAL,
        S67 + "L4 slot 256..271",
        MMU,
        *((f"l4_xen_slot_{n}", rec(at(lambda s: s.a.l4, n), unmap)) for n in (256, 271)),
    ),
    *rules(
        abi.EINVAL,
        L1_FLAGS,
        L1,
        *(
            (f"l1_{name}", l1(rw_data1_with(bit)))
            for name, bit in (("pwt", _PAGE_PWT), ("pcd", _PAGE_PCD), ("pat", _PAGE_PAT))
        ),
    ),
    *rules(
        abi.EINVAL,
        L1_FLAGS + " (§2.6: checked on PRESERVE_AD's val too)",
        MMU,
        (
            "l1_pat_preserve_ad",
            rec(
                lambda s: s.a.l1e(5) | abi.MMU_PT_UPDATE_PRESERVE_AD,
                lambda s: pte(s.a.data[1], USER_RW | _PAGE_PAT),
            ),
        ),
    ),
    *rules(
        abi.EPERM,
        S67 + "new L1 maps MMIO/non-RAM without I/O permission",
        L1,
        ("l1_non_ram", l1(const(pte(BEYOND, USER_RO)))),
    ),
    *rules(
        abi.EINVAL,
        "§6.4 rule 2: a non-RAM frame field of all ones",
        L1,
        ("l1_frame_all_ones", l1(const(PTE_MFN_MASK | USER_RO))),
    ),
    *rules(
        abi.EBUSY,
        L1_NOT_FD,
        L1,
        ("l1_victim_frame_ro", l1(lambda s: pte(s.v.data[0], USER_RO))),
        ("l1_victim_frame_rw", l1(lambda s: pte(s.v.data[0], USER_RW))),
        ("l1_victim_marker", l1(lambda s: pte(s.v.marker, USER_RO))),
        ("l1_victim_root", l1(lambda s: pte(s.v.l4, USER_RO))),
        # over a live mapping: the old entry keeps its references
        ("l1_replace_mapping_with_victim_frame", l1(lambda s: pte(s.v.data[0], USER_RW), 0)),
        ("l1_free_frame", l1(lambda s: pte(s.free_frame(), USER_RO))),
        ("l1_xen_frame", l1(lambda s: pte(s.a.xen, USER_RO))),
    ),
    *rules(
        abi.EBUSY,
        L1_NOT_FD + " (§2.1: NO_TRANSLATE is NORMAL for PV)",
        MMU,
        (
            "l1_no_translate_victim_frame",
            rec(
                lambda s: s.a.l1e(5) | abi.MMU_PT_UPDATE_NO_TRANSLATE,
                lambda s: pte(s.v.data[0], USER_RO),
            ),
        ),
    ),
    *rules(
        abi.EBUSY,
        S67 + "new L1 maps RW a frame typed as page table",
        L1,
        *((f"l1_rw_own_{level}", l1(rw_own(level))) for level in ("l1", "l1b", "l2", "l3", "l4")),
    ),
    *rules(
        abi.EINVAL,
        UPPER_FLAGS,
        MMU,
        *(
            (f"l2_{name}", upper("l2", 2, lambda s: s.a.l1, TABLE | bit))
            for name, bit in (
                ("pwt", _PAGE_PWT),
                ("pcd", _PAGE_PCD),
                ("pse", _PAGE_PSE),
                ("global", _PAGE_GLOBAL),
            )
        ),
        ("l3_pse", upper("l3", 1, lambda s: s.a.l2, TABLE | _PAGE_PSE)),
        ("l4_pcd", upper("l4", 1, lambda s: s.a.l3, TABLE | _PAGE_PCD)),
    ),
    *rules(
        abi.EINVAL,
        UPPER_NOT_OWNED,
        MMU,
        ("l2_target_victim_l1", upper("l2", 2, lambda s: s.v.l1)),
        ("l2_target_victim_marker", upper("l2", 2, lambda s: s.v.marker)),
        ("l4_target_victim_l3", upper("l4", 1, lambda s: s.v.l3)),
        ("l2_target_xen_frame", upper("l2", 2, lambda s: s.a.xen)),
        ("l2_target_free_frame", upper("l2", 2, Scene.free_frame)),
        ("l2_target_beyond_ram", upper("l2", 2, const(BEYOND))),
    ),
    *rules(
        abi.EINVAL,
        UPPER_TYPED,
        MMU,
        (
            "l2_target_rw_mapped_data",
            lambda s: Offence(
                maddr_of_entry(s.a.l2, 2), pte(s.a.data[0], TABLE), writable=(s.a.data[0],)
            ),
        ),
        ("l3_target_is_l1", upper("l3", 1, lambda s: s.a.l1)),
        ("l4_target_is_l1", upper("l4", 1, lambda s: s.a.l1)),
        ("l2_target_is_l3", upper("l2", 2, lambda s: s.a.l3)),
        ("l2_target_is_pinned_root", upper("l2", 2, lambda s: s.a.l4)),
    ),
    *rules(
        abi.EINVAL,
        UPPER_TYPED + ": a linear page table (§6.3, pv-linear-pt off)",
        MMU,
        ("linear_l2", upper("l2", 2, lambda s: s.a.l2, USER_RO)),
        ("linear_l4", upper("l4", 1, lambda s: s.a.l4, USER_RO)),
    ),
    *(
        rule
        for name, err, entry in BAD_L1_ENTRIES
        for rule in rules(
            err,
            S67 + "new target needs validation and it fails: the inner error",
            MMU,
            (f"l2_target_fails_validation_{name}", with_bad_l1(entry, as_l2_target)),
        )
    ),
    *rules(
        abi.EBUSY,
        S67 + "new target needs validation and it fails two levels down: the inner error",
        MMU,
        ("l3_target_fails_nested_validation", bad_chain(2, as_l3_target)),
    ),
    *rules(
        abi.EINVAL,
        S67 + "MACHPHYS_UPDATE of a frame not owned by FD (§2.8)",
        MMU,
        ("machphys_victim_frame", rec(lambda s: s.v.data[0] << 12 | 1, const(7))),
        ("machphys_beyond_ram", rec(const(BEYOND << 12 | 1), const(7))),
    ),
)


@pytest.mark.parametrize(("rule", "path"), rule_cases(RULES))
async def test_rejection_rule(hvp: HypervisorProcess, rule: Rule, path: str) -> None:
    """The rule's errno and ``done``; nothing else moved; no leaked ref or type."""
    await check_rejection(hvp, rule, path)
