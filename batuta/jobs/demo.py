"""The demo job: uneven work spread over the pool, then Monte Carlo pi in coarse chunks.

Three hundred `spin` tasks with seeded lognormal durations (median 4 ms, a long tail: the
imbalance case from DESIGN.md's measurements) show the pool evening out uneven work; a
Monte Carlo estimate of pi through `pool.map` shows the coarse granularity that keeps the
per-task overhead small. A few seconds on two cores.
"""

from __future__ import annotations

import asyncio
import math
import random
from typing import TYPE_CHECKING

from batuta import Task
from batuta.jobs._data import job_backend

if TYPE_CHECKING:
    from batuta import Pool

SEED = 0  # the durations and the pi samples are the same on every run
SPIN_TASKS = 300
SPIN_MEDIAN_S = 0.004
SPIN_SIGMA = 0.8  # lognormal shape: most tasks short, a few ten times longer
SPIN_MAX_S = 0.1
PI_CHUNKS = 8
PI_SAMPLES_PER_CHUNK = 2_000_000


def spin_durations(count: int, seed: int) -> list[float]:
    """`count` seeded lognormal durations in seconds, capped at `SPIN_MAX_S`."""
    rng = random.Random(seed)
    return [min(rng.lognormvariate(math.log(SPIN_MEDIAN_S), SPIN_SIGMA), SPIN_MAX_S) for _ in range(count)]


async def main(pool: Pool) -> str:
    durations = spin_durations(SPIN_TASKS, SEED)
    spins = [await pool.submit(Task.kernel("spin", seconds)) for seconds in durations]
    chunks = [(PI_SAMPLES_PER_CHUNK, SEED + i) for i in range(PI_CHUNKS)]
    estimates = await pool.map("mc_pi", chunks, backend=job_backend())  # --backend
    results = await asyncio.gather(*spins)
    samples = PI_CHUNKS * PI_SAMPLES_PER_CHUNK
    pi = sum(estimates) / len(estimates)  # equal chunks: the mean is the estimate over all samples
    ran = sum(1 for result in results if result.is_success())
    return (
        f"pi ~ {pi:.5f} from {samples:,} samples in {PI_CHUNKS} chunks; "
        f"{ran}/{len(results)} spin tasks, {sum(durations):.2f} s of uneven work"
    )
