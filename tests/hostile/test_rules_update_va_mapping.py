"""Hostile guests: the rejection rules of ``update_va_mapping`` (§5).

Addresses no L2 covers, and ``update_va_mapping_otherdomain`` naming a bad or
a foreign domain. The mod_l1_entry errors it shares with ``mmu_update`` are
in the L1 rows of :mod:`tests.hostile.test_rules_mmu_update`. In the kernel's
linear map (pvemu's per-frame flag, docs/protocol.md §4) the value must map
the address's own frame, present, and never writable while the frame is a
page table in use; past the domain nothing is mapped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import pytest

from pvemu.shared import abi
from pvemu.shared.x86 import (
    _PAGE_NX,
    _PAGE_PAT,
    _PAGE_PRESENT,
    _PAGE_RW,
    LINEAR_MAP_BASE,
    PAGE_SIZE,
)
from pvemu.shared.x86 import make_pte as pte
from tests.hostile.rejection import (
    CALL,
    UVM,
    Offence,
    Rule,
    check_rejection,
    ro_data1,
    rule_cases,
    rules,
)
from tests.hostile.scene import DOMAIN_FRAMES, UNKNOWN_DOMID, USER_RW, Scene
from tests.hvproc import HypervisorProcess

#: Linux's PAGE_KERNEL_RO and PAGE_KERNEL for the linear map.
KERNEL_RO: Final = _PAGE_PRESENT | _PAGE_NX
KERNEL_RW: Final = KERNEL_RO | _PAGE_RW


def linear(frame: str, index: int = 0) -> Callable[[Scene], int]:
    """The linear-map address of the attacker's ``frame`` (``data`` by index)."""

    def va(s: Scene) -> int:
        mfn = s.a.data[index] if frame == "data" else getattr(s.a, frame)
        return LINEAR_MAP_BASE + (s.a.dom.pfn_of(mfn) << 12)

    return va


def remap(va: Callable[[Scene], int], val: Callable[[Scene], int]) -> Callable[[Scene], Offence]:
    return lambda s: Offence(va=va(s), val=val(s))


RULES: Final[tuple[Rule, ...]] = (
    # --- update_va_mapping (§5; its mod_l1_entry errors are the L1 rows above)
    *rules(
        abi.EINVAL,
        "§5 step 2: va not a guest address, or no (non-superpage) L2 covers it",
        UVM,
        *(
            (f"uvm_{name}", lambda s, v=va: Offence(va=v, val=ro_data1(s)))
            for name, va in (
                ("va_in_xen_range", abi.HYPERVISOR_VIRT_START + PAGE_SIZE),
                ("va_non_canonical", 1 << 47),
                ("no_l4_entry", 1 << 39),
                ("no_l3_entry", 1 << 30),
                ("no_l2_entry", 2 << 21),
            )
        ),
    ),
    *rules(
        abi.EINVAL,
        "pvemu's linear map (docs/protocol.md §4): the value must map the address's own "
        "frame, present, with no disallowed bit; RW refused for a page table in use "
        "(Xen refuses a writable mapping of a page table, §7)",
        UVM,
        ("uvm_linear_victim_frame", remap(linear("data"), lambda s: pte(s.v.data[0], KERNEL_RO))),
        (
            "uvm_linear_other_own_frame",
            remap(linear("data"), lambda s: pte(s.a.data[1], KERNEL_RO)),
        ),
        ("uvm_linear_xen_frame", remap(linear("data"), lambda s: pte(s.a.xen, KERNEL_RO))),
        ("uvm_linear_not_present", remap(linear("data"), lambda s: pte(s.a.data[0], _PAGE_NX))),
        (
            "uvm_linear_pat",
            remap(linear("data"), lambda s: pte(s.a.data[0], KERNEL_RO | _PAGE_PAT)),
        ),
        *(
            (f"uvm_linear_rw_{t}", remap(linear(t), lambda s, t=t: pte(getattr(s.a, t), KERNEL_RW)))
            for t in ("l1", "l2", "l3", "l4")
        ),
        (
            "uvm_linear_past_the_domain",
            remap(
                lambda s: LINEAR_MAP_BASE + DOMAIN_FRAMES * PAGE_SIZE,
                lambda s: pte(s.a.data[0], KERNEL_RO),
            ),
        ),
    ),
    *rules(
        abi.ESRCH,
        "§6.7 update_va_mapping: -ESRCH (_otherdomain with a bad domid: unknown, or the "
        "caller's own numeric one, as for FD in §2.2 step 5)",
        CALL,
        (
            "uvm_otherdomain_unknown_domid",
            lambda s: Offence(
                call=(
                    abi.HYPERVISOR_update_va_mapping_otherdomain,
                    5 * PAGE_SIZE,
                    ro_data1(s),
                    abi.UVMF_INVLPG,
                    UNKNOWN_DOMID,
                )
            ),
        ),
        (
            "uvm_otherdomain_own_numeric_domid",
            lambda s: Offence(
                call=(
                    abi.HYPERVISOR_update_va_mapping_otherdomain,
                    5 * PAGE_SIZE,
                    ro_data1(s),
                    abi.UVMF_INVLPG,
                    s.a.dom.domid,
                )
            ),
        ),
    ),
    *rules(
        abi.EPERM,
        "§5 step 1 / §6.7 update_va_mapping: XSM denies a foreign owner (_otherdomain)",
        CALL,
        (
            "uvm_otherdomain_victim_frame",
            lambda s: Offence(
                call=(
                    abi.HYPERVISOR_update_va_mapping_otherdomain,
                    5 * PAGE_SIZE,
                    pte(s.v.data[0], USER_RW),
                    abi.UVMF_INVLPG,
                    s.v.dom.domid,
                )
            ),
        ),
    ),
)


@pytest.mark.parametrize(("rule", "path"), rule_cases(RULES))
async def test_rejection_rule(hvp: HypervisorProcess, rule: Rule, path: str) -> None:
    """The rule's errno and ``done``; nothing else moved; no leaked ref or type."""
    await check_rejection(hvp, rule, path)
