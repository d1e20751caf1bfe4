"""The guest <-> hypervisor wire protocol, sans I/O (h11 style).

One msgpack map per message on a stream socket; msgpack is self-delimiting, so
there is no length prefix. Every map has ``"t"`` (the message type) and
``"id"`` (the request id, echoed by the reply). ``docs/protocol.md`` documents
every message, field, limit and error; this module is the executable form.

* Messages are frozen, slotted dataclasses validated on construction (so we
  never send anything the peer would reject) and on decode.
* :class:`Connection` turns bytes into messages (:meth:`Connection.receive_data`,
  :meth:`Connection.next_event`) and messages into bytes
  (:meth:`Connection.send`), and tracks the hello/welcome/bye state machine and
  the outstanding request ids. It never touches a socket; no trio here.
* Bad input raises :class:`~shared.errors.RemoteProtocolError` (with a ``code``
  and ``fatal``); API misuse raises :class:`~shared.errors.LocalProtocolError`.
  Nothing else escapes for any input bytes.

``mmu_update`` batches and the p2m list travel as ONE ``bin`` blob of
little-endian u64s (``struct mmu_update[]`` layout for the former), packed and
parsed with :mod:`array`, never per record.
"""

from __future__ import annotations

import enum
import sys
from array import array
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal, NamedTuple, NoReturn, Self, TypeVar

import msgpack

from pvemu.shared.abi import (
    DOMID_SELF,
    HYPERVISOR_mmu_update,
    HYPERVISOR_mmuext_op,
    HYPERVISOR_multicall,
    HYPERVISOR_update_va_mapping,
    HYPERVISOR_update_va_mapping_otherdomain,
    HYPERVISOR_vm_assist,
)
from pvemu.shared.errors import LocalProtocolError, RemoteProtocolError, WireErrorCode

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

__all__ = [
    # constants and limits
    "PROTOCOL_VERSION",
    "MAX_MESSAGE_SIZE",
    "DEFAULT_MESSAGE_SIZE",
    "MAX_BIN_LEN",
    "MAX_STR_LEN",
    "MAX_ARRAY_LEN",
    "MAX_MAP_LEN",
    "MAX_EXT_LEN",
    "MAX_REQUEST_ID",
    "MAX_NAME_LEN",
    "MAX_TEXT_LEN",
    "MAX_MEMORY_MIB",
    "MAX_P2M_ENTRIES",
    "MAX_VCPUS",
    "SECRET_LEN",
    "MAX_MMU_UPDATES",
    "MMU_UPDATE_SIZE",
    "MAX_MMUEXT_OPS",
    "MAX_MULTICALL_CALLS",
    "MAX_MULTICALL_DEPTH",
    "MAX_HYPERCALL_ARGS",
    "MAX_USER_ACCESSES",
    "MAX_ACCESS_LEN",
    "MAX_FEATURES",
    "MAX_LIMITS",
    "MAX_STATS_DEPTH",
    "MAX_VIOLATIONS",
    # blob helpers
    "pack_u64s",
    "unpack_u64s",
    "u64_view",
    "pack_mmu_updates",
    "unpack_mmu_updates",
    # hypercall arguments
    "MmuUpdateArgs",
    "MmuextOpArgs",
    "UpdateVaMappingArgs",
    "UpdateVaMappingOtherdomainArgs",
    "VmAssistArgs",
    "MulticallArgs",
    "RawArgs",
    "HypercallArgs",
    "Call",
    "make_call",
    # messages
    "Message",
    "Request",
    "Reply",
    "Access",
    "Fault",
    "Hello",
    "Join",
    "Hypercall",
    "Ptwr",
    "RunUser",
    "Stats",
    "Audit",
    "Bye",
    "Welcome",
    "Result",
    "MulticallResult",
    "PtwrResult",
    "UserResult",
    "StatsResult",
    "AuditResult",
    "ErrorReply",
    "Goodbye",
    "REQUEST_TYPES",
    "REPLY_TYPES",
    # connection
    "Role",
    "State",
    "Sentinel",
    "NEED_DATA",
    "CONNECTION_CLOSED",
    "Connection",
]

# --- version and limits ------------------------------------------------------------

#: Sent in Hello/Join; any other value is answered with a "version" error.
PROTOCOL_VERSION: Final = 1

#: Bytes per mmu_update record: two little-endian u64s (ptr, val).
MMU_UPDATE_SIZE: Final = 16
#: Records in one mmu_update blob: the protocol's ceiling (16 MiB). A server
#: may enforce less (``pvemu hypervisor --max-batch``; Welcome.limits says).
MAX_MMU_UPDATES: Final = 1 << 20
#: Largest ``bin`` the decoder accepts: an mmu_update blob at the ceiling.
#: Each field has its own, smaller limit (the p2m blob, a user write).
MAX_BIN_LEN: Final = MAX_MMU_UPDATES * MMU_UPDATE_SIZE
#: Largest encoded message (bytes), in either direction: the ceiling of
#: ``Connection(max_message_size=...)`` and its default.
MAX_MESSAGE_SIZE: Final = MAX_BIN_LEN + 1024 * 1024
#: The message size a server enforces unless its batch limit needs more: room
#: for every request that carries no mmu_update blob (a run_user full of
#: writes is 2 MiB).
DEFAULT_MESSAGE_SIZE: Final = 4 * 1024 * 1024
#: Largest ``str`` the decoder accepts, in UTF-8 bytes (4 x MAX_TEXT_LEN).
MAX_STR_LEN: Final = 4096
#: Largest array (mmuext ops, multicall calls, user accesses, ...).
MAX_ARRAY_LEN: Final = 4096
#: Largest map (message maps, limits, each level of stats).
MAX_MAP_LEN: Final = 256
#: Largest ext payload; ext types are never valid, they are rejected as bad_type.
MAX_EXT_LEN: Final = 16

#: Request ids are ints 0 .. 2**63 - 1.
MAX_REQUEST_ID: Final = (1 << 63) - 1
#: Domain name, stats/limits keys, error codes: at most this many characters.
MAX_NAME_LEN: Final = 64
#: Error messages and audit violations: at most this many characters.
MAX_TEXT_LEN: Final = 1024
#: Hello.memory_mib is 1 .. MAX_MEMORY_MIB.
MAX_MEMORY_MIB: Final = 1024
#: 4 KiB frames in MAX_MEMORY_MIB: the p2m blob is at most 8 x this (2 MiB).
MAX_P2M_ENTRIES: Final = MAX_MEMORY_MIB * 256
#: Hello.vcpus is 1 .. MAX_VCPUS; vCPU indexes are 0 .. MAX_VCPUS - 1.
MAX_VCPUS: Final = 64
#: The domain secret (Welcome, Join) is exactly this many bytes.
SECRET_LEN: Final = 16
#: Entries in one mmuext_op list.
MAX_MMUEXT_OPS: Final = 4096
#: Calls in one multicall (per nesting level).
MAX_MULTICALL_CALLS: Final = 1024
#: A multicall may contain a multicall (answered -EINVAL), no deeper.
MAX_MULTICALL_DEPTH: Final = 2
#: Arguments of an unknown hypercall (Xen hypercalls take at most six).
MAX_HYPERCALL_ARGS: Final = 6
#: Accesses in one run_user request (and reads in its result).
MAX_USER_ACCESSES: Final = 512
#: Bytes in one user access (read length or write data).
MAX_ACCESS_LEN: Final = 4096
#: Feature numbers in a Welcome.
MAX_FEATURES: Final = 64
#: Entries in Welcome.limits.
MAX_LIMITS: Final = 64
#: Nesting of stats maps (the top-level map is depth 1).
MAX_STATS_DEPTH: Final = 4
#: Violations in one audit result.
MAX_VIOLATIONS: Final = 512

