"""The server embedded in a trio program (nursery.start readiness), its
canonical log line per hypercall, and the sans-I/O import rule for the core."""

from __future__ import annotations

import subprocess
import sys
import tempfile

import structlog
import trio

from pvemu.guest.client import connect
from pvemu.hypervisor import Hypervisor
from pvemu.hypervisor.server import HypervisorServer, ServerLimits
from pvemu.shared import abi
from pvemu.shared.x86 import maddr_of_entry, make_pte


def test_core_imports_without_trio() -> None:
    code = (
        "import sys, shared.abi, shared.x86, shared.mmu, hypervisor;"
        "assert 'trio' not in sys.modules, 'the core must stay sans-I/O'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


async def test_embedded_server_logs_one_line_per_hypercall() -> None:
    hv = Hypervisor(64)
    server = HypervisorServer(hv, ServerLimits(quantum=2))
    with tempfile.TemporaryDirectory(prefix="pvemu-emb-", dir="/tmp") as tmp:
        path = f"{tmp}/hv.sock"
        capture = structlog.testing.LogCapture()
        structlog.configure(processors=[structlog.contextvars.merge_contextvars, capture])
        try:
            async with trio.open_nursery() as nursery:
                assert await nursery.start(server.serve, path) == path
                async with connect(path, memory_mib=2, vcpus=2) as dom:
                    frame = dom.alloc_frame()
                    table = dom.alloc_frame()
                    reqs = [(maddr_of_entry(table, i), make_pte(frame, 5)) for i in range(5)]
                    assert await dom.mmu_update(reqs) == (0, 5)
                    domid = dom.domid
                nursery.cancel_scope.cancel()
        finally:
            structlog.reset_defaults()
        logs = capture.entries
        assert hv.domains == {}  # the domain died with its last connection
    lines = [e for e in logs if e.get("op") == abi.HYPERVISOR_mmu_update and e.get("records") == 5]
    assert len(lines) == 1
    line = lines[0]
    assert line["event"] == "mmu_update"
    assert (line["domid"], line["vcpu"], line["rc"], line["done"]) == (domid, 0, 0, 5)
    assert line["slices"] == 3  # 5 records in slices of quantum=2
    assert line["duration_us"] >= 0
    assert any(e["event"] == "domain_destroyed" for e in logs)
