"""Xen's PV MMU ABI numbers, with Xen's names (leading underscores dropped).

Every number the emulator speaks comes from here so that a trace of pvemu can be
read against Xen's public headers (xen.h, errno.h, features.h). Values follow
those headers (docs/sources.md §5-§6).
"""

from __future__ import annotations

from typing import Final

# --- hypercall numbers (xen.h) -------------------------------------------------
HYPERVISOR_set_trap_table: Final = 0
HYPERVISOR_mmu_update: Final = 1
HYPERVISOR_set_gdt: Final = 2
HYPERVISOR_stack_switch: Final = 3
HYPERVISOR_set_callbacks: Final = 4
HYPERVISOR_fpu_taskswitch: Final = 5
HYPERVISOR_sched_op_compat: Final = 6
HYPERVISOR_platform_op: Final = 7
HYPERVISOR_set_debugreg: Final = 8
HYPERVISOR_get_debugreg: Final = 9
HYPERVISOR_update_descriptor: Final = 10
HYPERVISOR_memory_op: Final = 12
HYPERVISOR_multicall: Final = 13
HYPERVISOR_update_va_mapping: Final = 14
HYPERVISOR_set_timer_op: Final = 15
HYPERVISOR_event_channel_op_compat: Final = 16
HYPERVISOR_xen_version: Final = 17
HYPERVISOR_console_io: Final = 18
HYPERVISOR_physdev_op_compat: Final = 19
HYPERVISOR_grant_table_op: Final = 20
HYPERVISOR_vm_assist: Final = 21
HYPERVISOR_update_va_mapping_otherdomain: Final = 22
HYPERVISOR_iret: Final = 23
HYPERVISOR_vcpu_op: Final = 24
HYPERVISOR_set_segment_base: Final = 25
HYPERVISOR_mmuext_op: Final = 26
HYPERVISOR_xsm_op: Final = 27
HYPERVISOR_nmi_op: Final = 28
HYPERVISOR_sched_op: Final = 29
HYPERVISOR_callback_op: Final = 30
HYPERVISOR_xenoprof_op: Final = 31
HYPERVISOR_event_channel_op: Final = 32
HYPERVISOR_physdev_op: Final = 33
HYPERVISOR_hvm_op: Final = 34
HYPERVISOR_sysctl: Final = 35
HYPERVISOR_domctl: Final = 36
HYPERVISOR_kexec_op: Final = 37
HYPERVISOR_tmem_op: Final = 38
HYPERVISOR_argo_op: Final = 39
HYPERVISOR_xenpmu_op: Final = 40
HYPERVISOR_dm_op: Final = 41
HYPERVISOR_hypfs_op: Final = 42

#: Names of the hypercalls pvemu implements, for logs and tables.
HYPERCALL_NAMES: Final[dict[int, str]] = {
    HYPERVISOR_mmu_update: "mmu_update",
    HYPERVISOR_multicall: "multicall",
    HYPERVISOR_update_va_mapping: "update_va_mapping",
    HYPERVISOR_vm_assist: "vm_assist",
    HYPERVISOR_update_va_mapping_otherdomain: "update_va_mapping_otherdomain",
    HYPERVISOR_mmuext_op: "mmuext_op",
}

#: Hypercalls pvemu counts but does not serve as a ``hypercall`` request:
#: ``iret``, the return to user mode after a page fault, rides on the
#: ``run_user`` that resumes the vCPU (``resume``, docs/protocol.md §3), so a
#: ``hypercall`` with its number is -ENOSYS like any other unserved one.
IMPLICIT_HYPERCALL_NAMES: Final[dict[int, str]] = {HYPERVISOR_iret: "iret"}

#: Every hypercall the counters report by number (served or implicit).
COUNTED_HYPERCALL_NAMES: Final[dict[int, str]] = {
    **HYPERCALL_NAMES,
    **IMPLICIT_HYPERCALL_NAMES,
}

# --- mmu_update sub-commands (ptr & 7) -----------------------------------------
MMU_NORMAL_PT_UPDATE: Final = 0
MMU_MACHPHYS_UPDATE: Final = 1
MMU_PT_UPDATE_PRESERVE_AD: Final = 2
MMU_PT_UPDATE_NO_TRANSLATE: Final = 3
#: pvemu's extension, not Xen's (Xen answers cmd 4 with -ENOSYS): exchange an
#: L1 entry for ``val`` and return the old one, A/D bits included, in the
#: reply (``Result.olds``). Only offered when the Welcome lists
#: :data:`XENFEAT_pvemu_mmu_pt_xchg` (docs/protocol.md).
MMU_PT_XCHG_PVEMU: Final = 4
#: Xen masks the command with sizeof(pte) - 1.
MMU_CMD_MASK: Final = 7

#: Bit 31 of ``count``: a resumed (continued) mmu_update / mmuext_op.
MMU_UPDATE_PREEMPTED: Final = 0x8000_0000

