"""The x86-64 hardware model: page walks, Accessed/Dirty bits and per-vCPU TLBs.

Both sides run the same model so that every mode sees the same hardware: the
hypervisor drives it over machine memory (where A/D updates race with the guest's
read-only view), the ``native`` guest drives it over its own in-process memory.
It is pure and sans-I/O; memory is anything that satisfies :class:`PhysMemory`.

Only user-mode accesses are modelled (a 64-bit PV kernel runs in ring 3 too), so
every page-fault error code carries ``PF_USER``. Large pages are not modelled:
Xen rejects PSE in PV L2/L3 entries (docs/sources.md §7), so a walk always has four
levels. The TLB follows real hardware where the race matters: a write through a
cached, already-dirty translation does not look at the PTE, which is exactly how
a missing TLB flush becomes a lost protection change (:class:`StaleTlbWrite`).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Protocol

from pvemu.shared.x86 import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_NX,
    _PAGE_PRESENT,
    _PAGE_RW,
    _PAGE_USER,
    L1_PAGETABLE_SHIFT,
    L2_PAGETABLE_SHIFT,
    L3_PAGETABLE_SHIFT,
    L4_PAGETABLE_SHIFT,
    PAGE_SHIFT,
    PAGE_SIZE,
    PF_INSTR,
    PF_PROT,
    PF_USER,
    PF_WRITE,
    PTE_MFN_MASK,
    PTE_SIZE,
    is_canonical,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

__all__ = [
    "PhysMemory",
    "BytearrayMemory",
    "AccessKind",
    "PageFault",
    "StaleTlbWrite",
    "TlbEntry",
    "HardwareStats",
    "RunOutcome",
    "HardwareModel",
]

_OFFSET_MASK: Final = PAGE_SIZE - 1
_INDEX_MASK: Final = 0x1FF
_U64: Final = struct.Struct("<Q")
_MAX_U64: Final = (1 << 64) - 1
#: Index shifts of the levels that point to another table (L4, L3, L2).
_UPPER_SHIFTS: Final = (L4_PAGETABLE_SHIFT, L3_PAGETABLE_SHIFT, L2_PAGETABLE_SHIFT)


class PhysMemory(Protocol):
    """Frame-addressed memory (machine address = mfn * 4096 + offset).

    The model only needs these four operations, so the hypervisor's machine
    memory (a memfd mapping) and a plain bytearray are interchangeable.
    """

    def read_u64(self, maddr: int) -> int: ...

    def write_u64(self, maddr: int, value: int) -> None: ...

    def read_bytes(self, maddr: int, length: int) -> bytes: ...

    def write_bytes(self, maddr: int, data: bytes) -> None: ...


class BytearrayMemory:
    """:class:`PhysMemory` over one bytearray of ``nr_frames`` frames (mfn == index).

    Used by the ``native`` guest and by tests; u64s are little-endian as on x86.
    Bounds are checked explicitly because slicing would silently truncate.
    """

    __slots__ = ("_buf", "_size", "nr_frames")

    def __init__(self, nr_frames: int) -> None:
        if nr_frames < 0:
            raise ValueError(f"nr_frames {nr_frames} is negative")
        self.nr_frames: Final = nr_frames
        self._size = nr_frames * PAGE_SIZE
        self._buf = bytearray(self._size)

    def _check(self, maddr: int, length: int) -> None:
        if maddr < 0 or length < 0 or maddr + length > self._size:
            raise IndexError(f"machine range {maddr:#x}+{length} outside {self.nr_frames} frames")

    def read_u64(self, maddr: int) -> int:
        self._check(maddr, 8)
        value: int = _U64.unpack_from(self._buf, maddr)[0]
        return value

    def write_u64(self, maddr: int, value: int) -> None:
        self._check(maddr, 8)
        if not 0 <= value <= _MAX_U64:
            raise ValueError(f"value {value:#x} is not a u64")
        _U64.pack_into(self._buf, maddr, value)

    def read_bytes(self, maddr: int, length: int) -> bytes:
        self._check(maddr, length)
        return bytes(self._buf[maddr : maddr + length])

    def write_bytes(self, maddr: int, data: bytes) -> None:
        self._check(maddr, len(data))
        self._buf[maddr : maddr + len(data)] = data

    def buffer(self) -> bytearray:
        """The memory itself (writable, no copy): for code that reads and
        writes whole PTE pages as arrays rather than one u64 at a time."""
        return self._buf


class AccessKind(enum.Enum):
    """A user access; the values are the wire spelling used by :meth:`HardwareModel.run`."""

    READ = "r"
    WRITE = "w"
    EXEC = "x"


_READ: Final = AccessKind.READ
_WRITE: Final = AccessKind.WRITE
_EXEC: Final = AccessKind.EXEC


@dataclass(frozen=True, slots=True)
class PageFault:
    """A #PF: the faulting address (CR2) and the x86 error code reflected to the guest."""

    va: int
    error_code: int


