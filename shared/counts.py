"""Trap counts, one definition for every layer.

A trap is every guest -> hypervisor transition (DESIGN §4): each top-level
hypercall (a multicall is one, whatever it carries), each emulated page-table
write and each page fault reflected to the guest. :func:`trap_count` is that
formula; the hypervisor's per-vCPU counters and the guest's own count both
use it, so the two sides cannot drift apart.
"""

from __future__ import annotations


def trap_count(hypercalls: int, ptwr: int, page_faults: int) -> int:
    """Traps: top-level hypercalls + emulated page-table writes + page faults."""
    return hypercalls + ptwr + page_faults
