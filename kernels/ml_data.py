"""Seeded synthetic data sets for the ML kernels, generated chunk by chunk where the work runs.

Why generate on the worker: an iterative job (K-means, gradient descent) that ships its data
to the slots every iteration is limited by the coordinator's link, not by the slots (see
`bench/amdahl.py`). In a real cluster each host reads its own shard; here each task
regenerates its rows from ``(seed, first row, row count)``, which costs a few nanoseconds an
element, and only small parameters travel. The ``*_synth`` kernels in `ml` do that.

Every element is a pure function of the seed and its position, so any chunking gives the
same data, and the two implementations below agree in every bit: NumPy (the coordinator,
reference checks) and numba (inside the kernels). Element (i, j) of a data set whose rows
use `width` random numbers is ``noise(i, j) = u + v - 1`` in (-1, 1), where u and v are the
high and low 32 bits of SplitMix64 output ``i * width + j + 1`` of `seed`, scaled by 2**-32
(a triangular distribution; no transcendental functions, whose last bit differs between
NumPy and numba). Sums over features are taken in feature order in both implementations.

The data sets (x is float32; parameters are float64):

* `blobs`: row i lies around ``centers[i % K]``, each coordinate off by ``spread * noise``.
* `regression`: ``x = noise``, ``y = sum_j x[:, j] * coef[j] + noise_scale * noise`` (float32).
* `teacher`: ``x = noise``, ``y = argmax(x @ weights + noise_scale * noise)`` (int64 labels),
  a classification task whose classes a tree or an MLP can learn.
"""

from __future__ import annotations

import numpy as np

from .registry import KernelInputError, as_count, as_real, float_array, is_device_array, jit, prange

__all__ = [
    "GOLDEN",
    "MAX_COUNTER",
    "MAX_UINT64",
    "blobs",
    "blobs_numba",
    "check_params",
    "check_rows",
    "check_scale",
    "mix64",
    "noise",
    "noise_row",
    "regression",
    "regression_numba",
    "splitmix64",
    "teacher",
    "teacher_numba",
]

MAX_COUNTER = 1 << 62
"""Rows times random numbers per row must stay below this (SplitMix64 counters)."""

MAX_UINT64 = (1 << 64) - 1
_MASK64 = MAX_UINT64
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_U_GOLDEN, _U_MIX1, _U_MIX2 = np.uint64(_GOLDEN), np.uint64(_MIX1), np.uint64(_MIX2)
GOLDEN = _U_GOLDEN
"""SplitMix64's increment as a uint64, for numba code that walks a stream: ``state += GOLDEN``."""
_U30, _U27, _U31, _U32 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(32)
_LOW32 = np.uint64(0xFFFFFFFF)
_SCALE = 2.0**-32
_ROW_BLOCK = 1024  # rows per parallel work item of the numba generators


def splitmix64(counters: np.ndarray | int, seed: int) -> np.ndarray | int:
    """Output number `counters` (1, 2, ...) of the SplitMix64 stream seeded with `seed`.

    Counter-based: output t is ``mix(seed + t * golden)``, so any output can be drawn without
    the ones before it. Vectorised over a uint64 array, or one Python int.
    """
    if isinstance(counters, np.ndarray):
        z = np.uint64(seed) + counters.astype(np.uint64) * _U_GOLDEN
        z = (z ^ (z >> _U30)) * _U_MIX1
        z = (z ^ (z >> _U27)) * _U_MIX2
        return z ^ (z >> _U31)
    s = (seed + counters * _GOLDEN) & _MASK64
    s = ((s ^ (s >> 30)) * _MIX1) & _MASK64
    s = ((s ^ (s >> 27)) * _MIX2) & _MASK64
    return s ^ (s >> 31)


@jit(cache=True)
def mix64(state: np.uint64) -> np.uint64:
    """SplitMix64's output function, for numba code: draw t is ``mix64(seed + t * golden)``."""
    z = (state ^ (state >> _U30)) * _U_MIX1
    z = (z ^ (z >> _U27)) * _U_MIX2
    return z ^ (z >> _U31)


