"""numba-cuda kernels behind the GPU variants of `ml` (K-means assignment, X^T X).

K-means: the issue-16 profile of the first kernel (one thread per row, a global atomic per row
and feature into k x d sums) was contention: 2M x 16 rows, k = 64, took ~200 ms an iteration
on an H200. `_kmeans_rows_py` keeps the centroids and each block's sums in shared memory and a
thread's row in registers, and adds to the global sums once per block: the work is then the
float64 distances themselves (2M x 64 x 16 subtractions and FMAs, ~0.2-0.3 ms of the card's
float64 rate). Distances are float64 because the reference's are: float32 ones would move
rows across near ties and change the counts.

Nothing here imports numba at module import (see `cuda_support`): as in `cuda_stream`, the
kernels are module-level Python functions naming a ``cuda`` global that `_kernels()` binds
(through `cuda_support.jit_kernels`) just before the first launch compiles them. The launchers
take host or device arrays and return device arrays; `ml`'s GPU variants call them inside
`cuda_support.gpu_errors`, which turns CUDA failures into a one-line error naming the kernel.

Under the simulator (``NUMBA_ENABLE_CUDASIM=1``) every CUDA thread is a Python thread, so the
launchers use one-warp blocks there; the kernels are the same code.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace
from typing import Any

import numpy as np

from . import cuda_support
from .cuda_device import block_sum_py
from .cuda_support import device_view, jit_kernels, on_device
from .registry import is_device_array

cuda: Any = None  # numba.cuda, bound by _kernels() before the kernels compile
block_sum: Any = None  # the force-inlined device version (cuda_device.py), bound by _kernels()
__all__ = ["gram", "kmeans_assign"]

KMEANS_THREADS = 256
KMEANS_SHARED_CELLS = 2048
"""k x d up to this many cells: the centroids and the block's sums both fit shared memory
(2 x 16 KiB of float64), which the fast K-means kernel needs; larger k x d take the plain one."""
KMEANS_MAX_K = 1024
KMEANS_ROW_CAPS = (16, 32)
"""The fast kernel holds a thread's row in a local array of 16 or 32 float64 (registers, with
the loops over it unrolled); rows of more features take the plain kernel."""
KMEANS_BLOCKS_PER_SM = {16: 3, 32: 1}
"""Blocks of the fast kernels per SM, by row cap. Their launch bounds make exactly this many
resident (16-feature rows fit 85 registers a thread; 32-feature ones need about 138, so one
256-thread block), and the grid is one such wave: each block walks its rows with a grid
stride, so a second, partial wave would double the time of the rows it holds. Each block
also adds its shared sums to the global ones once: fewer blocks, fewer global atomics."""
GRAM_TILE = 16
"""X^T X is computed in 16 x 16 tiles, one thread per element of a tile."""
GRAM_TARGET_BLOCKS = 1024
"""Row splits are chosen so that about this many blocks run (several per SM on an H100/H200)."""


def _threads(wanted: int) -> int:
    return cuda_support.SIM_THREADS if cuda_support.simulated() else wanted


def _kmeans_assign_py(x: Any, centroids: Any, sums: Any, counts: Any, inertia: Any) -> None:
    # One thread per row: nearest centroid (lowest index on ties), then atomics into the
    # cluster's sums and count. The block first adds its rows' distances in shared memory, so
    # inertia takes one atomic per block rather than one per row.
    partial = cuda.shared.array(KMEANS_THREADS, np.float64)
    i = cuda.grid(1)
    t = cuda.threadIdx.x
    nearest_dist = 0.0
    if i < x.shape[0]:
        d = x.shape[1]
        nearest = 0
        for c in range(centroids.shape[0]):
            dist = 0.0
            for j in range(d):
                diff = x[i, j] - centroids[c, j]
                dist += diff * diff
            if c == 0 or dist < nearest_dist:
                nearest = c
                nearest_dist = dist
        for j in range(d):
            cuda.atomic.add(sums, (nearest, j), x[i, j] + 0.0)
        cuda.atomic.add(counts, nearest, 1)
    total = block_sum(partial, nearest_dist)
    if t == 0:
        cuda.atomic.add(inertia, 0, total)


def _kmeans_rows_py(x: Any, centroids: Any, sums: Any, counts: Any, inertia: Any, row: Any) -> None:
    """The fast K-means step, for rows of at most row.size features and k x d that fit shared memory.

    The block copies the centroids (float64) into shared memory and keeps its own sums and
    counts there. Each thread walks its rows with a grid stride: the row goes into `row`
    (widened to float64, as the reference widens it), distances to every centroid are summed
    over features in order from shared memory (ties go to the lowest centroid, as argmin's),
    and the row is added to the block's sums with shared-memory atomics. At the end each
    block adds its sums, counts and inertia to the global ones: one global atomic per cell per
    block instead of one per row and feature, which is what made the plain kernel contend.
    """
    cent = cuda.shared.array(KMEANS_SHARED_CELLS, np.float64)
    block_sums = cuda.shared.array(KMEANS_SHARED_CELLS, np.float64)
    block_counts = cuda.shared.array(KMEANS_MAX_K, np.int32)
    partial = cuda.shared.array(KMEANS_THREADS, np.float64)
    t = cuda.threadIdx.x
    n = x.shape[0]
    d = x.shape[1]
    k = centroids.shape[0]
    cells = k * d
    for cell in range(t, cells, cuda.blockDim.x):
        cent[cell] = centroids[cell // d, cell % d]
        block_sums[cell] = 0.0
    for c in range(t, k, cuda.blockDim.x):
        block_counts[c] = 0
    cuda.syncthreads()
    acc = np.float64(0.0)
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < n:
        for j in range(row.size):
            if j < d:
                row[j] = x[i, j]
        nearest = 0
        nearest_dist = np.float64(0.0)
        for c in range(k):
            base = c * d
            dist = np.float64(0.0)
            for j in range(row.size):
                if j < d:
                    diff = row[j] - cent[base + j]
                    dist += diff * diff
            if c == 0 or dist < nearest_dist:
                nearest = c
                nearest_dist = dist
        base = nearest * d
        for j in range(row.size):
            if j < d:
                cuda.atomic.add(block_sums, base + j, row[j])
        cuda.atomic.add(block_counts, nearest, 1)
        acc += nearest_dist
        i += stride
    total = block_sum(partial, acc)  # its last barrier also orders the block's atomics above
    for cell in range(t, cells, cuda.blockDim.x):
        if block_sums[cell] != 0.0:
            cuda.atomic.add(sums, (cell // d, cell % d), block_sums[cell])
    for c in range(t, k, cuda.blockDim.x):
        if block_counts[c] != 0:
            cuda.atomic.add(counts, c, np.int64(block_counts[c]))
    if t == 0:
        cuda.atomic.add(inertia, 0, total)


kmeans_rows: Any = None  # the force-inlined device version, bound by _kernels()


def _kmeans_shared16_py(x: Any, centroids: Any, sums: Any, counts: Any, inertia: Any) -> None:
    kmeans_rows(x, centroids, sums, counts, inertia, cuda.local.array(16, np.float64))


def _kmeans_shared32_py(x: Any, centroids: Any, sums: Any, counts: Any, inertia: Any) -> None:
    kmeans_rows(x, centroids, sums, counts, inertia, cuda.local.array(32, np.float64))


def _gram_py(x: Any, y: Any, rows_per_split: int, partial: Any) -> None:
    # Block (bx, by, bz): tile (bx, by) of [X | y]^T [X | y] summed over the rows of split bz.
    # Column d of the augmented matrix is y, so its last column holds X^T y. Tiles below the
    # diagonal return at once (the host mirrors the upper triangle); each thread sums its
    # element in row order.
    bx, by, bz = cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z
    if by < bx:
        return
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    n, d = x.shape
    left = cuda.shared.array((GRAM_TILE, GRAM_TILE), np.float64)  # left[r, i]: column bx * tile + i
    top = cuda.shared.array((GRAM_TILE, GRAM_TILE), np.float64)  # top[r, i]: column by * tile + i
    acc = 0.0
    first = bz * rows_per_split
    stop = min(first + rows_per_split, n)
    col_a = bx * GRAM_TILE + tx
    col_b = by * GRAM_TILE + tx
    for r0 in range(first, stop, GRAM_TILE):
        row = r0 + ty
        value_a = 0.0
        value_b = 0.0
        if row < stop:
            if col_a < d:
                value_a = x[row, col_a]
            elif col_a == d:
                value_a = y[row]
            if col_b < d:
                value_b = x[row, col_b]
            elif col_b == d:
                value_b = y[row]
        left[ty, tx] = value_a
        top[ty, tx] = value_b
        cuda.syncthreads()
        for r in range(GRAM_TILE):
            acc += left[r, ty] * top[r, tx]
        cuda.syncthreads()
    a = bx * GRAM_TILE + ty
    b = by * GRAM_TILE + tx
    if a <= d and b <= d:
        partial[bz, a, b] = acc


def _gram_finish_py(partial: Any, xtx: Any, xty: Any) -> None:
    # One thread per element (a, b) of the augmented (d + 1)^2 Gram matrix: the splits' upper
    # triangles added in split order (the host did the same before), mirrored below the diagonal.
    a, b = cuda.grid(2)
    d = xtx.shape[0]
    if a > d or b > d:
        return
    row, col = (a, b) if a <= b else (b, a)
    total = 0.0
    for split in range(partial.shape[0]):
        total += partial[split, row, col]
    if a < d and b < d:
        xtx[a, b] = total
    elif a < d and b == d:
        xty[a] = total


@functools.cache
def _kernels() -> SimpleNamespace:
    return jit_kernels(
        globals(),
        {
            "kmeans_assign": _kmeans_assign_py,
            "kmeans_shared16": (_kmeans_shared16_py, {"launch_bounds": (KMEANS_THREADS, KMEANS_BLOCKS_PER_SM[16])}),
            "kmeans_shared32": (_kmeans_shared32_py, {"launch_bounds": (KMEANS_THREADS, KMEANS_BLOCKS_PER_SM[32])}),
            "gram": _gram_py,
            "gram_finish": _gram_finish_py,
        },
        {"kmeans_rows": _kmeans_rows_py, "block_sum": block_sum_py},
    )


def kmeans_assign(cuda: Any, x: Any, centroids: Any, *, host_results: bool = False) -> tuple[Any, Any, float]:
    """(sums, counts, inertia) of the rows of `x` against float64 `centroids`, on the GPU.

    `x` and `centroids` are host or device arrays. Sums (k, d) float64 and counts (k,) int64
    are device arrays, or host arrays with `host_results`; inertia is a float (copying it
    back waits for the launch). An iteration's small arrays travel together: host centroids
    and the zeroed sums, counts and inertia go up in one copy, and with `host_results` the
    answers come back in one.
    """
    n, d = x.shape
    k = centroids.shape[0]
    cells = k * d
    device_centroids = is_device_array(centroids)
    start = 0 if device_centroids else cells  # [centroids | sums | counts | inertia], float64 words
    packed = np.zeros(start + cells + k + 1)
    if not device_centroids:
        packed[:cells] = np.asarray(centroids).reshape(-1)
    buffer = cuda.to_device(packed)
    sums = device_view(buffer[start : start + cells].reshape(k, d), buffer)
    counts = device_view(buffer[start + cells : start + cells + k].view(np.int64), buffer)
    inertia = buffer[start + cells + k :]
    if n:
        threads = _threads(KMEANS_THREADS)
        centroids_on_device = centroids if device_centroids else device_view(buffer[:cells].reshape(k, d), buffer)
        args = (on_device(cuda, x), centroids_on_device, sums, counts, inertia)
        cap = next((cap for cap in KMEANS_ROW_CAPS if d <= cap), None)
        if cap is not None and cells <= KMEANS_SHARED_CELLS and k <= KMEANS_MAX_K:
            blocks = min(math.ceil(n / threads), cuda_support.sm_count() * KMEANS_BLOCKS_PER_SM[cap])
            getattr(_kernels(), f"kmeans_shared{cap}")[blocks, threads](*args)
        else:
            _kernels().kmeans_assign[math.ceil(n / threads), threads](*args)
    if not host_results:
        return sums, counts, float(inertia.copy_to_host()[0])
    back = buffer.copy_to_host()[start:]
    return back[:cells].reshape(k, d), back[cells : cells + k].view(np.int64), float(back[cells + k])


def gram(cuda: Any, x: Any, y: Any) -> tuple[Any, Any]:
    """(X^T X, X^T y) in float64 on the GPU: tiles over row splits, then the splits added in order.

    `x` and `y` are host or device arrays; the results are device arrays. The number of
    splits depends on n and d only, and they are added in order, so the result is the same
    on every run (and on every GPU model).
    """
    n, d = x.shape
    tiles = math.ceil((d + 1) / GRAM_TILE)
    tile_blocks = tiles * (tiles + 1) // 2
    splits = max(1, min(math.ceil(n / GRAM_TILE), math.ceil(GRAM_TARGET_BLOCKS / tile_blocks)))
    rows_per_split = max(1, math.ceil(n / splits))
    partial = cuda.to_device(np.zeros((splits, d + 1, d + 1)))
    if n:
        _kernels().gram[(tiles, tiles, splits), (GRAM_TILE, GRAM_TILE)](
            on_device(cuda, x), on_device(cuda, y), rows_per_split, partial
        )
    xtx, xty = cuda.device_array((d, d)), cuda.device_array(d)
    side = math.ceil((d + 1) / GRAM_TILE)
    _kernels().gram_finish[(side, side), (GRAM_TILE, GRAM_TILE)](partial, xtx, xty)
    return xtx, xty
