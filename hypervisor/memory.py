"""Machine memory: the MFN space, the free pool and one memfd per domain.

Each domain's frames live in their own memfd (offset = PFN x 4096) so that the
server can hand exactly that memory, read-only, to the guest and nothing else.
MFNs are drawn from a shuffled pool so that a domain's frames are scattered, as
on a real machine: guest code that assumes pfn == mfn breaks here, as it would
under Xen.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import weakref
from array import array
from typing import Final

import numpy as np
from numpy.typing import NDArray

from pvemu.shared import wire
from pvemu.shared.x86 import PAGE_SHIFT, PAGE_SIZE

from .frametable import NO_OWNER, PINNED, FrameTable

WORDS_PER_FRAME: Final = PAGE_SIZE // 8
_ZERO_FRAME: Final = memoryview(bytes(PAGE_SIZE)).cast("Q")

#: Kernel value of F_SEAL_FUTURE_WRITE (not exported by Python 3.11's fcntl).
F_SEAL_FUTURE_WRITE: Final = 0x10


class OutOfMemory(Exception):
    """The machine has too few free frames for the request."""


class DomainMemory:
    """One domain's frames: a memfd mapped read-write by the hypervisor.


    ``words`` is the mapping as u64s for the per-record code, ``entries`` the
    same memory as a (nr_frames, 512) u64 numpy array for the batched path.
    After the frames comes the p2m (``wire.p2m_offset``): the guest maps the
    whole memfd read-only and reads its PFN -> MFN list from there, so the
    list never has to fit in a message, whatever the domain's size.
    """

    __slots__ = ("__weakref__", "_close_fd", "entries", "fd", "map", "nr_frames", "words")

    def __init__(self, name: str, p2m: array[int]) -> None:
        nr_frames = len(p2m)
        self.nr_frames = nr_frames
        size = wire.p2m_offset(nr_frames) + wire.p2m_bytes(nr_frames)
        self.fd = os.memfd_create(f"pvemu-{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED)
        except BaseException:
            os.close(self.fd)
            raise
        start = wire.p2m_offset(nr_frames)
        tail = np.frombuffer(self.map, dtype="<u8", count=nr_frames, offset=start)
        tail[:] = np.frombuffer(p2m, dtype=np.dtype(p2m.typecode))
        del tail  # an exported buffer would keep the mapping from closing
        self.words = memoryview(self.map).cast("Q")[: nr_frames * WORDS_PER_FRAME]
        self.entries: NDArray[np.uint64] = np.frombuffer(
            self.map, dtype=np.uint64, count=nr_frames * WORDS_PER_FRAME
        ).reshape(nr_frames, WORDS_PER_FRAME)
        # The mapping frees itself with the object; the descriptor would not:
        # a dropped Hypervisor (tests, fuzzers) must not leak one per domain.
        self._close_fd = weakref.finalize(self, os.close, self.fd)

    def seal(self) -> None:
        """Forbid new writable mappings and resizing: the guest may only read."""
        import fcntl

        os_seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | F_SEAL_FUTURE_WRITE
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, os_seals)

    def close(self) -> None:
        self.words.release()
        del self.entries
        # A numpy view can outlive the call that made it (a stored exception's
        # traceback holds it): the mapping then goes when that view does.
        with contextlib.suppress(BufferError):
            self.map.close()
        self._close_fd()


class MachineMemory:
    """Reads and writes machine addresses, routed to the owning domain's memfd.

    Implements the hardware model's ``PhysMemory`` protocol, so the same page
    walks run over machine memory here and over a bytearray in native mode.
    """

    def __init__(self, frames: FrameTable, *, seed: int = 0) -> None:
        self.frames = frames
        shuffled = np.random.default_rng(seed).permutation(np.arange(1, frames.nr_frames))
        # MFN 0 goes first (to Xen's own frame) so it never names a guest frame:
        # Xen's NEW_USER_BASEPTR uses mfn 0 for "none".
        self._free = array("I", shuffled.astype(np.uint32).tobytes())
        self._free.append(0)
        self._memories: dict[int, DomainMemory] = {}

    @property
    def free_frames(self) -> int:
        return len(self._free)

    def allocate(self, owner: int, nr_frames: int, name: str) -> tuple[DomainMemory, array[int]]:
        """Give ``owner`` ``nr_frames`` zeroed frames; returns (memory, p2m).

        The frame table is filled with array stores: a 16 GiB domain is four
        million frames, too many for a Python loop per frame.
        """
        if nr_frames <= 0:
            raise ValueError("a domain needs at least one frame")
        if owner in self._memories:
            raise ValueError(f"owner {owner} already has memory")
        if nr_frames > len(self._free):
            raise OutOfMemory(f"{nr_frames} frames requested, {len(self._free)} free")
        p2m = self._free[-nr_frames:]
        memory = DomainMemory(name, p2m)
        del self._free[-nr_frames:]
        ft = self.frames
        mfns = np.frombuffer(p2m, dtype=np.uint32)
        arrays = ft.arrays
        arrays.owner[mfns] = owner
        arrays.slot[mfns] = np.arange(nr_frames)
        arrays.count[mfns] = 1  # PGC_allocated: the owner's own reference
        self._memories[owner] = memory
        return memory, p2m

    def release(self, owner: int, p2m: array[int]) -> None:
        """Return an owner's frames to the pool and close its memfd."""
        ft = self.frames
        for mfn in [m for m in ft.m2p.overrides if ft.owner[m] == owner]:
            ft.m2p.reset(mfn)
        mfns = np.frombuffer(p2m, dtype=np.dtype(p2m.typecode))
        arrays = ft.arrays
        for column in (arrays.slot, arrays.count, arrays.type, arrays.type_count, arrays.flags):
            column[mfns] = 0
        arrays.owner[mfns] = NO_OWNER
        self._free.extend(p2m)
        memory = self._memories.pop(owner)
        memory.close()

    def pinned_frames(self, mfns: array[int]) -> list[int]:
        """The pinned frames among ``mfns``, in their order (one array pass)."""
        frames = np.frombuffer(mfns, dtype=np.dtype(mfns.typecode))
        pinned = (self.frames.arrays.flags[frames] & PINNED) != 0
        return [int(mfn) for mfn in frames[pinned]]

    def _locate(self, maddr: int) -> tuple[memoryview, int]:
        mfn = maddr >> PAGE_SHIFT
        if not 0 <= mfn < self.frames.nr_frames:
            raise IndexError(f"machine address {maddr:#x} beyond memory")
        owner = self.frames.owner[mfn]
        if owner == NO_OWNER:
            raise IndexError(f"machine address {maddr:#x} is in a free frame")
        return self._memories[owner].words, self.frames.slot[mfn] * WORDS_PER_FRAME

    def read_u64(self, maddr: int) -> int:
        words, base = self._locate(maddr)
        return int(words[base + ((maddr & (PAGE_SIZE - 1)) >> 3)])

    def write_u64(self, maddr: int, value: int) -> None:
        words, base = self._locate(maddr)
        words[base + ((maddr & (PAGE_SIZE - 1)) >> 3)] = value

    def table(self, mfn: int) -> memoryview:
        """The 512 u64 entries of a frame, as a writable view."""
        words, base = self._locate(mfn << PAGE_SHIFT)
        return words[base : base + WORDS_PER_FRAME]

    def read_bytes(self, maddr: int, length: int) -> bytes:
        mfn = maddr >> PAGE_SHIFT
        offset = maddr & (PAGE_SIZE - 1)
        if offset + length > PAGE_SIZE:
            raise ValueError("access crosses a frame boundary")
        _words, base = self._locate(maddr)
        start = base * 8 + offset
        return bytes(self._memories[self.frames.owner[mfn]].map[start : start + length])

    def write_bytes(self, maddr: int, data: bytes) -> None:
        mfn = maddr >> PAGE_SHIFT
        offset = maddr & (PAGE_SIZE - 1)
        if offset + len(data) > PAGE_SIZE:
            raise ValueError("access crosses a frame boundary")
        _words, base = self._locate(maddr)
        start = base * 8 + offset
        self._memories[self.frames.owner[mfn]].map[start : start + len(data)] = data

    def zero_frame(self, mfn: int) -> None:
        self.table(mfn)[:] = _ZERO_FRAME

    def copy_frame(self, dst: int, src: int) -> None:
        self.table(dst)[:] = self.table(src)

    def memory_of(self, owner: int) -> DomainMemory:
        return self._memories[owner]
