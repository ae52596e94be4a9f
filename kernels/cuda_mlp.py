"""numba-cuda kernels behind `mlp_grad`'s GPU variant: a 1-hidden-layer tanh MLP's loss and
gradients, summed over a chunk's rows, in float64 as the reference computes them.

Two steps, both written as plain module-level kernels (bound by `_kernels()`, as in `cuda_ml`):

1. `_mlp_rows_py`, one thread per row: the forward pass (``tanh(x @ w1 + b1)``, the logits,
   a softmax shifted by the row's largest logit, as the reference shifts it), the row's
   cross-entropy, and the backward pass down to the hidden layer. It writes the row's hidden
   activations, ``dlogits`` and ``dhidden`` to scratch arrays (n x h, n x c, n x h) and adds
   the block's losses with one atomic. The weights are read by every thread of a warp at the
   same address, which the cache serves as a broadcast.
2. `_crossprod_py`, ``[a | 1]^T b`` over the rows, in 16 x 16 shared-memory tiles over row
   splits (the shape of `cuda_ml`'s X^T X): with a = x, b = dhidden it gives ``dw1`` and, in
   its last row (the column of ones), ``db1``; with a = hidden, b = dlogits, ``dw2`` and ``db2``.
   `_sum_splits_py` then adds the splits in split order, so the gradients do not depend on
   the order blocks ran in (the loss, added with atomics, may differ in its last bits).

The gradients are returned as device arrays (views of one (rows + 1, cols) array each); the
variant in `ml` copies them to the host unless the caller keeps them on the device.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace
from typing import Any

import numpy as np

from . import cuda_support
from .cuda_device import block_sum_py
from .cuda_support import jit_kernels, on_device

cuda: Any = None  # numba.cuda, bound by _kernels() before the kernels compile
block_sum: Any = None  # the force-inlined device version (cuda_device.py), bound by _kernels()
__all__ = ["mlp_grad"]

MLP_THREADS = 128
TILE = 16
TARGET_BLOCKS = 1024
"""Row splits of the cross products are chosen so that about this many blocks run."""


def _mlp_rows_py(
    x: Any, y: Any, w1: Any, b1: Any, w2: Any, b2: Any, hidden: Any, dhidden: Any, dlogits: Any, loss: Any
) -> None:
    partial = cuda.shared.array(MLP_THREADS, np.float64)
    i = cuda.grid(1)
    t = cuda.threadIdx.x
    row_loss = np.float64(0.0)
    if i < x.shape[0]:
        d = x.shape[1]
        h = w1.shape[1]
        c = w2.shape[1]
        for jh in range(h):
            acc = b1[jh]
            for jd in range(d):
                acc += np.float64(x[i, jd]) * w1[jd, jh]
            hidden[i, jh] = math.tanh(acc)
        top = np.float64(0.0)
        for q in range(c):
            acc = b2[q]
            for jh in range(h):
                acc += hidden[i, jh] * w2[jh, q]
            dlogits[i, q] = acc
            if q == 0 or acc > top:
                top = acc
        label = y[i]
        picked = dlogits[i, label]
        total = np.float64(0.0)
        for q in range(c):
            e = math.exp(dlogits[i, q] - top)
            dlogits[i, q] = e
            total += e
        row_loss = math.log(total) + top - picked
        for q in range(c):
            dlogits[i, q] = dlogits[i, q] / total
        dlogits[i, label] -= 1.0
        for jh in range(h):
            acc = np.float64(0.0)
            for q in range(c):
                acc += dlogits[i, q] * w2[jh, q]
            value = hidden[i, jh]
            dhidden[i, jh] = acc * (1.0 - value * value)
    total = block_sum(partial, row_loss)
    if t == 0:
        cuda.atomic.add(loss, 0, total)


def _crossprod_py(a: Any, b: Any, rows_per_split: int, partial: Any) -> None:
    # Block (bx, by, bz): tile (bx, by) of [a | 1]^T b over the rows of split bz. Column
    # a.shape[1] of the augmented a is all ones, so the last row of the result is b's column sums.
    bx, by, bz = cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    n = a.shape[0]
    da = a.shape[1]
    db = b.shape[1]
    left = cuda.shared.array((TILE, TILE), np.float64)  # left[r, i]: column bx * TILE + i of [a | 1]
    top = cuda.shared.array((TILE, TILE), np.float64)  # top[r, i]: column by * TILE + i of b
    acc = np.float64(0.0)
    first = bz * rows_per_split
    stop = min(first + rows_per_split, n)
    col_a = bx * TILE + tx
    col_b = by * TILE + tx
    for r0 in range(first, stop, TILE):
        row = r0 + ty
        value_a = np.float64(0.0)
        value_b = np.float64(0.0)
        if row < stop:
            if col_a < da:
                value_a = a[row, col_a]
            elif col_a == da:
                value_a = np.float64(1.0)
            if col_b < db:
                value_b = b[row, col_b]
        left[ty, tx] = value_a
        top[ty, tx] = value_b
        cuda.syncthreads()
        for r in range(TILE):
            acc += left[r, ty] * top[r, tx]
        cuda.syncthreads()
    p = bx * TILE + ty
    q = by * TILE + tx
    if p <= da and q < db:
        partial[bz, p, q] = acc


def _sum_splits_py(partial: Any, out: Any) -> None:
    p, q = cuda.grid(2)
    if p < out.shape[0] and q < out.shape[1]:
        total = np.float64(0.0)
        for split in range(partial.shape[0]):
            total += partial[split, p, q]
        out[p, q] = total


@functools.cache
def _kernels() -> SimpleNamespace:
    return jit_kernels(
        globals(),
        {"mlp_rows": _mlp_rows_py, "crossprod": _crossprod_py, "sum_splits": _sum_splits_py},
        {"block_sum": block_sum_py},
    )


def _crossprod_ones(numba_cuda: Any, a: Any, b: Any) -> Any:
    """[a | 1]^T b for device arrays a (n, da), b (n, db): a float64 (da + 1, db) device array."""
    n, da = a.shape
    db = b.shape[1]
    tiles_a, tiles_b = math.ceil((da + 1) / TILE), math.ceil(db / TILE)
    splits = max(1, min(math.ceil(n / TILE), math.ceil(TARGET_BLOCKS / (tiles_a * tiles_b))))
    rows_per_split = max(1, math.ceil(n / splits))
    partial = numba_cuda.to_device(np.zeros((splits, da + 1, db)))
    kernels = _kernels()
    if n:
        kernels.crossprod[(tiles_a, tiles_b, splits), (TILE, TILE)](a, b, rows_per_split, partial)
    out = numba_cuda.device_array((da + 1, db))
    kernels.sum_splits[(tiles_a, tiles_b), (TILE, TILE)](partial, out)
    return out


def mlp_grad(numba_cuda: Any, w1: Any, b1: Any, w2: Any, b2: Any, x: Any, y: Any) -> tuple[float, Any, Any, Any, Any]:
    """(loss, dw1, db1, dw2, db2) of the rows `x` with labels `y`; arguments host or device.

    The gradients are float64 device arrays; the loss a float (copying it back waits for the
    launches).
    """
    n, d = x.shape
    h, c = w2.shape
    args = [on_device(numba_cuda, value) for value in (x, y, w1, b1, w2, b2)]
    hidden = numba_cuda.device_array((n, h))
    dhidden = numba_cuda.device_array((n, h))
    dlogits = numba_cuda.device_array((n, c))
    loss = numba_cuda.to_device(np.zeros(1))
    if n:
        threads = cuda_support.SIM_THREADS if cuda_support.simulated() else MLP_THREADS
        _kernels().mlp_rows[math.ceil(n / threads), threads](*args, hidden, dhidden, dlogits, loss)
    first = _crossprod_ones(numba_cuda, args[0], dhidden)
    second = _crossprod_ones(numba_cuda, hidden, dlogits)
    return float(loss.copy_to_host()[0]), first[:d], first[d], second[:h], second[h]
