"""Machine-learning kernels: the per-chunk pieces of the seed's four distributed workloads.

Each kernel does the data-parallel part of one algorithm on one chunk of rows; the job on
the coordinator reduces the chunks' results (see `batuta/jobs/`):

| kernel | one chunk gives | coordinator |
|---|---|---|
| `kmeans_partial(x, centroids)` | per-cluster sums, counts, inertia | adds chunks, divides |
| `linreg_partial(x, y)` | ``X^T X`` and ``X^T y`` | adds chunks, solves |
| `tree_fit(x, y, seed, max_depth, n_features_per_split)` | one decision tree of a forest | votes |
| `tree_predict(feature, threshold, left, right, value, x)` | one tree's predictions | votes |
| `mlp_grad(w1, b1, w2, b2, x, y)` | loss and gradients, summed | averages, steps |

Each but `tree_predict` also comes as ``<name>_synth``, which takes the recipe of its rows
(a seed, the first row, a row count and small parameter arrays; see `ml_data`) instead of the
rows, generates them where it runs and returns what the plain kernel returns on them: an
iterative job then ships parameters, not data, every iteration. (`tree_fit_synth` also
predicts the test rows, so a forest needs one task per tree.) The CUDA kernels live in
`cuda_ml` and `cuda_mlp`; K-means, the regression and the MLP have GPU variants, whose
``*_synth`` forms generate their rows on the device (`cuda_data`, the same bits as `ml_data`).

All arithmetic is float64 whatever the input dtype (float32 input halves what travels and
is widened exactly), and every result is float64 (integer counts int64). Inputs are checked
before any backend runs; a bad one raises a one-line `KernelInputError` naming the kernel,
the argument and the fix. Non-finite data is refused: NaN has no place in a distance, a
split or a loss, and refusing it keeps the backends' results comparable. So is a result
beyond float64 (`linreg_partial`'s X^T X of values near 1e154 and over): every variant says
so in one line, where each returned its own mix of inf and NaN (inf - inf, summed in its order).

Determinism, and why the CPU variants accumulate as they do:

* ``kmeans_partial``: the CPU variant is bit-identical to the NumPy reference. Each squared
  distance is summed over features in order (vectorised across centroids, never
  reassociated), ties go to the lowest centroid (`np.argmin`'s rule), and sums, counts and
  inertia are accumulated row by row in row order, as `np.add.at` and `np.cumsum` do. So a
  K-means run that reduces chunks in a fixed order gives the same bits on any number of
  slots or threads, which a resumed run relies on. The CUDA variant adds with atomics in
  no fixed order: equal to the reference within rounding, not in every bit.
* ``linreg_partial``, ``mlp_grad``: the CPU variants do not depend on the thread count (each
  output element, or each fixed block of rows, is accumulated in a fixed order), but they sum
  in another order than NumPy's BLAS: equal to the reference within rounding.
* ``tree_fit``/``tree_predict``: exact. Split scores are ratios of integers (Gini from class
  counts) and the random draws come from a counter-based generator, so the NumPy reference
  and the numba variant grow the same tree, node for node.

Complexity metadata (for the coordinator's ``auto`` backend choice): the K-means, regression
and MLP kernels are "quadratic" (rows times centroids, features or hidden units), the tree
kernels "linear". The ``*_synth`` kernels take almost no input, so ``auto`` would pick the
scalar backend for them: pass the backend explicitly, as the jobs do.

This module imports neither numba nor numba.cuda at import time (see `lazyjit.jit`); the
CUDA variants compile on their first call, on a GPU slot, or under numba's simulator
(``NUMBA_ENABLE_CUDASIM=1``).

This module defines the kernels (every one registers here, as ``batuta.kernels.ml``): each
reference, its input check and the variants it attaches. The code behind them lives beside
it, one subject a module: the shared input checks in `ml_checks`, the numba loops of the
K-means, regression and MLP CPU variants in `ml_cpu`, the tree algorithms in `ml_trees`, the
data generators in `ml_data` and the CUDA kernels in `cuda_ml` and `cuda_mlp`.
"""

from __future__ import annotations

import numpy as np

