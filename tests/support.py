"""Helpers for driving the hypervisor core directly, as a tiny guest would."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pvemu.hypervisor import HypercallResult, Hypervisor
from pvemu.shared import abi, wire
from pvemu.shared.x86 import (
    _PAGE_PRESENT,
    _PAGE_RW,
    _PAGE_USER,
    maddr_of_entry,
    make_pte,
    va_indexes,
)

if TYPE_CHECKING:
    from pvemu.hypervisor.domain import Domain

USER_RW = _PAGE_PRESENT | _PAGE_RW | _PAGE_USER
USER_RO = _PAGE_PRESENT | _PAGE_USER
TABLE = _PAGE_PRESENT | _PAGE_RW | _PAGE_USER


def core_call(op: int, args: Sequence[Any]) -> wire.Call:
    """The typed call for hypercall ``op`` with its arguments in the tests'
    tuple form: ``mmu_update`` records flat (ptr0, val0, ...), multicall
    entries as ``(op, *args)``."""
    if op == abi.HYPERVISOR_mmu_update:
        reqs, *rest = args
        words = list(reqs)
        return wire.make_call(op, list(zip(words[0::2], words[1::2], strict=True)), *rest)
    if op == abi.HYPERVISOR_multicall:
        (calls,) = args
        entries = tuple(core_call(entry[0], entry[1:]) for entry in calls)
        return wire.Call(op, wire.MulticallArgs(entries))
    return wire.make_call(op, *args)


def flat(*pairs: tuple[int, int]) -> list[int]:
    """Xen's struct mmu_update[] as a flat list: ptr0, val0, ptr1, val1..."""
    out: list[int] = []
    for ptr, val in pairs:
        out += [ptr, val]
    return out


@dataclass
class Guest:
    """A domain with a booted 4-level tree: L4 pinned and loaded on every vCPU.

    ``l1`` maps VA 0..(512 pages) through one L1; ``data`` frames are mapped
    at VA ``i * 4096`` for ``i < mapped`` read-write.
    """

    hv: Hypervisor
    dom: Domain
    l4: int
    l3: int
    l2: int
    l1: int
    data: list[int]
    spare: list[int] = field(default_factory=list)

    @property
    def domid(self) -> int:
        return self.dom.domid

    def mmu(
        self, *pairs: tuple[int, int], vcpu: int = 0, fd: int = abi.DOMID_SELF
    ) -> HypercallResult:
        return self.hv.hypercall(
            self.domid, vcpu, core_call(abi.HYPERVISOR_mmu_update, (flat(*pairs), fd))
        )

    def ext(
        self, *ops: tuple[int, int, int], vcpu: int = 0, fd: int = abi.DOMID_SELF
    ) -> HypercallResult:
        return self.hv.hypercall(
            self.domid, vcpu, core_call(abi.HYPERVISOR_mmuext_op, (list(ops), fd))
        )

    def uvm(self, va: int, val: int, flags: int, vcpu: int = 0) -> int:
        return self.hv.hypercall(
            self.domid, vcpu, core_call(abi.HYPERVISOR_update_va_mapping, (va, val, flags))
        ).rc

    def read(self, maddr: int) -> int:
        return self.hv.state.memory.read_u64(maddr)

    def l1e(self, index: int) -> int:
        return maddr_of_entry(self.l1, index)

    def take(self) -> int:
        """A frame nothing uses yet."""
        return self.spare.pop()

    def pte_for(self, va: int) -> int:
        return self.read(self.l1e(va_indexes(va).l1))


def boot(
    hv: Hypervisor | None = None,
    *,
    memory_mib: int = 1,
    vcpus: int = 2,
    mapped: int = 8,
) -> Guest:
    hv = hv or Hypervisor(16)
    dom = hv.create_domain(memory_mib, vcpus)
    frames = list(dom.p2m)
    l4, l3, l2, l1 = frames[:4]
    data = frames[4 : 4 + mapped]
    spare = frames[4 + mapped :]
    guest = Guest(hv, dom, l4, l3, l2, l1, data, spare[::-1])
    pairs = [(maddr_of_entry(l1, i), make_pte(m, USER_RW)) for i, m in enumerate(data)]
    pairs += [
        (maddr_of_entry(l2, 0), make_pte(l1, TABLE)),
        (maddr_of_entry(l3, 0), make_pte(l2, TABLE)),
        (maddr_of_entry(l4, 0), make_pte(l3, TABLE)),
    ]
    assert guest.mmu(*pairs).rc == 0
    ops = [(abi.MMUEXT_PIN_L4_TABLE, l4, 0)]
    ops += [(abi.MMUEXT_NEW_BASEPTR, l4, 0)]
    assert guest.ext(*ops).rc == 0
    for vcpu in range(1, vcpus):
        assert guest.ext((abi.MMUEXT_NEW_BASEPTR, l4, 0), vcpu=vcpu).rc == 0
    assert hv.audit() == []
    return guest
