"""Built-in kernels: scheduler probes (noop, spin, burn) and small streaming/Monte Carlo kernels.

Every kernel has a NumPy reference (the ``scalar`` backend and the test oracle) and a numba
CPU variant compiled on first use; vadd, saxpy, sum and mc_pi also have a numba-cuda GPU
variant (kernels in `cuda_stream`), which takes host or device arrays and returns device
or host arrays (see `cuda_support`). Array kernels take 1-D, C-contiguous float32 or float64 arrays (see
`registry.float_array`). CPU loops switch to ``prange`` only from `PARALLEL_MIN_SIZE`
elements: below that, waking the thread pool costs more than it saves.
"""

from __future__ import annotations

import time

import numpy as np

from . import cuda_stream
from .cuda_support import GPU_MIN_ELEMENTS, finish, gpu_errors, on_device
from .registry import (
    KernelInputError,
    as_count,
    as_real,
    device_results_wanted,
    float_array,
    float_vectors,
    is_device_array,
    jit,
    kernel,
    prange,
)

PARALLEL_MIN_SIZE = 1 << 15
"""Elements below which loops run on one thread (measured crossover about 30k float32 on
a 2-core host with numba's OpenMP layer: a parallel launch costs about 1.5 us there)."""

# -- scheduler probes ---------------------------------------------------------------------


@kernel("noop", description="Return the first argument, or None: a trivial task for throughput tests.", pure=True)
def noop(*args: object) -> object:
    return args[0] if args else None


noop.cpu(noop.reference)


@kernel("spin", description="Busy-wait `seconds` on one CPU core; return the seconds spun.")
def spin(seconds: float) -> float:
    # Burns CPU rather than sleeping, so a spinning slot looks busy to the OS and to CPU
    # accounting, as a real kernel would. perf_counter costs well under a microsecond.
    # The loop tests the very value it returns: comparing the clock with a deadline
    # (start + seconds) instead lets rounding return 0.0019999999999527063 for 0.002.
    clock = time.perf_counter
    start = clock()
    spun = 0.0
    while spun < seconds:
        spun = clock() - start
    return spun


spin.cpu(spin.reference)


def _check_seconds(kernel_name: str, seconds: object) -> tuple[float] | None:
    """spin's and burn's one argument: a finite number of seconds, >= 0."""
    if type(seconds) is float and 0.0 <= seconds < float("inf"):
        return None  # the common case, kept cheap
    value = as_real(kernel_name, "seconds", seconds, finite=True)
    if value < 0:
        raise KernelInputError(f"kernel {kernel_name!r}: argument 'seconds' must be >= 0, got {value}")
    return (value,)


@spin.validator
def _check_spin(seconds: object) -> tuple[float] | None:
    return _check_seconds("spin", seconds)


@kernel(
    "burn",
    description="Use `seconds` of this thread's CPU time; return the CPU seconds used. Unlike spin, "
    "a task preempted for a while ends that much later, as real work does.",
)
def burn(seconds: float) -> float:
    # `spin` waits on the wall clock, so CPU taken from a spinning slot by another process
    # (the coordinator, the agent) costs its task nothing; `burn` counts only the CPU its own
    # thread got, so every microsecond taken from it shows in the makespan, as it would for a
    # real kernel. thread_time is a syscall (about 0.4 us on a 2-core VM), not the vDSO.
    clock = time.thread_time
    start = clock()
    used = 0.0
    while used < seconds:
        used = clock() - start
    return used


burn.cpu(burn.reference)


@burn.validator
def _check_burn(seconds: object) -> tuple[float] | None:
    return _check_seconds("burn", seconds)


# -- streaming kernels --------------------------------------------------------------------


@kernel(
    "vadd",
    description="Elementwise a + b of two equal-length 1-D float arrays.",
    pure=True,
    gpu_min_elements=GPU_MIN_ELEMENTS["vadd"],
)
def vadd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a + b


@vadd.validator
def _check_vadd(a: object, b: object) -> tuple[np.ndarray, ...]:
    return float_vectors("vadd", a=a, b=b)


