"""CUDA kernels for the streaming kernels: vadd, saxpy, sum, dot, histogram and mc_pi.

All but mc_pi are memory-bound, so they share one launch shape (`cuda_support.stream_grid`):
a grid-stride loop over at most SMs x 32 blocks of 256 threads, which on an H200 moved
4.49 TB/s for a vector add against 2.66 TB/s with one thread per element (DESIGN.md, facts).
The loops are written so that any grid gives the same elements to someone, which is what lets
the simulator run them on a grid of two one-warp blocks.

Reductions (sum, dot) accumulate in float64 per thread, combine a block's threads with a tree
in shared memory, write one partial per block, and add the partials with a second launch of
the same kernel on one block: no floating-point atomics, so the result is deterministic for a
given grid (that is, for a given GPU model). Histograms count into per-block shared-memory
histograms (when the bins fit) and add them to the global counts with integer atomics, which
are exact. mc_pi draws from numba's xoroshiro128+ generators, one per thread.

The ``*_device`` functions launch on device arrays without synchronising: the GPU variants in
`basic` and `stream` wrap them with copies in and out, and `bench/gpu_kernels.py` times them
on resident data. As in `cuda_linalg`, the kernels are module-level Python functions naming a
``cuda`` global that `_kernels()` binds to numba.cuda just before they are compiled.
"""

from __future__ import annotations

import functools
import math
import threading
from collections import OrderedDict
from types import SimpleNamespace
from typing import Any

import numpy as np

from . import cuda_random
from .cuda_device import block_sum_py
from .cuda_staging import Stage, launch_and_prepare, prepare, stage_for
from .cuda_support import STREAM_THREADS, jit_kernels, simulated, stream_grid
from .cuda_support import cuda as _import_cuda

cuda: Any = None  # numba.cuda, bound by _kernels() before any compile
xoroshiro128p_uniform_float64: Any = None  # numba.cuda.random's, bound by _kernels()

REDUCE_THREADS = STREAM_THREADS
"""Block size of the reductions; a power of two, and the size of their shared buffers."""

HIST_SHARED_BINS = 4096
"""Histograms with at most this many bins count per block in shared memory (16 KiB of int32);
larger ones go straight to global atomics."""

MC_THREADS = 64
MC_MAX_BLOCKS = 4096  # 262,144 generators: about one per resident thread of an H100/H200
MC_MIN_SAMPLES_PER_THREAD = 256
"""mc_pi's grid depends on the sample count only, never on the device, so an estimate is the
same on every GPU model and under the simulator: results are deterministic per (samples, seed).
Blocks are small (64 threads) so that small sample counts need few generators: each is a
thread's work to seed (`cuda_random`), and much more under the simulator."""


# -- device functions ---------------------------------------------------------------------


def _bin_index_py(v: Any, lo: Any, span: Any, bins_real: Any, edges: Any) -> int:
    """The bin of lo <= v <= hi, computed exactly as np.histogram does for uniform bins.

    In the array's dtype: ((v - lo) / (hi - lo)) * bins, truncated, the top edge folded into
    the last bin, then corrected by one against the linspace edges (NumPy's ~1 ulp fix-up).
    """
    bins = edges.size - 1
    b = int(((v - lo) / span) * bins_real)
    if b >= bins:
        b = bins - 1
    if v < edges[b]:
        b -= 1
    elif b != bins - 1 and v >= edges[b + 1]:
        b += 1
    return b


block_sum: Any = None  # force-inlined device versions, bound by _kernels()
bin_index: Any = None


# -- kernels ------------------------------------------------------------------------------


def _vadd(a: Any, b: Any, out: Any) -> None:
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < out.size:
        out[i] = a[i] + b[i]
        i += stride


def _saxpy(alpha: Any, x: Any, y: Any, out: Any) -> None:
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < out.size:
        out[i] = alpha * x[i] + y[i]
        i += stride


def _sum_partials(x: Any, partials: Any) -> None:
    """partials[block] = float64 sum of this block's grid-stride share of x."""
    buf = cuda.shared.array(REDUCE_THREADS, partials.dtype)
    # np.float64, not 0.0: the simulator runs this as NumPy, where 0.0 + float32 is float32.
    acc = np.float64(0.0)
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < x.size:
        acc += x[i]
        i += stride
    total = block_sum(buf, acc)
    if cuda.threadIdx.x == 0:
        partials[cuda.blockIdx.x] = total


