"""Durations kept for a run summary's percentiles, in memory bounded however long the run.

`batuta run` prints p50/p95/p99 of every task's latency and run time, and p50/p95 of each
host's run times. It kept every sample (8 bytes each, three per task: 24 bytes a task,
23 MiB a million tasks, the only thing in a served coordinator that grew with the task
count). A `Samples` keeps them exactly up to `exact_limit`, so a run of that size prints
what it always did, then folds them into log-spaced buckets GROWTH apart: a bucket count
each, a few thousand buckets at most from a nanosecond to a day, whatever the task count.
A percentile read from the buckets is within RELATIVE_ERROR of the exact one, and the
smallest and largest samples stay exact.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence

EXACT_LIMIT = 100_000  # samples kept as they are (800 KB), so most runs' percentiles are exact
GROWTH = 1.01  # a bucket's upper edge over its lower one
RELATIVE_ERROR = (GROWTH - 1) / (GROWTH + 1)  # a bucket's midpoint is this close to any value in it
TINY_S = 1e-9  # below a nanosecond a duration counts as zero (its own bucket)
_LOG_GROWTH = math.log(GROWTH)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of ascending `sorted_values`, linearly interpolated; NaN if empty."""
    if not sorted_values:
        return math.nan
    rank = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


class Samples:
    """Non-negative durations (seconds) to take percentiles of; see the module docstring."""

    __slots__ = ("_buckets", "_count", "_exact", "_limit", "_max", "_min")

    def __init__(self, exact_limit: int = EXACT_LIMIT) -> None:
        self._limit = exact_limit
        self._exact: array[float] | None = array("d")  # None once folded into the buckets
        self._buckets: dict[int, int] = {}  # bucket index -> count: k holds TINY_S * GROWTH**(k-1..k], -1 zero
        self._count = 0
        self._min = math.inf
        self._max = -math.inf

    def __len__(self) -> int:
        return self._count

    @property
    def exact(self) -> bool:
        """Whether every sample is still kept (and so the percentiles are exact)."""
        return self._exact is not None

    @property
    def buckets(self) -> int:
        """How many buckets hold samples (0 while they are exact): what memory the samples take."""
        return len(self._buckets)

    def append(self, seconds: float) -> None:
        self._count += 1
        if seconds < self._min:
            self._min = seconds
        if seconds > self._max:
            self._max = seconds
        exact = self._exact
        if exact is None:
            self._add_to_bucket(seconds)
            return
        exact.append(seconds)
        if len(exact) > self._limit:
            self._exact = None
            for value in exact:
                self._add_to_bucket(value)

    def _add_to_bucket(self, seconds: float) -> None:
        index = math.ceil(math.log(seconds / TINY_S) / _LOG_GROWTH) if seconds >= TINY_S else -1
        buckets = self._buckets
        buckets[index] = buckets.get(index, 0) + 1

    def percentiles(self, qs: Sequence[int]) -> dict[str, float]:
        """{"p50": ..., ...} for each q in `qs`: NaN for each when there is no sample."""
        if self._exact is not None:
            ordered = sorted(self._exact)
            return {f"p{q}": percentile(ordered, q) for q in qs}
        # the value at each 0-based rank, from the buckets' cumulative counts
        edges: list[tuple[int, float]] = []  # (last rank in the bucket, the bucket's value), ascending
        seen = 0
        for index in sorted(self._buckets):
            seen += self._buckets[index]
            value = 0.0 if index < 0 else TINY_S * 2 * GROWTH**index / (GROWTH + 1)
            edges.append((seen - 1, min(max(value, self._min), self._max)))

        def at(rank: int) -> float:
            return next(value for last, value in edges if last >= rank)

        out: dict[str, float] = {}
        for q in qs:
            rank = (self._count - 1) * q / 100.0
            low = math.floor(rank)
            high = min(low + 1, self._count - 1)
            below, above = at(low), at(high)
            out[f"p{q}"] = below + (above - below) * (rank - low)
        return out