@jit(parallel=True, cache=True)
def _vadd_loop(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """out[:] = a + b (benchmarks call it with a reused output array)."""
    n = a.size
    if n < PARALLEL_MIN_SIZE:
        for i in range(n):
            out[i] = a[i] + b[i]
    else:
        for i in prange(n):
            out[i] = a[i] + b[i]


@vadd.cpu
def _vadd_cpu(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # NumPy allocates the result, not numba: NumPy asks the kernel for huge pages for large
    # arrays, so writing a fresh 128 MiB output takes 64 page faults instead of 32,768. On the
    # 2-core dev host, 32M float32, best of 15: 20.5 ms this way, 43.8 ms with numba's np.empty.
    out = np.empty(a.size, a.dtype)
    _vadd_loop(a, b, out)
    return out


@vadd.gpu
def _vadd_gpu(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with gpu_errors("vadd") as cuda:
        if not (device_results_wanted() or is_device_array(a) or is_device_array(b)):
            staged = cuda_stream.vadd_staged(a, b)  # host in, host out: reused buffers, one sync
            if staged is not None:
                return staged
        out = cuda.device_array(a.size, a.dtype)
        cuda_stream.vadd_device(on_device(cuda, a), on_device(cuda, b), out)
        return finish(out)


@kernel(
    "saxpy",
    description="alpha * x + y for a real scalar alpha and 1-D float arrays x, y.",
    pure=True,
    gpu_min_elements=GPU_MIN_ELEMENTS["saxpy"],
)
def saxpy(alpha: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return alpha * x + y


@saxpy.validator
def _check_saxpy(alpha: object, x: object, y: object) -> tuple[object, ...]:
    xs, ys = float_vectors("saxpy", x=x, y=y)
    # alpha takes the arrays' dtype, so float32 inputs give a float32 result on every backend
    # (a float64 alpha would promote, or round differently, depending on the backend).
    return (xs.dtype.type(as_real("saxpy", "alpha", alpha)), xs, ys)


@jit(parallel=True, cache=True)
def _saxpy_loop(alpha: float, x: np.ndarray, y: np.ndarray, out: np.ndarray) -> None:
    """out[:] = alpha * x + y."""
    n = x.size
    if n < PARALLEL_MIN_SIZE:
        for i in range(n):
            out[i] = alpha * x[i] + y[i]
    else:
        for i in prange(n):
            out[i] = alpha * x[i] + y[i]


@saxpy.cpu
def _saxpy_cpu(alpha: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    out = np.empty(x.size, x.dtype)  # allocated by NumPy: see _vadd_cpu
    _saxpy_loop(alpha, x, y, out)
    return out


@saxpy.gpu
def _saxpy_gpu(alpha: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    with gpu_errors("saxpy") as cuda:
        if not (device_results_wanted() or is_device_array(x) or is_device_array(y)):
            staged = cuda_stream.saxpy_staged(alpha, x, y)
            if staged is not None:
                return staged
        out = cuda.device_array(x.size, x.dtype)
        cuda_stream.saxpy_device(alpha, on_device(cuda, x), on_device(cuda, y), out)
        return finish(out)


@kernel(
    "sum",
    description="Sum of a 1-D float array, accumulated in float64, as a Python float.",
    pure=True,
    gpu_min_elements=GPU_MIN_ELEMENTS["sum"],
)
def sum_(x: np.ndarray) -> float:
    """Sum of `x` as a Python float, accumulated in float64 for float32 input too.

    The backends differ only in the order of additions (NumPy sums pairwise; the CPU variant
    sums per thread with reassociation allowed so it vectorises, then combines the threads'
    partial sums). Any order obeys the recursive-summation bound, which is the documented
    tolerance between backends: ``|cpu - reference| <= 2 * (n - 1) * 2**-53 * sum(|x|)``
    (twice the one-sided bound, as both results have their own error). Typical differences
    are far smaller, about ``sqrt(n) * 2**-53 * sum(|x|)``. The CPU result is deterministic for
    a given number of numba threads, the GPU result for a given GPU model (its SM count sets
    the grid; partial sums are combined in a fixed order, without atomics). NaN and inf
    propagate as in NumPy.
    """
    return float(np.sum(x, dtype=np.float64))


@sum_.validator
def _check_sum(x: object) -> tuple[np.ndarray]:
    return (float_array("sum", "x", x),)


@jit(parallel=True, cache=True, fastmath={"reassoc"})
def _sum_loop(x: np.ndarray) -> float:
    n = x.size
    total = 0.0
    if n < PARALLEL_MIN_SIZE:
        for i in range(n):
            total += x[i]
    else:
        for i in prange(n):
            total += x[i]
    return total


@sum_.cpu
def _sum_cpu(x: np.ndarray) -> float:
    return float(_sum_loop(x))


@sum_.gpu
def _sum_gpu(x: np.ndarray) -> float:
    with gpu_errors("sum") as cuda:
        if is_device_array(x):
            return cuda_stream.reduction_device("sum", (x,))
        staged = cuda_stream.reduction_staged("sum", (x,))
        if staged is not None:
            return staged
        total = cuda_stream.sum_device(on_device(cuda, x)).copy_to_host()
    return float(total[0])


# -- Monte Carlo pi -----------------------------------------------------------------------

_REFERENCE_BLOCK = 1 << 20  # bounds the reference's memory: 2 * 8 MiB of samples at a time
_MC_CHUNK = 1 << 16  # samples per parallel work item in the CPU variant
_MAX_SEED = 2**64 - 1

# SplitMix64 (Steele, Lea & Flood 2014; Vigna's constants): output n of the stream seeded
# with s is mix(s + n * GOLDEN). Being counter-based, sample i can be drawn without the
# samples before it, so the CPU variant's result does not depend on how the range is split
# across threads; the hit count is an integer, so its parallel sum is exact too.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_SHIFT_A, _SHIFT_B, _SHIFT_C, _SHIFT_53 = (np.uint64(s) for s in (30, 27, 31, 11))
_UNIT = 1.0 / 2.0**53


@kernel("mc_pi", description="Estimate pi from `samples` random points in the unit square.", pure=True)
def mc_pi(samples: int, seed: int) -> float:
    """4 * (share of points inside the quarter circle), drawn with NumPy's default Generator.

    Deterministic for a given seed on each backend, but each backend has its own generator, so
    their estimates differ, each by about ``1.64 / sqrt(samples)``: the CPU variant uses
    SplitMix64 (independent of the thread count), the GPU variant numba's xoroshiro128+ with
    one stream per thread and a launch shape that depends on `samples` only, so it gives the
    same estimate on every GPU model and under the simulator (see `cuda_stream.mc_pi_device`).
    """
    rng = np.random.default_rng(seed)
    hits = 0
    remaining = samples
    while remaining:
        block = min(remaining, _REFERENCE_BLOCK)
        x, y = rng.random((2, block))
        hits += int(np.count_nonzero(x * x + y * y < 1.0))
        remaining -= block
    return 4.0 * hits / samples


@mc_pi.validator
def _check_mc_pi(samples: object, seed: object) -> tuple[int, int]:
    return (
        as_count("mc_pi", "samples", samples, minimum=1, maximum=2**62),
        as_count("mc_pi", "seed", seed, maximum=_MAX_SEED),
    )


@jit(cache=True)
def _splitmix64(state: np.uint64) -> np.uint64:
    z = (state ^ (state >> _SHIFT_A)) * _MIX1
    z = (z ^ (z >> _SHIFT_B)) * _MIX2
    return z ^ (z >> _SHIFT_C)


@jit(cache=True)
def _mc_pi_chunk(seed: np.uint64, start: int, stop: int) -> int:
    """Hits among samples [start, stop): sample i uses stream outputs 2i and 2i + 1."""
    state = seed + np.uint64(2 * start) * _GOLDEN
    inside = 0
    for _ in range(start, stop):
        state += _GOLDEN
        x = np.float64(_splitmix64(state) >> _SHIFT_53) * _UNIT
        state += _GOLDEN
        y = np.float64(_splitmix64(state) >> _SHIFT_53) * _UNIT
        if x * x + y * y < 1.0:
            inside += 1
    return inside


@jit(parallel=True, cache=True)
def _mc_pi_hits(samples: int, seed: np.uint64) -> int:
    chunks = (samples + _MC_CHUNK - 1) // _MC_CHUNK
    # One slot per chunk, summed afterwards, and the chunk's loop in its own function: a
    # parallel `hits += inside` over a nested loop trips numba 0.68.0's parfor pass
    # ("unexpected cycle in lookup()"). Integer sums in chunk order are exact either way.
    per_chunk = np.zeros(chunks, np.int64)
    for chunk in prange(chunks):
        start = chunk * _MC_CHUNK
        per_chunk[chunk] = _mc_pi_chunk(seed, start, min(start + _MC_CHUNK, samples))
    return int(per_chunk.sum())


@mc_pi.cpu
def _mc_pi_cpu(samples: int, seed: int) -> float:
    return 4.0 * _mc_pi_hits(samples, np.uint64(seed)) / samples


@mc_pi.gpu
def _mc_pi_gpu(samples: int, seed: int) -> float:
    with gpu_errors("mc_pi"):
        hits = cuda_stream.mc_pi_device(samples, seed).copy_to_host()
    return 4.0 * int(hits[0]) / samples
