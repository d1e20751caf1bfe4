"""Resource abuse against a real hypervisor process (issue 7, section 1).

Every bound of ``pvemu hypervisor`` holds with a typed error, the server's
memory stays bounded, and a bystander domain keeps being served throughout.
"""

from __future__ import annotations

import array
import itertools
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import msgpack
import pytest
import trio

from pvemu.guest.client import Domain, HypervisorError, connect
from pvemu.shared import abi, wire
from pvemu.shared.x86 import _PAGE_RW, maddr_of_entry, make_pte
from tests.hvproc import HypervisorProcess, hypervisor_process
from tests.test_integration import USER_RO, USER_RW, first_l1

MAX_CONNECTIONS = 200
MAX_BATCH = 4096
SEND_TIMEOUT = 2.0
HANDSHAKE_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def hvp() -> Iterator[HypervisorProcess]:
    limits = (
        ("--max-batch", str(MAX_BATCH)),
        ("--send-timeout", str(SEND_TIMEOUT)),
        ("--handshake-timeout", str(HANDSHAKE_TIMEOUT)),
    )
    args = [item for pair in limits for item in pair]
    with hypervisor_process(*args, memory_mib=256, tag="abuse") as process:
        yield process


def rss_kib(pid: int) -> int:
    """Resident memory of a process, from /proc (KiB)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS line")


class RawGuest:
    """A blocking socket speaking the wire protocol without the client's
    manners: it may pipeline, never read, or send garbage."""

    def __init__(self, socket_path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(socket_path)
        self.conn = wire.Connection("client")
        self.next_id = 1

    def send(self, message: wire.Request) -> None:
        self.sock.sendall(self.conn.send(message))

    def receive(self) -> wire.Message | wire.Sentinel:
        """The next reply, or CONNECTION_CLOSED; fds that arrive are closed."""
        while True:
            event = self.conn.next_event()
            if event is not wire.NEED_DATA:
                return event
            data, ancdata, _flags, _addr = self.sock.recvmsg(1 << 16, socket.CMSG_SPACE(16))
            for _level, _kind, payload in ancdata:
                for fd in array.array("i", payload[: len(payload) - len(payload) % 4]):
                    os.close(fd)
            self.conn.receive_data(data)

    def hello(self, memory_mib: int = 1) -> wire.Welcome:
        self.send(wire.Hello(self.take_id(), wire.PROTOCOL_VERSION, memory_mib, 1, "raw"))
        welcome = self.receive()
        assert isinstance(welcome, wire.Welcome)
        return welcome

    def take_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def close(self) -> None:
        self.sock.close()


def closed_by_server(sock: socket.socket) -> bool:
    """Read until EOF (True) or timeout (False), ignoring what arrives. A
    server that closes with our requests unread resets the stream: closed too."""
    sock.settimeout(10)
    try:
        while sock.recv(1 << 16):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


@asynccontextmanager
async def bystander(hvp: HypervisorProcess) -> AsyncIterator[Domain]:
    """A well-behaved domain that must never notice the abuse."""
    async with connect(hvp.socket_path, memory_mib=4) as dom:
        await still_served(dom)
        yield dom
        await still_served(dom)


async def still_served(dom: Domain) -> None:
    """A real page-table update succeeds promptly and the machine audits clean."""
    l1 = first_l1(dom)
    data = dom.alloc_frame()
    with trio.fail_after(5):
        assert await dom.mmu_update([(maddr_of_entry(l1, 7), make_pte(data, USER_RW))]) == (0, 1)
        assert await dom.mmu_update([(maddr_of_entry(l1, 7), make_pte(data, USER_RO))]) == (0, 1)
        assert await dom.audit() == []
    assert not dom.read_u64(maddr_of_entry(l1, 7)) & _PAGE_RW


async def free_frames(hvp: HypervisorProcess) -> int:
    async with connect(hvp.socket_path, memory_mib=1, boot=False) as probe:
        stats = await probe.stats()
        free: int = stats["hypervisor"]["free_frames"]
        return free


async def settle_free_frames(hvp: HypervisorProcess, expected: int) -> None:
    with trio.fail_after(20):
        while True:
            if await free_frames(hvp) == expected:
                return
            await trio.sleep(0.05)


# --- enormous counts -------------------------------------------------------------------


async def test_batch_over_the_limit_is_too_large_and_changes_nothing(
    hvp: HypervisorProcess,
) -> None:
    async with bystander(hvp), connect(hvp.socket_path, memory_mib=4) as dom:
        l1 = first_l1(dom)
        data = dom.alloc_frame()
        entry = maddr_of_entry(l1, 3)
        before = await dom.stats()
        records = [(entry, make_pte(data, USER_RW))] * (MAX_BATCH + 1)
        with pytest.raises(HypervisorError) as info:
            await dom.mmu_update(records)
        assert info.value.code == "too_large"
        assert str(MAX_BATCH) in info.value.message
        with pytest.raises(HypervisorError) as info:  # hidden inside a multicall
            await dom.multicall([(abi.HYPERVISOR_mmu_update, records)])
        assert info.value.code == "too_large"
        assert dom.read_u64(entry) == 0
        after = await dom.stats()
        assert after["hypervisor"]["free_frames"] == before["hypervisor"]["free_frames"]
        # exactly at the limit is served
        assert await dom.mmu_update(records[:MAX_BATCH]) == (0, MAX_BATCH)
        assert await dom.audit() == []


async def test_welcome_announces_the_limits(hvp: HypervisorProcess) -> None:
    raw = RawGuest(hvp.socket_path)
    try:
        welcome = raw.hello()
        assert welcome.limits["max_mmu_updates"] == MAX_BATCH
        assert welcome.limits["max_message_size"] == wire.DEFAULT_MESSAGE_SIZE
    finally:
        raw.close()


# --- huge and nested messages --------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        pytest.param(
            msgpack.packb({"t": "stats", "id": 1, "x": b"x" * (wire.DEFAULT_MESSAGE_SIZE + 1)}),
            "too_large",
            id="over-message-size",
        ),
        pytest.param(
            b"\xdb\xff\xff\xff\xff" + b"s" * wire.DEFAULT_MESSAGE_SIZE,
            "too_large",
            id="4GiB-str-header",
        ),
        pytest.param(b"\x91" * 200_000 + b"\xc0", "malformed", id="nested-200000-deep"),
        pytest.param(b"\xdd\xff\xff\xff\xff", "too_large", id="4G-element-array"),
    ],
)
async def test_huge_or_nested_message_is_fatal_for_its_connection_only(
    hvp: HypervisorProcess, payload: bytes, code: str
) -> None:
    async with bystander(hvp):
        raw = RawGuest(hvp.socket_path)
        try:
            raw.hello()
            raw.sock.sendall(payload)
            error = raw.receive()
            assert isinstance(error, wire.ErrorReply)
            assert error.code == code
            assert closed_by_server(raw.sock)
        finally:
            raw.close()


# --- thousands of connections ------------------------------------------------------------


async def test_connections_beyond_the_limit_are_refused_and_memory_stays_bounded() -> None:
    limits = ("--max-connections", str(MAX_CONNECTIONS), "--handshake-timeout", "60")
    with hypervisor_process(*limits, memory_mib=16, tag="conns") as hvp:
        async with bystander(hvp) as dom:
            baseline_rss = rss_kib(hvp.proc.pid)
            socks: list[socket.socket] = []
            try:
                for _ in range(MAX_CONNECTIONS * 10):  # 2000 connection attempts
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    sock.connect(hvp.socket_path)
                    socks.append(sock)
                # The bystander holds one slot, the first 199 here the others.
                admitted, refused = socks[: MAX_CONNECTIONS - 1], socks[MAX_CONNECTIONS - 1 :]
                for sock in refused:
                    conn = wire.Connection("client")
                    sock.settimeout(10)
                    conn.receive_data(sock.recv(4096))
                    error = conn.next_event()
                    assert isinstance(error, wire.ErrorReply)
                    assert error.code == "not_supported"
                    assert "too many connections" in error.message
                    assert closed_by_server(sock)
                for sock in admitted:  # still open, still waiting for a hello
                    sock.setblocking(False)
                    with pytest.raises(BlockingIOError):
                        sock.recv(1)
                await still_served(dom)
                grown = rss_kib(hvp.proc.pid) - baseline_rss
                assert grown < 64 * 1024, f"the hypervisor grew by {grown} KiB"
            finally:
                for sock in socks:
                    sock.close()
            # Once they are gone, new connections are admitted again.
            with trio.fail_after(10):
                for _attempt in itertools.count():
                    if await admitted_now(hvp):
                        break
                    await trio.sleep(0.05)
            await still_served(dom)


async def admitted_now(hvp: HypervisorProcess) -> bool:
    """Whether a new domain can be created; refusals must be the limit's."""
    try:
        async with connect(hvp.socket_path, memory_mib=1, boot=False):
            return True
    except HypervisorError as exc:
        if exc.code != "not_supported":
            raise
        return False


