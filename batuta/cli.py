"""The `batuta` command: `batuta run JOB`, `batuta agent`, `batuta version`.

`batuta agent ...` is dispatched before the parser is even built: it is started on every host
at every connection, so it must not pay for argparse help text, the runtime, rich or NumPy.
Every other command imports what it needs when it runs.

Exit codes: 0 success; 1 the work failed (a task failed, the job raised; with `run --strict`
also a host refused, unreachable or lost; `cluster status` and `stack`: a host could not be
reached); 2 the command line, a job file or a configuration is wrong; 3 `batuta run` could
start no host at all, so nothing ran; 130 interrupted.
Every error is one line on stderr that names the thing and the fix; a job's own traceback
is the one exception, printed because it is the job author's best clue.

To add a command, write `_add_<name>_arguments(parser)` and `_cmd_<name>(args) -> int` and
list them in `COMMANDS`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NoReturn

from batuta._version import __version__
from batuta.core.task import MAX_SLOTS
from batuta.errors import BatutaError, UsageError

if TYPE_CHECKING:
    from batuta.jobs import RunOutcome, RunSummary
    from batuta.runtime.cluster import ClusterConfig
    from batuta.runtime.probe import HostReport

PROG = "batuta"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `batuta` command with `argv` (default: `sys.argv[1:]`); return the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["agent"]:
        return _run_agent(args[1:])
    try:
        parsed = _parse(args)
        if isinstance(parsed, int):
            return parsed
        handler: Callable[[argparse.Namespace], int] = parsed.handler
        return handler(parsed)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UsageError as exc:  # ConfigError is a UsageError too
        _print_error(exc)
        return EXIT_USAGE
    except BatutaError as exc:
        _print_error(exc)
        return EXIT_FAILED


def _print_error(exc: BaseException | str) -> None:
    message = " ".join(str(exc).split()) or type(exc).__name__
    print(f"{PROG}: error: {message}", file=sys.stderr)


# -- parser ------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (raised as UsageError), not usage plus message."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}; see '{self.prog} --help'")


@dataclass(frozen=True, slots=True)
class Command:
    """One subcommand: its name, one-line help, how to add its arguments, and its handler."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: global options, then one subparser per entry of `COMMANDS`."""
    parser = _Parser(
        prog=PROG,
        description="Turn machines reachable by SSH into one compute pool for numba kernels.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for command in COMMANDS:
        sub = commands.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(handler=command.handler)
    return parser


def _parse(args: list[str]) -> argparse.Namespace | int:
    """Parsed arguments, or the exit code where argparse already did the work (--help)."""
    try:
        parsed = build_parser().parse_args(args)
    except SystemExit as exc:  # --help and --version print and exit 0
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    if parsed.command is None:
        raise UsageError("no command given; try 'batuta run demo', or 'batuta --help' for all")
    return parsed


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; pass a count of 1 or more, e.g. 2") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is too few; pass a count of 1 or more, e.g. 2")
    return value


