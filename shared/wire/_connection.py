"""The sans-I/O connection: bytes in, messages out, and the reverse.

It never touches a socket. The states and what moves between them are the
tables of :mod:`._state`; this module parses, bounds and bookkeeps.
"""

from __future__ import annotations

from typing import Literal, NoReturn

import msgpack

from pvemu.shared.errors import LocalProtocolError, RemoteProtocolError, WireErrorCode

from ._checks import _BAD_TYPE, _MALFORMED, _TOO_LARGE, _tname
from ._fast import fast_reply, fast_request
from ._limits import (
    MAX_ARRAY_LEN,
    MAX_BIN_LEN,
    MAX_EXT_LEN,
    MAX_MAP_LEN,
    MAX_MESSAGE_SIZE,
    MAX_NAME_LEN,
    MAX_REQUEST_ID,
    MAX_STR_LEN,
    PROTOCOL_VERSION,
)
from ._messages import (
    REPLY_TYPES,
    REQUEST_TYPES,
    Hello,
    Join,
    Message,
    Reply,
    Request,
)
from ._state import (
    CONNECTION_CLOSED,
    ERROR_ONLY,
    NEED_DATA,
    REPLY_TRANSITIONS,
    Sentinel,
    State,
    expected_replies,
    reply_transition,
    request_transition,
)

Role = Literal["client", "server"]


