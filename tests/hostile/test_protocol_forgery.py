"""Hostile guests: the protocol spoken by hand, over a raw socket.

Joins with wrong secrets, requests before hello, a second hello or join, reply
messages sent to the server, reused request ids, a forged page-table owner and
a forged iret (``run_user`` resuming with no fault pending): each gets its
typed error or Xen's refusal, and nothing of the attacker or the victim moved.
"""

from __future__ import annotations

import array
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import trio

from pvemu.shared import abi, wire
from tests.hostile.scene import (
    COUNTERS,
    DOMAIN_FRAMES,
    UNKNOWN_DOMID,
    assert_unchanged,
    probe,
    scene,
    snapshot,
)
from tests.hvproc import HypervisorProcess


class Raw:
    """A guest that speaks msgpack by hand and may send anything."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.unpacker = msgpack.Unpacker(raw=False)
        self.fds: list[int] = []

    @classmethod
    async def open(cls, path: str) -> Raw:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.connect(path)
        return cls(sock)

    async def send(self, *messages: dict[str, Any]) -> None:
        data = b"".join(msgpack.packb(m) for m in messages)
        while data:
            data = data[await self.sock.send(data) :]

    async def recv(self) -> dict[str, Any]:
        while True:
            message = next(self.unpacker, None)
            if message is not None:
                assert isinstance(message, dict)
                return message
            data, ancdata, _flags, _addr = await self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(16))
            for _level, _kind, payload in ancdata:
                self.fds.extend(array.array("i", payload[: len(payload) // 4 * 4]))
            assert data, "the server closed the connection"
            self.unpacker.feed(data)

    async def ask(self, message: dict[str, Any]) -> dict[str, Any]:
        await self.send(message)
        return await self.recv()

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.sock.close()


@asynccontextmanager
async def raw(path: str) -> AsyncIterator[Raw]:
    conn = await Raw.open(path)
    try:
        yield conn
    finally:
        conn.close()


def hello(rid: int, vcpus: int = 1) -> dict[str, Any]:
    return {
        "t": "hello",
        "id": rid,
        "version": wire.PROTOCOL_VERSION,
        "memory_mib": 1,
        "vcpus": vcpus,
        "name": "raw",
    }


def join(rid: int, domid: int, secret: bytes, vcpu: int) -> dict[str, Any]:
    return {
        "t": "join",
        "id": rid,
        "version": wire.PROTOCOL_VERSION,
        "domid": domid,
        "secret": secret,
        "vcpu": vcpu,
    }


def error(reply: dict[str, Any]) -> tuple[str, Any, str]:
    return reply["t"], reply["id"], reply.get("code", "")


async def test_joins_with_wrong_secrets_attach_nothing(hvp: HypervisorProcess) -> None:
    """Join with a wrong, another domain's, short, empty or long secret, or to
    a domain that does not exist: a typed error, the connection stays
    unattached, the vCPU slot stays free and the victims never notice."""
    async with scene(hvp) as s, raw(hvp.socket_path) as owner, raw(hvp.socket_path) as attacker:
        welcome = await owner.ask(hello(1, vcpus=2))  # a domain with a free vCPU slot
        assert welcome["t"] == "welcome"
        domid, secret = welcome["domid"], welcome["secret"]
        before = await snapshot(s)
        owner_before = await owner.ask({"t": "stats", "id": 2})
        flipped = bytes([secret[0] ^ 1]) + secret[1:]
        attempts = [
            (join(0, domid, bytes(16), 1), "bad_secret"),
            (join(0, domid, flipped, 1), "bad_secret"),
            (join(0, domid, s.v.dom.secret, 1), "bad_secret"),  # a real secret, wrong domain
            (join(0, domid, flipped, 0), "bad_secret"),  # a taken slot: the secret comes first
            (join(0, s.v.dom.domid, secret, 0), "bad_secret"),  # forged: the victim's domid
            (join(0, s.v.dom.domid, bytes(16), 1), "bad_secret"),
            (join(0, UNKNOWN_DOMID, secret, 1), "no_such_domain"),
            # A secret must be exactly 16 bytes: the decoder refuses others
            # (docs/protocol.md §6: short is bad_type, over the field's limit
            # too_large) before any domain is looked at.
            (join(0, domid, secret[:15], 1), "bad_type"),
            (join(0, domid, b"", 1), "bad_type"),
            (join(0, domid, secret + b"\0", 1), "too_large"),
        ]
        for rid, (message, code) in enumerate(attempts, start=10):
            assert error(await attacker.ask({**message, "id": rid})) == ("error", rid, code)
            # Still not attached to anything: requests are out of state.
            reply = await attacker.ask({"t": "stats", "id": rid + 100})
            assert error(reply) == ("error", rid + 100, "bad_state")
        # The slot was never taken: the right secret gets it, exactly once.
        welcome = await attacker.ask(join(500, domid, secret, 1))
        assert (welcome["t"], welcome["vcpu"]) == ("welcome", 1)
        async with raw(hvp.socket_path) as late:
            assert error(await late.ask(join(1, domid, secret, 1))) == ("error", 1, "out_of_range")
        owner_after = await owner.ask({"t": "stats", "id": 3})
        for name in COUNTERS:
            assert owner_after["stats"]["total"][name] == owner_before["stats"]["total"][name]
        assert_unchanged(s, before, await snapshot(s))
        await probe(s)


async def test_requests_before_hello_do_nothing(hvp: HypervisorProcess) -> None:
    """Every request before hello/join is bad_state (id echoed) and the
    connection lives on; none of them touched anything."""
    async with scene(hvp) as s, raw(hvp.socket_path) as conn:
        before = await snapshot(s)
        early: list[dict[str, Any]] = [
            {"t": "stats"},
            {"t": "audit"},
            {"t": "hypercall", "op": 1, "args": [pack_record(s.v.l1e(0), 0), abi.DOMID_SELF]},
            {
                "t": "hypercall",
                "op": 26,
                "args": [[[abi.MMUEXT_UNPIN_TABLE, s.v.l4, 0]], abi.DOMID_SELF],
            },
            {"t": "ptwr", "maddr": s.v.l1e(0), "val": 0, "exchange": False},
            {"t": "run_user", "accesses": [[0, "r", 8]]},
        ]
        for rid, message in enumerate(early, start=1):
            assert error(await conn.ask({**message, "id": rid})) == ("error", rid, "bad_state")
        assert_unchanged(s, before, await snapshot(s))
        welcome = await conn.ask(hello(50))
        assert welcome["t"] == "welcome"
        reply = await conn.ask({"t": "stats", "id": 51})
        assert reply["stats"]["total"]["traps"] == 0  # nothing from before was counted
        await probe(s)


def pack_record(ptr: int, val: int) -> bytes:
    return array.array("Q", [ptr, val]).tobytes()


async def test_second_hello_or_join_on_a_ready_connection(hvp: HypervisorProcess) -> None:
    """A ready connection cannot become another domain or vCPU: a second
    hello or join is bad_state, no memory is allocated, no slot is taken."""
    async with scene(hvp) as s, raw(hvp.socket_path) as conn:
        welcome = await conn.ask(hello(1, vcpus=2))
        domid, secret = welcome["domid"], welcome["secret"]
        free = (await conn.ask({"t": "stats", "id": 2}))["stats"]["free_frames"]
        before = await snapshot(s)
        again = [
            hello(3),
            join(4, domid, secret, 1),
            join(5, s.v.dom.domid, s.v.dom.secret, 0),  # even with the victim's real secret
        ]
        for message in again:
            assert error(await conn.ask(message)) == ("error", message["id"], "bad_state")
        reply = await conn.ask({"t": "stats", "id": 6})
        assert (reply["stats"]["domid"], reply["stats"]["free_frames"]) == (domid, free)
        async with raw(hvp.socket_path) as other:
            assert (await other.ask(join(1, domid, secret, 1)))["t"] == "welcome"
        assert_unchanged(s, before, await snapshot(s))
        await probe(s)


async def test_replies_sent_to_the_server_are_unknown_messages(hvp: HypervisorProcess) -> None:
    """Replies to nobody: a guest sending reply types (even a welcome naming the
    victim with its real secret) gets unknown_message with its id echoed, and
    the connection carries on in the state it was in."""
    async with scene(hvp) as s, raw(hvp.socket_path) as conn:
        v = s.v.dom
        replies: list[dict[str, Any]] = [
            {"t": "result", "rc": 0, "done": 0},
            {"t": "multicall_result", "rc": 0, "results": [0]},
            {"t": "ptwr_result", "rc": 0, "old": 0},
            {"t": "user_result", "executed": 0, "reads": [], "fault": None},
            {"t": "stats_result", "stats": {"domid": v.domid}},
            {"t": "audit_result", "violations": []},
            {"t": "goodbye"},
            {
                "t": "welcome",
                "domid": v.domid,
                "vcpu": 0,
                "nr_frames": 1,
                "secret": v.secret,
                "limits": {},
                "features": [],
            },
        ]
        before = await snapshot(s)
        for phase, base in (("idle", 10), ("ready", 30)):
            for rid, reply in enumerate(replies, start=base):
                answer = await conn.ask({**reply, "id": rid})
                assert error(answer) == ("error", rid, "unknown_message"), phase
            answer = await conn.ask({"t": "error", "id": None, "code": "internal", "message": "x"})
            assert error(answer) == ("error", None, "unknown_message")
            if phase == "idle":  # still idle: the forged welcome attached nothing
                assert error(await conn.ask({"t": "stats", "id": 20})) == ("error", 20, "bad_state")
                assert (await conn.ask(hello(21)))["t"] == "welcome"
        reply = await conn.ask({"t": "stats", "id": 50})
        assert reply["t"] == "stats_result"
        assert reply["stats"]["domid"] not in (v.domid, s.a.dom.domid)
        assert_unchanged(s, before, await snapshot(s), frames_taken=DOMAIN_FRAMES)
        await probe(s)


async def test_reused_request_ids_are_each_answered(hvp: HypervisorProcess) -> None:
    """Three pipelined requests with the same id, the first a sliced 3000-record
    batch: the server reads a request only after answering the one before, so
    the id is never pending twice and each request gets its own answer, in order."""
    async with scene(hvp) as s, raw(hvp.socket_path) as conn:
        welcome = await conn.ask(hello(1))
        frames = welcome["nr_frames"]  # the p2m is the tail of the memfd
        mfns = array.array("Q", os.pread(conn.fds[-1], frames * 8, wire.p2m_offset(frames)))
        words = array.array("Q")
        for i in range(3000):  # plain data into the new domain's own untyped frames
            words.extend([(mfns[i % 200] << 12) + 8 * (i // 200), i])
        before = await snapshot(s)
        batch = {"t": "hypercall", "id": 7, "op": 1, "args": [words.tobytes(), abi.DOMID_SELF]}
        await conn.send(batch, {"t": "stats", "id": 7}, {"t": "audit", "id": 7})
        answers = [await conn.recv() for _ in range(3)]
        assert [(a["t"], a["id"]) for a in answers] == [
            ("result", 7),
            ("stats_result", 7),
            ("audit_result", 7),
        ]
        assert (answers[0]["rc"], answers[0]["done"]) == (0, 3000)
        assert answers[1]["stats"]["total"]["mmu_update_records"] == 3000
        assert answers[2]["violations"] == []
        assert_unchanged(s, before, await snapshot(s))
        await probe(s)


async def test_forged_pt_owner_field_changes_nothing(hvp: HypervisorProcess) -> None:
    """An mmu_update whose foreigndom names the victim as page-table owner
    (PFD, docs/sources.md §6), or as data-frame owner, travels over the raw wire
    as the u32 it is and is refused by XSM (-EPERM, nothing done); the
    victim's entry stays."""
    async with scene(hvp) as s, raw(hvp.socket_path) as conn:
        assert (await conn.ask(hello(1)))["t"] == "welcome"
        before = await snapshot(s)
        forged = (s.v.dom.domid + 1) << 16 | abi.DOMID_SELF
        for rid, fd in enumerate((forged, s.v.dom.domid), start=2):
            args = [pack_record(s.v.l1e(0), 0), fd]
            answer = await conn.ask({"t": "hypercall", "id": rid, "op": 1, "args": args})
            assert (answer["t"], answer["id"], answer["rc"], answer["done"]) == (
                "result",
                rid,
                -abi.EPERM,
                0,
            )
        assert_unchanged(s, before, await snapshot(s))
        await probe(s)


