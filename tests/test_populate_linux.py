"""mlock, munlock and MADV_POPULATE_READ/WRITE against the real kernel: the
errno of every call and the window's VMA list (mlock splits a VMA where
VM_LOCKED starts and ends, munlock merges it again) must match
:class:`~pvemu.guest.vma.AddressSpace` after every call.

Each sequence first maps a fixed layout (anonymous, MAP_NORESERVE, each
VMA a protection of its own so that no two merge, holes between some),
then runs random mlock/munlock/populate calls on it. Populating gives
Linux's VMAs an anon_vma, which the model does not track; only these
calls follow, and none of them merges two VMAs that were mapped apart, so
that difference never shows. The child (``tests/linux_mm_child.py``) is
the one ``tests/test_mremap_linux.py`` uses.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pvemu.guest.vma import AddressSpace
from pvemu.guest.vma_tree import (
    MADV_POPULATE_READ,
    MADV_POPULATE_WRITE,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_PRIVATE,
    PAGE_SIZE,
)
from tests.test_mremap_linux import BASE, WINDOW_PAGES, LinuxChild, Op, Outcome, _model_maps

pytestmark = pytest.mark.skipif(WINDOW_PAGES < 64, reason="the layout needs 64 pages of the window")

P = PAGE_SIZE
_ANON = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | 0x4000  # MAP_NORESERVE
#: (first page, pages, prot): PROT_NONE, R, RW, W-only, RX, RW again; holes
#: at pages 20-23 and 44-47.
LAYOUT = [(0, 8, 0), (8, 12, 1), (24, 10, 3), (34, 10, 2), (48, 6, 5), (54, 10, 7)]


def layout_ops() -> list[Op]:
    return [["mmap", first * P, pages * P, prot, _ANON, 0] for first, pages, prot in LAYOUT]


def _model_call(space: AddressSpace, op: Op) -> list[Any]:
    kind, off, length, arg = op[0], op[1], op[2], op[3]
    try:
        if kind == "mmap":
            space.do_mmap(length, arg, op[4], addr=BASE + off)
            return ["ok", off]
        if kind in ("mlock", "munlock"):
            space.mlock(BASE + off, length, lock=kind == "mlock").raise_if_error()
        else:
            assert arg in (MADV_POPULATE_READ, MADV_POPULATE_WRITE)
            write = arg == MADV_POPULATE_WRITE
            space.madvise_populate(BASE + off, length, write=write).raise_if_error()
        return ["ok", 0]
    except OSError as exc:
        return ["err", exc.errno]


def run_model(ops: list[Op]) -> list[Outcome]:
    space = AddressSpace()
    return [[_model_call(space, op), _model_maps(space)] for op in ops]


@pytest.fixture(scope="module")
def linux(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LinuxChild]:
    path = tmp_path_factory.mktemp("populate") / "file.bin"
    path.write_bytes(bytes(4 * P))
    child = LinuxChild(str(path))
    yield child
    child.close()


_off = st.integers(0, 66).map(lambda p: p * P)
_len = st.integers(0, 30).map(lambda p: p * P)
_call = st.one_of(
    st.tuples(st.sampled_from(["mlock", "munlock"]), _off, _len, st.just(0)).map(list),
    # mlock rounds the address down and the length up: a few bytes off
    st.tuples(st.just("mlock"), _off.map(lambda o: o + 5), _len, st.just(0)).map(list),
    st.tuples(
        st.just("madvise"), _off, _len, st.sampled_from([MADV_POPULATE_READ, MADV_POPULATE_WRITE])
    ).map(list),
    st.tuples(st.just("madvise"), _off.map(lambda o: o + 8), _len, st.just(MADV_POPULATE_READ)).map(
        list
    ),
)


def _compare(linux: LinuxChild, ops: list[Op]) -> None:
    got = linux.run(ops)
    want = run_model(ops)
    for op, mine, theirs in zip(ops, want, got, strict=True):
        assert mine == theirs, op


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(_call, min_size=1, max_size=12))
def test_random_lock_and_populate_calls_match_linux(linux: LinuxChild, calls: list[Op]) -> None:
    _compare(linux, layout_ops() + calls)


CASES = {
    "mlock over a hole: the first VMA stays locked": [["mlock", 16 * P, 10 * P, 0]],
    "mlock of PROT_NONE: locked, ENOMEM": [["mlock", 2 * P, 2 * P, 0]],
    "mlock inside a VMA, then munlock merges": [
        ["mlock", 26 * P, 2 * P, 0],
        ["munlock", 24 * P, 10 * P, 0],
    ],
    "populate write of R": [["madvise", 8 * P, P, MADV_POPULATE_WRITE]],
    "populate read of W-only": [["madvise", 34 * P, P, MADV_POPULATE_READ]],
    "populate write of W-only": [["madvise", 34 * P, P, MADV_POPULATE_WRITE]],
    "populate read of PROT_NONE": [["madvise", 0, P, MADV_POPULATE_READ]],
    "populate into a hole": [["madvise", 24 * P, 24 * P, MADV_POPULATE_WRITE]],
    "populate from a hole": [["madvise", 20 * P, 8 * P, MADV_POPULATE_READ]],
    "populate, length 0 at a hole": [["madvise", 20 * P, 0, MADV_POPULATE_READ]],
    "populate unaligned": [["madvise", 24 * P + 1, P, MADV_POPULATE_READ]],
}


@pytest.mark.parametrize("calls", list(CASES.values()), ids=list(CASES))
def test_cases_match_linux(linux: LinuxChild, calls: list[Op]) -> None:
    _compare(linux, layout_ops() + calls)


def test_the_cases_fail_where_linux_does() -> None:
    """The model's errnos for the cases (what the comparison pins)."""
    want = {
        "mlock over a hole: the first VMA stays locked": errno.ENOMEM,
        "mlock of PROT_NONE: locked, ENOMEM": errno.ENOMEM,
        "populate write of R": errno.EINVAL,
        "populate read of W-only": errno.EINVAL,
        "populate read of PROT_NONE": errno.EINVAL,
        "populate into a hole": errno.ENOMEM,
        "populate from a hole": errno.ENOMEM,
        "populate unaligned": errno.EINVAL,
    }
    for name, calls in CASES.items():
        result = run_model(layout_ops() + calls)[-1][0]
        assert result == (["err", want[name]] if name in want else ["ok", 0]), name
