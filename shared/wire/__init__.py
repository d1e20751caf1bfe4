"""The guest <-> hypervisor wire protocol, sans I/O (h11 style).

One msgpack map per message on a stream socket; msgpack is self-delimiting, so
there is no length prefix. Every map has ``"t"`` (the message type) and
``"id"`` (the request id, echoed by the reply). ``docs/protocol.md`` documents
every message, field, limit and error; this module is the executable form.

* Messages are frozen, slotted dataclasses validated on construction (so we
  never send anything the peer would reject) and on decode.
* :class:`Connection` turns bytes into messages (:meth:`Connection.receive_data`,
  :meth:`Connection.next_event`) and messages into bytes
  (:meth:`Connection.send`), and tracks the hello/welcome/bye state machine and
  the outstanding request ids. It never touches a socket; no trio here.
* Bad input raises :class:`~shared.errors.RemoteProtocolError` (with a ``code``
  and ``fatal``); API misuse raises :class:`~shared.errors.LocalProtocolError`.
  Nothing else escapes for any input bytes.

``mmu_update`` batches travel as ONE ``bin`` blob of little-endian u64s
(``struct mmu_update[]`` layout), packed and parsed as arrays, never per
record. The p2m does not travel at all: it is the read-only tail of the
domain's memfd (:func:`p2m_offset`), so a 16 GiB domain needs no 32 MiB message.

This module is the public face (h11's habit); the pieces each do one job:
``_limits`` (every bound), ``_checks`` (field validators), ``_blob`` (u64
blobs), ``_args`` (typed hypercall arguments), ``_messages`` (the message
types), ``_state`` (the protocol's state tables), ``_fast`` (one-pass
decoding of the messages every trap carries) and ``_connection``.
"""

from __future__ import annotations

from ._args import (
    ARGS_FOR_OP,
    Call,
    HypercallArgs,
    MmuextOpArgs,
    MmuUpdateArgs,
    MulticallArgs,
    RawArgs,
    UpdateVaMappingArgs,
    UpdateVaMappingOtherdomainArgs,
    VmAssistArgs,
    args_from_wire,
    check_op_args,
    make_call,
)
from ._blob import (
    pack_mmu_updates,
    pack_u64s,
    u64_array_blob,
    u64_view,
    unpack_mmu_updates,
    unpack_u64s,
)
from ._connection import Connection, Role
from ._limits import (
    DEFAULT_MESSAGE_SIZE,
    MAX_ACCESS_LEN,
    MAX_ARRAY_LEN,
    MAX_BIN_LEN,
    MAX_DOMAIN_FRAMES,
    MAX_EXT_LEN,
    MAX_FEATURES,
    MAX_HYPERCALL_ARGS,
    MAX_KERNEL_WRITE_LEN,
    MAX_LIMITS,
    MAX_MAP_LEN,
    MAX_MEMORY_MIB,
    MAX_MESSAGE_SIZE,
    MAX_MMU_UPDATES,
    MAX_MMUEXT_OPS,
    MAX_MULTICALL_CALLS,
    MAX_MULTICALL_DEPTH,
    MAX_NAME_LEN,
    MAX_REQUEST_ID,
    MAX_STATS_DEPTH,
    MAX_STR_LEN,
    MAX_TEXT_LEN,
    MAX_USER_ACCESSES,
    MAX_VCPUS,
    MAX_VIOLATIONS,
    MMU_UPDATE_SIZE,
    PROTOCOL_VERSION,
    SECRET_LEN,
)
from ._messages import (
    REPLY_TYPES,
    REQUEST_TYPES,
    Access,
    Audit,
    AuditResult,
    Bye,
    ErrorReply,
    Fault,
    Goodbye,
    Hello,
    Hypercall,
    Join,
    KernelWrite,
    KernelWriteResult,
    Message,
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
    p2m_bytes,
    p2m_offset,
)
from ._state import CONNECTION_CLOSED, NEED_DATA, Sentinel, State

__all__ = [
    # constants and limits
    "PROTOCOL_VERSION",
    "MAX_MESSAGE_SIZE",
    "DEFAULT_MESSAGE_SIZE",
    "MAX_BIN_LEN",
    "MAX_STR_LEN",
    "MAX_ARRAY_LEN",
    "MAX_MAP_LEN",
    "MAX_EXT_LEN",
    "MAX_REQUEST_ID",
    "MAX_NAME_LEN",
    "MAX_TEXT_LEN",
    "MAX_MEMORY_MIB",
    "MAX_DOMAIN_FRAMES",
    "MAX_VCPUS",
    "SECRET_LEN",
    "MAX_MMU_UPDATES",
    "MMU_UPDATE_SIZE",
    "MAX_MMUEXT_OPS",
    "MAX_MULTICALL_CALLS",
    "MAX_MULTICALL_DEPTH",
    "MAX_HYPERCALL_ARGS",
    "MAX_USER_ACCESSES",
    "MAX_ACCESS_LEN",
    "MAX_KERNEL_WRITE_LEN",
    "MAX_FEATURES",
    "MAX_LIMITS",
    "MAX_STATS_DEPTH",
    "MAX_VIOLATIONS",
    # blob helpers
    "pack_u64s",
    "unpack_u64s",
    "u64_view",
    "u64_array_blob",
    "pack_mmu_updates",
    "unpack_mmu_updates",
    # hypercall arguments
    "MmuUpdateArgs",
    "MmuextOpArgs",
    "UpdateVaMappingArgs",
    "UpdateVaMappingOtherdomainArgs",
    "VmAssistArgs",
    "MulticallArgs",
    "RawArgs",
    "HypercallArgs",
    "Call",
    "ARGS_FOR_OP",
    "args_from_wire",
    "check_op_args",
    "make_call",
    # messages
    "Message",
    "Request",
    "Reply",
    "Access",
    "Fault",
    "Hello",
    "Join",
    "Hypercall",
    "Ptwr",
    "KernelWrite",
    "RunUser",
    "Stats",
    "Audit",
    "Bye",
    "Welcome",
    "p2m_bytes",
    "p2m_offset",
    "Result",
    "MulticallResult",
    "PtwrResult",
    "KernelWriteResult",
    "UserResult",
    "StatsResult",
    "AuditResult",
    "ErrorReply",
    "Goodbye",
    "REQUEST_TYPES",
    "REPLY_TYPES",
    # connection
    "Role",
    "State",
    "Sentinel",
    "NEED_DATA",
    "CONNECTION_CLOSED",
    "Connection",
]
