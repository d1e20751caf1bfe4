"""The array set helpers equal numpy's own, and no workload imports a
module once its kernel has booted (a first import inside a measured phase is
timed as the hypervisor's or the guest's work: numpy 2.4's ``np.unique``
made the first batched get-and-clear of a run ~40 ms slower that way)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numpy.typing import NDArray

from pvemu.shared.arrays import distinct_sorted, has_repeats

int_arrays = hnp.arrays(
    dtype=st.sampled_from([np.int64, np.uint64, np.intp]),
    shape=st.integers(0, 40),
    elements=st.integers(0, 600),
)


@given(int_arrays)
def test_distinct_sorted_is_np_unique(values: NDArray[Any]) -> None:
    got = distinct_sorted(values)
    assert got.dtype == values.dtype
    assert got.tolist() == np.unique(values).tolist()


@given(int_arrays)
def test_has_repeats_says_whether_a_value_appears_twice(values: NDArray[Any]) -> None:
    assert has_repeats(values) == (len(set(values.tolist())) != len(values))


def test_no_workload_imports_a_module_after_boot() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tests.lazy_imports_child"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    late = json.loads(done.stdout.splitlines()[-1])
    assert late == {}, f"imported inside a measured run: {late}"
