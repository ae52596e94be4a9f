"""Kernels of `bench/chain.py`: a producer, a stage and a reduction over big float64 arrays.

Plain NumPy, so that batuta and Dask run the very same functions (numba would add a compile
step to one side only). Loaded into the agents with --kernel-module.
"""

from __future__ import annotations

import numpy as np
from batuta.kernels import kernel


def make(seed: int, n: int) -> np.ndarray:
    return np.arange(int(n), dtype=np.float64) * 1e-6 + float(seed)


def step(x: np.ndarray, k: float) -> np.ndarray:
    return x * float(k) + 1.0


def reduce_sum(x: np.ndarray) -> float:
    return float(x.sum())


chain_make = kernel("chain_make", description="arange(n) * 1e-6 + seed: a chain's first array.", pure=True)(make)
chain_make.cpu(make)
chain_step = kernel("chain_step", description="x * k + 1: one stage of a chain.", pure=True)(step)
chain_step.cpu(step)
chain_sum = kernel("chain_sum", description="The sum of a chain's last array.", pure=True)(reduce_sum)
chain_sum.cpu(reduce_sum)