def _dot_partials(x: Any, y: Any, partials: Any) -> None:
    """partials[block] = float64 sum of x * y over this block's share (products in float64)."""
    buf = cuda.shared.array(REDUCE_THREADS, partials.dtype)
    acc = np.float64(0.0)
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < x.size:
        # The product of two float32s is exact in float64: convert before multiplying.
        acc += np.float64(x[i]) * np.float64(y[i])
        i += stride
    total = block_sum(buf, acc)
    if cuda.threadIdx.x == 0:
        partials[cuda.blockIdx.x] = total


def _histogram_shared(x: Any, lo: Any, hi: Any, span: Any, bins_real: Any, edges: Any, counts: Any) -> None:
    """counts += histogram of x, counted per block in shared memory first."""
    local = cuda.shared.array(HIST_SHARED_BINS, "int32")
    bins = counts.size
    t = cuda.threadIdx.x
    for k in range(t, bins, cuda.blockDim.x):
        local[k] = 0
    cuda.syncthreads()
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < x.size:
        v = x[i]
        if v >= lo and v <= hi:  # NaN fails both: dropped, as NumPy drops it
            cuda.atomic.add(local, bin_index(v, lo, span, bins_real, edges), 1)
        i += stride
    cuda.syncthreads()
    for k in range(t, bins, cuda.blockDim.x):
        if local[k] != 0:
            cuda.atomic.add(counts, k, local[k])


def _histogram_global(x: Any, lo: Any, hi: Any, span: Any, bins_real: Any, edges: Any, counts: Any) -> None:
    """counts += histogram of x, with global atomics (for more bins than shared memory holds)."""
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < x.size:
        v = x[i]
        if v >= lo and v <= hi:
            cuda.atomic.add(counts, bin_index(v, lo, span, bins_real, edges), 1)
        i += stride


def _mc_pi(states: Any, samples: Any, hits: Any) -> None:
    """hits += points inside the quarter circle; thread t draws samples t, t + T, t + 2T, ..."""
    buf = cuda.shared.array(MC_THREADS, hits.dtype)
    tid = cuda.grid(1)
    i = tid
    stride = cuda.gridsize(1)
    inside = 0
    while i < samples:
        px = xoroshiro128p_uniform_float64(states, tid)
        py = xoroshiro128p_uniform_float64(states, tid)
        if px * px + py * py < 1.0:
            inside += 1
        i += stride
    total = block_sum(buf, inside)
    if cuda.threadIdx.x == 0:
        cuda.atomic.add(hits, 0, total)


@functools.cache
def _kernels() -> SimpleNamespace:
    """The ``cuda.jit`` kernels of this module (numba compiles each on its first launch)."""
    global xoroshiro128p_uniform_float64
    _import_cuda()
    from numba.cuda import random as cuda_random

    xoroshiro128p_uniform_float64 = cuda_random.xoroshiro128p_uniform_float64
    return jit_kernels(
        globals(),
        {
            "vadd": _vadd,
            "saxpy": _saxpy,
            "sum_partials": _sum_partials,
            "dot_partials": _dot_partials,
            "histogram_shared": _histogram_shared,
            "histogram_global": _histogram_global,
            "mc_pi": _mc_pi,
        },
        {"block_sum": block_sum_py, "bin_index": _bin_index_py},
    )


# -- launching on device arrays -----------------------------------------------------------


def vadd_device(a: Any, b: Any, out: Any) -> None:
    """out = a + b on equal-length 1-D device arrays (no synchronisation)."""
    if out.size:
        _kernels().vadd[stream_grid(out.size)](a, b, out)


def saxpy_device(alpha: float, x: Any, y: Any, out: Any) -> None:
    """out = alpha * x + y; alpha is taken in x's dtype, as the CPU variant takes it."""
    if out.size:
        _kernels().saxpy[stream_grid(out.size)](x.dtype.type(alpha), x, y, out)


def reduction_buffers(n: int) -> tuple[Any, Any]:
    """(partials, total): the float64 device arrays a sum or dot over `n` items writes."""
    numba_cuda = _import_cuda()
    return numba_cuda.device_array(stream_grid(n)[0], np.float64), numba_cuda.device_array(1, np.float64)


