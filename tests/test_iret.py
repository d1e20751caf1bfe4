"""The return to user space after a page fault (64-bit PV's HYPERVISOR_iret).

A user page fault on Xen PV is three transitions at least: Xen takes the #PF
and reflects it to the guest kernel, the kernel installs the PTE (a
hypercall), and the kernel returns to user mode with ``HYPERVISOR_iret``
(docs/sources.md §1). pvemu counts the iret on the ``run_user`` that resumes
the vCPU (``resume``): once per handled fault, never after a SIGSEGV, refused
with ``out_of_range`` when there is no fault to return from, on both sides
of the count.
"""

from __future__ import annotations

import mmap
from typing import Any

import pytest

from pvemu.guest.client import Domain, HypervisorError
from pvemu.guest.kernel import Kernel, SegmentationFault, boot, kernel_for
from pvemu.hypervisor import Hypervisor
from pvemu.hypervisor.service import HypervisorService, Session
from pvemu.shared import abi, wire
from pvemu.shared.errors import WireErrorCode
from pvemu.shared.timeline import Timeline
from tests.loopback import loopback_domain

IRET = str(abi.HYPERVISOR_iret)
PRIVATE = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
RW = mmap.PROT_READ | mmap.PROT_WRITE
REGION = 0x4000_0000
HYPERVISOR_MODES = ["trap", "ptwr", "xen", "batched", "naive"]


async def local(mode: str = "trap") -> tuple[Kernel, Domain]:
    domain = await loopback_domain(Hypervisor(40), memory_mib=32, vcpus=2)
    return kernel_for(domain, mode), domain


def irets(counters: dict[str, Any]) -> int:
    """The iret count in a stats counter map (``hypercalls_by_op``)."""
    by_op: dict[str, int] = counters["hypercalls_by_op"]
    return by_op.get(IRET, 0)


async def totals(domain: Domain) -> tuple[dict[str, Any], dict[str, Any]]:
    """(hypervisor, guest) totals."""
    stats = await domain.stats()
    return stats["hypervisor"]["total"], stats["guest"]["total"]


@pytest.mark.parametrize("mode", HYPERVISOR_MODES)
async def test_one_iret_per_handled_fault_on_both_sides(mode: str) -> None:
    kernel, domain = await local(mode)
    pages = 40
    addr = await kernel.mmap(pages * 4096, RW, PRIVATE, addr=REGION)
    await kernel.run_user(1, [(addr + i * 4096, "w", b"x") for i in range(pages)])
    hyp, guest = await totals(domain)
    assert kernel.counters.page_faults == hyp["page_faults"] == pages
    assert irets(hyp) == pages
    assert domain.counters.hypercalls[abi.HYPERVISOR_iret] == pages
    # each counted on the vCPU that faulted, and counted as a trap
    assert irets((await domain.stats())["hypervisor"]["vcpus"]["1"]) == pages
    assert guest["traps"] == hyp["traps"]
    # a second pass faults nowhere: no iret either
    await kernel.run_user(1, [(addr + i * 4096, "r", 1) for i in range(pages)])
    hyp, _ = await totals(domain)
    assert irets(hyp) == pages
    assert await kernel.audit() == []


async def test_first_touch_and_reuse_faults_cost_three_traps_as_on_xen() -> None:
    """Linux on 64-bit Xen PV: a first-touch anonymous fault is fault +
    mmu_update + iret, and so is a write to a page first read (the fault
    reuses the exclusive page: its PTE made writable)."""
    kernel, domain = await local("trap")
    addr = await kernel.mmap(4 * 4096, RW, PRIVATE, addr=REGION)
    await kernel.write(addr, b"t")  # builds the page tables: not the cost measured
    steps = [(addr + 4096, "r", 1), (addr + 4096, "w", b"w")]
    for access in steps:
        before, _ = await totals(domain)
        await kernel.run_user(1, [access])
        after, guest = await totals(domain)
        spent = {key: after[key] - before[key] for key in ("traps", "hypercalls", "page_faults")}
        assert spent == {"traps": 3, "hypercalls": 2, "page_faults": 1}, access
        assert irets(after) - irets(before) == 1
        assert guest["traps"] == after["traps"]


