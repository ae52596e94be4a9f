"""Decision trees for the random forest kernels: how `ml.tree_fit` grows a tree, twice.

`fit_reference` (NumPy, the oracle: each node's candidate splits scored at once from
cumulative class counts) and `fit_numba` (one loop per node) implement the same algorithm
and grow the same tree, node for node; `predict_reference` and `predict_numba` walk it. The
kernels in `ml` validate their arguments and call these.

Why the two agree exactly: split scores are ratios of integers (the Gini criterion from
class counts, see below) computed with the same two roundings, candidate thresholds are only
placed between distinct values (so how tied values are ordered cannot matter, and numba's
unstable argsort is as good as NumPy's stable one), ties between scores go to the first
candidate, and every random draw comes from the counter-based SplitMix64 stream of the seed.

The score. A split of m rows into n_l left and n_r right with class counts l_c and r_c has
weighted Gini impurity ``m - sum(l_c^2)/n_l - sum(r_c^2)/n_r``; minimising it maximises
``(A n_r + B n_l) / (n_l n_r)`` with ``A = sum(l_c^2)`` and ``B = sum(r_c^2)``, exact int64
products (rows are capped at 2**20, so they stay below 2**63) and one float64 division.
"""

from __future__ import annotations

import numpy as np

from .ml_data import GOLDEN, mix64, splitmix64
from .registry import jit, prange

__all__ = ["Tree", "fit_numba", "fit_reference", "predict_numba", "predict_reference", "tree_capacity"]

