"""Shared pieces of the ML jobs (`kmeans`, `linreg`, `forest`, `mlp`): data recipes and chunks.

The jobs' data sets are seeded and synthetic, and they live on the workers: a task carries
the recipe of its rows (`batuta.kernels.ml_data`: a seed, the first row, a row count and a
few small parameter arrays) and generates them where it runs, so an iteration ships only
parameters. The same rows come out, bit for bit, wherever and however they are chunked; the
coordinator generates them with NumPy for the reference checks.

Chunks are contiguous row ranges fixed when a job starts. A few per CPU slot
(`TASKS_PER_SLOT`) leave work to steal when slots run at different speeds, while keeping
each task long next to its round trip. Results are reduced in chunk order, never in
completion order, so a run is reproducible; pass the same `chunks` to get the same bits on
any number of slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from batuta.core.task import CAP_CPU, CAP_GPU, Backend
from batuta.errors import UsageError
from batuta.kernels import ml_data

if TYPE_CHECKING:
    from batuta import Pool

TASKS_PER_SLOT = 4
"""Default tasks per CPU slot for one map: enough to even out, few enough to stay coarse."""

Bounds = tuple[tuple[int, int], ...]
"""Chunks as (first row, row count), in row order."""


_BACKEND: list[Backend] = [Backend.CPU]


def job_backend() -> Backend:
    """The backend the built-in jobs run their kernels on: `batuta run JOB --backend gpu` (or
    `batuta tui --backend`) sets it for the process; CPU unless told."""
    return _BACKEND[0]


def set_job_backend(backend: Backend | str) -> None:
    _BACKEND[0] = Backend(backend)


def cpu_slot_count(pool: Pool) -> int:
    """CPU slots of `pool` that are up now (at least 1, so chunk counts stay positive)."""
    return max(1, sum(1 for s in pool.slots() if CAP_CPU in s.capabilities and s.state == "up"))


def gpu_slot_count(pool: Pool) -> int:
    """GPU slots of `pool` that are up now (at least 1)."""
    return max(1, sum(1 for s in pool.slots() if CAP_GPU in s.capabilities and s.state == "up"))


def chunk_bounds(n: int, chunks: int) -> Bounds:
    """`n` rows in `chunks` contiguous ranges whose sizes differ by at most one (none empty)."""
    if n < 1 or chunks < 1:
        raise UsageError(f"need at least one row and one chunk, got n={n}, chunks={chunks}")
    chunks = min(chunks, n)
    base, extra = divmod(n, chunks)
    bounds = []
    start = 0
    for i in range(chunks):
        rows = base + (1 if i < extra else 0)
        bounds.append((start, rows))
        start += rows
    return tuple(bounds)


def resolve_chunks(pool: Pool, n: int, chunks: int | None, backend: Backend = Backend.CPU) -> Bounds:
    """The chunks of a job: `chunks` of them, or `TASKS_PER_SLOT` per CPU slot of `pool`; on
    the GPU backend one per GPU slot (a GPU goes through a chunk in well under a round trip,
    so more chunks only add round trips)."""
    if chunks is None:
        chunks = gpu_slot_count(pool) if backend is Backend.GPU else TASKS_PER_SLOT * cpu_slot_count(pool)
    return chunk_bounds(n, chunks)


def sub_seed(seed: int, stream: int) -> int:
    """An independent seed for one purpose (data, initialisation, tree i) derived from `seed`."""
    return int(ml_data.splitmix64(stream, seed & ml_data.MAX_UINT64))


def positive(name: str, value: int, minimum: int = 1) -> int:
    """`value` if it is an int >= `minimum`, else a UsageError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise UsageError(f"{name} must be an int >= {minimum}, not {value!r}")
    return int(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class Blobs:
    """K-means data: row i around ``centers[i % clusters]``, off by ``spread`` in each coordinate."""

    seed: int
    n: int
    centers: np.ndarray
    spread: float

    def rows(self, start: int, count: int) -> np.ndarray:
        return ml_data.blobs(self.seed, start, count, self.centers, self.spread)

    def recipe(self, start: int, count: int) -> tuple[Any, ...]:
        """The first arguments of `kmeans_partial_synth` for these rows."""
        return (self.seed, start, count, self.centers, self.spread)


def make_blobs(seed: int, n: int, d: int, clusters: int, spread: float = 1.0) -> Blobs:
    centers = np.random.default_rng(sub_seed(seed, 1)).uniform(-10.0, 10.0, (clusters, d))
    return Blobs(seed=sub_seed(seed, 2), n=n, centers=centers, spread=spread)


@dataclass(frozen=True, slots=True, kw_only=True)
class Regression:
    """Linear regression data: ``y = x @ coef + noise * e`` with x and e in (-1, 1)."""

    seed: int
    n: int
    coef: np.ndarray
    noise: float

    def rows(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        return ml_data.regression(self.seed, start, count, self.coef, self.noise)

    def recipe(self, start: int, count: int) -> tuple[Any, ...]:
        """The arguments of `linreg_partial_synth` for these rows."""
        return (self.seed, start, count, self.coef, self.noise)


def make_regression(seed: int, n: int, d: int, noise: float = 0.1) -> Regression:
    coef = np.random.default_rng(sub_seed(seed, 1)).uniform(-2.0, 2.0, d)
    return Regression(seed=sub_seed(seed, 2), n=n, coef=coef, noise=noise)


@dataclass(frozen=True, slots=True, kw_only=True)
class Teacher:
    """Classification data: the label of x is ``argmax(x @ weights + noise * e)``."""

    seed: int
    n: int
    weights: np.ndarray
    noise: float

    @property
    def classes(self) -> int:
        return int(self.weights.shape[1])

    def rows(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        return ml_data.teacher(self.seed, start, count, self.weights, self.noise)

    def recipe(self, start: int, count: int) -> tuple[Any, ...]:
        """The data arguments of `mlp_grad_synth` for these rows."""
        return (self.seed, start, count, self.weights, self.noise)


def make_teacher(seed: int, n: int, d: int, classes: int, noise: float = 0.5) -> Teacher:
    weights = np.random.default_rng(sub_seed(seed, 1)).standard_normal((d, classes))
    return Teacher(seed=sub_seed(seed, 2), n=n, weights=weights, noise=noise)
