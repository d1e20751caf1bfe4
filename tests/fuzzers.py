"""Hypothesis fuzzers for the wire decoder and for hypercall arguments.

Two targets, each built by a factory that takes a hypothesis settings profile,
so the same code runs small in the suite (``tests/test_fuzz.py``) and long
under ``make fuzz`` (``python -m tests.fuzzers --min-count 1000000``):

* :func:`wire_fuzzer` feeds streams of valid messages and mutations of them
  (bit flips, truncation, splicing, random bytes, random msgpack objects, valid
  maps with wrong fields, nested containers, huge declared lengths) in random
  chunks to :class:`shared.wire.Connection` in both roles. Only
  ``RemoteProtocolError`` may leave ``next_event``; a server answers every
  rejection and every request, and each reply decodes back through a client.
* :func:`hypercall_fuzzer` drives an in-process :class:`hypervisor.Hypervisor`
  with two booted domains through the same sans-I/O service the server uses
  (wire request, ``HypervisorService.begin``, ``Work`` stepped in random
  slices, reply through a connection pair). An ``internal`` reply (an
  exception inside the hypervisor) is a crash; ``audit()`` stays clean; no
  frame is lost.

Why entropy blobs: a hypothesis draw costs ~25 µs on the 2-core CI machine, so
drawing every field of every message tops out near 1,500 messages/s. Each
example therefore draws ``count`` (1-400 inputs), a small structured corpus
and one ``st.binary`` blob that an :class:`Entropy` reader turns into the
inputs' choices. Hypothesis still generates, replays and shrinks: a smaller
``count`` means fewer inputs, lower blob bytes plainer choices (choice 0 is
always the plainest option).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import random
import sys
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import msgpack
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from pvemu.hypervisor import Hypervisor
from pvemu.hypervisor.frametable import NO_OWNER
from pvemu.hypervisor.limits import ServerLimits
from pvemu.hypervisor.service import FEATURES, HypervisorService, Session, Work
from pvemu.shared import abi, wire
from pvemu.shared.errors import LocalProtocolError, RemoteProtocolError, WireErrorCode
from pvemu.shared.wire import (
    CONNECTION_CLOSED,
    NEED_DATA,
    PROTOCOL_VERSION,
    Access,
    Audit,
    AuditResult,
    Bye,
    Call,
    Connection,
    ErrorReply,
    Fault,
    Goodbye,
    Hello,
    Hypercall,
    Join,
    Message,
    MmuextOpArgs,
    MmuUpdateArgs,
    MulticallArgs,
    MulticallResult,
    Ptwr,
    PtwrResult,
    RawArgs,
    Reply,
    Request,
    Result,
    RunUser,
    State,
    Stats,
    StatsResult,
    UpdateVaMappingArgs,
    UserResult,
    VmAssistArgs,
    Welcome,
)
from pvemu.shared.x86 import (
    _PAGE_ACCESSED,
    _PAGE_AVAIL,
    _PAGE_DIRTY,
    _PAGE_GLOBAL,
    _PAGE_GUEST_KERNEL,
    _PAGE_NX,
    _PAGE_PAT,
    _PAGE_PCD,
    _PAGE_PRESENT,
    _PAGE_PWT,
    _PAGE_RW,
    _PAGE_USER,
    PAGE_SIZE,
    PTE_MFN_MASK,
    maddr_of_entry,
    make_pte,
)
from tests import test_wire
from tests.support import USER_RW, Guest, boot

# --- bookkeeping ------------------------------------------------------------------

WIRE: Final = "wire"
HYPERCALL: Final = "hypercall"

#: Messages (wire) and requests (hypercall) processed so far, per fuzzer.
COUNTS: Counter[str] = Counter()
#: What the processed inputs did (accepted, rejected, fatal, rc != 0, ...).
STATS: dict[str, Counter[str]] = {WIRE: Counter(), HYPERCALL: Counter()}
#: Called after every example (the runner's progress bar); None in the suite.
PROGRESS_HOOK: Callable[[], None] | None = None
#: Cleared once an example of a run has failed, so that hypothesis shrinking
#: and replaying are not counted as generated inputs; set again per run.
COUNTING: bool = True

SUITE_PROFILE: Final = "pvemu-fuzz-suite"
LONG_PROFILE: Final = "pvemu-fuzz-long"
_QUIET_HEALTH: Final = [
    HealthCheck.too_slow,
    HealthCheck.data_too_large,
    HealthCheck.large_base_example,
    HealthCheck.filter_too_much,
]
settings.register_profile(
    SUITE_PROFILE,
    deadline=None,
    max_examples=40,
    derandomize=True,
    database=None,
    suppress_health_check=_QUIET_HEALTH,
)
settings.register_profile(
    LONG_PROFILE,
    deadline=None,
    max_examples=1000,
    database=None,
    suppress_health_check=_QUIET_HEALTH,
    print_blob=True,
    phases=(Phase.explicit, Phase.generate, Phase.shrink),
)

T = TypeVar("T")

U16: Final = 0xFFFF
U32: Final = 0xFFFF_FFFF
U64: Final = (1 << 64) - 1
S64_MIN: Final = -(1 << 63)
S64_MAX: Final = (1 << 63) - 1


class FuzzFailure(AssertionError):
    """A property violation; ``signature`` names the bug (not the input), so
    the runner can tell distinct crashes from the same one found again."""

    def __init__(self, message: str, signature: str) -> None:
        super().__init__(message)
        self.signature = signature


def _origin(exc: BaseException) -> str:
    """``file:line`` where an exception was raised (the innermost frame)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"
    last = frames[-1]
    return f"{last.filename.rsplit('/', 1)[-1]}:{last.lineno}"


def _escaped(what: str, exc: BaseException, context: str) -> FuzzFailure:
    """An exception that must not have escaped ``what``."""
    return FuzzFailure(
        f"{what} raised {type(exc).__name__}: {exc}\n{context}",
        f"{what}: {type(exc).__name__} at {_origin(exc)}",
    )


def _count(fuzzer: str, n: int = 1) -> None:
    if COUNTING:
        COUNTS[fuzzer] += n


#: Bugs the fuzzers found that are not fixed yet (signature -> where). When
#: one fires it is recorded in KNOWN_HITS and the example goes on, so it
#: cannot hide other bugs; the runner still reports each as a crash, and
#: tests/test_fuzz.py pins each with a strict xfail. Remove an entry once the
#: bug is fixed.
KNOWN_BUGS: Final[dict[str, str]] = {}
#: signature -> (times hit, the first hit's context), while COUNTING.
KNOWN_HITS: dict[str, tuple[int, str]] = {}


def _known(signature: str, context: str) -> None:
    """A known bug fired: record it and carry on (see KNOWN_BUGS)."""
    assert signature in KNOWN_BUGS, signature
    if COUNTING:
        times, first = KNOWN_HITS.get(signature, (0, context))
        KNOWN_HITS[signature] = (times + 1, first)


# --- entropy -------------------------------------------------------------------------


