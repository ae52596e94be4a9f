"""Run a loaded job against a fresh pool, counting what its tasks and hosts did from the pool's events.

This is the glue between a `Job` (from `_load`) and the runtime's public API: build the pool,
subscribe to its events (before it starts: a host refused at start-up is news too), await
`main(pool)`, and hand back a `RunSummary`. An exception from the job's `main` is part of the
outcome (one line plus its traceback), not a crash, and so is Ctrl-C while `main` runs: the
summary then says what finished and the pool cancels the rest. The pool is closed on every
way out. A pool none of whose hosts starts raises `HostsUnreachableError`: nothing ran.

The observers ride along here too: a `PoolLogObserver` always (failures, retries and host
changes go to the `batuta` logger, with the job as log context; the records of what the
summary reports are marked so that a console can leave them to it, see `drop_summarised`), a
Prometheus exporter when `metrics_port` or `metrics_textfile` is given, and with `journal` a
journal as the pool's result store plus the job's checkpoints (`batuta.observers.journal`,
`batuta.observers.checkpoint.job_checkpoints`). When the job is over the exporter keeps the
pool's final numbers (`MetricsExporter.freeze`), writes them to `metrics_textfile`, and with
`metrics_linger` goes on serving them: the caller gets it in `RunOutcome.metrics` and ends it
with `linger_metrics`, so that a job shorter than the scrape interval is still scraped once it
has ended. An interrupted run does not linger: Ctrl-C asked for the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import math
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from batuta import Pool
from batuta.core.task import TaskResult
from batuta.errors import (
    AgentError,
    BatutaError,
    ConfigError,
    HostConfigError,
    TaskFailedError,
    TransportError,
    UsageError,
)
from batuta.jobs._load import Job
from batuta.jobs._summary import RunSummary, RunTracker, one_line
from batuta.jobs._text import printable
from batuta.observers.checkpoint import use_checkpoints
from batuta.observers.journal import Journal, JournalError, JournalStore
from batuta.observers.logs import PoolLogObserver, log_context
from batuta.runtime.events import HostDown, HostStateChanged, HostUp, PoolEvent, TaskFinished, TaskQueued
from batuta.runtime.snapshot import explain_read_only

if TYPE_CHECKING:
    from batuta.observers.metrics import MetricsExporter
    from batuta.runtime.cluster import ClusterConfig

log = logging.getLogger("batuta.jobs")

OnUpdate = Callable[[RunTracker], None]
SUMMARISED = "batuta_summarised"  # log record attribute: the run's summary reports this record's news
RETIREMENT = "batuta_retirement"  # ... a host's retirement, said again at the end with --quiet


class HostsUnreachableError(AgentError):
    """No host of the pool could be started, so nothing ran (`batuta run` exits 3). `summary`:
    the run's, each host with why it did not start (for --json, whose stdout was empty)."""

    summary: RunSummary | None = None


def drop_summarised(record: logging.LogRecord) -> bool:
    """A logging filter for a console that the run's summary follows: failed tasks and hosts
    lost or refused are left to the summary, which prints each cause once."""
    return not getattr(record, SUMMARISED, False)


def drop_summarised_quietly(record: logging.LogRecord) -> bool:
    """`drop_summarised` for `--quiet`, whose `batuta: host X retired: WHY` line at the end
    says a host refused at start as well: its runtime's "cannot be used" line is left out too.
    Without -q that line stays, said when it happens (the summary's row comes only at the end)."""
    return not getattr(record, SUMMARISED, False) and not getattr(record, RETIREMENT, False)


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """The summary, and the job's traceback (from its own frames on) when its `main` raised.

    `metrics` is the exporter still serving the job's final numbers, where `metrics_linger`
    asked for it: the caller ends it, with `linger_metrics`.
    """

    summary: RunSummary
    traceback: str | None = None
    metrics: MetricsExporter | None = None


