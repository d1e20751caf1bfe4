"""Every bound on what a guest can make the hypervisor hold or do.

Sans-I/O: the service reads the ones about requests (domains, batch size,
quantum), the trio server the ones about connections and time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from pvemu.shared import wire

from .scheduler import POLICIES

#: Entries a long hypercall processes before yielding, unless told otherwise.
DEFAULT_QUANTUM: Final = 256


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Every bound on what a guest can make the server hold or do.

    Worst-case receive buffering is ``max_connections x message_size``: 4 GiB
    with the defaults, only if every connection sends a maximum message at
    once; an idle connection costs about 60 KiB.
    """

    #: Entries a long hypercall processes before yielding (Xen's preemption check).
    quantum: int = DEFAULT_QUANTUM
    #: Live domains; a Hello beyond this is refused.
    max_domains: int = 64
    #: Open connections; one beyond this gets an error and is closed at once.
    max_connections: int = 1024
    #: Records in one mmu_update (also inside a multicall); more is ``too_large``.
    max_batch: int = 65536
    #: Seconds a connection may stay without Hello/Join before it is closed.
    handshake_timeout: float = 10.0
    #: Seconds a reply may wait for a guest that does not read before the
    #: connection is dropped (as if the guest hung up).
    send_timeout: float = 30.0
    #: Who runs the next slice: "fair" (FairShare) or "fifo" (first come).
    scheduler: str = "fair"

    def __post_init__(self) -> None:
        for name in ("quantum", "max_domains", "max_connections", "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_batch > wire.MAX_MMU_UPDATES:
            raise ValueError(f"max_batch is at most {wire.MAX_MMU_UPDATES} (the wire's ceiling)")
        if not (self.handshake_timeout > 0 and self.send_timeout > 0):
            raise ValueError("timeouts must be positive")
        if self.scheduler not in POLICIES:
            raise ValueError(f"scheduler must be one of {', '.join(POLICIES)}")

    @property
    def message_size(self) -> int:
        """The largest request accepted: room for a maximum batch, and never
        less than every other request needs."""
        batch_bytes = self.max_batch * wire.MMU_UPDATE_SIZE + 64 * 1024
        return min(wire.MAX_MESSAGE_SIZE, max(wire.DEFAULT_MESSAGE_SIZE, batch_bytes))


__all__ = ["DEFAULT_QUANTUM", "ServerLimits"]
