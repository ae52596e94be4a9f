"""Streaming reductions: dot product and histogram (NumPy reference, numba CPU, numba-cuda GPU).

Both read their input once and are bound by memory bandwidth, like `basic`'s vadd and sum.
Arrays are 1-D, C-contiguous float32 or float64 (see `registry.float_array`); the GPU
variants take host or device arrays and launch the kernels of `cuda_stream` (see
`cuda_support` for where their results go).
"""

from __future__ import annotations

import numpy as np

from . import cuda_stream
from .basic import PARALLEL_MIN_SIZE
from .cuda_support import GPU_MIN_ELEMENTS, finish, gpu_errors, on_device
from .registry import (
    KernelInputError,
    as_count,
    as_real,
    float_array,
    float_vectors,
    is_device_array,
    jit,
    kernel,
    prange,
)

# -- dot ----------------------------------------------------------------------------------


@kernel(
    "dot",
    description="Dot product of two equal-length 1-D float arrays, in float64, as a Python float.",
    pure=True,
    gpu_min_elements=GPU_MIN_ELEMENTS["dot"],
)
def dot(x: np.ndarray, y: np.ndarray) -> float:
    """sum(x * y) as a Python float; products and sums in float64 for float32 input too.

    As for `sum`, backends differ only in the order of additions (each product of two float32
    values is exact in float64), so they agree within the recursive-summation bound
    ``2 * n * 2**-53 * sum(|x * y|)``. The CPU result is deterministic for a given number of
    numba threads, the GPU result for a given GPU model. NaN and inf propagate.
    """
    return float(np.dot(x.astype(np.float64, copy=False), y.astype(np.float64, copy=False)))


@dot.validator
def _check_dot(x: object, y: object) -> tuple[np.ndarray, ...]:
    return float_vectors("dot", x=x, y=y)


@jit(parallel=True, cache=True, fastmath={"reassoc"})
def _dot_loop(x: np.ndarray, y: np.ndarray) -> float:
    n = x.size
    total = 0.0
    if n < PARALLEL_MIN_SIZE:
        for i in range(n):
            total += np.float64(x[i]) * np.float64(y[i])
    else:
        for i in prange(n):
            total += np.float64(x[i]) * np.float64(y[i])
    return total


@dot.cpu
def _dot_cpu(x: np.ndarray, y: np.ndarray) -> float:
    return float(_dot_loop(x, y))


@dot.gpu
def _dot_gpu(x: np.ndarray, y: np.ndarray) -> float:
    with gpu_errors("dot") as cuda:
        if is_device_array(x) and is_device_array(y):
            return cuda_stream.reduction_device("dot", (x, y))
        if not (is_device_array(x) or is_device_array(y)):
            staged = cuda_stream.reduction_staged("dot", (x, y))
            if staged is not None:
                return staged
        total = cuda_stream.dot_device(on_device(cuda, x), on_device(cuda, y)).copy_to_host()
    return float(total[0])


# -- histogram ----------------------------------------------------------------------------

HIST_MAX_BINS = 1 << 24
"""More bins than this is almost surely a mistake (the counts alone would take 128 MiB)."""

_HIST_CHUNK = 1 << 16  # elements per parallel work item of the CPU variant
_HIST_MAX_CELLS = 1 << 22  # bound on the CPU variant's per-chunk counts: 32 MiB of int64
_HIST_MAX_CHUNKS = 64


@kernel(
    "histogram",
    description="Counts of a 1-D float array in `bins` equal bins over [lo, hi], as np.histogram.",
    pure=True,
    gpu_min_elements=GPU_MIN_ELEMENTS["histogram"],
)
def histogram(x: np.ndarray, bins: int, lo: float, hi: float) -> np.ndarray:
    """``np.histogram(x, bins, range=(lo, hi))[0]``: int64 counts, with lo and hi in x's dtype.

    Bins are half-open ``[e_i, e_i+1)`` except the last, which includes hi; values outside
    [lo, hi], NaN and inf are not counted. lo and hi are converted to x's dtype first (as
    saxpy's alpha is), so every backend computes bin indices with NumPy's exact arithmetic:
    ``((v - lo) / (hi - lo)) * bins`` in that dtype, then corrected by one against the
    ``np.linspace(lo, hi, bins + 1)`` edges. All backends give identical counts.
    """
    return np.histogram(x, bins, range=(lo, hi))[0]


