"""The messages: frozen, slotted dataclasses validated on construction and on
decode, one class per ``"t"`` value.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar, Final, NamedTuple, Self, TypeVar

from pvemu.shared.errors import LocalProtocolError, RemoteProtocolError
from pvemu.shared.mmu import AccessKind
from pvemu.shared.x86 import PAGE_SIZE

from ._args import Call, HypercallArgs, args_from_wire, check_op_args, make_call
from ._blob import unpack_u64s
from ._checks import (
    _BAD_TYPE,
    _MALFORMED,
    _OUT_OF_RANGE,
    _S64_MAX,
    _S64_MIN,
    _U16,
    _U32,
    _U64,
    _bytes,
    _dict,
    _fail,
    _int,
    _length,
    _request_id,
    _shape,
    _stats,
    _str,
    _tname,
    _tuple,
    _Validated,
)
from ._limits import (
    MAX_ACCESS_LEN,
    MAX_DOMAIN_FRAMES,
    MAX_FEATURES,
    MAX_KERNEL_WRITE_LEN,
    MAX_LIMITS,
    MAX_MEMORY_MIB,
    MAX_MMU_UPDATES,
    MAX_MULTICALL_CALLS,
    MAX_NAME_LEN,
    MAX_REQUEST_ID,
    MAX_TEXT_LEN,
    MAX_USER_ACCESSES,
    MAX_VCPUS,
    MAX_VIOLATIONS,
    SECRET_LEN,
)

_new = object.__new__
_set = object.__setattr__


class Message(_Validated):
    """Base of every message. ``TYPE`` is the ``"t"`` value on the wire."""

    __slots__ = ()

    TYPE: ClassVar[str]
    #: File descriptors sent as SCM_RIGHTS ancillary data with this message.
    ANCILLARY_FDS: ClassVar[int] = 0
    _FIELDS: ClassVar[tuple[str, ...]]
    _KEYS: ClassVar[frozenset[str]]
    #: Fields a map may leave out, decoded as their defaults (fields added
    #: after a message first shipped, so older peers' maps stay valid).
    OPTIONAL: ClassVar[frozenset[str]] = frozenset()
    _DEFAULTS: ClassVar[dict[str, object]]

    id: Any  # narrowed by each subclass (int, or int | None for ErrorReply)

    def to_wire(self) -> dict[str, object]:
        """The msgpack map for this message (``"t"`` first). The messages of
        every trap spell theirs out (no loop over the fields)."""
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
            data = cls._with_defaults(data)
        kwargs = {name: data[name] for name in cls._FIELDS}
        cls._convert(kwargs)
        return cls(**kwargs)

    @classmethod
    def _with_defaults(cls, data: dict[Any, Any]) -> dict[Any, Any]:
        """``data`` with the :attr:`OPTIONAL` fields it leaves out at their
        defaults; any other missing or extra key is ``malformed``."""
        absent = cls._KEYS.difference(k for k in data if isinstance(k, str))
        missing = sorted(absent - cls.OPTIONAL)
        extra = sorted(repr(k) for k in data if k not in cls._KEYS)
        if missing or extra:
            _fail(_MALFORMED, f"{cls.TYPE}: missing fields {missing}, unexpected fields {extra}")
        return {**data, **{name: cls._DEFAULTS[name] for name in absent}}


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
    dataclass_type: Any = cls  # fields() wants a dataclass; _register runs after @dataclass
    cls._FIELDS = tuple(f.name for f in fields(dataclass_type))
    cls._KEYS = frozenset(("t", *cls._FIELDS))
    cls._DEFAULTS = {
        f.name: f.default
        for f in fields(dataclass_type)
        if f.name in cls.OPTIONAL and f.default is not MISSING
    }
    assert cls._DEFAULTS.keys() == cls.OPTIONAL, f"{cls.__name__}: optional fields need defaults"
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


#: The spellings of the hardware model's access kinds (``AccessKind`` values).
_ACCESS_KINDS: Final = frozenset(kind.value for kind in AccessKind)

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
        check_op_args(self.op, self.args)

    def to_wire(self) -> dict[str, object]:
        return {"t": "hypercall", "id": self.id, "op": self.op, "args": self.args.to_wire()}

    @classmethod
    def for_call(cls, id: int, call: Call) -> Hypercall:
        """The request that carries ``call``. A :class:`Call` was validated
        when it was built (op and args agree, every field in range), so only
        the id is checked: the guest's per-trap path does not check twice."""
        _request_id(id)
        hypercall = _new(cls)
        _set(hypercall, "id", id)
        _set(hypercall, "op", call.op)
        _set(hypercall, "args", call.args)
        return hypercall

    def as_call(self) -> Call:
        """The hypercall as a :class:`Call`, without validating again what
        the request's own validation checked (op and args agree)."""
        call = _new(Call)
        _set(call, "op", self.op)
        _set(call, "args", self.args)
        return call

    @classmethod
    def _convert(cls, kwargs: dict[str, Any]) -> None:
        op = _int(kwargs["op"], "op", 0, _U32)
        raw = kwargs["args"]
        if type(raw) is not tuple:
            _fail(_BAD_TYPE, f"args must be a tuple (msgpack array), not {_tname(raw)}")
        kwargs["args"] = args_from_wire(op, raw, 0)

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
    ``clear_bits``: when nonzero, an atomic clear of those bits instead of a
    write (x86 ``lock btr``/``and``, e.g. ``ptep_set_wrprotect``): the
    hypervisor stores ``old & ~clear_bits`` at apply time and returns ``old``;
    ``val`` must then be 0. The key is left out of the map when it is 0, so
    every other ptwr is encoded as before and a map without it decodes as 0.
    """

    TYPE: ClassVar[str] = "ptwr"
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"clear_bits"})
    id: int
    maddr: int
    val: int
    exchange: bool = False
    clear_bits: int = 0

    def _validate(self) -> None:
        _request_id(self.id)
        _int(self.maddr, "maddr", 0, _U64)
        _int(self.val, "val", 0, _U64)
        if type(self.exchange) is not bool:
            _fail(_BAD_TYPE, f"exchange must be a bool, not {_tname(self.exchange)}")
        if _int(self.clear_bits, "clear_bits", 0, _U64) and self.val:
            _fail(_OUT_OF_RANGE, f"val must be 0 with clear_bits, not {self.val:#x}")

    def to_wire(self) -> dict[str, object]:
        out: dict[str, object] = {
            "t": "ptwr",
            "id": self.id,
            "maddr": self.maddr,
            "val": self.val,
            "exchange": self.exchange,
        }
        if self.clear_bits:
            out["clear_bits"] = self.clear_bits
        return out


@_register
@dataclass(frozen=True, slots=True)
class RunUser(Request):
    """User accesses for this connection's vCPU; stops at the first fault.

    ``resume``: the vCPU returns to user mode through ``HYPERVISOR_iret``
    after the kernel handled the fault that ended its previous run, so the
    hypervisor counts that hypercall before running the accesses (64-bit
    PV has no other way back to user mode). Optional on the wire: a map
    without ``"resume"`` is False, and False is not encoded, so a plain run
    is the same bytes as before the field existed.
    """

    TYPE: ClassVar[str] = "run_user"
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"resume"})
    id: int
    accesses: tuple[Access, ...]
    resume: bool = False

    def _validate(self) -> None:
        _request_id(self.id)
        if type(self.resume) is not bool:
            _fail(_BAD_TYPE, f"resume must be a bool, not {_tname(self.resume)}")
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

    def to_wire(self) -> dict[str, object]:
        out: dict[str, object] = {"t": "run_user", "id": self.id, "accesses": self.accesses}
        if self.resume:
            out["resume"] = True
        return out


@_register
@dataclass(frozen=True, slots=True)
class KernelWrite(Request):
    """A plain store of ``data`` at ``maddr`` by the guest kernel through its
    linear map (not a trap: the hypervisor only plays the MMU's part).

    ``data`` is 1..4096 bytes and stays within the 4 KiB frame of ``maddr``.
    Answered by :class:`KernelWriteResult`.
    """

    TYPE: ClassVar[str] = "kernel_write"
    id: int
    maddr: int
    data: bytes

    def _validate(self) -> None:
        _request_id(self.id)
        _int(self.maddr, "maddr", 0, _U64)
        if not _bytes(self.data, "data", MAX_KERNEL_WRITE_LEN):
            _fail(_OUT_OF_RANGE, "kernel write data must not be empty")
        if (self.maddr & (PAGE_SIZE - 1)) + len(self.data) > PAGE_SIZE:
            _fail(
                _OUT_OF_RANGE,
                f"kernel write of {len(self.data)} bytes at {self.maddr:#x} "
                "crosses a frame boundary",
            )


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

    ``nr_frames`` is the domain's size in frames. The memfd holds those
    frames (PFN x 4096) and, from :func:`p2m_offset`, the p2m: ``nr_frames``
    little-endian u64 MFNs, index = PFN, as Xen's domain builder leaves the
    mfn_list in memory the guest can read rather than in a message.
    """

    TYPE: ClassVar[str] = "welcome"
    ANCILLARY_FDS: ClassVar[int] = 1
    id: int
    domid: int
    vcpu: int
    nr_frames: int
    secret: bytes
    limits: dict[str, int]
    features: tuple[int, ...]

    def _validate(self) -> None:
        _request_id(self.id)
        _int(self.domid, "domid", 0, _U16)
        _int(self.vcpu, "vcpu", 0, MAX_VCPUS - 1, _OUT_OF_RANGE)
        _int(self.nr_frames, "nr_frames", 1, MAX_DOMAIN_FRAMES, _OUT_OF_RANGE)
        if len(_bytes(self.secret, "secret", SECRET_LEN)) != SECRET_LEN:
            _fail(_BAD_TYPE, f"secret must be exactly {SECRET_LEN} bytes")
        for key, value in _dict(self.limits, "limits", MAX_LIMITS).items():
            _str(key, "limits key", MAX_NAME_LEN, min_len=1)
            _int(value, f"limits[{key!r}]", 0, _U64)
        for feature in _tuple(self.features, "features", MAX_FEATURES):
            _int(feature, "feature", 0, _U32)

    @property
    def memfd_size(self) -> int:
        """Bytes of the memfd: the frames, then the page-aligned p2m."""
        return p2m_offset(self.nr_frames) + p2m_bytes(self.nr_frames)


def p2m_offset(nr_frames: int) -> int:
    """Where the p2m starts in a domain's memfd: right after its frames."""
    return nr_frames * PAGE_SIZE


def p2m_bytes(nr_frames: int) -> int:
    """The p2m's length in the memfd, rounded up to whole pages."""
    return -(-nr_frames * 8 // PAGE_SIZE) * PAGE_SIZE


@_register
@dataclass(frozen=True, slots=True)
class Result(Reply):
    """Result of every hypercall but multicall (unknown ones included).

    ``rc`` is 0 or a negated Xen errno; ``done`` counts records/ops completed
    (0 where meaningless).

    ``olds``: pvemu's extension (not Xen's), the entries that the applied
    ``MMU_PT_XCHG_PVEMU`` records of an ``mmu_update`` replaced, in record
    order, as little-endian u64s (one per applied exchange record, so at
    most ``done``). Optional on the wire: left out when empty, so every
    other result is the same bytes as before the field existed.
    """

    TYPE: ClassVar[str] = "result"
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"olds"})
    id: int
    rc: int
    done: int = 0
    olds: bytes = b""

    def _validate(self) -> None:
        rid, rc, done, olds = self.id, self.rc, self.done, self.olds
        if (  # the reply to every trap: one test when all is well
            type(rid) is int
            and 0 <= rid <= MAX_REQUEST_ID
            and type(rc) is int
            and _S64_MIN <= rc <= _S64_MAX
            and type(done) is int
            and 0 <= done <= _U64
            and olds == b""
        ):
            return
        _request_id(rid)
        _int(rc, "rc", _S64_MIN, _S64_MAX)
        _int(done, "done", 0, _U64)
        _bytes(olds, "olds", MAX_MMU_UPDATES * 8, multiple=8)
        if len(olds) // 8 > done:
            _fail(_OUT_OF_RANGE, f"olds has {len(olds) // 8} values for {done} records done")

    def to_wire(self) -> dict[str, object]:
        if self.olds:
            return {
                "t": "result",
                "id": self.id,
                "rc": self.rc,
                "done": self.done,
                "olds": self.olds,
            }
        return {"t": "result", "id": self.id, "rc": self.rc, "done": self.done}

    def old_values(self) -> list[int]:
        """``olds`` as ints, in record order."""
        return list(unpack_u64s(self.olds))


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
        rid, rc, old = self.id, self.rc, self.old
        if (  # the reply to every trapped write: one test when all is well
            type(rid) is int
            and 0 <= rid <= MAX_REQUEST_ID
            and type(rc) is int
            and _S64_MIN <= rc <= _S64_MAX
            and type(old) is int
            and 0 <= old <= _U64
        ):
            return
        _request_id(rid)
        _int(rc, "rc", _S64_MIN, _S64_MAX)
        _int(old, "old", 0, _U64)

    def to_wire(self) -> dict[str, object]:
        return {"t": "ptwr_result", "id": self.id, "rc": self.rc, "old": self.old}


@_register
@dataclass(frozen=True, slots=True)
class KernelWriteResult(Reply):
    """Result of a kernel store: 0, or -EFAULT when the linear mapping of
    the frame does not allow it (nothing was written)."""

    TYPE: ClassVar[str] = "kernel_write_result"
    id: int
    rc: int

    def _validate(self) -> None:
        _request_id(self.id)
        _int(self.rc, "rc", _S64_MIN, _S64_MAX)


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
