"""The ML kernels (`batuta.kernels.ml`) against their NumPy references, and their inputs checked.

What each backend promises, and what is tested here:

* kmeans_partial, tree_fit, tree_predict (and their ``*_synth`` forms): the CPU variant equals
  the reference in every bit, for both float dtypes and at sizes around the block edges.
* linreg_partial, mlp_grad: equal within rounding (another summation order); mlp_grad's
  gradients also against finite differences, so the reference itself is checked.
* The CPU results do not depend on the number of numba threads (one subprocess).
* The synthetic data generators (`ml_data`): NumPy and numba agree in every bit, and the rows
  do not depend on how they are chunked.
* The CUDA variants: under numba's simulator in one subprocess at tiny sizes, and on a real
  GPU when ``BATUTA_REAL_GPU=1``.

The first run on a fresh checkout compiles every kernel (about a minute on two cores);
numba caches the machine code next to the sources, so later runs take seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from typing import Any

import numpy as np
import pytest
from batuta.kernels import KernelInputError, ml, ml_data

from batuta import kernels

DTYPES = [np.float32, np.float64]
ML_KERNELS = {
    "kmeans_partial": ("scalar", "cpu", "gpu"),
    "linreg_partial": ("scalar", "cpu", "gpu"),
    "tree_fit": ("scalar", "cpu"),
    "tree_predict": ("scalar", "cpu"),
    "mlp_grad": ("scalar", "cpu", "gpu"),
    "kmeans_partial_synth": ("scalar", "cpu", "gpu"),
    "linreg_partial_synth": ("scalar", "cpu", "gpu"),
    "tree_fit_synth": ("scalar", "cpu"),
    "mlp_grad_synth": ("scalar", "cpu", "gpu"),
}


def both(name: str, args: tuple[object, ...]) -> tuple[Any, Any]:
    return kernels.run(name, "scalar", args), kernels.run(name, "cpu", args)


def assert_same(a: object, b: object) -> None:
    """Equal in every bit: arrays of the same dtype and shape, or equal numbers, recursively."""
    if isinstance(a, tuple | list):
        assert isinstance(b, tuple | list) and len(a) == len(b)
        for p, q in zip(a, b, strict=True):
            assert_same(p, q)
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


def blob_rows(n: int, d: int, dtype: type, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d)) * 3 + rng.integers(-5, 5, (n, 1))).astype(dtype)


def labelled(n: int, d: int, dtype: type, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x: np.ndarray = rng.standard_normal((n, d)).astype(dtype)
    y = ((x[:, 0] > 0).astype(np.int64) + (x[:, 1 % d] > 0.5)) % classes
    return x, y


def mlp_params(d: int, h: int, c: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((d, h)) * 0.4,
        rng.standard_normal(h) * 0.1,
        rng.standard_normal((h, c)) * 0.4,
        rng.standard_normal(c) * 0.1,
    )


# -- the registry -------------------------------------------------------------------------


def test_ml_kernels_are_registered_with_their_backends() -> None:
    for name, backends in ML_KERNELS.items():
        found = kernels.info(name)
        assert found.backends == backends, name
        assert found.module == "batuta.kernels.ml"
        assert found.description
        assert found.complexity == ("linear" if name.startswith("tree_") else "quadratic")


# -- K-means ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "k"), [(0, 3), (1, 1), (255, 4), (257, 7), (1025, 40), (3000, 5)])
def test_kmeans_partial_cpu_equals_reference_in_every_bit(dtype: type, n: int, k: int) -> None:
    x = blob_rows(n, 6, dtype, seed=n)
    centroids = blob_rows(k, 6, np.float64, seed=n + 1)
    ref, cpu = both("kmeans_partial", (x, centroids))
    assert_same(ref, cpu)
    sums, counts, inertia = cpu
    assert sums.dtype == np.float64 and counts.dtype == np.int64 and isinstance(inertia, float)
    assert counts.sum() == n
    if n:  # independently: each row's nearest centroid by brute force
        dist = ((x.astype(np.float64)[:, None, :] - centroids[None]) ** 2).sum(axis=2)
        labels = dist.argmin(axis=1)
        np.testing.assert_array_equal(counts, np.bincount(labels, minlength=k))
        np.testing.assert_allclose(inertia, dist.min(axis=1).sum(), rtol=1e-12)
        for c in range(k):
            np.testing.assert_allclose(sums[c], x[labels == c].astype(np.float64).sum(axis=0), rtol=1e-12, atol=1e-9)


def test_kmeans_ties_go_to_the_lowest_centroid() -> None:
    x = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])
    centroids = np.array([[1.0, 1.0], [1.0, 1.0], [5.0, 5.0]])  # 0 and 1 are the same point
    for backend in ("scalar", "cpu"):
        _sums, counts, _ = kernels.run("kmeans_partial", backend, (x, centroids))
        np.testing.assert_array_equal(counts, [3, 0, 0])


def test_kmeans_float32_centroids_are_widened_exactly() -> None:
    x = blob_rows(100, 3, np.float32)
    c32 = blob_rows(4, 3, np.float32, seed=9)
    assert_same(
        kernels.run("kmeans_partial", "cpu", (x, c32)),
        kernels.run("kmeans_partial", "cpu", (x, c32.astype(np.float64))),
    )


# -- linear regression --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "d"), [(0, 3), (1, 1), (5, 4), (300, 5), (700, 17), (2000, 8)])
def test_linreg_partial_cpu_matches_reference(dtype: type, n: int, d: int) -> None:
    x, _ = labelled(n, d, dtype, seed=d)
    y: np.ndarray = np.random.default_rng(n).standard_normal(n).astype(dtype)
    (ref_xtx, ref_xty), (xtx, xty) = both("linreg_partial", (x, y))
    assert xtx.dtype == np.float64 and xtx.shape == (d, d) and xty.shape == (d,)
    np.testing.assert_array_equal(xtx, xtx.T)  # mirrored exactly
    scale = max(1.0, n)
    np.testing.assert_allclose(xtx, ref_xtx, rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(xty, ref_xty, rtol=0, atol=1e-12 * scale)


@pytest.mark.parametrize("backend", ["scalar", "cpu"])
def test_linreg_partial_overflow_is_refused_in_one_line_by_every_variant(backend: str) -> None:
    """Finite rows whose X^T X is beyond float64: the variants gave non-finite results, and not
    the same ones (inf where they summed in one order, inf - inf = NaN in another)."""
    rng = np.random.default_rng(0)
    w = np.array([1.0, -2.0, 3.0])
    x = rng.standard_normal((50, 3)) * 1e200
    y = x @ w * 10
    with pytest.raises(KernelInputError) as caught:
        kernels.run("linreg_partial", backend, (x, y))
    big_x, big_y = np.abs(x).max(), np.abs(y).max()
    assert str(caught.value) == (
        "kernel 'linreg_partial': X^T X or X^T y overflows float64 (beyond 1.8e308); "
        f"the largest |x| is {big_x:.3g} and |y| {big_y:.3g}: divide x and y by scales near those first "
        "(the solution of the scaled equations times y's scale / x's scale is the original one)"
    )
    # what it says to do gives the coefficients back
    sx, sy = 1e200, 1e201
    xtx, xty = kernels.run("linreg_partial", backend, (x / sx, y / sy))
    np.testing.assert_allclose(np.linalg.solve(xtx, xty) * sy / sx, w * 10, rtol=1e-9)
    # mixed signs: the sums that were inf in one variant and NaN in the other
    mixed = rng.choice([1e200, -1e200, 1.0], size=(9, 3))
    with pytest.raises(KernelInputError, match="overflows float64"):
        kernels.run("linreg_partial", backend, (mixed, mixed[:, 0].copy()))
    with pytest.raises(KernelInputError) as synth, warnings.catch_warnings():
        warnings.simplefilter("error")  # the one line alone: NumPy's RuntimeWarning (cast) came first
        kernels.run("linreg_partial_synth", backend, (1, 0, 50, np.full(3, 1e200), 0.1))
    assert str(synth.value) == (
        "kernel 'linreg_partial_synth': X^T X or X^T y overflows float64 (beyond 1.8e308); "
        "pass smaller coef and noise_scale (the rows' targets grow with them)"
    )


@pytest.mark.parametrize("backend", ["scalar", "cpu"])
def test_kmeans_partial_overflow_is_refused_in_one_line_by_every_variant(backend: str) -> None:
    """Rows beyond float32 (huge centers or spread), or squared distances beyond float64: the
    CPU variant returned inf and NaN silently, the reference with NumPy's RuntimeWarning."""
    centers, centroids = np.full((2, 3), 1e39), np.zeros((2, 3))
    with pytest.raises(KernelInputError) as synth, warnings.catch_warnings():
        warnings.simplefilter("error")  # the one line alone
        kernels.run("kmeans_partial_synth", backend, (1, 0, 50, centers, 0.1, centroids))
    assert str(synth.value) == (
        "kernel 'kmeans_partial_synth': the sums or the inertia overflow (rows beyond float32's 3.4e38, or "
        "squared distances beyond float64's 1.8e308); the largest |centers| is 1e+39, spread 0.1 and "
        "|centroids| 0: pass smaller ones (the rows are float32)"
    )
    with pytest.raises(KernelInputError, match="spread 1e"), warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels.run("kmeans_partial_synth", backend, (1, 0, 50, np.ones((2, 3)), 1e300, centroids))
    x = np.ones((4, 3))
    with pytest.raises(KernelInputError) as plain, warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels.run("kmeans_partial", backend, (x, np.full((2, 3), 1e200)))
    assert str(plain.value) == (
        "kernel 'kmeans_partial': the sums or the inertia overflow (rows beyond float32's 3.4e38, or "
        "squared distances beyond float64's 1.8e308); the largest |x| is 1 and |centroids| 1e+200: divide "
        "both by a scale near the larger first (the sums come back times the scale, the inertia times its square)"
    )
    # near the limit: finite, and the variants agree
    sums, counts, inertia = kernels.run("kmeans_partial", backend, (np.full((4, 3), 1e150), np.zeros((1, 3))))
    assert np.isfinite(sums).all() and np.isfinite(inertia) and counts.tolist() == [4]


