"""The commands that coordinate: `run` (headless) and `tui` (the dashboard)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import shlex
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

from batuta.errors import BatutaError, UsageError

if TYPE_CHECKING:
    from batuta.jobs import HostSummary, Job, RunOutcome, RunSummary
    from batuta.runtime.cluster import ClusterConfig

from batuta.cli._common import (
    ENDING_SIGNALS,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    PROG,
    dumb_terminal,
    has_terminal,
    hung_up,
    load_cluster,
    port,
    print_error,
    slot_count,
)

# -- batuta run --------------------------------------------------------------------------


def add_run_arguments(
    parser: argparse.ArgumentParser,
    cluster_help: str = "run on the hosts of this cluster file (TOML) instead of locally",
    *,
    local_pool: bool = True,
) -> None:
    """`run`'s arguments; `local_pool=False` (alloc) leaves --workers out of the help (it is
    still parsed, to be refused with what to give instead)."""
    from batuta.jobs import builtin_job_names

    parser.add_argument(
        "job",
        metavar="JOB",
        help="a .py file defining 'async def main(pool)', or a built-in job: " + ", ".join(builtin_job_names()),
    )
    _add_pool_arguments(parser, cluster_help=cluster_help, local_pool=local_pool)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the summary as one JSON object on stdout (the job's prints go to stderr)",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 when a host was refused, unreachable or lost during the run, even if every task succeeded",
    )
    _add_observer_arguments(parser)
    from batuta.cli._serve import add_serve_run_arguments

    add_serve_run_arguments(parser)


def _add_observer_arguments(parser: argparse.ArgumentParser) -> None:
    """`batuta run`'s metrics, logging and journal options (see batuta.observers.metrics, .logs, .journal)."""
    observe = parser.add_argument_group("metrics, logs and journal")
    _add_metrics_and_log_arguments(observe, log_to="stderr")
    observe.add_argument(
        "--metrics-linger",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="with --metrics-port: serve the final metrics this long after the job (default: 0; Ctrl-C ends it)",
    )
    observe.add_argument(
        "--metrics-textfile",
        metavar="PATH",
        help="write the final metrics to PATH (Prometheus text, replaced atomically) for node-exporter",
    )
    observe.add_argument(
        "--journal",
        metavar="DIR",
        help="record each succeeded task's result (and the job's checkpoints) in DIR; starts it over if the "
        "run that wrote it finished (if not, add --resume)",
    )
    observe.add_argument(
        "--resume",
        action="store_true",
        help="with --journal: reuse its results and checkpoints, running only what is not done",
    )


def _add_metrics_and_log_arguments(group: argparse._ArgumentGroup, *, log_to: str) -> None:
    """--metrics-port/--metrics-bind and --log-*: shared by `run` and `tui`."""
    group.add_argument(
        "--metrics-port",
        type=port,
        metavar="PORT",
        help="serve Prometheus metrics on this port while the pool runs (0 picks a free one)",
    )
    group.add_argument(
        "--metrics-bind",
        metavar="ADDR",
        help="address the metrics server listens on (default: 127.0.0.1, this machine only)",
    )
    group.add_argument(
        "--log-format", choices=("text", "json"), default="text", help="log lines as text or JSON (default: text)"
    )
    group.add_argument(
        "--log-level",
        type=str.lower,
        choices=("debug", "info", "warning", "error", "critical"),
        default="warning",
        metavar="LEVEL",
        help="debug, info, warning (default), error or critical",
    )
    where = "also append" if log_to == "stderr" else "append (the screen has its own log panel)"
    group.add_argument("--log-file", metavar="FILE", help=f"{where} the log to FILE")


def _check_metrics_arguments(args: argparse.Namespace) -> None:
    if args.metrics_bind is not None and args.metrics_port is None:
        raise UsageError(f"--metrics-bind {args.metrics_bind} needs --metrics-port PORT (0 picks a free one)")
    args.metrics_bind = args.metrics_bind or "127.0.0.1"


