"""Every number in ``shared.abi`` pinned against Xen's headers (docs/sources.md §5-§6;
the §N.M below number the sections of the Xen PV MMU notes they came from).

The expected values below are transcribed from the reference, not from abi.py,
so a typo on either side shows up as a failure.
"""

from __future__ import annotations

import pytest

from pvemu.shared import abi

# §1.1: hypercall numbers (11 is unused).
HYPERCALLS = {
    "set_trap_table": 0,
    "mmu_update": 1,
    "set_gdt": 2,
    "stack_switch": 3,
    "set_callbacks": 4,
    "fpu_taskswitch": 5,
    "sched_op_compat": 6,
    "platform_op": 7,
    "set_debugreg": 8,
    "get_debugreg": 9,
    "update_descriptor": 10,
    "memory_op": 12,
    "multicall": 13,
    "update_va_mapping": 14,
    "set_timer_op": 15,
    "event_channel_op_compat": 16,
    "xen_version": 17,
    "console_io": 18,
    "physdev_op_compat": 19,
    "grant_table_op": 20,
    "vm_assist": 21,
    "update_va_mapping_otherdomain": 22,
    "iret": 23,
    "vcpu_op": 24,
    "set_segment_base": 25,
    "mmuext_op": 26,
    "xsm_op": 27,
    "nmi_op": 28,
    "sched_op": 29,
    "callback_op": 30,
    "xenoprof_op": 31,
    "event_channel_op": 32,
    "physdev_op": 33,
    "hvm_op": 34,
    "sysctl": 35,
    "domctl": 36,
    "kexec_op": 37,
    "tmem_op": 38,
    "argo_op": 39,
    "xenpmu_op": 40,
    "dm_op": 41,
    "hypfs_op": 42,
}

# §2.1: mmu_update sub-commands.
MMU_COMMANDS = {
    "MMU_NORMAL_PT_UPDATE": 0,
    "MMU_MACHPHYS_UPDATE": 1,
    "MMU_PT_UPDATE_PRESERVE_AD": 2,
    "MMU_PT_UPDATE_NO_TRANSLATE": 3,
}

# §3: mmuext_op commands (14 is not a command).
MMUEXT_COMMANDS = {
    "MMUEXT_PIN_L1_TABLE": 0,
    "MMUEXT_PIN_L2_TABLE": 1,
    "MMUEXT_PIN_L3_TABLE": 2,
    "MMUEXT_PIN_L4_TABLE": 3,
    "MMUEXT_UNPIN_TABLE": 4,
    "MMUEXT_NEW_BASEPTR": 5,
    "MMUEXT_TLB_FLUSH_LOCAL": 6,
    "MMUEXT_INVLPG_LOCAL": 7,
    "MMUEXT_TLB_FLUSH_MULTI": 8,
    "MMUEXT_INVLPG_MULTI": 9,
    "MMUEXT_TLB_FLUSH_ALL": 10,
    "MMUEXT_INVLPG_ALL": 11,
    "MMUEXT_FLUSH_CACHE": 12,
    "MMUEXT_SET_LDT": 13,
    "MMUEXT_NEW_USER_BASEPTR": 15,
    "MMUEXT_CLEAR_PAGE": 16,
    "MMUEXT_COPY_PAGE": 17,
    "MMUEXT_FLUSH_CACHE_GLOBAL": 18,
    "MMUEXT_MARK_SUPER": 19,
    "MMUEXT_UNMARK_SUPER": 20,
}

# §5: update_va_mapping flags.
UVMF_FLAGS = {
    "UVMF_NONE": 0,
    "UVMF_TLB_FLUSH": 1,
    "UVMF_INVLPG": 2,
    "UVMF_FLUSHTYPE_MASK": 3,
    "UVMF_MULTI": 0,
    "UVMF_LOCAL": 0,
    "UVMF_ALL": 4,
}

# §1.2: vm_assist commands and types.
VMASST = {
    "VMASST_CMD_enable": 0,
    "VMASST_CMD_disable": 1,
    "VMASST_TYPE_writable_pagetables": 2,
    "VMASST_TYPE_m2p_strict": 32,
}

# §1.4: domain ids.
DOMIDS = {
    "DOMID_FIRST_RESERVED": 0x7FF0,
    "DOMID_SELF": 0x7FF0,
    "DOMID_IO": 0x7FF1,
    "DOMID_XEN": 0x7FF2,
    "DOMID_COW": 0x7FF3,
    "DOMID_INVALID": 0x7FF4,
    "DOMID_ANY": 0x7FF5,
    "DOMID_IDLE": 0x7FFF,
    "DOMID_MASK": 0x7FFF,
}

# §1.4: Xen errno values.
ERRNOS = {
    "EPERM": 1,
    "ENOENT": 2,
    "ESRCH": 3,
    "EINTR": 4,
    "ENOMEM": 12,
    "EACCES": 13,
    "EFAULT": 14,
    "EBUSY": 16,
    "EINVAL": 22,
    "ERANGE": 34,
    "ENOSYS": 38,
    "EILSEQ": 84,
    "ERESTART": 85,
    "EOPNOTSUPP": 95,
}

# §1.4: features.h.
XENFEATS = {
    "XENFEAT_writable_page_tables": 0,
    "XENFEAT_mmu_pt_update_preserve_ad": 5,
}