_U16: Final = 0xFFFF
_U32: Final = 0xFFFF_FFFF
_U64: Final = (1 << 64) - 1
_S64_MIN: Final = -(1 << 63)
_S64_MAX: Final = (1 << 63) - 1

_MALFORMED: Final = WireErrorCode.MALFORMED
_TOO_LARGE: Final = WireErrorCode.TOO_LARGE
_BAD_TYPE: Final = WireErrorCode.BAD_TYPE
_OUT_OF_RANGE: Final = WireErrorCode.OUT_OF_RANGE

# --- validation helpers (raise LocalProtocolError; the decoder converts) -----------


def _fail(code: str, message: str) -> NoReturn:
    raise LocalProtocolError(message, code=code)


def _tname(value: object) -> str:
    return "nil" if value is None else type(value).__name__


def _int(value: object, name: str, lo: int, hi: int, code: str = _BAD_TYPE) -> int:
    """``value`` must be exactly an int (not bool) in ``lo..hi``."""
    if type(value) is not int:
        _fail(_BAD_TYPE, f"{name} must be an int, not {_tname(value)}")
    if value < lo or value > hi:
        _fail(code, f"{name}={value} is outside {lo}..{hi}")
    return value


def _length(value: object, name: str, hi: int) -> int:
    """A length: an int, 0 is out_of_range, above ``hi`` is too_large."""
    if type(value) is not int:
        _fail(_BAD_TYPE, f"{name} must be an int, not {_tname(value)}")
    if value < 1:
        _fail(_OUT_OF_RANGE, f"{name}={value} must be at least 1")
    if value > hi:
        _fail(_TOO_LARGE, f"{name}={value} is over the limit of {hi}")
    return value


def _request_id(value: object, name: str = "id") -> int:
    return _int(value, name, 0, MAX_REQUEST_ID)


def _bytes(value: object, name: str, max_len: int, *, multiple: int = 1) -> bytes:
    if type(value) is not bytes:
        _fail(_BAD_TYPE, f"{name} must be bytes (msgpack bin), not {_tname(value)}")
    if len(value) > max_len:
        _fail(_TOO_LARGE, f"{name} is {len(value)} bytes, over the limit of {max_len}")
    if len(value) % multiple:
        _fail(_BAD_TYPE, f"{name} is {len(value)} bytes, not a multiple of {multiple}")
    return value


def _str(value: object, name: str, max_len: int, *, min_len: int = 0) -> str:
    if type(value) is not str:
        _fail(_BAD_TYPE, f"{name} must be a str, not {_tname(value)}")
    if len(value) > max_len:
        _fail(_TOO_LARGE, f"{name} is {len(value)} characters, over the limit of {max_len}")
    if len(value) < min_len:
        _fail(_BAD_TYPE, f"{name} must not be empty")
    return value


def _tuple(value: object, name: str, max_len: int) -> tuple[object, ...]:
    if type(value) is not tuple:
        _fail(_BAD_TYPE, f"{name} must be a tuple (msgpack array), not {_tname(value)}")
    if len(value) > max_len:
        _fail(_TOO_LARGE, f"{name} has {len(value)} items, over the limit of {max_len}")
    return value


def _shape(value: object, name: str, arity: int) -> tuple[object, ...]:
    """A tuple of exactly ``arity`` items (a fixed-shape record)."""
    if not isinstance(value, tuple):
        _fail(_BAD_TYPE, f"{name} must be a tuple (msgpack array), not {_tname(value)}")
    if len(value) != arity:
        _fail(_BAD_TYPE, f"{name} must have {arity} items, not {len(value)}")
    return value


def _dict(value: object, name: str, max_len: int) -> dict[object, object]:
    if type(value) is not dict:
        _fail(_BAD_TYPE, f"{name} must be a dict (msgpack map), not {_tname(value)}")
    if len(value) > max_len:
        _fail(_TOO_LARGE, f"{name} has {len(value)} entries, over the limit of {max_len}")
    return value


def _stats(value: object, name: str, depth: int) -> None:
    """Nested str-keyed maps whose leaves are ints (int64 or uint64)."""
    if depth > MAX_STATS_DEPTH:
        _fail(_TOO_LARGE, f"{name} nests deeper than {MAX_STATS_DEPTH} levels")
    for key, item in _dict(value, name, MAX_MAP_LEN).items():
        key = _str(key, f"{name} key", MAX_NAME_LEN, min_len=1)
        if type(item) is dict:
            _stats(item, f"{name}[{key!r}]", depth + 1)
        else:
            _int(item, f"{name}[{key!r}]", _S64_MIN, _U64)


class _Validated:
    """Mixin: dataclasses call ``_validate`` after ``__init__``."""

    __slots__ = ()

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        raise NotImplementedError


# --- little-endian u64 blobs --------------------------------------------------------

_BIG_ENDIAN: Final = sys.byteorder == "big"


def pack_u64s(values: Iterable[int]) -> bytes:
    """Pack ints as consecutive little-endian u64s (e.g. a p2m list).

    Raises:
        OverflowError: a value is outside 0 .. 2**64 - 1.
        TypeError: a value is not an int.
    """
    arr = array("Q", values)
    if _BIG_ENDIAN:  # pragma: no cover - x86-64 and arm64 are little-endian
        arr.byteswap()
    return arr.tobytes()


def unpack_u64s(blob: bytes) -> array[int]:
    """Parse a blob of little-endian u64s into an ``array('Q')`` (no copy per item).

    Raises:
        ValueError: the length is not a multiple of 8.
    """
    if len(blob) % 8:
        raise ValueError(f"blob of {len(blob)} bytes is not a whole number of u64s")
    arr = array("Q")
    arr.frombytes(blob)
    if _BIG_ENDIAN:  # pragma: no cover
        arr.byteswap()
    return arr


def u64_view(blob: bytes) -> Sequence[int]:
    """The blob's little-endian u64s without copying them (a ``memoryview``
    cast on a little-endian host): a million-record batch is not copied a
    second time before the hypervisor reads it.

    Raises:
        ValueError: the length is not a multiple of 8.
    """
    if len(blob) % 8:
        raise ValueError(f"blob of {len(blob)} bytes is not a whole number of u64s")
    if _BIG_ENDIAN:  # pragma: no cover
        return unpack_u64s(blob)
    return memoryview(blob).cast("Q")


