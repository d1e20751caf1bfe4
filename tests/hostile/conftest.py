"""The hypervisor the hostile tests attack: one real process for the whole
package, as it was for the single module these tests came from."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.hostile.scene import MACHINE_MIB
from tests.hvproc import HypervisorProcess, hypervisor_process


@pytest.fixture(scope="package")
def hvp() -> Iterator[HypervisorProcess]:
    with hypervisor_process(memory_mib=MACHINE_MIB, tag="hostile") as process:
        yield process
