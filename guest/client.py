"""The raw hypercall client: one channel per vCPU, the domain's memory mapped
read-only, and guest-side trap counters.

A :class:`Transport` opens :class:`Channel` s (request in, reply out). There
are two: :class:`SocketTransport`, the Unix socket to a hypervisor process
(what pvemu runs), and the tests' loopback over the sans-I/O service in the
same process. :class:`Domain` is the one client class over either.

``connect()`` yields a :class:`Domain` handle that is already booted (an
initial L4/L3/L2/L1 tree pinned and loaded on every vCPU). The names and
shapes here are a stable interface (docs/sources.md §4): tools script against them.

Errors: a typed error reply raises :class:`HypervisorError` (its ``code`` is
the reply's). Every way the hypervisor can vanish — no socket to connect to,
EOF before or inside a reply, a broken pipe or reset on send or receive —
raises :class:`HypervisorGone` (a ``HypervisorError`` with code
``disconnected`` whose message names the socket), never a bare ``OSError``;
every later request on that connection raises it again at once. Leaving
``connect()`` after the hypervisor has gone is quiet.
"""

from __future__ import annotations

import array
import contextlib
import errno
import mmap
import os
import select
import socket
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol

import numpy as np
import trio

from pvemu.shared import abi, wire
from pvemu.shared.arrays import has_repeats
from pvemu.shared.counts import trap_count
from pvemu.shared.errors import RemoteProtocolError
from pvemu.shared.lone_wait import lone_wait_ms, poll_lone
from pvemu.shared.timeline import GUEST, Timeline, now_ns
from pvemu.shared.x86 import PAGE_SHIFT, PAGE_SIZE

from .machine import check_kernel_write
from .ptes import mmu_update_records

if TYPE_CHECKING:
    from .ptes import Indexes, Ptes

RECEIVE_SIZE: Final = 256 * 1024
#: Requests of this process waiting for their replies, over every channel.
_in_flight = 0
_FD_SPACE: Final = socket.CMSG_SPACE(4 * 4)
#: Errnos of a send or receive that mean the peer is gone.
_PEER_GONE_ERRNOS: Final = frozenset(
    {errno.EPIPE, errno.ECONNRESET, errno.ECONNABORTED, errno.ENOTCONN}
)


class HypervisorError(Exception):
    """The hypervisor answered with a typed error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class HypervisorGone(HypervisorError):
    """The hypervisor is not there (any more): nothing to connect to, or the
    connection ended without a reply. Code ``disconnected``; ``socket_path``
    names the hypervisor's socket."""

    def __init__(self, socket_path: str, what: str) -> None:
        super().__init__("disconnected", f"the hypervisor at {socket_path or '?'} {what}")
        self.socket_path = socket_path


@dataclass
class GuestCounters:
    """Traps as the guest counts them (what it issued), to check against the
    hypervisor's own count."""

    hypercalls: Counter[int] = field(default_factory=Counter)
    ptwr: int = 0
    page_faults: int = 0
    mmu_update_records: int = 0
    #: of which ``MMU_PT_XCHG_PVEMU`` (:meth:`Domain.mmu_xchg`)
    mmu_xchg_records: int = 0
    multicall_entries: int = 0

    @property
    def traps(self) -> int:
        return trap_count(sum(self.hypercalls.values()), self.ptwr, self.page_faults)

    @classmethod
    def sum(cls, parts: list[GuestCounters]) -> GuestCounters:
        """The counters of several vCPUs added up."""
        total = cls()
        for c in parts:
            total.hypercalls.update(c.hypercalls)
            total.ptwr += c.ptwr
            total.page_faults += c.page_faults
            total.mmu_update_records += c.mmu_update_records
            total.mmu_xchg_records += c.mmu_xchg_records
            total.multicall_entries += c.multicall_entries
        return total

    def as_dict(self) -> dict[str, int]:
        return {
            "traps": self.traps,
            "hypercalls": sum(self.hypercalls.values()),
            "ptwr": self.ptwr,
            "page_faults": self.page_faults,
            "mmu_update_records": self.mmu_update_records,
            "mmu_xchg_records": self.mmu_xchg_records,
            "multicall_entries": self.multicall_entries,
        }


