"""The numba CPU variants of `ml`'s K-means, linear regression and MLP kernels.

`ml` defines each kernel (its NumPy reference, input check and the variants it attaches);
the loops that make the CPU variants fast are long and tuned for the cache, so they live
here, the way the tree kernels' loops live in `ml_trees` and the CUDA ones in `cuda_ml`.
`kmeans_partial_numba`, `linreg_partial_numba` and `mlp_grad_numba` take the arguments the
kernels' validators return and give what the references give: in every bit for K-means,
within rounding for the other two (see `ml`'s docstring for why each accumulates as it does).

The helpers are module-level `jit` functions, compiled on first use (see `lazyjit.LazyJit`).
"""

from __future__ import annotations

import numpy as np

from .ml_checks import writable_float64
from .registry import jit, prange

__all__ = ["kmeans_partial_numba", "linreg_partial_numba", "mlp_grad_numba"]

_KMEANS_BLOCK = 256  # rows per parallel work item in kmeans_partial's CPU variant
_GRAM_TILE = 4  # X^T X register tile: 4 x 4 dot products at a time (8 loads feed 16 multiply-adds)
_GRAM_PANEL = 512  # columns of [x | y]^T per pass: a tile's 8 rows (32 KiB) stay in L1
_MLP_MAX_BLOCKS = 64  # gradient partials per call: fixed by n, never by the thread count
_MLP_MIN_BLOCK = 128

# -- K-means ------------------------------------------------------------------------------


@jit(parallel=True, cache=True)
def _kmeans_assign(x: np.ndarray, centroids_t: np.ndarray, labels: np.ndarray, best: np.ndarray) -> None:
    n, d = x.shape
    k = centroids_t.shape[1]
    blocks = (n + _KMEANS_BLOCK - 1) // _KMEANS_BLOCK
    for block in prange(blocks):
        dist = np.empty(k, np.float64)
        for i in range(block * _KMEANS_BLOCK, min((block + 1) * _KMEANS_BLOCK, n)):
            dist[:] = 0.0
            for j in range(d):
                xij = np.float64(x[i, j])
                for c in range(k):  # independent lanes: vectorises without reassociating
                    diff = xij - centroids_t[j, c]
                    dist[c] += diff * diff
            nearest = 0
            for c in range(1, k):
                if dist[c] < dist[nearest]:
                    nearest = c
            labels[i] = nearest
            best[i] = dist[nearest]


@jit(cache=True)
def _kmeans_accumulate(
    x: np.ndarray, labels: np.ndarray, best: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, float]:
    n, d = x.shape
    sums = np.zeros((k, d), np.float64)
    counts = np.zeros(k, np.int64)
    inertia = 0.0
    for i in range(n):
        c = labels[i]
        counts[c] += 1
        inertia += best[i]
        for j in range(d):
            sums[c, j] += x[i, j]
    return sums, counts, inertia


