"""The wire-decoder fuzzer: :class:`WireSession` feeds one
``shared.wire.Connection`` (server or client role) streams of valid messages
and mutations of them in random chunks, checking every event, error and
reply; :func:`wire_fuzzer` wraps :func:`run_wire` as a hypothesis test."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Final

from hypothesis import given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from pvemu.shared import wire
from pvemu.shared.errors import LocalProtocolError, RemoteProtocolError, WireErrorCode
from pvemu.shared.wire import (
    CONNECTION_CLOSED,
    NEED_DATA,
    Connection,
    ErrorReply,
    Goodbye,
    Hello,
    Join,
    Message,
    Reply,
    Request,
    Result,
    State,
    StatsResult,
)
from tests import test_wire
from tests.fuzz.bookkeeping import (
    STATS,
    SUITE_PROFILE,
    WIRE,
    count_example,
    count_input,
    counted_run,
)

# The hypothesis test below keeps its original spelling (``_profile``,
# ``_example``): a derandomized run seeds itself from the test's source text,
# so renaming them would change what the suite generates.
from tests.fuzz.bookkeeping import example_scope as _example
from tests.fuzz.bookkeeping import profile_settings as _profile
from tests.fuzz.entropy import U32, Entropy, FuzzFailure, escaped
from tests.fuzz.messages import (
    HUGE_HEADERS,
    build_reply,
    build_request,
    expected_replies,
    may_send,
    packb,
    random_object,
    request_id,
    with_id,
)
from tests.fuzz.wire_oracle import DESYNC, ERROR_ONLY, Expect, ReplyChecker, error_fits


class WireSession:
    """One Connection fed items until it dies, EOF or the session ends."""

    def __init__(
        self,
        e: Entropy,
        role: wire.Role,
        max_size: int,
        requests: Sequence[Request],
        replies: Sequence[Reply],
        checker: ReplyChecker,
    ) -> None:
        self.e = e
        self.role = role
        self.server = role == "server"
        self.max = max_size
        self.conn = Connection(role, max_message_size=max_size)
        self.requests = requests
        self.replies = replies
        self.checker = checker
        self.stats = STATS[WIRE]
        self.expect: deque[Expect] = deque()
        self.synced = True
        self.buffer = bytearray()
        self.eof = False
        self.dead = False
        #: Mirror of conn.pending_ids: id -> reply types it may get.
        self.pending: dict[int, tuple[type[Reply], ...]] = {}
        #: Server: accepted requests not answered yet, oldest first.
        self.unanswered: deque[Request] = deque()
        self.last: tuple[bytes, Expect] = (b"", DESYNC)
        self.items = 0
        self.trace: deque[str] = deque(maxlen=8)

    def context(self) -> str:
        items = "\n  ".join(self.trace)
        return (
            f"{self.role} (max {self.max}) state={self.conn.state.value} "
            f"synced={self.synced}; last items:\n  {items}"
        )

    def fail(self, message: str, signature: str) -> FuzzFailure:
        return FuzzFailure(f"{message}\n{self.context()}", signature)

    # -- items --

    def emit(self, data: bytes, expect: Expect, label: str) -> None:
        """Queue one item's bytes, then feed some or all of the backlog."""
        count_input(WIRE)
        self.items += 1
        self.trace.append(f"{label}: {data[:48].hex()}{'...' if len(data) > 48 else ''}")
        self.buffer += data
        if self.synced and not (expect is DESYNC and self.expect and self.expect[-1] is DESYNC):
            self.expect.append(expect)
        self.last = (data, expect)
        piece = self.e.pick((0, 1, 2, 3, 7, 64, 1000))
        if piece and self.e.flag():
            self.feed(piece, piece)  # part of it now, the rest with later items
        else:
            self.feed(piece or len(self.buffer), len(self.buffer))

    def feed(self, piece: int, limit: int) -> None:
        limit = min(limit, len(self.buffer))
        while limit > 0 and not self.dead:
            chunk = bytes(self.buffer[: min(piece, limit)])
            del self.buffer[: len(chunk)]
            limit -= len(chunk)
            try:
                self.conn.receive_data(chunk)
            except Exception as exc:
                raise escaped("receive_data", exc, self.context()) from exc
            self.drain()

    def native(self, rid: int | None = None) -> Message:
        """A valid message of this session's direction."""
        e = self.e
        if self.server:
            rid = request_id(e) if rid is None else rid
            if self.requests and e.byte() >= 192:
                return with_id(e.pick(self.requests), rid)
            return build_request(e, rid, self.conn.state)
        if rid is None and self.pending and e.byte() < 200:
            rid = e.pick(sorted(self.pending))
        if rid is not None and rid in self.pending:
            cls = e.pick(self.pending[rid])
            corpus = [r for r in self.replies if type(r) is cls]
            if corpus and e.byte() >= 192:
                return with_id(e.pick(corpus), rid)
            return build_reply(e, cls, rid)
        if self.replies and e.byte() >= 192:
            return with_id(e.pick(self.replies), request_id(e))
        cls = e.pick(tuple(wire.REPLY_TYPES.values()))
        return build_reply(e, cls, None if cls is ErrorReply and e.flag() else request_id(e))

    def item(self) -> None:
        """One stream item, a local action, or the end of the session."""
        e = self.e
        kind = e.pick(ITEM_KINDS)
        if kind == "valid":
            message = self.native()
            data = packb(message.to_wire())
            self.emit(data, Expect("msg", message, oversize=len(data) > self.max), message.TYPE)
        elif kind == "field":
            self.wrong_field()
        elif kind == "cross":
            other = build_reply(e, e.pick((Result, Goodbye, ErrorReply)), request_id(e))
            message = other if self.server else build_request(e, request_id(e), State.READY)
            data = packb(message.to_wire())
            codes = frozenset({WireErrorCode.UNKNOWN_MESSAGE})
            self.emit(data, Expect("err", None, codes, len(data) > self.max, False), "cross-role")
        elif kind == "object":
            data = packb(random_object(e))
            self.emit(data, Expect("any", oversize=len(data) > self.max), "object")
        elif kind == "nested":
            depth = e.pick((8, 100, 1000, 1030, 5000))
            inner = e.pick((b"\x91", b"\x81\xa1k"))
            base = packb(self.native().to_wire())
            # one more field holding `depth` nested containers: never a valid message
            data = bytes([base[0] + 1]) + base[1:] + b"\xa2zz" + inner * depth + b"\xc0"
            if base[0] & 0xF0 != 0x80 or base[0] == 0x8F:
                data = inner * depth + b"\xc0"  # not a fixmap: nest at top level
            codes = frozenset({WireErrorCode.MALFORMED, WireErrorCode.TOO_LARGE})
            self.emit(data, Expect("err", None, codes, len(data) > self.max), f"nested {depth}")
        elif kind == "huge":
            data = e.pick(HUGE_HEADERS) + e.blob(e.pick((0, 1, 16)))
            self.emit(data, DESYNC, "huge length")
        elif kind in ("flip", "truncate", "splice", "bytes", "insert"):
            self.mutate(kind)
        elif kind == "repeat" and self.last[0]:
            data, expect = self.last
            self.emit(data, expect, "repeat")
        elif kind == "send":
            self.local_send()
        elif kind == "end":
            self.end()

    def wrong_field(self) -> None:
        """A map that is almost a valid message: one field missing, extra,
        mistyped or replaced by a random value; or an int key (fatal)."""
        e = self.e
        message = self.native()
        obj: dict[object, object] = {}
        obj.update(message.to_wire().items())
        keys = [k for k in obj if k != "t"]
        how = e.below(7)
        codes: frozenset[str] = frozenset()
        fatal: bool | None = False
        if how == 0:
            # an optional field (RunUser.resume) left out is still a valid message
            del obj[e.pick([k for k in keys if k not in message.OPTIONAL])]
            codes = frozenset({WireErrorCode.MALFORMED})
        elif how == 1:
            obj["zz" + e.text(4)] = e.pick((0, "x", None, b"", (), 1.5, {"k": 1}))
            codes = frozenset({WireErrorCode.MALFORMED})
        elif how == 2:
            obj["id"] = e.pick((-1, 1 << 63, True, 1.5, "1", b"\x01", (1,)))
            codes = frozenset({WireErrorCode.BAD_TYPE})
        elif how == 3:
            obj["t"] = e.pick((None, 5, b"stats", ("x",), True))
            codes = frozenset(
                {WireErrorCode.MALFORMED if obj["t"] is None else WireErrorCode.BAD_TYPE}
            )
        elif how == 4:
            obj["t"] = e.text(wire.MAX_NAME_LEN + 8, 1)
            if obj["t"] in wire.REQUEST_TYPES or obj["t"] in wire.REPLY_TYPES:
                obj["t"] = "reboot"
            codes = frozenset({WireErrorCode.UNKNOWN_MESSAGE})
        elif how == 5:
            obj[e.bits(8)] = 1
            codes, fatal = frozenset({WireErrorCode.MALFORMED}), True
        if how == 6 or not keys:
            if keys:
                obj[e.pick(keys)] = random_object(e)
            data = packb(obj)
            self.emit(data, Expect("any", oversize=len(data) > self.max), f"{message.TYPE} random")
            return
        if how == 4 and self.server and isinstance(message, Hello | Join) and e.flag():
            obj = {}
            obj.update(message.to_wire().items())
            obj["version"] = e.pick((0, wire.PROTOCOL_VERSION - 1, wire.PROTOCOL_VERSION + 1, U32))
            codes = frozenset({WireErrorCode.VERSION})
        data = packb(obj)
        label = f"{message.TYPE} wrong field ({sorted(codes)})"
        self.emit(data, Expect("err", None, codes, len(data) > self.max, fatal), label)

    def mutate(self, how: str) -> None:
        """Byte-level damage: once fed, objects no longer line up with items."""
        e = self.e
        data = bytearray(packb(self.native().to_wire()))
        if how == "flip":
            for _ in range(e.pick((1, 2, 4, 8))):
                data[e.below(len(data))] ^= 1 << e.below(8)
        elif how == "truncate":
            del data[e.below(len(data)) :]
        elif how == "splice":
            other = packb(self.native().to_wire())
            data = data[: e.below(len(data) + 1)] + other[e.below(len(other)) :]
        elif how == "bytes":
            data = bytearray(e.blob(e.pick((1, 2, 5, 32, 300))))
        else:
            pos = e.below(len(data) + 1)
            data[pos:pos] = e.blob(e.pick((1, 2, 8)))
        self.emit(bytes(data), DESYNC, how)

    # -- events --

    def drain(self) -> None:
        """``next_event`` until NEED_DATA; check every outcome."""
        conn = self.conn
        while not self.dead:
            try:
                event = conn.next_event()
            except RemoteProtocolError as exc:
                self.on_error(exc)
                continue
            except Exception as exc:
                raise escaped("next_event", exc, self.context()) from exc
            if event is NEED_DATA:
                return
            if event is CONNECTION_CLOSED:
                if not self.eof:
                    raise self.fail("CONNECTION_CLOSED before EOF", "closed before EOF")
                return
            assert isinstance(event, Message)
            self.on_message(event)

    def expected(self) -> Expect | None:
        """The expectation for the object just decoded (None: not in sync)."""
        if not self.synced:
            return None
        if not self.expect:
            raise self.fail("an event with no item left to explain it", "event without an item")
        head = self.expect.popleft()
        if head is DESYNC:
            self.synced = False
            self.expect.clear()
            return None
        return head

    def on_error(self, exc: RemoteProtocolError) -> None:
        stats = self.stats
        stats["fatal" if exc.fatal else "rejected"] += 1
        stats[f"code {exc.code}"] += 1
        if exc.code not in WireErrorCode.ALL or not isinstance(exc.fatal, bool):
            raise self.fail(f"bad error {exc!r}", "error with an unknown code")
        rid = exc.request_id
        if rid is not None and (type(rid) is not int or not 0 <= rid <= wire.MAX_REQUEST_ID):
            raise self.fail(f"bad request_id in {exc!r}", "error with a bad request_id")
        if exc.fatal and (rid is not None or not self.conn.broken):
            raise self.fail(f"fatal {exc!r} but broken={self.conn.broken}", "fatal error state")
        head = self.expected()
        if head is not None:
            self.check_error(head, exc)
        if self.server:
            if rid is not None:
                if rid in self.pending:
                    raise self.fail(f"{exc!r} names a pending id", "duplicate id kept")
                self.pending[rid] = ERROR_ONLY
            self.send(ErrorReply.from_exception(exc))
        elif rid is not None:
            self.pending.pop(rid, None)
        self.check_pending()
        if exc.fatal:
            self.dead = True
            self.check_dead()

    def check_error(self, head: Expect, exc: RemoteProtocolError) -> None:
        if not error_fits(head, exc):
            raise self.fail(
                f"expected {head!r}, got {exc!r}",
                f"wrong error: {head.kind} -> {exc.code} fatal={exc.fatal}",
            )

    def on_message(self, message: Message) -> None:
        self.stats["accepted"] += 1
        head = self.expected()
        if head is not None and (
            head.oversize or head.kind == "err" or (head.kind == "msg" and message != head.message)
        ):
            raise self.fail(
                f"expected {head!r}, decoded {message!r}", f"wrong message for {head.kind}"
            )
        if self.server:
            if not isinstance(message, Request) or message.id in self.pending:
                raise self.fail(f"server accepted {message!r}", "server accepted a bad request")
            self.pending[message.id] = expected_replies(message)
            self.unanswered.append(message)
            for _ in range(self.e.pick((1, 0, 2, 9))):
                self.answer()
        else:
            if not isinstance(message, Reply):
                raise self.fail(f"client accepted {message!r}", "client accepted a request")
            if message.id is not None:
                allowed = self.pending.pop(message.id, ())
                if type(message) not in allowed:
                    raise self.fail(f"client accepted {message!r}", "client accepted a stray reply")
        self.check_pending()

    def check_pending(self) -> None:
        if self.conn.pending_ids != self.pending.keys():
            raise self.fail(
                f"pending ids {sorted(self.conn.pending_ids)} != expected {sorted(self.pending)}",
                "pending ids out of step",
            )

    def check_dead(self) -> None:
        """After a fatal error, every later ``next_event`` raises again."""
        conn = self.conn
        if not self.eof:
            conn.receive_data(b"\x80" + self.e.blob(4))
        for _ in range(2):
            try:
                conn.next_event()
            except RemoteProtocolError as exc:
                if not exc.fatal:
                    raise self.fail(
                        f"dead connection raised {exc!r}", "dead but not fatal"
                    ) from exc
                continue
            except Exception as exc:
                raise escaped("next_event on a dead connection", exc, self.context()) from exc
            raise self.fail("a dead connection returned an event", "dead connection revived")

    # -- local actions --

    def send(self, reply: Reply) -> None:
        """Server send; LocalProtocolError only where the API documents it."""
        rid = reply.id
        allowed = self.conn.state is not State.CLOSED and (
            rid is None or type(reply) in self.pending.get(rid, ())
        )
        try:
            data = self.conn.send(reply)
        except LocalProtocolError as exc:
            if allowed and len(packb(reply.to_wire())) <= self.max:
                raise self.fail(f"send({reply!r}) refused: {exc!r}", "server send refused") from exc
            self.stats["send refused"] += 1
            return
        except Exception as exc:
            raise escaped("server send", exc, self.context()) from exc
        if not allowed:
            raise self.fail(f"send({reply!r}) was allowed", "server sent a disallowed reply")
        if rid is not None:
            del self.pending[rid]
        self.checker.check(data, reply)
        self.check_pending()

    def answer(self) -> None:
        """Answer the oldest accepted request (in order, like pvemu's server)."""
        if not self.unanswered:
            return
        request = self.unanswered.popleft()
        allowed = self.pending.get(request.id)
        if allowed is None:
            return  # already answered with an error
        cls = allowed[0] if len(allowed) == 1 or not self.e.chance(30) else allowed[1]
        self.send(build_reply(self.e, cls, request.id))

    def local_send(self) -> None:
        """Client: send a request (refused only for state or a pending id).
        Server: try a reply nobody waits for (must be refused)."""
        e = self.e
        if self.server:
            rid = request_id(e)
            if rid not in self.pending:
                self.send(build_reply(e, e.pick((Result, Goodbye, StatsResult)), rid))
            else:
                self.answer()
            return
        request = build_request(e, request_id(e), self.conn.state)
        allowed = may_send(self.conn.state, request) and request.id not in self.pending
        try:
            self.conn.send(request)
        except LocalProtocolError as exc:
            if allowed and len(packb(request.to_wire())) <= self.max:
                raise self.fail(
                    f"send({request!r}) refused: {exc!r}", "client send refused"
                ) from exc
            self.stats["send refused"] += 1
            return
        except Exception as exc:
            raise escaped("client send", exc, self.context()) from exc
        if not allowed:
            raise self.fail(f"send({request!r}) was allowed", "client sent a disallowed request")
        self.pending[request.id] = expected_replies(request)
        self.check_pending()

    def end(self) -> None:
        """Feed what is left; maybe EOF (then only CONNECTION_CLOSED or a
        fatal error, and receive_data refuses more)."""
        self.feed(len(self.buffer), len(self.buffer))
        if self.dead:
            return
        if self.expect and self.expect[0] is DESYNC:
            self.synced = False  # damaged bytes are still waiting for more
            self.expect.clear()
        if self.synced and self.expect:
            raise self.fail(f"{len(self.expect)} items never produced an event", "items lost")
        if not self.e.flag():
            self.dead = True  # the session just stops here
            return
        self.eof = True
        self.conn.receive_data(b"")
        try:
            event = self.conn.next_event()
        except RemoteProtocolError as exc:
            if not exc.fatal or self.synced:
                raise self.fail(f"EOF raised {exc!r}", "EOF error") from exc
            self.on_error_at_eof(exc)
            event = CONNECTION_CLOSED
        except Exception as exc:
            raise escaped("next_event at EOF", exc, self.context()) from exc
        if event is not CONNECTION_CLOSED and not self.dead:
            raise self.fail(f"EOF gave {event!r}", "EOF without CONNECTION_CLOSED")
        try:
            self.conn.receive_data(b"more")
        except LocalProtocolError:
            pass
        else:
            raise self.fail("receive_data after EOF was accepted", "data after EOF")
        self.dead = True

    def on_error_at_eof(self, exc: RemoteProtocolError) -> None:
        self.stats["fatal"] += 1
        self.dead = True
        if self.server:
            self.send(ErrorReply.from_exception(exc))
        self.check_dead()

    def run(self, budget: int) -> None:
        while not self.dead and self.items < budget:
            self.item()
        if not self.dead:
            self.end()


