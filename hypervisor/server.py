"""The trio shell around the hypervisor core: the only module with sockets.

One connection per vCPU. A Hello creates a domain (its sealed memfd travels
back with the Welcome as SCM_RIGHTS); a Join attaches another vCPU with the
domain's secret. Long hypercalls run in slices of ``quantum`` entries and
yield the one hypervisor CPU (``cpu.Cpu``) in between, so every other
connection is served meanwhile (Xen's continuation). A domain dies with its
last connection, even mid-batch. ``ServerLimits`` bounds what a guest can
make the server hold or do. What a request means is the sans-I/O
``service.HypervisorService``'s business; this module moves its bytes.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import math
import os
import select
import socket
import stat
from collections.abc import Sequence
from typing import Final

import structlog
import trio

from pvemu.shared import wire
from pvemu.shared.errors import RemoteProtocolError, WireErrorCode
from pvemu.shared.lone_wait import lone_wait_ms, poll_lone
from pvemu.shared.timeline import Timeline

from .core import Hypervisor
from .cpu import Cpu
from .limits import DEFAULT_QUANTUM, ServerLimits
from .scheduler import POLICIES
from .service import HypervisorService, Session, Work

log = structlog.get_logger("pvemu.hypervisor")

RECEIVE_SIZE: Final = 256 * 1024


class ServerError(Exception):
    """The server cannot start (socket in use, path not a socket, ...)."""


class _PeerGone(Exception):
    """The guest closed its end while we were working for it."""


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


class HypervisorServer:
    """Serves one :class:`Hypervisor` on a Unix socket."""

    def __init__(
        self, hv: Hypervisor, limits: ServerLimits | None = None, timeline: Timeline | None = None
    ) -> None:
        self.hv = hv
        self.limits = limits or ServerLimits()
        self.service = HypervisorService(hv, self.limits, timeline)
        self._cpu = Cpu(POLICIES[self.limits.scheduler]())
        self._connections = 0
        self._refused = 0  # refusals not logged yet
        self._last_refusal_log = -math.inf
        self._listener_fd = -1  # the listening socket, once serving
        # What a lone wait watches: the listener and every admitted guest.
        self._watch = select.poll()
        # Connection tasks not parked in the wait for their guest's bytes.
        self._busy = 0

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
        self._listener_fd = sock.fileno()
        self._watch.register(self._listener_fd, select.POLLIN)
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
            self.service.shutdown()

    # --- one connection -------------------------------------------------------------

    async def _handle(self, stream: trio.SocketStream) -> None:
        structlog.contextvars.clear_contextvars()
        limits = self.limits
        conn = wire.Connection("server", max_message_size=limits.message_size)
        self._connections += 1
        self._busy += 1
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
            self._busy -= 1
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _handle_admitted(self, stream: trio.SocketStream, conn: wire.Connection) -> None:
        session = Session()
        try:
            creds = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            session.peer_pid = int.from_bytes(creds[:4], "little")
        except OSError:
            pass
        structlog.contextvars.bind_contextvars(peer_pid=session.peer_pid)
        poller = select.poll()
        poller.register(stream.socket.fileno(), select.POLLRDHUP | select.POLLHUP)
        self._watch.register(stream.socket.fileno(), select.POLLIN)
        try:
            await self._serve_connection(stream, conn, session, poller)
        except (trio.BrokenResourceError, trio.ClosedResourceError, _PeerGone):
            pass
        finally:
            self._watch.unregister(stream.socket.fileno())
            self._cpu.forget(session)
            self.service.leave(session)

    async def _serve_connection(
        self,
        stream: trio.SocketStream,
        conn: wire.Connection,
        session: Session,
        poller: select.poll,
    ) -> None:
        """Serve one connection's requests in order.

        Past the handshake the socket is read and written directly
        (:func:`_receive`, :func:`_send_now`): trio's stream adds a scheduler
        pass to every send and a cancel scope to every wait. Unless this
        connection is all there is to run (:meth:`_wait_alone`), every
        request passes one checkpoint (the wait for its bytes, or an
        explicit one when it came in the same read as the one before), so a
        guest that pipelines cannot keep the other connections from running,
        and cancellation (shutdown) is seen at once.
        """
        handshake_deadline = trio.current_time() + self.limits.handshake_timeout
        fd = stream.socket.fileno()
        cpu, service, quantum = self._cpu, self.service, self.limits.quantum
        waited = False  # this request has passed a checkpoint
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
                if session.domid is not None:
                    conn.receive_data(await self._receive(fd))
                    waited = True
                    continue
                with trio.move_on_at(handshake_deadline):
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
            if not cpu.try_acquire(session):
                await cpu.acquire_queued(session)
                waited = True
            try:
                work = service.begin(session, event)
                if not work.step(quantum):
                    await self._finish(work, session, poller)
                    waited = True
            finally:
                cpu.release(session)
            reply = work.reply
            assert reply is not None
            data = conn.send(reply)
            if work.fd is not None:
                await self._send(stream, data, work.fd)
            else:
                sent = _send_now(fd, data)
                if sent < len(data):
                    await self._send(stream, memoryview(data)[sent:])
                elif not waited:
                    await trio.lowlevel.checkpoint()
            if type(reply) is wire.Goodbye:
                return
            waited = False

    async def _send(
        self, stream: trio.SocketStream, data: bytes | memoryview, fd: int | None = None
    ) -> None:
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

    async def _receive(self, fd: int) -> bytes:
        """Wait until the guest has sent something and read it (``b""`` at
        EOF). The wait comes first: right after a reply the next request is
        almost never there yet, and a failed read costs a syscall and an
        exception. When this connection is all the server has to serve, the
        wait is a blocking ``poll`` (:meth:`_wait_alone`), else trio's."""
        while True:
            self._busy -= 1
            try:
                if not self._wait_alone(fd):
                    await trio.lowlevel.wait_readable(fd)
            finally:
                self._busy += 1
            try:
                return os.read(fd, RECEIVE_SIZE)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc

    def _wait_alone(self, fd: int) -> bool:
        """Block in ``poll`` on every connection and the listening socket
        when nothing else in the server could proceed meanwhile: every other
        connection's task is parked waiting for its guest's bytes, no task
        runnable, no callback queued (signals arrive as one), nobody waiting
        on I/O but those tasks, trio's own wakeup reader and the listener,
        and no deadline before the wait would end (it ends after at most
        :data:`~pvemu.shared.lone_wait.ALONE_WAIT_S`, so anything else is
        delayed by no more). True once this guest's bytes, and only they,
        are readable; False when the caller must wait in trio (a new
        connection, another guest's request, a deadline, a signal, another
        connection at work).

        A task woken in the same scheduler batch as this one is invisible
        to trio's statistics; the busy count and the watched sockets cover
        it: a connection task woken by something other than its socket was
        not parked (so ``_busy`` counts it), and one woken by its socket
        still has the bytes unread (so ``poll`` returns at once).

        One vCPU at work at a time is the common case (``pvemu run`` gives
        its guest a second, idle vCPU), and a round through trio's scheduler
        (an epoll registration, ``epoll_wait``, a reschedule) per request
        was then pure overhead.
        """
        if self._busy:
            return False
        # trio's wakeup reader, the listener and the other parked connections
        wait_ms = lone_wait_ms(readers=1 + self._connections)
        if wait_ms <= 0:
            return False
        ready = poll_lone(self._watch, wait_ms)
        return len(ready) == 1 and ready[0][0] == fd

    async def _finish(self, work: Work, session: Session, poller: select.poll) -> None:
        """The rest of a long hypercall, in slices of ``quantum`` entries
        with the CPU yielded in between (Xen's continuation); a guest that
        hangs up mid-batch has its call abandoned there."""
        while True:
            if poller.poll(0):
                work.abandon()
                raise _PeerGone
            await self._cpu.preempt(session)
            if work.step(self.limits.quantum):
                return


def _send_now(fd: int, data: bytes) -> int:
    """Send as much of ``data`` as the socket takes without blocking."""
    try:
        return os.write(fd, data)
    except BlockingIOError:
        return 0
    except OSError as exc:
        raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc


async def _send_with_fd(stream: trio.SocketStream, data: bytes | memoryview, fd: int) -> None:
    """Send ``data`` with ``fd`` attached (SCM_RIGHTS) to its first byte."""
    fds = array.array("i", [fd])
    try:
        sent = await stream.socket.sendmsg(
            [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())]
        )
    except OSError as exc:  # the raw socket's error: the guest died meanwhile
        raise _PeerGone from exc
    if sent < len(data):
        await stream.send_all(data[sent:])


async def run_server(
    socket_path: str,
    hv: Hypervisor,
    limits: ServerLimits,
    *,
    ready_line: Sequence[str] = (),
    timeline: Timeline | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM; print ``ready_line`` once accepting;
    record every trap in ``timeline`` when one is given."""
    import signal

    server = HypervisorServer(hv, limits, timeline)
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
    "prepare_socket_path",
    "run_server",
]
