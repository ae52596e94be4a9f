"""Run a job as a served coordinator (`batuta run JOB --serve`): viewers come and go, the job goes on.

`serve_job` is `run_job` with a `CoordinatorServer` (batuta/runtime/serve.py) put on the pool
before it starts. The server learns the job's state from here: starting while the pool starts
(start-up may wait for more hosts than the first one up), running once its main is called,
then done, failed or cancelled with the run's one-line summary. A finished coordinator
stays listening for `linger_s` seconds, so that `batuta ps` and a late `batuta tui --attach`
still see how it ended, then closes and removes its socket. `stop()` (a viewer's or `batuta
stop`'s request) cancels the job's tasks and its `main`, the pool closes (its hosts are
released) and the coordinator exits without lingering; SIGTERM does the same. `cancel_job`
does it for the job but keeps the finished coordinator visible for its linger.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from batuta import Pool
from batuta.jobs._load import Job
from batuta.jobs._run import RunOutcome, run_job
from batuta.jobs._text import printable
from batuta.runtime import serve_wire as w
from batuta.runtime.serve import CoordinatorServer

log = logging.getLogger("batuta.jobs.serve")


class _JobControls:
    """What a viewer may do to the job: cancel it, or stop the whole coordinator."""

    def __init__(self, job_name: str) -> None:
        self.job_name = job_name
        self.pool: Pool | None = None
        self.run_task: asyncio.Task[RunOutcome] | None = None
        self.stopping = asyncio.Event()
        self.cancelled = False

    def cancel_job(self, name: str) -> int:
        if name != self.job_name:
            raise ValueError(f"no job named {name!r} here; this coordinator runs {self.job_name!r}")
        count = self.pool.cancel_job(name) if self.pool is not None else 0
        self.cancelled = True
        if self.run_task is not None and not self.run_task.done():
            self.run_task.cancel()
        return count

    def stop(self) -> None:
        self.stopping.set()
        if self.run_task is not None and not self.run_task.done():
            self.cancelled = True
            self.run_task.cancel()


async def serve_job(
    job: Job,
    *,
    name: str,
    path: Path | None = None,
    linger_s: float = 600.0,
    tls_bind: tuple[str, int] | None = None,
    tls_context: ssl.SSLContext | None = None,
    cluster_label: str = "local",
    on_listening: Callable[[CoordinatorServer], None] | None = None,
    on_ended: Callable[[RunOutcome], None] | None = None,
    on_ending_signal: Callable[[int], None] | None = None,
    **run_options: Any,
) -> RunOutcome | None:
    """Run `job` (see `run_job` for `run_options`) with viewers welcome; returns its outcome
    (None when it was stopped before its hosts were up). `on_ended` gets the outcome as soon as
    the job ends, before the linger: the value and summary reach the log then, not at exit.
    `on_ending_signal(signum)` is told of a SIGTERM or SIGHUP before the job is stopped for it."""
    controls = _JobControls(job.name)
    servers: list[CoordinatorServer] = []
    started_at: list[float] = []
    loop = asyncio.get_running_loop()
    told = run_options.get("on_metrics")

    def on_metrics(address: tuple[str, int]) -> None:  # `batuta ps` says it: port 0's pick is found there
        from batuta.observers.metrics import metrics_url  # prometheus-client: only when metrics are asked for

        for server in servers:
            server.metrics_url = metrics_url(address)
        if told is not None:
            told(address)

    run_options["on_metrics"] = on_metrics

    async def serve(pool: Pool) -> None:
        controls.pool = pool
        server = CoordinatorServer(
            pool,
            name=name,
            job=job.name,
            path=path,
            controls=controls,
            cluster_label=cluster_label,
            tls_bind=tls_bind,
            tls_context=tls_context,
        )
        await server.start()
        servers.append(server)
        if on_listening is not None:
            on_listening(server)

    def on_started() -> None:
        """The pool has started and the job's main is called: `batuta ps` said "running" at the
        first host up, while start-up still waited for others (start_wait, a bootstrap install),
        and a `batuta stop` then said the job had not started."""
        server = servers[0]
        server.set_state("running")
        started_at.append(loop.time())
        server.note(
            w.JobChanged(
                name=job.name, origin=job.origin, state="running", message="", started_at=started_at[0], ended_at=None
            )
        )

    def on_signal(signum: int) -> None:
        if on_ending_signal is not None:
            on_ending_signal(signum)
        controls.stop()

    # `kill`, a Slurm time limit, and SIGHUP (--foreground in a terminal that closed; not under
    # nohup): end as `batuta stop` does. SIGHUP was raised as KeyboardInterrupt where the loop
    # was: the pool closed as asyncio.run cancelled everything, and no summary, no resume hint.
    ending = [signal.SIGTERM, *([signal.SIGHUP] if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN else [])]
    previous: dict[int, Any] = {}
    for signum in ending:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread: no signals
            before = signal.getsignal(signum)
            loop.add_signal_handler(signum, on_signal, signum)
            previous[signum] = before
    run = run_job(job, on_pool=serve, on_started=on_started, **run_options)
    run_task = controls.run_task = asyncio.create_task(run, name=job.name)
    try:
        try:
            outcome: RunOutcome | None = await asyncio.shield(run_task)
        except asyncio.CancelledError:
            if not run_task.done():  # Ctrl-C or SIGTERM on the coordinator itself
                controls.stop()
                with contextlib.suppress(BaseException):
                    await run_task
                raise
            outcome = None  # stopped while the hosts were still starting
            if controls.pool is not None:
                await controls.pool.close()
        if not servers:
            return outcome
        server = servers[0]
        if outcome is None:
            server.set_state("cancelled", "stopped before the job started")
            return None
        summary = outcome.summary
        state = "cancelled" if summary.interrupted else ("done" if summary.ok else "failed")
        line = summary.text_lines()[0] if summary.tasks or not summary.error else ""
        message = summary.error or (one_line(summary.result) if summary.result is not None else "")
        ended = w.JobChanged(
            name=job.name,
            origin=job.origin,
            state=state,
            message=message or line,
            started_at=started_at[0] if started_at else None,
            ended_at=loop.time(),
        )
        server.note(ended)
        server.hosts_closed(f"released: job {job.name} ended")
        if outcome.metrics is None:  # its exporter stopped with the job (no --metrics-linger)
            server.metrics_url = ""  # `batuta ps --json` gave a port where nothing listened any more
        # a job whose main() raised: its error with the counts ('50 tasks: 50 succeeded' alone read as fine)
        said = f"{line}; {summary.error}" if line and summary.error else line or message
        server.set_state(state, said)
        log.info("job %s %s: %s", job.name, state, said)
        if on_ended is not None:
            on_ended(outcome)
        if not controls.stopping.is_set() and linger_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(controls.stopping.wait(), linger_s)
        return outcome
    finally:
        for number, handler in previous.items():  # the loop's removal set the default action: a kill
            loop.remove_signal_handler(number)
            signal.signal(number, handler)
        for server in servers:
            await server.close(f"the coordinator of job {job.name} ended")


def one_line(value: object, limit: int = 200) -> str:
    text = " ".join(printable(value).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
