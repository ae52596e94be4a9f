"""Linear regression over the pool: one map of `linreg_partial`, then a solve on the coordinator.

Each chunk's task returns its ``X^T X`` and ``X^T y`` (float64); the coordinator adds them in
chunk order and solves the normal equations ``X^T X w = X^T y``, a d x d system, whatever the
number of rows. The data are the seeded `_data.Regression` rows, generated where each task
runs (`linreg_partial_synth`), or the caller's x and y, shipped in chunks (`linreg_partial`).

The check compares the coefficients with `np.linalg.lstsq` on all rows in one process (a
QR/SVD solve, not the normal equations: they agree to about cond(X)^2 times the rounding
unit) and with the coefficients the data were made from (they differ by the noise).

`batuta run linreg` runs the default problem and prints that check.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from batuta import Backend
from batuta.errors import UsageError
from batuta.jobs._data import Bounds, Regression, job_backend, make_regression, positive, resolve_chunks

if TYPE_CHECKING:
    from batuta import Pool

N, D, SEED = 200_000, 64, 0
"""The default problem: about 0.2 s of kernel time on one core."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LinRegResult:
    coef: np.ndarray
    """(d,) float64: the least-squares coefficients."""
    xtx: np.ndarray
    xty: np.ndarray
    bounds: Bounds
    wall_s: float
    tasks: int
    data: Regression | None
    """The generated data set, or None when the caller passed x and y."""


def solve(xtx: np.ndarray, xty: np.ndarray) -> np.ndarray:
    """The coefficients from the normal equations; a clear error when X^T X is singular."""
    try:
        return np.linalg.solve(xtx, xty)
    except np.linalg.LinAlgError:
        raise UsageError(
            "X^T X is singular: some features are constant or linearly dependent; drop them and run again"
        ) from None


async def run_linreg(
    pool: Pool,
    *,
    n: int = N,
    d: int = D,
    seed: int = SEED,
    noise: float = 0.1,
    chunks: int | None = None,
    x: np.ndarray | None = None,
    y: np.ndarray | None = None,
    backend: Backend | None = None,
) -> LinRegResult:
    """Least squares over the pool: seeded data of `n` rows and `d` features, or the caller's x, y.

    `x` (rows, features) and `y` (rows,) must share a float dtype; they are shipped in chunks.
    `chunks` defaults to a few per CPU slot; `backend` (default: the job backend, `--backend`)
    GPU runs the CUDA variant.
    """
    backend = backend if backend is not None else job_backend()
    started = time.perf_counter()
    if (x is None) != (y is None):
        raise UsageError("pass both x and y, or neither (for the seeded data set)")
    data: Regression | None = None
    if x is not None and y is not None:
        n, d = x.shape
        bounds = resolve_chunks(pool, n, chunks)
        items = [(x[s : s + c], y[s : s + c]) for s, c in bounds]
        partials = await pool.map("linreg_partial", items, backend=backend)
    else:
        data = make_regression(seed, positive("n", n), positive("d", d), noise)
        bounds = resolve_chunks(pool, n, chunks)
        partials = await pool.map("linreg_partial_synth", [data.recipe(s, c) for s, c in bounds], backend=backend)
    xtx = partials[0][0].copy()
    xty = partials[0][1].copy()
    for chunk_xtx, chunk_xty in partials[1:]:
        xtx += chunk_xtx
        xty += chunk_xty
    coef = solve(xtx, xty)
    return LinRegResult(
        coef=coef,
        xtx=xtx,
        xty=xty,
        bounds=bounds,
        wall_s=time.perf_counter() - started,
        tasks=len(partials),
        data=data,
    )


def lstsq_reference(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares coefficients of all rows in one process, by NumPy's SVD-based solver."""
    return np.linalg.lstsq(x.astype(np.float64), y.astype(np.float64), rcond=None)[0]


async def main(pool: Pool) -> str:
    result = await run_linreg(pool)
    assert result.data is not None
    x, y = result.data.rows(0, N)
    reference = await asyncio.to_thread(lstsq_reference, x, y)  # keeps the pool's loop alive
    diff = float(np.abs(result.coef - reference).max())
    off = float(np.abs(result.coef - result.data.coef).max())
    print(
        f"linear regression check: max |coef - np.linalg.lstsq| = {diff:.3g}; "
        f"max |coef - generating coef| = {off:.3g} (noise)"
    )
    if not diff <= 1e-9 * max(1.0, float(np.abs(reference).max())):
        raise AssertionError(f"coefficients differ from np.linalg.lstsq by {diff:.3g}")
    return (
        f"linear regression: {N:,} x {D} rows in {len(result.bounds)} chunks ({result.wall_s:.2f} s); "
        f"coefficients match np.linalg.lstsq to {diff:.1e}"
    )
