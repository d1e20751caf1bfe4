"""Hostile guests: the memfd a guest receives, attacked from the guest's side.

It is sealed; every write, resize and hole punch is EPERM; no shared writable
mapping can be had; a store through the read-only mapping is a SIGSEGV; past
its end there is nothing; and it never shows another domain's memory. After
each attack nothing of either domain moved.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Final

import pytest
import trio

from pvemu.guest.client import Domain
from pvemu.shared import wire
from pvemu.shared.x86 import PAGE_SIZE
from pvemu.shared.x86 import make_pte as pte
from tests.hostile.scene import (
    DOMAIN_FRAMES,
    MACHINE_FRAMES,
    USER_RW,
    Scene,
    Snapshot,
    assert_unchanged,
    probe,
    scene,
    snapshot,
)
from tests.hvproc import HypervisorProcess

LIBC: Final = ctypes.CDLL(None, use_errno=True)
LIBC.mmap.restype = ctypes.c_void_p
LIBC.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
LIBC.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
LIBC.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
LIBC.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
MAP_FAILED: Final = ctypes.c_void_p(-1).value
F_SEAL_FUTURE_WRITE: Final = 0x10
FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02


def memfd(dom: Domain) -> int:
    """The domain's memory fd as the guest received it (SCM_RIGHTS)."""
    return dom.memory_fd


def denied(call: Callable[[], object]) -> int:
    """The errno a refused syscall raised (fails if it was not refused)."""
    with pytest.raises(OSError) as caught:
        call()
    assert caught.value.errno is not None
    return caught.value.errno


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if LIBC.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


async def calm(s: Scene, before: Snapshot) -> None:
    """After a memfd attack: no byte, counter or frame moved; all still works."""
    assert_unchanged(s, before, await snapshot(s))
    await probe(s)


async def test_memfd_is_sealed(hvp: HypervisorProcess) -> None:
    """The guest's fd is exactly its own memory and then its p2m, sealed
    against writes and resizing."""
    async with scene(hvp) as s:
        fd = memfd(s.a.dom)
        p2m_start = wire.p2m_offset(DOMAIN_FRAMES)
        assert os.fstat(fd).st_size == p2m_start + wire.p2m_bytes(DOMAIN_FRAMES)
        tail = os.pread(fd, DOMAIN_FRAMES * 8, p2m_start)
        assert tail == wire.pack_u64s(s.a.dom.p2m)
        assert denied(lambda: os.pwrite(fd, b"\0" * 8, p2m_start)) == errno.EPERM
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        wanted = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | F_SEAL_FUTURE_WRITE
        assert seals & wanted == wanted
        # F_SEAL_WRITE cannot be added while the hypervisor maps it writable.
        assert denied(lambda: fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)) == errno.EBUSY


async def test_memfd_write_syscalls_are_refused(hvp: HypervisorProcess) -> None:
    """Every way to write, resize or punch the memfd from the guest: EPERM."""
    async with scene(hvp) as s:
        fd = memfd(s.a.dom)
        size = os.fstat(fd).st_size
        l1_offset = s.a.dom.pfn_of(s.a.l1) * PAGE_SIZE
        before = await snapshot(s)
        rpipe, wpipe = os.pipe()
        source = os.open(__file__, os.O_RDONLY)
        try:
            os.write(wpipe, b"\xff" * 8)
            attempts: dict[str, Callable[[], object]] = {
                "write": lambda: os.write(fd, b"\xff" * 8),
                "pwrite": lambda: os.pwrite(fd, b"\xff" * 8, l1_offset),
                "pwritev": lambda: os.pwritev(fd, [b"\xff" * 8], l1_offset),
                "splice": lambda: os.splice(rpipe, fd, 8, offset_dst=l1_offset),
                "sendfile": lambda: os.sendfile(fd, source, 0, 8),
                "ftruncate_grow": lambda: os.ftruncate(fd, size + PAGE_SIZE),
                "ftruncate_shrink": lambda: os.ftruncate(fd, size - PAGE_SIZE),
                "ftruncate_zero": lambda: os.ftruncate(fd, 0),
                "posix_fallocate_grow": lambda: os.posix_fallocate(fd, size, PAGE_SIZE),
                "punch_hole": lambda: _fallocate(
                    fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, l1_offset, PAGE_SIZE
                ),
            }
            outcomes = {name: denied(call) for name, call in attempts.items()}
        finally:
            for opened in (rpipe, wpipe, source):
                os.close(opened)
        assert outcomes == dict.fromkeys(attempts, errno.EPERM)
        assert os.fstat(fd).st_size == size
        await calm(s, before)


async def test_memfd_writable_mappings_are_refused(hvp: HypervisorProcess) -> None:
    """A shared writable mapping cannot be had: not by mmap, not by mprotect
    of a read-only one, not through a re-opened /proc/self/fd/N."""
    async with scene(hvp) as s:
        fd = memfd(s.a.dom)
        size = os.fstat(fd).st_size
        before = await snapshot(s)
        rw = mmap.PROT_READ | mmap.PROT_WRITE
        assert denied(lambda: mmap.mmap(fd, size, mmap.MAP_SHARED, rw)) == errno.EPERM
        addr = LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, MAP_FAILED)
        try:
            assert LIBC.mprotect(addr, size, rw) == -1
            assert ctypes.get_errno() == errno.EACCES
        finally:
            assert LIBC.munmap(addr, size) == 0
        reopened = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
        try:
            assert denied(lambda: os.pwrite(reopened, b"\xff" * 8, 0)) == errno.EPERM
            assert denied(lambda: mmap.mmap(reopened, size, mmap.MAP_SHARED, rw)) == errno.EPERM
        finally:
            os.close(reopened)
        await calm(s, before)