async def test_silent_connection_is_closed_after_the_handshake_timeout(
    hvp: HypervisorProcess,
) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(hvp.socket_path)
        started = time.monotonic()
        conn = wire.Connection("client")
        sock.settimeout(10)
        conn.receive_data(sock.recv(4096))
        error = conn.next_event()
        assert isinstance(error, wire.ErrorReply)
        assert error.code == "bad_state"
        assert "no hello" in error.message
        assert closed_by_server(sock)
        assert time.monotonic() - started >= HANDSHAKE_TIMEOUT * 0.9
    finally:
        sock.close()


# --- a guest that never reads ---------------------------------------------------------------


async def test_guest_that_never_reads_is_bounded_then_dropped(hvp: HypervisorProcess) -> None:
    async with bystander(hvp) as dom:
        baseline = await free_frames(hvp)
        baseline_rss = rss_kib(hvp.proc.pid)
        raw = RawGuest(hvp.socket_path)
        try:
            raw.hello(memory_mib=2)
            # Pipeline 100,000 stats requests and never read a reply: the server
            # must stop reading once its replies back up, not buffer them all.
            payload = b"".join(raw.conn.send(wire.Stats(raw.take_id())) for _ in range(100_000))
            raw.sock.setblocking(False)
            offset, stalled_since = 0, time.monotonic()
            while offset < len(payload) and time.monotonic() - stalled_since < 0.5:
                try:
                    offset += raw.sock.send(payload[offset : offset + 65536])
                    stalled_since = time.monotonic()
                except BlockingIOError:
                    await trio.sleep(0.01)
            assert 0 < offset < len(payload), "back-pressure should stop the hog"
            await still_served(dom)  # served while the hog is stuck
            grown = rss_kib(hvp.proc.pid) - baseline_rss
            assert grown < 32 * 1024, f"the hypervisor grew by {grown} KiB"
            # After the send timeout the hog's connection and domain are gone.
            await settle_free_frames(hvp, baseline)
            raw.sock.setblocking(True)
            assert closed_by_server(raw.sock)
        finally:
            raw.close()
        await still_served(dom)