from . import cuda_data, cuda_ml, cuda_mlp, cuda_support, ml_cpu, ml_data, ml_trees
from .cuda_support import GPU_MIN_ELEMENTS
from .ml_checks import (
    MAX_CLASSES,
    check_data,
    check_finite,
    check_gram,
    check_kmeans,
    check_labels,
    check_param,
    largest,
    writable_float64,
)
from .ml_data import MAX_UINT64, splitmix64
from .ml_trees import Tree
from .registry import KernelInputError, as_count, device_results_wanted, float_array, is_device_array, kernel

__all__ = [
    "MAX_CLASSES",
    "MAX_TREE_ROWS",
    "Tree",
    "kmeans_partial",
    "kmeans_partial_synth",
    "linreg_partial",
    "linreg_partial_synth",
    "mlp_grad",
    "mlp_grad_synth",
    "splitmix64",
    "tree_fit",
    "tree_fit_synth",
    "tree_predict",
]

MAX_TREE_ROWS = 1 << 20
"""Rows per `tree_fit` call: split scores use int64 numerators up to about rows**3."""

_REFERENCE_BLOCK = 1024  # rows per vectorised step of kmeans_partial's reference: its arrays stay in L2

# -- K-means ------------------------------------------------------------------------------


@kernel(
    "kmeans_partial",
    description="K-means step on a chunk: per-cluster sums and counts, and the inertia.",
    complexity="quadratic",
    pure=True,
    gpu_min_elements=GPU_MIN_ELEMENTS["kmeans_partial"],
)
def kmeans_partial(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Assign each row of `x` (n, d) to its nearest centroid (k, d); return the cluster sums.

    Returns ``(sums[k, d] float64, counts[k] int64, inertia)``, where inertia is the sum of
    squared distances of rows to their centroids. The coordinator adds the chunks' results
    and sets each centroid to ``sums / counts`` (keeping the old one where a count is 0).
    Distances are summed over features in order and accumulated row by row; the CPU variant
    does exactly the same, so the two agree in every bit (see the module docstring).
    """
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is said by check_kmeans, in one line
        result = _kmeans_reference(x, centroids)
    return check_kmeans("kmeans_partial", result, lambda: _kmeans_fix(x, centroids))


def _kmeans_reference(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    xs = x.astype(np.float64, copy=False)
    n, d = xs.shape
    k = centroids.shape[0]
    sums = np.zeros((k, d))
    counts = np.zeros(k, np.int64)
    inertia = 0.0
    for start in range(0, n, _REFERENCE_BLOCK):
        block = xs[start : start + _REFERENCE_BLOCK]
        columns = block.T.copy()  # contiguous features: the broadcasts below stream
        dist = np.zeros((block.shape[0], k))
        diff = np.empty_like(dist)
        for j in range(d):
            np.subtract(columns[j][:, None], centroids[None, :, j], out=diff)
            np.multiply(diff, diff, out=diff)
            dist += diff
        labels = dist.argmin(axis=1)
        best = dist[np.arange(block.shape[0]), labels]
        np.add.at(sums, labels, block)  # row order, unbuffered: a sequential sum per cluster
        counts += np.bincount(labels, minlength=k)
        inertia = float(np.cumsum(np.concatenate(([inertia], best)))[-1])  # sequential, like the loop
    return sums, counts, inertia


@kmeans_partial.validator
def _check_kmeans(x: object, centroids: object) -> tuple[np.ndarray, np.ndarray]:
    xs = check_data("kmeans_partial", "x", x)
    c = float_array("kmeans_partial", "centroids", centroids, ndim=2)
    if c.shape[0] < 1 or c.shape[1] != xs.shape[1]:
        raise KernelInputError(
            f"kernel 'kmeans_partial': argument 'centroids' has shape {c.shape}; expected (k >= 1, {xs.shape[1]}), "
            "one row per cluster with as many columns as x"
        )
    check_finite("kmeans_partial", "centroids", c)
    return xs, writable_float64(c, "kmeans_partial", "centroids")


@kmeans_partial.cpu
def _kmeans_cpu(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    return check_kmeans("kmeans_partial", ml_cpu.kmeans_partial_numba(x, centroids), lambda: _kmeans_fix(x, centroids))


def _kmeans_fix(x: np.ndarray, centroids: np.ndarray) -> str:
    """What to do when `kmeans_partial` overflows (reads the data: only then)."""
    return (
        f"the largest |x| is {largest(x)} and |centroids| {largest(centroids)}: divide both by a scale near the "
        "larger first (the sums come back times the scale, the inertia times its square)"
    )


# -- linear regression --------------------------------------------------------------------


@kernel(
    "linreg_partial",
    description="Normal equations of a chunk: X^T X and X^T y in float64.",
    complexity="quadratic",
    pure=True,
    gpu_min_elements=GPU_MIN_ELEMENTS["linreg_partial"],
)
def linreg_partial(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(X^T X [d, d], X^T y [d])`` of the rows `x` (n, d) and targets `y` (n,), float64.

    Summed over chunks these are the normal equations of the whole data set; the coordinator
    solves ``X^T X w = X^T y`` (add a column of ones to `x` for an intercept).
    """
    return check_gram("linreg_partial", _normal_equations(x, y), lambda: _linreg_fix(x, y))


def _normal_equations(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xs = x.astype(np.float64, copy=False)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is said by check_gram, in one line
        return xs.T @ xs, xs.T @ y.astype(np.float64, copy=False)


def _linreg_fix(x: np.ndarray, y: np.ndarray) -> str:
    """What to do when `linreg_partial` overflows (reads the data: only then)."""
    if is_device_array(x) or is_device_array(y):
        return "divide x and y by scales near their largest magnitudes first (on the device)"
    big_x, big_y = float(np.abs(x).max()), float(np.abs(y).max())
    return (
        f"the largest |x| is {big_x:.3g} and |y| {big_y:.3g}: divide x and y by scales near those first "
        "(the solution of the scaled equations times y's scale / x's scale is the original one)"
    )


@linreg_partial.validator
def _check_linreg(x: object, y: object) -> tuple[np.ndarray, np.ndarray]:
    xs = check_data("linreg_partial", "x", x)
    ys = float_array("linreg_partial", "y", y)
    if ys.shape[0] != xs.shape[0]:
        raise KernelInputError(f"kernel 'linreg_partial': argument 'y' has {ys.shape[0]} values for {xs.shape[0]} rows")
    if ys.dtype != xs.dtype:
        raise KernelInputError(
            f"kernel 'linreg_partial': argument 'y' is {ys.dtype} but 'x' is {xs.dtype}; "
            f"cast one, e.g. y.astype(np.{xs.dtype})"
        )
    check_finite("linreg_partial", "y", ys)
    return xs, ys


@linreg_partial.cpu
def _linreg_cpu(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return check_gram("linreg_partial", ml_cpu.linreg_partial_numba(x, y), lambda: _linreg_fix(x, y))


# -- decision trees -----------------------------------------------------------------------


@kernel(
    "tree_fit",
    description="Fit one random-forest classification tree (Gini) on a bootstrap sample; return its arrays.",
    complexity="linear",
    pure=True,
)
def tree_fit(x: np.ndarray, y: np.ndarray, seed: int, max_depth: int, n_features_per_split: int) -> Tree:
    """Fit a classification tree on a bootstrap sample of (`x`, `y`), as a random forest does.

    `y` holds integer class labels 0..C-1. The tree draws n rows with replacement, then grows
    depth first from the root: a node becomes a leaf at `max_depth`, below 2 rows, when pure,
    or when none of its candidate features varies; otherwise it tries
    `n_features_per_split` features drawn without replacement and splits at the threshold
    that minimises the weighted Gini impurity of the children (the first such split, in the
    order of the drawn features and of rising thresholds). All draws come from the
    SplitMix64 stream of `seed` (see `splitmix64`): bootstrap rows first, then each node's
    features in the order nodes are grown. Returns the `Tree` arrays.
    """
    return ml_trees.fit_reference(x, y, seed, max_depth, n_features_per_split)


@tree_fit.validator
def _check_tree_fit(x: object, y: object, seed: object, max_depth: object, n_features_per_split: object) -> tuple:
    xs = check_data("tree_fit", "x", x)
    n, d = xs.shape
    if not 1 <= n <= MAX_TREE_ROWS:
        raise KernelInputError(
            f"kernel 'tree_fit': argument 'x' has {n} rows; pass 1 to {MAX_TREE_ROWS} (subsample bigger data per tree)"
        )
    return (
        xs,
        check_labels("tree_fit", "y", y, n),
        as_count("tree_fit", "seed", seed, maximum=MAX_UINT64),
        as_count("tree_fit", "max_depth", max_depth, maximum=1000),
        as_count("tree_fit", "n_features_per_split", n_features_per_split, minimum=1, maximum=d),
    )


@tree_fit.cpu
def _tree_fit_cpu(x: np.ndarray, y: np.ndarray, seed: int, max_depth: int, n_features_per_split: int) -> Tree:
    return ml_trees.fit_numba(x, y, seed, max_depth, n_features_per_split)


@kernel(
    "tree_predict",
    description="Predictions of one fitted tree (tree_fit's arrays) for the rows of x.",
    complexity="linear",
    pure=True,
)
def tree_predict(
    feature: np.ndarray, threshold: np.ndarray, left: np.ndarray, right: np.ndarray, value: np.ndarray, x: np.ndarray
) -> np.ndarray:
    """The `value` of the leaf each row of `x` reaches (float64, one per row)."""
    return ml_trees.predict_reference(feature, threshold, left, right, value, x)


@tree_predict.validator
def _check_tree_predict(
    feature: object, threshold: object, left: object, right: object, value: object, x: object
) -> tuple:
    name = "tree_predict"
    xs = check_data(name, "x", x)
    arrays = {"feature": feature, "threshold": threshold, "left": left, "right": right, "value": value}
    wanted = {"feature": np.int32, "threshold": np.float64, "left": np.int32, "right": np.int32, "value": np.float64}
    for arg, array in arrays.items():
        if not isinstance(array, np.ndarray) or array.dtype != wanted[arg] or array.ndim != 1:
            raise KernelInputError(
                f"kernel {name!r}: argument {arg!r} must be a 1-D {np.dtype(wanted[arg])} array as tree_fit returns it"
            )
    checked = {arg: np.asarray(array) for arg, array in arrays.items()}
    size = checked["feature"].shape[0]
    if size == 0 or any(a.shape[0] != size for a in checked.values()):
        raise KernelInputError(f"kernel {name!r}: the tree arrays must be non-empty and of equal length")
    f, lt, rt = checked["feature"], checked["left"], checked["right"]
    inner = f >= 0
    ids = np.arange(size)
    if (
        (f >= xs.shape[1]).any()
        or (f < -1).any()
        or (lt[inner] <= ids[inner]).any()
        or (rt[inner] <= ids[inner]).any()
        or (lt[inner] >= size).any()
        or (rt[inner] >= size).any()
    ):
        raise KernelInputError(
            f"kernel {name!r}: the tree is malformed (feature >= {xs.shape[1]} columns of x, or a child id "
            "not after its parent); pass the arrays tree_fit returned, with x of the same columns"
        )
    check_finite(name, "threshold", checked["threshold"])
    return (*checked.values(), xs)


tree_predict.cpu(ml_trees.predict_numba)


# -- multilayer perceptron ----------------------------------------------------------------


@kernel(
    "mlp_grad",
    description="Loss and gradients of a 1-hidden-layer tanh MLP (softmax cross-entropy), summed.",
    complexity="quadratic",
    pure=True,
    gpu_min_elements=GPU_MIN_ELEMENTS["mlp_grad"],
)
def mlp_grad(
    w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray, x: np.ndarray, y: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Forward and backward pass of ``softmax(tanh(x @ w1 + b1) @ w2 + b2)`` against labels `y`.

    Shapes: w1 (d, h), b1 (h,), w2 (h, c), b2 (c,), x (n, d), y (n,) integer labels in
    [0, c). Returns ``(loss, dw1, db1, dw2, db2)``: the cross-entropy and its gradients,
    *summed* over the chunk's rows (not averaged), float64, so the coordinator adds the chunks
    and divides by the total row count, however unequal the chunks.
    """
    xs = x.astype(np.float64, copy=False)
    hidden = np.tanh(xs @ w1 + b1)
    logits = hidden @ w2 + b2
    top = logits.max(axis=1, keepdims=True)
    exp = np.exp(logits - top)
    total = exp.sum(axis=1, keepdims=True)
    rows = np.arange(xs.shape[0])
    loss = float((np.log(total[:, 0]) + top[:, 0] - logits[rows, y]).sum())
    dlogits = exp / total
    dlogits[rows, y] -= 1.0
    dhidden = (dlogits @ w2.T) * (1.0 - hidden * hidden)
    return loss, xs.T @ dhidden, dhidden.sum(axis=0), hidden.T @ dlogits, dlogits.sum(axis=0)


@mlp_grad.validator
def _check_mlp(w1: object, b1: object, w2: object, b2: object, x: object, y: object) -> tuple:
    name = "mlp_grad"
    xs = check_data(name, "x", x)
    d = xs.shape[1]
    w1a = float_array(name, "w1", w1, ndim=2)
    if w1a.shape[0] != d or w1a.shape[1] < 1:
        raise KernelInputError(f"kernel {name!r}: argument 'w1' has shape {w1a.shape}; expected ({d}, hidden >= 1)")
    h = w1a.shape[1]
    w2a = float_array(name, "w2", w2, ndim=2)
    if w2a.shape[0] != h or w2a.shape[1] < 2:
        raise KernelInputError(f"kernel {name!r}: argument 'w2' has shape {w2a.shape}; expected ({h}, classes >= 2)")
    c = w2a.shape[1]
    return (
        check_param(name, "w1", w1a, (d, h)),
        check_param(name, "b1", b1, (h,)),
        check_param(name, "w2", w2a, (h, c)),
        check_param(name, "b2", b2, (c,)),
        xs,
        check_labels(name, "y", y, xs.shape[0], c),
    )


mlp_grad.cpu(ml_cpu.mlp_grad_numba)


# -- the same kernels on data generated where they run -----------------------------------
#
# Each takes the recipe of its rows instead of the rows (see `ml_data`): only parameters
# travel, and the result equals the plain kernel's on the same rows generated anywhere else.


@kernel(
    "kmeans_partial_synth",
    description="kmeans_partial on rows of the seeded blobs data set, generated here.",
    complexity="quadratic",
    pure=True,
)
def kmeans_partial_synth(
    seed: int, start: int, rows: int, centers: np.ndarray, spread: float, centroids: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    """`kmeans_partial` of ``ml_data.blobs(seed, start, rows, centers, spread)``."""
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is said by check_kmeans, in one line
        result = _kmeans_reference(ml_data.blobs(seed, start, rows, centers, spread), centroids)
    return check_kmeans("kmeans_partial_synth", result, lambda: _kmeans_synth_fix(centers, spread, centroids))


def _kmeans_synth_fix(centers: np.ndarray, spread: float, centroids: np.ndarray) -> str:
    return (
        f"the largest |centers| is {largest(centers)}, spread {spread:.3g} and |centroids| {largest(centroids)}: "
        "pass smaller ones (the rows are float32)"
    )


@kmeans_partial_synth.validator
def _check_kmeans_synth(
    seed: object, start: object, rows: object, centers: object, spread: object, centroids: object
) -> tuple:
    name = "kmeans_partial_synth"
    c = ml_data.check_params(name, "centers", centers, 2)
    seed_value, first, count = ml_data.check_rows(name, seed, start, rows, c.shape[1])
    cents = ml_data.check_params(name, "centroids", centroids, 2)
    if cents.shape[1] != c.shape[1]:
        raise KernelInputError(
            f"kernel {name!r}: argument 'centroids' has {cents.shape[1]} columns but the data has {c.shape[1]}"
        )
    return seed_value, first, count, c, ml_data.check_scale(name, "spread", spread), cents


@kmeans_partial_synth.cpu
def _kmeans_synth_cpu(
    seed: int, start: int, rows: int, centers: np.ndarray, spread: float, centroids: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    x = ml_data.blobs_numba(np.uint64(seed), start, rows, centers, spread)
    result = ml_cpu.kmeans_partial_numba(x, centroids)
    return check_kmeans("kmeans_partial_synth", result, lambda: _kmeans_synth_fix(centers, spread, centroids))


@kmeans_partial_synth.gpu
def _kmeans_synth_gpu(
    seed: int, start: int, rows: int, centers: np.ndarray, spread: float, centroids: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    with cuda_support.gpu_errors("kmeans_partial_synth") as cuda:  # rows made on the device
        x = cuda_data.blobs(cuda, seed, start, rows, centers, spread)
        result = cuda_ml.kmeans_assign(cuda, x, centroids, host_results=not device_results_wanted())
    return check_kmeans("kmeans_partial_synth", result, lambda: _kmeans_synth_fix(centers, spread, centroids))


@kernel(
    "linreg_partial_synth",
    description="linreg_partial on rows of the seeded regression data set, generated here.",
    complexity="quadratic",
    pure=True,
)
def linreg_partial_synth(
    seed: int, start: int, rows: int, coef: np.ndarray, noise_scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """`linreg_partial` of ``ml_data.regression(seed, start, rows, coef, noise_scale)``."""
    rows_made = ml_data.regression(seed, start, rows, coef, noise_scale)
    return check_gram("linreg_partial_synth", _normal_equations(*rows_made), _synth_fix)


def _synth_fix() -> str:
    return "pass smaller coef and noise_scale (the rows' targets grow with them)"


@linreg_partial_synth.validator
def _check_linreg_synth(seed: object, start: object, rows: object, coef: object, noise_scale: object) -> tuple:
    name = "linreg_partial_synth"
    w = ml_data.check_params(name, "coef", coef, 1)
    seed_value, first, count = ml_data.check_rows(name, seed, start, rows, w.shape[0] + 1)
    return seed_value, first, count, w, ml_data.check_scale(name, "noise_scale", noise_scale)


@linreg_partial_synth.cpu
def _linreg_synth_cpu(
    seed: int, start: int, rows: int, coef: np.ndarray, noise_scale: float
) -> tuple[np.ndarray, np.ndarray]:
    x, y = ml_data.regression_numba(np.uint64(seed), start, rows, coef, noise_scale)
    return check_gram("linreg_partial_synth", ml_cpu.linreg_partial_numba(x, y), _synth_fix)


@linreg_partial_synth.gpu
def _linreg_synth_gpu(
    seed: int, start: int, rows: int, coef: np.ndarray, noise_scale: float
) -> tuple[np.ndarray, np.ndarray]:
    with cuda_support.gpu_errors("linreg_partial_synth") as cuda:
        x, y = cuda_data.regression(cuda, seed, start, rows, coef, noise_scale)
        return check_gram("linreg_partial_synth", cuda_support.finish(cuda_ml.gram(cuda, x, y)), _synth_fix)


@kernel(
    "tree_fit_synth",
    description="tree_fit on the first rows of the seeded teacher data set, plus predictions for the rows after.",
    complexity="linear",
    pure=True,
)
def tree_fit_synth(
    seed: int,
    n_train: int,
    n_test: int,
    weights: np.ndarray,
    noise_scale: float,
    tree_seed: int,
    max_depth: int,
    n_features_per_split: int,
) -> tuple[np.ndarray, ...]:
    """Fit a tree on teacher rows [0, n_train) and predict rows [n_train, n_train + n_test).

    Returns the `Tree` arrays followed by the float64 predictions: one task grows a tree of a
    forest and votes, and only the recipe, the tree and the votes travel.
    """
    x, y = ml_data.teacher(seed, 0, n_train, weights, noise_scale)
    tree = tree_fit.reference(x, y, tree_seed, max_depth, n_features_per_split)
    test, _ = ml_data.teacher(seed, n_train, n_test, weights, noise_scale)
    return (*tree, tree_predict.reference(*tree, test))


@tree_fit_synth.validator
def _check_tree_synth(
    seed: object,
    n_train: object,
    n_test: object,
    weights: object,
    noise_scale: object,
    tree_seed: object,
    max_depth: object,
    n_features_per_split: object,
) -> tuple:
    name = "tree_fit_synth"
    w = ml_data.check_params(name, "weights", weights, 2)
    d, c = w.shape
    if c < 2:
        raise KernelInputError(f"kernel {name!r}: argument 'weights' has {c} column; pass one per class, at least 2")
    train = as_count(name, "n_train", n_train, minimum=1, maximum=MAX_TREE_ROWS)
    test = as_count(name, "n_test", n_test)
    seed_value, _, _ = ml_data.check_rows(name, seed, 0, train + test, d + c)
    return (
        seed_value,
        train,
        test,
        w,
        ml_data.check_scale(name, "noise_scale", noise_scale),
        as_count(name, "tree_seed", tree_seed, maximum=MAX_UINT64),
        as_count(name, "max_depth", max_depth, maximum=1000),
        as_count(name, "n_features_per_split", n_features_per_split, minimum=1, maximum=d),
    )


@tree_fit_synth.cpu
def _tree_synth_cpu(
    seed: int,
    n_train: int,
    n_test: int,
    weights: np.ndarray,
    noise_scale: float,
    tree_seed: int,
    max_depth: int,
    n_features_per_split: int,
) -> tuple[np.ndarray, ...]:
    x, y = ml_data.teacher_numba(np.uint64(seed), 0, n_train, weights, noise_scale)
    tree = _tree_fit_cpu(x, y, tree_seed, max_depth, n_features_per_split)
    test, _ = ml_data.teacher_numba(np.uint64(seed), n_train, n_test, weights, noise_scale)
    return (*tree, ml_trees.predict_numba(*tree, test))


@kernel(
    "mlp_grad_synth",
    description="mlp_grad on rows of the seeded teacher data set, generated here.",
    complexity="quadratic",
    pure=True,
)
def mlp_grad_synth(
    w1: np.ndarray,
    b1: np.ndarray,
    w2: np.ndarray,
    b2: np.ndarray,
    seed: int,
    start: int,
    rows: int,
    weights: np.ndarray,
    noise_scale: float,
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`mlp_grad` of ``ml_data.teacher(seed, start, rows, weights, noise_scale)``."""
    x, y = ml_data.teacher(seed, start, rows, weights, noise_scale)
    return mlp_grad.reference(w1, b1, w2, b2, x, y)


@mlp_grad_synth.validator
def _check_mlp_synth(
    w1: object,
    b1: object,
    w2: object,
    b2: object,
    seed: object,
    start: object,
    rows: object,
    weights: object,
    noise_scale: object,
) -> tuple:
    name = "mlp_grad_synth"
    w = ml_data.check_params(name, "weights", weights, 2)
    d, c = w.shape
    seed_value, first, count = ml_data.check_rows(name, seed, start, rows, d + c)
    params = _check_mlp(w1, b1, w2, b2, np.zeros((0, d), np.float32), np.zeros(0, np.int64))[:4]
    if params[2].shape[1] != c:
        raise KernelInputError(
            f"kernel {name!r}: argument 'w2' has {params[2].shape[1]} columns but the data set has {c} classes"
        )
    return (*params, seed_value, first, count, w, ml_data.check_scale(name, "noise_scale", noise_scale))


@mlp_grad_synth.cpu
def _mlp_synth_cpu(
    w1: np.ndarray,
    b1: np.ndarray,
    w2: np.ndarray,
    b2: np.ndarray,
    seed: int,
    start: int,
    rows: int,
    weights: np.ndarray,
    noise_scale: float,
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = ml_data.teacher_numba(np.uint64(seed), start, rows, weights, noise_scale)
    return ml_cpu.mlp_grad_numba(w1, b1, w2, b2, x, y)


# -- CUDA variants (numba-cuda kernels in `cuda_ml`, compiled on first use) ---------------


@kmeans_partial.gpu
def _kmeans_gpu(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Centroids and per-block sums in shared memory, rows in registers (see `cuda_ml`); the
    blocks' sums are added with atomics, so equal to the reference within rounding."""
    with cuda_support.gpu_errors("kmeans_partial") as cuda:
        result = cuda_ml.kmeans_assign(cuda, x, centroids, host_results=not device_results_wanted())
    return check_kmeans("kmeans_partial", result, lambda: _kmeans_fix(x, centroids))


@linreg_partial.gpu
def _linreg_gpu(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """16 x 16 shared-memory tiles of [X | y]^T [X | y] over row splits (see `cuda_ml.gram`)."""
    with cuda_support.gpu_errors("linreg_partial") as cuda:
        result = cuda_support.finish(cuda_ml.gram(cuda, x, y))
    return check_gram("linreg_partial", result, lambda: _linreg_fix(x, y))


@mlp_grad.gpu
def _mlp_gpu(
    w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray, x: np.ndarray, y: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A thread per row forward and back, then the gradients as summed cross products over
    row splits (see `cuda_mlp`): equal to the reference within rounding."""
    with cuda_support.gpu_errors("mlp_grad") as cuda:
        return cuda_support.finish(cuda_mlp.mlp_grad(cuda, w1, b1, w2, b2, x, y))


@mlp_grad_synth.gpu
def _mlp_synth_gpu(
    w1: np.ndarray,
    b1: np.ndarray,
    w2: np.ndarray,
    b2: np.ndarray,
    seed: int,
    start: int,
    rows: int,
    weights: np.ndarray,
    noise_scale: float,
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    with cuda_support.gpu_errors("mlp_grad_synth") as cuda:
        x, y = cuda_data.teacher(cuda, seed, start, rows, weights, noise_scale)
        return cuda_support.finish(cuda_mlp.mlp_grad(cuda, w1, b1, w2, b2, x, y))
