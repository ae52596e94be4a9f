"""Where a GPU variant's time goes per call, and from what size it beats the CPU variant.

Run on a GPU host, in one call (about three minutes on an H200)::

    python scripts/gpu_variant_profile.py                 # CPU variants with 1 thread: one slot's share
    python scripts/gpu_variant_profile.py --cpu-threads 4
    NUMBA_ENABLE_CUDASIM=1 python scripts/gpu_variant_profile.py --smoke   # runs anywhere, times mean nothing

Five parts, each printed as a table on stderr and gathered in the JSON object of the last line:

1. ``vadd_4k_steps_us``: microseconds per call of each step of a 4,096-element float32 vadd
   (16 KiB per array): the registry's validation, ``to_device``, ``device_array``, a launch
   through numba's dispatcher and through a prepared launch (`cuda_staging.launch_and_prepare`),
   ``copy_to_host``, a pinned asynchronous copy, ``synchronize`` of the device and of the
   stream, and whole calls: the plain way (uploads, allocation, launch, copy back), the staged
   way (what ``kernels.run("vadd", "gpu", host arrays)`` does now), device arrays in and out
   (what a GPU slot with resident values does), and the CPU variant.
   The slot's ``tiny_gpu_tasks_per_s`` target (5,000/s through the pool) needs the staged call
   well under 100 us.
2. ``crossover``: every kernel with a GPU variant at a few sizes, host arrays in and out, GPU
   against CPU (microseconds per call), and ``suggested_gpu_min_elements``: the element count
   (as ``auto`` counts them: over the array arguments) of the smallest size from which the GPU
   was faster at every larger size measured; null where it never was. Compare them with
   ``kernels/cuda_support.py`` GPU_MIN_ELEMENTS and put the measured ones there.
3. ``stream_check`` (real GPU only): whether a second thread's copies wait for the first
   thread's kernel. ``per_thread_default_streams`` true means the process runs with per-thread
   default streams (numba-cuda 0.30 with the NVIDIA binding ignores
   ``NUMBA_CUDA_PER_THREAD_DEFAULT_STREAM``; the variable cuda-python documents is
   ``CUDA_PYTHON_CUDA_PER_THREAD_DEFAULT_STREAM=1``, set before CUDA is first imported).
4. ``mc_pi``: G samples/s of the GPU variant at 10**10 samples, and milliseconds to seed its
   262,144 generators on the device against numba's CPU seeding.
5. ``kmeans``: K-means 2M x 16 float32, k = 64, data resident on the device: milliseconds per
   iteration of ``kmeans_partial`` on the GPU (issue 16: a few hundred microseconds), the time
   to read the data once at the card's copy bandwidth, and a CuPy version (distances by one
   matrix product, argmin, sums by a one-hot product) where CuPy imports.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout


def per_call_us(fn: Callable[[], object], budget_s: float, max_calls: int, sync: Callable[[], object] | None) -> float:
    """Median over 5 batches of microseconds per call of `fn`, after two warm-up calls
    (``max_calls`` 0: one timed call, for a smoke run)."""
    if max_calls == 0:
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        return round((time.perf_counter() - start) * 1e6, 2)
    fn()
    fn()
    if sync is not None:
        sync()
    start = time.perf_counter()
    fn()
    if sync is not None:
        sync()
    once = max(time.perf_counter() - start, 1e-7)
    calls = max(1, min(max_calls, int(budget_s / 5 / once)))
    batches = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if sync is not None:
            sync()
        batches.append((time.perf_counter() - start) / calls * 1e6)
    return round(statistics.median(batches), 2)


def vadd_steps(budget_s: float, max_calls: int) -> dict[str, float]:
    import numpy as np
    from batuta.kernels import cuda_staging, cuda_stream, cuda_support

    from batuta import kernels

    cuda = cuda_support.cuda()
    info = cuda_support.gpu_info()
    assert info is not None
    n = 4096
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal(n).astype(np.float32) for _ in range(2))
    d_a, d_b, d_out = cuda.to_device(a), cuda.to_device(b), cuda.device_array(n, np.float32)
    stream = cuda.default_stream()
    pinned = cuda.pinned_array(n, np.float32)
    dispatcher = cuda_stream._kernels().vadd
    blocks, threads = cuda_support.stream_grid(n)
    relaunch = cuda_staging.launch_and_prepare(dispatcher, blocks, threads, (d_a, d_b, d_out))
    kdef = kernels.lookup("vadd")

    def plain() -> np.ndarray:
        out = cuda.device_array(n, np.float32)
        cuda_stream.vadd_device(cuda.to_device(a), cuda.to_device(b), out)
        return out.copy_to_host()

    def pinned_round_trip() -> None:
        d_a.copy_to_device(pinned, stream=stream)
        d_out.copy_to_host(pinned, stream=stream)
        stream.synchronize()

    def t(fn: Callable[[], object], sync: Callable[[], object] | None = None) -> float:
        return per_call_us(fn, budget_s, max_calls, sync)

    def allocate_and_free_1gib() -> None:
        buffer = cuda.device_array(1 << (10 if info.simulated else 28), np.float32)
        del buffer
        pending = getattr(cuda.current_context(), "deallocations", None)  # none in the simulator
        if pending is not None:
            pending.clear()  # numba frees in batches: free now (cuMemFree)

    steps = {
        "validate": t(lambda: kdef.validate((a, b))),
        "to_device_16KiB": t(lambda: cuda.to_device(a)),
        "device_array_16KiB": t(lambda: cuda.device_array(n, np.float32)),
        "launch_numba_dispatch": t(lambda: dispatcher[blocks, threads](d_a, d_b, d_out), cuda.synchronize),
        "launch_prepared": t(relaunch, cuda.synchronize),
        "copy_to_host_16KiB": t(lambda: d_out.copy_to_host()),
        "pinned_h2d_d2h_async_and_stream_sync": t(pinned_round_trip),
        "device_synchronize_idle": t(cuda.synchronize),
        "stream_synchronize_idle": t(stream.synchronize),
        "call_plain_host_in_host_out": t(plain),
        "call_staged_host_in_host_out": t(lambda: kernels.run("vadd", "gpu", (a, b))),
        "call_device_in_device_out": t(
            lambda: kernels.run("vadd", "gpu", (d_a, d_b), device_results=True), cuda.synchronize
        ),
        "call_cpu_variant": t(lambda: kernels.run("vadd", "cpu", (a, b))),
        # What a kept GPU result of 1 GiB costs to allocate and free through numba (a chain of
        # kept results allocates one per stage; CuPy draws from a pool).
        "device_array_1GiB_alloc_and_free": per_call_us(allocate_and_free_1gib, budget_s, min(max_calls, 50), None),
    }
    assert np.array_equal(kernels.run("vadd", "gpu", (a, b)), a + b), "staged vadd is wrong"
    return steps


def _cases(smoke: bool) -> dict[str, list[tuple[object, ...]]]:
    """Arguments of each GPU kernel at rising sizes (host arrays)."""
    import numpy as np

    from batuta import kernels

    rng = np.random.default_rng(1)

    def vec(n: int) -> Any:
        return rng.standard_normal(n).astype(np.float32)

    def mat(r: int, c: int, dtype: Any = np.float32) -> Any:
        return rng.standard_normal((r, c)).astype(dtype)

    streams = [1 << 8] if smoke else [1 << p for p in (10, 12, 14, 16, 18, 20, 22, 24)]
    squares = [16] if smoke else [32, 64, 128, 256, 512, 1024]
    points = [16] if smoke else [32, 128, 512, 2048]
    rows = [32] if smoke else [1 << 10, 1 << 13, 1 << 16, 1 << 19]
    cases: dict[str, list[tuple[object, ...]]] = {
        "vadd": [(vec(n), vec(n)) for n in streams],
        "saxpy": [(1.5, vec(n), vec(n)) for n in streams],
        "sum": [(vec(n),) for n in streams],
        "dot": [(vec(n), vec(n)) for n in streams],
        "histogram": [(vec(n), 64, -3.0, 3.0) for n in streams],
        "matmul": [(mat(s, s), mat(s, s)) for s in squares],
        "pairwise_distances": [(mat(p, 16), mat(p, 16)) for p in points],
        "kmeans_partial": [(mat(r, 16), mat(64, 16, np.float64)) for r in rows],
        "linreg_partial": [(mat(r, 32), vec(r)) for r in rows],
    }
    if "gpu" in kernels.info("mlp_grad").backends:
        d, h, c = 16, 64, 4
        cases["mlp_grad"] = [
            (
                mat(d, h, np.float64) * 0.3,
                np.zeros(h),
                mat(h, c, np.float64) * 0.3,
                np.zeros(c),
                mat(r, d),
                rng.integers(0, c, r).astype(np.int64),
            )
            for r in rows
        ]
    return cases


def per_thread_stream_check() -> dict[str, Any]:
    """Whether another thread's copies wait for this thread's kernels (the legacy default
    stream: they do) or not (per-thread default streams, as a GPU slot's prefetch needs).

    Thread A launches a long mc_pi kernel on its default stream; thread B, meanwhile, copies 32
    bytes to the device and back on its own. On the legacy stream B waits for A's kernel.
    """
    import threading

    import numpy as np
    from batuta.kernels import cuda_stream, cuda_support

    cuda = cuda_support.cuda()
    launched, copied = threading.Event(), threading.Event()
    found: dict[str, Any] = {}

    def kernel_thread() -> None:
        start = time.perf_counter()
        hits = cuda_stream.mc_pi_device(4 * 10**10, 1)  # about a second of GPU time on an H200
        launched.set()
        copied.wait(timeout=120)
        hits.copy_to_host()
        found["kernel_s"] = round(time.perf_counter() - start, 4)

    def copy_thread() -> None:
        launched.wait(timeout=120)
        start = time.perf_counter()
        cuda.to_device(np.ones(4)).copy_to_host()
        found["other_thread_copy_s"] = round(time.perf_counter() - start, 4)
        copied.set()

    threads = [threading.Thread(target=kernel_thread), threading.Thread(target=copy_thread)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    found["per_thread_default_streams"] = found.get("other_thread_copy_s", 1.0) < 0.1 * found.get("kernel_s", 0.0)
    return found


def mc_pi_figures(smoke: bool) -> dict[str, Any]:
    """mc_pi's draw rate through the registered variant, and what seeding its generators costs
    on the device (`cuda_random`) against numba's sequential CPU seeding."""
    from batuta.kernels import cuda_random, cuda_support
    from numba.cuda.random import create_xoroshiro128p_states

    from batuta import kernels

    cuda = cuda_support.cuda()
    samples = 10**4 if smoke else 10**10
    generators = 64 if smoke else 1 << 18
    kernels.run("mc_pi", "gpu", (samples, 1))
    start = time.perf_counter()
    kernels.run("mc_pi", "gpu", (samples, 2))
    seconds = time.perf_counter() - start

    def seed_ours() -> None:
        cuda_random.seeded_states(generators, 3)
        cuda.synchronize()

    def seed_numba() -> None:
        create_xoroshiro128p_states(generators, seed=3)
        cuda.synchronize()

    budget, calls = (0.0, 0) if smoke else (0.5, 20)
    return {
        "samples": samples,
        "generators": generators,
        "gsamples_per_s": round(samples / seconds / 1e9, 2),
        "seed_device_ms": round(per_call_us(seed_ours, budget, calls, None) / 1e3, 3),
        "seed_numba_cpu_ms": round(per_call_us(seed_numba, budget, calls, None) / 1e3, 3),
    }


def _elements(args: tuple[object, ...]) -> int:
    return sum(int(getattr(arg, "size", 0)) for arg in args if not isinstance(arg, float | int))


def crossover(smoke: bool, budget_s: float, max_calls: int) -> dict[str, dict[str, Any]]:
    from batuta import kernels

    found: dict[str, dict[str, Any]] = {}
    for name, sizes in _cases(smoke).items():
        rows: list[tuple[int, float, float]] = []
        for args in sizes:
            gpu = per_call_us(lambda a=args, k=name: kernels.run(k, "gpu", a), budget_s, max_calls, None)
            cpu = per_call_us(lambda a=args, k=name: kernels.run(k, "cpu", a), budget_s, max_calls, None)
            rows.append((_elements(args), gpu, cpu))
            print(f"{name:>20} {rows[-1][0]:>12,} elements: gpu {gpu:>12.1f} us, cpu {cpu:>12.1f} us", file=sys.stderr)
        suggested = None
        for i in range(len(rows)):
            if all(g < c for _, g, c in rows[i:]):
                suggested = rows[i][0]
                break
        found[name] = {
            "elements": [r[0] for r in rows],
            "gpu_us": [r[1] for r in rows],
            "cpu_us": [r[2] for r in rows],
            "suggested_gpu_min_elements": suggested,
        }
    return found


def kmeans_figures(smoke: bool, iters: int) -> dict[str, Any]:
    import numpy as np
    from batuta.kernels import cuda_support

    from batuta import kernels

    cuda = cuda_support.cuda()
    n, d, k = (256, 4, 8) if smoke else (2_000_000, 16, 64)
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((n, d)) * 3 + rng.integers(-8, 8, (n, 1))).astype(np.float32)
    centroids = x[rng.choice(n, k, replace=False)].astype(np.float64)
    d_x, d_c = cuda.to_device(x), cuda.to_device(centroids)
    cuda.synchronize()

    def per_iteration_ms(step: Callable[[], object]) -> float:
        step()
        start = time.perf_counter()
        for _ in range(iters):
            step()  # the inertia is a Python float: each call waits for its own launch
        return round((time.perf_counter() - start) / iters * 1e3, 3)

    # As a K-means job on a GPU slot runs it: rows resident, new centroids from the host, host
    # results back; then everything on the device.
    job = per_iteration_ms(lambda: kernels.run("kmeans_partial", "gpu", (d_x, centroids)))
    resident = per_iteration_ms(lambda: kernels.run("kmeans_partial", "gpu", (d_x, d_c), device_results=True))
    _, counts, _ = kernels.run("kmeans_partial", "gpu", (d_x, centroids))
    if smoke:
        assert np.array_equal(counts, kernels.reference("kmeans_partial", (x, centroids))[1]), "K-means is wrong"
    found: dict[str, Any] = {
        "shape": [n, d, k],
        "batuta_ms_per_iteration": job,
        "batuta_all_on_device_ms_per_iteration": resident,
    }
    info = cuda_support.gpu_info()
    if info is not None and not info.simulated:
        copy = cuda.device_array_like(d_x)
        start = time.perf_counter()
        for _ in range(iters):
            copy.copy_to_device(d_x)
        cuda.synchronize()
        found["device_copy_of_x_ms"] = round((time.perf_counter() - start) / iters * 1e3, 3)
        found.update(_cupy_kmeans(d_x, d_c, iters))
    return found


