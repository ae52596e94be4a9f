"""The host round trip the runtime measures from results, and hands the scheduler."""

from __future__ import annotations

import numpy as np
import pytest

from batuta import Pool, Task
from batuta.runtime.pool import PoolConfig, local_host
from batuta.runtime.round_trip import BATCH, FIRST_BATCH, RoundTripMeter


def feed(meter: RoundTripMeter, delays: list[float], run_s: float = 0.0) -> list[float]:
    """Results sent at t=0 and received after `delays` (each ran `run_s`): the estimates reported."""
    out = []
    for delay in delays:
        estimate = meter.sample(0.0, delay, run_s)
        if estimate is not None:
            out.append(estimate)
    return out


def test_the_first_estimate_is_the_smallest_of_the_first_results_less_their_run_time() -> None:
    meter = RoundTripMeter()
    # queueing behind earlier tasks only adds: the minimum is the round trip of a task that did not wait
    delays = [0.0130, 0.0052, 0.0090, 0.0051, 0.0200, 0.0070, 0.0066, 0.0080]
    assert len(delays) == FIRST_BATCH
    assert feed(meter, delays[:-1], run_s=0.004) == []
    assert feed(meter, delays[-1:], run_s=0.004) == [pytest.approx(0.0011)]


def test_later_estimates_come_per_batch_and_only_when_they_moved() -> None:
    meter = RoundTripMeter()
    feed(meter, [0.002] * FIRST_BATCH)
    assert meter.reported == pytest.approx(0.002)
    assert feed(meter, [0.0022] * BATCH) == []  # within a quarter: the scheduler is not bothered
    assert feed(meter, [0.020] * (BATCH - 1) + [0.010]) == [pytest.approx(0.010)]  # a slower link
    assert feed(meter, [0.0003] * BATCH) == [pytest.approx(0.0003)]


def test_a_run_time_longer_than_the_wait_counts_as_no_round_trip() -> None:
    meter = RoundTripMeter()
    assert feed(meter, [0.001] * FIRST_BATCH, run_s=0.5) == [0.0]


async def test_a_pool_tells_its_scheduler_the_round_trip_it_measured() -> None:
    async with Pool([local_host(1, gpus="none")], PoolConfig()) as pool:
        scheduler = pool._scheduler
        assert scheduler._round_trip == {}  # nothing measured yet: windows use the default
        x = np.ones(16)
        for _ in range(FIRST_BATCH):
            assert (await pool.run(Task.kernel("sum", x))).is_success()
        measured = scheduler._round_trip.get("local")
    assert measured is not None and 0.0 < measured < 5.0
