"""A log-scale latency histogram: fixed buckets, O(1) insert, percentiles from the buckets.

Task latencies span microseconds (a `noop` on a warm slot) to minutes (a training step),
so the buckets are logarithmic: `BUCKETS_PER_DECADE` per power of ten from `LOW_S` up.
Fixed edges make histograms mergeable by adding counts, which is how the latency panel
combines the per-(kernel, backend, host) histograms its filter selects. A percentile is
the mean of the samples in the bucket that holds it (each bucket keeps a sum too), so it
is exact when a bucket holds one value and otherwise within one bucket's width (a factor
of 1.58 at 5 buckets per decade), which is what a glance at a dashboard needs; exact
percentiles (to 0.5% past 100,000 tasks) are `batuta run`'s summary's job.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

LOW_S = 1e-6  # lower edge of the first bucket: one microsecond
DECADES = 9  # 1 us .. 1000 s
BUCKETS_PER_DECADE = 5
BUCKET_COUNT = DECADES * BUCKETS_PER_DECADE
_LOG_LOW = math.log10(LOW_S)
# A batch this long is counted with numpy: about 80 ns a value against 400 in the loop, once
# its fixed cost (some 20 us) is paid. A pool of short tasks with the dashboard attached
# fills the histograms with a thousand values a tick, two a task, on the coordinator's loop.
ARRAY_FROM = 256


def bucket_of(seconds: float) -> int:
    """The bucket index of a duration; values outside the range land in the end buckets."""
    if seconds <= LOW_S:
        return 0
    index = int((math.log10(seconds) - _LOG_LOW) * BUCKETS_PER_DECADE)
    return index if index < BUCKET_COUNT else BUCKET_COUNT - 1


def bucket_low(index: int) -> float:
    """The lower edge of bucket `index`, in seconds."""
    return 10.0 ** (_LOG_LOW + index / BUCKETS_PER_DECADE)


class LogHistogram:
    """Counts of durations in log-scale buckets, with a total, a sum and a maximum."""

    __slots__ = ("counts", "max_s", "sum_s", "sums", "total")

    def __init__(self) -> None:
        self.counts = [0] * BUCKET_COUNT
        self.sums = [0.0] * BUCKET_COUNT
        self.total = 0
        self.sum_s = 0.0
        self.max_s = 0.0

    def add(self, seconds: float) -> None:
        """Count one duration (negative durations count as zero)."""
        if seconds <= LOW_S:
            index = 0
        else:
            index = int((math.log10(seconds) - _LOG_LOW) * BUCKETS_PER_DECADE)
            if index >= BUCKET_COUNT:
                index = BUCKET_COUNT - 1
        self.counts[index] += 1
        self.total += 1
        if seconds > 0:
            self.sums[index] += seconds
            self.sum_s += seconds
            if seconds > self.max_s:
                self.max_s = seconds

    def add_many(self, values: Iterable[float]) -> None:
        """Count many durations: `add` in one tight loop (the model folds batches of results)."""
        if isinstance(values, list) and len(values) >= ARRAY_FROM:
            self._add_array(np.array(values, dtype=np.float64))
            return
        counts, sums = self.counts, self.sums
        log10 = math.log10
        last = BUCKET_COUNT - 1
        total = 0
        total_s = 0.0
        max_s = self.max_s
        for seconds in values:
            total += 1
            if seconds <= LOW_S:
                counts[0] += 1
                if seconds > 0:
                    sums[0] += seconds
                    total_s += seconds
                continue
            index = int((log10(seconds) - _LOG_LOW) * BUCKETS_PER_DECADE)
            if index > last:
                index = last
            counts[index] += 1
            sums[index] += seconds
            total_s += seconds
            if seconds > max_s:
                max_s = seconds
        self.total += total
        self.sum_s += total_s
        self.max_s = max_s

    def _add_array(self, values: np.ndarray) -> None:
        """`add_many` for a long batch, vectorised: the same buckets, sums and maximum."""
        index = np.zeros(len(values), dtype=np.intp)
        above = values > LOW_S
        if above.any():
            positions = ((np.log10(values[above]) - _LOG_LOW) * BUCKETS_PER_DECADE).astype(np.intp)
            index[above] = np.minimum(positions, BUCKET_COUNT - 1)
            self.max_s = max(self.max_s, float(values[above].max()))
        counted = np.bincount(index, minlength=BUCKET_COUNT).tolist()
        summed = np.bincount(index, weights=np.where(values > 0, values, 0.0), minlength=BUCKET_COUNT).tolist()
        self.counts = [count + more for count, more in zip(self.counts, counted, strict=True)]
        self.sums = [total + more for total, more in zip(self.sums, summed, strict=True)]
        self.total += len(values)
        self.sum_s += math.fsum(summed)

    def merge(self, other: LogHistogram) -> None:
        """Add `other`'s counts into this one (the edges are shared, so this is exact)."""
        counts, sums = self.counts, self.sums
        for index, count in enumerate(other.counts):
            if count:
                counts[index] += count
                sums[index] += other.sums[index]
        self.total += other.total
        self.sum_s += other.sum_s
        self.max_s = max(self.max_s, other.max_s)

    @classmethod
    def merged(cls, parts: Iterable[LogHistogram]) -> LogHistogram:
        """A new histogram holding the sum of `parts`: the same as merging them one by one,
        summed a bucket at a time over all parts (a cluster of 256 hosts has a thousand
        (kernel, backend, host) histograms, and a loop over each one's buckets took 45 ms)."""
        parts = list(parts)
        out = cls()
        if parts:
            out.counts = [sum(column) for column in zip(*[part.counts for part in parts], strict=True)]
            out.sums = [sum(column, 0.0) for column in zip(*[part.sums for part in parts], strict=True)]
            out.total = sum(part.total for part in parts)
            out.sum_s = sum((part.sum_s for part in parts), 0.0)
            out.max_s = max(part.max_s for part in parts)
        return out

    def percentile(self, q: float) -> float | None:
        """The q-th percentile (0..100) in seconds, or None when empty.

        Walks the cumulative counts to the bucket holding the rank and answers that
        bucket's mean: a bucket of identical samples reads as exactly their value.
        """
        if self.total == 0:
            return None
        rank = max(1.0, q / 100.0 * self.total)
        seen = 0
        for index, count in enumerate(self.counts):
            if not count:
                continue
            seen += count
            if seen >= rank:
                return self.sums[index] / count if self.sums[index] > 0 else bucket_low(index)
        return self.max_s

    def mean(self) -> float | None:
        return self.sum_s / self.total if self.total else None

    def occupied(self) -> tuple[int, int] | None:
        """The first and last non-empty bucket indices, or None when empty."""
        first = next((i for i, c in enumerate(self.counts) if c), None)
        if first is None:
            return None
        last = max(i for i, c in enumerate(self.counts) if c)
        return first, last
