"""The trio shell around the hypervisor core: the only module with sockets.

One connection per vCPU. A Hello creates a domain (its sealed memfd travels
back with the Welcome as SCM_RIGHTS); a Join attaches another vCPU with the
domain's secret. Long hypercalls run in slices of ``quantum`` entries and
yield the one hypervisor CPU (``cpu.Cpu``) in between, so every other
connection is served meanwhile (Xen's continuation). A domain dies with its
last connection, even mid-batch. ``ServerLimits`` bounds what a guest can
make the server hold or do.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import hmac
import math
import os
import select
import socket
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import structlog
import trio

from pvemu.shared import abi, wire
from pvemu.shared.errors import RemoteProtocolError, WireErrorCode

from .core import DomainError, Hypervisor
from .cpu import Cpu
from .hypercalls import HypercallResult
from .scheduler import POLICIES

log = structlog.get_logger("pvemu.hypervisor")

RECEIVE_SIZE: Final = 256 * 1024
DEFAULT_QUANTUM: Final = 256
FEATURES: Final = (abi.XENFEAT_mmu_pt_update_preserve_ad,)


class ServerError(Exception):
    """The server cannot start (socket in use, path not a socket, ...)."""


class _PeerGone(Exception):
    """The guest closed its end while we were working for it."""


@dataclass(eq=False)
class _Session:
    """What one connection is: which vCPU of which domain (hashed by identity:
    the scheduler's key)."""

    domid: int | None = None
    vcpu: int = 0
    peer_pid: int = 0


@dataclass
class _Membership:
    vcpus: set[int] = field(default_factory=set)


def core_args(args: wire.HypercallArgs) -> tuple[object, ...]:
    """Wire arguments -> the core's argument tuple (mmu_update reqs stay a
    view of the received blob: no copy, no per-record objects)."""
    if isinstance(args, wire.MmuUpdateArgs):
        return (wire.u64_view(args.reqs), args.foreigndom)
    if isinstance(args, wire.MmuextOpArgs):
        return (args.ops, args.foreigndom)
    if isinstance(args, wire.MulticallArgs):
        return (tuple((call.op, *core_args(call.args)) for call in args.calls),)
    return args.to_wire()


def _record_count(args: wire.HypercallArgs) -> int:
    if isinstance(args, wire.MmuUpdateArgs):
        return args.count
    if isinstance(args, wire.MmuextOpArgs):
        return len(args.ops)
    if isinstance(args, wire.MulticallArgs):
        return sum(_record_count(call.args) for call in args.calls)
    return 1


def _largest_batch(args: wire.HypercallArgs) -> int:
    """Records in the biggest mmu_update of a request (0 if none)."""
    if isinstance(args, wire.MmuUpdateArgs):
        return args.count
    if isinstance(args, wire.MulticallArgs):
        return max((_largest_batch(call.args) for call in args.calls), default=0)
    return 0


def prepare_socket_path(path: str) -> None:
    """Remove a stale socket file; refuse if a live server answers on it."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ServerError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listens: a leftover from a crashed server
        return
    except FileNotFoundError:
        return
    finally:
        probe.close()
    raise ServerError(f"another server is already listening on {path}")


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Every bound on what a guest can make the server hold or do.

    Worst-case receive buffering is ``max_connections x message_size``: 4 GiB
    with the defaults, only if every connection sends a maximum message at
    once; an idle connection costs about 60 KiB.
    """

    #: Entries a long hypercall processes before yielding (Xen's preemption check).
    quantum: int = DEFAULT_QUANTUM
    #: Live domains; a Hello beyond this is refused.
    max_domains: int = 64
    #: Open connections; one beyond this gets an error and is closed at once.
    max_connections: int = 1024
    #: Records in one mmu_update (also inside a multicall); more is ``too_large``.
    max_batch: int = 65536
    #: Seconds a connection may stay without Hello/Join before it is closed.
    handshake_timeout: float = 10.0
    #: Seconds a reply may wait for a guest that does not read before the
    #: connection is dropped (as if the guest hung up).
    send_timeout: float = 30.0
    #: Who runs the next slice: "fair" (FairShare) or "fifo" (first come).
    scheduler: str = "fair"

    def __post_init__(self) -> None:
        for name in ("quantum", "max_domains", "max_connections", "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_batch > wire.MAX_MMU_UPDATES:
            raise ValueError(f"max_batch is at most {wire.MAX_MMU_UPDATES} (the wire's ceiling)")
        if not (self.handshake_timeout > 0 and self.send_timeout > 0):
            raise ValueError("timeouts must be positive")
        if self.scheduler not in POLICIES:
            raise ValueError(f"scheduler must be one of {', '.join(POLICIES)}")

    @property
    def message_size(self) -> int:
        """The largest request accepted: room for a maximum batch, and never
        less than every other request needs."""
        batch_bytes = self.max_batch * wire.MMU_UPDATE_SIZE + 64 * 1024
        return min(wire.MAX_MESSAGE_SIZE, max(wire.DEFAULT_MESSAGE_SIZE, batch_bytes))


class HypervisorServer:
    """Serves one :class:`Hypervisor` on a Unix socket."""

    def __init__(self, hv: Hypervisor, limits: ServerLimits | None = None) -> None:
        self.hv = hv
        self.limits = limits or ServerLimits()
        self._members: dict[int, _Membership] = {}
        self._cpu = Cpu(POLICIES[self.limits.scheduler]())
        self._connections = 0
        self._refused = 0  # refusals not logged yet
        self._last_refusal_log = -math.inf

    async def serve(
        self, socket_path: str, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen until cancelled; ``nursery.start`` returns once accepting.

        The socket file is removed on the way out, and every domain destroyed.
        """
        prepare_socket_path(socket_path)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(socket_path)
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        listener = trio.SocketListener(sock)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self._handle, [listener])
                log.info("listening", socket=socket_path, **dataclasses.asdict(self.limits))
                task_status.started(socket_path)
        finally:
            with trio.CancelScope(shield=True):
                await listener.aclose()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(socket_path)
            for domid in list(self.hv.domains):
                self._destroy(domid, reason="shutdown")

    # --- one connection -------------------------------------------------------------

    async def _handle(self, stream: trio.SocketStream) -> None:
        structlog.contextvars.clear_contextvars()
        limits = self.limits
        conn = wire.Connection("server", max_message_size=limits.message_size)
        self._connections += 1
        try:
            if self._connections > limits.max_connections:
                self._refused += 1
                now = trio.current_time()
                if now - self._last_refusal_log >= 1.0:  # a flood must not flood the log
                    log.warning(
                        "connections_refused", limit=limits.max_connections, count=self._refused
                    )
                    self._refused, self._last_refusal_log = 0, now
                refusal = wire.ErrorReply(
                    None,
                    WireErrorCode.NOT_SUPPORTED,
                    f"too many connections (the limit is {limits.max_connections})",
                )
                with trio.move_on_after(1):
                    await stream.send_all(conn.send(refusal))
                return
            await self._handle_admitted(stream, conn)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._connections -= 1
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _handle_admitted(self, stream: trio.SocketStream, conn: wire.Connection) -> None:
        session = _Session()
        try:
            creds = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            session.peer_pid = int.from_bytes(creds[:4], "little")
        except OSError:
            pass
        structlog.contextvars.bind_contextvars(peer_pid=session.peer_pid)
        poller = select.poll()
        poller.register(stream.socket.fileno(), select.POLLRDHUP | select.POLLHUP)
        try:
            await self._serve_connection(stream, conn, session, poller)
        except (trio.BrokenResourceError, trio.ClosedResourceError, _PeerGone):
            pass
        finally:
            self._cpu.forget(session)
            if session.domid is not None:
                self._leave(session)

    async def _serve_connection(
        self,
        stream: trio.SocketStream,
        conn: wire.Connection,
        session: _Session,
        poller: select.poll,
    ) -> None:
        handshake_deadline = trio.current_time() + self.limits.handshake_timeout
        while True:
            try:
                event = conn.next_event()
            except RemoteProtocolError as exc:
                log.warning("protocol_error", code=exc.code, fatal=exc.fatal, error=exc.message)
                await self._send(stream, conn.send(wire.ErrorReply.from_exception(exc)))
                if exc.fatal:
                    return
                continue
            if event is wire.NEED_DATA:
                deadline = handshake_deadline if session.domid is None else math.inf
                with trio.move_on_at(deadline):
                    conn.receive_data(await stream.receive_some(RECEIVE_SIZE))
                    continue
                log.warning("handshake_timeout", seconds=self.limits.handshake_timeout)
                timeout = wire.ErrorReply(
                    None,
                    WireErrorCode.BAD_STATE,
                    f"no hello or join within {self.limits.handshake_timeout:g} s",
                )
                await self._send(stream, conn.send(timeout))
                return
            if event is wire.CONNECTION_CLOSED:
                return
            assert isinstance(event, wire.Request)
            async with self._cpu.running(session):
                reply, fd = await self._dispatch(event, session, stream, poller)
            await self._send(stream, conn.send(reply), fd)
            if isinstance(reply, wire.Goodbye):
                return

    async def _send(self, stream: trio.SocketStream, data: bytes, fd: int | None = None) -> None:
        """Send a reply; a guest that leaves it unread for ``send_timeout``
        seconds is treated as gone, so it cannot pin the server's memory."""
        with trio.move_on_after(self.limits.send_timeout):
            if fd is None:
                await stream.send_all(data)
            else:
                await _send_with_fd(stream, data, fd)
            return
        log.warning("send_timeout", seconds=self.limits.send_timeout, bytes=len(data))
        raise _PeerGone

    async def _dispatch(
        self,
        request: wire.Request,
        session: _Session,
        stream: trio.SocketStream,
        poller: select.poll,
    ) -> tuple[wire.Reply, int | None]:
        rid = request.id
        try:
            if isinstance(request, wire.Hello):
                return self._hello(request, session)
            if isinstance(request, wire.Join):
                return self._join(request, session)
            if isinstance(request, wire.Bye):
                return wire.Goodbye(rid), None
            assert session.domid is not None  # the Connection enforces the handshake
            if isinstance(request, wire.Hypercall):
                batch = _largest_batch(request.args)
                if batch > self.limits.max_batch:
                    return wire.ErrorReply(
                        rid,
                        WireErrorCode.TOO_LARGE,
                        f"mmu_update of {batch} records: the limit is {self.limits.max_batch}",
                    ), None
                return await self._hypercall(request, session, poller), None
            if isinstance(request, wire.Ptwr):
                rc, old = self.hv.ptwr_write(
                    session.domid,
                    session.vcpu,
                    request.maddr,
                    request.val,
                    exchange=request.exchange,
                )
                return wire.PtwrResult(rid, rc, old), None
            if isinstance(request, wire.RunUser):
                outcome = self.hv.run_user(session.domid, session.vcpu, request.accesses)
                fault = None
                if outcome.fault is not None:
                    fault = wire.Fault(outcome.fault.va, outcome.fault.error_code)
                return wire.UserResult(rid, outcome.executed, tuple(outcome.reads), fault), None
            if isinstance(request, wire.Stats):
                self.hv.domain(session.domid).counters[session.vcpu].queries += 1
                return wire.StatsResult(rid, self.hv.stats(session.domid)), None
            if isinstance(request, wire.Audit):
                self.hv.domain(session.domid).counters[session.vcpu].queries += 1
                violations = self.hv.audit()[: wire.MAX_VIOLATIONS]
                return wire.AuditResult(
                    rid, tuple(v[: wire.MAX_TEXT_LEN] for v in violations)
                ), None
        except _PeerGone:
            raise
        except (DomainError, ValueError, IndexError) as exc:
            return wire.ErrorReply(rid, WireErrorCode.OUT_OF_RANGE, str(exc)[:1000]), None
        except Exception as exc:  # a hypervisor bug: report it, keep serving others
            log.exception("internal_error", request=request.TYPE)
            return wire.ErrorReply(rid, WireErrorCode.INTERNAL, repr(exc)[:1000]), None
        return wire.ErrorReply(rid, WireErrorCode.NOT_SUPPORTED, request.TYPE), None

    def _hello(self, hello: wire.Hello, session: _Session) -> tuple[wire.Reply, int | None]:
        if len(self._members) >= self.limits.max_domains:
            return wire.ErrorReply(
                hello.id, WireErrorCode.NOT_SUPPORTED, f"at most {self.limits.max_domains} domains"
            ), None
        try:
            domain = self.hv.create_domain(hello.memory_mib, hello.vcpus, hello.name)
        except DomainError as exc:
            return wire.ErrorReply(hello.id, WireErrorCode.OUT_OF_RANGE, str(exc)), None
        self._members[domain.domid] = _Membership({0})
        session.domid, session.vcpu = domain.domid, 0
        structlog.contextvars.bind_contextvars(domid=domain.domid, vcpu=0)
        log.info("domain_created", name=domain.name, memory_mib=hello.memory_mib, vcpus=hello.vcpus)
        return self._welcome(hello.id, session), domain.memory.fd

    def _join(self, join: wire.Join, session: _Session) -> tuple[wire.Reply, int | None]:
        membership = self._members.get(join.domid)
        domain = self.hv.domains.get(join.domid)
        if membership is None or domain is None:
            return wire.ErrorReply(
                join.id, WireErrorCode.NO_SUCH_DOMAIN, f"no domain {join.domid}"
            ), None
        if not hmac.compare_digest(join.secret, domain.secret):
            log.warning("join_refused", domid=join.domid, reason="bad secret")
            return wire.ErrorReply(join.id, WireErrorCode.BAD_SECRET, "wrong secret"), None
        if not 0 <= join.vcpu < domain.nr_vcpus or join.vcpu in membership.vcpus:
            return wire.ErrorReply(
                join.id, WireErrorCode.OUT_OF_RANGE, f"vCPU {join.vcpu} is not free"
            ), None
        membership.vcpus.add(join.vcpu)
        session.domid, session.vcpu = join.domid, join.vcpu
        structlog.contextvars.bind_contextvars(domid=join.domid, vcpu=join.vcpu)
        log.info("vcpu_joined")
        return self._welcome(join.id, session), domain.memory.fd

    def _welcome(self, rid: int, session: _Session) -> wire.Welcome:
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
            wire.pack_u64s(domain.p2m),
            domain.secret,
            limits,
            FEATURES,
        )

    async def _hypercall(
        self, request: wire.Hypercall, session: _Session, poller: select.poll
    ) -> wire.Reply:
        assert session.domid is not None
        started = time.perf_counter()
        call = self.hv.start_hypercall(
            session.domid, session.vcpu, request.op, core_args(request.args)
        )
        slices = 1
        while not call.step(self.limits.quantum):
            slices += 1
            if poller.poll(0):  # the guest hung up mid-batch: stop here
                call.abandon()
                log.info("hypercall_abandoned", op=request.op, slices=slices)
                raise _PeerGone
            await self._cpu.preempt(session)
        result = call.result
        assert result is not None
        log.info(
            abi.HYPERCALL_NAMES.get(request.op, f"hypercall_{request.op}"),
            op=request.op,
            records=_record_count(request.args),
            rc=result.rc,
            done=result.done,
            slices=slices,
            duration_us=round((time.perf_counter() - started) * 1e6, 1),
        )
        return _reply_for(request, result)

    # --- domain lifetime ----------------------------------------------------------------

    def _leave(self, session: _Session) -> None:
        assert session.domid is not None
        membership = self._members.get(session.domid)
        if membership is None:
            return
        membership.vcpus.discard(session.vcpu)
        if not membership.vcpus:
            self._destroy(session.domid, reason="last connection closed")

    def _destroy(self, domid: int, *, reason: str) -> None:
        self._members.pop(domid, None)
        if domid in self.hv.domains:
            self.hv.destroy_domain(domid)
            log.info("domain_destroyed", domid=domid, reason=reason)


def _reply_for(request: wire.Hypercall, result: HypercallResult) -> wire.Reply:
    if request.op == abi.HYPERVISOR_multicall:
        return wire.MulticallResult(request.id, result.rc, result.results)
    return wire.Result(request.id, result.rc, result.done)


async def _send_with_fd(stream: trio.SocketStream, data: bytes, fd: int) -> None:
    """Send ``data`` with ``fd`` attached (SCM_RIGHTS) to its first byte."""
    fds = array.array("i", [fd])
    sent = await stream.socket.sendmsg(
        [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())]
    )
    if sent < len(data):
        await stream.send_all(data[sent:])


async def run_server(
    socket_path: str,
    hv: Hypervisor,
    limits: ServerLimits,
    *,
    ready_line: Sequence[str] = (),
) -> None:
    """Serve until SIGINT/SIGTERM; print ``ready_line`` once accepting."""
    import signal

    server = HypervisorServer(hv, limits)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, socket_path)
            for line in ready_line:
                print(line, flush=True)
            async for signum in signals:
                log.info("shutting_down", signal=signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


__all__ = [
    "DEFAULT_QUANTUM",
    "HypervisorServer",
    "ServerError",
    "ServerLimits",
    "core_args",
    "prepare_socket_path",
    "run_server",
]
