"""The frame table: per-MFN bookkeeping as flat arrays, not one object per frame.

Xen's ``struct page_info`` reduced to what a 64-bit PV domU needs (docs/sources.md
§7): owner, general count, type, type count, validated, pinned, and whether
the owner's kernel linear mapping of the frame is read-only. 16 bytes a
frame: 1 GiB of machine memory (262 144 frames) costs 4 MiB of table.
"""

from __future__ import annotations

import sys
from array import array
from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray

from pvemu.shared import abi

#: Owner value of a frame that belongs to nobody (in the free pool).
NO_OWNER: Final = -1

# Flag bits in ``FrameTable.flags``.
VALIDATED: Final = 0x1
PINNED: Final = 0x2
#: The owner's kernel linear mapping of the frame is read-only (clear: the
#: default, writable). A bit here rather than a table of its own: the frame
#: table stays 16 bytes a frame, and a freed frame's flags are zeroed, so a
#: reused frame starts writable.
LINEAR_RO: Final = 0x4

PAGE_TABLE_TYPES: Final = frozenset(
    {
        abi.PGT_l1_page_table,
        abi.PGT_l2_page_table,
        abi.PGT_l3_page_table,
        abi.PGT_l4_page_table,
    }
)

TYPE_NAMES: Final = {
    abi.PGT_none: "none",
    abi.PGT_l1_page_table: "L1",
    abi.PGT_l2_page_table: "L2",
    abi.PGT_l3_page_table: "L3",
    abi.PGT_l4_page_table: "L4",
    abi.PGT_seg_desc_page: "seg_desc",
    abi.PGT_shared_page: "shared",
    abi.PGT_writable_page: "writable",
}


#: Bytes one entry of the M2P override dict costs (a dict slot and two ints),
#: what ``table_bytes`` charges for it.
M2P_OVERRIDE_BYTES: Final = 3 * 8 + 2 * 32


class M2pTable:
    """The guest-visible machine-to-phys table, sparse.

    Every frame's M2P entry is the PFN it was created as (its ``slot``) until
    ``MMU_MACHPHYS_UPDATE`` stores another value; only those overrides are
    kept, so the common case costs no bytes per frame. A free frame reads 0.
    """

    __slots__ = ("_slot", "overrides")

    def __init__(self, slot: array[int]) -> None:
        self._slot = slot
        self.overrides: dict[int, int] = {}

    def __getitem__(self, mfn: int) -> int:
        value = self.overrides.get(mfn)
        return self._slot[mfn] if value is None else value

    def __setitem__(self, mfn: int, value: int) -> None:
        if value == self._slot[mfn]:
            self.overrides.pop(mfn, None)
        else:
            self.overrides[mfn] = value

    def reset(self, mfn: int) -> None:
        """The frame went back to the pool: its entry is the default again."""
        self.overrides.pop(mfn, None)


@dataclass(frozen=True, slots=True)
class FrameArrays:
    """Zero-copy numpy views of a :class:`FrameTable`'s arrays, for the code
    that works on many frames at once (batched mmu_update, allocation)."""

    owner: NDArray[np.int16]
    slot: NDArray[np.uint32]
    count: NDArray[np.uint32]
    type: NDArray[np.uint8]
    type_count: NDArray[np.uint32]
    flags: NDArray[np.uint8]

    @classmethod
    def of(cls, ft: FrameTable) -> FrameArrays:
        return cls(
            np.frombuffer(ft.owner, dtype=np.int16),
            np.frombuffer(ft.slot, dtype=np.uint32),
            np.frombuffer(ft.count, dtype=np.uint32),
            np.frombuffer(ft.type, dtype=np.uint8),
            np.frombuffer(ft.type_count, dtype=np.uint32),
            np.frombuffer(ft.flags, dtype=np.uint8),
        )


class FrameTable:
    """Parallel arrays indexed by MFN, 16 bytes a frame.

    ``owner`` is an int16: every domid fits (``NO_OWNER`` is -1, the reserved
    ids end at ``DOMID_XEN`` = 0x7FF2 < 2**15). ``slot`` is the frame's index
    inside its owner's memfd (the PFN it was created as); ``m2p`` is the
    guest-visible machine-to-phys table that ``MMU_MACHPHYS_UPDATE`` writes,
    sparse over ``slot`` (:class:`M2pTable`).
    """

    __slots__ = (
        "arrays",
        "count",
        "flags",
        "m2p",
        "nr_frames",
        "owner",
        "slot",
        "type",
        "type_count",
    )

    def __init__(self, nr_frames: int) -> None:
        if nr_frames <= 0:
            raise ValueError("a machine needs at least one frame")
        self.nr_frames = nr_frames
        self.owner = array("h", [NO_OWNER]) * nr_frames
        self.slot = array("I", [0]) * nr_frames
        self.count = array("I", [0]) * nr_frames
        self.type = array("B", [abi.PGT_none]) * nr_frames
        self.type_count = array("I", [0]) * nr_frames
        self.flags = array("B", [0]) * nr_frames
        self.m2p = M2pTable(self.slot)
        #: The same arrays as numpy views (they never resize: made once).
        self.arrays = FrameArrays.of(self)

    def valid(self, mfn: int) -> bool:
        return 0 <= mfn < self.nr_frames

    def validated(self, mfn: int) -> bool:
        return bool(self.flags[mfn] & VALIDATED)

    def pinned(self, mfn: int) -> bool:
        return bool(self.flags[mfn] & PINNED)

    def linear_ro(self, mfn: int) -> bool:
        """The kernel's linear mapping of the frame is read-only."""
        return bool(self.flags[mfn] & LINEAR_RO)

    def table_in_use(self, mfn: int) -> bool:
        """A page table something references (type L1..L4, type count > 0):
        Xen allows no writable mapping of it."""
        return bool(self.type_count[mfn]) and self.type[mfn] in PAGE_TABLE_TYPES

    def describe(self, mfn: int) -> str:
        """One-line state of a frame, for audit messages and logs."""
        return (
            f"mfn {mfn:#x} owner={self.owner[mfn]} count={self.count[mfn]} "
            f"type={TYPE_NAMES.get(self.type[mfn], '?')} type_count={self.type_count[mfn]} "
            f"validated={self.validated(mfn)} pinned={self.pinned(mfn)}"
            + (" linear_ro" if self.linear_ro(mfn) else "")
        )

    def table_bytes(self) -> int:
        """Bytes the table occupies: the arrays, plus the M2P overrides (the
        dict itself and each entry) that guests have written."""
        arrays = (self.owner, self.slot, self.count, self.type, self.type_count, self.flags)
        overrides = self.m2p.overrides
        extra = sys.getsizeof(overrides) + M2P_OVERRIDE_BYTES * len(overrides) if overrides else 0
        return sum(a.itemsize * len(a) for a in arrays) + extra
