"""The VMA layer against the real kernel: random mmap (MAP_FIXED over
existing mappings too)/munmap/mprotect/mremap/madvise (MADV_FREE,
MADV_DONTNEED) sequences run in a child process on this machine's Linux
(``tests/linux_mm_child.py``, ctypes calls to libc) and on
:class:`~pvemu.guest.vma.AddressSpace`; every call's result or errno and
the VMA list of the window (start, end, permissions, offset, name: what
/proc/self/maps shows) must match after every call.

Every operation works inside a private window the child checked is free;
an mremap that moves a mapping out of it (MREMAP_MAYMOVE picks the
address) is compared as "out" and unmapped on both sides. Private
mappings carry MAP_NORESERVE so that no VMA gets VM_ACCOUNT (which the
model does not track and which would keep Linux from merging a VMA made
writable by mprotect with one mapped writable); nothing touches the pages,
so no VMA gets an anon_vma either. File mappings all map one open file (the
child's one descriptor, the model's one ``FileBacking``).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pvemu.guest.vma import AddressSpace
from pvemu.guest.vma_tree import (
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SIZE,
    FileBacking,
    MremapError,
    Unmap,
)

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.uname().machine != "x86_64",
    reason="compares with the x86-64 Linux kernel this runs on",
)

BASE = 0x2000_0000_0000
#: The window the child reserves; operations start in its first half.
WINDOW_PAGES = 128
SLOTS = 64
MAP_NORESERVE = 0x4000
MADV_FREE = 8
MADV_DONTNEED = 4
CHILD = os.path.join(os.path.dirname(__file__), "linux_mm_child.py")

Op = list[Any]
Outcome = list[Any]


class LinuxChild:
    """The child process: one JSON line of operations in, one of outcomes out."""

    path: str

    def __init__(self, path: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, CHILD, hex(BASE), hex(WINDOW_PAGES * PAGE_SIZE), path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.path = path
        hello = self._read()
        if not isinstance(hello, dict) or not hello.get("ready"):
            self.close()
            pytest.skip(f"cannot reserve the window: {hello}")

    def _read(self) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the Linux child died")
        return json.loads(line)

    def run(self, ops: list[Op]) -> list[Outcome]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(ops) + "\n")
        self.proc.stdin.flush()
        reply: list[Outcome] = self._read()
        return [[result, [_parse_maps_line(line) for line in maps]] for result, maps in reply]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _parse_maps_line(line: str) -> list[Any]:
    """(start, end) as window offsets, permissions, offset, name."""
    fields = line.split(None, 5)
    start, end = (int(x, 16) - BASE for x in fields[0].split("-"))
    name = fields[5].strip() if len(fields) > 5 else ""
    return [start, end, fields[1], int(fields[2], 16), name]


def _model_maps(space: AddressSpace) -> list[list[Any]]:
    out = []
    for vma in space.intersecting(BASE, BASE + WINDOW_PAGES * PAGE_SIZE):
        fields = vma.maps_line().split(None, 3)
        name = fields[3] if len(fields) > 3 else ""
        out.append([vma.start - BASE, vma.end - BASE, fields[1], int(fields[2], 16), name])
    return out


def _model_call(space: AddressSpace, op: Op, file: FileBacking) -> list[Any]:
    kind = op[0]
    window = range(BASE, BASE + WINDOW_PAGES * PAGE_SIZE)
    try:
        if kind == "mmap":
            _, off, length, prot, flags, offset = op
            addr = space.do_mmap(
                length, prot, flags, addr=BASE + off, file=file, offset=offset
            ).addr
            return ["ok", addr - BASE]
        if kind == "mremap":
            _, off, old_len, new_len, flags, new_off = op
            addr = space.mremap(BASE + off, old_len, new_len, flags, BASE + new_off).addr
            if addr not in window:
                space.munmap(addr, new_len)
                return ["ok", "out"]
            return ["ok", addr - BASE]
        _, off, length, arg = op
        if kind == "munmap":
            space.munmap(BASE + off, length)
        elif kind == "mprotect":
            space.mprotect(BASE + off, length, arg)
        elif arg == MADV_DONTNEED:
            space.madvise_dontneed(BASE + off, length).raise_if_error()
        else:
            space.madvise_free(BASE + off, length).raise_if_error()
        return ["ok", 0]
    except OSError as exc:
        return ["err", exc.errno]


def run_model(ops: list[Op], path: str) -> list[Outcome]:
    space = AddressSpace()
    file = FileBacking(path, writable=True)  # one open file, as the child's one fd
    return [[_model_call(space, op, file), _model_maps(space)] for op in ops]


@pytest.fixture(scope="module")
def linux(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LinuxChild]:
    path = tmp_path_factory.mktemp("mremap") / "file.bin"
    path.write_bytes(bytes(16 * PAGE_SIZE))
    child = LinuxChild(str(path))
    yield child
    child.close()


# --- strategies ---------------------------------------------------------------------------

_slot = st.integers(0, SLOTS - 1).map(lambda p: p * PAGE_SIZE)
_pages = st.integers(0, 24).map(lambda p: p * PAGE_SIZE)
# Mostly whole pages; sometimes a length a few bytes short of them, or 0.
_length = st.one_of(_pages, _pages.map(lambda n: max(0, n - 7)), st.just(0)).filter(
    lambda n: n >= 0
)
_prot = st.sampled_from([0, 1, 3, 5, 7])
_share = st.sampled_from([MAP_PRIVATE | MAP_NORESERVE, MAP_SHARED])


def _mmap_op() -> st.SearchStrategy[Op]:
    """Anonymous memory, or the file (at a page offset, maybe past its end)."""
    return st.builds(
        lambda off, n, prot, share, noreplace, anon, pgoff: [
            "mmap",
            off,
            n,
            prot,
            share
            | (MAP_ANONYMOUS if anon else 0)
            | (MAP_FIXED_NOREPLACE if noreplace else MAP_FIXED),
            0 if anon else pgoff * PAGE_SIZE,
        ],
        _slot,
        st.integers(1, 16).map(lambda p: p * PAGE_SIZE),
        _prot,
        _share,
        st.booleans(),
        st.booleans(),
        st.integers(0, 24),
    )


def _mremap_op() -> st.SearchStrategy[Op]:
    flags = st.one_of(st.integers(0, 7), st.just(8), st.just(3), st.just(7))
    return st.builds(
        lambda off, skew, old, new, fl, dest: ["mremap", off + skew, old, new, fl, dest],
        _slot,
        st.sampled_from([0, 0, 0, 0, 1]),
        _length,
        _length,
        flags,
        _slot,
    )


_ops = st.one_of(
    _mmap_op(),
    _mmap_op(),
    st.builds(lambda o, n: ["munmap", o, n, 0], _slot, _length),
    st.builds(
        lambda o, n, p: ["mprotect", o, n, p], _slot, _length, st.one_of(_prot, st.just(0x10))
    ),
    _mremap_op(),
    _mremap_op(),
    _mremap_op(),
    st.builds(lambda o, n: ["madvise", o, n, MADV_FREE], _slot, _length),
    st.builds(lambda o, n: ["madvise", o, n, MADV_DONTNEED], _slot, _length),
)


def _assert_same(ops: list[Op], linux: LinuxChild) -> None:
    real = linux.run(ops)
    model = run_model(ops, linux.path)
    for i, (op, want, got) in enumerate(zip(ops, real, model, strict=True)):
        assert got == want, f"step {i} {op}: Linux {want}, model {got}\nops so far: {ops[: i + 1]}"


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(_ops, min_size=1, max_size=14))
def test_random_sequences_match_linux(linux: LinuxChild, ops: list[Op]) -> None:
    _assert_same(ops, linux)


P = PAGE_SIZE
_ANON = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED
_SHM = MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED
_FILE = MAP_SHARED | MAP_FIXED


@pytest.mark.parametrize(
    "ops",
    [
        # grow in place, then into a neighbour (ENOMEM without MAYMOVE, moved with it)
        [["mmap", 0, 4 * P, 3, _ANON, 0], ["mremap", 0, 4 * P, 8 * P, 0, 0]],
        [
            ["mmap", 0, 4 * P, 3, _ANON, 0],
            ["mmap", 6 * P, 2 * P, 1, _ANON, 0],
            ["mremap", 0, 4 * P, 8 * P, 0, 0],
            ["mremap", 0, 4 * P, 8 * P, 1, 0],
        ],
        # shrink; shrink across two VMAs (allowed: only the kept part must be one VMA)
        [["mmap", 0, 8 * P, 3, _ANON, 0], ["mremap", 0, 8 * P, 3 * P, 0, 0]],
        [
            ["mmap", 0, 4 * P, 3, _ANON, 0],
            ["mmap", 4 * P, 4 * P, 1, _ANON, 0],
            ["mremap", 0, 8 * P, 2 * P, 0, 0],
        ],
        # growing across the VMA's end: EFAULT
        [
            ["mmap", 0, 4 * P, 3, _ANON, 0],
            ["mmap", 4 * P, 4 * P, 1, _ANON, 0],
            ["mremap", 0, 8 * P, 9 * P, 1, 0],
        ],
        # MREMAP_FIXED over a mapping, overlapping (EINVAL), into the same VMA
        [
            ["mmap", 0, 4 * P, 3, _ANON, 0],
            ["mmap", 16 * P, 8 * P, 1, _ANON, 0],
            ["mremap", 0, 4 * P, 4 * P, 3, 18 * P],
            ["mremap", 18 * P, 4 * P, 4 * P, 3, 20 * P],
            ["mremap", 16 * P, 2 * P, 2 * P, 3, 30 * P],
        ],
        # multi-VMA move (6.17+): gaps kept; a gap at the start is EFAULT
        [
            ["mmap", 0, 2 * P, 3, _ANON, 0],
            ["mmap", 3 * P, 2 * P, 1, _ANON, 0],
            ["mremap", 0, 5 * P, 5 * P, 3, 20 * P],
            ["mremap", 19 * P, 6 * P, 6 * P, 3, 40 * P],
        ],
        # MREMAP_DONTUNMAP: the source stays; with a length change EINVAL
        [
            ["mmap", 0, 4 * P, 3, _ANON, 0],
            ["mremap", 0, 4 * P, 4 * P, 5, 10 * P],
            ["mremap", 0, 4 * P, 4 * P, 7, 20 * P],
            ["mremap", 0, 4 * P, 5 * P, 7, 30 * P],
        ],
        # old_len 0: duplicates shared memory, EINVAL for private
        [
            ["mmap", 0, 4 * P, 3, _SHM, 0],
            ["mremap", 0, 0, 2 * P, 3, 10 * P],
            ["mmap", 20 * P, 4 * P, 3, _ANON, 0],
            ["mremap", 20 * P, 0, 2 * P, 3, 30 * P],
        ],
        # a moved piece comes back next to its VMA: merged again
        [
            ["mmap", 0, 4 * P, 3, _ANON, 0],
            ["mremap", 2 * P, 2 * P, 2 * P, 3, 10 * P],
            ["mremap", 10 * P, 2 * P, 2 * P, 3, 2 * P],
        ],
        # a file mapping keeps its offsets: its moved middle merges back when
        # returned, and does not merge next to a piece of another offset
        [
            ["mmap", 0, 6 * P, 3, _FILE, 0],
            ["mremap", 2 * P, 2 * P, 2 * P, 3, 20 * P],
            ["mremap", 20 * P, 2 * P, 2 * P, 3, 2 * P],
            ["mremap", 4 * P, 2 * P, 2 * P, 3, 8 * P],
            ["mmap", 6 * P, 2 * P, 3, _FILE, 6 * P],
        ],
        # nothing mapped: EFAULT in every form
        [["mremap", 0, P, P, 0, 0], ["mremap", 0, P, 2 * P, 1, 0], ["mremap", 0, P, P, 3, 8 * P]],
    ],
)
def test_cases_match_linux(linux: LinuxChild, ops: list[Op]) -> None:
    _assert_same(ops, linux)


def test_mremap_error_carries_the_work_done() -> None:
    """A MREMAP_FIXED move below mmap_min_addr fails (EPERM) only after the
    destination was unmapped, as in Linux: the error carries that piece so
    the kernel can still zap it."""
    space = AddressSpace(mmap_min_addr=0x10000)
    space.do_mmap(16 * P, 3, _ANON, addr=0x10000)
    space.do_mmap(16 * P, 3, _ANON, addr=BASE)
    with pytest.raises(MremapError) as info:
        space.mremap(BASE, 16 * P, 16 * P, 3, 0x8000)
    assert info.value.errno == errno.EPERM
    (step,) = info.value.steps
    assert isinstance(step, Unmap)
    assert [(v.start, v.end) for v in step.pieces] == [(0x10000, 0x18000)]
    assert [(v.start, v.end) for v in space.vmas()] == [(0x18000, 0x20000), (BASE, BASE + 16 * P)]
