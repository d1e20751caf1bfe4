"""Every bound of the wire protocol: message sizes, container lengths, field ranges.

The decoder enforces them so that no input can make a peer hold more than
these; ``docs/protocol.md`` lists them with their reasons.
"""

from __future__ import annotations

from typing import Final

#: Sent in Hello/Join; any other value is answered with a "version" error.
PROTOCOL_VERSION: Final = 2

#: Bytes per mmu_update record: two little-endian u64s (ptr, val).
MMU_UPDATE_SIZE: Final = 16
#: Records in one mmu_update blob: the protocol's ceiling (16 MiB). A server
#: may enforce less (``pvemu hypervisor --max-batch``; Welcome.limits says).
MAX_MMU_UPDATES: Final = 1 << 20
#: Largest ``bin`` the decoder accepts: an mmu_update blob at the ceiling.
#: Each field has its own, smaller limit (a user write, a batch).
MAX_BIN_LEN: Final = MAX_MMU_UPDATES * MMU_UPDATE_SIZE
#: Largest encoded message (bytes), in either direction: the ceiling of
#: ``Connection(max_message_size=...)`` and its default.
MAX_MESSAGE_SIZE: Final = MAX_BIN_LEN + 1024 * 1024
#: The message size a server enforces unless its batch limit needs more: room
#: for every request that carries no mmu_update blob (a run_user full of
#: writes is 2 MiB).
DEFAULT_MESSAGE_SIZE: Final = 4 * 1024 * 1024
#: Largest ``str`` the decoder accepts, in UTF-8 bytes (4 x MAX_TEXT_LEN).
MAX_STR_LEN: Final = 4096
#: Largest array (mmuext ops, multicall calls, user accesses, ...).
MAX_ARRAY_LEN: Final = 4096
#: Largest map (message maps, limits, each level of stats).
MAX_MAP_LEN: Final = 256
#: Largest ext payload; ext types are never valid, they are rejected as bad_type.
MAX_EXT_LEN: Final = 16

#: Request ids are ints 0 .. 2**63 - 1.
MAX_REQUEST_ID: Final = (1 << 63) - 1
#: Domain name, stats/limits keys, error codes: at most this many characters.
MAX_NAME_LEN: Final = 64
#: Error messages and audit violations: at most this many characters.
MAX_TEXT_LEN: Final = 1024
#: Hello.memory_mib is 1 .. MAX_MEMORY_MIB (16 GiB).
MAX_MEMORY_MIB: Final = 16384
#: 4 KiB frames in MAX_MEMORY_MIB: Welcome.nr_frames is 1 .. this. The p2m
#: does not travel in a message; it is the tail of the domain's memfd.
MAX_DOMAIN_FRAMES: Final = MAX_MEMORY_MIB * 256
#: Hello.vcpus is 1 .. MAX_VCPUS; vCPU indexes are 0 .. MAX_VCPUS - 1.
MAX_VCPUS: Final = 64
#: The domain secret (Welcome, Join) is exactly this many bytes.
SECRET_LEN: Final = 16
#: Entries in one mmuext_op list.
MAX_MMUEXT_OPS: Final = 4096
#: Calls in one multicall (per nesting level).
MAX_MULTICALL_CALLS: Final = 1024
#: A multicall may contain a multicall (answered -EINVAL), no deeper.
MAX_MULTICALL_DEPTH: Final = 2
#: Arguments of an unknown hypercall (Xen hypercalls take at most six).
MAX_HYPERCALL_ARGS: Final = 6
#: Accesses in one run_user request (and reads in its result).
MAX_USER_ACCESSES: Final = 512
#: Bytes in one user access (read length or write data).
MAX_ACCESS_LEN: Final = 4096
#: Bytes in one kernel store through the linear map: at most one 4 KiB frame
#: (a store may not cross into the next frame, whose mapping may differ).
MAX_KERNEL_WRITE_LEN: Final = 4096
#: Feature numbers in a Welcome.
MAX_FEATURES: Final = 64
#: Entries in Welcome.limits.
MAX_LIMITS: Final = 64
#: Nesting of stats maps (the top-level map is depth 1).
MAX_STATS_DEPTH: Final = 4
#: Violations in one audit result.
MAX_VIOLATIONS: Final = 512