def _slot_count(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_SLOTS:
        raise argparse.ArgumentTypeError(f"{value} is too many; one agent runs at most {MAX_SLOTS} slots")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number, e.g. 0") from None


# -- batuta agent ------------------------------------------------------------------------


def _add_agent_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("agent_args", nargs=argparse.REMAINDER, help="passed to the agent")


def _cmd_agent(args: argparse.Namespace) -> int:
    return _run_agent(list(args.agent_args))


def _run_agent(argv: list[str]) -> int:
    """Hand over to the host agent, importing nothing else first (it must start fast)."""
    try:
        from batuta.agent.main import main as agent_main
    except ModuleNotFoundError as exc:
        if exc.name not in ("batuta.agent.main", "batuta.agent"):
            raise
        print(
            f"{PROG}: error: this install has no host agent (batuta.agent.main); reinstall batuta",
            file=sys.stderr,
        )
        return EXIT_FAILED
    try:
        return int(agent_main(argv) or EXIT_OK)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


# -- batuta worker -----------------------------------------------------------------------


def _add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bind",
        default="127.0.0.1:9443",
        metavar="HOST:PORT",
        help="address to listen on (default: 127.0.0.1:9443, this machine only; "
        "use 0.0.0.0:9443 or a specific address to accept coordinators from the network)",
    )
    parser.add_argument("--cert", required=True, metavar="FILE", help="the worker's certificate (server.pem)")
    parser.add_argument("--key", required=True, metavar="FILE", help="its private key (server.key, mode 0600)")
    parser.add_argument(
        "--ca", required=True, metavar="FILE", help="the CA whose client certificates are accepted (ca.pem)"
    )
    parser.add_argument("--slots", type=_int, metavar="N", help="CPU worker slots (default: one per core)")
    parser.add_argument("--gpus", default="auto", metavar="auto|none|0,1", help="GPU slots (default: auto)")
    parser.add_argument(
        "--kernel-module", action="append", default=[], metavar="MOD", help="kernel module to load (repeatable)"
    )
    parser.add_argument("--name", help="host name the agent reports (default: hostname)")
    parser.add_argument(
        "--peer-timeout",
        type=float,
        default=20.0,
        metavar="S",
        help="drop a coordinator whose link went silent for about this long (default: 20)",
    )
    parser.add_argument(
        "--client-hello-timeout",
        type=float,
        default=2.0,
        metavar="S",
        help="drop a connection that has not started its TLS handshake this long after connecting "
        "(default: 2; a TLS client starts at once)",
    )
    parser.add_argument(
        "--max-handshakes-per-source",
        type=_int,
        default=8,
        metavar="N",
        help="connections from one address in their TLS handshake at once; more are refused (default: 8)",
    )
    parser.add_argument(
        "--log-level",
        type=str.lower,
        choices=("debug", "info", "warning", "error"),
        default="info",
        metavar="LEVEL",
        help="debug, info (default), warning or error",
    )


def _cmd_worker(args: argparse.Namespace) -> int:
    """Serve coordinators over mutual TLS until SIGTERM or Ctrl-C."""
    import asyncio
    from pathlib import Path

    from batuta.agent.daemon import WorkerOptions, check_key_file, run_worker
    from batuta.agent.options import parse_args as parse_agent_args
    from batuta.observers.logs import configure
    from batuta.transport.tls import TLSConfigError, split_address

    try:
        host, port = split_address(args.bind)
    except ValueError as exc:
        raise UsageError(f"--bind: {exc}") from None
    agent_argv = ["--stdio", "--gpus", args.gpus]
    if args.slots is not None:
        agent_argv += ["--slots", str(args.slots)]
    for module in args.kernel_module:
        agent_argv += ["--kernel-module", module]
    if args.name is not None:
        agent_argv += ["--name", args.name]
    agent = parse_agent_args(agent_argv)  # the agent's own checks, before anything listens
    if not args.peer_timeout > 0:
        raise UsageError(f"--peer-timeout {args.peer_timeout}: expected a positive number of seconds")
    if not 0 < args.client_hello_timeout < float("inf"):
        raise UsageError(f"--client-hello-timeout {args.client_hello_timeout}: expected a positive number of seconds")
    if args.max_handshakes_per_source < 1:
        raise UsageError(f"--max-handshakes-per-source {args.max_handshakes_per_source}: expected 1 or more")
    options = WorkerOptions(
        cert=Path(args.cert).expanduser(),
        key=Path(args.key).expanduser(),
        ca=Path(args.ca).expanduser(),
        host=host,
        port=port,
        slots=args.slots,
        gpus=args.gpus,
        kernel_modules=agent.kernel_modules,
        name=args.name,
        peer_timeout=args.peer_timeout,
        client_hello_timeout=args.client_hello_timeout,
        max_handshakes_per_source=args.max_handshakes_per_source,
    )
    setup = configure(level=args.log_level)
    try:
        warning = check_key_file(options.key)
        if warning:
            print(f"{PROG} worker: warning: {warning}", file=sys.stderr)
        return asyncio.run(run_worker(options))
    except TLSConfigError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"cannot listen on {args.bind}: {exc.strerror or exc}; pick another --bind") from None
    finally:
        setup.close()


# -- batuta certs ------------------------------------------------------------------------