class Entropy:
    """Choices read from a hypothesis-drawn blob, then from a PRNG seeded
    with it (so an example's size does not depend on the blob's length).

    Every choice maps 0 to its plainest option, so hypothesis shrinking (which
    lowers the blob's bytes) yields plain reproducers.
    """

    __slots__ = ("data", "pos", "rng")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.rng: random.Random | None = None

    def _more(self, n: int) -> bytes:
        if self.rng is None:
            self.rng = random.Random(self.data)
        return self.rng.randbytes(n)

    def byte(self) -> int:
        pos = self.pos
        if pos < len(self.data):
            self.pos = pos + 1
            return self.data[pos]
        return self._more(1)[0]

    def take(self, n: int) -> bytes:
        pos = self.pos
        chunk = self.data[pos : pos + n]
        self.pos = pos + len(chunk)
        return chunk if len(chunk) == n else chunk + self._more(n - len(chunk))

    def bits(self, k: int) -> int:
        return int.from_bytes(self.take((k + 7) // 8), "little") & ((1 << k) - 1)

    def below(self, n: int) -> int:
        """0 .. n-1 (n >= 1)."""
        if n <= 256:
            return self.byte() % n
        if n <= 65536:
            return self.bits(16) % n
        return self.bits(64) % n

    def flag(self) -> bool:
        return bool(self.byte() & 1)

    def chance(self, percent: int) -> bool:
        """True with about ``percent``% probability; a zero byte is False."""
        return self.byte() * 100 >= (100 - percent) * 256

    def pick(self, options: Sequence[T]) -> T:
        return options[self.below(len(options))]

    def int_range(self, lo: int, hi: int) -> int:
        """An int in lo..hi, often an edge."""
        k = self.byte()
        if k < 16:
            return lo
        if k < 32:
            return hi
        if k < 40:
            return min(lo + 1, hi)
        return lo + self.below(hi - lo + 1)

    def u64(self) -> int:
        k = self.byte()
        if k < 64:
            return U64_EDGES[k % len(U64_EDGES)]
        if k < 128:
            return self.bits(8)
        if k < 192:
            return self.bits(32)
        return self.bits(64)

    def s64(self) -> int:
        k = self.byte()
        if k < 96:
            return S64_EDGES[k % len(S64_EDGES)]
        if k < 176:
            return self.bits(8) - 128
        return self.bits(64) + S64_MIN

    def u32(self) -> int:
        return self.u64() & U32

    def blob(self, n: int) -> bytes:
        """``n`` bytes: a few from the blob, repeated (long blobs stay cheap)."""
        if n <= 16:
            return self.take(n)
        seed = self.take(8)
        return (seed * (n // 8 + 1))[:n]

    def text(self, max_len: int, min_len: int = 0) -> str:
        k = self.byte() % 8
        if k == 0:
            n = min_len
        elif k == 6:
            n = max_len
        elif k == 7:
            n = self.int_range(min_len, max_len)
        else:
            n = self.int_range(min_len, min(max_len, max(min_len, 12)))
        if n <= 16:
            return "".join(CHARSET[b] for b in self.take(n))
        seed = "".join(CHARSET[b] for b in self.take(8))
        return (seed * (n // 8 + 1))[:n]


U64_EDGES: Final = (
    0,
    1,
    2,
    0x7F,
    0x80,
    0xFF,
    0x100,
    U16,
    U16 + 1,
    U32,
    U32 + 1,
    S64_MAX,
    1 << 63,
    U64,
)
S64_EDGES: Final = (
    0,
    -1,
    -abi.EINVAL,
    -abi.ENOSYS,
    1,
    S64_MIN,
    S64_MAX,
    -129,
    127,
    -32769,
    1 << 32,
)
#: 256 characters a byte maps to: ASCII, controls, 2-, 3- and 4-byte UTF-8.
CHARSET: Final = tuple(
    [chr(c) for c in range(0x20, 0x7F)]
    + [chr(c) for c in range(0x20)]
    + ["\x7f", "é", "ß", "Ω", "€", "中", "\u0800", "\uffff", "\U0001f600", "\U0010ffff"]
    + [chr(0x100 + 37 * i) for i in range(256 - 95 - 32 - 10)]
)
assert len(CHARSET) == 256


# --- valid messages from entropy -------------------------------------------------------

UNKNOWN_OPS: Final = (0, 2, 12, 15, 17, 29, 42, 43, 99, 1000, U32)
#: The hypercalls pvemu implements; any other number answers -ENOSYS.
KNOWN_OPS: Final = frozenset(abi.HYPERCALL_NAMES)


def _widest_foreigndom() -> int:
    """The largest mmu_update foreigndom the wire types accept: u16, or u32
    once the PFD field (bits 16-31, page-table owner + 1) is carried."""
    try:
        MmuUpdateArgs(b"", U32)
    except LocalProtocolError:
        return U16
    return U32


FOREIGNDOM_MAX: Final = _widest_foreigndom()


def request_id(e: Entropy) -> int:
    """Mostly tiny ids, so duplicates and replies to pending ids happen."""
    k = e.byte()
    if k < 200:
        return k % 8
    if k < 240:
        return e.bits(16)
    return e.pick((wire.MAX_REQUEST_ID, 1 << 32, (1 << 63) - 2))


def unknown_op(e: Entropy) -> int:
    op = e.pick(UNKNOWN_OPS) if e.byte() < 200 else e.bits(32)
    return op if op not in KNOWN_OPS else 0


def wire_call(e: Entropy, depth: int) -> Call:
    """A valid multicall entry / hypercall of any shape (field values random)."""
    k = e.below(6 if depth < 2 else 5)
    if k == 0:
        return Call(abi.HYPERVISOR_vm_assist, VmAssistArgs(e.u32(), e.u32()))
    if k == 1:
        if e.chance(25):  # typed args where implemented, RawArgs (-ENOSYS) otherwise
            op = abi.HYPERVISOR_update_va_mapping_otherdomain
            return wire.make_call(op, e.u64(), e.u64(), e.u64(), e.int_range(0, U16))
        return Call(
            abi.HYPERVISOR_update_va_mapping, UpdateVaMappingArgs(e.u64(), e.u64(), e.u64())
        )
    if k == 2:
        n = e.pick((1, 0, 2, 3, 8))
        blob = wire.pack_u64s(e.u64() for _ in range(2 * n))
        return Call(abi.HYPERVISOR_mmu_update, MmuUpdateArgs(blob, e.int_range(0, FOREIGNDOM_MAX)))
    if k == 3:
        ops = tuple((e.u32(), e.u64(), e.u64()) for _ in range(e.pick((1, 0, 2, 4))))
        return Call(abi.HYPERVISOR_mmuext_op, MmuextOpArgs(ops, e.int_range(0, FOREIGNDOM_MAX)))
    if k == 4:
        op = unknown_op(e)
        return Call(
            op, RawArgs(tuple(e.u64() for _ in range(e.below(wire.MAX_HYPERCALL_ARGS + 1))))
        )
    calls = tuple(wire_call(e, depth + 1) for _ in range(e.pick((1, 0, 2, 3))))
    return Call(abi.HYPERVISOR_multicall, MulticallArgs(calls))


def build_request(e: Entropy, rid: int, state: State) -> Request:
    """A valid request; in IDLE mostly a handshake, so sessions get going."""
    k = e.below(10)
    if state is State.IDLE and e.byte() < 160:
        k = 5 if k < 7 else 6
    if k == 0:
        return Stats(rid)
    if k == 1:
        return Audit(rid)
    if k == 2:
        accesses = []
        for _ in range(e.pick((1, 0, 2, 3))):
            kind = e.pick(("r", "w", "x"))
            length = e.int_range(1, wire.MAX_ACCESS_LEN)
            data: bytes | int = e.blob(length) if kind == "w" else length
            accesses.append(Access(e.u64(), kind, data))
        return RunUser(rid, tuple(accesses))
    if k == 3:
        return Ptwr(rid, e.u64(), e.u64(), e.flag())
    if k == 4:
        return Bye(rid)
    if k == 5:
        return Hello(
            rid,
            PROTOCOL_VERSION,
            e.int_range(1, wire.MAX_MEMORY_MIB),
            e.int_range(1, wire.MAX_VCPUS),
            e.text(wire.MAX_NAME_LEN),
        )
    if k == 6:
        return Join(
            rid,
            PROTOCOL_VERSION,
            e.int_range(0, U16),
            e.take(wire.SECRET_LEN),
            e.int_range(0, wire.MAX_VCPUS - 1),
        )
    call = wire_call(e, 0)
    return Hypercall(rid, call.op, call.args)


def stats_tree(e: Entropy, depth: int) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for _ in range(e.pick((1, 0, 2, 4))):
        key = e.text(wire.MAX_NAME_LEN, 1)
        if depth < wire.MAX_STATS_DEPTH and e.byte() < 64:
            tree[key] = stats_tree(e, depth + 1)
        else:
            tree[key] = e.u64() if e.flag() else e.s64()
    return tree


def build_reply(e: Entropy, cls: type[Reply], rid: int | None) -> Reply:
    """A valid reply of type ``cls`` (``rid`` None only for ErrorReply)."""
    if cls is ErrorReply:
        code = e.pick(sorted(WireErrorCode.ALL)) if e.byte() < 200 else e.text(64, 1)
        return ErrorReply(rid, code, e.text(wire.MAX_TEXT_LEN))
    assert rid is not None
    if cls is Result:
        return Result(rid, e.s64(), e.u64())
    if cls is MulticallResult:
        n = e.pick((1, 0, 2, 8, wire.MAX_MULTICALL_CALLS))
        first = e.s64()
        return MulticallResult(rid, e.s64(), tuple([first] * n))
    if cls is PtwrResult:
        return PtwrResult(rid, e.s64(), e.u64())
    if cls is UserResult:
        reads = tuple(e.blob(e.pick((8, 0, 1, 16, wire.MAX_ACCESS_LEN))) for _ in range(e.below(4)))
        fault = Fault(e.u64(), e.u32()) if e.flag() else None
        return UserResult(rid, e.int_range(0, wire.MAX_USER_ACCESSES), reads, fault)
    if cls is StatsResult:
        return StatsResult(rid, stats_tree(e, 1))
    if cls is AuditResult:
        n = e.pick((0, 1, 2))
        return AuditResult(rid, tuple(e.text(wire.MAX_TEXT_LEN) for _ in range(n)))
    if cls is Welcome:
        n = e.pick((4, 0, 1, 16, 512))
        limits = {e.text(wire.MAX_NAME_LEN, 1): e.u64() for _ in range(e.below(4))}
        features = tuple(e.u32() for _ in range(e.pick((1, 0, 2, wire.MAX_FEATURES))))
        return Welcome(
            rid,
            e.int_range(0, U16),
            e.int_range(0, wire.MAX_VCPUS - 1),
            wire.pack_u64s([e.u64()] * n),
            e.take(wire.SECRET_LEN),
            limits,
            features,
        )
    assert cls is Goodbye, cls
    return Goodbye(rid)


def with_id(message: Message, rid: int | None) -> Message:
    """A corpus message under another id (ids drive the state machine)."""
    if rid is None and not isinstance(message, ErrorReply):
        return message
    new: Message = dataclasses.replace(message, id=rid)  # type: ignore[type-var]
    return new


def expected_replies(request: Request) -> tuple[type[Reply], ...]:
    """The reply types protocol.md §3 allows for ``request``."""
    if isinstance(request, Hello | Join):
        return (Welcome, ErrorReply)
    if isinstance(request, Bye):
        return (Goodbye,)
    if isinstance(request, Hypercall):
        first: type[Reply] = MulticallResult if request.op == abi.HYPERVISOR_multicall else Result
        return (first, ErrorReply)
    typed: dict[type[Request], type[Reply]] = {
        Ptwr: PtwrResult,
        RunUser: UserResult,
        Stats: StatsResult,
        Audit: AuditResult,
    }
    return (typed[type(request)], ErrorReply)


def may_send(state: State, request: Request) -> bool:
    """protocol.md §5: what a client may send in ``state``."""
    if isinstance(request, Hello | Join):
        return state is State.IDLE
    if isinstance(request, Bye):
        return state in (State.IDLE, State.READY)
    return state is State.READY


def packb(obj: object) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


# --- random msgpack and hostile bytes ------------------------------------------------------

FLOATS: Final = (0.0, 1.5, -2.0, float("inf"), float("nan"), 1e300)


def random_object(e: Entropy, depth: int = 0) -> object:
    """Any msgpack value: ints of every width, floats, nil, bools, str, bin,
    arrays, maps (str, bin or int keys), ext types and timestamps."""
    k = e.below(12 if depth < 3 else 8)
    if k == 0:
        return e.u64() if e.flag() else e.s64()
    if k == 1:
        return e.text(40)
    if k == 2:
        return e.blob(e.pick((0, 1, 16, 300)))
    if k == 3:
        return e.pick((None, True, False))
    if k == 4:
        return e.pick(FLOATS)
    if k == 5:
        return msgpack.ExtType(e.bits(7), e.blob(e.pick((1, 4, 16, 17))))
    if k == 6:
        return msgpack.Timestamp(e.bits(33), e.below(1_000_000_000))
    if k == 7:
        return e.text(wire.MAX_STR_LEN + 1, wire.MAX_STR_LEN) if e.flag() else -e.bits(16)
    if k in (8, 9):
        return tuple(random_object(e, depth + 1) for _ in range(e.below(5)))
    out: dict[object, object] = {}
    for _ in range(e.below(5)):
        j = e.byte()
        key: object = e.text(8) if j < 220 else (e.blob(2) if j < 240 else e.bits(8))
        out[key] = random_object(e, depth + 1)
    return out


#: Headers that declare lengths far beyond the data, or just over a decoder limit.
HUGE_HEADERS: Final = (
    b"\xdb\xff\xff\xff\xff",  # str32, 4 GiB
    b"\xc6\xff\xff\xff\xff",  # bin32, 4 GiB
    b"\xdd\xff\xff\xff\xff",  # array32
    b"\xdf\xff\xff\xff\xff",  # map32
    b"\xc9\xff\xff\xff\xff\x01",  # ext32
    b"\xdb" + (wire.MAX_STR_LEN + 1).to_bytes(4, "big"),
    b"\xc6" + (wire.MAX_BIN_LEN + 1).to_bytes(4, "big"),
    b"\xdd" + (wire.MAX_ARRAY_LEN + 1).to_bytes(4, "big"),
    b"\xdf" + (wire.MAX_MAP_LEN + 1).to_bytes(4, "big"),
    b"\xc9" + (wire.MAX_EXT_LEN + 1).to_bytes(4, "big") + b"\x01",
)


# --- the wire fuzzer -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Expect:
    """What the next complete msgpack object fed must produce, while in sync.

    ``kind`` "msg": ``message`` (or a bad_state rejection); "err": an error
    with one of ``codes`` (and fatal == ``fatal`` unless None); "any":
    anything legal; "desync": from here on objects no longer line up with
    items. ``oversize``: bigger than the decoder's limit, so never decodable.
    """

    kind: str
    message: Message | None = None
    codes: frozenset[str] = frozenset()
    oversize: bool = False
    fatal: bool | None = None


DESYNC: Final = Expect("desync")


def _error_fits(head: Expect, exc: RemoteProtocolError) -> bool:
    """protocol.md §6: the errors an item of this kind may produce."""
    code, fatal = exc.code, exc.fatal
    if head.oversize:  # the size limit, or damage found before it
        return fatal and (
            code == WireErrorCode.TOO_LARGE
            or (code == WireErrorCode.MALFORMED and head.kind != "msg")
        )
    if head.kind == "any":
        return True
    if code == WireErrorCode.BAD_STATE and (fatal or head.kind == "msg"):
        return True  # after bye/goodbye, a duplicate id, or not allowed in this state
    return head.kind == "err" and code in head.codes and head.fatal in (None, fatal)


ERROR_ONLY: Final[tuple[type[Reply], ...]] = (ErrorReply,)
REQUEST_FOR: Final[dict[type[Reply], Callable[[int], Request]]] = {
    Result: lambda rid: Hypercall(rid, 0, RawArgs()),
    MulticallResult: lambda rid: Hypercall(rid, abi.HYPERVISOR_multicall, MulticallArgs(())),
    PtwrResult: lambda rid: Ptwr(rid, 0, 0),
    UserResult: lambda rid: RunUser(rid, ()),
    StatsResult: Stats,
    AuditResult: Audit,
}


class ReplyChecker:
    """Decodes what a server sent through a client Connection that waits for
    exactly that reply: it must come back equal and alone (well formed)."""

    def __init__(self) -> None:
        self._ready: Connection | None = None

    def _ready_client(self) -> Connection:
        if self._ready is None or self._ready.broken:
            client, server = Connection("client"), Connection("server")
            server.receive_data(client.send(Hello(0, PROTOCOL_VERSION, 1, 1)))
            server.next_event()
            client.receive_data(server.send(Welcome(0, 1, 0, b"", bytes(16), {}, ())))
            client.next_event()
            self._ready = client
        return self._ready

    def check(self, data: bytes, reply: Reply) -> None:
        if reply.id is None:
            client = Connection("client")
        elif isinstance(reply, Welcome | ErrorReply):
            client = Connection("client")
            client.send(Hello(reply.id, PROTOCOL_VERSION, 1, 1))
        elif isinstance(reply, Goodbye):
            client = Connection("client")
            client.send(Bye(reply.id))
        else:
            client = self._ready_client()
            client.send(REQUEST_FOR[type(reply)](reply.id))
        client.receive_data(data)
        try:
            event = client.next_event()
            after = client.next_event()
        except Exception as exc:
            raise _escaped("client decoding a sent reply", exc, f"reply: {reply!r}") from exc
        if event != reply or after is not NEED_DATA:
            raise FuzzFailure(
                f"sent {reply!r}\nclient decoded {event!r} then {after!r}",
                "reply does not decode back",
            )


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
        _count(WIRE)
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
                raise _escaped("receive_data", exc, self.context()) from exc
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
            del obj[e.pick(keys)]
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
            obj["version"] = e.pick((0, 2, U32))
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
                raise _escaped("next_event", exc, self.context()) from exc
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
        if not _error_fits(head, exc):
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
                raise _escaped("next_event on a dead connection", exc, self.context()) from exc
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
            raise _escaped("server send", exc, self.context()) from exc
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
            raise _escaped("client send", exc, self.context()) from exc
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
            raise _escaped("next_event at EOF", exc, self.context()) from exc
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
    if COUNTING:
        STATS[WIRE]["examples"] += 1


def _profile(profile: str | settings) -> settings:
    return settings.get_profile(profile) if isinstance(profile, str) else profile


@contextlib.contextmanager
def _example() -> Iterator[None]:
    """Around one example: after a failure stop counting (what follows is
    hypothesis shrinking and replaying, not new inputs); tick the progress."""
    global COUNTING
    try:
        yield
    except BaseException:
        COUNTING = False
        raise
    finally:
        if PROGRESS_HOOK is not None:
            PROGRESS_HOOK()


def _counted(test: Callable[[], None]) -> Callable[[], None]:
    """A hypothesis run that counts its inputs from the start."""

    @functools.wraps(test)
    def run() -> None:
        global COUNTING
        COUNTING = True
        try:
            test()
        finally:
            COUNTING = True

    return run


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

    return _counted(fuzz_wire if seed is None else hypothesis_seed(seed)(fuzz_wire))


# --- the hypercall fuzzer -----------------------------------------------------------------

_HUGE_MFNS: Final = (1 << 40) - 1, 1 << 40, (1 << 52) - 1
FLAG_CHOICES: Final = (
    _PAGE_PRESENT | _PAGE_RW | _PAGE_USER,
    0,
    _PAGE_PRESENT,
    _PAGE_PRESENT | _PAGE_USER,
    _PAGE_PRESENT | _PAGE_RW,
    _PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_ACCESSED | _PAGE_DIRTY,
    _PAGE_PRESENT | _PAGE_USER | _PAGE_NX,
    _PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_GLOBAL,
    _PAGE_RW | _PAGE_DIRTY,
)
EXTRA_FLAGS: Final = (
    _PAGE_PWT,
    _PAGE_PCD,
    _PAGE_PAT,  # also _PAGE_PSE in upper levels
    _PAGE_GLOBAL,
    _PAGE_NX,
    _PAGE_AVAIL,
    _PAGE_GUEST_KERNEL,
    0x7FF << 52,
    _PAGE_ACCESSED | _PAGE_DIRTY,
)
SLOTS: Final = (0, 1, 2, 3, 7, 255, 256, 257, 270, 271, 272, 511)
#: Bits flipped in an entry's current value.
TWEAKS: Final = (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_ACCESSED | _PAGE_DIRTY,
    _PAGE_RW,
    _PAGE_USER,
    _PAGE_NX,
    _PAGE_GLOBAL,
    _PAGE_AVAIL,
    _PAGE_PRESENT,
    _PAGE_PWT,
    _PAGE_PAT,
)
MMU_CMDS: Final = (0, 0, 0, 0, 2, 2, 2, 1, 3, 4, 5, 6, 7)
VAS: Final = (
    0,
    0x1000,
    0x2000,
    0x3000,
    0x7000,
    0x8000,
    0x1FF000,
    0x200000,
    1 << 30,
    1 << 39,
    (1 << 47) - PAGE_SIZE,
    1 << 47,
    abi.HYPERVISOR_VIRT_START,
    abi.HYPERVISOR_VIRT_END,
    abi.HYPERVISOR_VIRT_END - PAGE_SIZE,
    U64 - PAGE_SIZE + 1,
    0xFFFF_FFFF_8000_0000,
)
FOREIGN: Final = ("self",) * 40 + ("own", "other", "io", "xen", "cow", "none", "zero", "u16")
MMUEXT_CMDS: Final = (
    abi.MMUEXT_PIN_L1_TABLE,
    abi.MMUEXT_PIN_L2_TABLE,
    abi.MMUEXT_PIN_L3_TABLE,
    abi.MMUEXT_PIN_L4_TABLE,
    abi.MMUEXT_UNPIN_TABLE,
    abi.MMUEXT_UNPIN_TABLE,
    abi.MMUEXT_NEW_BASEPTR,
    abi.MMUEXT_NEW_BASEPTR,
    abi.MMUEXT_NEW_USER_BASEPTR,
    abi.MMUEXT_TLB_FLUSH_LOCAL,
    abi.MMUEXT_INVLPG_LOCAL,
    abi.MMUEXT_TLB_FLUSH_MULTI,
    abi.MMUEXT_INVLPG_MULTI,
    abi.MMUEXT_TLB_FLUSH_ALL,
    abi.MMUEXT_INVLPG_ALL,
    abi.MMUEXT_FLUSH_CACHE,
    abi.MMUEXT_SET_LDT,
    abi.MMUEXT_CLEAR_PAGE,
    abi.MMUEXT_CLEAR_PAGE,
    abi.MMUEXT_COPY_PAGE,
    abi.MMUEXT_COPY_PAGE,
    abi.MMUEXT_FLUSH_CACHE_GLOBAL,
    abi.MMUEXT_MARK_SUPER,
    abi.MMUEXT_UNMARK_SUPER,
    14,
    21,
    U32,
)
_FRAME_CMDS: Final = frozenset(
    {
        abi.MMUEXT_PIN_L1_TABLE,
        abi.MMUEXT_PIN_L2_TABLE,
        abi.MMUEXT_PIN_L3_TABLE,
        abi.MMUEXT_PIN_L4_TABLE,
        abi.MMUEXT_UNPIN_TABLE,
        abi.MMUEXT_NEW_BASEPTR,
        abi.MMUEXT_NEW_USER_BASEPTR,
        abi.MMUEXT_CLEAR_PAGE,
        abi.MMUEXT_COPY_PAGE,
    }
)
#: Slice budgets for Work.step; None runs the call to its end.
BUDGETS: Final = (None, None, 1, 2, 3, 5, 8, 64)
#: Weighted request kinds; index 0 is a plain mmu_update.
HC_KINDS: Final = (
    ("mmu",) * 30
    + ("remap",) * 6
    + ("ext",) * 20
    + ("uvm",) * 12
    + ("multicall",) * 12
    + ("assist",) * 3
    + ("unknown",) * 3
    + ("ptwr",) * 10
    + ("user",) * 7
    + ("stats",) * 2
    + ("big",) * 1
    + ("invalid",) * 5
)
#: Multicall entries: the hypercall kinds only.
CALL_KINDS: Final = tuple(
    k for k in HC_KINDS if k in ("mmu", "remap", "ext", "uvm", "multicall", "assist", "unknown")
)
#: Requests per example: hypothesis draws 1..this (about half on average).
HC_MAX_REQUESTS: Final = 400
#: The limits pvemu's server runs with by default (batch size, message size).
SERVER_LIMITS: Final = ServerLimits()
ERRNOS: Final = frozenset(abi.ERRNO_NAMES)


def describe(item: object) -> str:
    """A request for a failure report: mmu_update records as hex pairs."""
    if isinstance(item, Hypercall):
        return f"Hypercall(id={item.id}, {describe(Call(item.op, item.args))})"
    if isinstance(item, Call):
        args = item.args
        name = abi.HYPERCALL_NAMES.get(item.op, f"op {item.op}")
        if isinstance(args, MmuUpdateArgs):
            pairs = ", ".join(f"({p:#x}, {v:#x})" for p, v in args.pairs()[:12])
            more = " ..." if args.count > 12 else ""
            return f"{name}([{pairs}{more}], fd={args.foreigndom:#x})"
        if isinstance(args, MmuextOpArgs):
            ops = ", ".join(f"({c}, {a:#x}, {b:#x})" for c, a, b in args.ops[:12])
            return f"{name}([{ops}], fd={args.foreigndom:#x})"
        if isinstance(args, MulticallArgs):
            calls = "; ".join(describe(c) for c in args.calls[:12])
            more = f" ... {len(args.calls)} calls" if len(args.calls) > 12 else ""
            return f"{name}[{calls}{more}]"
        return f"{name}{args.to_wire()!r}"
    return repr(item)


@dataclass
class DomainView:
    """A booted guest and the frames worth aiming at."""

    guest: Guest
    tables: list[int]
    hot: list[int]
    frames: list[int]

    @classmethod
    def of(cls, guest: Guest) -> DomainView:
        tables = [guest.l4, guest.l3, guest.l2, guest.l1]
        hot = tables + guest.data + guest.spare[-16:]
        return cls(guest, tables, hot, list(guest.dom.p2m))

    @property
    def domid(self) -> int:
        return self.guest.domid


@dataclass
class VcpuLink:
    """One vCPU's connection pair (as pvemu's server has one per vCPU) and
    the hypercall it is running, if any."""

    me: DomainView
    other: DomainView
    vcpu: int
    client: Connection
    server: Connection
    session: Session
    next_id: int = 1
    work: Work | None = None
    request: Request | None = None
    #: this vCPU's latest entry in HypercallRun.trace
    entry: list[object] = field(default_factory=list)


class HypercallRun:
    """One example: a machine with two booted domains, then requests."""

    def __init__(self, e: Entropy, machine_seed: int) -> None:
        self.e = e
        self.stats = STATS[HYPERCALL]
        self.hv = hv = Hypervisor(3, seed=machine_seed)
        self.service = HypervisorService(hv, SERVER_LIMITS)
        self.nr_frames = hv.state.frames.nr_frames
        a = DomainView.of(boot(hv, memory_mib=1, vcpus=2, mapped=8))
        b = DomainView.of(boot(hv, memory_mib=1, vcpus=2, mapped=8))
        owner = hv.state.frames.owner
        self.free = [m for m in range(self.nr_frames) if owner[m] == NO_OWNER][:8]
        self.oob = [self.nr_frames, self.nr_frames + 1, *_HUGE_MFNS]
        self.links = [self._link(me, other, v) for me, other in ((a, b), (b, a)) for v in (0, 1)]
        #: [who, request, outcome] of the latest requests; outcome "..." while running
        self.trace: deque[list[object]] = deque(maxlen=10)
        self.invalid = False
        self.requests = 0

    def _link(self, me: DomainView, other: DomainView, vcpu: int) -> VcpuLink:
        dom = me.guest.dom
        client = Connection("client")
        server = Connection("server", max_message_size=SERVER_LIMITS.message_size)
        hello: Request = (
            Hello(0, PROTOCOL_VERSION, 1, dom.nr_vcpus)
            if vcpu == 0
            else Join(0, PROTOCOL_VERSION, dom.domid, dom.secret, vcpu)
        )
        server.receive_data(client.send(hello))
        server.next_event()
        welcome = Welcome(0, dom.domid, vcpu, wire.pack_u64s(dom.p2m), dom.secret, {}, FEATURES)
        client.receive_data(server.send(welcome))
        assert client.next_event() == welcome
        return VcpuLink(me, other, vcpu, client, server, Session(dom.domid, vcpu))

    def context(self) -> str:
        lines = "\n  ".join(
            f"{who}: {describe(req)} -> {out!r}"[:600] for who, req, out in self.trace
        )
        return f"last requests (oldest first):\n  {lines}"

    def fail(self, message: str, signature: str) -> FuzzFailure:
        return FuzzFailure(f"{message}\n{self.context()}", signature)

    # -- targets --

    def frame(self, link: VcpuLink) -> int:
        e = self.e
        k = e.byte()
        if k < 110:
            return e.pick(link.me.hot)
        if k < 140:
            return e.pick(link.me.tables)
        if k < 155:
            return e.pick(link.me.frames)
        if k < 190:
            return e.pick(link.other.hot if k < 180 else link.other.tables)
        if k < 205:
            return self.hv.xen_mfn
        if k < 220:
            return e.pick(self.free)
        if k < 240:
            return e.pick(self.oob)
        return e.bits(40)

    def pte(self, link: VcpuLink, at: int | None = None) -> int:
        """A PTE value; with ``at`` (an entry's address) sometimes that
        entry's current value with one bit flipped (fast paths, A/D merges)."""
        e = self.e
        k = e.byte()
        if k >= 240:
            return e.u64()
        if at is not None and k < 48:
            try:
                return self.hv.state.memory.read_u64(at & ~7) ^ e.pick(TWEAKS)
            except (IndexError, KeyError):
                pass
        flags = e.pick(FLAG_CHOICES)
        if e.byte() >= 200:
            flags |= e.pick(EXTRA_FLAGS)
        return ((self.frame(link) << 12) & PTE_MFN_MASK) | flags

    def ptr(self, link: VcpuLink) -> int:
        e = self.e
        if e.byte() >= 245:
            return e.u64()
        return ((self.frame(link) << 12) + e.pick(SLOTS) * 8 + e.pick(MMU_CMDS)) & U64

    def va(self) -> int:
        e = self.e
        k = e.byte()
        if k < 150:
            return e.pick(VAS)
        if k < 200:
            return e.below(512) << 12
        if k < 230:
            return e.pick(VAS) + e.below(PAGE_SIZE)
        return e.u64()

    def user_va(self) -> int:
        """Mostly pages the booted L1 can map (where updates aim), so user
        accesses hit the TLB, set A/D and catch stale translations."""
        e = self.e
        k = e.byte()
        base = e.below(8) << 12 if k < 160 else e.pick(SLOTS) << 12 if k < 220 else self.va()
        return (base + e.pick((0, 0, 0, 8, 100, PAGE_SIZE - 4, PAGE_SIZE - 1))) & U64

    def foreigndom(self, link: VcpuLink, pfd: bool = False) -> int:
        """An FD (data-frame owner); for mmu_update sometimes with a PFD
        (page-table owner + 1 in bits 16-31) when the wire carries one."""
        e = self.e
        if pfd and FOREIGNDOM_MAX > U16 and e.chance(10):
            owner = e.pick((link.me.domid, link.other.domid, abi.DOMID_SELF, 999, U16 - 1))
            return ((owner + 1) << 16) | self.foreigndom(link)
        which = e.pick(FOREIGN)
        return {
            "self": abi.DOMID_SELF,
            "own": link.me.domid,
            "other": link.other.domid,
            "io": abi.DOMID_IO,
            "xen": abi.DOMID_XEN,
            "cow": abi.DOMID_COW,
            "none": 999,
            "zero": 0,
            "u16": U16,
        }[which]

    def mask(self) -> int:
        return self.e.pick((1, 0, 2, 3, U64, 1 << 63, 0x5))

    # -- requests --

    def mmuext_op(self, link: VcpuLink) -> tuple[int, int, int]:
        e = self.e
        cmd = e.pick(MMUEXT_CMDS)
        arg1 = self.frame(link) if cmd in _FRAME_CMDS and e.byte() < 230 else self.va()
        if cmd == abi.MMUEXT_NEW_USER_BASEPTR and e.chance(20):
            arg1 = 0
        if cmd == abi.MMUEXT_COPY_PAGE:
            arg2 = self.frame(link)
        elif cmd in (abi.MMUEXT_TLB_FLUSH_MULTI, abi.MMUEXT_INVLPG_MULTI):
            arg2 = self.mask()
        elif cmd == abi.MMUEXT_SET_LDT:
            arg2 = e.pick((0, 1, 8192, 8193, U64))
        else:
            arg2 = 0 if e.byte() < 200 else e.u64()
        return (cmd, arg1, arg2)

    def call(self, link: VcpuLink, depth: int, kind: str | None = None) -> Call:
        """A valid hypercall aimed at this machine's frames and addresses."""
        e = self.e
        kind = kind or e.pick(CALL_KINDS)
        if kind == "mmu":
            n = e.pick((1, 1, 2, 3, 4, 8, 16, 0, 31))
            flat = []
            for _ in range(n):
                ptr = self.ptr(link)
                flat += [ptr, self.pte(link, ptr)]
            return wire.make_call(
                abi.HYPERVISOR_mmu_update, wire.pack_u64s(flat), self.foreigndom(link, pfd=True)
            )
        if kind == "remap":
            return self.remap(link, depth)
        if kind == "ext":
            ops = tuple(self.mmuext_op(link) for _ in range(e.pick((1, 1, 2, 3, 8, 0))))
            return wire.make_call(abi.HYPERVISOR_mmuext_op, ops, self.foreigndom(link))
        if kind == "uvm":
            flags = e.below(8) | (self.mask() << 3 if e.chance(30) else 0)
            if e.chance(5):
                flags = e.u64()
            va = self.user_va() if e.flag() else self.va()
            if e.chance(25):  # the _otherdomain form (-ENOSYS where not implemented)
                op = abi.HYPERVISOR_update_va_mapping_otherdomain
                domid = self.foreigndom(link)
                return wire.make_call(op, va, self.pte(link), flags & U64, domid)
            return wire.make_call(abi.HYPERVISOR_update_va_mapping, va, self.pte(link), flags & U64)
        if kind == "assist":
            cmd = e.pick((abi.VMASST_CMD_enable, abi.VMASST_CMD_disable, 2, U32))
            typ = e.pick(
                (abi.VMASST_TYPE_writable_pagetables, abi.VMASST_TYPE_m2p_strict, 0, 1, U32)
            )
            return wire.make_call(abi.HYPERVISOR_vm_assist, cmd, typ)
        if kind == "multicall" and depth < 2:
            calls = tuple(self.call(link, depth + 1) for _ in range(e.pick((2, 1, 3, 4, 8, 0))))
            return Call(abi.HYPERVISOR_multicall, MulticallArgs(calls))
        return wire.make_call(unknown_op(e), *(e.u64() for _ in range(e.below(7))))

    def remap(self, link: VcpuLink, depth: int) -> Call:
        """What a guest does all the time: (re)link its tree and map data
        pages, in any order, NORMAL or PRESERVE_AD; sometimes reload CR3.
        Without it the first unlink leaves every user access faulting."""
        e = self.e
        g = link.me.guest
        cmd = e.pick((abi.MMU_NORMAL_PT_UPDATE, abi.MMU_PT_UPDATE_PRESERVE_AD))
        pairs = [
            (maddr_of_entry(g.l4, 0), make_pte(g.l3, USER_RW)),
            (maddr_of_entry(g.l3, 0), make_pte(g.l2, USER_RW)),
            (maddr_of_entry(g.l2, 0), make_pte(g.l1, USER_RW)),
        ]
        for _ in range(e.pick((2, 1, 4, 8))):
            i = e.below(len(g.data))
            flags = e.pick((USER_RW, USER_RW, _PAGE_PRESENT | _PAGE_USER, USER_RW | _PAGE_NX))
            pairs.append((maddr_of_entry(g.l1, i), make_pte(e.pick(g.data), flags)))
        order = sorted(range(len(pairs)), key=lambda _: e.byte())
        flat = [v for i in order for v in (pairs[i][0] | cmd, pairs[i][1])]
        update = wire.make_call(abi.HYPERVISOR_mmu_update, wire.pack_u64s(flat))
        if depth or not e.chance(30):
            return update
        reload = wire.make_call(abi.HYPERVISOR_mmuext_op, [(abi.MMUEXT_NEW_BASEPTR, g.l4, 0)])
        return Call(abi.HYPERVISOR_multicall, MulticallArgs((update, reload)))

    def big(self, link: VcpuLink) -> Call:
        """A batch near the wire limits, filled by a PRNG seeded from the blob."""
        rng = random.Random(self.e.bits(32))
        me = link.me
        if self.e.flag():
            n = rng.randint(257, wire.MAX_MULTICALL_CALLS)
            calls = []
            for _ in range(n):
                if rng.random() < 0.8:
                    op = rng.randrange(43, 1 << 32)
                    calls.append(Call(op, RawArgs((rng.getrandbits(64),))))
                else:
                    args = VmAssistArgs(rng.choice((0, 1)), abi.VMASST_TYPE_m2p_strict)
                    calls.append(Call(abi.HYPERVISOR_vm_assist, args))
            return Call(abi.HYPERVISOR_multicall, MulticallArgs(tuple(calls)))
        n = rng.randint(256, 2048)
        flat: list[int] = []
        for _ in range(n):
            slot = rng.randrange(512)
            target = rng.choice(me.hot)
            flat += [
                (rng.choice(me.hot) << 12) | slot << 3 | rng.choice((0, 2)),
                (target << 12) | 0x67,
            ]
        return wire.make_call(abi.HYPERVISOR_mmu_update, wire.pack_u64s(flat), abi.DOMID_SELF)

    def accesses(self, link: VcpuLink) -> tuple[Access, ...]:
        e = self.e
        out = []
        for _ in range(e.pick((1, 2, 3, 8))):
            kind = e.pick(("r", "w", "x"))
            length = (
                e.pick((1, 8, 64, PAGE_SIZE, 4095, 2)) if e.byte() < 220 else e.int_range(1, 4096)
            )
            va = self.user_va()
            data: bytes | int = e.blob(length) if kind == "w" else length
            out.append(Access(va & U64, kind, data))
        return tuple(out)

    def invalid_request(self, link: VcpuLink, rid: int) -> Request:
        """A request the wire types must refuse to build (LocalProtocolError)."""
        e = self.e
        self.invalid = True
        k = e.below(14)
        if k == 0:
            return Hypercall(rid, 1, MmuUpdateArgs(b"\0" * e.pick((1, 8, 17, 24)), abi.DOMID_SELF))
        if k == 1:
            return Hypercall.make(rid, e.pick((1, 26)), b"", e.pick((1 << 32, -1)))
        if k == 2:
            return Hypercall.make(rid, 26, [(e.pick((U32 + 1, -1)), 0, 0)])
        if k == 3:
            return Hypercall.make(rid, 26, [(0, 0)])
        if k == 4:
            return Hypercall.make(rid, 14, 0, e.pick((U64 + 1, -1)), 0)
        if k == 5:
            return Hypercall.make(rid, 21, U32 + 1, 2)
        if k == 6:
            return Hypercall.make(rid, unknown_op(e), *([0] * 7))
        if k == 7:
            return Hypercall.make(rid, unknown_op(e), -1)
        if k == 8:
            inner = Call(13, MulticallArgs((Call(13, MulticallArgs(())),)))
            return Hypercall(rid, 13, MulticallArgs((inner,)))
        if k == 9:
            return Hypercall(rid, 1, RawArgs((1, 2)))
        if k == 10:
            return Ptwr(rid, e.pick((U64 + 1, -1)), 0)
        if k == 11:
            return Ptwr(rid, 0, 0, 1)  # type: ignore[arg-type]
        if k == 12:
            bad = e.pick(
                (Access(0, "r", 0), Access(0, "q", 1), Access(0, "x", 4097), Access(0, "w", b""))
            )
            return RunUser(rid, (bad,))
        return Stats(e.pick((-1, 1 << 63)))

    def request(self, link: VcpuLink, rid: int) -> Request:
        e = self.e
        kind = e.pick(HC_KINDS)
        if kind == "ptwr":
            maddr = (self.frame(link) << 12) + e.pick(SLOTS) * 8
            if e.chance(5):
                maddr += e.below(8)
            return Ptwr(rid, maddr & U64, self.pte(link, maddr), e.flag())
        if kind == "user":
            return RunUser(rid, self.accesses(link))
        if kind == "stats":
            return Audit(rid) if e.chance(15) else Stats(rid)
        if kind == "invalid":
            return self.invalid_request(link, rid)
        call = self.big(link) if kind == "big" else self.call(link, 0, kind)
        return Hypercall(rid, call.op, call.args)

    # -- running them as pvemu's server does --

    def issue(self, link: VcpuLink) -> None:
        rid = link.next_id
        link.next_id += 1
        _count(HYPERCALL)
        self.requests += 1
        self.invalid = False
        try:
            request = self.request(link, rid)
        except LocalProtocolError as exc:
            if not self.invalid:
                raise self.fail(
                    f"a valid request was refused: {exc!r}", "valid request refused"
                ) from exc
            self.stats["refused at construction"] += 1
            self.trace.append([f"dom{link.me.domid}.{link.vcpu}", "invalid", exc])
            return
        except Exception as exc:
            raise _escaped("building a wire request", exc, self.context()) from exc
        if self.invalid:
            raise self.fail(
                f"the wire types accepted {request!r}", f"accepted invalid {type(request).__name__}"
            )
        try:
            link.server.receive_data(link.client.send(request))
            decoded = link.server.next_event()
            after = link.server.next_event()
        except Exception as exc:
            raise _escaped(
                "wire round trip of a request", exc, f"{request!r}\n{self.context()}"
            ) from exc
        if decoded != request or after is not NEED_DATA:
            raise self.fail(f"sent {request!r}, server decoded {decoded!r}", "request round trip")
        link.entry = [f"dom{link.me.domid}.{link.vcpu}", request, "..."]
        self.trace.append(link.entry)
        link.work = self.service.begin(link.session, request)
        link.request = request
        self.step(link, self.e.pick(BUDGETS))

    def step(self, link: VcpuLink, budget: int | None) -> None:
        """Serve a slice of the request as pvemu's server does (through the
        hypervisor service); an INTERNAL reply is a crash."""
        work, request = link.work, link.request
        assert work is not None
        assert request is not None
        if not work.step(budget):
            self.stats["preempted slices"] += 1
            return
        link.work = link.request = None
        reply = work.reply
        assert reply is not None
        if work.error is not None:
            raise _escaped(
                f"INTERNAL: {type(request).__name__}", work.error, f"{request!r}\n{self.context()}"
            ) from work.error
        if isinstance(reply, ErrorReply):
            self.stats[f"{reply.code} replies"] += 1
        elif isinstance(reply, Result):
            assert isinstance(request, Hypercall)
            self.check_result(request, reply.rc, reply.done, ())
        elif isinstance(reply, MulticallResult):
            assert isinstance(request, Hypercall)
            self.check_result(request, reply.rc, 0, reply.results)
        self.finish(link, request, reply)

    def check_result(
        self, request: Hypercall, rc: int, done: int, results: tuple[int, ...]
    ) -> None:
        """Xen's return conventions (a well-formed reply is also a sane one)."""
        self.stats["rc=0" if rc == 0 else f"rc={abi.errno_name(rc)}"] += 1
        args = request.args
        ok = rc == 0 or (rc < 0 and -rc in ERRNOS)
        if isinstance(args, MmuUpdateArgs | MmuextOpArgs):
            count = args.count if isinstance(args, MmuUpdateArgs) else len(args.ops)
            ok = (
                ok
                and 0 <= done <= count
                and (done == count if rc == 0 else done < count or count == 0)
            )
        elif isinstance(args, MulticallArgs):
            ok = ok and rc == 0 and len(results) == len(args.calls)
            for sub, res in zip(args.calls, results, strict=False):
                if sub.op == abi.HYPERVISOR_multicall:
                    ok = ok and res == -abi.EINVAL
                elif sub.op not in KNOWN_OPS:
                    ok = ok and res == -abi.ENOSYS
                else:
                    ok = ok and (res == 0 or (res < 0 and -res in ERRNOS))
        elif isinstance(args, RawArgs):
            ok = ok and rc == -abi.ENOSYS and done == 0
        else:
            ok = ok and done == 0
        if not ok:
            raise self.fail(
                f"{request!r} returned rc={rc} done={done} results={results}", "bad result"
            )

    def finish(self, link: VcpuLink, request: Request, reply: Reply) -> None:
        """Send the reply through the server Connection; the client must
        decode it back, equal."""
        if isinstance(reply, PtwrResult):
            assert isinstance(request, Ptwr)
            if (
                reply.rc > 0
                or (reply.rc and -reply.rc not in ERRNOS)
                or (reply.old and not request.exchange)
            ):
                raise self.fail(f"{request!r} -> {reply!r}", "bad ptwr result")
        elif isinstance(reply, UserResult):
            assert isinstance(request, RunUser)
            n = len(request.accesses)
            reads = sum(1 for a in request.accesses[: reply.executed] if a.kind == "r")
            if (reply.fault is None) != (reply.executed == n) or len(reply.reads) != reads:
                raise self.fail(f"{request!r} -> {reply!r}", "bad user result")
        elif isinstance(reply, AuditResult) and reply.violations:
            raise self.fail(f"audit mid-run: {reply.violations[:5]}", "audit violation mid-run")
        link.entry[2] = reply
        try:
            data = link.server.send(reply)
            link.client.receive_data(data)
            decoded = link.client.next_event()
            after = link.client.next_event()
        except Exception as exc:
            raise _escaped(
                "wire round trip of a reply", exc, f"{reply!r}\n{self.context()}"
            ) from exc
        if decoded != reply or after is not NEED_DATA:
            raise self.fail(f"sent {reply!r}, client decoded {decoded!r}", "reply round trip")

    def check_machine(self, when: str) -> None:
        hv = self.hv
        problems = hv.audit()
        if problems:
            raise self.fail(f"audit {when}: {problems[:8]}", f"audit violation {when}")
        owner = hv.state.frames.owner
        owned = self.nr_frames - owner.count(NO_OWNER)
        expected = 1 + sum(len(d.p2m) for d in hv.domains.values())
        free = hv.state.memory.free_frames
        if owned != expected or owned + free != self.nr_frames:
            raise self.fail(
                f"{when}: {owned} frames owned, {expected} expected, "
                f"{free} free of {self.nr_frames}",
                "frames lost",
            )

    def run(self, count: int) -> None:
        e = self.e
        while self.requests < count:
            link = self.links[e.below(4)]
            if link.work is not None:
                self.step(link, e.pick(BUDGETS))
            else:
                self.issue(link)
        self.check_machine("after the requests")
        # Guests hang up one domain at a time; a call still running is
        # finished or abandoned (as when its connection drops mid-batch).
        order = [0, 2] if not e.flag() else [2, 0]
        for first in order:
            for link in self.links[first : first + 2]:
                if link.work is not None and e.flag():
                    link.work.abandon()
                    link.work = link.request = None
                    self.stats["abandoned"] += 1
                while link.work is not None:
                    self.step(link, None)
            self.hv.destroy_domain(self.links[first].me.domid)
            self.check_machine(f"after destroying dom{self.links[first].me.domid}")
        if self.hv.state.memory.free_frames != self.nr_frames - 1:
            raise self.fail("frames missing after every domain died", "frames lost")


def run_hypercalls(count: int, blob: bytes, machine_seed: int) -> None:
    HypercallRun(Entropy(blob), machine_seed).run(count)
    if COUNTING:
        STATS[HYPERCALL]["examples"] += 1


def hypercall_fuzzer(
    profile: str | settings = SUITE_PROFILE, seed: int | None = None
) -> Callable[[], None]:
    """The hypercall-argument fuzz target under ``profile``."""

    @settings(_profile(profile))
    @given(
        count=st.integers(1, HC_MAX_REQUESTS),
        blob=st.binary(min_size=256, max_size=4096),
        machine_seed=st.integers(0, 3),
    )
    def fuzz_hypercalls(count: int, blob: bytes, machine_seed: int) -> None:
        with _example():
            run_hypercalls(count, blob, machine_seed)

    return _counted(fuzz_hypercalls if seed is None else hypothesis_seed(seed)(fuzz_hypercalls))


FUZZERS: Final[dict[str, tuple[Callable[..., Callable[[], None]], str]]] = {
    WIRE: (wire_fuzzer, "messages"),
    HYPERCALL: (hypercall_fuzzer, "requests"),
}


# --- the long runner (make fuzz) ---------------------------------------------------------


@dataclass
class Campaign:
    """What one fuzzer did under the runner."""

    name: str
    unit: str
    processed: int = 0
    examples: int = 0
    runs: int = 0
    seconds: float = 0.0
    #: signature -> runs that failed with it (hypothesis-reported failures)
    crashes: dict[str, int] = field(default_factory=dict)
    #: KNOWN_BUGS signature -> times it fired (recorded, the run went on)
    known: dict[str, int] = field(default_factory=dict)

    @property
    def distinct_crashes(self) -> int:
        return len(self.crashes) + len(self.known)


def _failures(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _failures(sub)]
    return [exc]


def signature_of(exc: BaseException) -> str:
    if isinstance(exc, FuzzFailure):
        return exc.signature
    return f"{type(exc).__name__} at {_origin(exc)}"


def run_campaign(
    name: str,
    min_count: int,
    *,
    seed: int,
    shrink: bool = True,
    max_seconds: float = math.inf,
    report: Callable[[str], None] = print,
) -> Campaign:
    """Run fuzzer ``name`` with fresh seeds until ``min_count`` inputs.

    Each hypothesis run is sized from the inputs per example seen so far. A
    failing run is recorded (its falsifying example printed once per distinct
    signature); later runs skip shrinking once a crash has been shrunk. Hits
    of KNOWN_BUGS count as crashes too, reported once with their first context.
    """
    factory, unit = FUZZERS[name]
    campaign = Campaign(name, unit)
    start_count, start_examples = COUNTS[name], STATS[name]["examples"]
    known_before = {sig: hits for sig, (hits, _) in KNOWN_HITS.items()}
    started = time.perf_counter()
    while COUNTS[name] - start_count < min_count and time.perf_counter() - started < max_seconds:
        done = COUNTS[name] - start_count
        examples = STATS[name]["examples"] - start_examples
        per_example = done / examples if examples else 100.0
        wanted = math.ceil((min_count - done) / max(per_example, 1.0))
        batch = max(5, min(wanted + 1, 2000 if examples else 20))
        phases = [Phase.explicit, Phase.generate]
        if shrink and not campaign.crashes:
            phases.append(Phase.shrink)
        profile = settings(settings.get_profile(LONG_PROFILE), max_examples=batch, phases=phases)
        test = factory(profile, seed=seed + campaign.runs)
        campaign.runs += 1
        try:
            test()
        except Exception as exc:
            for failure in _failures(exc):
                sig = signature_of(failure)
                if sig not in campaign.crashes:
                    notes = "\n".join(getattr(failure, "__notes__", []))
                    report(
                        f"[{name}] crash {len(campaign.crashes) + 1}: {sig}\n"
                        f"{type(failure).__name__}: {failure}\n{notes}"
                    )
                campaign.crashes[sig] = campaign.crashes.get(sig, 0) + 1
        for sig, (hits, first) in KNOWN_HITS.items():
            new = hits - known_before.get(sig, 0)
            if sig.startswith(f"{name}:") and new > 0:
                if sig not in campaign.known:
                    context = first if len(first) < 4000 else first[:4000] + " ..."
                    report(f"[{name}] known bug: {sig}\n{KNOWN_BUGS[sig]}\nfirst hit: {context}")
                campaign.known[sig] = new
    campaign.processed = COUNTS[name] - start_count
    campaign.examples = STATS[name]["examples"] - start_examples
    campaign.seconds = time.perf_counter() - started
    return campaign


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tests.fuzzers``: the long fuzz campaign (``make fuzz``)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    parser = argparse.ArgumentParser(
        prog="python -m tests.fuzzers",
        description=(
            "Run pvemu's hypothesis fuzzers long: the wire decoder (streams of valid, "
            "mutated and hostile msgpack fed to shared.wire.Connection as server and "
            "client) and hypercall arguments (targeted mmu_update/mmuext_op/"
            "update_va_mapping/multicall/ptwr/run_user requests against an in-process "
            "hypervisor with two domains, through the wire types, sliced). Each fuzzer "
            "runs hypothesis with fresh seeds until it has processed --min-count "
            "messages/requests, then a table shows counts, crashes, time and rate. "
            "Exit status 1 if any crash was found."
        ),
    )
    parser.add_argument(
        "--min-count",
        type=int,
        default=1_000_000,
        help="messages (wire) / requests (hypercall) each fuzzer must process (default 1000000)",
    )
    parser.add_argument(
        "--fuzzers",
        default=",".join(FUZZERS),
        help=f"comma-separated subset of {', '.join(FUZZERS)} (default: all)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="first hypothesis seed (default: random); run i uses seed+i",
    )
    parser.add_argument(
        "--no-shrink",
        action="store_true",
        help="report failures unshrunk (faster, bigger examples)",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=math.inf,
        help="stop a fuzzer after this long even below --min-count",
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.fuzzers.split(",") if n.strip()]
    unknown = [n for n in names if n not in FUZZERS]
    if unknown or args.min_count < 1:
        parser.error(f"unknown fuzzers {unknown}" if unknown else "--min-count must be positive")
    base_seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    console = Console()
    if not console.is_terminal:  # a log file or a pipe: no 80-column wrapping
        console = Console(width=120)
    console.print(f"fuzzing {', '.join(names)}: at least {args.min_count:,} each, seed {base_seed}")
    campaigns: list[Campaign] = []
    global PROGRESS_HOOK
    with Progress(
        TextColumn("[bold]{task.description:<9}"),
        BarColumn(bar_width=20),
        TextColumn("{task.completed:>9,.0f} {task.fields[unit]:<8}"),
        TextColumn("{task.fields[rate]:>6}/s  crashes {task.fields[crashes]}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        for name in names:
            unit = FUZZERS[name][1]
            task = progress.add_task(name, total=args.min_count, unit=unit, rate="-", crashes=0)
            begin, t0 = COUNTS[name], time.perf_counter()
            crashes: list[str] = []

            def hook(
                name: str = name, task: Any = task, begin: int = begin, t0: float = t0
            ) -> None:
                done = COUNTS[name] - begin
                rate = done / max(time.perf_counter() - t0, 1e-9)
                progress.update(task, completed=min(done, args.min_count), rate=f"{rate:,.0f}")

            def report(text: str, crashes: list[str] = crashes, task: Any = task) -> None:
                crashes.append(text)
                progress.update(task, crashes=len(crashes))
                progress.console.print(text, markup=False, highlight=False)

            PROGRESS_HOOK = hook
            try:
                campaigns.append(
                    run_campaign(
                        name,
                        args.min_count,
                        seed=base_seed,
                        shrink=not args.no_shrink,
                        max_seconds=args.max_seconds,
                        report=report,
                    )
                )
            finally:
                PROGRESS_HOOK = None
            hook()
    table = Table(title=f"pvemu fuzzing (seed {base_seed})")
    for column in ("fuzzer", "processed", "unit", "crashes", "time", "rate", "examples", "runs"):
        table.add_column(column, justify="left" if column in ("fuzzer", "unit") else "right")
    for c in campaigns:
        table.add_row(
            c.name,
            f"{c.processed:,}",
            c.unit,
            str(c.distinct_crashes),
            f"{c.seconds:,.1f} s",
            f"{c.processed / max(c.seconds, 1e-9):,.0f}/s",
            f"{c.examples:,}",
            str(c.runs),
        )
    console.print(table)
    for c in campaigns:
        top = ", ".join(f"{k} {v:,}" for k, v in STATS[c.name].most_common(12) if k != "examples")
        console.print(f"[bold]{c.name}[/bold] outcomes: {top}", highlight=False)
        for sig, times in c.crashes.items():
            console.print(f"  crash: {sig} (failed {times} run(s))", markup=False, highlight=False)
        for sig, hits in c.known.items():
            console.print(f"  known bug: {sig} (hit {hits:,} times)", markup=False, highlight=False)
    return 1 if any(c.distinct_crashes for c in campaigns) else 0


if __name__ == "__main__":
    sys.exit(main())
