"""The hypervisor as a service, sans I/O: a request in, a reply out.

Everything the server does for a guest's request except sockets, descriptor
passing and the CPU gate lives here: the handshakes (a Hello creates a
domain, a Join attaches a vCPU with the domain's secret), hypercalls run in
slices (:class:`Work`), trapped page-table writes, user runs, the kernel's
stores through its linear map, stats, audit,
the canonical log line per hypercall, the timeline of traps (when
recording), and errors by blame. The trio server, the in-process loopback
transport of the tests and the fuzzers all serve requests through
:meth:`HypervisorService.begin`.

Errors by blame: a request the guest got wrong is refused with its typed
code (``out_of_range`` for a domain that cannot be made, a vCPU that is not
free or a ``run_user`` resuming a vCPU with no page fault to return from,
``too_large`` for an over-limit batch, ...). An unexpected
exception inside the hypervisor is a hypervisor bug: it is logged with its
traceback and the guest gets ``internal``; the other domains are unaffected.
"""

from __future__ import annotations

import hmac
import logging
import time
from dataclasses import dataclass, field
from typing import Final

import structlog

from pvemu.shared import abi, wire
from pvemu.shared.errors import WireErrorCode
from pvemu.shared.logs import enabled
from pvemu.shared.timeline import DOMAIN, DOMAIN_TID, SLICE, TRAP, Timeline, now_ns

from .core import DomainError, Hypervisor, PendingCall
from .counters import VcpuCounters
from .hypercalls import HypercallResult
from .limits import ServerLimits

log = structlog.get_logger("pvemu.hypervisor")

#: What the Welcome announces: Xen's feature flags a PV guest checks, and
#: pvemu's own extension (``MMU_PT_XCHG_PVEMU``, always served).
FEATURES: Final = (abi.XENFEAT_mmu_pt_update_preserve_ad, abi.XENFEAT_pvemu_mmu_pt_xchg)
#: Longest error text sent back.
MAX_ERROR_TEXT: Final = 1000
_INFO: Final = logging.INFO


@dataclass(eq=False)
class Session:
    """What one connection is: which vCPU of which domain (hashed by
    identity: the scheduler's key)."""

    domid: int | None = None
    vcpu: int = 0
    peer_pid: int = 0


@dataclass
class _Membership:
    vcpus: set[int] = field(default_factory=set)


class Work:
    """A request being served: :meth:`step` it until it returns True, then
    send :attr:`reply` (with :attr:`fd` as SCM_RIGHTS when it is set).

    Only hypercalls take more than one step; anything else is done at once.
    """

    __slots__ = ("error", "fd", "reply", "slices")

    def __init__(self, reply: wire.Reply | None = None, fd: int | None = None) -> None:
        self.reply = reply
        self.fd = fd
        self.slices = 1
        #: The unexpected exception behind an ``internal`` reply, for whoever
        #: drives the service (the fuzzers report it with its traceback).
        self.error: Exception | None = None

    def step(self, budget: int | None = None) -> bool:
        """Process at most ``budget`` more entries (all, when None); True once
        :attr:`reply` is ready."""
        return True

    def abandon(self) -> None:
        """The guest hung up: stop here (entries already applied stay)."""


class _HypercallWork(Work):
    """A hypercall in progress: Xen's continuation, plus the log line and
    the reply once it ends. The log line is built only when info lines are
    written (``pvemu run`` and the benchmarks filter them out)."""

    __slots__ = ("_logged", "_pending", "_request", "_started")

    def __init__(self, request: wire.Hypercall, pending: PendingCall) -> None:
        self.reply: wire.Reply | None = None
        self.fd: int | None = None
        self.error: Exception | None = None
        self.slices = 0
        self._request = request
        self._pending = pending
        self._logged = enabled(_INFO)
        self._started = time.perf_counter() if self._logged else 0.0

    def step(self, budget: int | None = None) -> bool:
        if self.reply is not None:
            return True
        self.slices += 1
        try:
            if not self._pending.step(budget):
                return False
        except Exception as exc:
            self.reply, self.error = _internal(self._request, exc), exc
            return True
        result = self._pending.result
        assert result is not None
        if self._logged:
            self._log(result)
        self.reply = _reply_for(self._request, result)
        return True

    def abandon(self) -> None:
        self._pending.abandon()
        log.info("hypercall_abandoned", op=self._request.op, slices=self.slices)

    def _log(self, result: HypercallResult) -> None:
        request = self._request
        log.info(
            abi.HYPERCALL_NAMES.get(request.op, f"hypercall_{request.op}"),
            op=request.op,
            records=request.args.record_count,
            rc=result.rc,
            done=result.done,
            slices=self.slices,
            duration_us=round((time.perf_counter() - self._started) * 1e6, 1),
        )