async def test_no_iret_after_a_segfault() -> None:
    kernel, domain = await local("xen")
    ro = await kernel.mmap(4096, mmap.PROT_READ, PRIVATE, addr=REGION)
    before, _ = await totals(domain)
    with pytest.raises(SegmentationFault):
        await kernel.write(ro, b"x")
    after, guest = await totals(domain)
    assert after["page_faults"] - before["page_faults"] == 1
    assert irets(after) == irets(before) == 0
    assert guest["traps"] == after["traps"]
    # The kernel runs something else on that vCPU: a plain run, accepted,
    # which ends the wait for the iret that never came.
    assert await kernel.read(ro, 1) == b"\x00"
    after, guest = await totals(domain)
    assert irets(after) == 1  # the read's own first-touch fault
    assert guest["traps"] == after["traps"]
    with pytest.raises(HypervisorError, match="out_of_range"):
        await domain.run_user(1, [(ro, "r", 1)], resume=True)


async def test_resume_without_a_pending_fault_is_refused_and_counts_nothing() -> None:
    kernel, domain = await local("trap")
    addr = await kernel.mmap(4096, RW, PRIVATE, addr=REGION)
    await kernel.write(addr, b"x")
    before = await domain.stats()

    async def refused(vcpu: int) -> None:
        with pytest.raises(HypervisorError) as caught:
            await domain.run_user(vcpu, [(addr, "r", 1)], resume=True)
        assert caught.value.code == WireErrorCode.OUT_OF_RANGE

    await refused(1)  # vCPU 1's last run did not fault
    await refused(0)  # vCPU 0 never ran user code
    after = await domain.stats()
    assert after["guest"] == before["guest"]
    # nothing counted, not even the run (user_runs); only the stats query itself
    for vcpu in ("0", "1"):
        counted, was = after["hypervisor"]["vcpus"][vcpu], before["hypervisor"]["vcpus"][vcpu]
        assert {**counted, "queries": 0} == {**was, "queries": 0}, vcpu


async def test_resume_is_taken_once_per_fault_and_a_plain_run_ends_the_wait() -> None:
    """Driven through the raw client, as a tool would: the iret is legal
    exactly once after each fault."""
    kernel, domain = await local("trap")
    addr = await kernel.mmap(2 * 4096, RW, PRIVATE, addr=REGION)
    outcome = await domain.run_user(1, [(addr, "w", b"x")])
    assert outcome["fault"] is not None
    await kernel.handle_fault(addr, outcome["fault"]["error_code"], vcpu=1)
    resumed = await domain.run_user(1, [(addr, "w", b"x")], resume=True)
    assert resumed["fault"] is None
    with pytest.raises(HypervisorError, match="out_of_range"):
        await domain.run_user(1, [(addr, "r", 1)], resume=True)
    # a fault, then a plain run (the thread was killed): no iret is owed
    assert (await domain.run_user(1, [(addr + 4096, "r", 1)]))["fault"] is not None
    assert (await domain.run_user(1, [(addr, "r", 1)]))["fault"] is None
    with pytest.raises(HypervisorError, match="out_of_range"):
        await domain.run_user(1, [(addr, "r", 1)], resume=True)
    hyp, guest = await totals(domain)
    assert irets(hyp) == domain.counters.hypercalls[abi.HYPERVISOR_iret] == 1
    assert guest["traps"] == hyp["traps"]


async def test_native_accepts_resume_and_counts_nothing() -> None:
    async with boot(mode="native", memory_mib=16) as kernel:
        addr = await kernel.mmap(8 * 4096, RW, PRIVATE, addr=REGION)
        await kernel.run_user(1, [(addr + i * 4096, "w", b"x") for i in range(8)])
        assert kernel.counters.page_faults == 8
        outcome = await kernel.machine.run_user(1, [(addr, "r", 1)], resume=True)
        assert outcome["fault"] is None
        stats = await kernel.stats()
        assert stats["guest"]["total"]["traps"] == stats["hypervisor"]["total"]["traps"] == 0