# --- mmuext_op commands ----------------------------------------------------------
MMUEXT_PIN_L1_TABLE: Final = 0
MMUEXT_PIN_L2_TABLE: Final = 1
MMUEXT_PIN_L3_TABLE: Final = 2
MMUEXT_PIN_L4_TABLE: Final = 3
MMUEXT_UNPIN_TABLE: Final = 4
MMUEXT_NEW_BASEPTR: Final = 5
MMUEXT_TLB_FLUSH_LOCAL: Final = 6
MMUEXT_INVLPG_LOCAL: Final = 7
MMUEXT_TLB_FLUSH_MULTI: Final = 8
MMUEXT_INVLPG_MULTI: Final = 9
MMUEXT_TLB_FLUSH_ALL: Final = 10
MMUEXT_INVLPG_ALL: Final = 11
MMUEXT_FLUSH_CACHE: Final = 12
MMUEXT_SET_LDT: Final = 13
MMUEXT_NEW_USER_BASEPTR: Final = 15
MMUEXT_CLEAR_PAGE: Final = 16
MMUEXT_COPY_PAGE: Final = 17
MMUEXT_FLUSH_CACHE_GLOBAL: Final = 18
MMUEXT_MARK_SUPER: Final = 19
MMUEXT_UNMARK_SUPER: Final = 20

# --- update_va_mapping flags -----------------------------------------------------
UVMF_NONE: Final = 0
UVMF_TLB_FLUSH: Final = 1
UVMF_INVLPG: Final = 2
UVMF_FLUSHTYPE_MASK: Final = 3
UVMF_MULTI: Final = 0
UVMF_LOCAL: Final = 0
UVMF_ALL: Final = 4
#: pvemu passes a UVMF_MULTI vCPU bitmap by value, shifted left by this much
#: (Xen passes a guest pointer, 8-byte aligned, in the same bits).
UVMF_MULTI_MASK_SHIFT: Final = 3

# --- vm_assist -------------------------------------------------------------------
VMASST_CMD_enable: Final = 0
VMASST_CMD_disable: Final = 1
VMASST_TYPE_writable_pagetables: Final = 2
VMASST_TYPE_m2p_strict: Final = 32

# --- domain ids ------------------------------------------------------------------
DOMID_FIRST_RESERVED: Final = 0x7FF0
DOMID_SELF: Final = 0x7FF0
DOMID_IO: Final = 0x7FF1
DOMID_XEN: Final = 0x7FF2
DOMID_COW: Final = 0x7FF3
DOMID_INVALID: Final = 0x7FF4
DOMID_ANY: Final = 0x7FF5
DOMID_IDLE: Final = 0x7FFF
DOMID_MASK: Final = 0x7FFF

# --- Xen errno values (returned negated) ----------------------------------------
EPERM: Final = 1
ENOENT: Final = 2
ESRCH: Final = 3
EINTR: Final = 4
ENOMEM: Final = 12
EACCES: Final = 13
EFAULT: Final = 14
EBUSY: Final = 16
EINVAL: Final = 22
ERANGE: Final = 34
ENOSYS: Final = 38
EILSEQ: Final = 84
ERESTART: Final = 85
EOPNOTSUPP: Final = 95

ERRNO_NAMES: Final[dict[int, str]] = {
    EPERM: "EPERM",
    ENOENT: "ENOENT",
    ESRCH: "ESRCH",
    EINTR: "EINTR",
    ENOMEM: "ENOMEM",
    EACCES: "EACCES",
    EFAULT: "EFAULT",
    EBUSY: "EBUSY",
    EINVAL: "EINVAL",
    ERANGE: "ERANGE",
    ENOSYS: "ENOSYS",
    EILSEQ: "EILSEQ",
    ERESTART: "ERESTART",
    EOPNOTSUPP: "EOPNOTSUPP",
}

# --- features --------------------------------------------------------------------
XENFEAT_writable_page_tables: Final = 0
XENFEAT_mmu_pt_update_preserve_ad: Final = 5
#: pvemu's extension flag for :data:`MMU_PT_XCHG_PVEMU`. Xen has one feature
#: submap (XENFEAT_NR_SUBMAPS = 1: flags 0..31); 63 is bit 31 of a second
#: submap Xen does not define, so it can never collide with a Xen flag.
XENFEAT_pvemu_mmu_pt_xchg: Final = 63

# --- page types (type_info bits 63..61) ------------------------------------------
PGT_none: Final = 0
PGT_l1_page_table: Final = 1
PGT_l2_page_table: Final = 2
PGT_l3_page_table: Final = 3
PGT_l4_page_table: Final = 4
PGT_seg_desc_page: Final = 5
PGT_shared_page: Final = 6
PGT_writable_page: Final = 7

# --- 64-bit PV address-space layout ----------------------------------------------
ROOT_PAGETABLE_FIRST_XEN_SLOT: Final = 256
ROOT_PAGETABLE_LAST_XEN_SLOT: Final = 271
HYPERVISOR_VIRT_START: Final = 0xFFFF_8000_0000_0000
HYPERVISOR_VIRT_END: Final = 0xFFFF_8800_0000_0000


def errno_name(rc: int) -> str:
    """Name a (negated) Xen return code, e.g. ``-22`` -> ``"-EINVAL"``."""
    if rc >= 0:
        return str(rc)
    return "-" + ERRNO_NAMES.get(-rc, str(-rc))