Tree = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""A fitted tree as plain arrays: (feature int32, threshold float64, left int32, right int32,
value float64), one entry per node, root first. A leaf has feature, left and right -1 and
threshold 0; an internal node sends a row left when ``x[feature] <= threshold``, and its
children have larger ids than itself. `value` is the predicted class (leaves; internal nodes
hold their majority class too)."""


def midpoint(low: float, high: float) -> float:
    """A threshold in [low, high): the midpoint, or `low` where rounding reaches `high`."""
    mid = 0.5 * low + 0.5 * high
    return mid if low <= mid < high else low


def tree_capacity(n: int, max_depth: int) -> int:
    """Nodes a tree of n bootstrap rows and at most `max_depth` levels can have."""
    return min(2 * n - 1, (1 << (max_depth + 1)) - 1) if max_depth < 62 else 2 * n - 1


def fit_reference(x: np.ndarray, y: np.ndarray, seed: int, max_depth: int, n_features_per_split: int) -> Tree:
    """The tree `ml.tree_fit` documents, grown with NumPy (checked arguments)."""
    n, d = x.shape
    xs = x.astype(np.float64, copy=False)
    rows = (np.asarray(splitmix64(np.arange(1, n + 1), seed)) % np.uint64(n)).astype(np.int64)
    draws = n
    cap = tree_capacity(n, max_depth)
    feature = np.full(cap, -1, np.int32)
    threshold = np.zeros(cap)
    left = np.full(cap, -1, np.int32)
    right = np.full(cap, -1, np.int32)
    value = np.zeros(cap)
    n_classes = int(y.max()) + 1
    count = 1
    stack: list[tuple[int, np.ndarray, int]] = [(0, rows, 0)]
    while stack:
        node, members, depth = stack.pop()
        labels = y[members]
        class_counts = np.bincount(labels, minlength=n_classes)
        majority = int(class_counts.argmax())
        value[node] = majority
        m = members.shape[0]
        if depth >= max_depth or m < 2 or class_counts[majority] == m:
            continue
        perm = list(range(d))
        for t in range(n_features_per_split):
            draws += 1
            r = t + int(splitmix64(draws, seed)) % (d - t)
            perm[t], perm[r] = perm[r], perm[t]
        best_score, best_feature, best_threshold = -1.0, -1, 0.0
        n_left = np.arange(1, m)
        n_right = m - n_left
        for f in perm[:n_features_per_split]:
            values = xs[members, f]
            order = np.argsort(values, kind="stable")
            ordered = values[order]
            onehot = np.zeros((m, n_classes), np.int64)
            onehot[np.arange(m), labels[order]] = 1
            left_counts = np.cumsum(onehot, axis=0)[:-1]
            right_counts = class_counts - left_counts
            a = (left_counts * left_counts).sum(axis=1)
            b = (right_counts * right_counts).sum(axis=1)
            score = (a * n_right + b * n_left).astype(np.float64) / (n_left * n_right).astype(np.float64)
            valid = ordered[:-1] < ordered[1:]
            if not valid.any():
                continue
            score[~valid] = -np.inf
            s = int(score.argmax())
            if score[s] > best_score:
                best_score, best_feature = float(score[s]), f
                best_threshold = midpoint(float(ordered[s]), float(ordered[s + 1]))
        if best_feature < 0:
            continue
        goes_left = xs[members, best_feature] <= best_threshold
        feature[node], threshold[node] = best_feature, best_threshold
        left[node], right[node] = count, count + 1
        stack.append((count + 1, members[~goes_left], depth + 1))
        stack.append((count, members[goes_left], depth + 1))
        count += 2
    return feature[:count], threshold[:count], left[:count], right[:count], value[:count]


@jit(cache=True)
def grow_tree(
    x: np.ndarray, y: np.ndarray, n_classes: int, seed: np.uint64, max_depth: int, mtry: int, cap: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    n, d = x.shape
    feature = np.full(cap, -1, np.int32)
    threshold = np.zeros(cap, np.float64)
    left = np.full(cap, -1, np.int32)
    right = np.full(cap, -1, np.int32)
    value = np.zeros(cap, np.float64)
    state = seed
    rows = np.empty(n, np.int64)
    un = np.uint64(n)
    for i in range(n):
        state += GOLDEN
        rows[i] = np.int64(mix64(state) % un)
    stack = np.empty((cap, 4), np.int64)  # node, first, stop (into rows), depth
    stack[0, 0], stack[0, 1], stack[0, 2], stack[0, 3] = 0, 0, n, 0
    top = 1
    count = 1
    class_counts = np.zeros(n_classes, np.int64)
    left_counts = np.zeros(n_classes, np.int64)
    right_counts = np.zeros(n_classes, np.int64)
    perm = np.empty(d, np.int64)
    values = np.empty(n, np.float64)
    scratch = np.empty(n, np.int64)
    while top > 0:
        top -= 1
        node, lo, hi, depth = stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3]
        m = hi - lo
        class_counts[:] = 0
        for t in range(lo, hi):
            class_counts[y[rows[t]]] += 1
        majority = 0
        for c in range(1, n_classes):
            if class_counts[c] > class_counts[majority]:
                majority = c
        value[node] = majority
        if depth >= max_depth or m < 2 or class_counts[majority] == m:
            continue
        for j in range(d):
            perm[j] = j
        for t in range(mtry):
            state += GOLDEN
            r = t + np.int64(mix64(state) % np.uint64(d - t))
            perm[t], perm[r] = perm[r], perm[t]
        best_score = -1.0
        best_feature = -1
        best_threshold = 0.0
        for t in range(mtry):
            f = perm[t]
            for s in range(m):
                values[s] = x[rows[lo + s], f]
            order = np.argsort(values[:m])  # quicksort: ties may come in any order (see tree_fit)
            left_counts[:] = 0
            a = 0
            b = 0
            for c in range(n_classes):
                right_counts[c] = class_counts[c]
                b += class_counts[c] * class_counts[c]
            for s in range(m - 1):
                o = order[s]
                c = y[rows[lo + o]]
                a += 2 * left_counts[c] + 1
                left_counts[c] += 1
                b -= 2 * right_counts[c] - 1
                right_counts[c] -= 1
                low = values[o]
                high = values[order[s + 1]]
                if low < high:
                    n_left = s + 1
                    n_right = m - n_left
                    score = np.float64(a * n_right + b * n_left) / np.float64(n_left * n_right)
                    if score > best_score:
                        best_score = score
                        best_feature = f
                        mid = 0.5 * low + 0.5 * high
                        best_threshold = mid if low <= mid and mid < high else low
        if best_feature < 0:
            continue
        n_left = 0
        for t in range(lo, hi):
            if x[rows[t], best_feature] <= best_threshold:
                scratch[n_left] = rows[t]
                n_left += 1
        k = n_left
        for t in range(lo, hi):
            if not x[rows[t], best_feature] <= best_threshold:
                scratch[k] = rows[t]
                k += 1
        rows[lo:hi] = scratch[:m]
        feature[node] = best_feature
        threshold[node] = best_threshold
        left[node] = count
        right[node] = count + 1
        stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3] = count + 1, lo + n_left, hi, depth + 1
        stack[top + 1, 0], stack[top + 1, 1], stack[top + 1, 2], stack[top + 1, 3] = count, lo, lo + n_left, depth + 1
        top += 2
        count += 2
    return (
        feature[:count].copy(),
        threshold[:count].copy(),
        left[:count].copy(),
        right[:count].copy(),
        value[:count].copy(),
    )


def fit_numba(x: np.ndarray, y: np.ndarray, seed: int, max_depth: int, n_features_per_split: int) -> Tree:
    """The same tree as `fit_reference`, grown by numba (checked arguments)."""
    n = x.shape[0]
    n_classes = int(y.max()) + 1
    # Widened here (an exact copy, cheap next to growing the tree) so numba compiles one
    # signature of this large function, not one per dtype: seconds saved on a cold cache.
    xs = x if x.dtype == np.float64 and x.flags.writeable else np.array(x, np.float64)
    return grow_tree(xs, y, n_classes, np.uint64(seed), max_depth, n_features_per_split, tree_capacity(n, max_depth))


def predict_reference(
    feature: np.ndarray, threshold: np.ndarray, left: np.ndarray, right: np.ndarray, value: np.ndarray, x: np.ndarray
) -> np.ndarray:
    """The `value` of the leaf each row of `x` reaches, all rows stepping down together."""
    xs = x.astype(np.float64, copy=False)
    node = np.zeros(xs.shape[0], np.int64)
    rows = np.arange(xs.shape[0])
    inner = feature[node] >= 0
    while inner.any():
        at, where = node[inner], rows[inner]
        goes_left = xs[where, feature[at]] <= threshold[at]
        node[inner] = np.where(goes_left, left[at], right[at])
        inner = feature[node] >= 0
    return value[node].astype(np.float64)


@jit(parallel=True, cache=True)
def predict_numba(
    feature: np.ndarray, threshold: np.ndarray, left: np.ndarray, right: np.ndarray, value: np.ndarray, x: np.ndarray
) -> np.ndarray:
    n = x.shape[0]
    out = np.empty(n, np.float64)
    for i in prange(n):
        node = 0
        while feature[node] >= 0:
            node = left[node] if x[i, feature[node]] <= threshold[node] else right[node]
        out[i] = value[node]
    return out