def make_pool(
    *,
    workers: int | None,
    seed: int | None,
    cluster: ClusterConfig | None,
    job_files: Sequence[str | Path] = (),
    modules: Sequence[str | Path] = (),
) -> Pool:
    """The pool `batuta run` and `batuta tui` coordinate: the cluster's hosts, or a local one.
    The user's code ships to every host (batuta/runtime/code.py): the modules of each job
    file's folder that it imports, and `modules` (.py files and package folders)."""
    if cluster is not None:
        from batuta.runtime.cluster import build_pool  # asyncssh: only when SSH hosts are asked for

        pool_config = cluster.pool
        if seed is not None:
            pool_config = dataclasses.replace(pool_config, seed=seed)
        code = dataclasses.replace(
            pool_config.code,
            job_files=tuple(Path(f) for f in job_files),
            modules=tuple(Path(p) for p in modules),
        )
        return build_pool(dataclasses.replace(cluster, pool=dataclasses.replace(pool_config, code=code)))
    builder = Pool.builder().modules(modules)
    for job_file in job_files:
        builder = builder.job_file(job_file)
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
    metrics_textfile: str | Path | None = None,
    metrics_linger: float = 0.0,
    modules: Sequence[str | Path] = (),
    on_pool: Callable[[Pool], Awaitable[None]] | None = None,
    on_started: Callable[[], None] | None = None,
    on_interrupted: Callable[[RunSummary], None] | None = None,
) -> RunOutcome:
    """Run `job` on the hosts of `cluster`, or on a local pool of `workers` CPU slots.

    `on_update(tracker)` is called on the event loop after each task is queued or ends (it
    must not block); `job_stdout`, when given, receives what the job prints, so that a
    caller printing JSON keeps its stdout clean. `journal` names the folder of the job
    journal and checkpoints, and `resume` reuses what it holds (see `batuta.observers.journal`);
    `metrics_port` serves Prometheus metrics on `metrics_bind` while the job runs, and
    `on_metrics` is told the (address, port) it got. `metrics_textfile` receives the final
    metrics in Prometheus text format (atomically), and `metrics_linger` seconds of serving
    them after the job are left to the caller (see `RunOutcome.metrics`). The job file's own
    modules and `modules` ship to every host (see `make_pool`). `on_pool(pool)` is awaited
    once the pool is built, before it starts (`batuta run --serve` puts its viewer server there);
    `on_started()` is called once it has started, as the job's main is about to be.
    An interrupt while the job runs ends it with an interrupted summary; one before it begins
    (hosts starting, an allocation queued) or while the pool closes is raised, after
    `on_interrupted(summary)` is told what the run had got to (`batuta run --json` prints it).
    """
    if resume and journal is None:
        raise UsageError("--resume needs --journal DIR: the journal is what a run resumes from")
    check_metrics_end(port=metrics_port, textfile=metrics_textfile, linger=metrics_linger)
    job_files = [job.origin] if job.origin != "built-in" else []
    pool = make_pool(workers=workers, seed=seed, cluster=cluster, job_files=job_files, modules=modules)
    tracker = RunTracker()
    if on_pool is not None:
        await on_pool(pool)

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
    wall_s = 0.0
    exporter: MetricsExporter | None = None
    run_journal: Journal | None = None
    ran_to_end = False  # the job's main returned: its journal may be started over by a run without --resume
    nodes = {name for allocation in cluster.allocations for name in allocation.host_names} if cluster else set()
    logger = _RunLogObserver(pool, nodes).attach()
    unsubscribe = pool.subscribe(on_event)
    keep_serving = False
    try:
        # Both can fail on the user's input (a busy port, an unusable folder): before any agent starts.
        if metrics_port is not None or metrics_textfile is not None:
            exporter = start_metrics(pool, metrics_port, metrics_bind)
            if on_metrics is not None and exporter.address is not None:
                on_metrics(exporter.address)
        if journal is not None:
            run_journal = await Journal.open(journal, job=job.name, resume=resume)
        try:
            await _start(pool)
        except HostsUnreachableError as exc:
            tracker.hosts_known(host.name for host in pool.hosts())
            exc.summary = tracker.summary(job=job.name, wall_s=0.0, result=None, error=str(exc), interrupted=False)
            raise
        _honour_a_swallowed_cancel()
        if on_started is not None:  # not at the first host up: start-up may wait for others (start_wait, a bootstrap)
            on_started()
        try:
            if run_journal is not None:
                await run_journal.bind(pool.code_digest)  # its checkpoints: this job's, this code's
                store = JournalStore(run_journal, resume=resume)
                pool.set_result_store(store)
                run_journal.checkpoints.places = store  # a checkpoint keeps where the places are
            started = time.perf_counter()
            try:
                with (
                    _stdout_to(job_stdout),
                    # tasks carry the job's name to every observer; resumed, the journal's spelling
                    # of it (`./job.py` for `job.py`): their places are keyed by it
                    pool.job(run_journal.job if run_journal is not None else job.name),
                    log_context(job=job.name),
                    use_checkpoints(run_journal.checkpoints if run_journal is not None else None),
                ):
                    value = await job.main(pool)
                if inspect.isawaitable(value):  # `return await pool.submit(...)`: the future, not its result
                    error, value = returned_unawaited(job.name, value), None
                else:
                    ran_to_end = True
                    _say_what_main_left(job.name, tracker)
            except asyncio.CancelledError as exc:
                if _take_interrupt():
                    interrupted = True
                else:  # the job awaited something cancelled: its bug, like any other exception
                    why = one_line(str(exc)) or "it awaited a cancelled task"
                    error = f"job {job.name!r} raised CancelledError: {why}"
                    job_traceback = _job_traceback(exc)
            except BatutaError as exc:
                # batuta's own errors say what failed and what to do (a task's failure is in the
                # summary too): where the job met it is all a traceback would add to that.
                at = _call_site(exc)
                where = f" at {at}" if at else ""
                error = f"job {job.name!r} raised {type(exc).__name__}{where}: {one_line(str(exc))}"
                job_traceback = _task_output(exc)
            except Exception as exc:
                error = f"job {job.name!r} raised {type(exc).__name__}: {one_line(printable(exc))}"
                explain_read_only(exc, pool)  # its note ends the traceback: what batuta did, the fix
                job_traceback = _job_traceback(exc)
            except SystemExit as exc:  # ended the command with its code, and no summary: 3 is batuta's "no host"
                if exc.code not in (None, 0):
                    at = _call_site(exc)
                    where = f" at {at}" if at else ""
                    error = f"job {job.name!r} called sys.exit({exc.code!r}){where}; return from main() instead"
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
        keep_serving = exporter is not None and exporter.address is not None and metrics_linger > 0
        keep_serving = keep_serving and not interrupted
    except (asyncio.CancelledError, KeyboardInterrupt):
        # KeyboardInterrupt too: a second Ctrl-C while the first's cancel unwinds the run is
        # raised by asyncio.run's handler in whatever frame runs then, often one of this run's:
        # `batuta run --json` printed no object at all
        if on_interrupted is not None:
            tracker.hosts_known(host.name for host in pool.hosts())
            on_interrupted(tracker.summary(job=job.name, wall_s=wall_s, result=value, error=error, interrupted=True))
        raise
    finally:
        unsubscribe()
        logger.close()
        try:
            if run_journal is not None:
                await run_journal.close(finished=ran_to_end)
        except JournalError as exc:  # a full disk: the run's error, beside its summary (a traceback had neither)
            error = error or str(exc)
        finally:
            if exporter is not None:
                _final_metrics(exporter, metrics_textfile)
                if not keep_serving:
                    exporter.close()
    summary = tracker.summary(job=job.name, wall_s=wall_s, result=value, error=error, interrupted=interrupted)
    return RunOutcome(summary=summary, traceback=job_traceback, metrics=exporter if keep_serving else None)


