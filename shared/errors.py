"""Protocol errors, split by blame (the h11 convention).

* :class:`RemoteProtocolError`: the peer sent something we cannot accept. It
  carries a :class:`WireErrorCode` ``code`` for the error reply, the request
  id when one could be read (so the reply can echo it), and ``fatal``: whether
  the byte stream itself is corrupt and the connection must be closed.
* :class:`LocalProtocolError`: we misused the API (built an invalid message,
  sent a message our role or the connection state does not allow).

No other exception type escapes :mod:`shared.wire` for bad input; anything else
is a bug in pvemu.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "WireErrorCode",
    "ProtocolError",
    "RemoteProtocolError",
    "LocalProtocolError",
]


class WireErrorCode:
    """The ``code`` strings carried by error replies (``ErrorReply.code``).

    The first six are produced by the decoder itself; the others are for the
    hypervisor's own checks. Codes are plain ``str`` so they go on the wire
    unchanged and compare equal to decoded values.
    """

    #: Not valid msgpack, not a map, truncated, missing or extra fields.
    MALFORMED: Final = "malformed"
    #: A container, string, blob or the whole message is over its limit.
    TOO_LARGE: Final = "too_large"
    #: A field has the wrong type, or an integer is outside its wire type.
    BAD_TYPE: Final = "bad_type"
    #: ``"t"`` names no message this role accepts.
    UNKNOWN_MESSAGE: Final = "unknown_message"
    #: The message is not allowed in the connection's current state.
    BAD_STATE: Final = "bad_state"
    #: Hello/Join with a protocol version we do not speak.
    VERSION: Final = "version"
    #: Join with a secret that does not match the domain's.
    BAD_SECRET: Final = "bad_secret"
    #: Join names a domain that does not exist.
    NO_SUCH_DOMAIN: Final = "no_such_domain"
    #: A value is well-typed but outside what is allowed (a vCPU index, a size).
    OUT_OF_RANGE: Final = "out_of_range"
    #: A valid request the hypervisor does not implement or cannot satisfy.
    NOT_SUPPORTED: Final = "not_supported"
    #: The hypervisor failed; the request may or may not have had effects.
    INTERNAL: Final = "internal"

    #: Every code above.
    ALL: Final = frozenset(
        {
            MALFORMED,
            TOO_LARGE,
            BAD_TYPE,
            UNKNOWN_MESSAGE,
            BAD_STATE,
            VERSION,
            BAD_SECRET,
            NO_SUCH_DOMAIN,
            OUT_OF_RANGE,
            NOT_SUPPORTED,
            INTERNAL,
        }
    )


class ProtocolError(Exception):
    """Base class of both protocol errors.

    Args:
        message: human-readable description (goes into ``ErrorReply.message``).
        code: one of the :class:`WireErrorCode` strings.
    """

    code: str

    def __init__(self, message: str, *, code: str = WireErrorCode.MALFORMED) -> None:
        super().__init__(message)
        self.code = code

    @property
    def message(self) -> str:
        """The human-readable description."""
        return str(self.args[0]) if self.args else ""


class RemoteProtocolError(ProtocolError):
    """The peer sent something invalid.

    Attributes:
        code: the :class:`WireErrorCode` to put in the error reply.
        fatal: True when the byte stream itself is corrupt (bad msgpack,
            over-limit sizes, a non-map message, anything after bye); the
            connection must be closed and every later ``next_event`` raises
            again. False when one well-formed message was rejected; the
            connection goes on with the next message.
        request_id: the offending message's ``"id"`` if it could be read
            (reply with ``ErrorReply(request_id, code, message)``), else None.
    """

    fatal: bool
    request_id: int | None

    def __init__(
        self,
        message: str,
        *,
        code: str = WireErrorCode.MALFORMED,
        fatal: bool = False,
        request_id: int | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.fatal = fatal
        self.request_id = request_id

    def __repr__(self) -> str:
        return (
            f"RemoteProtocolError({self.message!r}, code={self.code!r}, "
            f"fatal={self.fatal!r}, request_id={self.request_id!r})"
        )


class LocalProtocolError(ProtocolError):
    """We misused the API: an invalid message, or one not allowed now."""

    def __repr__(self) -> str:
        return f"LocalProtocolError({self.message!r}, code={self.code!r})"