def kmeans_partial_numba(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """`ml.kmeans_partial` on the CPU: rows assigned in parallel, then summed in row order."""
    n = x.shape[0]
    labels = np.empty(n, np.int64)
    best = np.empty(n, np.float64)
    _kmeans_assign(x, np.ascontiguousarray(centroids.T), labels, best)
    sums, counts, inertia = _kmeans_accumulate(x, labels, best, centroids.shape[0])
    return sums, counts, float(inertia)


# -- linear regression --------------------------------------------------------------------


@jit(cache=True)
def _augmented_transpose(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[x | y]^T as float64, rows padded with zeros to a multiple of the tile width."""
    n, d = x.shape
    rows = -(-(d + 1) // _GRAM_TILE) * _GRAM_TILE
    xt = np.zeros((rows, n), np.float64)
    for i0 in range(0, n, 64):  # 64 rows of x stay in cache while their columns are written out
        i1 = min(i0 + 64, n)
        for j in range(d):
            for i in range(i0, i1):
                xt[j, i] = x[i, j]
        for i in range(i0, i1):
            xt[d, i] = y[i]
    return xt


@jit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
def _gram_upper(xt: np.ndarray) -> np.ndarray:
    # The upper triangle of xt @ xt.T in register tiles of 4 x 4 dot products, panel by
    # panel of columns (a panel of every row stays in L2 while all tiles use it). Row tiles are paired
    # (u with T-1-u) so that every parallel item does about the same work. Each element's
    # sum is split the same way whatever the thread count: reproducible, though not in
    # NumPy's order (reassoc lets the dots vectorise).
    m, n = xt.shape
    gram = np.zeros((m, m), np.float64)
    tiles = m // _GRAM_TILE
    for p0 in range(0, n, _GRAM_PANEL):  # a panel of every row of xt stays in L2 for all tiles
        p1 = min(p0 + _GRAM_PANEL, n)
        for item in prange((tiles + 1) // 2):
            pair = np.int64(item)  # prange's index may be unsigned: int64 - uint64 is float64
            for which in range(2):
                tile = pair if which == 0 else tiles - 1 - pair
                if which == 1 and tile == pair:
                    continue
                row = tile * _GRAM_TILE
                for b in range(row, m, _GRAM_TILE):
                    s00, s01, s02, s03 = 0.0, 0.0, 0.0, 0.0
                    s10, s11, s12, s13 = 0.0, 0.0, 0.0, 0.0
                    s20, s21, s22, s23 = 0.0, 0.0, 0.0, 0.0
                    s30, s31, s32, s33 = 0.0, 0.0, 0.0, 0.0
                    for i in range(p0, p1):
                        x0, x1, x2, x3 = xt[row, i], xt[row + 1, i], xt[row + 2, i], xt[row + 3, i]
                        y0, y1, y2, y3 = xt[b, i], xt[b + 1, i], xt[b + 2, i], xt[b + 3, i]
                        s00 += x0 * y0
                        s01 += x0 * y1
                        s02 += x0 * y2
                        s03 += x0 * y3
                        s10 += x1 * y0
                        s11 += x1 * y1
                        s12 += x1 * y2
                        s13 += x1 * y3
                        s20 += x2 * y0
                        s21 += x2 * y1
                        s22 += x2 * y2
                        s23 += x2 * y3
                        s30 += x3 * y0
                        s31 += x3 * y1
                        s32 += x3 * y2
                        s33 += x3 * y3
                    gram[row, b : b + 4] += np.array((s00, s01, s02, s03))
                    gram[row + 1, b : b + 4] += np.array((s10, s11, s12, s13))
                    gram[row + 2, b : b + 4] += np.array((s20, s21, s22, s23))
                    gram[row + 3, b : b + 4] += np.array((s30, s31, s32, s33))
    return gram


def linreg_partial_numba(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`ml.linreg_partial` on the CPU: the upper triangle of [x | y]^T [x | y], mirrored."""
    d = x.shape[1]
    upper = _gram_upper(_augmented_transpose(x, y))[: d + 1, : d + 1]
    full = np.triu(upper) + np.triu(upper, 1).T
    return np.ascontiguousarray(full[:d, :d]), np.ascontiguousarray(full[:d, d])


# -- multilayer perceptron ----------------------------------------------------------------


@jit(parallel=True, cache=True)
def _mlp_blocks(
    w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray, x: np.ndarray, y: np.ndarray, block: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    n, d = x.shape
    h = w1.shape[1]
    c = w2.shape[1]
    blocks = (n + block - 1) // block
    loss = np.zeros(blocks, np.float64)
    gw1 = np.zeros((blocks, d, h), np.float64)
    gb1 = np.zeros((blocks, h), np.float64)
    gw2 = np.zeros((blocks, h, c), np.float64)
    gb2 = np.zeros((blocks, c), np.float64)
    for k in prange(blocks):
        hidden = np.empty(h, np.float64)
        dhidden = np.empty(h, np.float64)
        out = np.empty(c, np.float64)
        for i in range(k * block, min((k + 1) * block, n)):
            hidden[:] = b1
            for j in range(d):
                xij = np.float64(x[i, j])
                for u in range(h):
                    hidden[u] += xij * w1[j, u]
            for u in range(h):
                hidden[u] = np.tanh(hidden[u])
            out[:] = b2
            for u in range(h):
                hu = hidden[u]
                for q in range(c):
                    out[q] += hu * w2[u, q]
            top = out[0]
            for q in range(1, c):
                top = max(top, out[q])
            label = y[i]
            picked = out[label]
            total = 0.0
            for q in range(c):
                out[q] = np.exp(out[q] - top)
                total += out[q]
            loss[k] += np.log(total) + top - picked
            for q in range(c):
                out[q] /= total
            out[label] -= 1.0
            for q in range(c):
                gb2[k, q] += out[q]
            for u in range(h):
                hu = hidden[u]
                back = 0.0
                for q in range(c):
                    gw2[k, u, q] += hu * out[q]
                    back += w2[u, q] * out[q]
                dhidden[u] = back * (1.0 - hu * hu)
                gb1[k, u] += dhidden[u]
            for j in range(d):
                xij = np.float64(x[i, j])
                for u in range(h):
                    gw1[k, j, u] += xij * dhidden[u]
    return loss, gw1, gb1, gw2, gb2


@jit(cache=True)
def _sum_blocks(parts: np.ndarray) -> np.ndarray:
    total = parts[0].copy()
    for k in range(1, parts.shape[0]):
        total += parts[k]
    return total


def mlp_grad_numba(
    w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray, x: np.ndarray, y: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`ml.mlp_grad` on the CPU: partial sums over fixed blocks of rows, added in block order."""
    n = x.shape[0]
    if n == 0:
        return 0.0, np.zeros_like(w1), np.zeros_like(b1), np.zeros_like(w2), np.zeros_like(b2)
    # Blocks depend on n only, never on the thread count, so the result is reproducible.
    block = max(_MLP_MIN_BLOCK, -(-n // _MLP_MAX_BLOCKS))
    xs = writable_float64(x)  # one compiled signature (see writable_float64); exact
    loss, gw1, gb1, gw2, gb2 = _mlp_blocks(w1, b1, w2, b2, xs, y, block)
    return (
        float(_sum_blocks(loss.reshape(-1, 1))[0]),
        _sum_blocks(gw1),
        _sum_blocks(gb1),
        _sum_blocks(gw2),
        _sum_blocks(gb2),
    )
