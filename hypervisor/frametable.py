"""The frame table: per-MFN bookkeeping as flat arrays, not one object per frame.

Xen's ``struct page_info`` reduced to what a 64-bit PV domU needs (reference
§6.1): owner, general count, type, type count, validated, pinned. Arrays keep
1 GiB of machine memory (262 144 frames) at about 4 MiB of table.
"""

from __future__ import annotations

from array import array
from typing import Final

from pvemu.shared import abi

#: Owner value of a frame that belongs to nobody (in the free pool).
NO_OWNER: Final = -1

# Flag bits in ``FrameTable.flags``.
VALIDATED: Final = 0x1
PINNED: Final = 0x2

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


class FrameTable:
    """Parallel arrays indexed by MFN.

    ``slot`` is the frame's index inside its owner's memfd (the PFN it was
    created as); ``m2p`` is the guest-visible machine-to-phys table that
    ``MMU_MACHPHYS_UPDATE`` writes.
    """

    __slots__ = ("count", "flags", "m2p", "nr_frames", "owner", "slot", "type", "type_count")

    def __init__(self, nr_frames: int) -> None:
        if nr_frames <= 0:
            raise ValueError("a machine needs at least one frame")
        self.nr_frames = nr_frames
        self.owner = array("i", [NO_OWNER]) * nr_frames
        self.slot = array("I", [0]) * nr_frames
        self.count = array("I", [0]) * nr_frames
        self.type = array("B", [abi.PGT_none]) * nr_frames
        self.type_count = array("I", [0]) * nr_frames
        self.flags = array("B", [0]) * nr_frames
        self.m2p = array("Q", [0]) * nr_frames

    def valid(self, mfn: int) -> bool:
        return 0 <= mfn < self.nr_frames

    def validated(self, mfn: int) -> bool:
        return bool(self.flags[mfn] & VALIDATED)

    def pinned(self, mfn: int) -> bool:
        return bool(self.flags[mfn] & PINNED)

    def reset(self, mfn: int) -> None:
        """Return a frame's bookkeeping to the free state."""
        self.owner[mfn] = NO_OWNER
        self.slot[mfn] = 0
        self.count[mfn] = 0
        self.type[mfn] = abi.PGT_none
        self.type_count[mfn] = 0
        self.flags[mfn] = 0
        self.m2p[mfn] = 0

    def describe(self, mfn: int) -> str:
        """One-line state of a frame, for audit messages and logs."""
        return (
            f"mfn {mfn:#x} owner={self.owner[mfn]} count={self.count[mfn]} "
            f"type={TYPE_NAMES.get(self.type[mfn], '?')} type_count={self.type_count[mfn]} "
            f"validated={self.validated(mfn)} pinned={self.pinned(mfn)}"
        )

    def table_bytes(self) -> int:
        """Bytes the arrays occupy (the cost per frame the issue bounds)."""
        return sum(
            a.itemsize * len(a)
            for a in (
                self.owner,
                self.slot,
                self.count,
                self.type,
                self.type_count,
                self.flags,
                self.m2p,
            )
        )