def test_linreg_partial_near_the_limit_is_finite_and_alike() -> None:
    x = np.full((8, 3), 1e150)  # X^T X entries 8e300: within float64
    (ref_xtx, ref_xty), (xtx, xty) = both("linreg_partial", (x, x[:, 0].copy()))
    assert np.isfinite(xtx).all() and np.isfinite(xty).all()
    np.testing.assert_allclose(xtx, ref_xtx, rtol=1e-15)
    np.testing.assert_allclose(xty, ref_xty, rtol=1e-15)


# -- decision trees -----------------------------------------------------------------------


def check_tree_shape(tree: ml.Tree, d: int, max_depth: int) -> None:
    feature, threshold, left, right, value = tree
    assert [a.dtype for a in tree] == [np.int32, np.float64, np.int32, np.int32, np.float64]
    ids = np.arange(len(feature))
    inner = feature >= 0
    assert (feature < d).all() and (feature >= -1).all()
    assert (left[inner] > ids[inner]).all() and (right[inner] == left[inner] + 1).all()
    assert (left[~inner] == -1).all() and (right[~inner] == -1).all() and (threshold[~inner] == 0).all()
    depth = np.zeros(len(feature), np.int64)
    for node in ids[inner]:
        depth[left[node]] = depth[right[node]] = depth[node] + 1
    assert depth.max() <= max_depth
    assert (value == np.round(value)).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("n", "d", "max_depth", "mtry"),
    [(1, 3, 5, 2), (2, 1, 3, 1), (300, 5, 0, 2), (300, 5, 1, 5), (500, 7, 6, 3), (800, 4, 30, 4)],
)
def test_tree_fit_cpu_grows_the_reference_tree(dtype: type, n: int, d: int, max_depth: int, mtry: int) -> None:
    x, y = labelled(n, d, dtype, seed=n)
    if n > 10:
        x[: n // 3, 0] = 0.25  # ties in a split feature
        x[:, d - 1] = 1.0 if d > 1 else x[:, d - 1]  # a constant feature
    ref, cpu = both("tree_fit", (x, y, 1234 + n, max_depth, mtry))
    assert_same(ref, cpu)
    check_tree_shape(cpu, d, max_depth)
    assert_same(*both("tree_predict", (*cpu, x)))


def test_tree_fit_is_a_function_of_its_seed_and_learns() -> None:
    x, y = labelled(2000, 6, np.float32, seed=3)
    first = kernels.run("tree_fit", "cpu", (x, y, 7, 20, 6))
    assert_same(first, kernels.run("tree_fit", "cpu", (x, y, 7, 20, 6)))
    other = kernels.run("tree_fit", "cpu", (x, y, 8, 20, 6))
    assert len(other[0]) != len(first[0]) or not np.array_equal(other[1], first[1])
    accuracy = (kernels.run("tree_predict", "cpu", (*first, x)) == y).mean()
    assert accuracy > 0.95  # a deep tree fits its (bootstrap of the) training data


def test_pure_node_and_single_class_give_a_single_leaf() -> None:
    x, _ = labelled(50, 3, np.float64)
    y = np.full(50, 2, np.int64)
    for backend in ("scalar", "cpu"):
        feature, _thr, _left, _right, value = kernels.run("tree_fit", backend, (x, y, 1, 10, 3))
        assert feature.tolist() == [-1] and value.tolist() == [2.0]


def test_tree_draws_follow_splitmix64() -> None:
    # the published first output of SplitMix64 seeded with 1234567 (Vigna's reference code)
    assert ml_data.splitmix64(1, 1234567) == 6457827717110365317
    counters = np.arange(1, 6, dtype=np.uint64)
    assert ml_data.splitmix64(counters, 99).tolist() == [ml_data.splitmix64(int(c), 99) for c in counters]


# -- the MLP ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "d", "h", "c"), [(0, 3, 4, 2), (1, 2, 3, 2), (129, 5, 7, 3), (3000, 9, 17, 4)])
def test_mlp_grad_cpu_matches_reference(dtype: type, n: int, d: int, h: int, c: int) -> None:
    params = mlp_params(d, h, c, seed=n)
    x, y = labelled(n, d, dtype, classes=c, seed=n)
    ref, cpu = both("mlp_grad", (*params, x, y))
    assert isinstance(cpu[0], float)
    np.testing.assert_allclose(cpu[0], ref[0], rtol=1e-12, atol=1e-12)
    for got, want, w in zip(cpu[1:], ref[1:], params, strict=True):
        assert got.dtype == np.float64 and got.shape == w.shape
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-11 * max(1, n))