def _configure_logging(
    args: argparse.Namespace, *, console: bool = True, console_filter: Callable[[logging.LogRecord], bool] | None = None
) -> Callable[[], None]:
    """Install `--log-*` on the `batuta` logger; returns what undoes it. Without `console`
    (the dashboard owns the terminal) only `--log-file` is written, if given. `console_filter`
    keeps records off the console alone (the file still gets them)."""
    from batuta.observers.logs import configure

    if not console and not args.log_file:
        return lambda: None
    try:
        setup = configure(level=args.log_level, fmt=args.log_format, file=args.log_file, console=console)
    except ValueError as exc:
        raise UsageError(f"{exc}; check --log-file") from None
    if console_filter is not None:
        for handler in setup.handlers:
            if not isinstance(handler, logging.FileHandler):
                handler.addFilter(console_filter)
    if not console:
        return setup.close
    close_news = show_news(args, [h for h in setup.handlers if not isinstance(h, logging.FileHandler)])

    def close() -> None:
        setup.close()  # first: the records it still holds are written with the news kept off the console
        close_news()

    return close


# What a run is doing while it waits, said at info: a batch job queued (`batuta alloc`), batuta
# installing itself on a host (`bootstrap = true`). At the console's default level (warnings)
# nothing was said for minutes.
NEWS_LOGGERS = ("batuta.runtime.allocation", "batuta.runtime.install")


class _StderrNow(logging.StreamHandler[TextIO]):
    """A handler on whatever sys.stderr is when it writes: the progress bar swaps in its own
    while it draws, and lines written past it would break the bar."""

    def emit(self, record: logging.LogRecord) -> None:
        self.setStream(sys.stderr)
        super().emit(record)


class _NewsFormatter(logging.Formatter):
    """'batuta: MESSAGE', and 'batuta: warning: MESSAGE' (or error) as the CLI's own lines say it."""

    def format(self, record: logging.LogRecord) -> str:
        severity = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        return f"{PROG}: {severity}{super().format(record)}"


def _is_news(record: logging.LogRecord) -> bool:
    return any(record.name == name or record.name.startswith(f"{name}.") for name in NEWS_LOGGERS)


def show_news(args: argparse.Namespace, console: Sequence[logging.Handler] = ()) -> Callable[[], None]:
    """`NEWS_LOGGERS`' info lines on stderr as 'batuta: ...', unless --quiet, JSON logs, or a
    log level that shows them anyway; returns what undoes it. Their warnings (at --log-level)
    are said there too, as 'batuta: warning: ...', and kept off the `console` log handlers:
    a timestamped log line between two 'batuta: allocation ...' lines was a second voice
    (the log file still gets them)."""
    from batuta.observers.logs import parse_level

    level = parse_level(args.log_level)
    if getattr(args, "quiet", False) or args.log_format != "text" or level <= logging.INFO:
        return lambda: None
    handler = _StderrNow(sys.stderr)
    handler.setFormatter(_NewsFormatter())
    handler.addFilter(lambda record: record.levelno < logging.WARNING or record.levelno >= level)

    def not_news(record: logging.LogRecord) -> bool:
        return not _is_news(record)

    for log_handler in console:
        log_handler.addFilter(not_news)
    loggers = [logging.getLogger(name) for name in NEWS_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.INFO)  # the batuta logger's own handler still holds to --log-level
        logger.addHandler(handler)

    def undo() -> None:
        for logger, previous in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(previous)
        for log_handler in console:
            log_handler.removeFilter(not_news)

    return undo


def cmd_run(args: argparse.Namespace) -> int:
    """Load the job (every job-file error is found before a pool starts), run it, report."""
    from batuta.cli._serve import check_serve_arguments
    from batuta.jobs import load_job

    _check_pool_arguments(args)
    _check_metrics_arguments(args)
    check_serve_arguments(args)
    job = load_job(args.job)
    if job.origin == "built-in" and Path(f"{args.job}.py").is_file():
        # a newcomer's own pi.py, typed as `batuta run pi`: the built-in ran, and looked like theirs
        print(
            f"batuta: note: running the built-in job {args.job!r}; for ./{args.job}.py here: "
            f"batuta run ./{args.job}.py",
            file=sys.stderr,
        )
    # `batuta alloc` passes the cluster it built (a file's, plus its allocation)
    cluster = getattr(args, "cluster_config", None) or (load_cluster(args.cluster) if args.cluster else None)
    return _run_on(args, job, cluster)


