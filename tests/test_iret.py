"""The return to user space after a page fault (64-bit PV's HYPERVISOR_iret).

A user page fault on Xen PV is three transitions at least: Xen takes the #PF
and reflects it to the guest kernel, the kernel installs the PTE (a
hypercall), and the kernel returns to user mode with ``HYPERVISOR_iret``
(docs/sources.md §1). pvemu counts the iret on the ``run_user`` that resumes
the vCPU (``resume``): once per handled fault, refused with ``out_of_range``
when there is no fault to return from.
"""

from __future__ import annotations

from typing import Any

from pvemu.hypervisor import Hypervisor
from pvemu.hypervisor.service import HypervisorService, Session
from pvemu.shared import abi, wire
from pvemu.shared.errors import WireErrorCode
from pvemu.shared.timeline import Timeline

IRET = str(abi.HYPERVISOR_iret)


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