# pvemu's own extension (docs/protocol.md): numbers Xen does not use.
PVEMU_EXTENSIONS = {
    "MMU_PT_XCHG_PVEMU": 4,
    "XENFEAT_pvemu_mmu_pt_xchg": 63,
}

# §6.1: type_info bits 63..61.
PAGE_TYPES = {
    "PGT_none": 0,
    "PGT_l1_page_table": 1,
    "PGT_l2_page_table": 2,
    "PGT_l3_page_table": 3,
    "PGT_l4_page_table": 4,
    "PGT_seg_desc_page": 5,
    "PGT_shared_page": 6,
    "PGT_writable_page": 7,
}

# §0.3, §2.1, §2.2, §8: layout and framing.
LAYOUT = {
    "ROOT_PAGETABLE_FIRST_XEN_SLOT": 256,
    "ROOT_PAGETABLE_LAST_XEN_SLOT": 271,
    "HYPERVISOR_VIRT_START": 0xFFFF_8000_0000_0000,
    "HYPERVISOR_VIRT_END": 0xFFFF_8800_0000_0000,
    "MMU_CMD_MASK": 7,
    "MMU_UPDATE_PREEMPTED": 0x8000_0000,
}

ALL_GROUPS = {
    **{f"HYPERVISOR_{name}": nr for name, nr in HYPERCALLS.items()},
    **MMU_COMMANDS,
    **MMUEXT_COMMANDS,
    **UVMF_FLAGS,
    **VMASST,
    **DOMIDS,
    **ERRNOS,
    **XENFEATS,
    **PVEMU_EXTENSIONS,
    **PAGE_TYPES,
    **LAYOUT,
}


@pytest.mark.parametrize(("name", "value"), sorted(ALL_GROUPS.items()))
def test_value_matches_reference(name: str, value: int) -> None:
    assert getattr(abi, name) == value


def test_uvmf_multi_mask_clear_of_flag_bits() -> None:
    """pvemu passes the UVMF_MULTI vCPU bitmap by value above the flag bits."""
    assert abi.UVMF_MULTI_MASK_SHIFT == 3
    for mask in (1, 0b1011, (1 << 60) - 1):
        shifted = mask << abi.UVMF_MULTI_MASK_SHIFT
        assert shifted & (abi.UVMF_FLUSHTYPE_MASK | abi.UVMF_ALL) == 0
        assert shifted >> abi.UVMF_MULTI_MASK_SHIFT == mask


def test_hypercall_11_is_unused() -> None:
    numbers = [v for k, v in vars(abi).items() if k.startswith("HYPERVISOR_") and "VIRT" not in k]
    assert 11 not in numbers
    assert len(numbers) == len(set(numbers)) == len(HYPERCALLS)


def test_mmuext_14_is_not_a_command() -> None:
    numbers = [v for k, v in vars(abi).items() if k.startswith("MMUEXT_")]
    assert 14 not in numbers
    assert len(numbers) == len(set(numbers))


def test_xen_l4_slots_cover_hypervisor_virt_range() -> None:
    # 16 slots of 512 GiB each, starting at the bottom of the upper canonical half.
    slot_span = 1 << 39
    first, last = abi.ROOT_PAGETABLE_FIRST_XEN_SLOT, abi.ROOT_PAGETABLE_LAST_XEN_SLOT
    start, end = abi.HYPERVISOR_VIRT_START, abi.HYPERVISOR_VIRT_END
    assert last - first + 1 == 16
    assert end - start == 16 * slot_span
    assert (start >> 39) & 0x1FF == first
    assert ((end - 1) >> 39) & 0x1FF == last


def test_mmu_command_mask_covers_every_command() -> None:
    for value in MMU_COMMANDS.values():
        assert value & abi.MMU_CMD_MASK == value
    assert abi.MMU_UPDATE_PREEMPTED == 1 << 31


def test_hypercall_names_are_the_served_set() -> None:
    assert abi.HYPERCALL_NAMES == {
        1: "mmu_update",
        13: "multicall",
        14: "update_va_mapping",
        21: "vm_assist",
        22: "update_va_mapping_otherdomain",
        26: "mmuext_op",
    }
    for nr, name in abi.HYPERCALL_NAMES.items():
        assert getattr(abi, f"HYPERVISOR_{name}") == nr


def test_iret_is_counted_by_name_but_not_served() -> None:
    """The iret rides on a resumed run_user (docs/protocol.md §3): the
    counters name it, ``pvemu info``'s served set does not."""
    assert abi.IMPLICIT_HYPERCALL_NAMES == {23: "iret"}
    assert abi.HYPERVISOR_iret not in abi.HYPERCALL_NAMES
    assert abi.COUNTED_HYPERCALL_NAMES == {**abi.HYPERCALL_NAMES, 23: "iret"}


def test_errno_names_cover_every_errno() -> None:
    expected = {value: name for name, value in ERRNOS.items()}
    assert dict(abi.ERRNO_NAMES) == expected


@pytest.mark.parametrize(("name", "value"), sorted(ERRNOS.items()))
def test_errno_name_of_negated_code(name: str, value: int) -> None:
    assert abi.errno_name(-value) == f"-{name}"


@pytest.mark.parametrize(("rc", "text"), [(0, "0"), (3, "3"), (-7, "-7"), (-1000, "-1000")])
def test_errno_name_success_and_unknown(rc: int, text: str) -> None:
    assert abi.errno_name(rc) == text