def _run_on(args: argparse.Namespace, job: Job, cluster: ClusterConfig | None) -> int:
    import asyncio

    from batuta.cli._serve import cmd_run_served

    if args.serve:
        from batuta.jobs import drop_summarised

        # ends with the summary too (here, or in its log): the failures are said there, once each
        close_logging = _configure_logging(args, console_filter=drop_summarised)
        try:
            return cmd_run_served(args, job, cluster)
        finally:
            close_logging()
    from batuta.jobs import HostsUnreachableError, ProgressBar, drop_summarised, drop_summarised_quietly, run_job

    progress = ProgressBar(job.name) if _wants_progress(args) else None
    interrupted: list[RunSummary] = []  # an interrupt before the job began, or as the pool closed
    # the summary has the failures (with -q, the last lines have the refused hosts too)
    close_logging = _configure_logging(args, console_filter=drop_summarised_quietly if args.quiet else drop_summarised)
    try:
        try:
            with progress if progress is not None else contextlib.nullcontext():
                outcome = asyncio.run(
                    _sigterm_as_interrupt(
                        run_job(
                            job,
                            workers=args.workers,
                            seed=args.seed,
                            cluster=cluster,
                            on_update=progress.update if progress else None,
                            job_stdout=sys.stderr if args.json else None,
                            journal=args.journal,
                            resume=args.resume,
                            metrics_port=args.metrics_port,
                            metrics_bind=args.metrics_bind,
                            # quiet, said all the same for a port picked here (0): nowhere else to learn it
                            on_metrics=None if args.quiet and args.metrics_port != 0 else announce_metrics,
                            metrics_textfile=args.metrics_textfile,
                            metrics_linger=args.metrics_linger,
                            modules=args.module,
                            on_interrupted=interrupted.append if args.json else None,
                        )
                    )
                )
        finally:
            close_logging()  # drains the log queue: the one-line error below must be the last line
    except HostsUnreachableError as exc:
        return unreachable(exc, args)
    except KeyboardInterrupt:
        if interrupted:  # --json ends with its one object however the run ended: each host, and why
            import json

            print(json.dumps({**interrupted[-1].to_json(), "exit_code": EXIT_INTERRUPTED}), flush=True)
        raise
    return finish_run(outcome, args)


def unreachable(exc: Exception, args: argparse.Namespace) -> int:
    """No host could be started (served or not): the one-line error, where to look, exit 3."""
    check = f"; 'batuta stack check -c {args.cluster}' checks every host and says what to fix"
    cluster = getattr(args, "cluster_config", None) or _loaded(args.cluster)
    # stack check has nothing to check in allocations alone (it says so, exit 2): no pointer there
    listed = cluster is not None and (cluster.hosts or cluster.local is not None)
    summary = getattr(exc, "summary", None)
    if getattr(args, "json", False) and summary is not None:  # a script reads stdout: each host, and why
        import json

        print(json.dumps({**summary.to_json(), "exit_code": EXIT_UNREACHABLE}), flush=True)
    print_error(f"{exc}{check if args.cluster and listed else ''}")
    return EXIT_UNREACHABLE


def _loaded(path: str | None) -> ClusterConfig | None:
    if not path:
        return None
    try:
        return load_cluster(path)
    except BatutaError:
        return None


def report_run(outcome: RunOutcome, args: argparse.Namespace) -> None:
    """The job's value and summary (--json, --quiet), as `batuta run` prints them at its end."""
    _report(outcome, as_json=args.json, quiet=args.quiet, exit_code=run_exit_code(outcome.summary, strict=args.strict))
    sys.stdout.flush()  # a served job's log is a file: the report is there as soon as it is made


def finish_run(outcome: RunOutcome, args: argparse.Namespace, *, reported: bool = False) -> int:
    """The end of `batuta run`, served or not: the report (unless `reported` already), the
    interrupted note, --metrics-linger, and the exit code (--strict)."""
    if not reported:
        report_run(outcome, args)
    summary = outcome.summary
    if summary.interrupted:
        print(_interrupted_note(summary, args), file=sys.stderr)
        return EXIT_INTERRUPTED
    if outcome.metrics is not None:  # --metrics-linger, once the summary is out
        from batuta.jobs import linger_metrics

        linger_metrics(outcome.metrics, args.metrics_linger, say=not args.quiet and sys.stderr.isatty())
    code = run_exit_code(summary, strict=args.strict)
    if code == EXIT_FAILED and summary.ok:  # every task succeeded: say why the exit is 1
        hosts = ", ".join(host.host for host in summary.failed_hosts)
        print(f"{PROG}: --strict: exit 1, as host(s) {hosts} failed during the run (see above)", file=sys.stderr)
    return code


def run_exit_code(summary: RunSummary, *, strict: bool) -> int:
    """What `batuta run` exits with for this summary (also the JSON's `exit_code`, so that a
    script reading it need not know the flags: `ok` is the job's own, `--strict` aside)."""
    if summary.interrupted:
        return EXIT_INTERRUPTED
    if not summary.ok:
        return EXIT_FAILED
    if strict and summary.failed_hosts:
        return EXIT_FAILED
    return EXIT_OK


