"""The sans-I/O hypervisor service: requests in, replies out, errors by blame."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pvemu.hypervisor import Hypervisor
from pvemu.hypervisor.limits import ServerLimits
from pvemu.hypervisor.service import HypervisorService, Session
from pvemu.shared import abi, wire
from pvemu.shared.errors import WireErrorCode

V = wire.PROTOCOL_VERSION


def hello(service: HypervisorService, memory_mib: int = 1, vcpus: int = 2) -> Session:
    session = Session()
    reply, fd = service.serve(session, wire.Hello(1, V, memory_mib, vcpus, "t"))
    assert isinstance(reply, wire.Welcome)
    assert fd is not None
    return session


def test_a_refused_request_gets_its_typed_code() -> None:
    service = HypervisorService(Hypervisor(8), ServerLimits(max_batch=4))
    reply, fd = service.serve(Session(), wire.Hello(1, V, 64, 1, "too big"))
    assert isinstance(reply, wire.ErrorReply)
    assert reply.code == WireErrorCode.OUT_OF_RANGE
    assert "not enough machine memory" in reply.message
    assert fd is None
    session = hello(service)
    assert session.domid is not None
    domain = service.hv.domain(session.domid)
    taken, _ = service.serve(Session(), wire.Join(2, V, session.domid, domain.secret, 0))
    assert isinstance(taken, wire.ErrorReply)
    assert taken.code == WireErrorCode.OUT_OF_RANGE
    five = wire.make_call(abi.HYPERVISOR_mmu_update, [(8, 0)] * 5)
    big, _ = service.serve(session, wire.Hypercall(3, five.op, five.args))
    assert isinstance(big, wire.ErrorReply)
    assert big.code == WireErrorCode.TOO_LARGE
    unknown, _ = service.serve(session, wire.Hypercall(4, 99, wire.RawArgs((1,))))
    assert unknown == wire.Result(4, -abi.ENOSYS, 0)


def test_a_hypervisor_bug_is_internal_not_the_guests_fault(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A ValueError inside the hypervisor used to be reported to the guest as
    out_of_range; it is the hypervisor's bug: internal, logged, kept for the
    caller, and the other domain is still served."""
    service = HypervisorService(Hypervisor(8))
    victim, bystander = hello(service), hello(service)

    def broken(*args: object, **kwargs: object) -> object:
        raise ValueError("planted")

    monkeypatch.setattr(Hypervisor, "run_user", broken)
    work = service.begin(victim, wire.RunUser(5, (wire.Access(0, "r", 8),)))
    assert work.step()
    assert isinstance(work.reply, wire.ErrorReply)
    assert work.reply.code == WireErrorCode.INTERNAL
    assert "planted" in work.reply.message
    assert isinstance(work.error, ValueError)
    monkeypatch.undo()
    reply, _ = service.serve(bystander, wire.Stats(6))
    assert isinstance(reply, wire.StatsResult)
    assert service.hv.audit() == []


def test_an_exception_mid_hypercall_is_internal(monkeypatch: pytest.MonkeyPatch) -> None:
    service = HypervisorService(Hypervisor(8))
    session = hello(service)
    from pvemu.hypervisor import hypercalls

    def broken(*args: object, **kwargs: object) -> Iterator[None]:
        yield
        raise IndexError("planted in the validation loop")

    monkeypatch.setattr(hypercalls, "mmu_update", broken)
    assert session.domid is not None
    dom = service.hv.domain(session.domid)
    call = wire.make_call(abi.HYPERVISOR_mmu_update, [(dom.p2m[0] << 12, 0)])
    work = service.begin(session, wire.Hypercall(7, call.op, call.args))
    assert not work.step(1)  # the first slice is fine
    assert work.step(1)
    assert isinstance(work.reply, wire.ErrorReply)
    assert work.reply.code == WireErrorCode.INTERNAL
    assert isinstance(work.error, IndexError)


def test_leaving_frees_the_domain_with_its_last_vcpu() -> None:
    hv = Hypervisor(8)
    service = HypervisorService(hv)
    free = hv.state.memory.free_frames
    first = hello(service)
    assert first.domid is not None
    domain = hv.domain(first.domid)
    second = Session()
    reply, _ = service.serve(second, wire.Join(2, V, first.domid, domain.secret, 1))
    assert isinstance(reply, wire.Welcome)
    service.leave(first)
    assert first.domid in hv.domains
    service.leave(second)
    assert first.domid not in hv.domains
    assert hv.state.memory.free_frames == free