@dataclass(frozen=True, slots=True)
class StaleTlbWrite:
    """A write that landed only because a TLB entry outlived its PTE (a missed flush).

    ``pte_in_memory`` is the L1 entry at ``pte_maddr`` when the write happened; it
    was not present, not RW, or mapped a frame other than ``mfn``.
    """

    vcpu: int
    va: int
    mfn: int
    pte_maddr: int
    pte_in_memory: int


@dataclass(slots=True)
class TlbEntry:
    """One cached translation: rights combined over all four levels.

    ``dirty`` mirrors the L1 D bit at fill time: while it is False a write must go
    back to memory to set D, which is when real hardware re-checks the PTE.
    """

    mfn: int
    writable: bool
    executable: bool
    dirty: bool
    pte_maddr: int


@dataclass(slots=True)
class HardwareStats:
    """Event counters.

    ``tlb_hits + tlb_misses`` is the number of page-sized accesses; ``walks`` also
    counts re-walks made on a hit (setting D, or a permission miss). Flushes and
    INVLPGs count one per vCPU TLB touched (a CR3 load counts as a flush).
    ``accessed_set``/``dirty_set`` count 0->1 transitions at any level.
    """

    tlb_hits: int = 0
    tlb_misses: int = 0
    walks: int = 0
    page_faults: int = 0
    accessed_set: int = 0
    dirty_set: int = 0
    tlb_flushes: int = 0
    invlpgs: int = 0
    stale_tlb_writes: int = 0


@dataclass(slots=True)
class RunOutcome:
    """Result of :meth:`HardwareModel.run`: how far it got and what it read."""

    executed: int = 0
    reads: list[bytes] = field(default_factory=list)
    fault: PageFault | None = None