class _RecordedHypercallWork(Work):
    """A hypercall whose slices and end go to the timeline: one ``trap``
    span from its start to its reply, and a ``slice`` span per slice when
    it was preempted (the gaps between them are other vCPUs' turns)."""

    __slots__ = (
        "_counters",
        "_domid",
        "_flushes",
        "_inner",
        "_spans",
        "_start",
        "_timeline",
        "_vcpu",
    )

    def __init__(
        self,
        inner: _HypercallWork,
        timeline: Timeline,
        domid: int,
        vcpu: int,
        start: int,
        counters: VcpuCounters,
    ) -> None:
        super().__init__()
        self.slices = 0
        self._inner = inner
        self._timeline = timeline
        self._domid, self._vcpu, self._start = domid, vcpu, start
        self._counters = counters
        self._flushes = counters.tlb_flush_ops
        self._spans: list[tuple[int, int, int]] = []  # (start, end, entries so far)

    def step(self, budget: int | None = None) -> bool:
        if self.reply is not None:
            return True
        inner = self._inner
        began = now_ns()
        finished = inner.step(budget)
        self._spans.append((began, now_ns(), inner._pending.entries))
        self.slices = inner.slices
        if not finished:
            return False
        self.reply, self.error = inner.reply, inner.error
        self._record(inner._pending.result, abandoned=False)
        return True

    def abandon(self) -> None:
        self._inner.abandon()
        self._record(None, abandoned=True)

    def _record(self, result: HypercallResult | None, *, abandoned: bool) -> None:
        request, timeline = self._inner._request, self._timeline
        domid, vcpu = self._domid, self._vcpu
        args: dict[str, object] = {
            "op": request.op,
            "records": request.args.record_count,
            "multicall_entries": request.args.multicall_entries,
            "rc": None if result is None else result.rc,
            "done": None if result is None else result.done,
            "slices": self.slices,
            "flush_ops": self._counters.tlb_flush_ops - self._flushes,
        }
        if abandoned:
            args["abandoned"] = True
        # Stamped after the last slice's end, so the trap strictly encloses its
        # slices however a viewer rounds microseconds to its own unit.
        end = now_ns()
        name = abi.HYPERCALL_NAMES.get(request.op, f"hypercall_{request.op}")
        timeline.complete(name, TRAP, domid, vcpu, self._start, end, args)
        if len(self._spans) > 1:
            before = 0
            for n, (began, ended, entries) in enumerate(self._spans, 1):
                slice_args = {"slice": n, "entries": entries - before}
                timeline.complete(f"{name} slice", SLICE, domid, vcpu, began, ended, slice_args)
                before = entries


def _reply_for(request: wire.Hypercall, result: HypercallResult) -> wire.Reply:
    if type(request.args) is wire.MulticallArgs:
        return wire.MulticallResult(request.id, result.rc, result.results)
    return wire.Result(request.id, result.rc, result.done, result.olds)


def _refused(request: wire.Request, code: str, message: str) -> Work:
    return Work(wire.ErrorReply(request.id, code, message[:MAX_ERROR_TEXT]))


def _failed(request: wire.Request, exc: Exception) -> Work:
    """A request that raised: the guest's fault (a domain or vCPU that is
    not there) or the hypervisor's (a bug)."""
    if isinstance(exc, DomainError):
        return _refused(request, WireErrorCode.OUT_OF_RANGE, str(exc))
    work = Work(_internal(request, exc))
    work.error = exc
    return work


def _internal(request: wire.Request, exc: Exception) -> wire.ErrorReply:
    """A hypervisor bug: logged with its traceback, reported as ``internal``."""
    log.error("internal_error", request=request.TYPE, exc_info=exc)
    return wire.ErrorReply(request.id, WireErrorCode.INTERNAL, repr(exc)[:MAX_ERROR_TEXT])