T = TypeVar("T")


async def _sigterm_as_interrupt(run: Coroutine[Any, Any, T]) -> T:
    """`run`, which SIGTERM (`kill`, a batch system ending the job) and SIGHUP (its terminal
    closed) interrupt as Ctrl-C does: the pool closes, so its hosts are released and an
    allocation cancelled, and the summary says what finished. Without this the process died
    at once and left them all behind."""
    import asyncio

    task = asyncio.current_task()
    termed: list[bool] = []

    def on_signal(signum: int) -> None:
        hung_up(signum)
        termed.append(True)
        if task is not None:
            task.cancel()

    previous: dict[int, Any] = {}  # the handlers before the loop's (main()'s): put back at the end
    loop = asyncio.get_running_loop()
    if task is not None:
        for signum in ENDING_SIGNALS:
            if signum == signal.SIGHUP and signal.getsignal(signum) == signal.SIG_IGN:
                continue  # under nohup: hanging up is not a reason to stop
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
                before = signal.getsignal(signum)
                loop.add_signal_handler(signum, on_signal, signum)
                previous[signum] = before
    try:
        return await run
    except asyncio.CancelledError:
        if termed:  # before the job began (hosts starting, an allocation queued): as Ctrl-C there
            raise KeyboardInterrupt from None
        raise
    finally:
        # The loop, removing its handlers as it closes, set the default action: a SIGTERM
        # between the run's end and what follows (the metrics linger's handler) killed the
        # command, exit 143 after a run that succeeded.
        for number, handler in previous.items():
            loop.remove_signal_handler(number)
            signal.signal(number, handler)


def _interrupted_note(summary: RunSummary, args: argparse.Namespace) -> str:
    """One line: what the interrupt left done, and how to go on from there."""
    # cancelled: those the agents answered "cancelled" before the pool closed (an interrupt
    # that reached the coordinator alone), and those no one answered (it reached them too)
    cancelled = summary.cancelled + summary.unfinished
    note = (
        f"{PROG}: interrupted: {summary.tasks - cancelled} of {summary.tasks} tasks finished, {cancelled} cancelled; "
    )
    if getattr(args, "kind", None):  # batuta alloc: its options (and sbatch's after '--') are the user's own
        if args.journal:
            return note + "the same 'batuta alloc' command with --resume (before any '--') runs only what is not done"
        return note + "with --journal DIR (before any '--') the same 'batuta alloc' command can be resumed (--resume)"
    # Last on the line and shell-quoted: copied as printed, it runs (a path with a space in it too)
    again = shlex.join(_rerun_argv(args))
    if args.journal:
        return note + f"to run only what is not done: {again} --journal {shlex.quote(args.journal)} --resume"
    return note + f"with --journal DIR a run can be resumed (run {again} --journal DIR, then the same with --resume)"


def _rerun_argv(args: argparse.Namespace) -> list[str]:
    """The interrupted run's command, without --journal/--resume: the options it was given
    that shape its tasks or say where its output goes (argparse's defaults left out)."""
    argv = [PROG, "run", args.job]

    def option(name: str, value: object) -> None:
        argv.extend((name, str(value)))

    if args.cluster:
        option("--cluster", args.cluster)
    if getattr(args, "serve", False):  # a served run's note is in its log: resumed as it was started
        argv.append("--serve")
        if getattr(args, "name", None):
            option("--name", args.name)
        # under systemd, a batch script; not where a background --serve spawned it
        if getattr(args, "foreground", False) and not getattr(args, "spawned", False):
            argv.append("--foreground")
        for name in ("serve_linger", "serve_bind", "serve_certs"):  # how long it stays listed, where TLS viewers attach
            if getattr(args, name, None) is not None:
                option(f"--{name.replace('_', '-')}", getattr(args, name))
    if getattr(args, "metrics_port", None) is not None:  # where Prometheus scrapes it
        option("--metrics-port", args.metrics_port)
        if getattr(args, "metrics_bind", None) not in (None, "127.0.0.1"):
            option("--metrics-bind", args.metrics_bind)
    if getattr(args, "metrics_linger", 0.0):
        option("--metrics-linger", args.metrics_linger)
    if getattr(args, "metrics_textfile", None) is not None:
        option("--metrics-textfile", args.metrics_textfile)
    # its log, where and as it was written (a resumed run's lines follow the interrupted one's)
    if getattr(args, "log_format", "text") != "text":
        option("--log-format", args.log_format)
    if getattr(args, "log_level", "warning") != "warning":
        option("--log-level", args.log_level)
    if getattr(args, "log_file", None) is not None:
        option("--log-file", args.log_file)
    for module in args.module or ():  # its kernels, shipped again
        option("--module", module)
    # the backend is in the tasks' keys (run again without it, nothing is restored); the rest as given
    for name in ("workers", "backend", "seed"):
        if getattr(args, name, None) is not None:
            option(f"--{name}", getattr(args, name))
    argv += [f"--{flag}" for flag in ("strict", "json", "quiet") if getattr(args, flag, False)]
    return argv


