"""K-means (Lloyd's algorithm) over the pool: each iteration maps `kmeans_partial` over chunks.

Per iteration every chunk's task assigns its rows to the nearest centroid and returns the
per-cluster sums, counts and inertia; the coordinator adds them in chunk order and moves each
centroid to the mean of its rows (a centroid that lost all its rows stays put). The data are
the seeded blobs of `_data.Blobs`, generated where each task runs (`kmeans_partial_synth`),
or the caller's own array, shipped in chunks (`kmeans_partial`).

Deterministic, to the bit: the CPU kernel sums exactly as the NumPy reference does and the
reduction order is fixed, so the final centroids equal those of `kmeans_reference` (one
process, same initial centroids, same chunks) in every bit, on any number of slots. With a
checkpoint manager (`batuta run kmeans --journal DIR`), the state is saved after every
iteration and a resumed run continues from the last one, to the same bits.

`batuta run kmeans` runs the default problem and prints the check against the reference;
`batuta run kmeans --backend gpu` runs it on the GPU slots with the data put once and kept on
the cards (within a relative 1e-6 of the reference: GPU sums are added in varying order).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from batuta import Backend, ObjectRef
from batuta.errors import UsageError
from batuta.jobs._data import Blobs, Bounds, job_backend, make_blobs, positive, resolve_chunks, sub_seed
from batuta.kernels import registry

if TYPE_CHECKING:
    from batuta import Pool
    from batuta.observers.checkpoint import CheckpointManager

N, D, K, ITERATIONS, SEED = 100_000, 16, 32, 10, 0
"""The default problem: under a second of kernel time on one core; the NumPy check takes longer."""


@dataclass(frozen=True, slots=True, kw_only=True)
class KMeansResult:
    centroids: np.ndarray
    """(k, d) float64, after the last iteration."""
    counts: np.ndarray
    """(k,) int64: rows per cluster in the last assignment."""
    inertia: tuple[float, ...]
    """Sum of squared distances to the assigned centroid, per iteration (before its update)."""
    initial: np.ndarray
    bounds: Bounds
    wall_s: float
    tasks: int
    data: Blobs | None
    """The generated data set, or None when the caller passed `x`."""
    resumed_from: int | None = None
    """The iteration a resumed run started at, or None."""


def initial_centroids(data: Blobs, k: int, seed: int) -> np.ndarray:
    """`k` distinct rows of the data set, chosen with `seed` (Forgy initialisation), as float64."""
    if k > data.n:
        raise UsageError(f"k-means needs k <= n, got k={k} for n={data.n} rows")
    picks = np.sort(np.random.default_rng(sub_seed(seed, 3)).choice(data.n, size=k, replace=False))
    return np.concatenate([data.rows(int(i), 1) for i in picks]).astype(np.float64)


def update(centroids: np.ndarray, partials: list[tuple[np.ndarray, np.ndarray, float]]) -> tuple[Any, ...]:
    """Add the chunks' (sums, counts, inertia) in order; new centroids, counts and inertia."""
    sums = partials[0][0].copy()
    counts = partials[0][1].copy()
    inertia = float(partials[0][2])
    for chunk_sums, chunk_counts, chunk_inertia in partials[1:]:
        sums += chunk_sums
        counts += chunk_counts
        inertia += float(chunk_inertia)
    moved = centroids.copy()
    filled = counts > 0
    moved[filled] = sums[filled] / counts[filled, None]
    return moved, counts, inertia


async def run_kmeans(
    pool: Pool,
    *,
    n: int = N,
    d: int = D,
    k: int = K,
    iterations: int = ITERATIONS,
    seed: int = SEED,
    clusters: int | None = None,
    spread: float = 1.5,
    chunks: int | None = None,
    x: np.ndarray | None = None,
    backend: Backend | None = None,
    checkpoints: CheckpointManager | None = None,
) -> KMeansResult:
    """`iterations` of Lloyd's algorithm with `k` clusters over the pool.

    Without `x`, the data are `n` seeded blob rows of `d` features around `clusters`
    (default `k`) centers, generated on the workers; with `x` (rows, features; float32 or
    float64, C-contiguous), those rows are put in the pool in chunks, once, and `n`, `d` are
    taken from it. `backend` defaults to the job backend (`--backend`, CPU); on GPU the
    chunks (one per GPU slot by default) are put once and stay on the cards across
    iterations, so an iteration moves only the centroids. `chunks` defaults to a few per
    CPU slot.
    """
    backend = backend if backend is not None else job_backend()
    positive("k", k)
    positive("iterations", iterations, minimum=0)
    if x is not None:
        rows = np.ascontiguousarray(x)
        n, d = rows.shape
        data = None
        if k > n:
            raise UsageError(f"k-means needs k <= n, got k={k} for n={n} rows")
        initial = rows[np.sort(np.random.default_rng(sub_seed(seed, 3)).choice(n, size=k, replace=False))]
        initial = initial.astype(np.float64)
    else:
        data = make_blobs(seed, positive("n", n), positive("d", d), clusters or k, spread)
        initial = initial_centroids(data, k, seed)
    bounds = resolve_chunks(pool, n, chunks, backend)
    params = {
        "n": n,
        "d": d,
        "k": k,
        "seed": seed,
        "clusters": clusters or k,
        "spread": spread,
        "bounds": [list(b) for b in bounds],
        "shipped": x is not None,
    }
    inertia: list[float] = []
    centroids, counts, first = initial, np.zeros(k, np.int64), 0
    if checkpoints is not None:
        centroids, inertia, counts, first = await _resume(checkpoints, params, centroids, inertia, counts)
    started = time.perf_counter()
    tasks = 0
    resident: list[ObjectRef] = []  # chunks put once: shipped data, or any data on GPUs
    if data is None:
        resident = [pool.put(rows[start : start + count]) for start, count in bounds]
    elif backend is Backend.GPU and first < iterations:
        resident = [pool.put(data.rows(start, count)) for start, count in bounds]
    try:
        for iteration in range(first, iterations):
            if resident:
                partials = await pool.map("kmeans_partial", [(ref, centroids) for ref in resident], backend=backend)
            else:
                assert data is not None
                items = [(*data.recipe(start, count), centroids) for start, count in bounds]
                partials = await pool.map("kmeans_partial_synth", items, backend=backend)
            tasks += len(bounds)
            centroids, counts, total = update(centroids, partials)
            inertia.append(total)
            if checkpoints is not None:
                state = {"iteration": iteration, "centroids": centroids, "counts": counts, "inertia": inertia}
                await checkpoints.save(f"kmeans_{iteration:06d}", {**state, "params": params})
    finally:
        for ref in resident:
            pool.drop(ref)
    return KMeansResult(
        centroids=centroids,
        counts=counts,
        inertia=tuple(inertia),
        initial=initial,
        bounds=bounds,
        wall_s=time.perf_counter() - started,
        tasks=tasks,
        data=data,
        resumed_from=first if first else None,
    )