@histogram.validator
def _check_histogram(x: object, bins: object, lo: object, hi: object) -> tuple[object, ...]:
    xs = float_array("histogram", "x", x)
    count = as_count("histogram", "bins", bins, minimum=1, maximum=HIST_MAX_BINS)
    dtype = xs.dtype.type
    with np.errstate(over="ignore"):  # 1e39 becomes inf in float32: reported just below
        low = dtype(as_real("histogram", "lo", lo, finite=True))
        high = dtype(as_real("histogram", "hi", hi, finite=True))
    if not (np.isfinite(low) and np.isfinite(high)):
        raise KernelInputError(f"kernel 'histogram': arguments 'lo', 'hi' overflow {xs.dtype}; pass a smaller range")
    if not low < high:
        raise KernelInputError(
            f"kernel 'histogram': argument 'hi' must be greater than 'lo' in x's dtype {xs.dtype} "
            f"(got lo={low!r}, hi={high!r}); pass a wider range"
        )
    return (xs, count, low, high)


def _edges(x: np.ndarray, bins: int, lo: np.floating, hi: np.floating) -> np.ndarray:
    """The bin edges np.histogram corrects its indices against (in x's dtype)."""
    return np.linspace(lo, hi, bins + 1, endpoint=True, dtype=x.dtype)


@jit(cache=True)
def _bin_index(v: float, lo: float, span: float, bins_real: float, edges: np.ndarray) -> int:
    bins = edges.size - 1
    b = int(((v - lo) / span) * bins_real)
    if b >= bins:
        b = bins - 1
    if v < edges[b]:
        b -= 1
    elif b != bins - 1 and v >= edges[b + 1]:
        b += 1
    return b


@jit(parallel=True, cache=True)
def _histogram_loop(
    x: np.ndarray, lo: float, hi: float, span: float, bins_real: float, edges: np.ndarray, chunks: int
) -> np.ndarray:
    """Counts per chunk of x (in parallel), then added up: integer sums, so exact."""
    n = x.size
    bins = edges.size - 1
    per_chunk = np.zeros((chunks, bins), np.int64)
    for c in prange(chunks):
        for i in range(c * n // chunks, (c + 1) * n // chunks):
            v = x[i]
            if v >= lo and v <= hi:
                per_chunk[c, _bin_index(v, lo, span, bins_real, edges)] += 1
    counts = np.zeros(bins, np.int64)
    for c in range(chunks):
        for b in range(bins):
            counts[b] += per_chunk[c, b]
    return counts


@histogram.cpu
def _histogram_cpu(x: np.ndarray, bins: int, lo: np.floating, hi: np.floating) -> np.ndarray:
    chunks = max(1, min(_HIST_MAX_CHUNKS, x.size // _HIST_CHUNK, _HIST_MAX_CELLS // bins))
    dtype = x.dtype.type
    return _histogram_loop(x, lo, hi, hi - lo, dtype(bins), _edges(x, bins, lo, hi), chunks)


@histogram.gpu
def _histogram_gpu(x: np.ndarray, bins: int, lo: np.floating, hi: np.floating) -> np.ndarray:
    with gpu_errors("histogram") as cuda:
        counts = cuda.to_device(np.zeros(bins, np.int64))
        edges = cuda.to_device(_edges(x, bins, lo, hi))
        cuda_stream.histogram_device(on_device(cuda, x), lo, hi, edges, counts)
        return finish(counts)