def noise(seed: int, start: int, rows: int, width: int, first: int, count: int) -> np.ndarray:
    """float64 (rows, count): noise of rows start.. and random numbers first..first+count-1."""
    row_base = np.arange(start, start + rows, dtype=np.uint64)[:, None] * np.uint64(width)
    offsets = np.arange(first + 1, first + count + 1, dtype=np.uint64)[None, :]
    h = np.asarray(splitmix64(row_base + offsets, seed))
    return (h >> _U32).astype(np.float64) * _SCALE + (h & _LOW32).astype(np.float64) * _SCALE - 1.0


@jit(cache=True)
def noise_row(seed: np.uint64, base: np.uint64, out: np.ndarray) -> None:
    """``out[j] = noise`` of random numbers base + j + 1 (numba): one row's worth, in a tight loop."""
    for j in range(out.shape[0]):
        z = seed + (base + np.uint64(j + 1)) * _U_GOLDEN
        z = (z ^ (z >> _U30)) * _U_MIX1
        z = (z ^ (z >> _U27)) * _U_MIX2
        z = z ^ (z >> _U31)
        out[j] = np.float64(z >> _U32) * _SCALE + np.float64(z & _LOW32) * _SCALE - 1.0


# -- the data sets, NumPy -----------------------------------------------------------------


def blobs(seed: int, start: int, rows: int, centers: np.ndarray, spread: float) -> np.ndarray:
    """Rows start..start+rows-1 of the blobs data set (float32, one column per center column)."""
    k, d = centers.shape
    ids = np.arange(start, start + rows) % k
    return (centers[ids] + spread * noise(seed, start, rows, d, 0, d)).astype(np.float32)