def test_mlp_grad_reference_matches_finite_differences() -> None:
    params = mlp_params(3, 4, 3, seed=5)
    x, y = labelled(20, 3, np.float64, classes=3, seed=5)
    loss, *grads = kernels.run("mlp_grad", "scalar", (*params, x, y))
    eps = 1e-6
    for which, grad in enumerate(grads):
        for index in np.ndindex(grad.shape):
            bumped = [p.copy() for p in params]
            bumped[which][index] += eps
            up = kernels.run("mlp_grad", "scalar", (*bumped, x, y))[0]
            bumped[which][index] -= 2 * eps
            down = kernels.run("mlp_grad", "scalar", (*bumped, x, y))[0]
            assert abs((up - down) / (2 * eps) - grad[index]) < 1e-6 * max(1.0, abs(loss))


# -- generated data and the *_synth kernels -----------------------------------------------


@pytest.mark.parametrize(("start", "rows"), [(0, 0), (0, 1), (5, 1023), (1000, 1025)])
def test_generators_agree_in_every_bit_and_do_not_depend_on_chunking(start: int, rows: int) -> None:
    rng = np.random.default_rng(0)
    centers, coef, weights = rng.standard_normal((3, 5)), rng.standard_normal(6), rng.standard_normal((4, 3))
    seed = np.uint64(77)
    assert_same(ml_data.blobs(77, start, rows, centers, 0.5), ml_data.blobs_numba(seed, start, rows, centers, 0.5))
    assert_same(ml_data.regression(77, start, rows, coef, 0.1), ml_data.regression_numba(seed, start, rows, coef, 0.1))
    assert_same(ml_data.teacher(77, start, rows, weights, 0.3), ml_data.teacher_numba(seed, start, rows, weights, 0.3))
    half = rows // 2
    split = np.concatenate(
        [ml_data.blobs(77, start, half, centers, 0.5), ml_data.blobs(77, start + half, rows - half, centers, 0.5)]
    )
    assert_same(split, ml_data.blobs(77, start, rows, centers, 0.5))
    noise = ml_data.noise(77, start, rows, 6, 0, 6)
    assert noise.size == 0 or (noise.min() > -1 and noise.max() < 1)