def pack_mmu_updates(reqs: Iterable[tuple[int, int]]) -> bytes:
    """Pack ``(ptr, val)`` pairs in Xen's ``struct mmu_update[]`` layout.

    Each record is 16 bytes: ``ptr`` then ``val``, both little-endian u64; the
    command (``MMU_NORMAL_PT_UPDATE``, ...) sits in ``ptr``'s low 3 bits.

    Raises:
        OverflowError: a value is outside 0 .. 2**64 - 1.
        TypeError / ValueError: an item is not an int pair.
    """
    arr = array("Q")
    append = arr.append
    for ptr, val in reqs:
        append(ptr)
        append(val)
    if _BIG_ENDIAN:  # pragma: no cover
        arr.byteswap()
    return arr.tobytes()


def unpack_mmu_updates(blob: bytes) -> list[tuple[int, int]]:
    """Parse an mmu_update blob back into ``(ptr, val)`` pairs.

    For a flat ``array('Q')`` (ptr0, val0, ptr1, ...) use :func:`unpack_u64s`.

    Raises:
        ValueError: the length is not a multiple of 16.
    """
    if len(blob) % MMU_UPDATE_SIZE:
        raise ValueError(f"mmu_update blob of {len(blob)} bytes is not a multiple of 16")
    flat = unpack_u64s(blob)
    return list(zip(flat[0::2], flat[1::2], strict=True))


# --- hypercall arguments -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MmuUpdateArgs(_Validated):
    """``HYPERVISOR_mmu_update(reqs, count, &done, foreigndom)``.

    ``reqs`` is the raw little-endian blob (:func:`pack_mmu_updates`), at most
    ``MAX_MMU_UPDATES`` records; ``count`` is implied by its length.
    ``foreigndom`` is Xen's ``unsigned int``, so u32: bits 0-15 name the owner
    of the data frames (FD), bits 16-31 the page-table owner plus one (PFD + 1,
    0 = self), reference §2.1.
    """

    OP: ClassVar[int] = HYPERVISOR_mmu_update
    reqs: bytes
    foreigndom: int = DOMID_SELF

    def _validate(self) -> None:
        _bytes(
            self.reqs,
            "mmu_update reqs",
            MAX_MMU_UPDATES * MMU_UPDATE_SIZE,
            multiple=MMU_UPDATE_SIZE,
        )
        _int(self.foreigndom, "foreigndom", 0, _U32)

    @property
    def count(self) -> int:
        """Number of records in ``reqs``."""
        return len(self.reqs) // MMU_UPDATE_SIZE

    def pairs(self) -> list[tuple[int, int]]:
        """The records as ``(ptr, val)`` pairs."""
        return unpack_mmu_updates(self.reqs)

    def to_wire(self) -> tuple[object, ...]:
        return (self.reqs, self.foreigndom)


@dataclass(frozen=True, slots=True)
class MmuextOpArgs(_Validated):
    """``HYPERVISOR_mmuext_op(ops, count, &done, foreigndom)``.

    ``ops`` are ``(cmd, arg1, arg2)``: cmd u32, arg1 (mfn or linear address)
    and arg2 (count, vCPU mask or source mfn) u64, 0 when unused.
    ``foreigndom`` is Xen's ``unsigned int`` (u32) as for mmu_update, but Xen
    hands it to ``get_pg_owner(domid_t)``: only bits 0-15 count.
    """

    OP: ClassVar[int] = HYPERVISOR_mmuext_op
    ops: tuple[tuple[int, int, int], ...]
    foreigndom: int = DOMID_SELF

    def _validate(self) -> None:
        for op in _tuple(self.ops, "mmuext ops", MAX_MMUEXT_OPS):
            cmd, arg1, arg2 = _shape(op, "mmuext op", 3)
            _int(cmd, "mmuext cmd", 0, _U32)
            _int(arg1, "mmuext arg1", 0, _U64)
            _int(arg2, "mmuext arg2", 0, _U64)
        _int(self.foreigndom, "foreigndom", 0, _U32)

    def to_wire(self) -> tuple[object, ...]:
        return (self.ops, self.foreigndom)


@dataclass(frozen=True, slots=True)
class UpdateVaMappingArgs(_Validated):
    """``HYPERVISOR_update_va_mapping(va, val, flags)``, all u64."""

    OP: ClassVar[int] = HYPERVISOR_update_va_mapping
    va: int
    val: int
    flags: int

    def _validate(self) -> None:
        _int(self.va, "va", 0, _U64)
        _int(self.val, "val", 0, _U64)
        _int(self.flags, "flags", 0, _U64)

    def to_wire(self) -> tuple[object, ...]:
        return (self.va, self.val, self.flags)


@dataclass(frozen=True, slots=True)
class UpdateVaMappingOtherdomainArgs(_Validated):
    """``HYPERVISOR_update_va_mapping_otherdomain(va, val, flags, domid)``.

    ``va``, ``val`` and ``flags`` are u64 as for update_va_mapping; ``domid``
    is Xen's ``domid_t``, so u16 (``DOMID_SELF`` allowed).
    """

    OP: ClassVar[int] = HYPERVISOR_update_va_mapping_otherdomain
    va: int
    val: int
    flags: int
    domid: int

    def _validate(self) -> None:
        _int(self.va, "va", 0, _U64)
        _int(self.val, "val", 0, _U64)
        _int(self.flags, "flags", 0, _U64)
        _int(self.domid, "domid", 0, _U16)

    def to_wire(self) -> tuple[object, ...]:
        return (self.va, self.val, self.flags, self.domid)


@dataclass(frozen=True, slots=True)
class VmAssistArgs(_Validated):
    """``HYPERVISOR_vm_assist(cmd, type)``, both u32."""

    OP: ClassVar[int] = HYPERVISOR_vm_assist
    cmd: int
    type: int

    def _validate(self) -> None:
        _int(self.cmd, "vm_assist cmd", 0, _U32)
        _int(self.type, "vm_assist type", 0, _U32)

    def to_wire(self) -> tuple[object, ...]:
        return (self.cmd, self.type)


@dataclass(frozen=True, slots=True)
class MulticallArgs(_Validated):
    """``HYPERVISOR_multicall(calls, nr_calls)``: at most MAX_MULTICALL_CALLS.

    A call may itself be a multicall (so the hypervisor can answer -EINVAL for
    it) but that one may not contain another (MAX_MULTICALL_DEPTH).
    """

    OP: ClassVar[int] = HYPERVISOR_multicall
    calls: tuple[Call, ...]

    def _validate(self) -> None:
        for call in _tuple(self.calls, "multicall calls", MAX_MULTICALL_CALLS):
            if type(call) is not Call:
                _fail(_BAD_TYPE, f"multicall entries must be Call, not {_tname(call)}")
            inner = call.args
            if isinstance(inner, MulticallArgs) and any(
                isinstance(c.args, MulticallArgs) for c in inner.calls
            ):
                _fail(_TOO_LARGE, f"multicalls nest deeper than {MAX_MULTICALL_DEPTH}")

    def to_wire(self) -> tuple[object, ...]:
        return (tuple((c.op, *c.args.to_wire()) for c in self.calls),)


