"""The kernel of `bench/objects.py` that makes its big result from two numbers.

Plain NumPy, so that batuta and Dask run the very same function. Block by block, so that the
task's memory is the result and nothing more (a 4 GiB result on a machine that holds little
else), and so that any slice of it can be checked on the coordinator without making the rest.
Shipped to the hosts from the coordinator (the cluster file's `kernel_modules`).
"""

from __future__ import annotations

import numpy as np
from batuta.kernels import kernel

BLOCK = 1 << 24  # elements made at once


def values(start: int, stop: int) -> np.ndarray:
    """Elements [start, stop) of any result: (i mod 65521) / 2, exact in float32."""
    return (np.arange(start, stop, dtype=np.int64) % 65521).astype(np.float32) * np.float32(0.5)


def make(n: int) -> np.ndarray:
    out = np.empty(int(n), dtype=np.float32)
    for start in range(0, out.size, BLOCK):
        stop = min(start + BLOCK, out.size)
        out[start:stop] = values(start, stop)
    return out


objects_make = kernel("objects_make", description="n float32 values, (i mod 65521) / 2: a big result.", pure=True)(make)
objects_make.cpu(make)
