"""Guest boot: build the first page-table tree through hypercalls.

As a Xen PV kernel does at start-up: prepare the tables in frames that are
not yet typed (so writing them is plain data), pin the root (Xen validates the
whole tree once), then load it as every vCPU's base pointer. The tree maps
nothing yet; the kernel fills L1s on demand.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pvemu.shared import abi
from pvemu.shared.x86 import _PAGE_PRESENT, _PAGE_RW, _PAGE_USER, maddr_of_entry, make_pte

if TYPE_CHECKING:
    from .client import Domain

TABLE_FLAGS = _PAGE_PRESENT | _PAGE_RW | _PAGE_USER


class BootError(Exception):
    """A boot hypercall failed: the hypervisor refused the initial tree."""


async def boot_domain(domain: Domain) -> None:
    """Build and load L4 -> L3 -> L2 -> L1 covering VA 0..2 MiB."""
    l4, l3, l2, l1 = (domain.alloc_frame() for _ in range(4))
    links = [
        (maddr_of_entry(l2, 0), make_pte(l1, TABLE_FLAGS)),
        (maddr_of_entry(l3, 0), make_pte(l2, TABLE_FLAGS)),
        (maddr_of_entry(l4, 0), make_pte(l3, TABLE_FLAGS)),
    ]
    rc, done = await domain.mmu_update(links)
    if rc:
        raise BootError(f"writing the initial tree failed: rc={abi.errno_name(rc)} done={done}")
    rc, done = await domain.mmuext_op(
        [(abi.MMUEXT_PIN_L4_TABLE, l4, 0), (abi.MMUEXT_NEW_BASEPTR, l4, 0)]
    )
    if rc:
        raise BootError(f"pinning the root failed: rc={abi.errno_name(rc)} done={done}")
    for vcpu in range(1, domain.nr_vcpus):
        rc, _ = await domain.mmuext_op([(abi.MMUEXT_NEW_BASEPTR, l4, 0)], vcpu=vcpu)
        if rc:
            raise BootError(f"loading the root on vCPU {vcpu} failed: {abi.errno_name(rc)}")
    domain.l4_mfn = l4