async def test_a_forged_iret_is_refused_and_counted_nowhere(hvp: HypervisorProcess) -> None:
    """``run_user`` with ``resume`` claims a return to user space after a
    page fault (HYPERVISOR_iret, docs/protocol.md §3). Without a fault
    pending it is out_of_range each time, runs nothing and counts nothing;
    after a real fault it is taken exactly once; a non-bool is bad_type."""
    async with scene(hvp) as s, raw(hvp.socket_path) as conn:
        assert (await conn.ask(hello(1)))["t"] == "welcome"
        before = await snapshot(s)
        touch = [[0, "r", 8]]
        for rid in (2, 3):
            forged = {"t": "run_user", "id": rid, "accesses": touch, "resume": True}
            assert error(await conn.ask(forged)) == ("error", rid, "out_of_range")
        mistyped = {"t": "run_user", "id": 4, "accesses": touch, "resume": 1}
        assert error(await conn.ask(mistyped)) == ("error", 4, "bad_type")
        counted = (await conn.ask({"t": "stats", "id": 5}))["stats"]["total"]
        assert (counted["traps"], counted["user_runs"]) == (0, 0)
        # no page tables loaded: the access faults, and one resume is owed
        faulted = await conn.ask({"t": "run_user", "id": 6, "accesses": touch})
        assert faulted["fault"] is not None
        resumed = {"t": "run_user", "id": 7, "accesses": [], "resume": True}
        assert (await conn.ask(resumed))["t"] == "user_result"
        assert error(await conn.ask({**resumed, "id": 8})) == ("error", 8, "out_of_range")
        counted = (await conn.ask({"t": "stats", "id": 9}))["stats"]["total"]
        assert counted["hypercalls_by_op"] == {str(abi.HYPERVISOR_iret): 1}
        assert (counted["traps"], counted["page_faults"]) == (2, 1)
        assert_unchanged(s, before, await snapshot(s))
        await probe(s)
