"""The streaming and linear-algebra kernels (dot, histogram, matmul, pairwise_distances) on the
scalar and CPU backends against independent references, their input validation, the
registry's complexity field, and what GPU variants do on a host without a GPU.

GPU variants themselves are checked in test_kernels_cuda.py (simulator or real GPU).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from batuta.kernels import KernelDefinitionError, KernelInputError, basic, stream

from batuta import kernels

DTYPES = [np.float32, np.float64]
BACKENDS = ["scalar", "cpu"]
P = basic.PARALLEL_MIN_SIZE
SIZES = [0, 1, 2, 7, P - 1, P, 3 * P + 5]


def _vectors(n: int, dtype: type, count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(n) * 10).astype(dtype) for _ in range(count)]


def _matrix(rows: int, cols: int, dtype: type, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(dtype)


# -- the registry -------------------------------------------------------------------------


def test_library_kernels_are_registered_with_all_three_backends_and_their_complexity() -> None:
    expected = {
        "vadd": "linear",
        "saxpy": "linear",
        "sum": "linear",
        "mc_pi": "linear",
        "dot": "linear",
        "histogram": "linear",
        "matmul": "cubic",
        "pairwise_distances": "quadratic",
    }
    for name, complexity in expected.items():
        found = kernels.info(name)
        assert found.backends == ("scalar", "cpu", "gpu"), name
        assert found.complexity == complexity, name
        assert found.description
    assert kernels.info("histogram").params == ("x", "bins", "lo", "hi")
    assert kernels.info("noop").complexity == "linear"  # the default


def test_the_built_ins_that_are_pure_say_so() -> None:
    """`pure` (equal arguments, equal result) lets a job journal share results by content."""
    pure = {
        name for name in kernels.names() if kernels.info(name).pure and kernels.info(name).module.startswith("batuta.")
    }
    assert pure == {
        "noop", "vadd", "saxpy", "sum", "mc_pi", "dot", "histogram", "matmul", "pairwise_distances",
        "kmeans_partial", "linreg_partial", "tree_fit", "tree_predict", "mlp_grad",
        "kmeans_partial_synth", "linreg_partial_synth", "tree_fit_synth", "mlp_grad_synth",
    }  # fmt: skip
    assert not kernels.info("spin").pure  # it measures time

    @kernels.kernel("test_declared_pure", pure=True)
    def declared(x: object) -> object:
        return x

    try:
        assert kernels.info("test_declared_pure").pure
    finally:
        kernels.unregister("test_declared_pure")


def test_unknown_complexity_is_a_definition_error() -> None:
    with pytest.raises(KernelDefinitionError, match="complexity 'exponential' is not one of linear, quadratic, cubic"):

        @kernels.kernel("test_bad_complexity", complexity="exponential")
        def bad(x: object) -> object:
            return x

    assert "test_bad_complexity" not in kernels.names()


# -- dot ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_dot_within_documented_tolerance(backend: str, dtype: type, n: int) -> None:
    x, y = _vectors(n, dtype, 2)
    x += 1  # a nonzero mean, so the sum is not only cancellation
    result = kernels.run("dot", backend, (x, y))
    assert type(result) is float
    products = x.astype(np.float64) * y.astype(np.float64)  # exact for float32 inputs
    bound = 2 * (n + 1) * 2.0**-53 * float(np.sum(np.abs(products)))
    assert abs(result - math.fsum(products.tolist())) <= bound


@pytest.mark.parametrize("n", [5, 3 * P + 5])
def test_dot_propagates_nan_and_inf(n: int) -> None:
    x, y = np.ones(n, np.float32), np.ones(n, np.float32)
    x[n // 2] = np.nan
    assert math.isnan(kernels.run("dot", "cpu", (x, y)))
    x[n // 2] = np.inf
    assert kernels.run("dot", "cpu", (x, y)) == math.inf


def test_dot_of_float32_products_is_not_rounded_to_float32() -> None:
    x = np.full(4, 1 + 2.0**-12, np.float32)  # x * x needs 25 bits: float32 would round it
    exact = 4 * (1 + 2.0**-12) ** 2
    for backend in BACKENDS:
        assert kernels.run("dot", backend, (x, x)) == exact


# -- histogram ----------------------------------------------------------------------------


def _adversarial(dtype: type, bins: int, lo: float, hi: float, n_random: int, seed: int = 1) -> np.ndarray:
    """Values on, just below and just above every edge, out of range, NaN and inf, plus noise."""
    edges: np.ndarray = np.linspace(dtype(lo), dtype(hi), bins + 1, dtype=dtype)
    special: np.ndarray = np.array([np.nan, np.inf, -np.inf, lo - 1, hi + 1, lo, hi], dtype)
    noise: np.ndarray = np.random.default_rng(seed).uniform(lo - 0.5, hi + 0.5, n_random).astype(dtype)
    parts = [edges, np.nextafter(edges, dtype(-np.inf)), np.nextafter(edges, dtype(np.inf)), special, noise]
    return np.random.default_rng(seed).permutation(np.concatenate(parts))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("bins", "lo", "hi"), [(1, 0.0, 1.0), (10, -1.5, 2.0), (7, 0.1, 0.7), (1000, -3.3, 1e4)])
def test_histogram_matches_numpy_exactly(backend: str, dtype: type, bins: int, lo: float, hi: float) -> None:
    x = _adversarial(dtype, bins, lo, hi, 5000)
    counts = kernels.run("histogram", backend, (x, bins, lo, hi))
    expected = np.histogram(x, bins, range=(dtype(lo), dtype(hi)))[0]
    assert counts.dtype == np.int64
    assert counts.shape == (bins,)
    np.testing.assert_array_equal(counts, expected)
    assert counts.sum() == np.count_nonzero((x >= dtype(lo)) & (x <= dtype(hi)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 7, stream._HIST_CHUNK - 1, 3 * stream._HIST_CHUNK + 5])
def test_histogram_cpu_chunking_is_exact(dtype: type, n: int) -> None:
    (x,) = _vectors(n, dtype, 1, seed=n)
    for bins in (3, 4096):
        counts = kernels.run("histogram", "cpu", (x, bins, -20, 25))
        np.testing.assert_array_equal(counts, np.histogram(x, bins, range=(dtype(-20), dtype(25)))[0])


def test_histogram_takes_lo_and_hi_in_the_arrays_dtype() -> None:
    # float32(0.7) < 0.7: compared with a float64 lo it would be dropped; with lo in float32
    # (as saxpy's alpha is taken) it is the first bin's left edge.
    x = np.array([np.float32(0.7), np.float32(0.9)], np.float32)
    assert float(x[0]) < 0.7
    for backend in BACKENDS:
        np.testing.assert_array_equal(kernels.run("histogram", backend, (x, 2, 0.7, 0.9)), [1, 1])


# -- matmul -------------------------------------------------------------------------------

MATMUL_SHAPES = [(0, 3, 4), (3, 0, 4), (3, 4, 0), (1, 1, 1), (5, 9, 7), (64, 33, 65), (130, 17, 129)]


def _assert_matmul_close(result: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    exact = a.astype(np.float64) @ b.astype(np.float64)
    scale = np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64)
    bound = 2 * (a.shape[1] + 1) * np.finfo(a.dtype).eps * scale
    assert np.all(np.abs(result - exact) <= bound)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "k", "n"), MATMUL_SHAPES)
def test_matmul(backend: str, dtype: type, m: int, k: int, n: int) -> None:
    a, b = _matrix(m, k, dtype, 1), _matrix(k, n, dtype, 2)
    result = kernels.run("matmul", backend, (a, b))
    assert result.dtype == dtype
    assert result.shape == (m, n)
    _assert_matmul_close(result, a, b)


# -- pairwise distances -------------------------------------------------------------------

PAIRWISE_SHAPES = [(0, 3, 2), (3, 0, 2), (3, 4, 0), (1, 1, 1), (7, 5, 3), (65, 33, 17), (130, 9, 11)]


def _assert_distances_close(result: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    diff = x.astype(np.float64)[:, None, :] - y.astype(np.float64)[None, :, :]
    exact = np.sqrt(np.sum(diff * diff, axis=-1))
    bound = (x.shape[1] + 3) * np.finfo(x.dtype).eps * exact
    assert np.all(np.abs(result - exact) <= bound)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "m", "d"), PAIRWISE_SHAPES)
def test_pairwise_distances(backend: str, dtype: type, n: int, m: int, d: int) -> None:
    x, y = _matrix(n, d, dtype, 3), _matrix(m, d, dtype, 4)
    result = kernels.run("pairwise_distances", backend, (x, y))
    assert result.dtype == dtype
    assert result.shape == (n, m)
    _assert_distances_close(result, x, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pairwise_distance_of_a_point_to_itself_is_zero(backend: str) -> None:
    x = _matrix(9, 5, np.float32, 5) * 1e3
    assert np.all(np.diag(kernels.run("pairwise_distances", backend, (x, x))) == 0)


@pytest.mark.parametrize("backend", ["scalar", "cpu"])
@pytest.mark.parametrize("scale", [1e19, 1e-25], ids=["squares-past-float32", "squares-under-float32"])
def test_float32_distances_whose_squares_leave_float32_are_right_on_the_cpu(backend: str, scale: float) -> None:
    """The reference (AUTO's pick under 1,000 elements) summed float32 squares: distances of
    4.8e19 came out inf, and 5e-25 came out 0, where the CPU variant was right."""
    x = (_matrix(10, 3, np.float64, 8) * scale).astype(np.float32)
    y = (_matrix(5, 3, np.float64, 9) * scale).astype(np.float32)
    result = kernels.run("pairwise_distances", backend, (x, y))
    assert np.all(np.isfinite(result)) and np.all(result > 0)
    _assert_distances_close(result, x, y)


def test_pairwise_reference_works_in_blocks() -> None:
    x, y = _matrix(50, 3, np.float64, 6), _matrix(40, 3, np.float64, 7)
    old = kernels.linalg._REFERENCE_BLOCK_BYTES
    try:
        kernels.linalg._REFERENCE_BLOCK_BYTES = 7 * y.nbytes  # blocks of 7 rows, the last one short
        _assert_distances_close(kernels.reference("pairwise_distances", (x, y)), x, y)
    finally:
        kernels.linalg._REFERENCE_BLOCK_BYTES = old


# -- reusable output loops ----------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 7, 3 * P + 5])
def test_into_loops_fill_a_given_output(n: int) -> None:
    a, b = _vectors(n, np.float32, 2)
    out = np.full(n, np.nan, np.float32)
    basic._vadd_loop(a, b, out)
    np.testing.assert_array_equal(out, a + b)
    basic._saxpy_loop(np.float32(2), a, b, out)
    np.testing.assert_array_equal(out, kernels.run("saxpy", "cpu", (2.0, a, b)))


def test_cpu_benchmark_smoke_run(repo_root: Path) -> None:
    done = subprocess.run(
        [sys.executable, "bench/cpu_kernels.py", "--smoke"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    found = json.loads(done.stdout.splitlines()[-1])
    assert found["numba_threads"] == 2
    # Timings at smoke sizes on a shared 2-core machine mean nothing: check the output's shape.
    assert isinstance(found["vadd_over_numpy"], float)
    assert isinstance(found["vadd_fraction_of_copy_bandwidth"], float)


# -- validation ---------------------------------------------------------------------------

F32, F64 = np.ones(4, np.float32), np.ones(4, np.float64)
M32, M64 = np.ones((3, 4), np.float32), np.ones((4, 2), np.float64)

BAD_CALLS = [
    ("dot", (F64,), "'dot' takes 2 argument(s), got 1; call it as dot(x, y)"),
    ("dot", (F32, F64), "argument 'y' is float64 but 'x' is float32; cast one"),
    ("dot", (F64, np.ones(5)), "argument 'y' has shape (5,) but 'x' has (4,)"),
    ("dot", (np.arange(4), F64), "argument 'x' has dtype int64; pass float32 or float64"),
    ("dot", (np.ones(8)[::2], F64), "argument 'x' is not contiguous"),
    ("histogram", (M32, 3, 0.0, 1.0), "argument 'x' is 2-D (shape (3, 4)); pass 1-D, e.g. x.ravel()"),
    ("histogram", (F32, 0, 0.0, 1.0), "argument 'bins' must be >= 1"),
    ("histogram", (F32, 2.0, 0.0, 1.0), "argument 'bins' must be an int"),
    ("histogram", (F32, 2**30, 0.0, 1.0), "argument 'bins' must be >= 1 and <= 16777216"),
    ("histogram", (F32, 3, 1.0, 1.0), "argument 'hi' must be greater than 'lo' in x's dtype float32"),
    ("histogram", (F32, 3, 2.0, 1.0), "argument 'hi' must be greater than 'lo'"),
    ("histogram", (F32, 3, 1.0, 1.00000001), "(got lo=np.float32(1.0), hi=np.float32(1.0))"),
    ("histogram", (F32, 3, math.nan, 1.0), "argument 'lo' must be finite"),
    ("histogram", (F32, 3, 0.0, math.inf), "argument 'hi' must be finite"),
    ("histogram", (F32, 3, 0.0, 1e39), "arguments 'lo', 'hi' overflow float32; pass a smaller range"),
    ("histogram", (F32, 3, "0", 1.0), "argument 'lo' must be a real number"),
    ("matmul", (M32, M32), "argument 'b' has 3 rows but 'a' has 4 columns (shapes (3, 4) and (3, 4))"),
    ("matmul", (M32, M64), "argument 'b' is float64 but 'a' is float32; cast one"),
    (
        "matmul",
        (F32, M32),
        "argument 'a' is 1-D (shape (4,)); pass 2-D (rows, columns), e.g. a.reshape(-1, 1) "
        "for 4 rows of 1, or a.reshape(1, -1) for 1 row of 4",
    ),
    (
        "matmul",
        (np.ones((2, 3, 4)), M64),
        "argument 'a' is 3-D (shape (2, 3, 4)); pass 2-D (rows, columns), e.g. a.reshape(-1, 4) for 6 rows of 4",
    ),
    ("matmul", (np.ones(()), M64), "argument 'a' is 0-D (shape ()); pass 2-D (rows, columns), e.g. a.reshape(1, 1)"),
    ("matmul", (M64, M64.T), "argument 'b' is not contiguous (a strided view); pass np.ascontiguousarray(b)"),
    ("matmul", (np.ones((2, 2), np.int32), np.ones((2, 2))), "argument 'a' has dtype int32"),
    ("matmul", ([[1.0]], [[1.0]]), "argument 'a' is a list, not a NumPy array"),
    ("pairwise_distances", (M32, np.ones((2, 3), np.float32)), "argument 'y' has 3 columns but 'x' has 4"),
    ("pairwise_distances", (M32, F32), "argument 'y' is 1-D (shape (4,)); pass 2-D (rows, columns), e.g. y.reshape("),
    ("pairwise_distances", (M32, M32.astype(np.float64)), "argument 'y' is float64 but 'x' is float32"),
]


@pytest.mark.parametrize("backend", [*BACKENDS, "gpu"])
@pytest.mark.parametrize(("name", "args", "expected"), BAD_CALLS)
def test_bad_inputs_raise_one_line_errors_naming_kernel_and_argument(
    backend: str, name: str, args: tuple[object, ...], expected: str
) -> None:
    # Validation runs before any backend, so this holds for "gpu" on a host without a GPU too.
    with pytest.raises(KernelInputError) as caught:
        kernels.run(name, backend, args)
    message = str(caught.value)
    assert expected in message
    assert f"'{name}'" in message
    assert "\n" not in message


# -- GPU variants on a host without a GPU -------------------------------------------------

NO_GPU_PROBE = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from batuta import kernels
    from batuta.kernels import cuda_support
    assert "numba" not in sys.modules, "import must not load numba"
    errors = {}
    for name, args in [("vadd", (np.ones(3), np.ones(3))), ("matmul", (np.ones((2, 2)), np.ones((2, 2))))]:
        try:
            kernels.run(name, "gpu", args)
        except Exception as exc:
            errors[name] = [type(exc).__name__, isinstance(exc, RuntimeError), str(exc)]
    info = cuda_support.gpu_info()
    print(json.dumps({"errors": errors, "info": None if info is None else repr(info)}))
    """
)


@pytest.mark.skipif(os.environ.get("BATUTA_REAL_GPU") == "1", reason="this host has a GPU")
def test_gpu_variants_without_a_gpu_fail_clearly_and_gpu_info_is_none() -> None:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    done = subprocess.run(
        [sys.executable, "-c", NO_GPU_PROBE], capture_output=True, text=True, timeout=120, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.splitlines()[-1])
    if found["info"] is not None:
        pytest.skip(f"a GPU is visible here: {found['info']}")
    for name in ("vadd", "matmul"):
        kind, is_runtime_error, message = found["errors"][name]
        assert kind == "GpuUnavailableError"
        assert is_runtime_error  # a host problem, not a bad call: not a KernelCallError
        assert "run the kernel on the 'cpu' backend" in message
        assert "\n" not in message
