"""`batuta run`'s percentiles in bounded memory: a served coordinator running millions of tasks
grew by 24 bytes a task, every latency and run time kept for the summary (batuta/jobs/_samples.py)."""

from __future__ import annotations

import random
import tracemalloc

from batuta import TaskResult, TaskStatus
from batuta.jobs import RunTracker
from batuta.jobs._samples import EXACT_LIMIT, RELATIVE_ERROR, Samples, percentile


def seeded_durations(count: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.lognormvariate(-5.0, 1.5) for _ in range(count)]  # ~7 ms median, microseconds to seconds


def test_samples_are_exact_up_to_the_limit() -> None:
    values = seeded_durations(1_000, seed=1)
    samples = Samples(exact_limit=1_000)
    for value in values:
        samples.append(value)
    ordered = sorted(values)
    assert samples.exact and samples.buckets == 0
    assert samples.percentiles((50, 95, 99)) == {f"p{q}": percentile(ordered, q) for q in (50, 95, 99)}


def test_samples_past_the_limit_are_buckets_within_the_relative_error() -> None:
    values = [*seeded_durations(50_000, seed=2), 0.0, 0.0]
    samples = Samples(exact_limit=1_000)
    for value in values:
        samples.append(value)
    assert not samples.exact and len(samples) == len(values)
    ordered = sorted(values)
    for q in (0, 1, 50, 95, 99, 100):
        exact = percentile(ordered, q)
        got = samples.percentiles((q,))[f"p{q}"]
        assert abs(got - exact) <= RELATIVE_ERROR * exact, (q, got, exact)
    assert Samples().percentiles((50,))["p50"] != Samples().percentiles((50,))["p50"]  # NaN when empty


def test_a_long_run_s_tracker_stops_growing_with_its_task_count() -> None:
    """Past EXACT_LIMIT tasks, another as many add no memory per task to the tracker (they
    added 24 bytes each: three 8-byte samples, 23 MiB a million tasks)."""
    rng = random.Random(3)
    tracker = RunTracker()
    hosts = ("a", "b", "c")

    def finish(first: int, count: int) -> None:
        for task_id in range(first, first + count):
            tracker.task_queued(task_id)
            duration = rng.lognormvariate(-6.0, 1.0)
            tracker.task_finished(
                TaskResult(
                    task_id=task_id,
                    name="noop",
                    status=TaskStatus.SUCCEEDED,
                    duration=duration,
                    queue_wait=duration / 2,
                    host=hosts[task_id % 3],
                )
            )

    n = EXACT_LIMIT + 10_000
    finish(1, n)  # folded into buckets by now
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        finish(n + 1, n)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    summary = tracker.summary(job="j", wall_s=1.0, result=None, error=None)
    assert summary.succeeded == 2 * n and sum(h.tasks for h in summary.hosts) == 2 * n
    assert 0 < summary.run_time_s["p50"] < summary.run_time_s["p99"] < summary.latency_s["p99"]
    # 24 bytes a task before (three samples); now a bucket's count, or a bucket dict passing
    # its next size as the extremes widen: not an entry a task
    assert grown < 4 * n, f"{grown / n:.1f} bytes a task"
    for samples in (tracker.latencies, tracker.run_times, *(host.run_times for host in tracker.hosts.values())):
        assert not samples.exact and samples.buckets < 3_000  # a nanosecond to a day, at most
