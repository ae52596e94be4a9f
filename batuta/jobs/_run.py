"""Run a loaded job against a fresh pool, counting what its tasks did from the pool's events.

This is the glue between a `Job` (from `_load`) and the runtime's public API: build the pool,
subscribe to its events, await `main(pool)`, and hand back a `RunSummary`. An exception from
the job's `main` is part of the outcome (one line plus its traceback), not a crash; the pool
is closed on every way out, Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

from batuta import Pool
from batuta.jobs._load import Job
from batuta.jobs._summary import RunSummary, RunTracker, one_line
from batuta.runtime.events import TaskFinished, TaskQueued

if TYPE_CHECKING:
    from batuta.runtime.cluster import ClusterConfig

OnUpdate = Callable[[RunTracker], None]


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """The summary, and the job's traceback (from its own frames on) when its `main` raised."""

    summary: RunSummary
    traceback: str | None = None


async def run_job(
    job: Job,
    *,
    workers: int | None = None,
    seed: int | None = None,
    cluster: ClusterConfig | None = None,
    on_update: OnUpdate | None = None,
    job_stdout: TextIO | None = None,
) -> RunOutcome:
    """Run `job` on the hosts of `cluster`, or on a local pool of `workers` CPU slots.

    `on_update(tracker)` is called on the event loop after each task is queued or ends (it
    must not block); `job_stdout`, when given, receives what the job prints, so that a
    caller printing JSON keeps its stdout clean.
    """
    if cluster is not None:
        from batuta.runtime.cluster import build_pool  # asyncssh: only when SSH hosts are asked for

        if seed is not None:
            cluster = dataclasses.replace(cluster, pool=dataclasses.replace(cluster.pool, seed=seed))
        pool = build_pool(cluster)
    else:
        builder = Pool.builder()
        if workers is not None:
            builder = builder.cpu_workers(workers)
        if seed is not None:
            builder = builder.seed(seed)
        pool = builder.build()
    tracker = RunTracker()

    def on_event(event: object) -> None:
        if isinstance(event, TaskQueued):
            tracker.task_queued(event.task_id)
        elif isinstance(event, TaskFinished):
            tracker.task_finished(event.result)
        else:
            return
        if on_update is not None:
            on_update(tracker)

    value: Any = None
    error: str | None = None
    job_traceback: str | None = None
    async with pool:
        unsubscribe = pool.subscribe(on_event)
        started = time.perf_counter()
        try:
            with _stdout_to(job_stdout):
                value = await job.main(pool)
        except Exception as exc:
            error = f"job {job.name!r} raised {type(exc).__name__}: {one_line(str(exc))}"
            job_traceback = _job_traceback(exc)
        finally:
            wall_s = time.perf_counter() - started
            unsubscribe()
    summary = tracker.summary(job=job.name, wall_s=wall_s, result=value, error=error)
    return RunOutcome(summary=summary, traceback=job_traceback)


@contextlib.contextmanager
def _stdout_to(stream: TextIO | None) -> Iterator[None]:
    if stream is None:
        yield
        return
    with contextlib.redirect_stdout(stream):
        yield


def _job_traceback(exc: BaseException) -> str:
    """The traceback from the job's frames on: this runner's own frame says nothing."""
    tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
    return "".join(traceback.format_exception(type(exc), exc, tb))