async def test_memfd_private_writable_mapping_is_a_private_copy(hvp: HypervisorProcess) -> None:
    """MAP_PRIVATE may be writable, but the writes stay in the guest's copy:
    the page table the guest scribbles over is untouched for the hypervisor."""
    async with scene(hvp) as s:
        fd = memfd(s.a.dom)
        size = os.fstat(fd).st_size
        # Walk the upper levels once, so the walk below sets no new A bits.
        assert (await s.a.dom.run_user(0, [(0, "r", 8)]))["fault"] is None
        before = await snapshot(s)
        private = mmap.mmap(fd, size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            offset = s.a.dom.pfn_of(s.a.l1) * PAGE_SIZE + 5 * 8
            forged = pte(s.v.data[0], USER_RW).to_bytes(8, "little")
            private[offset : offset + 8] = forged
            assert private[offset : offset + 8] == forged
        finally:
            private.close()
        assert s.a.dom.read_u64(s.a.l1e(5)) == 0
        # The hardware walk (the hypervisor's view) does not see the forged entry.
        outcome = await s.a.dom.run_user(0, [(5 * PAGE_SIZE, "r", 8)])
        assert outcome["fault"] == {"va": 5 * PAGE_SIZE, "error_code": 0x4}
        deltas = {"traps": 1, "page_faults": 1, "user_runs": 1}
        assert_unchanged(s, before, await snapshot(s), deltas=deltas)
        await probe(s)


FAULT_CHILD: Final = textwrap.dedent(
    """
    import ctypes, mmap, sys
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    fd, length, offset, mode = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    addr = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        sys.exit(f"mmap failed: errno {ctypes.get_errno()}")
    print("mapped", flush=True)
    if mode == "write":
        ctypes.memset(addr + offset, 0xFF, 8)
    else:
        ctypes.string_at(addr + offset, 8)
    print("survived", flush=True)
    """
)


async def fault_child(
    fd: int, length: int, offset: int, mode: str
) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, "-I", "-c", FAULT_CHILD, str(fd), str(length), str(offset), mode],
        pass_fds=(fd,),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


async def test_memfd_store_through_read_only_mapping_faults(hvp: HypervisorProcess) -> None:
    """A store through the guest's read-only shared mapping is a SIGSEGV (in a
    child: it would kill the test), and nothing reaches the page table."""
    async with scene(hvp) as s:
        fd = memfd(s.a.dom)
        size = os.fstat(fd).st_size
        before = await snapshot(s)
        offset = s.a.dom.pfn_of(s.a.l1) * PAGE_SIZE
        done = await fault_child(fd, size, offset, "write")
        assert (done.returncode, done.stdout) == (-signal.SIGSEGV, b"mapped\n"), done.stderr
        await calm(s, before)


async def test_memfd_beyond_its_size_holds_nothing(hvp: HypervisorProcess) -> None:
    """Guessing past the end: reads return nothing and a mapping past EOF
    faults (SIGBUS) instead of showing some other memory."""
    async with scene(hvp) as s:
        fd = memfd(s.a.dom)
        size = os.fstat(fd).st_size
        before = await snapshot(s)
        for offset in (size, size + PAGE_SIZE, MACHINE_FRAMES * PAGE_SIZE, 1 << 40):
            assert os.pread(fd, PAGE_SIZE, offset) == b""
        done = await fault_child(fd, size + 16 * PAGE_SIZE, size + 8 * PAGE_SIZE, "read")
        assert (done.returncode, done.stdout) == (-signal.SIGBUS, b"mapped\n"), done.stderr
        await calm(s, before)


async def test_memfd_never_shows_another_domains_memory(hvp: HypervisorProcess) -> None:
    """The victim's distinctive content, written by the victim, is nowhere in
    the attacker's fd, at any offset: the fd is the attacker's memory, whole."""
    async with scene(hvp) as s:
        fd = memfd(s.a.dom)
        size = os.fstat(fd).st_size
        before = await snapshot(s)
        everything = os.pread(fd, size + (1 << 20), 0)  # ask for more than there is
        assert len(everything) == size
        frames = wire.p2m_offset(len(s.a.dom.p2m))
        assert everything[:frames] == before.a_mem
        assert everything[frames:] == wire.pack_u64s(s.a.dom.p2m).ljust(size - frames, b"\0")
        assert s.a.needle in everything  # the search can find a needle ...
        assert s.v.needle in before.v_mem  # ... and the victim's is real,
        for word in range(0, len(s.v.needle), 8):  # but no word of it is here
            assert s.v.needle[word : word + 8] not in everything
        for mfn in s.v.dom.p2m[:8]:
            with pytest.raises(KeyError):
                s.a.dom.read_u64(mfn << 12)
        await calm(s, before)
