"""The protocol's states as tables (h11's ``_state`` habit): which request
may be sent in which state and where it leads, which replies answer it, and
what a reply does to the state. :class:`~._connection.Connection` only looks
things up here.

    IDLE -(hello/join)-> HANDSHAKE -(welcome)-> READY -(bye)-> CLOSING
    -(goodbye)-> CLOSED; an error reply to hello/join returns to IDLE; bye is
    also allowed in IDLE.
"""

from __future__ import annotations

import enum
from typing import Final

from pvemu.shared.abi import HYPERVISOR_multicall

from ._messages import (
    Audit,
    AuditResult,
    Bye,
    ErrorReply,
    Goodbye,
    Hello,
    Hypercall,
    Join,
    KernelWrite,
    KernelWriteResult,
    MulticallResult,
    Ptwr,
    PtwrResult,
    Reply,
    Request,
    Result,
    RunUser,
    Stats,
    StatsResult,
    UserResult,
    Welcome,
)


class State(enum.Enum):
    """Connection state, the same on both ends once bytes have moved."""

    IDLE = "IDLE"
    HANDSHAKE = "HANDSHAKE"
    READY = "READY"
    CLOSING = "CLOSING"
    CLOSED = "CLOSED"


class Sentinel(enum.Enum):
    """Non-message results of :meth:`Connection.next_event`."""

    NEED_DATA = "NEED_DATA"
    CONNECTION_CLOSED = "CONNECTION_CLOSED"

    def __repr__(self) -> str:
        return self.value


#: ``next_event`` needs more bytes: call ``receive_data`` first.
NEED_DATA: Final = Sentinel.NEED_DATA
#: The peer closed its end cleanly (EOF between messages).
CONNECTION_CLOSED: Final = Sentinel.CONNECTION_CLOSED

#: (state, request type) -> the state once it is sent. A pair that is not
#: here is a request the state does not allow.
REQUEST_TRANSITIONS: Final[dict[tuple[State, type[Request]], State]] = {
    (State.IDLE, Hello): State.HANDSHAKE,
    (State.IDLE, Join): State.HANDSHAKE,
    (State.IDLE, Bye): State.CLOSING,
    (State.READY, Bye): State.CLOSING,
    **{
        (State.READY, kind): State.READY
        for kind in (Hypercall, Ptwr, KernelWrite, RunUser, Stats, Audit)
    },
}

#: request type -> the replies that may answer it.
REPLIES: Final[dict[type[Request], tuple[type[Reply], ...]]] = {
    Hello: (Welcome, ErrorReply),
    Join: (Welcome, ErrorReply),
    Hypercall: (Result, ErrorReply),
    Ptwr: (PtwrResult, ErrorReply),
    KernelWrite: (KernelWriteResult, ErrorReply),
    RunUser: (UserResult, ErrorReply),
    Stats: (StatsResult, ErrorReply),
    Audit: (AuditResult, ErrorReply),
    Bye: (Goodbye,),
}
#: A multicall is a Hypercall answered by its own result type.
MULTICALL_REPLIES: Final[tuple[type[Reply], ...]] = (MulticallResult, ErrorReply)
#: What a rejected request may still get.
ERROR_ONLY: Final[tuple[type[Reply], ...]] = (ErrorReply,)

#: The reply to the handshake request (hello/join) -> the state it leads to.
HANDSHAKE_OUTCOMES: Final[dict[type[Reply], State]] = {
    Welcome: State.READY,
    ErrorReply: State.IDLE,
}
#: Other replies that change the state, from any state.
REPLY_TRANSITIONS: Final[dict[type[Reply], State]] = {Goodbye: State.CLOSED}


def request_transition(state: State, request: Request) -> State | None:
    """The state after ``request``, or None if it is not allowed in ``state``."""
    return REQUEST_TRANSITIONS.get((state, type(request)))


def expected_replies(request: Request) -> tuple[type[Reply], ...]:
    """The reply types that may answer ``request``."""
    if isinstance(request, Hypercall) and request.op == HYPERVISOR_multicall:
        return MULTICALL_REPLIES
    return REPLIES[type(request)]


def reply_transition(state: State, reply: Reply, *, answers_handshake: bool) -> State:
    """The state after ``reply``."""
    if answers_handshake:
        return HANDSHAKE_OUTCOMES[type(reply)]
    return REPLY_TRANSITIONS.get(type(reply), state)
