"""Kernels for the data-plane tests (tests/test_transfer*.py): large values in and out."""

from __future__ import annotations

import numpy as np
from batuta.kernels import kernel


@kernel("test_reversed", description="The array reversed, as a new array of the same size.")
def test_reversed(x: np.ndarray) -> np.ndarray:
    return x[::-1].copy()


test_reversed.cpu(test_reversed.reference)


@kernel("test_fingerprint", description="dtype, shape, sum and last element: what a test checks of a large value.")
def test_fingerprint(x: np.ndarray) -> tuple[str, tuple[int, ...], float, float]:
    return x.dtype.str, tuple(x.shape), float(x.sum(dtype=np.float64)), float(x.reshape(-1)[-1])


test_fingerprint.cpu(test_fingerprint.reference)


@kernel("test_arange", description="np.arange(n) as float64: a large result from a small task.")
def test_arange(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.float64)


test_arange.cpu(test_arange.reference)


@kernel("test_backing", description="What holds the argument's first byte: its mapping's name in /proc/self/maps.")
def test_backing(x: np.ndarray) -> str:
    from tests.support.heap import backing

    return backing(x)


test_backing.cpu(test_backing.reference)


@kernel("test_slot_pid", description="The pid of the slot process that runs it.")
def test_slot_pid() -> int:
    import os

    return os.getpid()


test_slot_pid.cpu(test_slot_pid.reference)