def test_synth_kernels_equal_the_plain_kernels_on_the_generated_rows() -> None:
    rng = np.random.default_rng(1)
    centers, centroids = rng.standard_normal((4, 5)) * 4, rng.standard_normal((3, 5))
    args = (11, 100, 700, centers, 1.0, centroids)
    ref, cpu = both("kmeans_partial_synth", args)
    assert_same(ref, cpu)
    assert_same(cpu, kernels.run("kmeans_partial", "cpu", (ml_data.blobs(11, 100, 700, centers, 1.0), centroids)))

    coef = rng.standard_normal(9)
    ref, cpu = both("linreg_partial_synth", (11, 5, 600, coef, 0.1))
    plain = kernels.run("linreg_partial", "cpu", ml_data.regression(11, 5, 600, coef, 0.1))
    assert_same(cpu, plain)
    np.testing.assert_allclose(cpu[0], ref[0], rtol=0, atol=1e-9)

    weights = rng.standard_normal((6, 3))
    ref, cpu = both("tree_fit_synth", (11, 500, 200, weights, 0.3, 99, 8, 3))
    assert_same(ref, cpu)
    x, y = ml_data.teacher(11, 0, 500, weights, 0.3)
    test, _ = ml_data.teacher(11, 500, 200, weights, 0.3)
    tree = kernels.run("tree_fit", "cpu", (x, y, 99, 8, 3))
    assert_same(cpu, (*tree, kernels.run("tree_predict", "cpu", (*tree, test))))

    params = mlp_params(6, 5, 3)
    ref, cpu = both("mlp_grad_synth", (*params, 11, 3, 400, weights, 0.3))
    x, y = ml_data.teacher(11, 3, 400, weights, 0.3)
    assert_same(cpu, kernels.run("mlp_grad", "cpu", (*params, x, y)))
    np.testing.assert_allclose(cpu[0], ref[0], rtol=1e-12)


