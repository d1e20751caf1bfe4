"""Relocation: a trace's own addresses to the guest's, piecewise linear.

A replay cannot keep every range at the program's address (the guest has
its own mappings, and policy ``compact`` does not try), so each range the
trace maps is placed by the guest's ``mmap`` and remembered here; later
calls on original addresses are translated through this map, split where a
range crosses placements (``docs/traces.md``, section "Relocation").

Why ``shared``: the replay in the guest kernel is this map's only user, and
the guest may import only ``pvemu.shared``. The map cannot be computed by a
tool ahead of time and handed to the replay either: its guest side is what
the guest's ``mmap`` answers during the replay, and the replay both reads and
updates it on every event. It is pure bookkeeping over integers (no kernel,
no I/O), like the trace format (:mod:`pvemu.shared.trace`) whose addresses it
translates, so it sits next to it.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass

__all__ = ["Segment", "Run", "AddressMap"]


@dataclass(frozen=True, slots=True)
class Segment:
    """Original ``[start, end)`` lives at guest ``guest`` (same length)."""

    start: int
    end: int
    guest: int
    stack: bool = False  # MAP_STACK/MAP_GROWSDOWN: used from the top

    def to_guest(self, addr: int) -> int:
        return self.guest + (addr - self.start)


@dataclass(frozen=True, slots=True)
class Run:
    """A guest range that one original range translates to contiguously."""

    start: int
    end: int
    stack: bool = False

    @property
    def length(self) -> int:
        return self.end - self.start


class AddressMap:
    """Original address ranges -> guest ranges, piecewise linear.

    Each range the trace maps becomes a :class:`Segment` when the guest
    places it; unmapping removes (splits) segments. Translating a range
    gives guest :class:`Run` s (consecutive pieces merged when they are also
    consecutive in the guest) and the number of bytes no segment covers
    (memory the trace never mapped: the executable, ld.so, the stack).
    """

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._segs: list[Segment] = []

    def __len__(self) -> int:
        return len(self._segs)

    def segments(self) -> list[Segment]:
        return list(self._segs)

    def find(self, addr: int) -> Segment | None:
        i = bisect_right(self._starts, addr) - 1
        if i >= 0 and self._segs[i].end > addr:
            return self._segs[i]
        return None

    def translate(self, addr: int) -> int | None:
        seg = self.find(addr)
        return None if seg is None else seg.to_guest(addr)

    def pieces(self, start: int, end: int) -> list[tuple[int, int, Segment | None]]:
        """``[start, end)`` cut at segment edges, holes as ``None``."""
        out: list[tuple[int, int, Segment | None]] = []
        i = max(0, bisect_right(self._starts, start) - 1)
        at = start
        while at < end:
            while i < len(self._segs) and self._segs[i].end <= at:
                i += 1
            if i < len(self._segs) and self._segs[i].start <= at:
                seg = self._segs[i]
                stop = min(end, seg.end)
                out.append((at, stop, seg))
            else:
                stop = min(end, self._segs[i].start) if i < len(self._segs) else end
                out.append((at, stop, None))
            at = stop
        return out

    def runs(self, start: int, end: int) -> tuple[list[Run], int]:
        runs: list[Run] = []
        uncovered = 0
        for lo, hi, seg in self.pieces(start, end):
            if seg is None:
                uncovered += hi - lo
                continue
            g = seg.to_guest(lo)
            if runs and runs[-1].end == g and runs[-1].stack == seg.stack:
                runs[-1] = Run(runs[-1].start, g + (hi - lo), seg.stack)
            else:
                runs.append(Run(g, g + (hi - lo), seg.stack))
        return runs, uncovered

    def insert(self, start: int, end: int, guest: int, *, stack: bool = False) -> None:
        if not start < end:
            raise ValueError(f"empty range {start:#x}-{end:#x}")
        i = bisect_left(self._starts, start)
        if (i > 0 and self._segs[i - 1].end > start) or (
            i < len(self._segs) and self._segs[i].start < end
        ):
            raise ValueError(f"{start:#x}-{end:#x} overlaps a mapped range")
        self._starts.insert(i, start)
        self._segs.insert(i, Segment(start, end, guest, stack))

    def remove(self, start: int, end: int) -> None:
        lo = max(0, bisect_right(self._starts, start) - 1)
        hi = bisect_left(self._starts, end)
        keep: list[Segment] = []
        for seg in self._segs[lo:hi]:
            if seg.end <= start or seg.start >= end:
                keep.append(seg)
                continue
            if seg.start < start:
                keep.append(Segment(seg.start, start, seg.guest, seg.stack))
            if seg.end > end:
                keep.append(Segment(end, seg.end, seg.to_guest(end), seg.stack))
        self._segs[lo:hi] = keep
        self._starts[lo:hi] = [s.start for s in keep]

    def copy(self) -> AddressMap:
        """An independent map with the same segments (a forked process's)."""
        other = AddressMap()
        other._starts = list(self._starts)
        other._segs = list(self._segs)
        return other

    def clear(self) -> None:
        self._starts.clear()
        self._segs.clear()
