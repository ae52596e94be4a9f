"""Every GPU variant against its reference: under numba's CUDA simulator here, on a real GPU
with ``BATUTA_REAL_GPU=1``.

The checks (the ``check_*`` functions below) run in one subprocess for the whole module, so
``NUMBA_ENABLE_CUDASIM`` is set before numba.cuda is first imported and the pytest process
never imports it. Under the simulator every CUDA thread is a Python thread, so sizes are
small (the whole module takes well under a minute on 2 cores); on a real GPU they are larger
and include sizes that need many blocks and the edge tiles of the matmul kernel:

    BATUTA_REAL_GPU=1 .venv/bin/python -m pytest -q tests/test_kernels_cuda.py

`test_cuda_kernels_compile_for_sm90` compiles every kernel to PTX for an H100/H200 (and runs
ptxas, where the CUDA toolkit is installed, to check for register spills) without a GPU. It
needs NVVM and NVRTC, and is skipped where they are missing (as in CI).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
REAL_GPU = os.environ.get("BATUTA_REAL_GPU") == "1"
DTYPES = (np.float32, np.float64)

CHECKS: dict[str, Callable[[bool], None]] = {}


def _check(fn: Callable[[bool], None]) -> Callable[[bool], None]:
    CHECKS[fn.__name__.removeprefix("check_")] = fn
    return fn


# -- the checks (run in the subprocess) ----------------------------------------------------


def _stream_sizes(real: bool) -> list[int]:
    small = [0, 1, 7, 100, 1001]  # 1001 > the simulator's 2 x 32 threads: the grid-stride loop turns
    return [*small, 2**20 + 3, 3 * 10**6 + 1, 2**24 + 1] if real else small


def _vectors(n: int, dtype: type, count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(n) * 10).astype(dtype) for _ in range(count)]


def _run(name: str, args: tuple[object, ...]) -> Any:
    from batuta import kernels

    return kernels.run(name, "gpu", args)


@_check
def check_vadd(real: bool) -> None:
    for dtype in DTYPES:
        for n in _stream_sizes(real):
            a, b = _vectors(n, dtype, 2)
            result = _run("vadd", (a, b))
            assert result.dtype == dtype and result.shape == (n,)
            np.testing.assert_array_equal(result, a + b)
    a, b = _vectors(1001, np.float32, 2)
    a_ro, b_ro = np.frombuffer(a.tobytes(), np.float32), np.frombuffer(b.tobytes(), np.float32)
    assert not a_ro.flags.writeable  # as decoded from the wire, without a copy
    np.testing.assert_array_equal(_run("vadd", (a_ro, b_ro)), a + b)


@_check
def check_saxpy(real: bool) -> None:
    for dtype in DTYPES:
        for n in _stream_sizes(real):
            x, y = _vectors(n, dtype, 2)
            result = _run("saxpy", (1.7, x, y))
            assert result.dtype == dtype
            bound = 2 * np.finfo(dtype).eps * (np.abs(dtype(1.7) * x) + np.abs(y))  # fused or not
            assert np.all(np.abs(result - dtype(1.7) * x - y) <= bound)


@_check
def check_sum(real: bool) -> None:
    for dtype in DTYPES:
        for n in _stream_sizes(real):
            (x,) = _vectors(n, dtype, 1)
            x += 3
            result = _run("sum", (x,))
            assert type(result) is float
            bound = 2 * max(n - 1, 0) * 2.0**-53 * float(np.sum(np.abs(x), dtype=np.float64))
            assert abs(result - math.fsum(x.tolist())) <= bound, (dtype, n)
            assert _run("sum", (x,)) == result  # deterministic: no floating-point atomics
    x = np.ones(1001, np.float32)
    x[500] = np.nan
    assert math.isnan(_run("sum", (x,)))
    x[500] = np.inf
    assert _run("sum", (x,)) == math.inf


@_check
def check_dot(real: bool) -> None:
    for dtype in DTYPES:
        for n in _stream_sizes(real):
            x, y = _vectors(n, dtype, 2)
            products = x.astype(np.float64) * y.astype(np.float64)
            result = _run("dot", (x, y))
            bound = 2 * (n + 1) * 2.0**-53 * float(np.sum(np.abs(products)))
            assert abs(result - math.fsum(products.tolist())) <= bound, (dtype, n)
    x = np.full(4, 1 + 2.0**-12, np.float32)
    assert _run("dot", (x, x)) == 4 * (1 + 2.0**-12) ** 2  # products are not rounded to float32


@_check
def check_histogram(real: bool) -> None:
    from batuta.kernels import cuda_stream

    rng = np.random.default_rng(5)
    cases = [(1, 0.0, 1.0), (10, -1.5, 2.0), (7, 0.1, 0.7), (cuda_stream.HIST_SHARED_BINS + 1, -3.3, 4.0)]
    for dtype in DTYPES:
        for bins, lo, hi in cases:
            edges = np.linspace(dtype(lo), dtype(hi), bins + 1, dtype=dtype)
            special = np.array([np.nan, np.inf, -np.inf, lo - 1, hi + 1, lo, hi], dtype)
            noise = rng.uniform(lo - 0.5, hi + 0.5, 3 * 10**6 if real else 500).astype(dtype)
            parts = [edges, np.nextafter(edges, dtype(-np.inf)), np.nextafter(edges, dtype(np.inf)), special, noise]
            x = rng.permutation(np.concatenate(parts))
            counts = _run("histogram", (x, bins, lo, hi))
            assert counts.dtype == np.int64
            low, high = dtype(lo), dtype(hi)
            np.testing.assert_array_equal(counts, np.histogram(x, bins, range=(low, high))[0])  # type: ignore[arg-type]
    np.testing.assert_array_equal(_run("histogram", (np.zeros(0, np.float32), 3, 0, 1)), [0, 0, 0])


def _matmul_shapes(real: bool) -> list[tuple[int, int, int]]:
    # (130, 17, 129): 2 x 2 blocks with partial edge tiles and a partial last k stage.
    small = [(0, 3, 4), (3, 0, 4), (1, 1, 1), (5, 9, 7), (130, 17, 129)]
    return [*small, (1000, 1001, 999), (2048, 2048, 2048), (4097, 300, 129)] if real else small


@_check
def check_matmul(real: bool) -> None:
    for dtype in DTYPES:
        for m, k, n in _matmul_shapes(real):
            if not real and dtype is np.float64 and m > 100:
                continue  # the simulator's slowest case; the same code path ran in float32
            rng = np.random.default_rng(m + k + n)
            a = rng.standard_normal((m, k)).astype(dtype)
            b = rng.standard_normal((k, n)).astype(dtype)
            result = _run("matmul", (a, b))
            assert result.dtype == dtype and result.shape == (m, n)
            exact = a.astype(np.float64) @ b.astype(np.float64)
            scale = np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64)
            assert np.all(np.abs(result - exact) <= 2 * (k + 1) * np.finfo(dtype).eps * scale), (dtype, m, k, n)


@_check
def check_pairwise_distances(real: bool) -> None:
    shapes = [(0, 3, 2), (3, 4, 0), (1, 1, 1), (7, 5, 3), (130, 9, 11)]
    if real:
        shapes += [(1000, 999, 64), (4097, 130, 3)]
    for dtype in DTYPES:
        for n, m, d in shapes:
            if not real and dtype is np.float64 and n > 100:
                continue
            rng = np.random.default_rng(n + m + d)
            x = rng.standard_normal((n, d)).astype(dtype)
            y = rng.standard_normal((m, d)).astype(dtype)
            result = _run("pairwise_distances", (x, y))
            assert result.dtype == dtype and result.shape == (n, m)
            diff = x.astype(np.float64)[:, None, :] - y.astype(np.float64)[None, :, :]
            exact = np.sqrt(np.sum(diff * diff, axis=-1))
            assert np.all(np.abs(result - exact) <= (d + 3) * np.finfo(dtype).eps * exact), (dtype, n, m, d)
    x = np.random.default_rng(1).standard_normal((9, 5)).astype(np.float32)
    assert np.all(np.diag(_run("pairwise_distances", (x, x))) == 0)


def _mc_pi_model(samples: int, seed: int) -> float:
    """mc_pi's GPU estimate recomputed with NumPy: xoroshiro128+ per thread, as documented."""
    from batuta.kernels import cuda_stream
    from numba.cuda.random import create_xoroshiro128p_states

    blocks, threads = cuda_stream.mc_pi_launch(samples)
    total_threads = blocks * threads
    states = create_xoroshiro128p_states(total_threads, seed=seed).copy_to_host()
    s0, s1 = states["s0"].copy(), states["s1"].copy()

    def rotl(x: np.ndarray, k: int) -> np.ndarray:
        return (x << np.uint64(k)) | (x >> np.uint64(64 - k))

    def uniform(s0: np.ndarray, s1: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        result = s0 + s1
        t = s1 ^ s0
        return (result >> np.uint64(11)) * 2.0**-53, rotl(s0, 55) ^ t ^ (t << np.uint64(14)), rotl(t, 36)

    per_thread = -(-(samples - np.arange(total_threads)) // total_threads)  # ceil, >= 0
    hits = 0
    with np.errstate(over="ignore"):
        for round_ in range(int(per_thread.max())):
            x, s0, s1 = uniform(s0, s1)
            y, s0, s1 = uniform(s0, s1)
            hits += int(np.count_nonzero((x * x + y * y < 1.0) & (per_thread > round_)))
    return 4.0 * hits / samples


@_check
def check_mc_pi(real: bool) -> None:
    # Simulated threads are Python threads, and numba seeds each generator in Python there.
    for samples in [1000, 5001] + ([70_001, 10**8 + 7] if real else []):
        estimate = _run("mc_pi", (samples, 20261128))
        assert estimate == _run("mc_pi", (samples, 20261128))
        assert abs(estimate - math.pi) <= 5 * 1.642 / math.sqrt(samples)
        if samples < 10**6:  # the model is exact, and the same on every GPU and the simulator
            assert estimate == _mc_pi_model(samples, 20261128), samples
    assert _run("mc_pi", (300, 1)) != _run("mc_pi", (300, 2))


@_check
def check_mc_pi_says_nothing_of_its_generators_overflows(real: bool) -> None:
    # the simulator's uint64 wraps warned on every draw, filling the host's log
    from batuta.kernels import cuda_support

    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()  # each warning shown once, as in a host's slot: but for what batuta's
        cuda_support.cuda.cache_clear()  # first import of numba.cuda filters out
        cuda_support.cuda()
        _run("mc_pi", (500, 3))
    assert not [w for w in caught if "overflow" in str(w.message)], [str(w.message) for w in caught][:3]


@_check
def check_mc_pi_states_are_seeded_on_the_device_as_numba_seeds_them(real: bool) -> None:
    from batuta.kernels import cuda_random
    from numba.cuda.random import create_xoroshiro128p_states

    # On a GPU, mc_pi's most generators: every bit of the generator's index, so every power.
    # 2**63 - 1: numba's own seeding on a GPU host refuses seeds past int64 ("int too big to convert")
    cases = [(1, 5), (7, 20261128), (130, 2**63 - 1)] + ([(262_144, 3), (100_003, 20261128)] if real else [])
    for n, seed in cases:
        ours = cuda_random.seeded_states(n, seed).copy_to_host()
        numbas = create_xoroshiro128p_states(n, seed=seed).copy_to_host()
        assert np.array_equal(ours["s0"], numbas["s0"]) and np.array_equal(ours["s1"], numbas["s1"]), (n, seed)


@_check
def check_gpu_info(real: bool) -> None:
    from batuta.kernels import cuda_support

    info = cuda_support.gpu_info()
    assert info is not None
    assert info.simulated is not real
    assert info.capacity >= 1 and info.device_name
    if real:
        assert info.compute_capability >= (7, 0) and info.memory_total > 2**30
        print(f"GPU: {info}", file=sys.stderr)


@_check
def check_cuda_errors_become_task_errors(real: bool) -> None:
    from batuta.kernels import cuda_support

    try:
        with cuda_support.gpu_errors("vadd") as cuda:
            cuda.device_array(2**50, np.float32)  # 4 PiB: out of memory, real or simulated
    except cuda_support.GpuKernelError as exc:
        message = str(exc)
        assert message.startswith("kernel 'vadd' on GPU failed: ") and "\n" not in message, message
    else:
        raise AssertionError("allocating 4 PiB did not fail")
    assert np.array_equal(_run("vadd", (np.ones(3), np.ones(3))), np.full(3, 2.0))  # the GPU still works


@_check
def check_device_level_launchers(real: bool) -> None:
    """The launchers the GPU benchmark times, on device-resident arrays."""
    from batuta.kernels import cuda_linalg, cuda_stream
    from numba import cuda

    a, b = _vectors(1001, np.float32, 2)
    d_a, d_b, d_out = cuda.to_device(a), cuda.to_device(b), cuda.device_array(1001, np.float32)
    cuda_stream.vadd_device(d_a, d_b, d_out)
    np.testing.assert_array_equal(d_out.copy_to_host(), a + b)
    assert abs(cuda_stream.sum_device(d_a).copy_to_host()[0] - float(np.sum(a, dtype=np.float64))) < 1e-9
    m = np.arange(12, dtype=np.float32).reshape(3, 4)
    d_c = cuda.device_array((3, 3), np.float32)
    cuda_linalg.matmul_device(cuda.to_device(m), cuda.to_device(np.ascontiguousarray(m.T)), d_c)
    cuda.synchronize()
    np.testing.assert_array_equal(d_c.copy_to_host(), m @ m.T)


# -- device arrays in and out (the contract a GPU slot's resident values rely on) -----------


def _device_cases(real: bool) -> list[tuple[str, tuple[object, ...]]]:
    """One call of every GPU variant, with host arrays, at a size that needs several blocks."""
    n = 3 * 10**5 + 7 if real else 1001
    rng = np.random.default_rng(11)
    a, b = _vectors(n, np.float32, 2)
    m = rng.standard_normal((130, 17)).astype(np.float32)
    mt = rng.standard_normal((17, 129)).astype(np.float32)
    rows = (rng.standard_normal((300, 5)) * 3).astype(np.float32)
    cases: list[tuple[str, tuple[object, ...]]] = [
        ("vadd", (a, b)),
        ("saxpy", (np.float32(1.5), a, b)),
        ("sum", (a,)),
        ("dot", (a, b)),
        ("histogram", (a, 17, -3.0, 3.0)),
        ("matmul", (m, mt)),
        ("pairwise_distances", (m[:40], m[:33])),
        ("kmeans_partial", (rows, rng.standard_normal((4, 5)))),
        ("linreg_partial", (rows, rng.standard_normal(300).astype(np.float32))),
        (
            "mlp_grad",
            (
                rng.standard_normal((5, 6)),
                rng.standard_normal(6),
                rng.standard_normal((6, 3)),
                rng.standard_normal(3),
                rows[:50],
                rng.integers(0, 3, 50),
            ),
        ),
    ]
    return cases


def _flat(value: Any) -> list[Any]:
    return [item for part in value for item in _flat(part)] if isinstance(value, tuple | list) else [value]


@_check
def check_device_array_inputs_give_the_host_answer(real: bool) -> None:
    """Every array argument may be a device array: same answer, host results by default."""
    from numba import cuda

    from batuta import kernels

    for name, args in _device_cases(real):
        on_host = kernels.run(name, "gpu", args)
        device_args: tuple[Any, ...] = tuple(
            cuda.to_device(arg) if isinstance(arg, np.ndarray) else arg for arg in args
        )
        on_device = kernels.run(name, "gpu", device_args)
        for host_part, device_part in zip(_flat(on_host), _flat(on_device), strict=True):
            assert type(device_part) is type(host_part), (name, type(device_part))
            if isinstance(host_part, np.ndarray):
                assert host_part.dtype == device_part.dtype and host_part.shape == device_part.shape, name
                np.testing.assert_allclose(device_part, host_part, rtol=1e-12, atol=1e-9, err_msg=name)
            else:
                assert abs(float(device_part) - float(host_part)) <= 1e-9 * max(1.0, abs(float(host_part))), name
        for arg, device_arg in zip(args, device_args, strict=True):  # the inputs were left as they were
            if isinstance(arg, np.ndarray):
                np.testing.assert_array_equal(device_arg.copy_to_host(), arg)


@_check
def check_device_results_stay_on_the_device(real: bool) -> None:
    from batuta import kernels

    for name, args in _device_cases(real):
        default = kernels.run(name, "gpu", args)
        kept = kernels.run(name, "gpu", args, device_results=True)
        for host_part, kept_part in zip(_flat(default), _flat(kept), strict=True):
            if isinstance(host_part, np.ndarray):
                assert kernels.is_device_array(kept_part), (name, type(kept_part))
                assert kept_part.dtype == host_part.dtype and kept_part.shape == host_part.shape, name
                np.testing.assert_allclose(kernels.to_host(kept_part), host_part, rtol=1e-12, atol=1e-9)
            else:
                assert type(kept_part) in (float, int) and not kernels.is_device_array(kept_part), name
    assert not kernels.device_results_wanted()  # reset after the call
    kept = kernels.run("vadd", "gpu", (np.ones(3), np.ones(3)), device_results=True)
    again = kernels.run("vadd", "gpu", (kept, kept), device_results=True)  # a chain: device in, device out
    np.testing.assert_array_equal(again.copy_to_host(), np.full(3, 4.0))


@_check
def check_device_arrays_are_checked_without_a_copy(real: bool) -> None:
    from numba import cuda

    from batuta import kernels

    good = cuda.to_device(np.ones(8, np.float32))
    bad_calls = [
        ("vadd", (cuda.to_device(np.ones(8, np.int32)), good), "argument 'a' is a int32 device array"),
        ("vadd", (good, cuda.to_device(np.ones(8))), "argument 'b' is float64 but 'a' is float32"),
        ("vadd", (good, cuda.to_device(np.ones(9, np.float32))), "argument 'b' has shape (9,)"),
        (
            "sum",
            (cuda.to_device(np.ones((2, 4), np.float32)),),
            "argument 'x' is a 2-D device array (shape (2, 4)); pass 1-D, e.g. x.ravel()",
        ),
        ("sum", (cuda.to_device(np.ones(16, np.float32))[::2],), "argument 'x' is a strided device array view"),
        (
            "matmul",  # a column slice: numba's `.T` of a device array is a transposed copy on a GPU
            (cuda.to_device(np.ones((4, 8), np.float32))[:, ::2], cuda.to_device(np.ones((4, 4), np.float32))),
            "argument 'a' is a strided device array view",
        ),
        (
            "kmeans_partial",
            (cuda.to_device(np.ones((5, 2), np.float32)), cuda.to_device(np.ones((2, 2), np.float32))),
            "argument 'centroids' is a float32 device array; pass a float64 one",
        ),
    ]
    for name, args, expected in bad_calls:
        try:
            kernels.run(name, "gpu", args)
        except kernels.KernelInputError as exc:
            message = str(exc)
            assert expected in message and f"'{name}'" in message and "\n" not in message, message
        else:
            raise AssertionError(f"{name} accepted {args}")


@_check
def check_repeated_reductions_of_a_resident_array_see_its_current_contents(real: bool) -> None:
    """sum and dot of device arrays keep a plan per (addresses, size, dtype): repeated calls
    reuse it, and read what the arrays hold now."""
    from batuta.kernels import cuda_stream
    from numba import cuda

    from batuta import kernels

    n = 3 * 10**6 + 1 if real else 1001
    a, b = _vectors(n, np.float32, 2, seed=7)
    d_a, d_b = cuda.to_device(a), cuda.to_device(b)
    for round_ in range(3):
        host = a + np.float32(round_)
        d_a.copy_to_device(host)  # new contents at the same address
        total = kernels.run("sum", "gpu", (d_a,))
        assert abs(total - math.fsum(host.tolist())) <= 1e-9 * float(np.abs(host).sum()) + 1e-6, round_
        products = host.astype(np.float64) * b
        dot = kernels.run("dot", "gpu", (d_a, d_b))
        assert abs(dot - math.fsum(products.tolist())) <= 1e-9 * float(np.abs(products).sum()), round_
    here = cuda_stream._address(d_a)
    assert sorted(key[0] for key in cuda_stream._LOCAL.plans if key[3] == here) == ["dot", "sum"]  # reused
    assert kernels.run("sum", "gpu", (cuda.to_device(np.zeros(0, np.float32)),)) == 0.0


@_check
def check_small_host_calls_reuse_their_staging_buffers_safely(real: bool) -> None:
    """Host in, host out calls of vadd, saxpy, sum and dot go through per-thread staging
    buffers: repeated calls with new data, and results kept across calls, stay right."""
    import threading

    from batuta.kernels import cuda_staging

    from batuta import kernels

    cuda_staging.forget_stages()
    kept = []
    for round_ in range(4):
        a, b = _vectors(4096, np.float32, 2, seed=round_)
        result = kernels.run("vadd", "gpu", (a, b))
        np.testing.assert_array_equal(result, a + b)
        kept.append((result, a + b))
        # a GPU fuses alpha * x + y into one rounding (FMA), NumPy rounds twice: within an ulp
        saxpy = kernels.run("saxpy", "gpu", (float(round_), a, b))
        np.testing.assert_allclose(saxpy, np.float32(round_) * a + b, rtol=2e-7, atol=1e-6)
        assert abs(kernels.run("sum", "gpu", (a,)) - math.fsum(a.tolist())) <= 1e-9 * float(np.abs(a).sum())
        products = a.astype(np.float64) * b
        assert abs(kernels.run("dot", "gpu", (a, b)) - math.fsum(products.tolist())) <= 1e-9 * float(
            np.abs(products).sum()
        )
    for result, expected in kept:  # earlier results are not views of the reused buffers
        np.testing.assert_array_equal(result, expected)
    stages = cuda_staging._LOCAL.stages
    assert sorted(key[0] for key in stages) == ["dot", "saxpy", "sum", "vadd"]  # one per kernel and size
    assert all(stage.memo for key, stage in stages.items() if key[0] != "saxpy")  # launches prepared
    errors: list[BaseException] = []

    def other_thread() -> None:  # another thread gets its own buffers, from its second call
        try:
            a, b = _vectors(4096, np.float32, 2, seed=99)
            np.testing.assert_array_equal(kernels.run("vadd", "gpu", (a, b)), a + b)
            assert not getattr(cuda_staging._LOCAL, "stages", None)
            np.testing.assert_array_equal(kernels.run("vadd", "gpu", (b, a)), a + b)
            assert len(cuda_staging._LOCAL.stages) == 1
        except BaseException as exc:  # reported below
            errors.append(exc)

    worker = threading.Thread(target=other_thread)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive() and not errors, errors
    big = cuda_staging.STAGE_MAX_BYTES // 8 + 1  # over the staging limit: the plain path
    a, b = _vectors(big, np.float32, 2)
    np.testing.assert_array_equal(kernels.run("vadd", "gpu", (a, b)), a + b)
    assert len(stages) == 4


def main() -> None:
    """Run every check; print one JSON object {check: null or its traceback} as the last line."""
    warnings.simplefilter("ignore")  # numba's simulator warns about object mode and overflows
    real = "--real" in sys.argv
    results: dict[str, str | None] = {}
    for name, fn in CHECKS.items():
        start = time.perf_counter()
        try:
            fn(real)
            results[name] = None
        except Exception:
            results[name] = traceback.format_exc()
        print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print(json.dumps(results))


# -- the tests (in pytest's process) ------------------------------------------------------


def _subprocess_env(simulate: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    if simulate:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    return env


@pytest.fixture(scope="module")
def check_results() -> dict[str, str | None]:
    args = [sys.executable, "-m", "tests.test_kernels_cuda", *(["--real"] if REAL_GPU else [])]
    done = subprocess.run(
        args,
        cwd=REPO_ROOT,
        env=_subprocess_env(simulate=not REAL_GPU),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    print(done.stderr)  # per-check timings (and the GPU's name), shown with -s
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(CHECKS))
def test_gpu_variant(check_results: dict[str, str | None], name: str) -> None:
    error = check_results[name]
    assert error is None, error


PTX_PROBE = """
import json, shutil, subprocess, sys, tempfile
try:
    from numba import cuda, types, from_dtype
    import numba.cuda.dispatcher as dispatcher
    from numba.cuda.random import xoroshiro128p_dtype
    cuda.compile_ptx(lambda a: None, "void(float32[::1])", cc=(9, 0))
except Exception as exc:
    print(json.dumps({"skip": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}))
    sys.exit(0)

class FakeDevice:  # device functions ask the current device for its compute capability
    compute_capability = (9, 0)

dispatcher.get_current_device = FakeDevice
from batuta.kernels import cuda_linalg, cuda_ml, cuda_mlp, cuda_stream

linalg, stream, ml, mlp = cuda_linalg._kernels(), cuda_stream._kernels(), cuda_ml._kernels(), cuda_mlp._kernels()
states = from_dtype(xoroshiro128p_dtype)[::1]
jobs = []
for name in ("float32", "float64"):
    t = getattr(types, name)
    v, m = t[::1], t[:, ::1]
    jobs += [
        (stream.vadd, (v, v, v)), (stream.saxpy, (t, v, v, v)), (stream.sum_partials, (v, types.float64[::1])),
        (stream.dot_partials, (v, v, types.float64[::1])),
        (stream.histogram_shared, (v, t, t, t, t, v, types.int64[::1])),
        (stream.histogram_global, (v, t, t, t, t, v, types.int64[::1])),
        (getattr(linalg, "gemm_" + name), (m, m, m)), (getattr(linalg, "sqdist_" + name), (m, m, m)),
    ]
    kmeans_sig = (m, types.float64[:, ::1], types.float64[:, ::1], types.int64[::1], types.float64[::1])
    jobs += [(ml.kmeans_shared16, kmeans_sig), (ml.kmeans_shared32, kmeans_sig)]
    f64m, f64v = types.float64[:, ::1], types.float64[::1]
    jobs += [
        (mlp.mlp_rows, (m, types.int64[::1], f64m, f64v, f64m, f64v, f64m, f64m, f64m, f64v)),
        (mlp.crossprod, (m, f64m, types.int64, types.float64[:, :, ::1])),
    ]
jobs.append((mlp.sum_splits, (types.float64[:, :, ::1], types.float64[:, ::1])))
from batuta.kernels import cuda_data
f32m, f64m = types.float32[:, ::1], types.float64[:, ::1]
data = cuda_data._kernels()
u, i, f = types.uint64, types.int64, types.float64
jobs += [
    (data.blobs, (u, i, f64m, f, f32m)), (data.regression, (u, i, types.float64[::1], f, f32m, types.float32[::1])),
    (data.teacher, (u, i, f64m, f, f32m, types.int64[::1])),
]
jobs.append((stream.mc_pi, (states, types.int64, types.int64[::1])))
from batuta.kernels import cuda_random
jobs.append((cuda_random._kernels().seed, (types.uint64, types.uint64, types.uint64[:, :, ::1], states)))
import os
ptxas = shutil.which("ptxas") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "ptxas")
report = {}
for kernel, sig in jobs:
    options = {k: v for k, v in kernel.targetoptions.items() if k == "launch_bounds"}
    ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0), **options)
    key = kernel.py_func.__name__ + str(sig[0])
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        try:
            out = subprocess.run([ptxas, "-arch=sm_90", "-v", f.name, "-o", "/dev/null"],
                                 capture_output=True, text=True, check=True).stderr
        except (OSError, subprocess.CalledProcessError) as exc:
            out = f"ptxas unavailable: {exc}"
    report[key] = {"ptx_lines": ptx.count(chr(10)), "ptxas": out}
print(json.dumps({"report": report}))
"""


@pytest.mark.timeout(600)
def test_cuda_kernels_compile_for_sm90() -> None:
    """Type inference and code generation of every kernel for sm_90, which the simulator skips."""
    done = subprocess.run(
        [sys.executable, "-c", PTX_PROBE],
        cwd=REPO_ROOT,
        env=_subprocess_env(simulate=False),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    found = json.loads(done.stdout.splitlines()[-1])
    if "skip" in found:
        pytest.skip(f"cannot compile CUDA here: {found['skip']}")
    report = found["report"]
    assert len(report) == 30
    for key, item in report.items():
        assert item["ptx_lines"] > 10, key
        if "ptxas unavailable" not in item["ptxas"]:
            assert "0 bytes spill stores" in item["ptxas"], (key, item["ptxas"])


@pytest.mark.timeout(300)
def test_gpu_benchmark_smoke_run() -> None:
    """bench/gpu_kernels.py --smoke runs end to end (under the simulator unless on a GPU)."""
    done = subprocess.run(
        [sys.executable, "bench/gpu_kernels.py", "--smoke"],
        cwd=REPO_ROOT,
        env=_subprocess_env(simulate=not REAL_GPU),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    found = json.loads(done.stdout.splitlines()[-1])
    assert found["simulated"] is not REAL_GPU
    assert {"device", "vadd_fraction_of_copy", "matmul_fraction_of_cublas", "copy_reference"} <= set(found)
    assert isinstance(found["stream"]["4097"]["vadd_tbps"], float)  # simulated timings mean nothing


@pytest.mark.timeout(300)
def test_gpu_variant_profile_smoke_run() -> None:
    """scripts/gpu_variant_profile.py --smoke runs end to end and reports every part."""
    done = subprocess.run(
        [sys.executable, "scripts/gpu_variant_profile.py", "--smoke"],
        cwd=REPO_ROOT,
        env=_subprocess_env(simulate=not REAL_GPU),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    found = json.loads(done.stdout.splitlines()[-1])
    assert found["simulated"] is not REAL_GPU
    assert {"call_staged_host_in_host_out", "launch_prepared", "call_cpu_variant"} <= set(found["vadd_4k_steps_us"])
    from batuta import kernels

    infos = [kernels.info(name) for name in kernels.names()]  # the library's, not those other tests registered
    with_gpu = {i.name for i in infos if "gpu" in i.backends and i.module.startswith("batuta.kernels.")}
    assert with_gpu - set(found["crossover"]) <= {
        "mc_pi",
        "kmeans_partial_synth",
        "linreg_partial_synth",
        "mlp_grad_synth",
    }
    assert found["kmeans"]["batuta_ms_per_iteration"] > 0


if __name__ == "__main__":
    main()
