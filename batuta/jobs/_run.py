"""Run a loaded job against a fresh pool, counting what its tasks and hosts did from the pool's events.

This is the glue between a `Job` (from `_load`) and the runtime's public API: build the pool,
subscribe to its events (before it starts: a host refused at start-up is news too), await
`main(pool)`, and hand back a `RunSummary`. An exception from the job's `main` is part of the
outcome (one line plus its traceback), not a crash, and so is Ctrl-C while `main` runs: the
summary then says what finished and the pool cancels the rest. The pool is closed on every
way out. A pool none of whose hosts starts raises `HostsUnreachableError`: nothing ran.

The observers ride along here too: a `PoolLogObserver` always (failures, retries and host
changes go to the `batuta` logger, with the job as log context; the records of what the
summary reports are marked so that a console can leave them to it, see `drop_summarised`), a Prometheus
exporter when `metrics_port` is given, and with `journal` a journal as the pool's result
store plus the job's checkpoints (`batuta.observers.journal`,
`batuta.observers.checkpoint.job_checkpoints`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from batuta import Pool
from batuta.errors import AgentError, TransportError, UsageError
from batuta.jobs._load import Job
from batuta.jobs._summary import RunSummary, RunTracker, one_line
from batuta.observers.checkpoint import use_checkpoints
from batuta.observers.journal import Journal, JournalStore
from batuta.observers.logs import PoolLogObserver, log_context
from batuta.runtime.events import HostDown, HostStateChanged, HostUp, PoolEvent, TaskFinished, TaskQueued

if TYPE_CHECKING:
    from batuta.observers.metrics import MetricsExporter
    from batuta.runtime.cluster import ClusterConfig

log = logging.getLogger("batuta.jobs")

OnUpdate = Callable[[RunTracker], None]
SUMMARISED = "batuta_summarised"  # log record attribute: the run's summary reports this record's news


class HostsUnreachableError(AgentError):
    """No host of the pool could be started, so nothing ran (`batuta run` exits 3)."""


def drop_summarised(record: logging.LogRecord) -> bool:
    """A logging filter for a console that the run's summary follows: failed tasks and hosts
    lost or refused are left to the summary, which prints each cause once."""
    return not getattr(record, SUMMARISED, False)


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """The summary, and the job's traceback (from its own frames on) when its `main` raised."""

    summary: RunSummary
    traceback: str | None = None


def make_pool(*, workers: int | None, seed: int | None, cluster: ClusterConfig | None) -> Pool:
    """The pool `batuta run` and `batuta tui` coordinate: the cluster's hosts, or a local one."""
    if cluster is not None:
        from batuta.runtime.cluster import build_pool  # asyncssh: only when SSH hosts are asked for

        if seed is not None:
            cluster = dataclasses.replace(cluster, pool=dataclasses.replace(cluster.pool, seed=seed))
        return build_pool(cluster)
    builder = Pool.builder()
    if workers is not None:
        builder = builder.cpu_workers(workers)
    if seed is not None:
        builder = builder.seed(seed)
    return builder.build()


