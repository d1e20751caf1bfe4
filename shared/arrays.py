"""Set operations on integer arrays, without ``np.unique``.

numpy 2.4's ``np.unique`` imports ``numpy.ma`` the first time it runs (it asks
whether its input is masked), which costs each process about 20 ms; the first
batched get-and-clear of a run paid it twice, in the guest and in the
hypervisor, inside the measured phase. A sort and a neighbour compare give the
same answers for the plain integer arrays used here, with no import.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


def distinct_sorted(values: NDArray[np.integer]) -> NDArray[np.integer]:
    """The distinct values of ``values``, ascending (``np.unique(values)``)."""
    ordered = np.sort(values, axis=None)
    if len(ordered) < 2:
        return ordered
    first_of_run = np.empty(len(ordered), dtype=bool)
    first_of_run[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first_of_run[1:])
    return ordered[first_of_run]


def has_repeats(values: NDArray[np.integer]) -> bool:
    """Whether some value appears twice in ``values``."""
    ordered = np.sort(values, axis=None)
    return bool(np.any(ordered[1:] == ordered[:-1]))