def _cupy_kmeans(d_x: Any, d_c: Any, iters: int) -> dict[str, Any]:
    """A careful CuPy iteration: ||x||^2 - 2 x c^T + ||c||^2 by one GEMM, argmin, one-hot GEMM."""
    try:
        import cupy as cp
    except Exception as exc:
        return {"cupy": f"not importable: {type(exc).__name__}"}
    x = cp.asarray(d_x)
    c = cp.asarray(d_c).astype(cp.float32)
    x_sq = (x * x).sum(axis=1, keepdims=True)
    k = c.shape[0]

    def step() -> Any:
        dist = x_sq - 2.0 * (x @ c.T) + (c * c).sum(axis=1)[None, :]
        labels = dist.argmin(axis=1)
        onehot = (labels[:, None] == cp.arange(k)[None, :]).astype(cp.float32)
        return onehot.T @ x, onehot.sum(axis=0), float(dist.min(axis=1).sum())

    step()
    cp.cuda.Device().synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    cp.cuda.Device().synchronize()
    ms = (time.perf_counter() - start) / iters * 1e3
    return {"cupy_ms_per_iteration": round(ms, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; also runs under NUMBA_ENABLE_CUDASIM=1")
    parser.add_argument("--cpu-threads", type=int, default=1, help="numba/BLAS threads of the CPU variants")
    parser.add_argument("--budget", type=float, default=0.5, help="seconds per measurement (about)")
    args = parser.parse_args()
    for name in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, str(args.cpu_threads))

    from batuta.kernels import cuda_support

    info = cuda_support.gpu_info()
    if info is None:
        sys.exit("no usable CUDA device (set NUMBA_ENABLE_CUDASIM=1 with --smoke to try it without one)")
    budget, max_calls = (0.0, 0) if args.smoke else (args.budget, 20_000)
    result: dict[str, Any] = {
        "device": info.device_name,
        "simulated": info.simulated,
        "cpu_threads": args.cpu_threads,
        "per_thread_default_stream": os.environ.get("CUDA_PYTHON_CUDA_PER_THREAD_DEFAULT_STREAM", "0"),
    }
    if not info.simulated:
        result["stream_check"] = per_thread_stream_check()
        print(f"streams: {result['stream_check']}", file=sys.stderr)
    steps = vadd_steps(budget, max_calls)
    for step, us in steps.items():
        print(f"vadd 4K {step:>40}: {us:10.2f} us", file=sys.stderr)
    result["vadd_4k_steps_us"] = steps
    result["crossover"] = crossover(args.smoke, budget, max_calls)
    result["mc_pi"] = mc_pi_figures(args.smoke)
    print(f"mc_pi: {result['mc_pi']}", file=sys.stderr)
    result["kmeans"] = kmeans_figures(args.smoke, 1 if args.smoke else 20)
    print(f"kmeans: {result['kmeans']}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