@dataclass(frozen=True, slots=True)
class RawArgs(_Validated):
    """Arguments of a hypercall pvemu does not implement: up to six u64s.

    They decode so that the hypervisor can answer ``-ENOSYS``.
    """

    OP: ClassVar[int] = -1
    args: tuple[int, ...] = ()

    def _validate(self) -> None:
        for arg in _tuple(self.args, "hypercall args", MAX_HYPERCALL_ARGS):
            _int(arg, "hypercall arg", 0, _U64)

    def to_wire(self) -> tuple[object, ...]:
        return self.args


HypercallArgs = (
    MmuUpdateArgs
    | MmuextOpArgs
    | UpdateVaMappingArgs
    | UpdateVaMappingOtherdomainArgs
    | VmAssistArgs
    | MulticallArgs
    | RawArgs
)

_ARGS_FOR_OP: Final[dict[int, type[HypercallArgs]]] = {
    cls.OP: cls
    for cls in (
        MmuUpdateArgs,
        MmuextOpArgs,
        UpdateVaMappingArgs,
        UpdateVaMappingOtherdomainArgs,
        VmAssistArgs,
        MulticallArgs,
    )
}


def _check_op_args(op: object, args: object) -> None:
    op = _int(op, "op", 0, _U32)
    expected = _ARGS_FOR_OP.get(op, RawArgs)
    if type(args) is not expected:
        _fail(_BAD_TYPE, f"hypercall {op} takes {expected.__name__}, not {_tname(args)}")


@dataclass(frozen=True, slots=True)
class Call(_Validated):
    """One entry of a multicall: a hypercall number and its arguments.

    ``args`` must be the class for ``op`` (``MmuUpdateArgs`` for 1, ...) or
    ``RawArgs`` for numbers pvemu does not implement.
    """

    op: int
    args: HypercallArgs

    def _validate(self) -> None:
        _check_op_args(self.op, self.args)


def _args_from_wire(op: int, raw: tuple[object, ...], depth: int) -> HypercallArgs:
    """Build typed arguments from a decoded wire tuple (strict shapes)."""
    if op == HYPERVISOR_mmu_update:
        reqs, dom = _shape(raw, "mmu_update args", 2)
        return MmuUpdateArgs(reqs, dom)  # type: ignore[arg-type]
    if op == HYPERVISOR_mmuext_op:
        ops, dom = _shape(raw, "mmuext_op args", 2)
        return MmuextOpArgs(ops, dom)  # type: ignore[arg-type]
    if op == HYPERVISOR_update_va_mapping:
        va, val, flags = _shape(raw, "update_va_mapping args", 3)
        return UpdateVaMappingArgs(va, val, flags)  # type: ignore[arg-type]
    if op == HYPERVISOR_update_va_mapping_otherdomain:
        va, val, flags, domid = _shape(raw, "update_va_mapping_otherdomain args", 4)
        return UpdateVaMappingOtherdomainArgs(va, val, flags, domid)  # type: ignore[arg-type]
    if op == HYPERVISOR_vm_assist:
        cmd, typ = _shape(raw, "vm_assist args", 2)
        return VmAssistArgs(cmd, typ)  # type: ignore[arg-type]
    if op == HYPERVISOR_multicall:
        if depth >= MAX_MULTICALL_DEPTH:
            _fail(_TOO_LARGE, f"multicalls nest deeper than {MAX_MULTICALL_DEPTH}")
        (calls,) = _shape(raw, "multicall args", 1)
        built = []
        for item in _tuple(calls, "multicall calls", MAX_MULTICALL_CALLS):
            entry = _tuple(item, "multicall call", 1 + MAX_HYPERCALL_ARGS)
            if not entry:
                _fail(_BAD_TYPE, "a multicall call must start with its hypercall number")
            sub_op = _int(entry[0], "op", 0, _U32)
            built.append(Call(sub_op, _args_from_wire(sub_op, entry[1:], depth + 1)))
        return MulticallArgs(tuple(built))
    return RawArgs(raw)  # type: ignore[arg-type]


def make_call(op: int, *args: object) -> Call:
    """Build a :class:`Call` from the raw-client form ``(op, *args)``.

    Lenient where the wire is strict: ``mmu_update`` takes ``reqs`` as a list
    of ``(ptr, val)`` pairs or an already packed blob; ``mmuext_op`` takes any
    sequence of triples; ``foreigndom`` defaults to ``DOMID_SELF``; a multicall
    takes a sequence of ``(op, *args)`` tuples (or :class:`Call`).

    Raises:
        LocalProtocolError: the arguments do not fit the hypercall.
    """
    try:
        if op == HYPERVISOR_mmu_update and 1 <= len(args) <= 2:
            reqs = args[0]
            if not isinstance(reqs, bytes):
                reqs = pack_mmu_updates(reqs)  # type: ignore[arg-type]
            return Call(op, MmuUpdateArgs(reqs, *args[1:]))  # type: ignore[arg-type]
        if op == HYPERVISOR_mmuext_op and 1 <= len(args) <= 2:
            ops = tuple(tuple(o) for o in args[0])  # type: ignore[attr-defined]
            return Call(op, MmuextOpArgs(ops, *args[1:]))  # type: ignore[arg-type]
        if op == HYPERVISOR_multicall and len(args) == 1:
            calls = tuple(c if isinstance(c, Call) else make_call(*c) for c in args[0])  # type: ignore[attr-defined]
            return Call(op, MulticallArgs(calls))
        cls = _ARGS_FOR_OP.get(op, RawArgs)
        if cls is RawArgs:
            return Call(op, RawArgs(args))  # type: ignore[arg-type]
        return Call(op, cls(*args))  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(
            f"bad arguments for hypercall {op}: {exc}", code=_BAD_TYPE
        ) from exc


# --- messages ------------------------------------------------------------------------


class Message(_Validated):
    """Base of every message. ``TYPE`` is the ``"t"`` value on the wire."""

    __slots__ = ()

    TYPE: ClassVar[str]
    #: File descriptors sent as SCM_RIGHTS ancillary data with this message.
    ANCILLARY_FDS: ClassVar[int] = 0
    _FIELDS: ClassVar[tuple[str, ...]]
    _KEYS: ClassVar[frozenset[str]]

    id: Any  # narrowed by each subclass (int, or int | None for ErrorReply)

    def to_wire(self) -> dict[str, object]:
        """The msgpack map for this message (``"t"`` first)."""
        out: dict[str, object] = {"t": self.TYPE}
        for name in self._FIELDS:
            out[name] = getattr(self, name)
        return out

    @classmethod
    def _convert(cls, kwargs: dict[str, Any]) -> None:
        """Hook: turn decoded wire values into field values in place."""

    @classmethod
    def from_wire(cls, data: dict[Any, Any]) -> Self:
        """Validate a decoded msgpack map and build the message.

        Raises:
            LocalProtocolError: missing or extra keys, or invalid values (the
                connection reports these as non-fatal RemoteProtocolError).
        """
        if data.keys() != cls._KEYS:
            missing = sorted(cls._KEYS.difference(k for k in data if isinstance(k, str)))
            extra = sorted(repr(k) for k in data if k not in cls._KEYS)
            _fail(
                _MALFORMED,
                f"{cls.TYPE}: missing fields {missing}, unexpected fields {extra}",
            )
        kwargs = {name: data[name] for name in cls._FIELDS}
        cls._convert(kwargs)
        return cls(**kwargs)