def _add_certs_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="certs_action", metavar="ACTION", title="actions")
    init = actions.add_parser(
        "init",
        help="create a private CA, a worker (server) certificate and a coordinator (client) certificate",
    )
    init.add_argument("directory", metavar="DIR", help="folder to write into (created with mode 0700)")
    init.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME",
        help="a name or address coordinators dial the worker by (repeatable; default: localhost and 127.0.0.1)",
    )
    init.add_argument("--days", type=_positive_int, default=825, metavar="N", help="certificate lifetime in days")
    init.add_argument("--force", action="store_true", help="replace certificates and keys already in DIR")


def _cmd_certs(args: argparse.Namespace) -> int:
    if args.certs_action != "init":
        raise UsageError("'batuta certs' needs an action: 'batuta certs init DIR [--host NAME ...]'")
    from batuta.transport.certs import DEFAULT_HOSTS, describe, init_certs

    paths = init_certs(args.directory, hosts=args.host or DEFAULT_HOSTS, days=args.days, force=args.force)
    for cert in (paths.ca_cert, paths.server_cert, paths.client_cert):
        print(describe(cert))
    print(f"keys (mode 0600): {paths.ca_key}, {paths.server_key}, {paths.client_key}")
    print(
        f"worker:      {PROG} worker --bind 127.0.0.1:9443 --cert {paths.server_cert} --key {paths.server_key} "
        f"--ca {paths.ca_cert}\n"
        f"coordinator: [tls] ca = {str(paths.ca_cert)!r}, cert = {str(paths.client_cert)!r}, "
        f"key = {str(paths.client_key)!r}\n"
        f"keep {paths.ca_key.name} off the workers; copy only server.pem, server.key and ca.pem there"
    )
    return EXIT_OK


# -- batuta version ----------------------------------------------------------------------


def _add_version_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def _cmd_version(args: argparse.Namespace) -> int:
    import platform

    print(f"{PROG} {__version__} (Python {platform.python_version()}, {sys.platform})")
    return EXIT_OK


# -- batuta run --------------------------------------------------------------------------


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    from batuta.jobs import builtin_job_names

    parser.add_argument(
        "job",
        metavar="JOB",
        help="a .py file defining 'async def main(pool)', or a built-in job: " + ", ".join(builtin_job_names()),
    )
    _add_pool_arguments(parser, cluster_help="run on the hosts of this cluster file (TOML) instead of locally")
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
        help="record each succeeded task's result (and the job's checkpoints) in DIR; starts it over",
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
        type=_port,
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


def _port(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port; pass 0 to 65535, e.g. 9464")
    return value


def _has_terminal() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


def _check_metrics_arguments(args: argparse.Namespace) -> None:
    if args.metrics_bind is not None and args.metrics_port is None:
        raise UsageError(f"--metrics-bind {args.metrics_bind} needs --metrics-port PORT (0 picks a free one)")
    args.metrics_bind = args.metrics_bind or "127.0.0.1"


def _metrics_url(address: tuple[str, int]) -> str:
    host, port = address
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/metrics"


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
    return setup.close


def _cmd_run(args: argparse.Namespace) -> int:
    """Load the job (every job-file error is found before a pool starts), run it, report."""
    import asyncio

    from batuta.jobs import load_job

    _check_pool_arguments(args)
    _check_metrics_arguments(args)
    job = load_job(args.job)
    cluster = _load_cluster(args.cluster) if args.cluster else None
    from batuta.jobs import HostsUnreachableError, ProgressBar, drop_summarised, run_job  # the runtime, now

    progress = ProgressBar(job.name) if _wants_progress(args) else None
    close_logging = _configure_logging(args, console_filter=drop_summarised)  # the summary has the failures
    try:
        with progress if progress is not None else contextlib.nullcontext():
            outcome = asyncio.run(
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
                    on_metrics=None if args.quiet else _announce_metrics,
                    metrics_textfile=args.metrics_textfile,
                    metrics_linger=args.metrics_linger,
                )
            )
    except HostsUnreachableError as exc:
        check = f"; 'batuta stack check -c {args.cluster}' checks every host and says what to fix"
        _print_error(f"{exc}{check if args.cluster else ''}")
        return EXIT_UNREACHABLE
    finally:
        close_logging()
    _report(outcome, as_json=args.json, quiet=args.quiet)
    summary = outcome.summary
    if summary.interrupted:
        print(_interrupted_note(summary, args), file=sys.stderr)
        return EXIT_INTERRUPTED
    if outcome.metrics is not None:  # --metrics-linger, once the summary is out
        from batuta.jobs import linger_metrics

        linger_metrics(outcome.metrics, args.metrics_linger, say=not args.quiet and sys.stderr.isatty())
    if not summary.ok or (args.strict and summary.failed_hosts):
        return EXIT_FAILED
    return EXIT_OK


