"""Trap round-trip benchmark: a one-record and a 512-record ``mmu_update``
over the real socket, beside three echo servers that do no work.

Four servers, each a separate process on a Unix stream socket, measured in
one run with the same request and reply bytes (pvemu's own):

- **blocking echo**: a blocking socket loop driven by a blocking client, the
  cheapest round trip Python can make;
- **spinning echo**: the same pair, each polling without blocking for a
  while before it blocks (``shared/lone_wait.poll_lone``), as pvemu's lone
  waits do: the cheapest round trip on a machine whose idle vCPUs halt;
- **trio echo**: a minimal trio server (``scripts/rtt_echo.py``) driven by the
  guest's own client (``guest.client``, the same ``Domain.mmu_update`` loop
  as pvemu's row), so the only difference from pvemu is the server's work:
  the honest floor for a trio hypervisor;
- **pvemu**: the hypervisor validating and applying the records.

Rounds are taken in interleaved chunks, so a noisy neighbour slows every
row alike. Each row reports median and p99 and the ratio of its median to
the trio echo's at the same size. Run with ``make bench-rtt`` (or ``python
-m pvemu.scripts.rtt``); timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgpack
import trio

from pvemu.scripts.procs import hypervisor_process
from pvemu.scripts.results import percentile
from pvemu.scripts.rtt_echo import ECHO_MEMORY_MIB
from pvemu.shared import abi, wire
from pvemu.shared.lone_wait import poll_lone
from pvemu.shared.x86 import _PAGE_PRESENT, _PAGE_RW, _PAGE_USER, maddr_of_entry, make_pte

if TYPE_CHECKING:
    from pvemu.guest.client import Domain

#: Records per mmu_update in the two sizes measured.
SIZES: Final = (1, 512)
#: The servers, in the order of the table.
SERVERS: Final = ("blocking echo", "spinning echo", "trio echo", "pvemu")
#: How many interleaved chunks the timed rounds are split into.
CHUNKS: Final = 10

Batch = list[tuple[int, int]]
RoundTrip = Callable[[Batch], Awaitable[None]]


def _summary(server: str, records: int, samples_ns: list[int]) -> dict[str, Any]:
    us = [s / 1000 for s in samples_ns]
    return {
        "name": f"{server}, {records} record{'s' if records > 1 else ''}",
        "server": server,
        "records": records,
        "n": len(us),
        "median_us": round(statistics.median(us), 2),
        "p99_us": round(percentile(us, 0.99), 2),
    }


@contextlib.contextmanager
def echo_server(kind: str, path: str) -> Iterator[None]:
    """Run ``scripts/rtt_echo.py`` until the block ends."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pvemu.scripts.rtt_echo", kind, path],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the {kind} echo server did not start")
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def _blocking_client(path: str, *, spin: bool = False) -> tuple[socket.socket, RoundTrip]:
    """A blocking socket sending the bytes pvemu's client would send
    (spinning before each wait when ``spin``)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    unpacker = msgpack.Unpacker(raw=False, use_list=False)
    packer = msgpack.Packer(use_bin_type=True)
    ids = iter(range(1, 1 << 62))
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)

    async def round_trip(batch: Batch) -> None:
        request = wire.Hypercall.make(next(ids), abi.HYPERVISOR_mmu_update, batch)
        sock.sendall(packer.pack(request.to_wire()))
        while True:
            if spin:
                poll_lone(poller, 1000)
            unpacker.feed(sock.recv(256 * 1024))
            if next(unpacker, None) is not None:
                return

    return sock, round_trip


def _domain_client(dom: Domain) -> RoundTrip:
    """The guest's own hypercall path: ``Domain.mmu_update``."""

    async def round_trip(batch: Batch) -> None:
        rc, done = await dom.mmu_update(batch)
        if rc or done != len(batch):
            raise RuntimeError(f"mmu_update failed: rc={rc} done={done}")

    return round_trip