# -- inputs -------------------------------------------------------------------------------

X = blob_rows(10, 3, np.float64)
Y = np.arange(10, dtype=np.int64) % 3
TREE = kernels.run("tree_fit", "scalar", (X, Y, 1, 3, 2))
P = mlp_params(3, 4, 3)
BAD_CALLS = [
    ("kmeans_partial", (X[:, :2].T, np.zeros((2, 10))), "not contiguous"),
    ("kmeans_partial", (X, np.zeros((2, 4))), "expected (k >= 1, 3)"),
    ("kmeans_partial", (X, np.zeros((0, 3))), "expected (k >= 1, 3)"),
    ("kmeans_partial", (X.astype(np.int64), np.zeros((2, 3))), "dtype int64"),
    ("kmeans_partial", (np.full((2, 3), np.nan), np.zeros((2, 3))), "NaN or inf"),
    ("kmeans_partial", (np.zeros((4, 0)), np.zeros((2, 0))), "no columns"),
    ("linreg_partial", (X, np.zeros(9)), "9 values for 10 rows"),
    ("linreg_partial", (X, np.zeros(10, np.float32)), "is float32 but 'x' is float64"),
    ("linreg_partial", (X, np.array([np.inf] * 10)), "NaN or inf"),
    ("tree_fit", (X, Y.astype(np.float64), 1, 3, 2), "1-D integer array"),
    ("tree_fit", (X, Y - 1, 1, 3, 2), "labels outside"),
    ("tree_fit", (X, Y[:5], 1, 3, 2), "5 labels for 10 rows"),
    ("tree_fit", (X, Y, 1, 3, 4), "<= 3"),
    ("tree_fit", (X, Y, -1, 3, 2), "must be >= 0"),
    ("tree_fit", (X, Y, 1.5, 3, 2), "must be an int"),
    ("tree_fit", (X[:0], Y[:0], 1, 3, 2), "has 0 rows"),
    ("tree_predict", (*TREE[:4], TREE[4].astype(np.float32), X), "1-D float64 array"),
    ("tree_predict", (*TREE, np.ascontiguousarray(X[:, :1])), "malformed"),
    ("tree_predict", (TREE[0], TREE[1], np.zeros_like(TREE[2]), TREE[3], TREE[4], X), "malformed"),
    ("mlp_grad", (P[0][:2], *P[1:], X, Y), "expected (3, hidden >= 1)"),
    ("mlp_grad", (P[0], P[1][:2], *P[2:], X, Y), "'b1' has shape (2,)"),
    ("mlp_grad", (*P[:2], np.ascontiguousarray(P[2][:, :1]), P[3], X, Y), "classes >= 2"),
    ("mlp_grad", (*P, X, Y + 1), "labels outside [0, 3)"),
    ("kmeans_partial_synth", (1, -1, 10, np.zeros((2, 3)), 1.0, np.zeros((2, 3))), "'start' must be >= 0"),
    ("kmeans_partial_synth", (1, 0, 10, np.zeros((2, 3)), -1.0, np.zeros((2, 3))), "'spread' must be >= 0"),
    ("kmeans_partial_synth", (1, 0, 10, np.zeros((2, 3)), 1.0, np.zeros((2, 4))), "4 columns but the data has 3"),
    ("linreg_partial_synth", (1, 2**61, 10, np.zeros(3), 0.1), "exceed the generator"),
    ("tree_fit_synth", (1, 0, 10, np.zeros((3, 2)), 0.1, 1, 3, 2), "'n_train' must be >= 1"),
    ("tree_fit_synth", (1, 10, 10, np.zeros((3, 1)), 0.1, 1, 3, 2), "one per class"),
    ("mlp_grad_synth", (*P, 1, 0, 10, np.zeros((3, 4)), 0.1), "3 columns but the data set has 4 classes"),
]