def returned_unawaited(job: str, value: Awaitable[Any]) -> str:
    """The error for a `main` that returned something still to await (`batuta run`'s, and the
    dashboard's for the jobs it runs). The job printed the object's repr and exited 0, its task
    cancelled as the pool closed (a coroutine: with a RuntimeWarning pointing into batuta)."""
    if inspect.iscoroutine(value):
        value.close()  # never to run: no "was never awaited" warning on top of this error
    kind = type(value).__name__
    if kind == "TaskFuture":
        fix = "await it for its result: 'await pool.submit(task)' gives the future, 'await future' the result"
    else:
        fix = "await it: 'return await ...'"
    return f"job {job!r} returned a {kind} from main() without awaiting it; {fix}"


def _say_what_main_left(job: str, tracker: RunTracker) -> None:
    """Warn when `main` returned with tasks it never awaited: the pool closing cancels them, and
    a job that submits and forgets (`await pool.submit(...)` alone) printed its value and exited
    0 with most of its work never run, said only as "N unfinished" in the summary."""
    left = tracker.submitted - tracker.finished
    if left:
        log.warning(
            "job %r returned from main() with %d of its %d task(s) unfinished: they are cancelled as the pool "
            "closes; await their futures (or use pool.map or pool.as_completed) before returning",
            job,
            left,
            tracker.submitted,
            extra={"job": job},
        )