class HardwareModel:
    """Per-vCPU CR3 + TLB over shared memory; sets A/D in the PTEs like the MMU.

    ``on_dirty(vcpu, va_page, pte_maddr)`` is called whenever the model turns an L1
    D bit from 0 to 1, so callers can trace or count hardware-dirtied pages (the
    bits whose loss the PRESERVE_AD oracle looks for).
    """

    __slots__ = ("_cr3", "_memory", "_nr_vcpus", "_on_dirty", "_tlbs", "stale_writes", "stats")

    def __init__(
        self,
        memory: PhysMemory,
        nr_vcpus: int,
        *,
        on_dirty: Callable[[int, int, int], None] | None = None,
    ) -> None:
        if nr_vcpus < 1:
            raise ValueError(f"nr_vcpus {nr_vcpus} must be at least 1")
        self._memory = memory
        self._nr_vcpus = nr_vcpus
        self._on_dirty = on_dirty
        self._cr3: list[int | None] = [None] * nr_vcpus
        self._tlbs: list[dict[int, TlbEntry]] = [{} for _ in range(nr_vcpus)]
        self.stats = HardwareStats()
        self.stale_writes: list[StaleTlbWrite] = []

    # --- introspection -------------------------------------------------------

    @property
    def memory(self) -> PhysMemory:
        return self._memory

    @property
    def nr_vcpus(self) -> int:
        return self._nr_vcpus

    def _vcpu(self, vcpu: int) -> int:
        # Explicit: a negative index would silently pick another vCPU's TLB.
        if not 0 <= vcpu < self._nr_vcpus:
            raise IndexError(f"vcpu {vcpu} out of range 0..{self._nr_vcpus - 1}")
        return vcpu

    def cr3(self, vcpu: int) -> int | None:
        """The L4 mfn loaded on ``vcpu``, or None before the first load."""
        return self._cr3[self._vcpu(vcpu)]

    def tlb_entry(self, vcpu: int, va: int) -> TlbEntry | None:
        """The cached translation of ``va``'s page on ``vcpu`` (for tests and tracing)."""
        return self._tlbs[self._vcpu(vcpu)].get(va >> PAGE_SHIFT)

    def tlb_size(self, vcpu: int) -> int:
        return len(self._tlbs[self._vcpu(vcpu)])

    # --- CR3 and TLB maintenance ---------------------------------------------

    def set_cr3(self, vcpu: int, mfn: int | None) -> None:
        """Load CR3; like a MOV to CR3 without PCID, it empties the vCPU's TLB."""
        if mfn is not None and mfn < 0:
            raise ValueError(f"mfn {mfn} is negative")
        self._cr3[self._vcpu(vcpu)] = mfn
        self.flush_tlb(vcpu)

    def flush_tlb(self, vcpu: int) -> None:
        self._tlbs[self._vcpu(vcpu)].clear()
        self.stats.tlb_flushes += 1

    def flush_tlb_all(self) -> None:
        for tlb in self._tlbs:
            tlb.clear()
        self.stats.tlb_flushes += self._nr_vcpus

    def invlpg(self, vcpu: int, va: int) -> None:
        self._tlbs[self._vcpu(vcpu)].pop(va >> PAGE_SHIFT, None)
        self.stats.invlpgs += 1

    def invlpg_all(self, va: int) -> None:
        vpn = va >> PAGE_SHIFT
        for tlb in self._tlbs:
            tlb.pop(vpn, None)
        self.stats.invlpgs += self._nr_vcpus

    # --- accesses --------------------------------------------------------------

    def access(
        self, vcpu: int, va: int, kind: AccessKind, data: bytes | int | None = None
    ) -> bytes | PageFault:
        """One user access inside one page.

        ``data`` is the bytes to store (WRITE) or the length to load (READ); EXEC
        is a 1-byte fetch. Returns the bytes read, ``b""`` for WRITE/EXEC, or the
        :class:`PageFault` (nothing is loaded or stored then).
        """
        self._vcpu(vcpu)
        if kind is _READ:
            if not isinstance(data, int):
                raise TypeError("a READ takes an int length")
            length = data
        elif kind is _WRITE:
            if not isinstance(data, bytes | bytearray):
                raise TypeError("a WRITE takes bytes")
            length = len(data)
        else:
            length = 1
        if length < 0:
            raise ValueError(f"negative length {length}")
        if (va & _OFFSET_MASK) + length > PAGE_SIZE:
            raise ValueError(f"access {va:#x}+{length} crosses a page boundary")
        return self._access_page(vcpu, va, kind, data, length)

    def _access_page(
        self, vcpu: int, va: int, kind: AccessKind, data: bytes | int | None, length: int
    ) -> bytes | PageFault:
        vpn = va >> PAGE_SHIFT
        entry = self._tlbs[vcpu].get(vpn)
        stats = self.stats
        if entry is None:
            stats.tlb_misses += 1
            found = self._walk(vcpu, va, vpn, kind)
            if isinstance(found, PageFault):
                return found
            entry = found
        else:
            stats.tlb_hits += 1
            if kind is _WRITE:
                if entry.writable and entry.dirty:
                    # Hardware writes through without touching the PTE; only the
                    # model looks, to catch a translation that outlived its PTE.
                    assert isinstance(data, bytes | bytearray)
                    self._memory.write_bytes((entry.mfn << PAGE_SHIFT) | (va & _OFFSET_MASK), data)
                    self._check_stale(vcpu, va, entry)
                    return b""
                # Clean (D must be set) or a permission miss: both re-walk memory.
                found = self._walk(vcpu, va, vpn, kind)
                if isinstance(found, PageFault):
                    return found
                entry = found
            elif kind is _EXEC and not entry.executable:
                found = self._walk(vcpu, va, vpn, kind)
                if isinstance(found, PageFault):
                    return found
                entry = found
        maddr = (entry.mfn << PAGE_SHIFT) | (va & _OFFSET_MASK)
        if kind is _READ:
            return self._memory.read_bytes(maddr, length)
        if kind is _WRITE:
            assert isinstance(data, bytes | bytearray)
            self._memory.write_bytes(maddr, data)
        else:
            self._memory.read_bytes(maddr, 1)  # the fetch itself
        return b""

    def _check_stale(self, vcpu: int, va: int, entry: TlbEntry) -> None:
        pte = self._memory.read_u64(entry.pte_maddr)
        if (
            pte & (_PAGE_PRESENT | _PAGE_RW) != (_PAGE_PRESENT | _PAGE_RW)
            or (pte & PTE_MFN_MASK) >> PAGE_SHIFT != entry.mfn
        ):
            self.stats.stale_tlb_writes += 1
            self.stale_writes.append(StaleTlbWrite(vcpu, va, entry.mfn, entry.pte_maddr, pte))

    def _fault(self, vcpu: int, va: int, vpn: int, error_code: int) -> PageFault:
        # A #PF invalidates any TLB entry for the faulting address (SDM 4.10.4.1).
        self._tlbs[vcpu].pop(vpn, None)
        self.stats.page_faults += 1
        return PageFault(va, error_code)

    def _walk(self, vcpu: int, va: int, vpn: int, kind: AccessKind) -> TlbEntry | PageFault:
        """Walk L4->L1, set A (and D for a write) and cache the result.

        Like the hardware, the walk stops only at a non-present entry; U/RW/NX are
        combined over all four levels and checked at the end, so a not-present
        fault wins over a protection fault. Upper-level entries get A as they are
        used to reach the next table; the L1 entry gets A/D only when the access
        is allowed. A/D are never written into a non-present entry.
        """
        write = kind is _WRITE
        error = PF_USER
        if write:
            error |= PF_WRITE
        elif kind is _EXEC:
            error |= PF_INSTR
        table = self._cr3[vcpu]
        if table is None or not is_canonical(va):
            return self._fault(vcpu, va, vpn, error)
        self.stats.walks += 1
        memory = self._memory
        stats = self.stats
        rights = _PAGE_USER | _PAGE_RW
        nx = 0
        for shift in _UPPER_SHIFTS:
            maddr = (table << PAGE_SHIFT) | (((va >> shift) & _INDEX_MASK) * PTE_SIZE)
            pte = memory.read_u64(maddr)
            if not pte & _PAGE_PRESENT:
                return self._fault(vcpu, va, vpn, error)
            if not pte & _PAGE_ACCESSED:
                memory.write_u64(maddr, pte | _PAGE_ACCESSED)
                stats.accessed_set += 1
            rights &= pte
            nx |= pte & _PAGE_NX
            table = (pte & PTE_MFN_MASK) >> PAGE_SHIFT
        l1_maddr = (table << PAGE_SHIFT) | (((va >> L1_PAGETABLE_SHIFT) & _INDEX_MASK) * PTE_SIZE)
        pte = memory.read_u64(l1_maddr)
        if not pte & _PAGE_PRESENT:
            return self._fault(vcpu, va, vpn, error)
        rights &= pte
        nx |= pte & _PAGE_NX
        if not rights & _PAGE_USER or (write and not rights & _PAGE_RW) or (kind is _EXEC and nx):
            return self._fault(vcpu, va, vpn, error | PF_PROT)
        new = pte | (_PAGE_ACCESSED | _PAGE_DIRTY if write else _PAGE_ACCESSED)
        if new != pte:
            memory.write_u64(l1_maddr, new)
            if not pte & _PAGE_ACCESSED:
                stats.accessed_set += 1
            if write and not pte & _PAGE_DIRTY:
                stats.dirty_set += 1
                if self._on_dirty is not None:
                    self._on_dirty(vcpu, va & ~_OFFSET_MASK, l1_maddr)
        entry = TlbEntry(
            (pte & PTE_MFN_MASK) >> PAGE_SHIFT,
            bool(rights & _PAGE_RW),
            not nx,
            bool(new & _PAGE_DIRTY),
            l1_maddr,
        )
        self._tlbs[vcpu][vpn] = entry
        return entry

    def run(self, vcpu: int, accesses: Iterable[tuple[int, str, bytes | int]]) -> RunOutcome:
        """Run user accesses in order, splitting page-crossing ones; stop at the first fault.

        ``executed`` counts accesses completed in full (a split access whose second
        page faults is not counted, though its first part happened, as on x86).
        """
        self._vcpu(vcpu)
        outcome = RunOutcome()
        reads = outcome.reads
        for va, kind_str, data in accesses:
            kind = AccessKind(kind_str)
            if kind is _READ:
                if not isinstance(data, int):
                    raise TypeError("a READ takes an int length")
                total = data
            elif kind is _WRITE:
                if not isinstance(data, bytes | bytearray):
                    raise TypeError("a WRITE takes bytes")
                total = len(data)
            else:
                total = 1
            if total < 0:
                raise ValueError(f"negative length {total}")
            offset = va & _OFFSET_MASK
            if offset + total <= PAGE_SIZE:
                result = self._access_page(vcpu, va, kind, data, total)
                if isinstance(result, PageFault):
                    outcome.fault = result
                    return outcome
                if kind is _READ:
                    reads.append(result)
            else:
                fault = self._run_split(vcpu, va, kind, data, total, reads)
                if fault is not None:
                    outcome.fault = fault
                    return outcome
            outcome.executed += 1
        return outcome

    def _run_split(
        self,
        vcpu: int,
        va: int,
        kind: AccessKind,
        data: bytes | int,
        total: int,
        reads: list[bytes],
    ) -> PageFault | None:
        parts: list[bytes] = []
        done = 0
        while done < total:
            cur = va + done
            length = min(total - done, PAGE_SIZE - (cur & _OFFSET_MASK))
            if kind is _WRITE:
                assert isinstance(data, bytes | bytearray)
                chunk: bytes | int = bytes(data[done : done + length])
            else:
                chunk = length
            result = self._access_page(vcpu, cur, kind, chunk, length)
            if isinstance(result, PageFault):
                return result
            parts.append(result)
            done += length
        if kind is _READ:
            reads.append(b"".join(parts))
        return None