class Connection:
    """One end of a pvemu connection, sans I/O.

    Feed received bytes with :meth:`receive_data` (``b""`` = EOF), then call
    :meth:`next_event` until it returns :data:`NEED_DATA`; turn outgoing
    messages into bytes with :meth:`send`. The ``"server"`` (hypervisor)
    receives requests and sends replies; the ``"client"`` (guest) the reverse.

    Error handling:
        ``next_event`` raises :class:`RemoteProtocolError`. Non-fatal: one
        message was rejected; a server answers ``ErrorReply.from_exception(e)``
        (allowed by :meth:`send` for ``e.request_id``) and carries on. Fatal:
        the stream is unusable; close the socket (a server may first send an
        ``ErrorReply`` with id None); every later ``next_event`` raises again.

    Args:
        role: ``"client"`` or ``"server"``.
        max_message_size: largest message accepted and sent (a server lowers
            it to its own limit; tests lower it further).
    """

    def __init__(self, role: Role, *, max_message_size: int = MAX_MESSAGE_SIZE) -> None:
        if role not in ("client", "server"):
            raise LocalProtocolError(f"role must be 'client' or 'server', not {role!r}")
        if not 64 <= max_message_size <= MAX_MESSAGE_SIZE:
            raise LocalProtocolError(f"max_message_size must be 64..{MAX_MESSAGE_SIZE}")
        self._role: Role = role
        self._server = role == "server"
        self._decode_table: dict[str, type[Message]] = dict(
            REQUEST_TYPES if self._server else REPLY_TYPES
        )
        self._max = max_message_size
        self._state = State.IDLE
        #: request id -> reply types allowed for it (ids we received as a
        #: server, ids we sent as a client).
        self._pending: dict[int, tuple[type[Reply], ...]] = {}
        self._handshake_id: int | None = None
        self._unpacker: msgpack.Unpacker | None = msgpack.Unpacker(
            use_list=False,
            raw=False,
            strict_map_key=True,
            max_buffer_size=max_message_size,
            max_str_len=MAX_STR_LEN,
            max_bin_len=MAX_BIN_LEN,
            max_array_len=MAX_ARRAY_LEN,
            max_map_len=MAX_MAP_LEN,
            max_ext_len=MAX_EXT_LEN,
        )
        self._packer = msgpack.Packer(use_bin_type=True)
        self._fed = 0  # bytes fed to the unpacker so far
        self._msg_start = 0  # stream offset where the current message starts
        self._backlog = bytearray()  # received, not yet fed
        self._eof = False
        self._dead: RemoteProtocolError | None = None

    # -- introspection --

    @property
    def role(self) -> Role:
        return self._role

    @property
    def state(self) -> State:
        return self._state

    @property
    def pending_ids(self) -> frozenset[int]:
        """Request ids awaiting a reply."""
        return frozenset(self._pending)

    @property
    def broken(self) -> bool:
        """True after a fatal RemoteProtocolError."""
        return self._dead is not None

    # -- receiving --

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer received bytes; ``b""`` means the peer closed (EOF).

        Raises:
            LocalProtocolError: data after EOF.
        """
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("received data after EOF")
        unpacker = self._unpacker
        if unpacker is None:
            return  # dead: nothing more is read
        # Bytes since the current message started: msgpack's tell() moves
        # inside a partly parsed message, so it cannot measure this.
        if not self._backlog and self._fed - self._msg_start + len(data) <= self._max:
            unpacker.feed(data)
            self._fed += len(data)
        else:
            self._backlog += data

    def next_event(self) -> Message | Sentinel:
        """The next complete message, :data:`NEED_DATA` or :data:`CONNECTION_CLOSED`.

        Raises:
            RemoteProtocolError: see the class docstring.
        """
        if self._dead is not None:
            raise RemoteProtocolError(
                f"connection already failed: {self._dead.message}",
                code=self._dead.code,
                fatal=True,
            )
        if self._fed == self._msg_start and not self._backlog:
            # Every byte fed so far is decoded: what unpack() would say by
            # raising OutOfData, without the exception (once per message).
            return CONNECTION_CLOSED if self._eof else NEED_DATA
        unpacker = self._unpacker
        assert unpacker is not None
        while True:
            try:
                obj = unpacker.unpack()
            except msgpack.OutOfData:
                in_progress = self._fed - self._msg_start
                if in_progress >= self._max:
                    self._die(_TOO_LARGE, f"message exceeds {self._max} bytes")
                if self._backlog:
                    room = self._max - (self._fed - self._msg_start)
                    chunk = self._backlog[:room]
                    del self._backlog[:room]
                    unpacker.feed(chunk)
                    self._fed += len(chunk)
                    continue
                if not self._eof:
                    return NEED_DATA
                if in_progress:
                    self._die(_MALFORMED, "connection closed in the middle of a message")
                return CONNECTION_CLOSED
            except Exception as exc:  # any other unpack error: never reuse the Unpacker
                text = str(exc)
                code = (
                    _TOO_LARGE
                    if isinstance(exc, msgpack.BufferFull) or "exceeds max_" in text
                    else _MALFORMED
                )
                detail = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
                self._die(code, f"undecodable msgpack ({detail})")
            self._msg_start = unpacker.tell()
            return self._accept(obj)

    def _die(self, code: str, message: str) -> NoReturn:
        self._unpacker = None
        self._backlog.clear()
        self._dead = RemoteProtocolError(message, code=code, fatal=True)
        raise self._dead

    def _reject(self, code: str, message: str, request_id: int | None) -> RemoteProtocolError:
        """A non-fatal error. A server may then send ErrorReply(request_id); a
        client stops waiting for ``request_id`` (its reply was unusable)."""
        if request_id is not None:
            if not self._server:
                self._pending.pop(request_id, None)
            elif request_id in self._pending:
                request_id = None  # a duplicate: don't touch the original's slot
            else:
                self._pending[request_id] = ERROR_ONLY
        return RemoteProtocolError(message, code=code, fatal=False, request_id=request_id)

    def _accept(self, obj: object) -> Message:
        if type(obj) is dict and self._state is State.READY:
            # The shapes every trap carries, decoded in one pass (._fast);
            # anything else, or a duplicate or unexpected id, takes the
            # general path below, which accepts and refuses exactly the same.
            pending = self._pending
            if self._server:
                request = fast_request(obj)
                if request is not None and request.id not in pending:
                    pending[request.id] = expected_replies(request)
                    return request
            else:
                reply = fast_reply(obj)
                if reply is not None and type(reply) in pending.get(reply.id, ()):
                    del pending[reply.id]
                    return reply
        if type(obj) is not dict:
            self._die(_MALFORMED, f"a message must be a msgpack map, not {_tname(obj)}")
        if self._state is State.CLOSED or (self._server and self._state is State.CLOSING):
            self._die(WireErrorCode.BAD_STATE, "message after bye: only EOF may follow")
        rid = obj.get("id")
        request_id = rid if type(rid) is int and 0 <= rid <= MAX_REQUEST_ID else None
        kind = obj.get("t")
        if type(kind) is not str:
            code = _MALFORMED if kind is None else _BAD_TYPE
            raise self._reject(code, f'"t" must be a str, not {_tname(kind)}', request_id)
        cls = self._decode_table.get(kind)
        if cls is None:
            expected = "request" if self._server else "reply"
            raise self._reject(
                WireErrorCode.UNKNOWN_MESSAGE,
                f"unknown {expected} type {kind[:MAX_NAME_LEN]!r}",
                request_id,
            )
        if cls is Hello or cls is Join:
            version = obj.get("version")
            if type(version) is int and version != PROTOCOL_VERSION:
                raise self._reject(
                    WireErrorCode.VERSION,
                    f"protocol version {version} is not supported (speak {PROTOCOL_VERSION})",
                    request_id,
                )
        try:
            message = cls.from_wire(obj)
        except LocalProtocolError as exc:
            raise self._reject(exc.code, f"{kind}: {exc.message}", request_id) from None
        if self._server:
            assert isinstance(message, Request)
            self._accept_request(message)
        else:
            assert isinstance(message, Reply)
            self._accept_reply(message)
        return message

    def _accept_request(self, request: Request) -> None:
        rid: int = request.id
        if rid in self._pending:
            raise self._reject(
                WireErrorCode.BAD_STATE, f"request id {rid} is already awaiting a reply", None
            )
        new_state = request_transition(self._state, request)
        if new_state is None:
            raise self._reject(
                WireErrorCode.BAD_STATE,
                f"{request.TYPE} is not allowed in state {self._state.value}",
                rid,
            )
        if new_state is State.HANDSHAKE:
            self._handshake_id = rid
        self._state = new_state
        self._pending[rid] = expected_replies(request)

    def _accept_reply(self, reply: Reply) -> None:
        rid: int | None = reply.id
        if rid is None:
            return  # an unattributable error; no state change
        expected = self._pending.pop(rid, None)
        if expected is None:
            raise self._reject(
                WireErrorCode.BAD_STATE, f"{reply.TYPE} for unknown request id {rid}", rid
            )
        if type(reply) not in expected:
            names = ", ".join(cls.TYPE for cls in expected)
            raise self._reject(
                WireErrorCode.BAD_STATE, f"{reply.TYPE} answers a request expecting {names}", rid
            )
        self._reply_transition(reply)

    def _reply_transition(self, reply: Reply) -> None:
        answers_handshake = reply.id is not None and reply.id == self._handshake_id
        if not answers_handshake and type(reply) not in REPLY_TRANSITIONS:
            return  # a result, say: it changes no state
        if answers_handshake:
            self._handshake_id = None
        self._state = reply_transition(self._state, reply, answers_handshake=answers_handshake)

    # -- sending --

    def send(self, message: Message) -> bytes:
        """Encode ``message`` for the wire, checking role and state.

        A :class:`Welcome` must go out in one ``sendmsg`` together with the
        memory fd (``Welcome.ANCILLARY_FDS``); that is the transport's job.

        Raises:
            LocalProtocolError: the role may not send it, the state does not
                allow it, its id is not awaiting this reply (server) or is
                already in flight (client), or it encodes to more than the
                maximum message size.
        """
        if self._server:
            if not isinstance(message, Reply):
                raise LocalProtocolError(f"a server cannot send {type(message).__name__}")
            return self._send_reply(message)
        if not isinstance(message, Request):
            raise LocalProtocolError(f"a client cannot send {type(message).__name__}")
        return self._send_request(message)

    def _encode(self, message: Message) -> bytes:
        data = self._packer.pack(message.to_wire())
        if len(data) > self._max:
            raise LocalProtocolError(
                f"{message.TYPE} encodes to {len(data)} bytes, over {self._max}", code=_TOO_LARGE
            )
        return data

    def _send_request(self, request: Request) -> bytes:
        rid: int = request.id
        new_state = request_transition(self._state, request)
        if new_state is None:
            raise LocalProtocolError(
                f"cannot send {request.TYPE} in state {self._state.value}",
                code=WireErrorCode.BAD_STATE,
            )
        if rid in self._pending:
            raise LocalProtocolError(
                f"request id {rid} is already awaiting a reply", code=WireErrorCode.BAD_STATE
            )
        data = self._encode(request)
        if new_state is State.HANDSHAKE:
            self._handshake_id = rid
        self._state = new_state
        self._pending[rid] = expected_replies(request)
        return data

    def _send_reply(self, reply: Reply) -> bytes:
        if self._state is State.CLOSED:
            raise LocalProtocolError("cannot send after goodbye", code=WireErrorCode.BAD_STATE)
        rid: int | None = reply.id
        if rid is None:
            return self._encode(reply)  # ErrorReply(None): always allowed
        expected = self._pending.get(rid)
        if expected is None:
            raise LocalProtocolError(
                f"no request with id {rid} is awaiting a reply", code=WireErrorCode.BAD_STATE
            )
        if type(reply) not in expected:
            names = ", ".join(cls.TYPE for cls in expected)
            raise LocalProtocolError(
                f"request {rid} must be answered by {names}, not {reply.TYPE}",
                code=WireErrorCode.BAD_STATE,
            )
        data = self._encode(reply)
        del self._pending[rid]
        self._reply_transition(reply)
        return data