class Request(Message):
    """A message from guest to hypervisor."""

    __slots__ = ()


class Reply(Message):
    """A message from hypervisor to guest."""

    __slots__ = ()


REQUEST_TYPES: Final[dict[str, type[Request]]] = {}
REPLY_TYPES: Final[dict[str, type[Reply]]] = {}

_M = TypeVar("_M", bound=Message)


def _register(cls: type[_M]) -> type[_M]:
    cls._FIELDS = tuple(f.name for f in fields(cls))  # type: ignore[arg-type]
    cls._KEYS = frozenset(("t", *cls._FIELDS))
    table: dict[str, Any] = REQUEST_TYPES if issubclass(cls, Request) else REPLY_TYPES
    assert cls.TYPE not in REQUEST_TYPES
    assert cls.TYPE not in REPLY_TYPES
    table[cls.TYPE] = cls
    return cls


class Access(NamedTuple):
    """One user access for run_user: ``(va, kind, data)``.

    ``kind`` ``"r"`` (data: int length to read), ``"w"`` (data: the bytes to
    write) or ``"x"`` (data: int number of instruction bytes to fetch).
    """

    va: int
    kind: str
    data: bytes | int


class Fault(NamedTuple):
    """The page fault that stopped a run_user: ``(va, error_code)``."""

    va: int
    error_code: int


_ACCESS_KINDS: Final = frozenset({"r", "w", "x"})

# ---- requests ----


@_register
@dataclass(frozen=True, slots=True)
class Hello(Request):
    """Create a domain. Answered by Welcome (plus the memory fd) or ErrorReply."""

    TYPE: ClassVar[str] = "hello"
    id: int
    version: int
    memory_mib: int
    vcpus: int
    name: str = ""

    def _validate(self) -> None:
        _request_id(self.id)
        _int(self.version, "version", 0, _U32)
        _int(self.memory_mib, "memory_mib", 1, MAX_MEMORY_MIB, _OUT_OF_RANGE)
        _int(self.vcpus, "vcpus", 1, MAX_VCPUS, _OUT_OF_RANGE)
        _str(self.name, "name", MAX_NAME_LEN)


@_register
@dataclass(frozen=True, slots=True)
class Join(Request):
    """Attach this connection as vCPU ``vcpu`` of an existing domain."""

    TYPE: ClassVar[str] = "join"
    id: int
    version: int
    domid: int
    secret: bytes
    vcpu: int

    def _validate(self) -> None:
        _request_id(self.id)
        _int(self.version, "version", 0, _U32)
        _int(self.domid, "domid", 0, _U16)
        if len(_bytes(self.secret, "secret", SECRET_LEN)) != SECRET_LEN:
            _fail(_BAD_TYPE, f"secret must be exactly {SECRET_LEN} bytes")
        _int(self.vcpu, "vcpu", 0, MAX_VCPUS - 1, _OUT_OF_RANGE)


@_register
@dataclass(frozen=True, slots=True)
class Hypercall(Request):
    """A hypercall: number and typed arguments (see :data:`HypercallArgs`).

    Answered by :class:`MulticallResult` for a multicall, :class:`Result`
    otherwise (unknown ops: ``Result(rc=-ENOSYS)``).
    """

    TYPE: ClassVar[str] = "hypercall"
    id: int
    op: int
    args: HypercallArgs

    def _validate(self) -> None:
        _request_id(self.id)
        _check_op_args(self.op, self.args)

    def to_wire(self) -> dict[str, object]:
        return {"t": self.TYPE, "id": self.id, "op": self.op, "args": self.args.to_wire()}

    @classmethod
    def _convert(cls, kwargs: dict[str, Any]) -> None:
        op = _int(kwargs["op"], "op", 0, _U32)
        raw = kwargs["args"]
        if type(raw) is not tuple:
            _fail(_BAD_TYPE, f"args must be a tuple (msgpack array), not {_tname(raw)}")
        kwargs["args"] = _args_from_wire(op, raw, 0)

    @classmethod
    def make(cls, id: int, op: int, *args: object) -> Hypercall:
        """Build from the raw-client form, like :func:`make_call`."""
        call = make_call(op, *args)
        return cls(id, call.op, call.args)


@_register
@dataclass(frozen=True, slots=True)
class Ptwr(Request):
    """A trapped direct 8-byte write of ``val`` at machine address ``maddr``.

    ``exchange``: an atomic exchange (``xchg``/``cmpxchg``) rather than a store.
    """

    TYPE: ClassVar[str] = "ptwr"
    id: int
    maddr: int
    val: int
    exchange: bool = False

    def _validate(self) -> None:
        _request_id(self.id)
        _int(self.maddr, "maddr", 0, _U64)
        _int(self.val, "val", 0, _U64)
        if type(self.exchange) is not bool:
            _fail(_BAD_TYPE, f"exchange must be a bool, not {_tname(self.exchange)}")


@_register
@dataclass(frozen=True, slots=True)
class RunUser(Request):
    """User accesses for this connection's vCPU; stops at the first fault."""

    TYPE: ClassVar[str] = "run_user"
    id: int
    accesses: tuple[Access, ...]

    def _validate(self) -> None:
        _request_id(self.id)
        plain = False
        for access in _tuple(self.accesses, "accesses", MAX_USER_ACCESSES):
            va, kind, data = _shape(access, "access", 3)
            _int(va, "access va", 0, _U64)
            if type(kind) is not str or kind not in _ACCESS_KINDS:
                _fail(_BAD_TYPE, f"access kind must be 'r', 'w' or 'x', not {kind!r}")
            if kind == "w":
                if not _bytes(data, "write data", MAX_ACCESS_LEN):
                    _fail(_OUT_OF_RANGE, "write data must not be empty")
            else:
                _length(data, f"{kind!r} access length", MAX_ACCESS_LEN)
            plain = plain or type(access) is not Access
        if plain:  # plain (va, kind, data) tuples, e.g. decoded: name them
            object.__setattr__(self, "accesses", tuple(Access(*a) for a in self.accesses))


@_register
@dataclass(frozen=True, slots=True)
class Stats(Request):
    """Ask for the counters (guest- and hypervisor-side)."""

    TYPE: ClassVar[str] = "stats"
    id: int

    def _validate(self) -> None:
        _request_id(self.id)


