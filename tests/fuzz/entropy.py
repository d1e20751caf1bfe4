"""The fuzzers' shared entropy reader and failure helpers.

:class:`Entropy` turns one hypothesis-drawn blob into every choice of an
example (see ``tests/fuzz/__init__.py`` for why); :class:`FuzzFailure` and
:func:`escaped` are how both fuzzers report a property violation, named by a
signature so the runner can tell distinct bugs apart.
"""

from __future__ import annotations

import random
import traceback
from collections.abc import Sequence
from typing import Final, TypeVar

from pvemu.shared import abi

T = TypeVar("T")

U16: Final = 0xFFFF
U32: Final = 0xFFFF_FFFF
U64: Final = (1 << 64) - 1
S64_MIN: Final = -(1 << 63)
S64_MAX: Final = (1 << 63) - 1


class FuzzFailure(AssertionError):
    """A property violation; ``signature`` names the bug (not the input), so
    the runner can tell distinct crashes from the same one found again."""

    def __init__(self, message: str, signature: str) -> None:
        super().__init__(message)
        self.signature = signature


def origin(exc: BaseException) -> str:
    """``file:line`` where an exception was raised (the innermost frame)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"
    last = frames[-1]
    return f"{last.filename.rsplit('/', 1)[-1]}:{last.lineno}"


def escaped(what: str, exc: BaseException, context: str) -> FuzzFailure:
    """An exception that must not have escaped ``what``."""
    return FuzzFailure(
        f"{what} raised {type(exc).__name__}: {exc}\n{context}",
        f"{what}: {type(exc).__name__} at {origin(exc)}",
    )


# --- entropy -------------------------------------------------------------------------


class Entropy:
    """Choices read from a hypothesis-drawn blob, then from a PRNG seeded
    with it (so an example's size does not depend on the blob's length).

    Every choice maps 0 to its plainest option, so hypothesis shrinking (which
    lowers the blob's bytes) yields plain reproducers.
    """

    __slots__ = ("data", "pos", "rng")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.rng: random.Random | None = None

    def _more(self, n: int) -> bytes:
        if self.rng is None:
            self.rng = random.Random(self.data)
        return self.rng.randbytes(n)

    def byte(self) -> int:
        pos = self.pos
        if pos < len(self.data):
            self.pos = pos + 1
            return self.data[pos]
        return self._more(1)[0]

    def take(self, n: int) -> bytes:
        pos = self.pos
        chunk = self.data[pos : pos + n]
        self.pos = pos + len(chunk)
        return chunk if len(chunk) == n else chunk + self._more(n - len(chunk))

    def bits(self, k: int) -> int:
        return int.from_bytes(self.take((k + 7) // 8), "little") & ((1 << k) - 1)

    def below(self, n: int) -> int:
        """0 .. n-1 (n >= 1)."""
        if n <= 256:
            return self.byte() % n
        if n <= 65536:
            return self.bits(16) % n
        return self.bits(64) % n

    def flag(self) -> bool:
        return bool(self.byte() & 1)

    def chance(self, percent: int) -> bool:
        """True with about ``percent``% probability; a zero byte is False."""
        return self.byte() * 100 >= (100 - percent) * 256

    def pick(self, options: Sequence[T]) -> T:
        return options[self.below(len(options))]

    def int_range(self, lo: int, hi: int) -> int:
        """An int in lo..hi, often an edge."""
        k = self.byte()
        if k < 16:
            return lo
        if k < 32:
            return hi
        if k < 40:
            return min(lo + 1, hi)
        return lo + self.below(hi - lo + 1)

    def u64(self) -> int:
        k = self.byte()
        if k < 64:
            return U64_EDGES[k % len(U64_EDGES)]
        if k < 128:
            return self.bits(8)
        if k < 192:
            return self.bits(32)
        return self.bits(64)

    def s64(self) -> int:
        k = self.byte()
        if k < 96:
            return S64_EDGES[k % len(S64_EDGES)]
        if k < 176:
            return self.bits(8) - 128
        return self.bits(64) + S64_MIN

    def u32(self) -> int:
        return self.u64() & U32

    def blob(self, n: int) -> bytes:
        """``n`` bytes: a few from the blob, repeated (long blobs stay cheap)."""
        if n <= 16:
            return self.take(n)
        seed = self.take(8)
        return (seed * (n // 8 + 1))[:n]

    def text(self, max_len: int, min_len: int = 0) -> str:
        k = self.byte() % 8
        if k == 0:
            n = min_len
        elif k == 6:
            n = max_len
        elif k == 7:
            n = self.int_range(min_len, max_len)
        else:
            n = self.int_range(min_len, min(max_len, max(min_len, 12)))
        if n <= 16:
            return "".join(CHARSET[b] for b in self.take(n))
        seed = "".join(CHARSET[b] for b in self.take(8))
        return (seed * (n // 8 + 1))[:n]


U64_EDGES: Final = (
    0,
    1,
    2,
    0x7F,
    0x80,
    0xFF,
    0x100,
    U16,
    U16 + 1,
    U32,
    U32 + 1,
    S64_MAX,
    1 << 63,
    U64,
)
S64_EDGES: Final = (
    0,
    -1,
    -abi.EINVAL,
    -abi.ENOSYS,
    1,
    S64_MIN,
    S64_MAX,
    -129,
    127,
    -32769,
    1 << 32,
)
#: 256 characters a byte maps to: ASCII, controls, 2-, 3- and 4-byte UTF-8.
CHARSET: Final = tuple(
    [chr(c) for c in range(0x20, 0x7F)]
    + [chr(c) for c in range(0x20)]
    + ["\x7f", "é", "ß", "Ω", "€", "中", "\u0800", "\uffff", "\U0001f600", "\U0010ffff"]
    + [chr(0x100 + 37 * i) for i in range(256 - 95 - 32 - 10)]
)
assert len(CHARSET) == 256