def _finish_reduction(partials: Any, total: Any) -> Any:
    """total[0] = the partials added by one block, in a fixed order; returns total."""
    threads = stream_grid(1)[1] if simulated() else REDUCE_THREADS
    _kernels().sum_partials[1, threads](partials, total)
    return total


def sum_device(x: Any, buffers: tuple[Any, Any] | None = None) -> Any:
    """Sum of a 1-D device array, accumulated in float64: a (1,) float64 device array.

    `buffers` (from `reduction_buffers(x.size)`) lets repeated calls skip two allocations.
    """
    partials, total = buffers or reduction_buffers(x.size)
    _kernels().sum_partials[stream_grid(x.size)](x, partials)
    return _finish_reduction(partials, total)


def dot_device(x: Any, y: Any, buffers: tuple[Any, Any] | None = None) -> Any:
    """Dot product of two equal-length 1-D device arrays in float64: a (1,) device array."""
    partials, total = buffers or reduction_buffers(x.size)
    _kernels().dot_partials[stream_grid(x.size)](x, y, partials)
    return _finish_reduction(partials, total)


def histogram_device(x: Any, lo: Any, hi: Any, edges: Any, counts: Any) -> None:
    """counts (int64, zeroed, len(edges) - 1 bins) += np.histogram-compatible counts of x.

    `lo`, `hi` are x's dtype scalars and `edges` is ``np.linspace(lo, hi, bins + 1)`` in that
    dtype, on the device: the exact edges NumPy corrects its bin indices against.
    """
    if not x.size:
        return
    dtype = x.dtype.type
    bins = counts.size
    args = (x, dtype(lo), dtype(hi), dtype(hi) - dtype(lo), dtype(bins), edges, counts)
    kernel = _kernels().histogram_shared if bins <= HIST_SHARED_BINS else _kernels().histogram_global
    kernel[stream_grid(x.size)](*args)


# -- host in, host out: staged (see `cuda_staging`) ----------------------------------------