@_register
@dataclass(frozen=True, slots=True)
class Audit(Request):
    """Ask for a whole-machine invariant check."""

    TYPE: ClassVar[str] = "audit"
    id: int

    def _validate(self) -> None:
        _request_id(self.id)


@_register
@dataclass(frozen=True, slots=True)
class Bye(Request):
    """Close this connection cleanly; answered by Goodbye, then EOF only."""

    TYPE: ClassVar[str] = "bye"
    id: int

    def _validate(self) -> None:
        _request_id(self.id)


# ---- replies ----


@_register
@dataclass(frozen=True, slots=True)
class Welcome(Reply):
    """The answer to Hello/Join. The domain's memory fd (a sealed memfd) is
    sent as SCM_RIGHTS ancillary data on the same ``sendmsg`` as these bytes.

    ``p2m`` is a blob of little-endian u64 MFNs, index = PFN
    (:meth:`p2m_mfns`, :func:`pack_u64s`).
    """

    TYPE: ClassVar[str] = "welcome"
    ANCILLARY_FDS: ClassVar[int] = 1
    id: int
    domid: int
    vcpu: int
    p2m: bytes
    secret: bytes
    limits: dict[str, int]
    features: tuple[int, ...]

    def _validate(self) -> None:
        _request_id(self.id)
        _int(self.domid, "domid", 0, _U16)
        _int(self.vcpu, "vcpu", 0, MAX_VCPUS - 1, _OUT_OF_RANGE)
        _bytes(self.p2m, "p2m", MAX_P2M_ENTRIES * 8, multiple=8)
        if len(_bytes(self.secret, "secret", SECRET_LEN)) != SECRET_LEN:
            _fail(_BAD_TYPE, f"secret must be exactly {SECRET_LEN} bytes")
        for key, value in _dict(self.limits, "limits", MAX_LIMITS).items():
            _str(key, "limits key", MAX_NAME_LEN, min_len=1)
            _int(value, f"limits[{key!r}]", 0, _U64)
        for feature in _tuple(self.features, "features", MAX_FEATURES):
            _int(feature, "feature", 0, _U32)

    def p2m_mfns(self) -> array[int]:
        """The p2m as an ``array('Q')`` of MFNs, index = PFN."""
        return unpack_u64s(self.p2m)


@_register
@dataclass(frozen=True, slots=True)
class Result(Reply):
    """Result of every hypercall but multicall (unknown ones included).

    ``rc`` is 0 or a negated Xen errno; ``done`` counts records/ops completed
    (0 where meaningless).
    """

    TYPE: ClassVar[str] = "result"
    id: int
    rc: int
    done: int = 0

    def _validate(self) -> None:
        _request_id(self.id)
        _int(self.rc, "rc", _S64_MIN, _S64_MAX)
        _int(self.done, "done", 0, _U64)


@_register
@dataclass(frozen=True, slots=True)
class MulticallResult(Reply):
    """Result of a multicall: its own rc, then one result per call."""

    TYPE: ClassVar[str] = "multicall_result"
    id: int
    rc: int
    results: tuple[int, ...]

    def _validate(self) -> None:
        _request_id(self.id)
        _int(self.rc, "rc", _S64_MIN, _S64_MAX)
        for value in _tuple(self.results, "results", MAX_MULTICALL_CALLS):
            _int(value, "result", _S64_MIN, _S64_MAX)


@_register
@dataclass(frozen=True, slots=True)
class PtwrResult(Reply):
    """Result of a trapped write: rc and the entry's previous value."""

    TYPE: ClassVar[str] = "ptwr_result"
    id: int
    rc: int
    old: int = 0

    def _validate(self) -> None:
        _request_id(self.id)
        _int(self.rc, "rc", _S64_MIN, _S64_MAX)
        _int(self.old, "old", 0, _U64)


@_register
@dataclass(frozen=True, slots=True)
class UserResult(Reply):
    """Outcome of run_user: accesses executed, bytes read (one entry per
    executed ``"r"`` access, in order), and the fault that stopped it."""

    TYPE: ClassVar[str] = "user_result"
    id: int
    executed: int
    reads: tuple[bytes, ...] = ()
    fault: Fault | None = None

    def _validate(self) -> None:
        _request_id(self.id)
        _int(self.executed, "executed", 0, MAX_USER_ACCESSES, _OUT_OF_RANGE)
        for data in _tuple(self.reads, "reads", MAX_USER_ACCESSES):
            _bytes(data, "read data", MAX_ACCESS_LEN)
        if self.fault is not None:
            raw_va, raw_code = _shape(self.fault, "fault", 2)
            va = _int(raw_va, "fault va", 0, _U64)
            error_code = _int(raw_code, "fault error_code", 0, _U32)
            if type(self.fault) is not Fault:  # a plain pair, e.g. decoded
                object.__setattr__(self, "fault", Fault(va, error_code))


@_register
@dataclass(frozen=True, slots=True)
class StatsResult(Reply):
    """Counters: nested str-keyed maps (depth <= MAX_STATS_DEPTH) of ints."""

    TYPE: ClassVar[str] = "stats_result"
    id: int
    stats: dict[str, Any]

    def _validate(self) -> None:
        _request_id(self.id)
        _stats(self.stats, "stats", 1)


@_register
@dataclass(frozen=True, slots=True)
class AuditResult(Reply):
    """Invariant violations across the machine; empty when healthy."""

    TYPE: ClassVar[str] = "audit_result"
    id: int
    violations: tuple[str, ...] = ()

    def _validate(self) -> None:
        _request_id(self.id)
        for text in _tuple(self.violations, "violations", MAX_VIOLATIONS):
            _str(text, "violation", MAX_TEXT_LEN)


@_register
@dataclass(frozen=True, slots=True)
class ErrorReply(Reply):
    """A typed error. ``id`` is None when the request's id could not be read."""

    TYPE: ClassVar[str] = "error"
    id: int | None
    code: str
    message: str = ""

    def _validate(self) -> None:
        if self.id is not None:
            _request_id(self.id)
        _str(self.code, "code", MAX_NAME_LEN, min_len=1)
        _str(self.message, "message", MAX_TEXT_LEN)

    @classmethod
    def from_exception(
        cls, exc: LocalProtocolError | RemoteProtocolError, request_id: int | None = None
    ) -> ErrorReply:
        """The reply for a protocol error (message truncated to MAX_TEXT_LEN).

        ``request_id`` defaults to the error's own ``request_id``.
        """
        if request_id is None and isinstance(exc, RemoteProtocolError):
            request_id = exc.request_id
        return cls(request_id, exc.code[:MAX_NAME_LEN], exc.message[:MAX_TEXT_LEN])


@_register
@dataclass(frozen=True, slots=True)
class Goodbye(Reply):
    """The answer to Bye; the hypervisor closes the connection after it."""

    TYPE: ClassVar[str] = "goodbye"
    id: int

    def _validate(self) -> None:
        _request_id(self.id)


