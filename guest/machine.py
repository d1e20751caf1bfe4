"""What the guest kernel runs on: a PV domain (the client's ``Domain``), or
bare metal (``native``) in-process.

The kernel reads page tables directly (no trap) and changes them only through
its pv-ops backend; :class:`Machine` is the narrow seam both kinds of machine
offer the kernel.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import trio

from pvemu.shared import abi
from pvemu.shared.arrays import has_repeats
from pvemu.shared.mmu import BytearrayMemory, HardwareModel
from pvemu.shared.oracle import RaceOracle
from pvemu.shared.x86 import ENTRIES_PER_TABLE, PAGE_SIZE

from .ptes import pte_maddrs

if TYPE_CHECKING:
    from .ptes import Indexes, Ptes


def check_kernel_write(maddr: int, data: bytes) -> None:
    """A kernel store is 1..4096 bytes within one frame on every machine (Xen
    refuses the rest); anything else is the caller's bug, not a fault.

    Raises:
        ValueError: ``data`` is empty, too long, or crosses the frame of ``maddr``.
    """
    offset = maddr % PAGE_SIZE
    if not 1 <= len(data) <= PAGE_SIZE or offset + len(data) > PAGE_SIZE:
        raise ValueError(f"a kernel write is 1..4096 bytes in one frame: {len(data)} at {maddr:#x}")


class Machine(Protocol):
    """What the guest kernel needs of the machine under it, whatever the
    mode: frames, reading memory and the kernel's plain stores (no trap),
    running user code, counters.
    Changing page tables is the pv-ops backend's business: the client's
    ``Domain`` by hypercall, :class:`NativeMachine` by plain stores."""

    l4_mfn: int
    #: Feature flags of the machine (``abi.XENFEAT_*``): the Welcome's on PV.
    features: tuple[int, ...]

    @property
    def nr_vcpus(self) -> int: ...

    def has_feature(self, flag: int) -> bool: ...

    async def mmu_xchg(
        self, records: Sequence[tuple[int, int]], *, vcpu: int = 0
    ) -> tuple[int, list[int]]:
        """Exchange page-table entries ``(pte machine address, new value)``
        in order and return (rc, the old entries of those applied): one
        ``mmu_update`` of ``MMU_PT_XCHG_PVEMU`` records on PV (needs
        ``XENFEAT_pvemu_mmu_pt_xchg``), plain atomic exchanges on bare metal."""
        ...

    async def mmu_xchg_ptes(
        self, table: int, indexes: Indexes, values: Ptes | None = None, *, vcpu: int = 0
    ) -> tuple[int, Ptes]:
        """:meth:`mmu_xchg` of distinct entries ``indexes`` of the PTE page in
        frame ``table`` with ``values`` (None: 0), as arrays: (rc, olds)."""
        ...

    def alloc_frame(self) -> int: ...

    def free_frames(self) -> int: ...

    def read_u64(self, maddr: int) -> int: ...

    def read_bytes(self, maddr: int, length: int) -> bytes: ...

    def pfn_of(self, mfn: int) -> int: ...

    async def kernel_write(self, maddr: int, data: bytes, *, vcpu: int = 0) -> int:
        """A plain store of the kernel through its linear map, no trap: 0, or
        -EFAULT where the machine refuses it (under Xen: a read-only linear
        mapping, a page table in use, a frame not the domain's). ValueError
        (:func:`check_kernel_write`) for a store that is not 1..4096 bytes
        within one frame."""
        ...

    async def run_user(
        self, vcpu: int, accesses: Sequence[tuple[int, str, bytes | int]], *, resume: bool = False
    ) -> dict[str, Any]:
        """Run user accesses on ``vcpu`` until the first page fault.
        ``resume``: the vCPU returns to user mode after the kernel handled
        the fault that ended its previous run (an iret: a hypercall on PV)."""
        ...

    async def stats(self) -> dict[str, Any]: ...

    async def audit(self) -> list[str]: ...


class NativeMachine:
    """Bare metal: the same hardware model over the kernel's own memory.

    No hypervisor, so no trap is ever counted; the kernel writes its page
    tables directly (``write_u64``). PFN == MFN here.
    """

    #: Bare metal has no Xen features; it offers :meth:`mmu_xchg` (a plain
    #: exchange per record), so it names that one for mode-independent callers.
    features: tuple[int, ...] = (abi.XENFEAT_pvemu_mmu_pt_xchg,)

    def __init__(self, memory_mib: int, nr_vcpus: int) -> None:
        frames = memory_mib * (1 << 20) // PAGE_SIZE
        self.memory = BytearrayMemory(frames)
        # The same memory as u64 words, for the range form's whole-run access.
        self._words: Ptes = np.frombuffer(self.memory.buffer(), dtype="<u8")
        self.oracle = RaceOracle()
        oracle = self.oracle
        self.hw = HardwareModel(
            self.memory,
            nr_vcpus,
            on_dirty=lambda _vcpu, _va, pte_maddr: oracle.hardware_set_dirty(pte_maddr),
        )
        self._nr_vcpus = nr_vcpus
        self._free = list(range(frames - 1, 0, -1))  # frame 0 is never handed out
        self.page_faults = Counter[int]()
        self.l4_mfn = self.alloc_frame()
        for vcpu in range(nr_vcpus):
            self.hw.set_cr3(vcpu, self.l4_mfn)

    @property
    def nr_vcpus(self) -> int:
        return self._nr_vcpus

    def has_feature(self, flag: int) -> bool:
        return flag in self.features

    async def mmu_xchg(
        self, records: Sequence[tuple[int, int]], *, vcpu: int = 0
    ) -> tuple[int, list[int]]:
        """:meth:`xchg_u64` of each record in order, no trap: (0, olds).
        Bare metal checks nothing (the kernel owns its page tables)."""
        for maddr, _val in records:
            if maddr & 7:
                raise ValueError(f"PTE address {maddr:#x} is not 8-byte aligned")
        return 0, [self.xchg_u64(maddr, val) for maddr, val in records]

    def alloc_frame(self) -> int:
        if not self._free:
            raise MemoryError("out of memory")
        return self._free.pop()

    def free_frames(self) -> int:
        return len(self._free)

    def read_u64(self, maddr: int) -> int:
        return self.memory.read_u64(maddr)

    def write_u64(self, maddr: int, value: int) -> None:
        """Store a page-table entry (the kernel's only use of word stores)."""
        self.memory.write_u64(maddr, value)
        self.oracle.pte_written(maddr, value)

    def xchg_u64(self, maddr: int, value: int) -> int:
        """Atomic exchange: the old value, D included, comes back."""
        old = self.memory.read_u64(maddr)
        self.oracle.guest_saw(maddr)
        self.write_u64(maddr, value)
        return old

    def xchg_ptes(self, table: int, indexes: Indexes, values: Ptes | None = None) -> Ptes:
        """:meth:`xchg_u64` with ``values`` (None: 0) on distinct entries
        ``indexes`` of the PTE page in frame ``table``, as one array
        operation."""
        words = self._table(table)
        old = words[indexes]
        pteps = pte_maddrs(table, indexes)
        self.oracle.guest_saw_all(pteps)
        if values is None:
            words[indexes] = 0
            self.oracle.ptes_written(pteps, [0] * len(pteps))
        else:
            words[indexes] = values
            self.oracle.ptes_written(pteps, values.tolist())
        return old

    async def mmu_xchg_ptes(
        self, table: int, indexes: Indexes, values: Ptes | None = None, *, vcpu: int = 0
    ) -> tuple[int, Ptes]:
        """:meth:`xchg_ptes`, the machine-independent name: (0, olds)."""
        if has_repeats(indexes):
            raise ValueError("mmu_xchg_ptes: an entry index appears twice")
        return 0, self.xchg_ptes(table, indexes, values)

    def write_ptes(self, table: int, indexes: Indexes, values: Ptes) -> None:
        """:meth:`write_u64` of ``values`` to entries ``indexes`` of the PTE
        page in frame ``table``, as one array operation."""
        self._table(table)[indexes] = values
        self.oracle.ptes_written(pte_maddrs(table, indexes), values.tolist())

    def _table(self, mfn: int) -> Ptes:
        """The 512 entries of frame ``mfn`` as a writable array over memory."""
        if not 0 <= mfn < self.memory.nr_frames:
            raise IndexError(f"frame {mfn:#x} outside {self.memory.nr_frames} frames")
        return self._words[mfn * ENTRIES_PER_TABLE : (mfn + 1) * ENTRIES_PER_TABLE]

    def read_bytes(self, maddr: int, length: int) -> bytes:
        return self.memory.read_bytes(maddr, length)

    def write_bytes(self, maddr: int, data: bytes) -> None:
        self.memory.write_bytes(maddr, data)

    def pfn_of(self, mfn: int) -> int:
        """Bare metal: PFN == MFN."""
        return mfn

    async def kernel_write(self, maddr: int, data: bytes, *, vcpu: int = 0) -> int:
        """Bare metal: the kernel's linear map is its own, so a store is a
        plain write of memory, always 0 (at most one frame, 1..4096 bytes,
        as under Xen)."""
        check_kernel_write(maddr, data)
        self.memory.write_bytes(maddr, data)
        return 0

    async def run_user(
        self, vcpu: int, accesses: Sequence[tuple[int, str, bytes | int]], *, resume: bool = False
    ) -> dict[str, Any]:
        # ``resume`` is ignored: bare metal's iret is an instruction, not a trap.
        # Another CPU's user thread runs concurrently: let other tasks go first.
        await trio.lowlevel.checkpoint()
        stale_before = len(self.hw.stale_writes)
        outcome = self.hw.run(vcpu, accesses)
        for stale in self.hw.stale_writes[stale_before:]:
            self.oracle.stale_write(stale.va, stale.pte_maddr)
        fault = None
        if outcome.fault is not None:
            self.page_faults[vcpu] += 1
            fault = {"va": outcome.fault.va, "error_code": outcome.fault.error_code}
        return {"executed": outcome.executed, "reads": list(outcome.reads), "fault": fault}

    async def stats(self) -> dict[str, Any]:
        faults = sum(self.page_faults.values())
        zero = {"traps": 0, "hypercalls": 0, "ptwr": 0, "page_faults": 0}
        return {
            "guest": {"total": dict(zero)},
            "hypervisor": {"total": dict(zero), "hardware": self.oracle.as_dict()},
            "native": {"page_faults": faults},
        }

    async def audit(self) -> list[str]:
        return []


__all__ = ["Machine", "NativeMachine"]