def _interrupted_note(summary: RunSummary, args: argparse.Namespace) -> str:
    """One line: what the interrupt left done, and how to go on from there."""
    done = summary.tasks - summary.unfinished
    note = f"{PROG}: interrupted: {done} of {summary.tasks} tasks finished, {summary.unfinished} cancelled; "
    again = f"{PROG} run {args.job}" + (f" --cluster {args.cluster}" if args.cluster else "")
    if args.journal:
        return note + f"'{again} --journal {args.journal} --resume' runs only what is not done"
    return note + f"with '--journal DIR' a run can be resumed ('{again} --journal DIR', then '--resume')"


def _announce_metrics(address: tuple[str, int]) -> None:
    print(f"{PROG}: serving metrics at {_metrics_url(address)}", file=sys.stderr, flush=True)


def _wants_progress(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


def _report(outcome: RunOutcome, *, as_json: bool, quiet: bool) -> None:
    """The job's value and the summary on stdout; the job's traceback and error on stderr."""
    import json

    summary = outcome.summary
    if as_json:
        print(json.dumps(summary.to_json()))
    else:
        if summary.result is not None:
            print(summary.result)
        if not quiet:
            print("\n".join(summary.text_lines()))
        else:  # no summary: each failure cause once, and each host that failed, on stderr
            for line in summary.failure_lines():
                print(f"{PROG}: {line}", file=sys.stderr)
            for host in summary.failed_hosts:
                print(f"{PROG}: host {host.host} {host.fate()}", file=sys.stderr)
    if outcome.traceback:
        sys.stderr.write(outcome.traceback)
    if summary.error:
        print(f"{PROG}: error: {summary.error}", file=sys.stderr)


def _add_pool_arguments(parser: argparse.ArgumentParser, *, cluster_help: str) -> None:
    """--cluster, --workers and --seed: which pool a command coordinates (`run`, `tui`)."""
    parser.add_argument("-c", "--cluster", metavar="FILE", help=cluster_help)
    parser.add_argument(
        "-w",
        "--workers",
        type=_slot_count,
        metavar="N",
        help="CPU worker slots in the local pool (default: one per core)",
    )
    parser.add_argument("--seed", type=_int, metavar="N", help="seed for the scheduler's random choices")


def _check_pool_arguments(args: argparse.Namespace) -> None:
    if args.cluster and args.workers:
        raise UsageError("--workers sizes the local pool; with --cluster set 'slots' per host in the cluster file")


def _load_cluster(path: str) -> ClusterConfig:
    from batuta.runtime.cluster import load_cluster

    return load_cluster(path)


# -- batuta tui --------------------------------------------------------------------------


def _add_tui_arguments(parser: argparse.ArgumentParser) -> None:
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


def _cmd_tui(args: argparse.Namespace) -> int:
    """The dashboard, with the coordinator inside it: local pool by default, SSH hosts with --cluster."""
    from pathlib import Path

    from batuta.jobs import load_job

    _check_pool_arguments(args)
    _check_metrics_arguments(args)
    for spec in args.job:
        load_job(spec)  # every job-file error is found before the screen takes over the terminal
    from batuta.jobs import make_pool, start_metrics

    cluster = _load_cluster(args.cluster) if args.cluster else None
    if cluster is not None:  # the screen owns the terminal: no passphrase prompt under it (ssh-add the key)
        cluster = replace(cluster, ssh=replace(cluster.ssh, ask_passphrase=False))
    pool = make_pool(workers=args.workers, seed=args.seed, cluster=cluster)
    if cluster is not None:
        count = len(cluster.host_names)
        label = f"{Path(args.cluster).name} ({count} host{'s' if count != 1 else ''})"
    else:
        label = "local (embedded)"
    from batuta.observers.logs import PoolLogObserver
    from batuta.tui.app import BatutaApp

    exporter = None
    close_logging: Callable[[], None] = lambda: None  # noqa: E731
    observer = None
    try:  # a busy port or an unwritable log file is a usage error before the screen takes over
        if args.metrics_port is not None:
            exporter = start_metrics(pool, args.metrics_port, args.metrics_bind)
        close_logging = _configure_logging(args, console=False)
        observer = PoolLogObserver(pool).attach() if args.log_file else None
        if not _has_terminal():
            raise UsageError("batuta tui needs a terminal on stdin and stdout; for a headless run use 'batuta run JOB'")
        app = BatutaApp(pool, cluster_label=label, start_jobs=args.job)
        if exporter is not None and exporter.address is not None:  # the log panel says where
            url = _metrics_url(exporter.address)
            app.model.add_log(logging.INFO, "batuta.observers.metrics", f"serving metrics at {url}")
        app.run()
    finally:
        if observer is not None:
            observer.close()
        close_logging()
        if exporter is not None:
            exporter.close()
    return EXIT_OK


# -- batuta cluster status ---------------------------------------------------------------


def _add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="cluster_action", metavar="ACTION", title="actions")
    status = actions.add_parser("status", help="reach every host and show its state, slots, GPUs and versions")
    status.add_argument("-c", "--cluster", metavar="FILE", required=True, help="the cluster file (TOML)")
    status.add_argument("--json", action="store_true", help="one JSON object on stdout")
    status.add_argument("--timeout", type=float, default=30.0, metavar="S", help="seconds to wait for each host")