# --- the connection ------------------------------------------------------------------

Role = Literal["client", "server"]


class State(enum.Enum):
    """Connection state, the same on both ends once bytes have moved.

    IDLE -(hello/join)-> HANDSHAKE -(welcome)-> READY -(bye)-> CLOSING
    -(goodbye)-> CLOSED; an error reply to hello/join returns to IDLE; bye is
    also allowed in IDLE.
    """

    IDLE = "IDLE"
    HANDSHAKE = "HANDSHAKE"
    READY = "READY"
    CLOSING = "CLOSING"
    CLOSED = "CLOSED"


class Sentinel(enum.Enum):
    """Non-message results of :meth:`Connection.next_event`."""

    NEED_DATA = "NEED_DATA"
    CONNECTION_CLOSED = "CONNECTION_CLOSED"

    def __repr__(self) -> str:
        return self.value


#: ``next_event`` needs more bytes: call ``receive_data`` first.
NEED_DATA: Final = Sentinel.NEED_DATA
#: The peer closed its end cleanly (EOF between messages).
CONNECTION_CLOSED: Final = Sentinel.CONNECTION_CLOSED

_HANDSHAKE_REPLIES: Final[tuple[type[Reply], ...]] = (Welcome, ErrorReply)
_REPLIES: Final[dict[type[Request], tuple[type[Reply], ...]]] = {
    Hello: _HANDSHAKE_REPLIES,
    Join: _HANDSHAKE_REPLIES,
    Ptwr: (PtwrResult, ErrorReply),
    RunUser: (UserResult, ErrorReply),
    Stats: (StatsResult, ErrorReply),
    Audit: (AuditResult, ErrorReply),
    Bye: (Goodbye,),
}
_ERROR_ONLY: Final[tuple[type[Reply], ...]] = (ErrorReply,)


def _expected_replies(request: Request) -> tuple[type[Reply], ...]:
    if isinstance(request, Hypercall):
        if request.op == HYPERVISOR_multicall:
            return (MulticallResult, ErrorReply)
        return (Result, ErrorReply)
    return _REPLIES[type(request)]


def _request_transition(state: State, request: Request) -> State | None:
    """The state after ``request``, or None if it is not allowed in ``state``."""
    if isinstance(request, Hello | Join):
        return State.HANDSHAKE if state is State.IDLE else None
    if isinstance(request, Bye):
        return State.CLOSING if state in (State.IDLE, State.READY) else None
    return State.READY if state is State.READY else None


