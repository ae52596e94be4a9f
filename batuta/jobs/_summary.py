"""What a job run did, counted from its tasks: totals, failures, throughput and latency percentiles.

Pure bookkeeping with no I/O and no event loop: the runner feeds it each task as it is queued
and each `TaskResult` as it ends, and asks for a `RunSummary` at the end. The command line
prints that summary as text or JSON; a TUI can show the same numbers.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from batuta import TaskResult, TaskStatus

FAILURES_KEPT = 5  # failure lines kept for the summary: the first few tell the story
PERCENTILES = (50, 95, 99)

FAILED_STATUSES = frozenset({TaskStatus.FAILED, TaskStatus.TIMED_OUT, TaskStatus.LOST, TaskStatus.UNSCHEDULABLE})
# Tasks that got a slot and ran to an end there: their times say something about the pool.
RAN_STATUSES = frozenset({TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.TIMED_OUT})


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of ascending `sorted_values`, linearly interpolated; NaN if empty."""
    if not sorted_values:
        return math.nan
    rank = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


def one_line(text: str) -> str:
    """`text` on one line: its first line, and its last too when there are more (a traceback's verdict)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if len(lines) > 1:
        return f"{lines[0]} ... {lines[-1]}"
    return lines[0] if lines else ""


def failure_line(result: TaskResult) -> str:
    """One line for a failed task, from `describe_failure()`."""
    return one_line(result.describe_failure())


@dataclass(slots=True)
class RunTracker:
    """Counts a run's tasks; each task id is counted once, however often it is requeued."""

    queued_ids: set[int] = field(default_factory=set)
    finished_ids: set[int] = field(default_factory=set)
    statuses: Counter[TaskStatus] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # queue wait + run time, seconds
    run_times: list[float] = field(default_factory=list)
    failure_lines: list[str] = field(default_factory=list)
    restored: int = 0  # answered from the journal (--resume), not run: no latency sample

    def task_queued(self, task_id: int) -> None:
        self.queued_ids.add(task_id)

    def task_finished(self, result: TaskResult) -> None:
        if result.task_id in self.finished_ids:
            return
        self.finished_ids.add(result.task_id)
        self.queued_ids.add(result.task_id)
        self.statuses[result.status] += 1
        if result.restored:
            self.restored += 1
        elif result.status in RAN_STATUSES:
            self.latencies.append(result.queue_wait + result.duration)
            self.run_times.append(result.duration)
        if result.status in FAILED_STATUSES and len(self.failure_lines) < FAILURES_KEPT:
            self.failure_lines.append(failure_line(result))

    @property
    def submitted(self) -> int:
        return len(self.queued_ids)

    @property
    def finished(self) -> int:
        return len(self.finished_ids)

    @property
    def succeeded(self) -> int:
        return self.statuses[TaskStatus.SUCCEEDED]

    @property
    def failed(self) -> int:
        return sum(self.statuses[status] for status in FAILED_STATUSES)

    @property
    def cancelled(self) -> int:
        return self.statuses[TaskStatus.CANCELLED]

    def summary(self, *, job: str, wall_s: float, result: Any, error: str | None) -> RunSummary:
        """Freeze the counts into a summary of the run of `job` that took `wall_s` seconds."""
        return RunSummary(
            job=job,
            tasks=self.submitted,
            succeeded=self.succeeded,
            failed=self.failed,
            cancelled=self.cancelled,
            restored=self.restored,
            unfinished=self.submitted - self.finished,
            wall_s=wall_s,
            latency_s=_percentiles(self.latencies),
            run_time_s=_percentiles(self.run_times),
            failures=list(self.failure_lines),
            result=result,
            error=error,
        )


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {f"p{q}": percentile(ordered, q) for q in PERCENTILES}


@dataclass(frozen=True, slots=True, kw_only=True)
class RunSummary:
    """The end of a run: what `batuta run` prints, as text or as one JSON object."""

    job: str
    tasks: int
    succeeded: int
    failed: int
    cancelled: int
    unfinished: int  # submitted but not ended when main returned and the pool closed
    restored: int = 0  # of `succeeded`: taken from the journal, not run again
    wall_s: float
    latency_s: dict[str, float]
    run_time_s: dict[str, float]
    failures: list[str]
    result: Any = None  # what the job's main returned
    error: str | None = None  # one line when the job's main raised

    @property
    def ok(self) -> bool:
        return self.error is None and self.failed == 0

    @property
    def tasks_per_s(self) -> float:
        ended = self.tasks - self.unfinished
        return ended / self.wall_s if self.wall_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: seconds as floats, NaN (no samples) as null."""
        return {
            "job": self.job,
            "ok": self.ok,
            "tasks": self.tasks,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "cancelled": self.cancelled,
            "restored": self.restored,
            "unfinished": self.unfinished,
            "wall_s": round(self.wall_s, 6),
            "tasks_per_s": round(self.tasks_per_s, 3),
            "latency_s": _json_floats(self.latency_s),
            "run_time_s": _json_floats(self.run_time_s),
            "failures": self.failures,
            "result": _json_value(self.result),
            "error": self.error,
        }

    def text_lines(self) -> list[str]:
        """The summary for a terminal, a few short lines."""
        counts = f"{self.tasks} tasks: {self.succeeded} succeeded, {self.failed} failed"
        if self.restored:
            counts += f" ({self.restored} restored from the journal)"
        if self.cancelled:
            counts += f", {self.cancelled} cancelled"
        if self.unfinished:
            counts += f", {self.unfinished} unfinished"
        lines = [
            f"{counts} in {self.wall_s:.2f} s ({self.tasks_per_s:,.1f} tasks/s)",
            f"latency (queue + run)  {_ms_row(self.latency_s)}",
            f"run time               {_ms_row(self.run_time_s)}",
        ]
        lines += [f"failed: {line}" for line in self.failures]
        if self.failed > len(self.failures):
            lines.append(f"... and {self.failed - len(self.failures)} more failed task(s)")
        return lines


def _ms_row(values: dict[str, float]) -> str:
    return "  ".join(
        f"{name} {'-' if math.isnan(seconds) else f'{seconds * 1e3:,.1f} ms'}" for name, seconds in values.items()
    )


def _json_floats(values: dict[str, float]) -> dict[str, float | None]:
    return {k: None if math.isnan(v) else round(v, 6) for k, v in values.items()}


def _json_value(value: Any) -> Any:
    """The job's return value as JSON: itself if it encodes, `.tolist()` for arrays, else repr."""
    try:
        json.dumps(value, allow_nan=False)
        return value
    except (TypeError, ValueError):
        pass
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        try:
            converted = tolist()
            json.dumps(converted, allow_nan=False)
            return converted
        except (TypeError, ValueError):
            pass
    return repr(value)