def regression(seed: int, start: int, rows: int, coef: np.ndarray, noise_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the linear regression data set: (x float32 (rows, d), y float32 (rows,))."""
    d = coef.shape[0]
    raw = noise(seed, start, rows, d + 1, 0, d + 1)
    x = raw[:, :d].astype(np.float32)
    acc = np.zeros(rows)
    # Targets beyond float32 (a huge coef) become inf, as in the numba variant: the kernel then
    # refuses them in one line (check_gram), which NumPy's RuntimeWarning came before
    with np.errstate(over="ignore", invalid="ignore"):
        for j in range(d):  # feature order, as the numba loop sums
            acc = acc + x[:, j].astype(np.float64) * coef[j]
        return x, (acc + noise_scale * raw[:, d]).astype(np.float32)


def teacher(seed: int, start: int, rows: int, weights: np.ndarray, noise_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the teacher classification data set: (x float32 (rows, d), y int64 (rows,))."""
    d, c = weights.shape
    raw = noise(seed, start, rows, d + c, 0, d + c)
    x = raw[:, :d].astype(np.float32)
    logits = np.zeros((rows, c))
    for j in range(d):
        logits = logits + x[:, j, None].astype(np.float64) * weights[None, j, :]
    logits = logits + noise_scale * raw[:, d:]
    return x, logits.argmax(axis=1).astype(np.int64)


# -- the data sets, numba (bit-identical to the above) ------------------------------------


@jit(parallel=True, cache=True)
def blobs_numba(seed: np.uint64, start: int, rows: int, centers: np.ndarray, spread: float) -> np.ndarray:
    k, d = centers.shape
    x = np.empty((rows, d), np.float32)
    for block in prange((rows + _ROW_BLOCK - 1) // _ROW_BLOCK):
        raw = np.empty(d, np.float64)
        for r in range(int(block) * _ROW_BLOCK, min((int(block) + 1) * _ROW_BLOCK, rows)):
            i = start + r
            noise_row(seed, np.uint64(i) * np.uint64(d), raw)
            center = i % k
            for j in range(d):
                x[r, j] = centers[center, j] + spread * raw[j]
    return x


@jit(parallel=True, cache=True)
def regression_numba(
    seed: np.uint64, start: int, rows: int, coef: np.ndarray, noise_scale: float
) -> tuple[np.ndarray, np.ndarray]:
    d = coef.shape[0]
    x = np.empty((rows, d), np.float32)
    y = np.empty(rows, np.float32)
    for block in prange((rows + _ROW_BLOCK - 1) // _ROW_BLOCK):
        raw = np.empty(d + 1, np.float64)
        for r in range(int(block) * _ROW_BLOCK, min((int(block) + 1) * _ROW_BLOCK, rows)):
            noise_row(seed, np.uint64(start + r) * np.uint64(d + 1), raw)
            acc = 0.0
            for j in range(d):
                value = np.float32(raw[j])
                x[r, j] = value
                acc = acc + np.float64(value) * coef[j]
            y[r] = acc + noise_scale * raw[d]
    return x, y


@jit(parallel=True, cache=True)
def teacher_numba(
    seed: np.uint64, start: int, rows: int, weights: np.ndarray, noise_scale: float
) -> tuple[np.ndarray, np.ndarray]:
    d, c = weights.shape
    x = np.empty((rows, d), np.float32)
    y = np.empty(rows, np.int64)
    for block in prange((rows + _ROW_BLOCK - 1) // _ROW_BLOCK):
        raw = np.empty(d + c, np.float64)
        logits = np.empty(c, np.float64)
        for r in range(int(block) * _ROW_BLOCK, min((int(block) + 1) * _ROW_BLOCK, rows)):
            noise_row(seed, np.uint64(start + r) * np.uint64(d + c), raw)
            logits[:] = 0.0
            for j in range(d):
                value = np.float32(raw[j])
                x[r, j] = value
                for q in range(c):
                    logits[q] = logits[q] + np.float64(value) * weights[j, q]
            best = 0
            for q in range(c):
                logits[q] = logits[q] + noise_scale * raw[d + q]
                if logits[q] > logits[best]:
                    best = q
            y[r] = best
    return x, y


# -- validation ---------------------------------------------------------------------------


def check_rows(kernel: str, seed: object, start: object, rows: object, width: int) -> tuple[int, int, int]:
    """(seed, start, rows) as ints, checked: seed a uint64, start >= 0, rows >= 0, counters in range."""
    seed_value = as_count(kernel, "seed", seed, maximum=_MASK64)
    first = as_count(kernel, "start", start)
    count = as_count(kernel, "rows", rows, maximum=1 << 31)
    if (first + count) * width >= MAX_COUNTER:
        raise KernelInputError(f"kernel {kernel!r}: rows up to {first + count} of width {width} exceed the generator")
    return seed_value, first, count


def check_params(kernel: str, arg: str, value: object, ndim: int) -> np.ndarray:
    """A finite float parameter array of `ndim` dims with no empty axis, as writable float64."""
    array = float_array(kernel, arg, value, ndim=ndim)
    if 0 in array.shape:
        raise KernelInputError(f"kernel {kernel!r}: argument {arg!r} has shape {array.shape}; no axis may be empty")
    if is_device_array(array):  # not read, not converted: see ml_checks
        if array.dtype != np.float64:
            raise KernelInputError(
                f"kernel {kernel!r}: argument {arg!r} is a {array.dtype} device array; pass a float64 one "
                "(device arrays are never converted silently: convert it on the device first)"
            )
        return array
    if not np.isfinite(array).all():
        raise KernelInputError(f"kernel {kernel!r}: argument {arg!r} contains NaN or inf")
    if array.dtype == np.float64 and array.flags.writeable:
        return array
    return np.array(array, dtype=np.float64)  # writable: see ml.writable_float64


def check_scale(kernel: str, arg: str, value: object) -> float:
    """A finite real >= 0 (a spread or a noise level)."""
    scale = as_real(kernel, arg, value, finite=True)
    if scale < 0:
        raise KernelInputError(f"kernel {kernel!r}: argument {arg!r} must be >= 0, got {scale}")
    return scale
