"""A child process that runs mm system calls on the real Linux kernel.

Started by ``tests/test_mremap_linux.py`` (``python tests/linux_mm_child.py
BASE SIZE FILE``; FILE is opened read-write for the file mappings). It
checks that ``[BASE, BASE + SIZE)`` is free (a ``MAP_FIXED_NOREPLACE``
probe, then unmapped again), then reads one JSON
list of operations per line on stdin and answers one JSON list per line:
for each operation its result and the window's lines of
``/proc/self/maps``. Every operation names addresses inside the window, so
the interpreter's own mappings never meet them. A result is
``["ok", value]`` (an address as an offset from BASE, or ``"out"`` for an
mremap that moved the mapping outside the window, which the child then
unmaps) or ``["err", errno]``. Before each sequence the window is emptied.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys

MAP_FAILED = ctypes.c_void_p(-1).value
MAP_PRIVATE = 0x02
MAP_ANONYMOUS = 0x20
MAP_NORESERVE = 0x4000
MAP_FIXED_NOREPLACE = 0x100000

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
libc.mremap.restype = ctypes.c_void_p
libc.mremap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_void_p,
]
for name in ("mprotect", "madvise"):
    fn = getattr(libc, name)
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
for name in ("munmap", "mlock", "munlock"):
    fn = getattr(libc, name)
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def window_maps(base: int, size: int) -> list[str]:
    lines = []
    with open("/proc/self/maps") as f:
        for line in f:
            start_s, end_s = line.split()[0].split("-")
            start, end = int(start_s, 16), int(end_s, 16)
            if start < base + size and end > base:
                lines.append(line.rstrip("\n"))
    return lines


def run(op: list[int | str], base: int, size: int) -> list[object]:
    kind = op[0]
    ctypes.set_errno(0)
    if kind == "mmap":
        _, off, length, prot, flags, offset = op
        fd = -1 if int(flags) & MAP_ANONYMOUS else FILE_FD
        ret = libc.mmap(base + int(off), int(length), int(prot), int(flags), fd, int(offset))
        if ret == MAP_FAILED:
            return ["err", ctypes.get_errno()]
        return ["ok", ret - base]
    if kind == "mremap":
        _, off, old_len, new_len, flags, new_off = op
        ret = libc.mremap(
            base + int(off), int(old_len), int(new_len), int(flags), base + int(new_off)
        )
        if ret == MAP_FAILED:
            return ["err", ctypes.get_errno()]
        if not base <= ret < base + size:
            libc.munmap(ret, int(new_len))
            return ["ok", "out"]
        return ["ok", ret - base]
    _, off, length, arg = op
    if kind in ("munmap", "mlock", "munlock"):
        rc = getattr(libc, str(kind))(base + int(off), int(length))
    else:
        rc = getattr(libc, str(kind))(base + int(off), int(length), int(arg))
    if rc:
        return ["err", ctypes.get_errno()]
    return ["ok", 0]


FILE_FD = -1


def main() -> None:
    global FILE_FD
    base, size = int(sys.argv[1], 0), int(sys.argv[2], 0)
    FILE_FD = os.open(sys.argv[3], os.O_RDWR)
    flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE | MAP_NORESERVE
    if libc.mmap(base, size, 0, flags, -1, 0) != base:
        print(json.dumps({"error": f"window {base:#x} is not free"}), flush=True)
        return
    libc.munmap(base, size)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        ops = json.loads(line)
        libc.munmap(base, size)
        out = [[run(op, base, size), window_maps(base, size)] for op in ops]
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
