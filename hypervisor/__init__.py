"""The hypervisor: machine memory, frame table, hypercall semantics, domains.

The core modules are sans-I/O; only ``hypervisor.server`` touches sockets.
"""

from __future__ import annotations

from .core import DomainError as DomainError
from .core import Hypervisor as Hypervisor
from .core import PendingCall as PendingCall
from .hypercalls import HypercallResult as HypercallResult

__all__ = ["DomainError", "HypercallResult", "Hypervisor", "PendingCall"]
