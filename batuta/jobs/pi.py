"""Monte Carlo pi, split into coarse chunks with `pool.map("mc_pi", ...)`.

Each chunk draws its own seeded samples on a worker and returns its estimate of pi; the
chunks are equal, so their mean is the estimate over all samples. Few large chunks keep the
per-task overhead negligible next to the work (the "coarse granularity" advice). A few
seconds on two cores.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from batuta.jobs._data import job_backend

if TYPE_CHECKING:
    from batuta import Pool

CHUNKS = 16
SAMPLES_PER_CHUNK = 10_000_000


async def main(pool: Pool) -> str:
    chunks = [(SAMPLES_PER_CHUNK, seed) for seed in range(CHUNKS)]
    estimates = await pool.map("mc_pi", chunks, backend=job_backend())  # --backend
    samples = CHUNKS * SAMPLES_PER_CHUNK
    pi = sum(estimates) / len(estimates)
    return f"pi ~ {pi:.6f} (off by {abs(pi - math.pi):.1e}) from {samples:,} samples in {CHUNKS} chunks"
