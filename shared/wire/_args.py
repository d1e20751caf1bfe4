"""Hypercall arguments: one typed value per hypercall, the same from the
guest's multicall buffer to the hypervisor's validation loop.

Each class carries its hypercall number (``OP``) and knows what the layers
around it ask of it, so no layer switches on the hypercall number:

* ``record_count``: entries the hypervisor processes (its log line);
* ``largest_batch``: records of the biggest ``mmu_update`` inside (what the
  server's ``max_batch`` bounds);
* ``mmu_update_records`` / ``multicall_entries``: what the guest counts;
* ``from_wire`` / ``to_wire``: the strict wire form (``from_wire`` only
  unpacks the shape: every field is checked once, by the constructor's
  ``_validate``); ``from_client``: the lenient raw-client form
  (:func:`make_call`).

``mmu_update`` records are one ``bytes`` blob in Xen's ``struct
mmu_update[]`` layout from the moment the guest packs them;
:meth:`MmuUpdateArgs.records` reads them through a view.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Final, Self, cast

from pvemu.shared.abi import (
    DOMID_SELF,
    HYPERVISOR_mmu_update,
    HYPERVISOR_mmuext_op,
    HYPERVISOR_multicall,
    HYPERVISOR_update_va_mapping,
    HYPERVISOR_update_va_mapping_otherdomain,
    HYPERVISOR_vm_assist,
)
from pvemu.shared.errors import LocalProtocolError

from ._blob import pack_mmu_updates, u64_view, unpack_mmu_updates
from ._checks import (
    _BAD_TYPE,
    _TOO_LARGE,
    _U16,
    _U32,
    _U64,
    _bytes,
    _fail,
    _int,
    _shape,
    _tname,
    _tuple,
    _Validated,
)
from ._limits import (
    MAX_HYPERCALL_ARGS,
    MAX_MMU_UPDATES,
    MAX_MMUEXT_OPS,
    MAX_MULTICALL_CALLS,
    MAX_MULTICALL_DEPTH,
    MMU_UPDATE_SIZE,
)

if TYPE_CHECKING:
    from collections.abc import Sequence


class _Args(_Validated):
    """What every argument class answers; the defaults fit a call that
    carries no records."""

    __slots__ = ()

    OP: ClassVar[int]

    @property
    def record_count(self) -> int:
        """Entries the hypervisor processes for this call."""
        return 1

    @property
    def largest_batch(self) -> int:
        """Records in the biggest ``mmu_update`` inside (0 if none)."""
        return 0

    @property
    def mmu_update_records(self) -> int:
        """``mmu_update`` records carried, nested multicalls included."""
        return 0

    @property
    def multicall_entries(self) -> int:
        """Multicall entries carried, nested multicalls included."""
        return 0

    def to_wire(self) -> tuple[object, ...]:
        raise NotImplementedError


def _ints(args: Sequence[object], arity: int) -> tuple[int, ...]:
    """``args`` as exactly ``arity`` ints (the client's positional form)."""
    if len(args) != arity:
        raise TypeError(f"takes {arity} arguments, not {len(args)}")
    ints: list[int] = []
    for arg in args:
        if not isinstance(arg, int):
            raise TypeError(f"arguments must be ints, not {_tname(arg)}")
        ints.append(arg)
    return tuple(ints)


def _foreigndom(args: Sequence[object]) -> int:
    """The optional trailing ``foreigndom`` of mmu_update / mmuext_op."""
    if not args:
        return DOMID_SELF
    (value,) = _ints(args, 1)
    return value


@dataclass(frozen=True, slots=True)
class MmuUpdateArgs(_Args):
    """``HYPERVISOR_mmu_update(reqs, count, &done, foreigndom)``.

    ``reqs`` is the raw little-endian blob (:func:`pack_mmu_updates`), at most
    ``MAX_MMU_UPDATES`` records; ``count`` is implied by its length.
    ``foreigndom`` is Xen's ``unsigned int``, so u32: bits 0-15 name the owner
    of the data frames (FD), bits 16-31 the page-table owner plus one (PFD + 1,
    0 = self), docs/sources.md §6.
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

    @property
    def record_count(self) -> int:
        return self.count

    @property
    def largest_batch(self) -> int:
        return self.count

    @property
    def mmu_update_records(self) -> int:
        return self.count

    def records(self) -> Sequence[int]:
        """``ptr0, val0, ptr1, val1, ...`` read through a view of the blob."""
        return u64_view(self.reqs)

    def pairs(self) -> list[tuple[int, int]]:
        """The records as ``(ptr, val)`` pairs (for tests and tools)."""
        return unpack_mmu_updates(self.reqs)

    def to_wire(self) -> tuple[object, ...]:
        return (self.reqs, self.foreigndom)

    @classmethod
    def from_wire(cls, raw: tuple[object, ...], depth: int) -> Self:
        reqs, dom = _shape(raw, "mmu_update args", 2)
        return cls(cast(bytes, reqs), cast(int, dom))  # checked once, by _validate

    @classmethod
    def from_client(cls, *args: object) -> Self:
        """``(reqs, [foreigndom])``: ``reqs`` a packed blob or ``(ptr, val)`` pairs."""
        if not 1 <= len(args) <= 2:
            raise TypeError(f"takes reqs and an optional foreigndom, not {len(args)} arguments")
        reqs = args[0]
        if isinstance(reqs, bytes):
            blob = reqs
        elif isinstance(reqs, Iterable):
            pairs: Iterable[Any] = reqs
            blob = pack_mmu_updates(pairs)
        else:
            raise TypeError(f"reqs must be bytes or (ptr, val) pairs, not {_tname(reqs)}")
        return cls(blob, _foreigndom(args[1:]))


@dataclass(frozen=True, slots=True)
class MmuextOpArgs(_Args):
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

    @property
    def record_count(self) -> int:
        return len(self.ops)

    def to_wire(self) -> tuple[object, ...]:
        return (self.ops, self.foreigndom)

    @classmethod
    def from_wire(cls, raw: tuple[object, ...], depth: int) -> Self:
        ops, dom = _shape(raw, "mmuext_op args", 2)
        return cls(cast("tuple[tuple[int, int, int], ...]", ops), cast(int, dom))

    @classmethod
    def from_client(cls, *args: object) -> Self:
        """``(ops, [foreigndom])``: ``ops`` any iterable of ``(cmd, arg1, arg2)``."""
        if not 1 <= len(args) <= 2:
            raise TypeError(f"takes ops and an optional foreigndom, not {len(args)} arguments")
        ops = args[0]
        if not isinstance(ops, Iterable):
            raise TypeError(f"ops must be (cmd, arg1, arg2) triples, not {_tname(ops)}")
        triples: list[tuple[int, int, int]] = []
        for op in ops:
            if not isinstance(op, Iterable):
                raise TypeError(f"an mmuext op must be a triple, not {_tname(op)}")
            cmd, arg1, arg2 = _ints(tuple(op), 3)
            triples.append((cmd, arg1, arg2))
        return cls(tuple(triples), _foreigndom(args[1:]))


@dataclass(frozen=True, slots=True)
class UpdateVaMappingArgs(_Args):
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

    @classmethod
    def from_wire(cls, raw: tuple[object, ...], depth: int) -> Self:
        va, val, flags = _shape(raw, "update_va_mapping args", 3)
        return cls(cast(int, va), cast(int, val), cast(int, flags))

    @classmethod
    def from_client(cls, *args: object) -> Self:
        va, val, flags = _ints(args, 3)
        return cls(va, val, flags)


@dataclass(frozen=True, slots=True)
class UpdateVaMappingOtherdomainArgs(_Args):
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

    @classmethod
    def from_wire(cls, raw: tuple[object, ...], depth: int) -> Self:
        va, val, flags, domid = _shape(raw, "update_va_mapping_otherdomain args", 4)
        return cls(cast(int, va), cast(int, val), cast(int, flags), cast(int, domid))

    @classmethod
    def from_client(cls, *args: object) -> Self:
        va, val, flags, domid = _ints(args, 4)
        return cls(va, val, flags, domid)


@dataclass(frozen=True, slots=True)
class VmAssistArgs(_Args):
    """``HYPERVISOR_vm_assist(cmd, type)``, both u32."""

    OP: ClassVar[int] = HYPERVISOR_vm_assist
    cmd: int
    type: int

    def _validate(self) -> None:
        _int(self.cmd, "vm_assist cmd", 0, _U32)
        _int(self.type, "vm_assist type", 0, _U32)

    def to_wire(self) -> tuple[object, ...]:
        return (self.cmd, self.type)

    @classmethod
    def from_wire(cls, raw: tuple[object, ...], depth: int) -> Self:
        cmd, typ = _shape(raw, "vm_assist args", 2)
        return cls(cast(int, cmd), cast(int, typ))

    @classmethod
    def from_client(cls, *args: object) -> Self:
        cmd, typ = _ints(args, 2)
        return cls(cmd, typ)


@dataclass(frozen=True, slots=True)
class MulticallArgs(_Args):
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

    @property
    def record_count(self) -> int:
        return sum(call.args.record_count for call in self.calls)

    @property
    def largest_batch(self) -> int:
        return max((call.args.largest_batch for call in self.calls), default=0)

    @property
    def mmu_update_records(self) -> int:
        return sum(call.args.mmu_update_records for call in self.calls)

    @property
    def multicall_entries(self) -> int:
        return len(self.calls) + sum(call.args.multicall_entries for call in self.calls)

    def to_wire(self) -> tuple[object, ...]:
        return (tuple((c.op, *c.args.to_wire()) for c in self.calls),)

    @classmethod
    def from_wire(cls, raw: tuple[object, ...], depth: int) -> Self:
        if depth >= MAX_MULTICALL_DEPTH:
            _fail(_TOO_LARGE, f"multicalls nest deeper than {MAX_MULTICALL_DEPTH}")
        (calls,) = _shape(raw, "multicall args", 1)
        built = []
        for item in _tuple(calls, "multicall calls", MAX_MULTICALL_CALLS):
            entry = _tuple(item, "multicall call", 1 + MAX_HYPERCALL_ARGS)
            if not entry:
                _fail(_BAD_TYPE, "a multicall call must start with its hypercall number")
            op = _int(entry[0], "op", 0, _U32)
            built.append(Call(op, args_from_wire(op, entry[1:], depth + 1)))
        return cls(tuple(built))

    @classmethod
    def from_client(cls, *args: object) -> Self:
        """``(calls,)``: each a :class:`Call` or an ``(op, *args)`` tuple."""
        if len(args) != 1 or not isinstance(args[0], Iterable):
            raise TypeError("a multicall takes one sequence of calls")
        built: list[Call] = []
        for call in args[0]:
            if isinstance(call, Call):
                built.append(call)
            elif isinstance(call, tuple | list) and call and isinstance(call[0], int):
                built.append(make_call(call[0], *call[1:]))
            else:
                raise TypeError(f"a multicall entry must be (op, *args), not {_tname(call)}")
        return cls(tuple(built))


@dataclass(frozen=True, slots=True)
class RawArgs(_Args):
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

    @classmethod
    def from_wire(cls, raw: tuple[object, ...], depth: int) -> Self:
        return cls(cast("tuple[int, ...]", raw))

    @classmethod
    def from_client(cls, *args: object) -> Self:
        return cls(_ints(args, len(args)))


HypercallArgs = (
    MmuUpdateArgs
    | MmuextOpArgs
    | UpdateVaMappingArgs
    | UpdateVaMappingOtherdomainArgs
    | VmAssistArgs
    | MulticallArgs
    | RawArgs
)

#: The argument class of every implemented hypercall number.
ARGS_FOR_OP: Final[dict[int, type[HypercallArgs]]] = {
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


def check_op_args(op: object, args: object) -> None:
    """``args`` must be the class for hypercall ``op`` (RawArgs if unknown)."""
    op = _int(op, "op", 0, _U32)
    expected = ARGS_FOR_OP.get(op, RawArgs)
    if type(args) is not expected:
        _fail(_BAD_TYPE, f"hypercall {op} takes {expected.__name__}, not {_tname(args)}")


@dataclass(frozen=True, slots=True)
class Call(_Validated):
    """One hypercall: its number and its arguments (also a multicall entry).

    ``args`` must be the class for ``op`` (``MmuUpdateArgs`` for 1, ...) or
    ``RawArgs`` for numbers pvemu does not implement.
    """

    op: int
    args: HypercallArgs

    def _validate(self) -> None:
        check_op_args(self.op, self.args)


def args_from_wire(op: int, raw: tuple[object, ...], depth: int = 0) -> HypercallArgs:
    """Typed arguments for hypercall ``op`` from a decoded wire tuple (strict)."""
    return ARGS_FOR_OP.get(op, RawArgs).from_wire(raw, depth)


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
        return Call(op, ARGS_FOR_OP.get(op, RawArgs).from_client(*args))
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(
            f"bad arguments for hypercall {op}: {exc}", code=_BAD_TYPE
        ) from exc
