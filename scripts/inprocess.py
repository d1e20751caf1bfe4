"""An in-process domain: the raw client's interface over a hypervisor core in
the same process, with no socket.

It exists for fast tests and for measuring the processing floor (DESIGN §1);
``pvemu run`` never uses it. Calls go through the same wire types and
argument conversion as the server, so what is counted is identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pvemu.guest.boot import boot_domain
from pvemu.guest.client import GuestCounters
from pvemu.hypervisor import Hypervisor
from pvemu.hypervisor.server import core_args
from pvemu.shared import abi, wire
from pvemu.shared.x86 import PAGE_SHIFT, PAGE_SIZE


class LocalDomain:
    """``guest.client.Domain``'s interface, served by an in-process core."""

    def __init__(self, hv: Hypervisor, *, memory_mib: int = 64, vcpus: int = 2) -> None:
        self.hv = hv
        self.dom = hv.create_domain(memory_mib, vcpus, "local")
        self.domid = self.dom.domid
        self.p2m = list(self.dom.p2m)
        self.m2p = {mfn: pfn for pfn, mfn in enumerate(self.p2m)}
        self.l4_mfn = 0
        self._counters = [GuestCounters() for _ in range(vcpus)]
        self._free_pfns = list(range(len(self.p2m) - 1, -1, -1))

    @classmethod
    async def booted(cls, hv: Hypervisor, *, memory_mib: int = 64, vcpus: int = 2) -> LocalDomain:
        domain = cls(hv, memory_mib=memory_mib, vcpus=vcpus)
        await boot_domain(domain)
        return domain

    @property
    def nr_vcpus(self) -> int:
        return len(self._counters)

    def alloc_frame(self) -> int:
        return self.p2m[self._free_pfns.pop()]

    def read_u64(self, maddr: int) -> int:
        if (maddr >> PAGE_SHIFT) not in self.m2p:
            raise KeyError(maddr)
        return self.hv.state.memory.read_u64(maddr)

    def read_bytes(self, maddr: int, length: int) -> bytes:
        if (maddr >> PAGE_SHIFT) not in self.m2p or (maddr % PAGE_SIZE) + length > PAGE_SIZE:
            raise KeyError(maddr)
        return self.hv.state.memory.read_bytes(maddr, length)

    async def _call(self, vcpu: int, op: int, *args: object) -> tuple[int, int, tuple[int, ...]]:
        call = wire.make_call(op, *args)
        counters = self._counters[vcpu]
        counters.hypercalls[op] += 1
        if isinstance(call.args, wire.MmuUpdateArgs):
            counters.mmu_update_records += call.args.count
        elif isinstance(call.args, wire.MulticallArgs):
            counters.multicall_entries += len(call.args.calls)
            for sub in call.args.calls:
                if isinstance(sub.args, wire.MmuUpdateArgs):
                    counters.mmu_update_records += sub.args.count
        result = self.hv.hypercall(self.domid, vcpu, op, core_args(call.args))
        return result.rc, result.done, result.results

    async def mmu_update(
        self,
        reqs: Sequence[tuple[int, int]] | bytes,
        foreigndom: int = abi.DOMID_SELF,
        *,
        vcpu: int = 0,
    ) -> tuple[int, int]:
        rc, done, _ = await self._call(vcpu, abi.HYPERVISOR_mmu_update, reqs, foreigndom)
        return rc, done

    async def mmuext_op(
        self,
        ops: Sequence[tuple[int, int, int]],
        foreigndom: int = abi.DOMID_SELF,
        *,
        vcpu: int = 0,
    ) -> tuple[int, int]:
        rc, done, _ = await self._call(vcpu, abi.HYPERVISOR_mmuext_op, ops, foreigndom)
        return rc, done

    async def multicall(self, calls: Sequence[Sequence[Any]], *, vcpu: int = 0) -> list[int]:
        _, _, results = await self._call(vcpu, abi.HYPERVISOR_multicall, calls)
        return list(results)

    async def ptwr_exchange(
        self, maddr: int, val: int, *, exchange: bool = True, vcpu: int = 0
    ) -> tuple[int, int]:
        self._counters[vcpu].ptwr += 1
        return self.hv.ptwr_write(self.domid, vcpu, maddr, val, exchange=exchange)

    async def run_user(
        self, vcpu: int, accesses: Sequence[tuple[int, str, bytes | int]]
    ) -> dict[str, Any]:
        outcome = self.hv.run_user(self.domid, vcpu, accesses)
        fault = None
        if outcome.fault is not None:
            self._counters[vcpu].page_faults += 1
            fault = {"va": outcome.fault.va, "error_code": outcome.fault.error_code}
        return {"executed": outcome.executed, "reads": list(outcome.reads), "fault": fault}

    async def stats(self) -> dict[str, Any]:
        total = GuestCounters.sum(self._counters)
        return {"guest": {"total": total.as_dict()}, "hypervisor": self.hv.stats(self.domid)}

    async def audit(self) -> list[str]:
        return self.hv.audit()