# --- the service: the refusal's code, the pending state per vCPU, the timeline ------


def fresh(service: HypervisorService, vcpus: int = 2) -> Session:
    """A domain with no page tables loaded: every user access faults."""
    session = Session()
    reply, _ = service.serve(session, wire.Hello(1, wire.PROTOCOL_VERSION, 1, vcpus, "t"))
    assert isinstance(reply, wire.Welcome)
    return session


def test_the_service_refuses_a_resume_with_out_of_range_per_vcpu() -> None:
    service = HypervisorService(Hypervisor(8))
    vcpu0 = fresh(service)
    assert vcpu0.domid is not None
    domain = service.hv.domain(vcpu0.domid)
    vcpu1 = Session()
    join = wire.Join(1, wire.PROTOCOL_VERSION, vcpu0.domid, domain.secret, 1)
    assert isinstance(service.serve(vcpu1, join)[0], wire.Welcome)
    touch = (wire.Access(0, "r", 1),)

    faulted, _ = service.serve(vcpu0, wire.RunUser(2, touch))
    assert isinstance(faulted, wire.UserResult)
    assert faulted.fault is not None
    # vCPU 0's fault is vCPU 0's: vCPU 1 has nothing to return from
    refused, _ = service.serve(vcpu1, wire.RunUser(2, touch, resume=True))
    assert isinstance(refused, wire.ErrorReply)
    assert refused.code == WireErrorCode.OUT_OF_RANGE
    assert "no page fault to return from" in refused.message
    resumed, _ = service.serve(vcpu0, wire.RunUser(3, touch, resume=True))
    assert isinstance(resumed, wire.UserResult)
    assert [c.hypercalls[abi.HYPERVISOR_iret] for c in domain.counters] == [1, 0]
    # A vCPU that leaves with a fault pending is joined afresh: nothing owed.
    faulted, _ = service.serve(vcpu1, wire.RunUser(3, touch))
    assert isinstance(faulted, wire.UserResult)
    assert faulted.fault is not None
    service.leave(vcpu1)
    again = Session()
    assert isinstance(service.serve(again, join)[0], wire.Welcome)
    refused, _ = service.serve(again, wire.RunUser(2, touch, resume=True))
    assert isinstance(refused, wire.ErrorReply)
    assert refused.code == WireErrorCode.OUT_OF_RANGE
    # As a hypercall request of its own, iret is not served (-ENOSYS); the
    # trap is still one of number 23, so the count says 2.
    raw, _ = service.serve(vcpu0, wire.Hypercall(4, abi.HYPERVISOR_iret, wire.RawArgs()))
    assert raw == wire.Result(4, -abi.ENOSYS, 0)
    total: Any = service.hv.stats(vcpu0.domid)["total"]
    assert total["hypercalls_by_op"] == {IRET: 2}


def test_the_timeline_has_one_iret_span_per_counted_iret() -> None:
    """Each counted trap is one span (docs/timeline.md): a resumed run is its
    iret, then the fault it took again, if it did; a refusal is nothing."""
    timeline = Timeline()
    service = HypervisorService(Hypervisor(8), timeline=timeline)
    session = fresh(service, vcpus=1)
    assert session.domid is not None
    touch = (wire.Access(0, "r", 1),)
    service.serve(session, wire.RunUser(2, touch))
    service.serve(session, wire.RunUser(3, touch, resume=True))  # faults again
    service.serve(session, wire.RunUser(4, (), resume=True))  # nothing to fault on
    refused, _ = service.serve(session, wire.RunUser(5, touch, resume=True))
    assert isinstance(refused, wire.ErrorReply)
    traps = [e for e in timeline.document()["traceEvents"] if e.get("cat") == "trap"]
    assert [e["name"] for e in traps] == ["page_fault", "iret", "page_fault", "iret"]
    assert traps[1]["args"] == {"op": abi.HYPERVISOR_iret}
    assert traps[1]["ts"] + traps[1]["dur"] <= traps[2]["ts"] + 0.001  # µs, 1 ns of rounding
    assert len(traps) == service.hv.domain(session.domid).counters[0].traps
