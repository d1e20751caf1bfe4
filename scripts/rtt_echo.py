"""The two echo servers ``make bench-rtt`` measures pvemu against.

Both read pvemu's requests as msgpack maps from a Unix stream socket and
answer each hypercall with the bytes pvemu's hypervisor would send (a
``result`` map with the request's id, ``rc`` 0 and ``done`` = the records
carried), so request and reply sizes are pvemu's own; neither validates or
applies anything. They use plain msgpack, not ``pvemu.shared.wire``: they are
floors, and must not share the costs they are measured against.

- ``blocking``: a blocking socket loop, the cheapest server Python has.
- ``spinning``: the same loop, but each wait polls without blocking for a
  while first (``shared/lone_wait.poll_lone``, as pvemu's own lone waits):
  the floor on a machine where waking a halted vCPU costs more than the
  round trip (see ``docs/benchmarks.md``).
- ``trio``: a minimal idiomatic trio server (``SocketStream.receive_some`` /
  ``send_all``), the honest floor for a trio hypervisor. It also answers the
  guest's handshake (a ``welcome`` with a memfd) and ``bye``, so the guest's
  own client (``guest.client.attach``) drives it exactly as it drives pvemu.

Run as ``python -m pvemu.scripts.rtt_echo blocking|spinning|trio SOCKET``; prints
``ready`` once listening and serves until killed.
"""

from __future__ import annotations

import array
import os
import select
import socket
import sys
from typing import Any, Final

import msgpack
import trio

from pvemu.shared.lone_wait import poll_lone

#: The memory the trio echo's welcome announces (a memfd of this size).
ECHO_MEMORY_MIB: Final = 16
_FRAMES: Final = ECHO_MEMORY_MIB * 256


def result_for(message: dict[str, Any]) -> dict[str, object]:
    """pvemu's reply to a hypercall, without doing the hypercall."""
    args = message["args"]
    blob = args[0] if args and type(args[0]) is bytes else b""
    return {"t": "result", "id": message["id"], "rc": 0, "done": len(blob) // 16}


def serve_blocking(path: str, *, spin: bool = False) -> None:
    """One connection, blocking reads and writes (spinning before each wait
    when ``spin``)."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    print("ready", flush=True)
    conn, _ = srv.accept()
    unpacker = msgpack.Unpacker(raw=False, use_list=False)
    packer = msgpack.Packer(use_bin_type=True)
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    while True:
        if spin:
            while not poll_lone(poller, 1000):
                pass
        data = conn.recv(256 * 1024)
        if not data:
            return
        unpacker.feed(data)
        for message in unpacker:
            conn.sendall(packer.pack(result_for(message)))


async def _handle_trio(stream: trio.SocketStream) -> None:
    unpacker = msgpack.Unpacker(raw=False, use_list=False)
    packer = msgpack.Packer(use_bin_type=True)
    while data := await stream.receive_some(256 * 1024):
        unpacker.feed(data)
        for message in unpacker:
            kind = message["t"]
            if kind == "hypercall":
                await stream.send_all(packer.pack(result_for(message)))
            elif kind == "hello":
                await _welcome(stream, packer, message["id"])
            elif kind == "bye":
                await stream.send_all(packer.pack({"t": "goodbye", "id": message["id"]}))
                return


async def _welcome(stream: trio.SocketStream, packer: msgpack.Packer, rid: int) -> None:
    """A welcome the guest's client accepts, with a memfd of the announced size."""
    fd = os.memfd_create("pvemu-rtt-echo")
    try:
        # The frames, then the p2m (wire.p2m_offset): what a guest maps.
        p2m = array.array("Q", range(1, _FRAMES + 1)).tobytes()
        os.ftruncate(fd, _FRAMES * 4096 + len(p2m))
        os.pwrite(fd, p2m, _FRAMES * 4096)
        welcome = {
            "t": "welcome",
            "id": rid,
            "domid": 1,
            "vcpu": 0,
            "nr_frames": _FRAMES,
            "secret": bytes(16),
            "limits": {},
            "features": (),
        }
        data = packer.pack(welcome)
        fds = array.array("i", [fd]).tobytes()
        sent = await stream.socket.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        await stream.send_all(data[sent:])
    finally:
        os.close(fd)


async def serve_trio(path: str) -> None:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(8)
    print("ready", flush=True)
    await trio.serve_listeners(_handle_trio, [trio.SocketListener(sock)])


def main(argv: list[str]) -> int:
    kind, path = argv
    if kind in ("blocking", "spinning"):
        serve_blocking(path, spin=kind == "spinning")
    else:
        trio.run(serve_trio, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
