"""Domains and the machine state the hypercall handlers work on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pvemu.shared.oracle import RaceOracle

if TYPE_CHECKING:
    from array import array

    from pvemu.shared.mmu import HardwareModel

    from .counters import VcpuCounters
    from .frametable import FrameTable
    from .memory import DomainMemory, MachineMemory
    from .pagetypes import PageTypes


@dataclass(eq=False)
class Domain:
    """One PV guest: its frames, vCPUs (CR3 + TLB + counters) and assists."""

    domid: int
    name: str
    #: PFN -> MFN, one C array (a 16 GiB domain has four million frames).
    p2m: array[int]
    memory: DomainMemory
    hw: HardwareModel
    counters: list[VcpuCounters]
    #: Kernel base pointer (CR3) per vCPU; None until NEW_BASEPTR.
    cr3: list[int | None]
    #: User base pointer per vCPU (MMUEXT_NEW_USER_BASEPTR); None when unset.
    user_cr3: list[int | None]
    ldt: list[tuple[int, int]]
    writable_pagetables: bool = True
    m2p_strict: bool = False
    dead: bool = False
    secret: bytes = field(default=b"", repr=False)
    #: Lost-D and stale-TLB bookkeeping for this domain's page tables.
    oracle: RaceOracle = field(default_factory=RaceOracle, repr=False)
    #: Per vCPU: its last user run ended in a page fault reflected to the
    #: guest and it has not returned to user mode since (the one state in
    #: which ``HYPERVISOR_iret`` back to user mode is legal).
    fault_pending: list[bool] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not self.fault_pending:
            self.fault_pending = [False] * len(self.counters)

    @property
    def nr_vcpus(self) -> int:
        return len(self.counters)


@dataclass(eq=False)
class MachineState:
    """Everything a hypercall handler may touch, in one place."""

    frames: FrameTable
    memory: MachineMemory
    types: PageTypes
    domains: dict[int, Domain] = field(default_factory=dict)
