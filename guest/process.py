"""Processes of the guest kernel: one address space each.

A :class:`Process` is what Linux keeps in an ``mm_struct`` (the part pvemu
models): its page-table root (an L4 frame, pinned while the process lives),
its VMAs, its page-table locks (the split PTE locks, one per PTE page, and
``page_table_lock`` for building tables), the PTE pages pinned on their
own, which vCPUs have its tree loaded, and which ever had (``mm_cpumask``,
what a TLB flush must reach).

A process made by ``fork`` or ``exec`` has two L4s, as on 64-bit Linux on
Xen PV: the kernel L4 and a user L4 whose user half mirrors it (every L4
entry is written to both); a context switch loads them with
``MMUEXT_NEW_BASEPTR`` and ``MMUEXT_NEW_USER_BASEPTR`` in one
``mmuext_op`` (Linux's ``xen_write_cr3``). The booted process and those
made by :meth:`~pvemu.guest.kernel.Kernel.spawn` have one L4 that serves as
both. The hardware model walks the kernel L4 for user accesses too, which
the mirror makes equivalent. The kernel's own tree (``init_mm``, pid 0
here) has no user half: it is loaded with user base 0, as ``leave_mm`` does.

Scheduling is the workload's business: it says which process runs on which
vCPU (:meth:`pvemu.guest.kernel.Kernel.switch_to`); a user access on a vCPU
runs in the process loaded there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

import trio

from .vma import AddressSpace

#: The process the booted tree belongs to (``init``).
INIT_PID: Final = 1
#: The kernel's own tree (``init_mm``): no user mappings, loaded on a vCPU
#: that must leave a process's tree (``leave_mm``).
IDLE_PID: Final = 0


@dataclass(eq=False)
class Process:
    """One address space: its tree, VMAs, locks and where it is loaded."""

    pid: int
    #: The L4 frame: kernel and user base pointer both.
    l4: int
    mm: AddressSpace = field(default_factory=AddressSpace)
    #: Split PTE locks, one per PTE page (its frame), created on first use.
    ptl: dict[int, trio.Lock] = field(default_factory=dict)
    #: ``page_table_lock``: held while tables are built above the PTE level.
    table_lock: trio.Lock = field(default_factory=trio.Lock)
    #: The user L4 (``NEW_USER_BASEPTR``), or None when ``l4`` serves as both.
    user_l4: int | None = None
    #: PTE pages pinned on their own (``PIN_L1``: Linux's split PTE locks),
    #: by the tree's pin or when added to the pinned tree; the booted tree's
    #: first L1 is validated through the L4's pin and is not here.
    pinned: set[int] = field(default_factory=set)
    #: vCPUs with this tree loaded now (exit must switch them away).
    cpus: set[int] = field(default_factory=set)
    #: ``mm_cpumask`` as a bitmap: every vCPU that has loaded this tree. As
    #: on x86, a bit stays after the vCPU switches away (the mask is trimmed
    #: lazily, never here), so a flush may go to a CPU that no longer needs it.
    cpumask: int = 0

    def __post_init__(self) -> None:
        for vcpu in self.cpus:
            self.cpumask |= 1 << vcpu

    def lock(self, l1: int) -> trio.Lock:
        """The PTE lock of the PTE page in frame ``l1``."""
        lock = self.ptl.get(l1)
        if lock is None:
            lock = self.ptl[l1] = trio.Lock()
        return lock


class NoSuchProcess(LookupError):
    """A pid that is not (or no longer) a live process (ESRCH)."""

    def __init__(self, pid: int) -> None:
        super().__init__(f"no process {pid}")
        self.pid = pid


__all__ = ["IDLE_PID", "INIT_PID", "NoSuchProcess", "Process"]