class HypervisorService:
    """Serves requests for the domains of one :class:`Hypervisor`."""

    def __init__(
        self, hv: Hypervisor, limits: ServerLimits | None = None, timeline: Timeline | None = None
    ) -> None:
        self.hv = hv
        self.limits = limits or ServerLimits()
        #: Where every counted trap is recorded, or None (then recording
        #: costs one attribute check per request).
        self.timeline = timeline
        self._members: dict[int, _Membership] = {}
        self._born: dict[int, int] = {}  # domid -> creation time, when recording

    def begin(self, session: Session, request: wire.Request) -> Work:
        """Start serving ``request`` on ``session`` (a connection past the
        wire's own checks: the handshake came first)."""
        if self.timeline is not None:  # all that recording costs when off
            return self._begin_recorded(session, request, self.timeline)
        try:
            if type(request) is wire.Hypercall:  # the common case first
                return self._hypercall(request, session)
            return self._begin(session, request)
        except Exception as exc:
            return _failed(request, exc)

    def serve(self, session: Session, request: wire.Request) -> tuple[wire.Reply, int | None]:
        """Serve ``request`` to the end in one go (no slicing, no yielding)."""
        work = self.begin(session, request)
        work.step(None)
        assert work.reply is not None
        return work.reply, work.fd

    def leave(self, session: Session) -> None:
        """The connection is gone: its vCPU is free; the domain dies with its
        last vCPU."""
        if session.domid is None:
            return
        membership = self._members.get(session.domid)
        if membership is None:
            return
        membership.vcpus.discard(session.vcpu)
        if not membership.vcpus:
            self.destroy(session.domid, reason="last connection closed")

    def destroy(self, domid: int, *, reason: str) -> None:
        self._members.pop(domid, None)
        if domid in self.hv.domains:
            if self.timeline is not None:
                self._record_lifetime(domid, self.timeline, reason)
            self.hv.destroy_domain(domid)
            log.info("domain_destroyed", domid=domid, reason=reason)

    def shutdown(self) -> None:
        """Destroy every domain (the hypervisor is stopping)."""
        for domid in list(self.hv.domains):
            self.destroy(domid, reason="shutdown")

    # --- the timeline -----------------------------------------------------------------

    def _begin_recorded(self, session: Session, request: wire.Request, timeline: Timeline) -> Work:
        """:meth:`begin`, recording what it counts: a hypercall (when it ends
        or is abandoned), an emulated page-table write, the iret of a
        resumed user run, a page fault."""
        start = now_ns()
        try:
            if type(request) is wire.Hypercall:
                work = self._hypercall(request, session)
            else:
                work = self._begin(session, request)
        except Exception as exc:
            work = _failed(request, exc)
        domid, vcpu, reply = session.domid, session.vcpu, work.reply
        if domid is None:
            return work
        if isinstance(work, _HypercallWork):
            counters = self.hv.domain(domid).counters[vcpu]
            return _RecordedHypercallWork(work, timeline, domid, vcpu, start, counters)
        if type(reply) is wire.PtwrResult:
            assert type(request) is wire.Ptwr
            args = {"maddr": request.maddr, "exchange": request.exchange, "rc": reply.rc}
            if request.clear_bits:
                args["clear_bits"] = request.clear_bits
            timeline.complete("ptwr", TRAP, domid, vcpu, start, now_ns(), args)
        elif type(reply) is wire.UserResult:
            assert type(request) is wire.RunUser
            if request.resume:  # the iret, then the fault the run took (if it did)
                ended = now_ns()
                iret = {"op": abi.HYPERVISOR_iret}
                timeline.complete("iret", TRAP, domid, vcpu, start, ended, iret)
                start = ended
            if reply.fault is not None:
                args = {"va": reply.fault.va, "error_code": reply.fault.error_code}
                args["accesses_before"] = reply.executed
                timeline.complete("page_fault", TRAP, domid, vcpu, start, now_ns(), args)
        elif type(reply) is wire.Welcome and type(request) is wire.Hello:
            self._born[domid] = start
            domain = self.hv.domain(domid)
            timeline.name_process(domid, f"dom{domid} {domain.name}", sort_index=domid)
            timeline.name_thread(domid, DOMAIN_TID, "domain", sort_index=-1)
            for v in range(domain.nr_vcpus):
                timeline.name_thread(domid, v, f"vCPU {v}", sort_index=v)
        return work

    def _record_lifetime(self, domid: int, timeline: Timeline, reason: str) -> None:
        """The domain's life as one span, with the traps its counters hold
        (what the trap spans of its vCPUs add up to)."""
        domain = self.hv.domain(domid)
        vcpus = [c.traps for c in domain.counters]
        args = {"name": domain.name, "traps": sum(vcpus), "traps_by_vcpu": vcpus, "end": reason}
        start = self._born.pop(domid, now_ns())
        timeline.complete(
            f"dom{domid} {domain.name}", DOMAIN, domid, DOMAIN_TID, start, now_ns(), args
        )

    # --- one request ------------------------------------------------------------------

    def _begin(self, session: Session, request: wire.Request) -> Work:
        match request:
            case wire.Hello():
                return self._hello(request, session)
            case wire.Join():
                return self._join(request, session)
            case wire.Bye():
                return Work(wire.Goodbye(request.id))
        domid = session.domid
        assert domid is not None  # the Connection enforces the handshake
        hv = self.hv
        match request:
            case wire.Ptwr():
                rc, old = hv.ptwr_write(
                    domid,
                    session.vcpu,
                    request.maddr,
                    request.val,
                    exchange=request.exchange,
                    clear_bits=request.clear_bits,
                )
                return Work(wire.PtwrResult(request.id, rc, old))
            case wire.KernelWrite():
                rc = hv.kernel_write(domid, session.vcpu, request.maddr, request.data)
                return Work(wire.KernelWriteResult(request.id, rc))
            case wire.RunUser():
                outcome = hv.run_user(domid, session.vcpu, request.accesses, resume=request.resume)
                fault = None
                if outcome.fault is not None:
                    fault = wire.Fault(outcome.fault.va, outcome.fault.error_code)
                reads = tuple(outcome.reads)
                return Work(wire.UserResult(request.id, outcome.executed, reads, fault))
            case wire.Stats():
                hv.domain(domid).counters[session.vcpu].queries += 1
                return Work(wire.StatsResult(request.id, hv.stats(domid)))
            case wire.Audit():
                hv.domain(domid).counters[session.vcpu].queries += 1
                violations = hv.audit()[: wire.MAX_VIOLATIONS]
                texts = tuple(v[: wire.MAX_TEXT_LEN] for v in violations)
                return Work(wire.AuditResult(request.id, texts))
        return _refused(request, WireErrorCode.NOT_SUPPORTED, request.TYPE)

    def _hypercall(self, request: wire.Hypercall, session: Session) -> Work:
        domid = session.domid
        assert domid is not None  # the Connection enforces the handshake
        batch = request.args.largest_batch
        if batch > self.limits.max_batch:
            return _refused(
                request,
                WireErrorCode.TOO_LARGE,
                f"mmu_update of {batch} records: the limit is {self.limits.max_batch}",
            )
        pending = self.hv.start_hypercall(domid, session.vcpu, request.as_call())
        return _HypercallWork(request, pending)

    # --- handshakes -------------------------------------------------------------------

    def _hello(self, hello: wire.Hello, session: Session) -> Work:
        if len(self._members) >= self.limits.max_domains:
            return _refused(
                hello, WireErrorCode.NOT_SUPPORTED, f"at most {self.limits.max_domains} domains"
            )
        domain = self.hv.create_domain(hello.memory_mib, hello.vcpus, hello.name)
        self._members[domain.domid] = _Membership({0})
        session.domid, session.vcpu = domain.domid, 0
        structlog.contextvars.bind_contextvars(domid=domain.domid, vcpu=0)
        log.info("domain_created", name=domain.name, memory_mib=hello.memory_mib, vcpus=hello.vcpus)
        return Work(self._welcome(hello.id, session), domain.memory.fd)

    def _join(self, join: wire.Join, session: Session) -> Work:
        membership = self._members.get(join.domid)
        domain = self.hv.domains.get(join.domid)
        if membership is None or domain is None:
            return _refused(join, WireErrorCode.NO_SUCH_DOMAIN, f"no domain {join.domid}")
        if not hmac.compare_digest(join.secret, domain.secret):
            log.warning("join_refused", domid=join.domid, reason="bad secret")
            return _refused(join, WireErrorCode.BAD_SECRET, "wrong secret")
        if not 0 <= join.vcpu < domain.nr_vcpus or join.vcpu in membership.vcpus:
            return _refused(join, WireErrorCode.OUT_OF_RANGE, f"vCPU {join.vcpu} is not free")
        membership.vcpus.add(join.vcpu)
        domain.fault_pending[join.vcpu] = False  # a fresh vCPU has no fault to return from
        session.domid, session.vcpu = join.domid, join.vcpu
        structlog.contextvars.bind_contextvars(domid=join.domid, vcpu=join.vcpu)
        log.info("vcpu_joined")
        return Work(self._welcome(join.id, session), domain.memory.fd)

    def _welcome(self, rid: int, session: Session) -> wire.Welcome:
        assert session.domid is not None
        domain = self.hv.domain(session.domid)
        limits = {
            "quantum": self.limits.quantum,
            "max_mmu_updates": self.limits.max_batch,
            "max_message_size": self.limits.message_size,
            "max_mmuext_ops": wire.MAX_MMUEXT_OPS,
            "max_multicall_calls": wire.MAX_MULTICALL_CALLS,
            "max_user_accesses": wire.MAX_USER_ACCESSES,
            "vcpus": domain.nr_vcpus,
        }
        return wire.Welcome(
            rid,
            domain.domid,
            session.vcpu,
            len(domain.p2m),
            domain.secret,
            limits,
            FEATURES,
        )


__all__ = ["FEATURES", "HypervisorService", "Session", "Work"]