async def _resume(
    checkpoints: CheckpointManager, params: dict[str, Any], centroids: np.ndarray, inertia: list[float], counts: Any
) -> tuple[np.ndarray, list[float], np.ndarray, int]:
    last = await checkpoints.latest()
    if last is None:
        return centroids, inertia, counts, 0
    state = last.state
    if state.get("params") != params:
        raise UsageError(
            f"checkpoint {last.name!r} was saved by a k-means run with other parameters (size, k, seed or "
            "chunks); resume with the same ones, or start afresh without --resume"
        )
    return (
        np.array(state["centroids"], dtype=np.float64),
        [float(v) for v in state["inertia"]],
        np.array(state["counts"], dtype=np.int64),
        int(state["iteration"]) + 1,
    )


def kmeans_reference(
    x_chunks: list[np.ndarray], initial: np.ndarray, iterations: int
) -> tuple[np.ndarray, tuple[float, ...]]:
    """The same iterations in this process with the NumPy reference kernel: (centroids, inertia)."""
    centroids, inertia = initial.astype(np.float64), []
    for _ in range(iterations):
        partials = [registry.reference("kmeans_partial", (chunk, centroids)) for chunk in x_chunks]
        centroids, _counts, total = update(centroids, partials)
        inertia.append(total)
    return centroids, tuple(inertia)


def reference_of(result: KMeansResult, x: np.ndarray | None = None) -> tuple[np.ndarray, tuple[float, ...]]:
    """`kmeans_reference` on the data, chunks and initial centroids of a `run_kmeans` result."""
    if result.data is not None:
        chunks = [result.data.rows(start, count) for start, count in result.bounds]
    elif x is not None:
        chunks = [x[start : start + count] for start, count in result.bounds]
    else:
        raise UsageError("the run used the caller's x: pass it to reference_of")
    return kmeans_reference(chunks, result.initial, len(result.inertia))


GPU_TOLERANCE = 1e-6
"""On GPUs the sums are added by atomics, in an order that varies: the check allows this much
relative difference (an assignment that flipped would be far larger)."""


async def main(pool: Pool) -> str:
    from batuta.observers.checkpoint import job_checkpoints

    on_gpu = job_backend() is Backend.GPU
    result = await run_kmeans(pool, checkpoints=job_checkpoints())
    centroids, inertia = await asyncio.to_thread(reference_of, result)  # keeps the pool's loop alive
    diff = float(np.abs(result.centroids - centroids).max())
    if on_gpu:
        same = bool(np.allclose(result.centroids, centroids, rtol=GPU_TOLERANCE, atol=GPU_TOLERANCE))
        verdict = f"within {GPU_TOLERANCE:g}" if same else "DIFFERENT"
    else:
        same = np.array_equal(result.centroids, centroids) and result.inertia == inertia
        verdict = "bit-identical" if same else "DIFFERENT"
    print(
        f"k-means check: max |centroid - single-process reference| = {diff:.3g} "
        f"({verdict}); inertia {result.inertia[0]:.6g} -> {result.inertia[-1]:.6g}"
    )
    if not same:
        raise AssertionError("k-means centroids differ from the single-process reference")
    agree = (
        f"are within {GPU_TOLERANCE:g} of the reference (GPU, data resident)"
        if on_gpu
        else "equal the reference in every bit"
    )
    return (
        f"k-means: {N:,} x {D} rows, k={K}, {ITERATIONS} iterations in {len(result.bounds)} chunks "
        f"({result.tasks} tasks, {result.wall_s:.2f} s); centroids {agree}"
    )
