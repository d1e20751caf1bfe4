"""What the wire fuzzer expects back: :class:`Expect` (what the next decoded
object must produce), :func:`error_fits` (protocol.md §6 errors per item
kind) and :class:`ReplyChecker` (a sent reply must decode back, equal)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from pvemu.shared import abi
from pvemu.shared.errors import RemoteProtocolError, WireErrorCode
from pvemu.shared.wire import (
    NEED_DATA,
    PROTOCOL_VERSION,
    Audit,
    AuditResult,
    Bye,
    Connection,
    ErrorReply,
    Goodbye,
    Hello,
    Hypercall,
    KernelWrite,
    KernelWriteResult,
    Message,
    MulticallArgs,
    MulticallResult,
    Ptwr,
    PtwrResult,
    RawArgs,
    Reply,
    Request,
    Result,
    RunUser,
    Stats,
    StatsResult,
    UserResult,
    Welcome,
)
from tests.fuzz.entropy import FuzzFailure, escaped


@dataclass(frozen=True, slots=True)
class Expect:
    """What the next complete msgpack object fed must produce, while in sync.

    ``kind`` "msg": ``message`` (or a bad_state rejection); "err": an error
    with one of ``codes`` (and fatal == ``fatal`` unless None); "any":
    anything legal; "desync": from here on objects no longer line up with
    items. ``oversize``: bigger than the decoder's limit, so never decodable.
    """

    kind: str
    message: Message | None = None
    codes: frozenset[str] = frozenset()
    oversize: bool = False
    fatal: bool | None = None


DESYNC: Final = Expect("desync")


def error_fits(head: Expect, exc: RemoteProtocolError) -> bool:
    """protocol.md §6: the errors an item of this kind may produce."""
    code, fatal = exc.code, exc.fatal
    if head.oversize:  # the size limit, or damage found before it
        return fatal and (
            code == WireErrorCode.TOO_LARGE
            or (code == WireErrorCode.MALFORMED and head.kind != "msg")
        )
    if head.kind == "any":
        return True
    if code == WireErrorCode.BAD_STATE and (fatal or head.kind == "msg"):
        return True  # after bye/goodbye, a duplicate id, or not allowed in this state
    return head.kind == "err" and code in head.codes and head.fatal in (None, fatal)


ERROR_ONLY: Final[tuple[type[Reply], ...]] = (ErrorReply,)
REQUEST_FOR: Final[dict[type[Reply], Callable[[int], Request]]] = {
    Result: lambda rid: Hypercall(rid, 0, RawArgs()),
    MulticallResult: lambda rid: Hypercall(rid, abi.HYPERVISOR_multicall, MulticallArgs(())),
    PtwrResult: lambda rid: Ptwr(rid, 0, 0),
    KernelWriteResult: lambda rid: KernelWrite(rid, 0, b"\0"),
    UserResult: lambda rid: RunUser(rid, ()),
    StatsResult: Stats,
    AuditResult: Audit,
}


class ReplyChecker:
    """Decodes what a server sent through a client Connection that waits for
    exactly that reply: it must come back equal and alone (well formed)."""

    def __init__(self) -> None:
        self._ready: Connection | None = None

    def _ready_client(self) -> Connection:
        if self._ready is None or self._ready.broken:
            client, server = Connection("client"), Connection("server")
            server.receive_data(client.send(Hello(0, PROTOCOL_VERSION, 1, 1)))
            server.next_event()
            client.receive_data(server.send(Welcome(0, 1, 0, 1, bytes(16), {}, ())))
            client.next_event()
            self._ready = client
        return self._ready

    def check(self, data: bytes, reply: Reply) -> None:
        if reply.id is None:
            client = Connection("client")
        elif isinstance(reply, Welcome | ErrorReply):
            client = Connection("client")
            client.send(Hello(reply.id, PROTOCOL_VERSION, 1, 1))
        elif isinstance(reply, Goodbye):
            client = Connection("client")
            client.send(Bye(reply.id))
        else:
            client = self._ready_client()
            client.send(REQUEST_FOR[type(reply)](reply.id))
        client.receive_data(data)
        try:
            event = client.next_event()
            after = client.next_event()
        except Exception as exc:
            raise escaped("client decoding a sent reply", exc, f"reply: {reply!r}") from exc
        if event != reply or after is not NEED_DATA:
            raise FuzzFailure(
                f"sent {reply!r}\nclient decoded {event!r} then {after!r}",
                "reply does not decode back",
            )