async def measure(
    paths: dict[str, str], rounds: int, warmup: int
) -> dict[tuple[str, int], list[int]]:
    """Round-trip times per (server, records), in interleaved chunks."""
    from pvemu.guest.client import SocketTransport, attach, connect

    samples: dict[tuple[str, int], list[int]] = {}
    async with contextlib.AsyncExitStack() as stack:
        sock, blocking = _blocking_client(paths["blocking echo"])
        stack.callback(sock.close)
        spin_sock, spinning = _blocking_client(paths["spinning echo"], spin=True)
        stack.callback(spin_sock.close)
        echo_dom = await attach(SocketTransport(paths["trio echo"]), memory_mib=ECHO_MEMORY_MIB)
        stack.push_async_callback(echo_dom.close)
        dom = await stack.enter_async_context(connect(paths["pvemu"], memory_mib=16))
        clients = {
            "blocking echo": blocking,
            "spinning echo": spinning,
            "trio echo": _domain_client(echo_dom),
            "pvemu": _domain_client(dom),
        }
        # Two batches that flip the same PTEs between RW and RO: both valid
        # forever, so every round does the same work.
        l1 = dom.alloc_frame()
        data = [dom.alloc_frame() for _ in range(max(SIZES))]
        flags = (_PAGE_PRESENT | _PAGE_RW | _PAGE_USER, _PAGE_PRESENT | _PAGE_USER)
        batches = {
            n: [[(maddr_of_entry(l1, i), make_pte(data[i], f)) for i in range(n)] for f in flags]
            for n in SIZES
        }
        for server, n in _variants():
            for i in range(warmup):
                await clients[server](batches[n][i % 2])
            samples[(server, n)] = []
        per_chunk = -(-rounds // CHUNKS)
        done = 0
        while done < rounds:
            chunk = min(per_chunk, rounds - done)
            for server, n in _variants():
                client, out = clients[server], samples[(server, n)]
                for i in range(chunk):
                    started = time.perf_counter_ns()
                    await client(batches[n][i % 2])
                    out.append(time.perf_counter_ns() - started)
            done += chunk
    return samples


def _variants() -> list[tuple[str, int]]:
    return [(server, n) for n in SIZES for server in SERVERS]


def run(rounds: int, warmup: int) -> list[dict[str, Any]]:
    """Start the servers, measure, and return one row per variant."""
    with tempfile.TemporaryDirectory(prefix="pvemu-rtt-", dir="/tmp") as tmp:
        paths = {
            "blocking echo": os.path.join(tmp, "blocking.sock"),
            "spinning echo": os.path.join(tmp, "spinning.sock"),
            "trio echo": os.path.join(tmp, "trio.sock"),
        }
        with (
            echo_server("blocking", paths["blocking echo"]),
            echo_server("spinning", paths["spinning echo"]),
            echo_server("trio", paths["trio echo"]),
            hypervisor_process(Path(tmp), 64, quantum=1024) as hv,
        ):
            paths["pvemu"] = hv.socket_path
            samples = trio.run(measure, paths, rounds, warmup)
    rows = [_summary(server, n, samples[(server, n)]) for server, n in _variants()]
    floors = {row["records"]: row["median_us"] for row in rows if row["server"] == "trio echo"}
    for row in rows:
        row["x_trio_echo"] = round(row["median_us"] / floors[row["records"]], 2)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3000, help="timed round trips per variant")
    parser.add_argument("--warmup", type=int, default=300, help="untimed round trips first")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be at least 1 and --warmup not negative")
    rows = run(args.rounds, args.warmup)
    if args.json:
        document = {"schema": 2, "rounds": args.rounds, "warmup": args.warmup, "results": rows}
        print(json.dumps(document, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"mmu_update round trip ({args.rounds} rounds after {args.warmup} warm-up)")
    for column in ("server", "records", "median µs", "p99 µs", "x trio echo (median)"):
        table.add_column(column, justify="left" if column == "server" else "right")
    for row in rows:
        table.add_row(
            row["server"],
            str(row["records"]),
            str(row["median_us"]),
            str(row["p99_us"]),
            str(row["x_trio_echo"]),
            end_section=row["server"] == SERVERS[-1],
        )
    Console().print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
