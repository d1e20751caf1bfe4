"""Wire messages built from entropy: valid requests and replies of every
shape, the reply types a request allows, arbitrary msgpack values and
headers declaring huge lengths. The wire fuzzer feeds them; the hypercall
fuzzer shares the hypercall-number and foreigndom helpers."""

from __future__ import annotations

import dataclasses
from typing import Any, Final

import msgpack

from pvemu.shared import abi, wire
from pvemu.shared.errors import LocalProtocolError, WireErrorCode
from pvemu.shared.wire import (
    PROTOCOL_VERSION,
    Access,
    Audit,
    AuditResult,
    Bye,
    Call,
    ErrorReply,
    Fault,
    Goodbye,
    Hello,
    Hypercall,
    Join,
    KernelWrite,
    KernelWriteResult,
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
from tests.fuzz.entropy import U16, U32, Entropy

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
        return RunUser(rid, tuple(accesses), e.chance(30))
    if k == 3:
        if e.chance(25):  # an atomic clear of PTE bits: val must be 0
            return Ptwr(rid, e.u64(), 0, e.flag(), e.u64())
        return Ptwr(rid, e.u64(), e.u64(), e.flag())
    if k == 4:
        if e.chance(50):
            maddr = e.u64()
            room = wire.MAX_KERNEL_WRITE_LEN - maddr % wire.MAX_KERNEL_WRITE_LEN
            return KernelWrite(rid, maddr, e.blob(e.int_range(1, room)))
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
    if cls is KernelWriteResult:
        return KernelWriteResult(rid, e.s64())
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
        limits = {e.text(wire.MAX_NAME_LEN, 1): e.u64() for _ in range(e.below(4))}
        features = tuple(e.u32() for _ in range(e.pick((1, 0, 2, wire.MAX_FEATURES))))
        return Welcome(
            rid,
            e.int_range(0, U16),
            e.int_range(0, wire.MAX_VCPUS - 1),
            e.int_range(1, wire.MAX_DOMAIN_FRAMES),
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
        KernelWrite: KernelWriteResult,
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