class Connection:
    """One end of a pvemu connection, sans I/O.

    Feed received bytes with :meth:`receive_data` (``b""`` = EOF), then call
    :meth:`next_event` until it returns :data:`NEED_DATA`; turn outgoing
    messages into bytes with :meth:`send`. The ``"server"`` (hypervisor)
    receives requests and sends replies; the ``"client"`` (guest) the reverse.

    Error handling:
        ``next_event`` raises :class:`RemoteProtocolError`. Non-fatal: one
        message was rejected; a server answers ``ErrorReply.from_exception(e)``
        (allowed by :meth:`send` for ``e.request_id``) and carries on. Fatal:
        the stream is unusable; close the socket (a server may first send an
        ``ErrorReply`` with id None); every later ``next_event`` raises again.

    Args:
        role: ``"client"`` or ``"server"``.
        max_message_size: largest message accepted and sent (a server lowers
            it to its own limit; tests lower it further).
    """

    def __init__(self, role: Role, *, max_message_size: int = MAX_MESSAGE_SIZE) -> None:
        if role not in ("client", "server"):
            raise LocalProtocolError(f"role must be 'client' or 'server', not {role!r}")
        if not 64 <= max_message_size <= MAX_MESSAGE_SIZE:
            raise LocalProtocolError(f"max_message_size must be 64..{MAX_MESSAGE_SIZE}")
        self._role: Role = role
        self._server = role == "server"
        self._decode_table: dict[str, type[Message]] = dict(
            REQUEST_TYPES if self._server else REPLY_TYPES
        )
        self._max = max_message_size
        self._state = State.IDLE
        #: request id -> reply types allowed for it (ids we received as a
        #: server, ids we sent as a client).
        self._pending: dict[int, tuple[type[Reply], ...]] = {}
        self._handshake_id: int | None = None
        self._unpacker: msgpack.Unpacker | None = msgpack.Unpacker(
            use_list=False,
            raw=False,
            strict_map_key=True,
            max_buffer_size=max_message_size,
            max_str_len=MAX_STR_LEN,
            max_bin_len=MAX_BIN_LEN,
            max_array_len=MAX_ARRAY_LEN,
            max_map_len=MAX_MAP_LEN,
            max_ext_len=MAX_EXT_LEN,
        )
        self._packer = msgpack.Packer(use_bin_type=True)
        self._fed = 0  # bytes fed to the unpacker so far
        self._msg_start = 0  # stream offset where the current message starts
        self._backlog = bytearray()  # received, not yet fed
        self._eof = False
        self._dead: RemoteProtocolError | None = None

    # -- introspection --

    @property
    def role(self) -> Role:
        return self._role

    @property
    def state(self) -> State:
        return self._state

    @property
    def pending_ids(self) -> frozenset[int]:
        """Request ids awaiting a reply."""
        return frozenset(self._pending)

    @property
    def broken(self) -> bool:
        """True after a fatal RemoteProtocolError."""
        return self._dead is not None

    # -- receiving --

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer received bytes; ``b""`` means the peer closed (EOF).

        Raises:
            LocalProtocolError: data after EOF.
        """
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("received data after EOF")
        unpacker = self._unpacker
        if unpacker is None:
            return  # dead: nothing more is read
        # Bytes since the current message started: msgpack's tell() moves
        # inside a partly parsed message, so it cannot measure this.
        if not self._backlog and self._fed - self._msg_start + len(data) <= self._max:
            unpacker.feed(data)
            self._fed += len(data)
        else:
            self._backlog += data

    def next_event(self) -> Message | Sentinel:
        """The next complete message, :data:`NEED_DATA` or :data:`CONNECTION_CLOSED`.

        Raises:
            RemoteProtocolError: see the class docstring.
        """
        if self._dead is not None:
            raise RemoteProtocolError(
                f"connection already failed: {self._dead.message}",
                code=self._dead.code,
                fatal=True,
            )
        unpacker = self._unpacker
        assert unpacker is not None
        while True:
            try:
                obj = unpacker.unpack()
            except msgpack.OutOfData:
                in_progress = self._fed - self._msg_start
                if in_progress >= self._max:
                    self._die(_TOO_LARGE, f"message exceeds {self._max} bytes")
                if self._backlog:
                    room = self._max - (self._fed - self._msg_start)
                    chunk = self._backlog[:room]
                    del self._backlog[:room]
                    unpacker.feed(chunk)
                    self._fed += len(chunk)
                    continue
                if not self._eof:
                    return NEED_DATA
                if in_progress:
                    self._die(_MALFORMED, "connection closed in the middle of a message")
                return CONNECTION_CLOSED
            except Exception as exc:  # any other unpack error: never reuse the Unpacker
                text = str(exc)
                code = (
                    _TOO_LARGE
                    if isinstance(exc, msgpack.BufferFull) or "exceeds max_" in text
                    else _MALFORMED
                )
                detail = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
                self._die(code, f"undecodable msgpack ({detail})")
            self._msg_start = unpacker.tell()
            return self._accept(obj)

    def _die(self, code: str, message: str) -> NoReturn:
        self._unpacker = None
        self._backlog.clear()
        self._dead = RemoteProtocolError(message, code=code, fatal=True)
        raise self._dead

    def _reject(self, code: str, message: str, request_id: int | None) -> RemoteProtocolError:
        """A non-fatal error. A server may then send ErrorReply(request_id); a
        client stops waiting for ``request_id`` (its reply was unusable)."""
        if request_id is not None:
            if not self._server:
                self._pending.pop(request_id, None)
            elif request_id in self._pending:
                request_id = None  # a duplicate: don't touch the original's slot
            else:
                self._pending[request_id] = _ERROR_ONLY
        return RemoteProtocolError(message, code=code, fatal=False, request_id=request_id)

    def _accept(self, obj: object) -> Message:
        if type(obj) is not dict:
            self._die(_MALFORMED, f"a message must be a msgpack map, not {_tname(obj)}")
        if self._state is State.CLOSED or (self._server and self._state is State.CLOSING):
            self._die(WireErrorCode.BAD_STATE, "message after bye: only EOF may follow")
        rid = obj.get("id")
        request_id = rid if type(rid) is int and 0 <= rid <= MAX_REQUEST_ID else None
        kind = obj.get("t")
        if type(kind) is not str:
            code = _MALFORMED if kind is None else _BAD_TYPE
            raise self._reject(code, f'"t" must be a str, not {_tname(kind)}', request_id)
        cls = self._decode_table.get(kind)
        if cls is None:
            expected = "request" if self._server else "reply"
            raise self._reject(
                WireErrorCode.UNKNOWN_MESSAGE,
                f"unknown {expected} type {kind[:MAX_NAME_LEN]!r}",
                request_id,
            )
        if cls is Hello or cls is Join:
            version = obj.get("version")
            if type(version) is int and version != PROTOCOL_VERSION:
                raise self._reject(
                    WireErrorCode.VERSION,
                    f"protocol version {version} is not supported (speak {PROTOCOL_VERSION})",
                    request_id,
                )
        try:
            message = cls.from_wire(obj)
        except LocalProtocolError as exc:
            raise self._reject(exc.code, f"{kind}: {exc.message}", request_id) from None
        if self._server:
            assert isinstance(message, Request)
            self._accept_request(message)
        else:
            assert isinstance(message, Reply)
            self._accept_reply(message)
        return message

    def _accept_request(self, request: Request) -> None:
        rid: int = request.id
        if rid in self._pending:
            raise self._reject(
                WireErrorCode.BAD_STATE, f"request id {rid} is already awaiting a reply", None
            )
        new_state = _request_transition(self._state, request)
        if new_state is None:
            raise self._reject(
                WireErrorCode.BAD_STATE,
                f"{request.TYPE} is not allowed in state {self._state.value}",
                rid,
            )
        if new_state is State.HANDSHAKE:
            self._handshake_id = rid
        self._state = new_state
        self._pending[rid] = _expected_replies(request)

    def _accept_reply(self, reply: Reply) -> None:
        rid: int | None = reply.id
        if rid is None:
            return  # an unattributable error; no state change
        expected = self._pending.pop(rid, None)
        if expected is None:
            raise self._reject(
                WireErrorCode.BAD_STATE, f"{reply.TYPE} for unknown request id {rid}", rid
            )
        if type(reply) not in expected:
            names = ", ".join(cls.TYPE for cls in expected)
            raise self._reject(
                WireErrorCode.BAD_STATE, f"{reply.TYPE} answers a request expecting {names}", rid
            )
        self._reply_transition(reply)

    def _reply_transition(self, reply: Reply) -> None:
        if reply.id is not None and reply.id == self._handshake_id:
            self._handshake_id = None
            self._state = State.READY if isinstance(reply, Welcome) else State.IDLE
        elif isinstance(reply, Goodbye):
            self._state = State.CLOSED

    # -- sending --

    def send(self, message: Message) -> bytes:
        """Encode ``message`` for the wire, checking role and state.

        A :class:`Welcome` must go out in one ``sendmsg`` together with the
        memory fd (``Welcome.ANCILLARY_FDS``); that is the transport's job.

        Raises:
            LocalProtocolError: the role may not send it, the state does not
                allow it, its id is not awaiting this reply (server) or is
                already in flight (client), or it encodes to more than the
                maximum message size.
        """
        if self._server:
            if not isinstance(message, Reply):
                raise LocalProtocolError(f"a server cannot send {type(message).__name__}")
            return self._send_reply(message)
        if not isinstance(message, Request):
            raise LocalProtocolError(f"a client cannot send {type(message).__name__}")
        return self._send_request(message)

    def _encode(self, message: Message) -> bytes:
        data = self._packer.pack(message.to_wire())
        if len(data) > self._max:
            raise LocalProtocolError(
                f"{message.TYPE} encodes to {len(data)} bytes, over {self._max}", code=_TOO_LARGE
            )
        return data

    def _send_request(self, request: Request) -> bytes:
        rid: int = request.id
        new_state = _request_transition(self._state, request)
        if new_state is None:
            raise LocalProtocolError(
                f"cannot send {request.TYPE} in state {self._state.value}",
                code=WireErrorCode.BAD_STATE,
            )
        if rid in self._pending:
            raise LocalProtocolError(
                f"request id {rid} is already awaiting a reply", code=WireErrorCode.BAD_STATE
            )
        data = self._encode(request)
        if new_state is State.HANDSHAKE:
            self._handshake_id = rid
        self._state = new_state
        self._pending[rid] = _expected_replies(request)
        return data

    def _send_reply(self, reply: Reply) -> bytes:
        if self._state is State.CLOSED:
            raise LocalProtocolError("cannot send after goodbye", code=WireErrorCode.BAD_STATE)
        rid: int | None = reply.id
        if rid is None:
            return self._encode(reply)  # ErrorReply(None): always allowed
        expected = self._pending.get(rid)
        if expected is None:
            raise LocalProtocolError(
                f"no request with id {rid} is awaiting a reply", code=WireErrorCode.BAD_STATE
            )
        if type(reply) not in expected:
            names = ", ".join(cls.TYPE for cls in expected)
            raise LocalProtocolError(
                f"request {rid} must be answered by {names}, not {reply.TYPE}",
                code=WireErrorCode.BAD_STATE,
            )
        data = self._encode(reply)
        del self._pending[rid]
        self._reply_transition(reply)
        return data