#: Weighted item kinds for a session; index 0 (the plainest) is a valid message.
ITEM_KINDS: Final = (
    ("valid",) * 40
    + ("field",) * 14
    + ("cross",) * 3
    + ("object",) * 8
    + ("nested",) * 2
    + ("huge",) * 2
    + ("flip",) * 4
    + ("truncate",) * 3
    + ("splice",) * 2
    + ("bytes",) * 2
    + ("insert",) * 2
    + ("repeat",) * 4
    + ("send",) * 10
    + ("end",) * 2
)
#: Decoder limits a session uses: mostly the real one, sometimes tiny ones
#: (cheap inputs then reach the message-size limit).
MAX_SIZES: Final = (wire.DEFAULT_MESSAGE_SIZE,) * 3 + (wire.MAX_MESSAGE_SIZE,) * 2 + (64, 100, 1000)
#: Items per example: hypothesis draws 1..this (about half on average).
WIRE_MAX_ITEMS: Final = 400


def run_wire(
    count: int, blob: bytes, requests: Sequence[Request], replies: Sequence[Reply]
) -> None:
    """One example: sessions (fresh connections) until ``count`` items."""
    e = Entropy(blob)
    checker = ReplyChecker()
    done = 0
    while done < count:
        role: wire.Role = "client" if e.flag() else "server"
        session = WireSession(e, role, e.pick(MAX_SIZES), requests, replies, checker)
        if role == "client" and e.byte() < 230:
            session.local_send()  # a client must send before replies mean anything
        session.run(count - done)
        done += session.items
    count_example(WIRE)


def wire_fuzzer(
    profile: str | settings = SUITE_PROFILE, seed: int | None = None
) -> Callable[[], None]:
    """The wire-decoder fuzz target under ``profile`` (a name or settings)."""

    @settings(_profile(profile))
    @given(
        count=st.integers(1, WIRE_MAX_ITEMS),
        blob=st.binary(min_size=256, max_size=4096),
        requests=st.lists(test_wire.requests, max_size=3),
        replies=st.lists(test_wire.replies, max_size=3),
    )
    def fuzz_wire(count: int, blob: bytes, requests: list[Request], replies: list[Reply]) -> None:
        with _example():
            run_wire(count, blob, requests, replies)

    return counted_run(fuzz_wire if seed is None else hypothesis_seed(seed)(fuzz_wire))