@pytest.mark.parametrize(("name", "args", "expected"), BAD_CALLS, ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD_CALLS)])
def test_bad_inputs_raise_one_line_errors(name: str, args: tuple[object, ...], expected: str) -> None:
    for backend in ("scalar", "cpu"):
        with pytest.raises(KernelInputError) as caught:
            kernels.run(name, backend, args)
        message = str(caught.value)
        assert expected in message, message
        assert f"'{name}'" in message and "\n" not in message


def test_read_only_inputs_from_the_wire_are_accepted() -> None:
    """Decoded arrays are read-only views. Parameters, labels and the data of tree_fit and
    mlp_grad are widened to writable arrays (one compiled signature); kmeans_partial's data
    are used as they are (a read-only signature of its own), as are linreg_partial's."""
    x, y = labelled(50, 3, np.float64)
    params = [*mlp_params(3, 4, 3), np.zeros((2, 3))]
    for array in (x, y, *params):
        array.setflags(write=False)
    writable = [np.array(a) for a in (x, y, *params)]
    assert_same(
        kernels.run("kmeans_partial", "cpu", (x, params[4])),
        kernels.run("kmeans_partial", "cpu", (writable[0], writable[6])),
    )
    assert_same(
        kernels.run("tree_fit", "cpu", (x, y, 1, 3, 2)), kernels.run("tree_fit", "cpu", (*writable[:2], 1, 3, 2))
    )
    assert_same(
        kernels.run("mlp_grad", "cpu", (*params[:4], x, y)),
        kernels.run("mlp_grad", "cpu", (*writable[2:6], *writable[:2])),
    )
    assert_same(
        kernels.run("linreg_partial", "cpu", (x, x[:, 0].copy())),
        kernels.run("linreg_partial", "cpu", (writable[0], writable[0][:, 0].copy())),
    )


# -- thread counts, and the CUDA variants in subprocesses --------------------------------


def run_python(code: str, env: dict[str, str], timeout: float = 240) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