class Channel(Protocol):
    """One vCPU's connection to the hypervisor: one request in flight at a
    time. An error reply raises :class:`HypervisorError`."""

    def next_id(self) -> int: ...

    async def request(self, message: wire.Request) -> wire.Reply: ...

    def take_fds(self) -> list[int]:
        """Descriptors that came with replies (the memory fd), now the caller's."""
        ...

    def close(self) -> None: ...


class Transport(Protocol):
    """Opens the channels of a domain's vCPUs."""

    async def open_channel(self) -> Channel: ...


class VcpuChannel:
    """One vCPU's Unix-socket connection: strictly one request in flight at a time.

    A trap is synchronous for the vCPU that takes it, so the common case is
    served without trio's machinery: the request is written straight to the
    socket, and when nothing else in this process could run meanwhile (see
    :func:`_wait_alone`) the reply is awaited in a blocking ``poll``, as a
    blocking client would. Otherwise the wait is trio's ``wait_readable``, and
    the other tasks (other vCPUs, writers, a flusher) run while it lasts.
    """

    def __init__(self, sock: trio.socket.SocketType, socket_path: str = "") -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self._poller = select.poll()
        self._poller.register(self._fd, select.POLLIN)
        self.socket_path = socket_path
        #: How the hypervisor went away, once it has: later requests fail at once.
        self._gone: str | None = None
        self._conn = wire.Connection("client")
        self._lock = trio.StrictFIFOLock()
        self._next_id = 1
        self.fds: list[int] = []

    def next_id(self) -> int:
        rid = self._next_id
        self._next_id += 1
        return rid

    async def request(self, message: wire.Request) -> wire.Reply:
        lock = self._lock
        try:
            lock.acquire_nowait()  # free: no checkpoint, no task switch
        except trio.WouldBlock:
            await lock.acquire()
        try:
            return await self._request(message)
        finally:
            lock.release()

    async def _request(self, message: wire.Request) -> wire.Reply:
        if self._gone is not None:
            raise HypervisorGone(self.socket_path, self._gone)
        global _in_flight
        _in_flight += 1
        try:
            return await self._exchange(message)
        finally:
            _in_flight -= 1

    async def _exchange(self, message: wire.Request) -> wire.Reply:
        await self._send(self._conn.send(message))
        # Only a Welcome carries a descriptor: until then read with recvmsg.
        with_fds = type(message) is wire.Hello or type(message) is wire.Join
        eof = False
        while True:
            try:
                event = self._conn.next_event()
            except RemoteProtocolError as exc:
                if eof:  # the stream ended inside a reply
                    raise self._lost("closed the connection in the middle of a reply") from exc
                raise HypervisorError(exc.code, exc.message) from exc
            if event is wire.NEED_DATA:
                chunk = await (self._receive_with_fds() if with_fds else self._receive())
                eof = not chunk
                self._conn.receive_data(chunk)
                continue
            if event is wire.CONNECTION_CLOSED:
                raise self._lost("closed the connection before replying")
            assert isinstance(event, wire.Reply)
            if type(event) is wire.ErrorReply:
                raise HypervisorError(event.code, event.message)
            return event

    async def _send(self, data: bytes) -> None:
        """Write ``data``: straight to the socket, trio's send for whatever it
        did not take at once."""
        try:
            sent = os.write(self._fd, data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise self._vanished(exc, "sending") from exc
        if sent == len(data):
            return
        # A view, not slices: slicing a 16 MiB batch after every partial
        # send copied the rest each time (quadratic in the message size).
        rest = memoryview(data)[sent:]
        while rest:
            try:
                sent = await self._sock.send(rest)
            except OSError as exc:
                raise self._vanished(exc, "sending") from exc
            rest = rest[sent:]

    async def _receive(self) -> bytes:
        """The next bytes of the reply (``b""`` at EOF). The wait comes
        first: right after the request the reply is never there yet."""
        while True:
            if not _wait_alone(self._poller):
                await trio.lowlevel.wait_readable(self._fd)
            try:
                return os.read(self._fd, RECEIVE_SIZE)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise self._vanished(exc, "waiting for the reply") from exc

    async def _receive_with_fds(self) -> bytes:
        """The next bytes, and any descriptor passed with them (the Welcome's)."""
        try:
            chunk, ancdata, _flags, _addr = await self._sock.recvmsg(RECEIVE_SIZE, _FD_SPACE)
        except OSError as exc:
            raise self._vanished(exc, "waiting for the reply") from exc
        self._take_fds(ancdata)
        return chunk

    def _lost(self, what: str) -> HypervisorGone:
        """The hypervisor is gone: every later request fails the same way."""
        self._gone = what
        return HypervisorGone(self.socket_path, what)

    def _vanished(self, exc: OSError, doing: str) -> Exception:
        """A send/receive error: HypervisorGone if it means the peer is gone."""
        if exc.errno not in _PEER_GONE_ERRNOS:
            return exc
        return self._lost(f"closed the connection ({exc.strerror} while {doing})")

    def _take_fds(self, ancdata: list[tuple[int, int, bytes]]) -> None:
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                self.fds.extend(fds)

    def take_fds(self) -> list[int]:
        fds, self.fds = self.fds, []
        return fds

    def close(self) -> None:
        for fd in self.take_fds():
            os.close(fd)
        self._sock.close()


def _wait_alone(poller: select.poll) -> bool:
    """Block in ``poll`` until the reply is readable, if nothing else in this
    trio run could proceed meanwhile: no other request in flight, no task
    runnable, no callback queued, nobody but trio's own wakeup reader
    waiting on I/O, and no deadline before the wait would end (it ends
    after at most :data:`~pvemu.shared.lone_wait.ALONE_WAIT_S`). True once readable; False when the
    caller must wait the trio way (and let the scheduler deliver deadlines,
    cancellations and thread results). A task woken in the same scheduler
    batch as this one is invisible to these statistics: it waits for this
    reply (at most :data:`~pvemu.shared.lone_wait.ALONE_WAIT_S`), as it would behind any blocking
    call.

    Waiting in trio costs a pass of its scheduler (an epoll registration,
    ``epoll_wait``, a reschedule) for a wait nobody else can use; a blocking
    client loop is what a lone vCPU's trap is.
    """
    if _in_flight > 1:
        # Another vCPU's task waits for its reply: it may have been woken in
        # the same batch as this one, which trio's statistics do not show.
        return False
    wait_ms = lone_wait_ms(readers=1)  # trio's own wakeup reader
    return wait_ms > 0 and bool(poll_lone(poller, wait_ms))


class SocketTransport:
    """Channels over the hypervisor's Unix socket."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path

    async def open_channel(self) -> VcpuChannel:
        return await _open_channel(self.socket_path)


async def _open_channel(socket_path: str) -> VcpuChannel:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.connect(socket_path)
    except FileNotFoundError as exc:
        sock.close()
        raise HypervisorGone(socket_path, "is not running (no such socket file)") from exc
    except ConnectionRefusedError as exc:
        sock.close()
        raise HypervisorGone(socket_path, "is not running (nothing listens on the socket)") from exc
    except BaseException:
        sock.close()
        raise
    return VcpuChannel(sock, socket_path)


class Domain:
    """A booted domain as seen from the guest: the raw hypercall interface
    (docs/sources.md §4) over any :class:`Transport`."""

    def __init__(self, welcome: wire.Welcome, memory_fd: int, channels: Sequence[Channel]) -> None:
        """Takes ``memory_fd`` (the domain's sealed memfd): mapped read-only
        here and closed with the domain, or when the domain is collected."""
        size = welcome.memfd_size
        if os.fstat(memory_fd).st_size < size:
            raise HypervisorError("malformed", "the memory fd is smaller than the welcome says")
        memory = mmap.mmap(memory_fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        #: The domain's memory as the hypervisor passed it (read-only to us).
        self.memory_fd = memory_fd
        self._close_fd = weakref.finalize(self, os.close, memory_fd)
        self.domid = welcome.domid
        nr_frames = welcome.nr_frames
        p2m = np.frombuffer(memory, dtype="<u8", count=nr_frames, offset=wire.p2m_offset(nr_frames))
        #: PFN -> MFN, read from the memfd's tail (a copy: the mapping must close).
        self.p2m = array.array("Q", p2m.astype(np.uint64).tobytes())
        #: MFN -> PFN, -1 where the frame is not ours: a C array, not a dict,
        #: because a 16 GiB domain has four million frames.
        m2p = np.full(int(p2m.max()) + 1, -1, dtype=np.int32)
        m2p[p2m] = np.arange(nr_frames, dtype=np.int32)
        self._m2p = array.array("i", m2p.tobytes())
        del p2m, m2p  # no view of the mapping may outlive it
        self.secret = welcome.secret
        self.limits = dict(welcome.limits)
        self.features = tuple(welcome.features)
        self.l4_mfn = 0
        self._memory = memory
        self._words = memoryview(memory).cast("Q")
        self._channels = list(channels)
        self._counters = [GuestCounters() for _ in channels]
        self._free_pfns = array.array("I", np.arange(nr_frames - 1, -1, -1, dtype=np.uint32))
        #: Where each trap's round trip is recorded (``pvemu guest --timeline``), or None.
        self.timeline: Timeline | None = None

    @property
    def nr_vcpus(self) -> int:
        return len(self._channels)

    @property
    def counters(self) -> GuestCounters:
        """Guest-side counters summed over vCPUs."""
        return GuestCounters.sum(self._counters)

    def vcpu_counters(self, vcpu: int) -> GuestCounters:
        return self._counters[vcpu]

    # --- memory (read-only, no trap) --------------------------------------------------

    def alloc_frame(self) -> int:
        """A zeroed frame of this domain that nothing uses yet (its MFN)."""
        if not self._free_pfns:
            raise MemoryError("the domain has no free frame left")
        return self.p2m[self._free_pfns.pop()]

    def free_frames(self) -> int:
        return len(self._free_pfns)

    def pfn_of(self, mfn: int) -> int:
        """This domain's PFN of ``mfn``; KeyError if the frame is not ours."""
        m2p = self._m2p
        pfn = m2p[mfn] if 0 <= mfn < len(m2p) else -1
        if pfn < 0:
            raise KeyError(f"mfn {mfn:#x} is not a frame of domain {self.domid}")
        return pfn

    def read_u64(self, maddr: int) -> int:
        """Read 8 bytes of this domain's memory by machine address (no trap)."""
        pfn = self.pfn_of(maddr >> PAGE_SHIFT)
        return int(self._words[(pfn << 9) | ((maddr & (PAGE_SIZE - 1)) >> 3)])

    def read_bytes(self, maddr: int, length: int) -> bytes:
        pfn = self.pfn_of(maddr >> PAGE_SHIFT)
        start = (pfn << PAGE_SHIFT) | (maddr & (PAGE_SIZE - 1))
        return bytes(self._memory[start : start + length])

    # --- hypercalls ---------------------------------------------------------------------

    async def call(self, call: wire.Call, *, vcpu: int = 0) -> wire.Result | wire.MulticallResult:
        """One hypercall, counted as the guest issued it: the typed path every
        method below and the pv-ops backends take."""
        channel = self._channels[vcpu]
        counters = self._counters[vcpu]
        counters.hypercalls[call.op] += 1
        counters.mmu_update_records += call.args.mmu_update_records
        counters.multicall_entries += call.args.multicall_entries
        request = wire.Hypercall.for_call(channel.next_id(), call)
        if self.timeline is None:
            reply = await channel.request(request)
        else:
            name = abi.HYPERCALL_NAMES.get(call.op, f"hypercall_{call.op}")
            reply = await self._recorded(channel, request, vcpu, name)
        assert isinstance(reply, wire.Result | wire.MulticallResult)
        return reply

    async def _recorded(
        self, channel: Channel, request: wire.Request, vcpu: int, name: str
    ) -> wire.Reply:
        """A request with its round trip, as the guest saw it, on the timeline
        (the hypervisor's span of the same trap nests inside it)."""
        assert self.timeline is not None
        start = now_ns()
        reply = await channel.request(request)
        args: dict[str, object] = {}
        if type(reply) is wire.UserResult:
            args = {"executed": reply.executed, "fault": reply.fault is not None}
        self.timeline.complete(name, GUEST, self.domid, vcpu, start, now_ns(), args)
        return reply

    async def _result(self, vcpu: int, op: int, *args: object) -> wire.Result:
        reply = await self.call(wire.make_call(op, *args), vcpu=vcpu)
        assert isinstance(reply, wire.Result)
        return reply

    async def mmu_update(
        self,
        reqs: Sequence[tuple[int, int]] | bytes,
        foreigndom: int = abi.DOMID_SELF,
        *,
        vcpu: int = 0,
    ) -> tuple[int, int]:
        """Xen's mmu_update: returns (rc, done).

        ``foreigndom`` is u32: FD in bits 0-15, the page-table owner plus one
        in bits 16-31 (0 = self), docs/sources.md §6.
        """
        reply = await self._result(vcpu, abi.HYPERVISOR_mmu_update, reqs, foreigndom)
        return reply.rc, reply.done

    async def mmu_update_olds(
        self,
        reqs: Sequence[tuple[int, int]] | bytes,
        foreigndom: int = abi.DOMID_SELF,
        *,
        vcpu: int = 0,
    ) -> tuple[int, int, list[int]]:
        """:meth:`mmu_update` with the reply's old entries: (rc, done, olds),
        ``olds`` one per applied ``MMU_PT_XCHG_PVEMU`` record, in order
        (pvemu's extension). The raw form: any commands, any records; the
        exchange records issued are counted (``mmu_xchg_records``)."""
        call = wire.make_call(abi.HYPERVISOR_mmu_update, reqs, foreigndom)
        assert isinstance(call.args, wire.MmuUpdateArgs)
        ptrs = call.args.records()[0::2]
        xchg = abi.MMU_PT_XCHG_PVEMU
        self._counters[vcpu].mmu_xchg_records += sum(p & 7 == xchg for p in ptrs)
        reply = await self.call(call, vcpu=vcpu)
        assert isinstance(reply, wire.Result)
        return reply.rc, reply.done, reply.old_values()

    def _need_xchg(self) -> None:
        if not self.has_feature(abi.XENFEAT_pvemu_mmu_pt_xchg):
            raise HypervisorError(
                "unsupported", "the hypervisor does not advertise XENFEAT_pvemu_mmu_pt_xchg"
            )

    def has_feature(self, flag: int) -> bool:
        """Whether the Welcome advertised feature ``flag`` (``abi.XENFEAT_*``)."""
        return flag in self.features

    async def mmu_xchg(
        self, records: Sequence[tuple[int, int]], *, vcpu: int = 0
    ) -> tuple[int, list[int]]:
        """Exchange L1 entries in one ``mmu_update`` (pvemu's
        ``MMU_PT_XCHG_PVEMU``; one trap however many records): each record
        is ``(pte machine address, new value)``, 0 to clear. Returns (rc,
        olds): ``olds`` are the replaced entries of the records applied, in
        order, with every A/D bit the hardware set up to the exchange; on
        an error (rc < 0) the batch stopped at record ``len(olds)``.

        Raises:
            HypervisorError: the Welcome did not advertise
                ``XENFEAT_pvemu_mmu_pt_xchg`` (code ``unsupported``), or the
                reply's olds do not match its done count (``malformed``).
            ValueError: a PTE address is not 8-byte aligned.
        """
        self._need_xchg()
        cmd = abi.MMU_PT_XCHG_PVEMU
        reqs: list[tuple[int, int]] = []
        for maddr, val in records:
            if maddr & abi.MMU_CMD_MASK:
                raise ValueError(f"PTE address {maddr:#x} is not 8-byte aligned")
            reqs.append((maddr | cmd, val))
        rc, done, olds = await self.mmu_update_olds(wire.pack_mmu_updates(reqs), vcpu=vcpu)
        if len(olds) != done:
            raise HypervisorError(
                "malformed", f"mmu_xchg: {len(olds)} old entries for {done} records done"
            )
        return rc, olds

    async def mmu_xchg_ptes(
        self, table: int, indexes: Indexes, values: Ptes | None = None, *, vcpu: int = 0
    ) -> tuple[int, Ptes]:
        """:meth:`mmu_xchg` of entries ``indexes`` (distinct) of the PTE page
        in frame ``table`` with ``values`` (None: clear them), as arrays:
        the records are built and the olds read back without a Python step
        per PTE. Returns (rc, the old entries of the records applied)."""
        self._need_xchg()
        if has_repeats(indexes):
            raise ValueError("mmu_xchg_ptes: an entry index appears twice")
        vals = np.zeros(len(indexes), dtype=np.uint64) if values is None else values
        records = mmu_update_records(table, indexes, abi.MMU_PT_XCHG_PVEMU, vals)
        blob = records.astype("<u8", copy=False).tobytes()
        self._counters[vcpu].mmu_xchg_records += len(indexes)
        reply = await self.call(wire.make_call(abi.HYPERVISOR_mmu_update, blob), vcpu=vcpu)
        assert isinstance(reply, wire.Result)
        if len(reply.olds) != 8 * reply.done:
            raise HypervisorError(
                "malformed", f"mmu_xchg_ptes: {len(reply.olds) // 8} olds for {reply.done} done"
            )
        olds: Ptes = np.frombuffer(reply.olds, dtype="<u8").astype(np.uint64)
        return reply.rc, olds

    async def mmuext_op(
        self,
        ops: Sequence[tuple[int, int, int]],
        foreigndom: int = abi.DOMID_SELF,
        *,
        vcpu: int = 0,
    ) -> tuple[int, int]:
        reply = await self._result(vcpu, abi.HYPERVISOR_mmuext_op, ops, foreigndom)
        return reply.rc, reply.done

    async def update_va_mapping(self, va: int, val: int, flags: int, *, vcpu: int = 0) -> int:
        reply = await self._result(vcpu, abi.HYPERVISOR_update_va_mapping, va, val, flags)
        return reply.rc

    async def update_va_mapping_otherdomain(
        self, va: int, val: int, flags: int, domid: int, *, vcpu: int = 0
    ) -> int:
        """update_va_mapping with ``domid`` owning the mapped frame: a domU may
        only name DOMID_SELF (-ESRCH for an unknown domain, -EPERM for another)."""
        op = abi.HYPERVISOR_update_va_mapping_otherdomain
        reply = await self._result(vcpu, op, va, val, flags, domid)
        return reply.rc

    async def vm_assist(self, cmd: int, assist: int, *, vcpu: int = 0) -> int:
        reply = await self._result(vcpu, abi.HYPERVISOR_vm_assist, cmd, assist)
        return reply.rc

    async def multicall(self, calls: Sequence[Sequence[Any]], *, vcpu: int = 0) -> list[int]:
        """One trap, many calls: returns one result per call."""
        reply = await self.call(wire.make_call(abi.HYPERVISOR_multicall, calls), vcpu=vcpu)
        assert isinstance(reply, wire.MulticallResult)
        return list(reply.results)

    async def raw_hypercall(self, op: int, *args: object, vcpu: int = 0) -> int:
        """Any hypercall number (unknown ones answer -ENOSYS)."""
        reply = await self.call(wire.make_call(op, *args), vcpu=vcpu)
        return reply.rc

    async def ptwr_write(
        self, maddr: int, val: int, *, exchange: bool = False, vcpu: int = 0
    ) -> int:
        """A trapped direct 8-byte write into a page table (emulated)."""
        rc, _old = await self.ptwr_exchange(maddr, val, exchange=exchange, vcpu=vcpu)
        return rc

    async def ptwr_exchange(
        self, maddr: int, val: int, *, exchange: bool = True, vcpu: int = 0
    ) -> tuple[int, int]:
        """A trapped xchg: returns (rc, previous value)."""
        channel = self._channels[vcpu]
        return await self._ptwr(wire.Ptwr(channel.next_id(), maddr, val, exchange), vcpu)

    async def ptwr_clear_bits(self, maddr: int, bits: int, *, vcpu: int = 0) -> tuple[int, int]:
        """A trapped atomic clear of ``bits`` in a page-table entry (x86 ``lock
        btr``, Linux's ``ptep_set_wrprotect`` on a pinned L1): one ptwr trap.
        The hypervisor stores ``old & ~bits`` when it applies it, so A/D bits
        the hardware set meanwhile stay. Returns (rc, previous value).

        ``bits`` must not be 0: that request would be a plain store of 0.
        """
        if not bits:
            raise ValueError("ptwr_clear_bits needs at least one bit to clear")
        channel = self._channels[vcpu]
        return await self._ptwr(wire.Ptwr(channel.next_id(), maddr, 0, clear_bits=bits), vcpu)

    async def _ptwr(self, request: wire.Ptwr, vcpu: int) -> tuple[int, int]:
        """Send a trapped page-table write, counted as one ptwr trap."""
        channel = self._channels[vcpu]
        self._counters[vcpu].ptwr += 1
        if self.timeline is None:
            reply = await channel.request(request)
        else:
            reply = await self._recorded(channel, request, vcpu, "ptwr")
        assert isinstance(reply, wire.PtwrResult)
        return reply.rc, reply.old

    async def kernel_write(self, maddr: int, data: bytes, *, vcpu: int = 0) -> int:
        """A plain store of the kernel through its linear map (not a trap):
        0, or -EFAULT when the frame's linear mapping is read-only, it is a
        page table in use, or not this domain's (nothing is written).

        ``data`` is 1..4096 bytes within the frame of ``maddr`` (ValueError
        otherwise, as on every machine; nothing is sent).
        """
        check_kernel_write(maddr, data)
        channel = self._channels[vcpu]
        request = wire.KernelWrite(channel.next_id(), maddr, data)
        if self.timeline is None:
            reply = await channel.request(request)
        else:
            reply = await self._recorded(channel, request, vcpu, "kernel_write")
        assert isinstance(reply, wire.KernelWriteResult)
        return reply.rc

    async def run_user(
        self, vcpu: int, accesses: Sequence[tuple[int, str, bytes | int]], *, resume: bool = False
    ) -> dict[str, Any]:
        """User accesses on ``vcpu``; stops at the first page fault.

        ``resume``: return to user mode through ``HYPERVISOR_iret`` after the
        kernel handled the fault that ended this vCPU's previous run (64-bit
        PV). It is a hypercall, counted here once the hypervisor has taken it
        (a refusal, ``out_of_range`` when no fault is pending, counts nothing
        on either side).
        """
        channel = self._channels[vcpu]
        named = tuple(wire.Access(*a) for a in accesses)
        request = wire.RunUser(channel.next_id(), named, resume)
        if self.timeline is None:
            reply = await channel.request(request)
        else:
            reply = await self._recorded(channel, request, vcpu, "run_user")
        assert isinstance(reply, wire.UserResult)
        if resume:
            self._counters[vcpu].hypercalls[abi.HYPERVISOR_iret] += 1
        fault = None
        if reply.fault is not None:
            self._counters[vcpu].page_faults += 1
            fault = {"va": reply.fault[0], "error_code": reply.fault[1]}
        return {"executed": reply.executed, "reads": list(reply.reads), "fault": fault}

    async def stats(self) -> dict[str, Any]:
        """Both sides' counters: ``guest`` (issued) and ``hypervisor`` (handled)."""
        channel = self._channels[0]
        reply = await channel.request(wire.Stats(channel.next_id()))
        assert isinstance(reply, wire.StatsResult)
        return {
            "guest": {
                "total": self.counters.as_dict(),
                "vcpus": [c.as_dict() for c in self._counters],
            },
            "hypervisor": reply.stats,
        }

    async def audit(self) -> list[str]:
        channel = self._channels[0]
        reply = await channel.request(wire.Audit(channel.next_id()))
        assert isinstance(reply, wire.AuditResult)
        return list(reply.violations)

    async def close(self) -> None:
        for channel in self._channels:
            try:
                with trio.move_on_after(5):
                    await channel.request(wire.Bye(channel.next_id()))
            except (HypervisorError, OSError, trio.BrokenResourceError):
                pass
            channel.close()
        self._words.release()
        self._memory.close()
        self._close_fd()


async def _handshake(channel: Channel, message: wire.Hello | wire.Join) -> wire.Welcome:
    reply = await channel.request(message)
    assert isinstance(reply, wire.Welcome)
    return reply


async def attach(
    transport: Transport, *, memory_mib: int = 64, vcpus: int = 1, name: str = "guest"
) -> Domain:
    """Create a domain and attach ``vcpus`` channels to it (not booted).

    The memory fd that comes with the Welcome goes to the :class:`Domain`.
    """
    first = await transport.open_channel()
    channels = [first]
    memory_fd = -1
    try:
        hello = wire.Hello(first.next_id(), wire.PROTOCOL_VERSION, memory_mib, vcpus, name)
        welcome = await _handshake(first, hello)
        memory_fd, *extra = first.take_fds() or [-1]
        for fd in extra:
            os.close(fd)
        if memory_fd < 0:
            raise HypervisorError("malformed", "welcome arrived without the memory fd")
        for vcpu in range(1, vcpus):
            channel = await transport.open_channel()
            channels.append(channel)
            join = wire.Join(
                channel.next_id(), wire.PROTOCOL_VERSION, welcome.domid, welcome.secret, vcpu
            )
            await _handshake(channel, join)
            for fd in channel.take_fds():
                os.close(fd)
        return Domain(welcome, memory_fd, channels)
    except BaseException:
        for channel in channels:
            channel.close()
        if memory_fd >= 0:
            os.close(memory_fd)
        raise


@asynccontextmanager
async def open_domain(
    transport: Transport,
    *,
    memory_mib: int = 64,
    vcpus: int = 1,
    name: str = "guest",
    boot: bool = True,
) -> AsyncIterator[Domain]:
    """Create a domain over ``transport``, attach ``vcpus`` channels and boot
    it. Leaving the context closes every channel; the hypervisor then
    destroys the domain and returns its frames to the pool."""
    from .boot import boot_domain

    domain = await attach(transport, memory_mib=memory_mib, vcpus=vcpus, name=name)
    try:
        if boot:
            await boot_domain(domain)
        yield domain
    finally:
        with trio.CancelScope(shield=True):
            await domain.close()


def connect(
    socket_path: str,
    *,
    memory_mib: int = 64,
    vcpus: int = 1,
    name: str = "guest",
    boot: bool = True,
) -> contextlib.AbstractAsyncContextManager[Domain]:
    """A booted domain served by the hypervisor listening on ``socket_path``
    (docs/sources.md §4)."""
    return open_domain(
        SocketTransport(socket_path), memory_mib=memory_mib, vcpus=vcpus, name=name, boot=boot
    )
