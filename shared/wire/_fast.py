"""Fast paths for the messages every trap carries.

A one-record ``mmu_update`` or a trapped page-table write is one request and
one reply; the general decoder (``Message.from_wire``: key set, keyword
dict, ``_convert``, the argument class's ``from_wire``, then the
constructors' validation, the hypercall's op/args pairing twice) costs
several times what the message is worth. Each function here accepts exactly
what the general path accepts for one common shape, checks the same fields
in the same ranges once, and builds an equal message; for anything else it
returns None and the general path decodes the map (and names what is wrong).
``tests/test_wire.py`` checks that both paths agree on valid and invalid
maps alike.
"""

from __future__ import annotations

from typing import Any, Final

from pvemu.shared.abi import HYPERVISOR_mmu_update

from ._args import MmuUpdateArgs
from ._checks import _S64_MAX, _S64_MIN, _U32, _U64
from ._limits import MAX_MMU_UPDATES, MAX_REQUEST_ID, MMU_UPDATE_SIZE
from ._messages import Hypercall, Ptwr, PtwrResult, Reply, Request, Result

_new = object.__new__
_set = object.__setattr__

_MAX_REQS_BYTES: Final = MAX_MMU_UPDATES * MMU_UPDATE_SIZE
_MAX_OLDS_BYTES: Final = MAX_MMU_UPDATES * 8


def fast_request(obj: dict[Any, Any]) -> Request | None:
    """A valid ``mmu_update`` hypercall or ``ptwr`` map as its message, else None.

    A map with as many keys as the message has fields, every one of them
    present, has exactly the message's keys.
    """
    try:
        return _request(obj)
    except KeyError:
        return None


def fast_reply(obj: dict[Any, Any]) -> Reply | None:
    """A valid ``result`` or ``ptwr_result`` map as its message, else None."""
    try:
        return _reply(obj)
    except KeyError:
        return None


def _request(obj: dict[Any, Any]) -> Request | None:
    kind = obj["t"]
    if kind == "hypercall":
        if len(obj) != 4:
            return None
        rid, op, args = obj["id"], obj["op"], obj["args"]
        if (
            type(rid) is not int
            or not 0 <= rid <= MAX_REQUEST_ID
            or type(op) is not int
            or op != HYPERVISOR_mmu_update
            or type(args) is not tuple
            or len(args) != 2
        ):
            return None
        reqs, foreigndom = args
        if (
            type(reqs) is not bytes
            or len(reqs) % MMU_UPDATE_SIZE
            or len(reqs) > _MAX_REQS_BYTES
            or type(foreigndom) is not int
            or not 0 <= foreigndom <= _U32
        ):
            return None
        mmu = _new(MmuUpdateArgs)
        _set(mmu, "reqs", reqs)
        _set(mmu, "foreigndom", foreigndom)
        hypercall = _new(Hypercall)
        _set(hypercall, "id", rid)
        _set(hypercall, "op", op)
        _set(hypercall, "args", mmu)
        return hypercall
    if kind == "ptwr":
        # ``clear_bits`` may be left out (then 0): five keys without it, six with.
        size = len(obj)
        if size == 5:
            clear_bits = 0
        elif size == 6:
            clear_bits = obj["clear_bits"]
        else:
            return None
        rid, maddr, val, exchange = obj["id"], obj["maddr"], obj["val"], obj["exchange"]
        if (
            type(rid) is not int
            or not 0 <= rid <= MAX_REQUEST_ID
            or type(maddr) is not int
            or not 0 <= maddr <= _U64
            or type(val) is not int
            or not 0 <= val <= _U64
            or type(exchange) is not bool
            or type(clear_bits) is not int
            or not 0 <= clear_bits <= _U64
            or (clear_bits and val)
        ):
            return None
        ptwr = _new(Ptwr)
        _set(ptwr, "id", rid)
        _set(ptwr, "maddr", maddr)
        _set(ptwr, "val", val)
        _set(ptwr, "exchange", exchange)
        _set(ptwr, "clear_bits", clear_bits)
        return ptwr
    return None


def _reply(obj: dict[Any, Any]) -> Reply | None:
    kind = obj["t"]
    if kind == "result":
        # ``olds`` may be left out (then empty): four keys without it, five with.
        size = len(obj)
        if size == 4:
            olds = b""
        elif size == 5:
            olds = obj["olds"]
            if type(olds) is not bytes or len(olds) % 8 or len(olds) > _MAX_OLDS_BYTES:
                return None
        else:
            return None
        rid, rc, done = obj["id"], obj["rc"], obj["done"]
        if (
            type(rid) is not int
            or not 0 <= rid <= MAX_REQUEST_ID
            or type(rc) is not int
            or not _S64_MIN <= rc <= _S64_MAX
            or type(done) is not int
            or not 0 <= done <= _U64
            or len(olds) // 8 > done
        ):
            return None
        result = _new(Result)
        _set(result, "id", rid)
        _set(result, "rc", rc)
        _set(result, "done", done)
        _set(result, "olds", olds)
        return result
    if kind == "ptwr_result":
        if len(obj) != 4:
            return None
        rid, rc, old = obj["id"], obj["rc"], obj["old"]
        if (
            type(rid) is not int
            or not 0 <= rid <= MAX_REQUEST_ID
            or type(rc) is not int
            or not _S64_MIN <= rc <= _S64_MAX
            or type(old) is not int
            or not 0 <= old <= _U64
        ):
            return None
        ptwr_result = _new(PtwrResult)
        _set(ptwr_result, "id", rid)
        _set(ptwr_result, "rc", rc)
        _set(ptwr_result, "old", old)
        return ptwr_result
    return None