def announce_metrics(address: tuple[str, int]) -> None:
    from batuta.observers.metrics import metrics_url

    print(f"{PROG}: serving metrics at {metrics_url(address)}", file=sys.stderr, flush=True)


def _wants_progress(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


def _report(outcome: RunOutcome, *, as_json: bool, quiet: bool, exit_code: int) -> None:
    """The job's value and the summary on stdout; the job's traceback and error on stderr."""
    import json

    from batuta.jobs import printable

    summary = outcome.summary
    if as_json:
        print(json.dumps({**summary.to_json(), "exit_code": exit_code}))
    else:
        if summary.result is not None:
            print(printable(summary.result))
        if not quiet:
            print("\n".join(summary.text_lines()))
        else:  # no summary: each failure cause once, and each host that failed, on stderr
            for line in summary.failure_lines():
                print(f"{PROG}: {line}", file=sys.stderr)
            for names, fate in _hosts_by_fate(summary.failed_hosts):
                print(f"{PROG}: {names} {fate}", file=sys.stderr)
    if outcome.traceback:
        sys.stderr.write(outcome.traceback)
    if summary.error:
        print(f"{PROG}: error: {summary.error}", file=sys.stderr)


HOSTS_NAMED = 4  # hosts named in one of -q's last lines; more are counted ("and 60 more")


def _hosts_by_fate(hosts: Sequence[HostSummary]) -> list[tuple[str, str]]:
    """("host a", fate), or ("hosts a, b and c", fate) for hosts that fared alike: an
    allocation's nodes end together, for one reason, which -q's last lines said once per node."""
    fates: dict[str, list[str]] = {}
    for host in hosts:
        fates.setdefault(host.fate(), []).append(host.host)
    said = []
    for fate, names in fates.items():
        if len(names) == 1:
            said.append((f"host {names[0]}", fate))
        elif len(names) <= HOSTS_NAMED:
            said.append((f"hosts {', '.join(names[:-1])} and {names[-1]}", fate))
        else:
            shown = names[: HOSTS_NAMED - 1]
            said.append((f"hosts {', '.join(shown)} and {len(names) - len(shown)} more", fate))
    return said


def _add_pool_arguments(parser: argparse.ArgumentParser, *, cluster_help: str, local_pool: bool = True) -> None:
    """--cluster, --workers and --seed: which pool a command coordinates (`run`, `tui`)."""
    parser.add_argument("-c", "--cluster", metavar="FILE", help=cluster_help)
    parser.add_argument(
        "-w",
        "--workers",
        type=slot_count,
        metavar="N",
        help="CPU worker slots in the local pool (default: one per core)" if local_pool else argparse.SUPPRESS,
    )
    parser.add_argument("--seed", type=int, metavar="N", help="seed for the scheduler's random choices")
    parser.add_argument(
        "--backend",
        choices=("cpu", "gpu", "auto", "scalar"),
        help="the backend the built-in jobs run their kernels on (default: cpu); with gpu, the ML jobs put "
        "their data on the GPU slots once and keep it there",
    )
    parser.add_argument(
        "--module",
        action="append",
        default=[],
        metavar="PATH",
        help="ship this .py file or package folder to every host and import it there (repeatable); "
        "the modules beside a job file that it imports ship without it",
    )


def _check_pool_arguments(args: argparse.Namespace) -> None:
    if args.cluster and args.workers:
        raise UsageError("--workers sizes the local pool; with --cluster set 'slots' per host in the cluster file")
    if args.backend is not None:
        from batuta.jobs import set_job_backend

        set_job_backend(args.backend)


# -- batuta tui --------------------------------------------------------------------------


def add_tui_arguments(parser: argparse.ArgumentParser) -> None:
    from batuta.jobs import builtin_job_names

    _add_pool_arguments(parser, cluster_help="coordinate the hosts of this cluster file (TOML), not this machine")
    parser.add_argument(
        "-j",
        "--job",
        action="append",
        default=[],
        metavar="JOB",
        help="start this job once the pool is up (repeatable): a .py file or a built-in job: "
        + ", ".join(builtin_job_names()),
    )
    _add_metrics_and_log_arguments(parser.add_argument_group("metrics and logs"), log_to="file")
    from batuta.cli._serve import add_attach_arguments

    add_attach_arguments(parser)


def _held(cluster: ClusterConfig | None) -> str:
    """What a dashboard's pool keeps allocated after its jobs end (its batch allocations'
    nodes: they stay the user's, counted against their time, until the pool closes)."""
    allocations = cluster.allocations if cluster is not None else ()
    if not allocations:
        return ""
    nodes = sum(len(allocation.host_names) for allocation in allocations)
    names = ", ".join(allocation.name for allocation in allocations)
    return (
        f"the pool holds {nodes} node{'s' if nodes != 1 else ''} of allocation{'s' if len(allocations) != 1 else ''} "
        f"{names} (its batch job{'s' if len(allocations) != 1 else ''} running)"
    )


def cmd_tui(args: argparse.Namespace) -> int:
    """The dashboard, with the coordinator inside it: local pool by default, SSH hosts with --cluster."""
    from pathlib import Path

    from batuta.jobs import load_job

    _check_pool_arguments(args)
    _check_metrics_arguments(args)
    if args.attach is not None or args.serve:
        from batuta.cli._serve import cmd_tui_attached

        return cmd_tui_attached(args)
    if args.name is not None or args.certs:  # --name '' too
        raise UsageError("--name is for --serve and --certs for --attach tls://...; add the one you meant")
    jobs = [load_job(spec) for spec in args.job]  # every job-file error is found before the screen takes over
    from batuta.jobs import make_pool, start_metrics

    cluster = load_cluster(args.cluster) if args.cluster else None
    if cluster is not None:  # the screen owns the terminal: no passphrase prompt under it (ssh-add the key)
        cluster = replace(cluster, ssh=replace(cluster.ssh, ask_passphrase=False))
    job_files = [job.origin for job in jobs if job.origin != "built-in"]  # their own modules ship to the hosts
    pool = make_pool(workers=args.workers, seed=args.seed, cluster=cluster, job_files=job_files, modules=args.module)
    pool.prepare_code()  # a bad --module or too much code is a usage error before the screen takes over
    if cluster is not None:
        count = len(cluster.host_names)
        label = f"{Path(args.cluster).name} ({count} host{'s' if count != 1 else ''})"
    else:
        label = "local (embedded)"
    from batuta.observers.logs import PoolLogObserver
    from batuta.tui.app import BatutaApp
    from batuta.tui.driver import TERMINAL_GONE_CODE

    exporter = None
    close_logging: Callable[[], None] = lambda: None  # noqa: E731
    observer = None
    try:  # a busy port or an unwritable log file is a usage error before the screen takes over
        if args.metrics_port is not None:
            exporter = start_metrics(pool, args.metrics_port, args.metrics_bind)
        close_logging = _configure_logging(args, console=False)
        observer = PoolLogObserver(pool).attach() if args.log_file else None
        if not has_terminal():
            raise UsageError("batuta tui needs a terminal on stdin and stdout; for a headless run use 'batuta run JOB'")
        if dumb_terminal():
            raise UsageError(
                f"batuta tui needs a terminal that draws a screen, and TERM={dumb_terminal()} says this one does not; "
                "run it in a terminal emulator (TERM=xterm-256color), or for a headless run use 'batuta run JOB'"
            )
        app = BatutaApp(pool, cluster_label=label, start_jobs=args.job, held=_held(cluster))
        if exporter is not None and exporter.url is not None:  # the log panel says where
            app.model.add_log(logging.INFO, "batuta.observers.metrics", f"serving metrics at {exporter.url}")
        app.run()
    finally:
        if observer is not None:
            observer.close()
        close_logging()
        if exporter is not None:
            exporter.close()
    if app.return_code == TERMINAL_GONE_CODE:  # its terminal went away (tui/driver.py): as on SIGHUP
        hung_up(signal.SIGHUP)
        return EXIT_INTERRUPTED
    return EXIT_FAILED if app.return_code else EXIT_OK  # a crash (Textual printed why) is no success
