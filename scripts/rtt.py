"""Trap round-trip benchmark: one-record and 512-record ``mmu_update`` over the
real socket, beside the floor (a blocking msgpack echo between two processes).

Run with ``make bench-rtt`` (or ``python -m pvemu.scripts.rtt``). It reports median
and p99 per variant and the ratio to the floor, measured side by side in one
run. Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import msgpack
import trio

from pvemu.scripts.results import percentile
from pvemu.shared.x86 import _PAGE_PRESENT, _PAGE_RW, _PAGE_USER, maddr_of_entry, make_pte

ECHO_SERVER = """
import socket, sys, msgpack
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(sys.argv[1]); srv.listen(1)
print("ready", flush=True)
conn, _ = srv.accept()
unpacker = msgpack.Unpacker()
while True:
    data = conn.recv(65536)
    if not data:
        break
    unpacker.feed(data)
    for msg in unpacker:
        conn.sendall(msgpack.packb([msg[0], 0, len(msg[2])]))
"""


def _summary(name: str, samples_ns: list[int]) -> dict[str, Any]:
    us = [s / 1000 for s in samples_ns]
    return {
        "name": name,
        "n": len(us),
        "median_us": round(statistics.median(us), 2),
        "p99_us": round(percentile(us, 0.99), 2),
    }


def measure_floor(tmp: str, rounds: int, warmup: int, records: int) -> list[int]:
    """Blocking Unix-socket msgpack echo with a separate server process."""
    path = os.path.join(tmp, f"echo{records}.sock")
    proc = subprocess.Popen(
        [sys.executable, "-c", ECHO_SERVER, path], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        unpacker = msgpack.Unpacker()
        payload = [[0x1000 * i, 0x5] for i in range(records)]
        samples: list[int] = []
        for i in range(warmup + rounds):
            started = time.perf_counter_ns()
            sock.sendall(msgpack.packb([i, 1, payload]))
            while True:
                unpacker.feed(sock.recv(65536))
                if next(unpacker, None) is not None:
                    break
            if i >= warmup:
                samples.append(time.perf_counter_ns() - started)
        sock.close()
        return samples
    finally:
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


async def measure_traps(socket_path: str, rounds: int, warmup: int) -> dict[str, list[int]]:
    from pvemu.guest.client import connect

    out: dict[str, list[int]] = {}
    async with connect(socket_path, memory_mib=16) as dom:
        l1 = dom.alloc_frame()
        data = [dom.alloc_frame() for _ in range(512)]
        rw = _PAGE_PRESENT | _PAGE_RW | _PAGE_USER
        ro = _PAGE_PRESENT | _PAGE_USER
        for records in (1, 512):
            batches = [
                [(maddr_of_entry(l1, i), make_pte(data[i], flags)) for i in range(records)]
                for flags in (rw, ro)
            ]
            samples: list[int] = []
            for i in range(warmup + rounds):
                started = time.perf_counter_ns()
                rc, done = await dom.mmu_update(batches[i % 2])
                elapsed = time.perf_counter_ns() - started
                if rc or done != records:
                    raise RuntimeError(f"mmu_update failed: rc={rc} done={done}")
                if i >= warmup:
                    samples.append(elapsed)
            out[f"mmu_update x{records}"] = samples
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3000, help="timed round trips per variant")
    parser.add_argument("--warmup", type=int, default=300, help="untimed round trips first")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pvemu-rtt-", dir="/tmp") as tmp:
        hv_socket = os.path.join(tmp, "hv.sock")
        hv = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pvemu.scripts",
                "hypervisor",
                "--socket",
                hv_socket,
                "--memory-mib",
                "64",
                "--log-level",
                "warning",
                "--quantum",
                "1024",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert hv.stdout is not None
            hv.stdout.readline()
            traps = trio.run(measure_traps, hv_socket, args.rounds, args.warmup)
        finally:
            hv.terminate()
            hv.wait(timeout=10)
            if hv.stdout is not None:
                hv.stdout.close()
        floor1 = measure_floor(tmp, args.rounds, args.warmup, 1)
        floor512 = measure_floor(tmp, args.rounds, args.warmup, 512)
    rows = [
        _summary("floor: blocking msgpack echo, 1 record", floor1),
        _summary("floor: blocking msgpack echo, 512 records", floor512),
        *(_summary(name, samples) for name, samples in traps.items()),
    ]
    floor_median = rows[0]["median_us"]
    for row in rows:
        row["x_floor_median"] = round(row["median_us"] / floor_median, 2)
    if args.json:
        print(json.dumps({"schema": 1, "results": rows}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"trap round trip ({args.rounds} rounds after {args.warmup} warm-up)")
    for column in ("variant", "median µs", "p99 µs", "x floor (median)"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for row in rows:
        table.add_row(
            row["name"], str(row["median_us"]), str(row["p99_us"]), str(row["x_floor_median"])
        )
    Console().print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