def vadd_staged(a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """a + b for host arrays through this thread's staging buffers; None when not staged."""
    stage = stage_for(("vadd", a.dtype.str, a.size), (a, b), [((a.size,), a.dtype)])
    return None if stage is None else stage.run((a, b), _launch_vadd)[0]


def _launch_vadd(stage: Stage) -> None:
    relaunch = stage.memo.get("vadd")
    if relaunch is not None:
        relaunch()
        return
    a, b = stage.device_inputs
    (out,) = stage.device_outputs
    stage.memo["vadd"] = launch_and_prepare(_kernels().vadd, *stream_grid(out.size), (a, b, out))


def saxpy_staged(alpha: float, x: np.ndarray, y: np.ndarray) -> np.ndarray | None:
    """alpha * x + y for host arrays through staging buffers (alpha varies: launched plainly)."""
    stage = stage_for(("saxpy", x.dtype.str, x.size), (x, y), [((x.size,), x.dtype)])
    if stage is None:
        return None

    def launch(stage: Stage) -> None:
        d_x, d_y = stage.device_inputs
        saxpy_device(alpha, d_x, d_y, stage.device_outputs[0])

    return stage.run((x, y), launch)[0]


def reduction_staged(name: str, arrays: tuple[np.ndarray, ...]) -> float | None:
    """sum (one array) or dot (two) of host arrays through staging buffers, as a float."""
    first = arrays[0]
    stage = stage_for((name, first.dtype.str, first.size), arrays, [((1,), np.dtype(np.float64))])
    if stage is None:
        return None
    return float(stage.run(arrays, _launch_reduction)[0][0])


def _launch_reduction(stage: Stage) -> None:
    relaunches = stage.memo.get("reduce")
    if relaunches is not None:
        for relaunch in relaunches:
            relaunch()
        return
    inputs = tuple(stage.device_inputs)
    (total,) = stage.device_outputs
    n = inputs[0].size
    partials = _import_cuda().device_array(stream_grid(n)[0], np.float64)
    kernels = _kernels()
    first = kernels.sum_partials if len(inputs) == 1 else kernels.dot_partials
    threads = stream_grid(1)[1] if simulated() else REDUCE_THREADS
    stage.memo["reduce"] = (
        launch_and_prepare(first, *stream_grid(n), (*inputs, partials)),
        launch_and_prepare(kernels.sum_partials, 1, threads, (partials, total)),
    )


# -- reductions of device-resident arrays -------------------------------------------------

REDUCTION_PLANS = 16
"""Reductions over device arrays kept per thread (least recently used dropped): each holds
two small device buffers, 8 pinned bytes and two prepared launches, not the arrays."""

_LOCAL = threading.local()


def _address(array: Any) -> int:
    interface = getattr(array, "__cuda_array_interface__", None)
    if interface is not None:
        return int(interface["data"][0])
    return int(array.__array_interface__["data"][0])  # the simulator's fake arrays


class _Reduction:
    """A sum or dot over device arrays at fixed addresses: its buffers and prepared launches.

    Keyed by the arrays' addresses, size and dtype, never holding the arrays (a GPU slot may
    evict them): a call with the same key reads whatever array is at those addresses now,
    which has the layout the launches were prepared for.
    """

    def __init__(self, name: str, arrays: tuple[Any, ...]) -> None:
        numba_cuda = _import_cuda()
        kernels = _kernels()
        blocks, threads = stream_grid(arrays[0].size)
        finish = stream_grid(1)[1] if simulated() else REDUCE_THREADS
        first = kernels.sum_partials if name == "sum" else kernels.dot_partials
        self.partials = numba_cuda.device_array(blocks, np.float64)
        self.total = numba_cuda.device_array(1, np.float64)
        self.host = numba_cuda.pinned_array(1, np.float64)
        self.stream = numba_cuda.default_stream()
        first[blocks, threads](*arrays, self.partials)
        kernels.sum_partials[1, finish](self.partials, self.total)
        self.launches = (
            prepare(first, blocks, threads, (*arrays, self.partials)),
            prepare(kernels.sum_partials, 1, finish, (self.partials, self.total)),
        )

    def read(self) -> float:
        """The total of the last launches: one 8-byte copy, then this stream's work waited for."""
        self.total.copy_to_host(self.host, stream=self.stream)
        self.stream.synchronize()
        return float(self.host[0])

    def again(self) -> float:
        for launch in self.launches:
            assert launch is not None
            launch()
        return self.read()


def reduction_device(name: str, arrays: tuple[Any, ...]) -> float:
    """sum (one array) or dot (two) of 1-D device arrays, as a float.

    Repeated reductions of arrays at the same addresses (a GPU slot's resident value, summed
    by task after task) reuse their buffers and prepared launches: two launches, one 8-byte
    copy and one wait per call, no allocation and no argument marshalling.
    """
    first = arrays[0]
    key = (name, first.size, np.dtype(first.dtype).str, *(_address(array) for array in arrays))
    plans: OrderedDict[tuple[Any, ...], _Reduction] | None = getattr(_LOCAL, "plans", None)
    if plans is None:
        plans = _LOCAL.plans = OrderedDict()
    plan = plans.get(key)
    if plan is not None:
        plans.move_to_end(key)
        return plan.again()
    plan = _Reduction(name, arrays)
    value = plan.read()
    if first.size and all(launch is not None for launch in plan.launches):
        plans[key] = plan
        while len(plans) > REDUCTION_PLANS:
            plans.popitem(last=False)
    return value


def mc_pi_launch(samples: int) -> tuple[int, int]:
    """(blocks, threads) of mc_pi for `samples`: a function of the sample count alone."""
    per_block = MC_THREADS * MC_MIN_SAMPLES_PER_THREAD
    return max(1, min(MC_MAX_BLOCKS, math.ceil(samples / per_block))), MC_THREADS


def mc_pi_device(samples: int, seed: int) -> Any:
    """Points inside the quarter circle out of `samples`: a (1,) int64 device array.

    Generator g (g = global thread index) is xoroshiro128+ seeded as numba's
    ``create_xoroshiro128p_states(threads, seed)`` seeds it: stream g starts 2**64 steps after
    stream g - 1. The states are made on the device in parallel (`cuda_random`), not one after
    another on the CPU. Thread g draws (x, y) pairs for samples g, g + T, ... where
    T = blocks * threads.
    """
    numba_cuda = _import_cuda()
    blocks, threads = mc_pi_launch(samples)
    states = cuda_random.seeded_states(blocks * threads, seed)
    hits = numba_cuda.to_device(np.zeros(1, np.int64))
    _kernels().mc_pi[blocks, threads](states, np.int64(samples), hits)
    return hits
