"""Little-endian u64 blobs: how ``mmu_update`` records travel (and any u64 list).

One ``bin`` value per batch, in Xen's ``struct mmu_update[]`` layout (16
bytes a record: ``ptr`` then ``val``), packed and read with :mod:`array`
and :class:`memoryview`, never per record.
"""

from __future__ import annotations

import sys
from array import array
from typing import TYPE_CHECKING, Final

from ._limits import MMU_UPDATE_SIZE

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence


_BIG_ENDIAN: Final = sys.byteorder == "big"


def pack_u64s(values: Iterable[int]) -> bytes:
    """Pack ints as consecutive little-endian u64s (e.g. mmu_update records).

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


def u64_array_blob(values: array[int]) -> bytes:
    """An ``array('Q')`` as the little-endian blob that goes on the wire (the
    one copy between the guest's record queue and the socket)."""
    if _BIG_ENDIAN:  # pragma: no cover
        values = array("Q", values)
        values.byteswap()
    return values.tobytes()


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