THREADS_PROBE = """
    import hashlib, json
    import numpy as np
    from batuta import kernels
    from batuta.kernels import ml_data
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((5000, 7)) * 3).astype(np.float32)
    y = rng.integers(0, 3, 5000)
    w = [rng.standard_normal(s) * 0.3 for s in ((7, 9), (9,), (9, 3), (3,))]
    out = [
        kernels.run("kmeans_partial", "cpu", (x, rng.standard_normal((5, 7)))),
        kernels.run("linreg_partial", "cpu", (x, x[:, 0].copy())),
        kernels.run("mlp_grad", "cpu", (*w, x, y)),
        ml_data.teacher_numba(np.uint64(5), 3, 3000, rng.standard_normal((7, 3)), 0.2),
    ]
    digest = hashlib.sha256()
    for item in out:
        for part in item:
            digest.update(np.asarray(part).tobytes())
    print(json.dumps({"digest": digest.hexdigest()}))
"""


def test_cpu_results_do_not_depend_on_the_thread_count() -> None:
    one = run_python(THREADS_PROBE, {"NUMBA_NUM_THREADS": "1"})
    two = run_python(THREADS_PROBE, {"NUMBA_NUM_THREADS": "2"})
    assert one == two


GPU_PROBE = """
    import json
    import numpy as np
    from batuta import kernels
    rng = np.random.default_rng(0)
    n, d = {n}, {d}
    worst = {{}}
    def record(name, got, want):
        diffs = [np.abs(np.asarray(g, float) - np.asarray(w, float)) for g, w in zip(got, want)]
        diff = max(float(np.max(v, initial=0.0)) for v in diffs)
        worst[name] = max(worst.get(name, 0.0), diff)
    for dtype in (np.float32, np.float64):
        x = (rng.standard_normal((n, d)) * 3).astype(dtype)
        c = rng.standard_normal((5, d))
        got, want = kernels.run("kmeans_partial", "gpu", (x, c)), kernels.reference("kmeans_partial", (x, c))
        assert np.array_equal(got[1], want[1]), "counts"
        record("kmeans_partial", got, want)
        y = rng.standard_normal(n).astype(dtype)
        got, want = kernels.run("linreg_partial", "gpu", (x, y)), kernels.reference("linreg_partial", (x, y))
        record("linreg_partial", got, want)
    # Each kernel shape: rows of <= 16 and <= 32 features (rows in registers), more features,
    # and k x d over what shared memory holds (the plain kernel).
    for features, k in ((3, 7), (d, 5), (16, 64), (20, 9), (40, 3), (30, 70)):
        x = (rng.standard_normal((n, features)) * 3).astype(np.float32)
        c = rng.standard_normal((k, features))
        got = kernels.run("kmeans_partial", "gpu", (x, c))
        want = kernels.reference("kmeans_partial", (x, c))
        assert np.array_equal(got[1], want[1]), ("counts", features, k)
        record(f"kmeans_partial_{{features}}x{{k}}", got, want)
    empty = kernels.run("kmeans_partial", "gpu", (np.zeros((0, d)), np.zeros((2, d))))
    assert empty[1].sum() == 0 and empty[2] == 0.0
    centers = rng.standard_normal((3, d)) * 4
    args = (7, 11, n, centers, 1.0, rng.standard_normal((4, d)))
    got, want = kernels.run("kmeans_partial_synth", "gpu", args), kernels.reference("kmeans_partial_synth", args)
    record("kmeans_partial_synth", got, want)
    args = (7, 11, n, rng.standard_normal(d), 0.1)
    got, want = kernels.run("linreg_partial_synth", "gpu", args), kernels.reference("linreg_partial_synth", args)
    record("linreg_partial_synth", got, want)
    h, classes = 20, 4
    params = (
        rng.standard_normal((d, h)) * 0.4,
        rng.standard_normal(h) * 0.1,
        rng.standard_normal((h, classes)) * 0.4,
        rng.standard_normal(classes) * 0.1,
    )
    for dtype in (np.float32, np.float64):
        x = rng.standard_normal((n, d)).astype(dtype)
        labels = rng.integers(0, classes, n)
        call = (*params, x, labels)
        got, want = kernels.run("mlp_grad", "gpu", call), kernels.reference("mlp_grad", call)
        assert all(np.shape(g) == np.shape(w) for g, w in zip(got, want)), "shapes"
        record("mlp_grad", got, want)
    args = (*params, 7, 11, n, rng.standard_normal((d, classes)), 0.2)
    got, want = kernels.run("mlp_grad_synth", "gpu", args), kernels.reference("mlp_grad_synth", args)
    record("mlp_grad_synth", got, want)
    # The synth variants make their rows on the device: the same bits as ml_data's.
    from batuta.kernels import cuda_data, cuda_support, ml_data
    cuda = cuda_support.cuda()
    recipe = rng.standard_normal((3, d)) * 4
    made = cuda_data.blobs(cuda, 5, 2**40, n, recipe, 1.3).copy_to_host()
    assert np.array_equal(made, ml_data.blobs(5, 2**40, n, recipe, 1.3)), "generated blobs differ"
    for made, want in (
        (cuda_data.regression(cuda, 5, 9, n, recipe[0], 0.1), ml_data.regression(5, 9, n, recipe[0], 0.1)),
        (cuda_data.teacher(cuda, 5, 9, n, recipe.T.copy(), 0.2), ml_data.teacher(5, 9, n, recipe.T.copy(), 0.2)),
    ):
        assert all(np.array_equal(m.copy_to_host(), w) for m, w in zip(made, want)), "generated rows differ"
    on_device = (7, 11, n, cuda.to_device(centers), 1.0, cuda.to_device(rng.standard_normal((4, d))))
    kept = kernels.run("kmeans_partial_synth", "gpu", on_device, device_results=True)
    assert kernels.is_device_array(kept[0]) and kernels.is_device_array(kept[1])
    huge = np.full((4, 2), 1e200)
    try:
        kernels.run("linreg_partial", "gpu", (huge, huge[:, 0].copy()))
    except kernels.KernelInputError as exc:
        assert "X^T X or X^T y overflows float64" in str(exc), str(exc)
    else:
        raise AssertionError("the GPU variant's overflow was not said")
    for name, call in (
        ("kmeans_partial", (huge, np.zeros((2, 2)))),
        ("kmeans_partial_synth", (1, 0, 8, np.full((2, 2), 1e39), 0.1, np.zeros((2, 2)))),
    ):
        try:
            kernels.run(name, "gpu", call)
        except kernels.KernelInputError as exc:
            assert "the sums or the inertia overflow" in str(exc), str(exc)
        else:
            raise AssertionError(f"the GPU variant's overflow was not said ({{name}})")
    empty = kernels.run("mlp_grad", "gpu", (*params, np.zeros((0, d)), np.zeros(0, np.int64)))
    assert empty[0] == 0.0 and all(not np.any(g) for g in empty[1:])
    print(json.dumps(worst))
"""


def test_cuda_variants_under_the_simulator() -> None:
    worst = run_python(GPU_PROBE.format(n=40, d=17), {"NUMBA_ENABLE_CUDASIM": "1"})
    kmeans_shapes = {f"kmeans_partial_{shape}" for shape in ("3x7", "17x5", "16x64", "20x9", "40x3", "30x70")}
    synth = {"kmeans_partial_synth", "linreg_partial_synth", "mlp_grad_synth"}
    assert set(worst) == {"kmeans_partial", "linreg_partial", "mlp_grad"} | synth | kmeans_shapes
    assert all(float(v) < 1e-9 for v in worst.values()), worst


@pytest.mark.skipif(os.environ.get("BATUTA_REAL_GPU") != "1", reason="set BATUTA_REAL_GPU=1 on a host with a GPU")
def test_cuda_variants_on_a_real_gpu() -> None:
    worst = run_python(GPU_PROBE.format(n=200_003, d=33), {"NUMBA_ENABLE_CUDASIM": "0"})
    print(f"\nGPU variants, worst |gpu - reference|: {worst}")
    scale = 200_003 * 9 * 3  # sums of ~n values of size ~3, squared for X^T X
    assert all(float(v) < 1e-9 * scale for v in worst.values()), worst