def _cmd_cluster(args: argparse.Namespace) -> int:
    if args.cluster_action != "status":
        raise UsageError("'batuta cluster' needs an action: 'batuta cluster status --cluster FILE'")
    import asyncio
    import json

    from batuta.runtime.cluster import host_specs
    from batuta.runtime.probe import probe_hosts

    cluster = _load_cluster(args.cluster)
    reports = asyncio.run(probe_hosts(host_specs(cluster), timeout=args.timeout))
    if args.json:
        print(json.dumps({"cluster": str(args.cluster), "hosts": [_report_dict(r) for r in reports]}))
    else:
        _print_host_table(reports)
    return EXIT_OK if all(r.ok for r in reports) else EXIT_FAILED


def _report_dict(report: HostReport) -> dict[str, object]:
    hello = report.hello
    return {
        "host": report.name,
        "state": "up" if report.ok else "unreachable",
        "ready_s": round(report.ready_s, 3) if report.ready_s is not None else None,
        "cpu_slots": report.cpu_slots,
        "gpu_slots": report.gpu_slots,
        "gpus": [g.name for g in hello.gpus] if hello else [],
        "cores": hello.cpu_count if hello else None,
        "hostname": hello.hostname if hello else None,
        "python": hello.python_version if hello else None,
        "batuta": hello.batuta_version if hello else None,
        "error": report.error,
    }