async def run_job(
    job: Job,
    *,
    workers: int | None = None,
    seed: int | None = None,
    cluster: ClusterConfig | None = None,
    on_update: OnUpdate | None = None,
    job_stdout: TextIO | None = None,
    journal: str | Path | None = None,
    resume: bool = False,
    metrics_port: int | None = None,
    metrics_bind: str = "127.0.0.1",
    on_metrics: Callable[[tuple[str, int]], None] | None = None,
) -> RunOutcome:
    """Run `job` on the hosts of `cluster`, or on a local pool of `workers` CPU slots.

    `on_update(tracker)` is called on the event loop after each task is queued or ends (it
    must not block); `job_stdout`, when given, receives what the job prints, so that a
    caller printing JSON keeps its stdout clean. `journal` names the folder of the job
    journal and checkpoints, and `resume` reuses what it holds (see `batuta.observers.journal`);
    `metrics_port` serves Prometheus metrics on `metrics_bind` while the job runs, and
    `on_metrics` is told the (address, port) it got.
    """
    if resume and journal is None:
        raise UsageError("--resume needs --journal DIR: the journal is what a run resumes from")
    pool = make_pool(workers=workers, seed=seed, cluster=cluster)
    tracker = RunTracker()

    def on_event(event: PoolEvent) -> None:
        if isinstance(event, TaskQueued):
            tracker.task_queued(event.task_id)
        elif isinstance(event, TaskFinished):
            tracker.task_finished(event.result)
        elif isinstance(event, HostUp):
            tracker.host_up(event.host)
        elif isinstance(event, HostDown):
            tracker.host_down(event.host, event.reason)
        elif isinstance(event, HostStateChanged):
            tracker.host_state_changed(event.host, event.state, event.reason)
        else:
            return
        if on_update is not None:
            on_update(tracker)

    value: Any = None
    error: str | None = None
    job_traceback: str | None = None
    interrupted = False
    exporter: MetricsExporter | None = None
    run_journal: Journal | None = None
    logger = _RunLogObserver(pool).attach()
    unsubscribe = pool.subscribe(on_event)
    try:
        # Both can fail on the user's input (a busy port, an unusable folder): before any agent starts.
        if metrics_port is not None:
            exporter = start_metrics(pool, metrics_port, metrics_bind)
            if on_metrics is not None and exporter.address is not None:
                on_metrics(exporter.address)
        if journal is not None:
            run_journal = await Journal.open(journal, job=job.name, resume=resume)
        await _start(pool)
        try:
            if run_journal is not None:
                pool.set_result_store(JournalStore(run_journal, resume=resume))
            started = time.perf_counter()
            try:
                with (
                    _stdout_to(job_stdout),
                    pool.job(job.name),  # tasks carry the job's name to every observer
                    log_context(job=job.name),
                    use_checkpoints(run_journal.checkpoints if run_journal is not None else None),
                ):
                    value = await job.main(pool)
            except asyncio.CancelledError as exc:
                if _take_interrupt():
                    interrupted = True
                else:  # the job awaited something cancelled: its bug, like any other exception
                    why = one_line(str(exc)) or "it awaited a cancelled task"
                    error = f"job {job.name!r} raised CancelledError: {why}"
                    job_traceback = _job_traceback(exc)
            except Exception as exc:
                error = f"job {job.name!r} raised {type(exc).__name__}: {one_line(str(exc))}"
                job_traceback = _job_traceback(exc)
            finally:
                wall_s = time.perf_counter() - started
                # What the pool cancels as it closes is counted as unfinished, not logged task by task.
                unsubscribe()
                logger.close()
                tracker.hosts_known(host.name for host in pool.hosts())
            restored = pool.stats().restored
            if restored:
                log.info("%d task result(s) restored from the journal", restored, extra={"job": job.name})
        finally:
            await pool.close()
    finally:
        unsubscribe()
        logger.close()
        if exporter is not None:
            exporter.close()
        if run_journal is not None:
            await run_journal.close()
    summary = tracker.summary(job=job.name, wall_s=wall_s, result=value, error=error, interrupted=interrupted)
    return RunOutcome(summary=summary, traceback=job_traceback)


async def _start(pool: Pool) -> None:
    """Start every host; none starting is `HostsUnreachableError` (the pool closes itself then)."""
    try:
        await pool.start()
    except (AgentError, TransportError) as exc:
        detail = str(exc).removeprefix("no host could be started: ")
        raise HostsUnreachableError(f"no host could be started, so nothing ran: {detail}") from exc


def _take_interrupt() -> bool:
    """Whether this task itself was cancelled (Ctrl-C: asyncio.run cancels its main task) rather
    than the job awaiting something cancelled; if so the cancellation is taken, and the run
    ends with a summary instead of a KeyboardInterrupt."""
    task = asyncio.current_task()
    if task is None or not task.cancelling():
        return False
    task.uncancel()
    return True


def _summarised(event: PoolEvent) -> bool:
    """Whether the run's summary reports this event: a failed task (grouped by cause), a host
    lost or retired (the runtime logs those as they happen too)."""
    if isinstance(event, TaskFinished):
        return not event.result.is_success()
    return isinstance(event, HostDown) or (isinstance(event, HostStateChanged) and event.state == "retired")


class _RunLogObserver(PoolLogObserver):
    """The pool's log for a run, with the records of what the summary reports marked `SUMMARISED`."""

    def __init__(self, pool: Pool) -> None:
        self._target = logging.getLogger("batuta.pool")
        super().__init__(pool, self._target)
        self._marking = False

    def attach(self) -> _RunLogObserver:
        self._target.removeFilter(self._mark)  # attach twice, mark once
        self._target.addFilter(self._mark)
        super().attach()
        return self

    def close(self) -> None:
        super().close()
        self._target.removeFilter(self._mark)

    def on_event(self, event: PoolEvent) -> None:
        if _summarised(event):
            self._marking = True
            try:
                super().on_event(event)
            finally:
                self._marking = False
        else:
            super().on_event(event)

    def _mark(self, record: logging.LogRecord) -> bool:
        if self._marking:
            setattr(record, SUMMARISED, True)
        return True


def start_metrics(pool: Pool, port: int, bind: str) -> MetricsExporter:
    """Export `pool`'s metrics on bind:port; a port or address that cannot be used is a UsageError."""
    from batuta.observers.metrics import MetricsExporter  # prometheus-client: only when metrics are asked for

    exporter = MetricsExporter(pool).attach()
    try:
        exporter.serve(port, bind)
    except OSError as exc:
        exporter.close()
        why = f"cannot serve metrics on {bind}:{port}: {exc.strerror or exc}"
        raise UsageError(f"{why}; pick another --metrics-port or --metrics-bind") from None
    return exporter


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
