"""Field validators shared by the argument and message types.

They raise :class:`LocalProtocolError` with a wire error code; the
connection turns that into a non-fatal :class:`RemoteProtocolError` when the
value came from the peer.
"""

from __future__ import annotations

from typing import Final, NoReturn

from pvemu.shared.errors import LocalProtocolError, WireErrorCode

from ._limits import MAX_MAP_LEN, MAX_NAME_LEN, MAX_REQUEST_ID, MAX_STATS_DEPTH

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