def _print_host_table(reports: list[HostReport]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("HOST", "STATE", "SLOTS cpu/gpu", "GPUS", "CORES", "PYTHON", "BATUTA", "READY"):
        table.add_column(column)
    for report in reports:
        row = _report_dict(report)
        ready = f"{row['ready_s'] * 1000:.0f} ms" if isinstance(row["ready_s"], float) else "-"
        gpus = (", ".join(row["gpus"]) or "no GPU") if report.ok else "-"  # type: ignore[arg-type]
        state = "[green]up[/]" if report.ok else "[red]unreachable[/]"
        table.add_row(
            report.name,
            state,
            f"{row['cpu_slots']}/{row['gpu_slots']}",
            gpus,
            str(row["cores"] or "-"),
            str(row["python"] or "-"),
            str(row["batuta"] or "-"),
            ready,
        )
    console = Console()
    console.print(table)
    for report in reports:
        if report.error:
            console.print(f"{report.name}: {report.error}", markup=False, highlight=False)


# -- batuta stack versions | check | gate ------------------------------------------------


def _add_stack_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="stack_action", metavar="ACTION", title="actions")
    helps = {
        "versions": "component versions on every node, differences from the coordinator marked",
        "check": "is every node reachable, matched and fit to take work (exit 1 on an error)",
        "gate": "check, plus the cluster file's [policy] and every kernel against its reference",
    }
    for action, text in helps.items():
        sub = actions.add_parser(action, help=text, description=text)
        sub.add_argument(
            "-c", "--cluster", metavar="FILE", help="the cluster file (TOML); default: the embedded local agent"
        )
        sub.add_argument(
            "--format", choices=("text", "json", "markdown"), default="text", help="output format (default: text)"
        )
        sub.add_argument(
            "--timeout",
            type=_positive_seconds,
            default=60.0,
            metavar="S",
            help="seconds for each node's agent to start, and for each task there (default: 60)",
        )
        sub.add_argument(
            "--log-level",
            type=str.lower,
            choices=("debug", "info", "warning", "error", "critical"),
            default="error",
            metavar="LEVEL",
            help="log to stderr from this level (default: error; findings already say what is wrong)",
        )
        if action == "versions":
            continue
        sub.add_argument("--strict", action="store_true", help="warnings fail too (exit 1)")
        sub.add_argument("-q", "--quiet", action="store_true", help="print only the verdict")
        sub.add_argument(
            "--min-disk-gb",
            type=_gigabytes,
            metavar="GB",
            help="free disk below this is an error, below twice it a warning (default: [policy], else 2)",
        )
        sub.add_argument(
            "--min-memory-gb",
            type=_gigabytes,
            metavar="GB",
            help="available memory below this is an error, below twice it a warning (default: [policy], else 1)",
        )


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds, e.g. 30") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds, e.g. 30")
    return value


def _gigabytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of GiB, e.g. 2") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a number of GiB >= 0, e.g. 2")
    return value


def _cmd_stack(args: argparse.Namespace) -> int:
    """Versions, health or the gate verdict of every node; stdout holds the report alone."""
    import os

    if args.stack_action is None:
        raise UsageError("'batuta stack' needs an action: versions, check or gate (e.g. 'batuta stack check -c FILE')")
    from batuta.observers.logs import configure
    from batuta.stack.report import render
    from batuta.stack.survey import EMBEDDED, StackOptions, run_stack

    cluster = _load_cluster(args.cluster) if args.cluster else None
    options = StackOptions(
        timeout=args.timeout,
        strict=getattr(args, "strict", False),
        min_free_disk_gb=getattr(args, "min_disk_gb", None),
        min_free_memory_gb=getattr(args, "min_memory_gb", None),
    )
    logging_setup = configure(level=args.log_level, fmt="text", stream=sys.stderr)
    try:
        report = run_stack(args.stack_action, cluster, source=args.cluster or EMBEDDED, options=options)
    finally:
        logging_setup.close()
    color = args.format == "text" and sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    try:
        print(render(report, args.format, color=color, quiet=getattr(args, "quiet", False)), flush=True)
    except BrokenPipeError:  # `batuta stack versions | head`: the reader left early, which is fine
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return report.exit_code


COMMANDS: list[Command] = [
    Command("run", "run a job file or a built-in job on a local pool or a cluster", _add_run_arguments, _cmd_run),
    Command("tui", "the live dashboard, coordinating a local pool or a cluster", _add_tui_arguments, _cmd_tui),
    Command("cluster", "look at the hosts of a cluster file", _add_cluster_arguments, _cmd_cluster),
    Command("stack", "versions, health and a CI gate for every node", _add_stack_arguments, _cmd_stack),
    Command("agent", "run the host agent (started by the coordinator on each host)", _add_agent_arguments, _cmd_agent),
    Command("worker", "a long-lived host agent that coordinators reach over TLS", _add_worker_arguments, _cmd_worker),
    Command("certs", "make a private CA and TLS certificates for workers", _add_certs_arguments, _cmd_certs),
    Command("version", "print batuta's version", _add_version_arguments, _cmd_version),
]
