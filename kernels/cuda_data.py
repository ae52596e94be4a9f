"""The synthetic data sets of `ml_data`, generated on the GPU: the ``*_synth`` GPU variants
make their rows where they run, so an iteration ships parameters and not rows across PCIe.

Element (i, j) is ``noise = u + v - 1`` from SplitMix64 output ``i * width + j + 1`` of the
seed, as in `ml_data` (integer arithmetic, and products by 2**-32, are exact on every device).
The rest is written to round as the NumPy and numba versions do, so the rows agree in every
bit: a product that the CPU rounds before adding is computed with ``__dmul_rn`` here, which
the compiler may not fuse with the addition into an FMA (one rounding instead of two). Under
the simulator, which runs the kernels as Python, a plain product does the same.

One thread per row, with a grid stride; the kernels are module-level functions bound by
`_kernels()` as in `cuda_ml`.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

import numpy as np

from .cuda_support import jit_kernels, on_device, simulated, stream_grid

cuda: Any = None  # numba.cuda, bound by _kernels() before the kernels compile
mul_rn: Any = None  # a float64 product that is never fused into an FMA, bound by _kernels()
__all__ = ["blobs", "regression", "teacher"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_U30, _U27, _U31, _U32 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(32)
_LOW32 = np.uint64(0xFFFFFFFF)
_SCALE = 2.0**-32


def _noise_py(seed: Any, counter: Any) -> Any:
    """`ml_data`'s noise of SplitMix64 output `counter` (a uint64) of `seed`."""
    z = seed + counter * _GOLDEN
    z = (z ^ (z >> _U30)) * _MIX1
    z = (z ^ (z >> _U27)) * _MIX2
    z = z ^ (z >> _U31)
    return np.float64(z >> _U32) * _SCALE + np.float64(z & _LOW32) * _SCALE - 1.0


def _mul_py(a: Any, b: Any) -> Any:
    return a * b


noise: Any = None  # the force-inlined device version, bound by _kernels()


def _blobs_py(seed: Any, start: Any, centers: Any, spread: Any, x: Any) -> None:
    k = centers.shape[0]
    d = centers.shape[1]
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < x.shape[0]:
        row = start + i
        base = np.uint64(row) * np.uint64(d)
        center = row % k
        for j in range(d):
            x[i, j] = centers[center, j] + mul_rn(spread, noise(seed, base + np.uint64(j + 1)))
        i += stride


def _regression_py(seed: Any, start: Any, coef: Any, noise_scale: Any, x: Any, y: Any) -> None:
    d = coef.shape[0]
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < x.shape[0]:
        base = np.uint64(start + i) * np.uint64(d + 1)
        acc = np.float64(0.0)
        for j in range(d):
            value = np.float32(noise(seed, base + np.uint64(j + 1)))
            x[i, j] = value
            acc = acc + mul_rn(np.float64(value), coef[j])
        y[i] = acc + mul_rn(noise_scale, noise(seed, base + np.uint64(d + 1)))
        i += stride


def _teacher_py(seed: Any, start: Any, weights: Any, noise_scale: Any, x: Any, y: Any) -> None:
    d = weights.shape[0]
    c = weights.shape[1]
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < x.shape[0]:
        base = np.uint64(start + i) * np.uint64(d + c)
        for j in range(d):
            x[i, j] = np.float32(noise(seed, base + np.uint64(j + 1)))
        best = 0
        best_logit = np.float64(0.0)
        for q in range(c):  # each logit summed over features in order, as the CPU sums it
            logit = np.float64(0.0)
            for j in range(d):
                logit = logit + mul_rn(np.float64(x[i, j]), weights[j, q])
            logit = logit + mul_rn(noise_scale, noise(seed, base + np.uint64(d + q + 1)))
            if q == 0 or logit > best_logit:
                best = q
                best_logit = logit
        y[i] = best
        i += stride


@functools.cache
def _kernels() -> SimpleNamespace:
    global mul_rn
    kernels = jit_kernels(
        globals(),
        {"blobs": _blobs_py, "regression": _regression_py, "teacher": _teacher_py},
        {"noise": _noise_py},
    )
    if simulated():
        mul_rn = _mul_py
    else:
        from numba.cuda import libdevice

        mul_rn = libdevice.dmul_rn
    return kernels


def _launch(name: str, rows: int, args: tuple[Any, ...]) -> None:
    if rows:
        getattr(_kernels(), name)[stream_grid(rows)](*args)


def blobs(numba_cuda: Any, seed: int, start: int, rows: int, centers: Any, spread: float) -> Any:
    """`ml_data.blobs` rows as a float32 (rows, d) device array; `centers` host or device."""
    x = numba_cuda.device_array((rows, centers.shape[1]), np.float32)
    _launch("blobs", rows, (np.uint64(seed), np.int64(start), on_device(numba_cuda, centers), float(spread), x))
    return x


def regression(numba_cuda: Any, seed: int, start: int, rows: int, coef: Any, noise_scale: float) -> tuple[Any, Any]:
    """`ml_data.regression` rows as device arrays (x float32 (rows, d), y float32 (rows,))."""
    x = numba_cuda.device_array((rows, coef.shape[0]), np.float32)
    y = numba_cuda.device_array(rows, np.float32)
    args = (np.uint64(seed), np.int64(start), on_device(numba_cuda, coef), float(noise_scale), x, y)
    _launch("regression", rows, args)
    return x, y


def teacher(numba_cuda: Any, seed: int, start: int, rows: int, weights: Any, noise_scale: float) -> tuple[Any, Any]:
    """`ml_data.teacher` rows as device arrays (x float32 (rows, d), y int64 labels)."""
    x = numba_cuda.device_array((rows, weights.shape[0]), np.float32)
    y = numba_cuda.device_array(rows, np.int64)
    args = (np.uint64(seed), np.int64(start), on_device(numba_cuda, weights), float(noise_scale), x, y)
    _launch("teacher", rows, args)
    return x, y