async def _start(pool: Pool) -> None:
    """Start every host; none starting is `HostsUnreachableError`, or `ConfigError` when each failed
    on a file or setting of this machine's (the pool closes itself then). An allocation's own
    error is said as it is: "no host could be started" blamed hosts for its settings."""
    from batuta.runtime.slurm import AllocationConfigError, AllocationError

    try:
        await pool.start()
    except AllocationConfigError as exc:  # its settings (sbatch's options, its bind): it names them and the fix
        raise ConfigError(str(exc)) from exc
    except AllocationError as exc:  # an allocation alone in the pool, whose job could not be had: it says why
        raise HostsUnreachableError(str(exc)) from exc
    except HostConfigError as exc:  # every host failed on a file or setting of this machine's
        raise ConfigError(f"no host could be started, so nothing ran: {exc}") from exc
    except (AgentError, TransportError) as exc:
        detail = str(exc).removeprefix("no host could be started: ")
        raise HostsUnreachableError(f"no host could be started, so nothing ran: {detail}") from exc


def _honour_a_swallowed_cancel() -> None:
    """Raise CancelledError if this task was cancelled but went on. Python 3.11's
    `asyncio.wait_for` returns what it awaited when the cancel lands as that completes (a host's
    hello, at start-up): the cancel is lost, though still counted. A Ctrl-C, SIGTERM or `batuta
    stop` at that moment let the job start and run in full."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


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
    """The pool's log for a run, with the records of what the summary reports marked `SUMMARISED`;
    `nodes`: the names of the cluster's allocations' nodes (`_mark_retired`)."""

    def __init__(self, pool: Pool, nodes: Iterable[str] = ()) -> None:
        self._target = logging.getLogger("batuta.pool")
        # Its one error, "host X cannot be used: WHY", is a retirement, which -q's last lines
        # say again (`batuta: host X retired: WHY`): marked for `drop_summarised_quietly`.
        self._hosts_log = logging.getLogger("batuta.runtime.hosts")
        self._nodes = frozenset(nodes)
        super().__init__(pool, self._target)
        self._marking = False

    def attach(self) -> _RunLogObserver:
        self._target.removeFilter(self._mark)  # attach twice, mark once
        self._target.addFilter(self._mark)
        self._hosts_log.removeFilter(self._mark_retired)
        self._hosts_log.addFilter(self._mark_retired)
        super().attach()
        return self

    def close(self) -> None:
        super().close()
        self._target.removeFilter(self._mark)
        self._hosts_log.removeFilter(self._mark_retired)

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

    def _mark_retired(self, record: logging.LogRecord) -> bool:
        """A host's "cannot be used" error: a retirement (`RETIREMENT`). Of an allocation's node,
        also the run's report's to say (`SUMMARISED`): the console leaves it out, a --log-file
        keeps it. An allocation's nodes fail together, for one reason (sbatch refused the job,
        the job ended), so the runtime said it once per node, and then the run's last line (no
        host started) or its summary (a row per host) said it again; the allocation's news
        line already says when its job ends."""
        if record.levelno >= logging.ERROR:
            setattr(record, RETIREMENT, True)
            args = record.args
            if isinstance(args, tuple) and args and args[0] in self._nodes:
                setattr(record, SUMMARISED, True)
        return True


def start_metrics(pool: Pool, port: int | None, bind: str) -> MetricsExporter:
    """Export `pool`'s metrics on bind:port (with no port, only count them, for a textfile);
    a port or address that cannot be used is a UsageError."""
    from batuta.observers.metrics import MetricsExporter  # prometheus-client: only when metrics are asked for

    exporter = MetricsExporter(pool).attach()
    if port is None:
        return exporter
    try:
        exporter.serve(port, bind)
    except OSError as exc:
        exporter.close()
        why = f"cannot serve metrics on {bind}:{port}: {exc.strerror or exc}"
        raise UsageError(f"{why}; pick another --metrics-port or --metrics-bind") from None
    return exporter


MAX_LINGER_S = 7 * 24 * 3600.0


def check_metrics_end(*, port: int | None, textfile: str | Path | None, linger: float) -> None:
    """What happens to the metrics after the job is sound: a UsageError names what is not.

    The textfile's folder is tried by creating (and removing) a file there, so that a job
    never runs for an hour to fail at writing its numbers.
    """
    if not 0 <= linger < math.inf:  # also NaN
        raise UsageError(f"--metrics-linger {linger} is not a number of seconds >= 0; pass e.g. 30")
    if linger > MAX_LINGER_S:  # a sleep that long overflowed, after the job had run
        raise UsageError(
            f"--metrics-linger {linger:g} is more than a week ({MAX_LINGER_S:g} s); to serve metrics for longer, "
            "run the job with --serve"
        )
    if linger > 0 and port is None:
        raise UsageError(f"--metrics-linger {linger:g} needs --metrics-port PORT: it keeps that server up")
    if textfile is None:
        return
    target = Path(textfile)
    fix = "pass a file in a writable folder, e.g. /var/lib/node_exporter/textfile/batuta.prom"
    if target.is_dir():
        raise UsageError(f"cannot write --metrics-textfile {str(target)!r}: it is a folder; {fix}")
    probe = target.with_name(f".{target.name}.{os.getpid()}.probe")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"cannot write --metrics-textfile {str(target)!r}: {exc.strerror or exc}; {fix}") from None


def linger_metrics(exporter: MetricsExporter, seconds: float, *, say: bool = False) -> None:
    """Keep serving the job's final metrics for `seconds` (Ctrl-C ends it early), then stop.

    Blocking: call it once the event loop is gone; scrapes read the frozen snapshot. With
    `say` (a terminal), one line on stderr tells why the command has not returned yet.
    """
    sys.stdout.flush()  # what was printed before (the summary) is out before the wait
    if say and exporter.url is not None:
        print(f"batuta: serving the final metrics at {exporter.url} for {seconds:g} s; Ctrl-C ends it", file=sys.stderr)
    with _signals_end_the_wait() as waiting:
        try:
            time.sleep(seconds)
        finally:
            waiting.clear()  # from here on a signal is ignored: the server closes whole
            exporter.close()


class _LingerEnded(Exception):
    pass


@contextlib.contextmanager
def _signals_end_the_wait() -> Iterator[threading.Event]:
    """Ctrl-C or SIGTERM (a batch system's stop) ends the wait, once, and the command exits
    with the job's code: SIGTERM killed it with 143, and a second Ctrl-C made it 130. The
    caller clears the event it gets once it no longer waits."""
    waiting = threading.Event()
    waiting.set()
    if threading.current_thread() is not threading.main_thread():
        with contextlib.suppress(KeyboardInterrupt):
            yield waiting
        return

    def end(_signum: int, _frame: object) -> None:
        if waiting.is_set():
            waiting.clear()
            raise _LingerEnded

    # SIGHUP as the command's own handling takes it: not where `nohup` ignores it
    ending = [s for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) if signal.getsignal(s) != signal.SIG_IGN]
    previous = {signum: signal.signal(signum, end) for signum in ending}
    try:
        yield waiting
    except (_LingerEnded, KeyboardInterrupt):
        log.debug("metrics linger ended early by a signal")
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _final_metrics(exporter: MetricsExporter, textfile: str | Path | None) -> None:
    """Freeze the exporter on the pool's final numbers; write them to `textfile` if given."""
    exporter.freeze()
    if textfile is None:
        return
    try:
        exporter.write_textfile(textfile)
    except OSError as exc:  # checked before the job ran: the disk filled up, the folder went away
        log.error("cannot write the final metrics to %s: %s", textfile, exc.strerror or exc)


@contextlib.contextmanager
def _stdout_to(stream: TextIO | None) -> Iterator[None]:
    if stream is None:
        yield
        return
    with contextlib.redirect_stdout(stream):
        yield


_JOBS_DIR = Path(__file__).resolve().parent
_PACKAGE_DIR = _JOBS_DIR.parent


def _call_site(exc: BaseException) -> str | None:
    """'FILE:LINE' of the job's innermost frame in `exc`'s traceback: the job's own code (a
    built-in job's module counts as the job's), not batuta's, nor this runner's."""
    site = None
    for frame, line in traceback.walk_tb(exc.__traceback__):
        path = Path(frame.f_code.co_filename)
        ours = (path.parent == _JOBS_DIR and path.name.startswith("_")) or (
            path.is_relative_to(_PACKAGE_DIR) and path.parent != _JOBS_DIR
        )
        if not ours:
            site = f"{path.name}:{line}"
    return site


def _job_traceback(exc: BaseException) -> str:
    """The traceback from the job's frames on: this runner's own frame says nothing."""
    tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _task_output(exc: BatutaError) -> str | None:
    """What the failed task of a `TaskFailedError` wrote to stderr (a kernel's traceback), for
    the terminal: the error's line says it is in `result.stderr`, which the job did not keep."""
    result = exc.result if isinstance(exc, TaskFailedError) else None
    if not isinstance(result, TaskResult) or not result.stderr:
        return None
    return f"task {result.task_id} ({result.name}) wrote to stderr:\n{result.stderr_str().rstrip(chr(10))}\n"
