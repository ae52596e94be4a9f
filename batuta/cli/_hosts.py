"""The commands about hosts: `agent`, `worker`, `certs`, `cluster`, `stack`, `version`."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from batuta._version import __version__
from batuta.errors import UsageError

if TYPE_CHECKING:
    from batuta.runtime.cluster import ClusterConfig
    from batuta.runtime.probe import HostReport

from batuta.cli._common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    PROG,
    gigabytes,
    load_cluster,
    positive_int,
    positive_seconds,
)
from batuta.cli._install import add_install_arguments, cmd_cluster_install

# -- batuta agent ------------------------------------------------------------------------


def add_agent_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("agent_args", nargs=argparse.REMAINDER, help="passed to the agent")


def cmd_agent(args: argparse.Namespace) -> int:
    return run_agent(list(args.agent_args))


def run_agent(argv: list[str]) -> int:
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


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
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
    parser.add_argument("--slots", type=int, metavar="N", help="CPU worker slots (default: one per core)")
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
        help="drop a coordinator whose link went silent (its machine unreachable) for about this long "
        "(default: 20); one stopped but on a machine that still answers (Ctrl-Z) is dropped when it has "
        "sent nothing for its pool's agent_silence_limit (default 300 s)",
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
        type=int,
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


def cmd_worker(args: argparse.Namespace) -> int:
    """Serve coordinators over mutual TLS until SIGTERM or Ctrl-C."""
    import asyncio
    from pathlib import Path

    from batuta.agent.daemon import WorkerOptions, run_worker
    from batuta.agent.main import check_host
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
    check_host(agent)  # and what it checks at its start: GPUs that are there, modules it can import
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
        # a --key others may read is warned about where it is loaded (once): saying it here
        # too printed the same warning twice
        return asyncio.run(run_worker(options))
    except TLSConfigError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"cannot listen on {args.bind}: {exc.strerror or exc}; pick another --bind") from None
    finally:
        setup.close()


# -- batuta certs ------------------------------------------------------------------------


def add_certs_arguments(parser: argparse.ArgumentParser) -> None:
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
    init.add_argument(
        "--days", type=positive_int, default=825, metavar="N", help="certificate lifetime in days (default: 825)"
    )
    init.add_argument("--force", action="store_true", help="replace certificates and keys already in DIR")
    reissue = actions.add_parser(
        "reissue",
        help="a new worker (server) certificate and key from DIR's CA, for new names: coordinators keep their files",
    )
    reissue.add_argument("directory", metavar="DIR", help="the folder 'batuta certs init' made (its ca.pem and ca.key)")
    reissue.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME",
        help="a name or address coordinators dial the worker by (repeatable; at least one)",
    )
    reissue.add_argument(
        "--name",
        default="server",
        metavar="NAME",
        help="write NAME.pem and NAME.key, replacing them (default: server): one worker's own, e.g. --name gpu2",
    )
    reissue.add_argument(
        "--days", type=positive_int, default=825, metavar="N", help="certificate lifetime in days (default: 825)"
    )


def cmd_certs(args: argparse.Namespace) -> int:
    if args.certs_action == "reissue":
        return _reissue(args)
    if args.certs_action != "init":
        raise UsageError(
            "'batuta certs' needs an action: 'batuta certs init DIR [--host NAME ...]', or "
            "'batuta certs reissue DIR --host NAME ...' for a worker's new names"
        )
    from batuta.transport.certs import DEFAULT_HOSTS, describe, init_certs, unbracketed

    paths = init_certs(args.directory, hosts=args.host or DEFAULT_HOSTS, days=args.days, force=args.force)
    for cert in (paths.ca_cert, paths.server_cert, paths.client_cert):
        print(describe(cert))
    print(f"keys (mode 0600): {paths.ca_key}, {paths.server_key}, {paths.client_key}")
    from batuta.transport.tls import DEFAULT_PORT, format_address

    # the address its certificate names, where coordinators will dial it; without --host the
    # certificate names this machine, and loopback is the safe default
    first = next((unbracketed(h.strip()) for h in args.host if h.strip()), "127.0.0.1")
    bind = format_address(first, DEFAULT_PORT)
    # the coordinator's lines as TOML that pastes into a cluster file as it is: absolute
    # paths, since a cluster file's relative paths are read from the file's own folder
    import json

    ca, client, key = (json.dumps(str(p.resolve())) for p in (paths.ca_cert, paths.client_cert, paths.client_key))
    print(
        f"worker:      {PROG} worker --bind {bind} --cert {paths.server_cert} --key {paths.server_key} "
        f"--ca {paths.ca_cert}\n"
        f"coordinator, in its cluster file:\n  [tls]\n  ca = {ca}\n  cert = {client}\n  key = {key}\n"
        f"keep {paths.ca_key.name} off the workers; copy only server.pem, server.key and ca.pem there"
    )
    return EXIT_OK


def _reissue(args: argparse.Namespace) -> int:
    from batuta.transport.certs import check_key_file, describe, reissue_server, unbracketed
    from batuta.transport.tls import DEFAULT_PORT, format_address

    cert, key = reissue_server(args.directory, hosts=args.host, name=args.name, days=args.days)
    # the CA's key mints certificates every worker and coordinator trusts: said as a worker's
    # --key or a [tls] key others may read is (it was used without a word)
    warning = check_key_file(cert.parent / "ca.key")
    if warning is not None:
        print(f"{PROG} certs reissue: warning: {warning}", file=sys.stderr)
    print(describe(cert))
    print(f"key (mode 0600): {key}")
    bind = format_address(next(unbracketed(h.strip()) for h in args.host if h.strip()), DEFAULT_PORT)
    print(
        f"worker:      {PROG} worker --bind {bind} --cert {cert} --key {key} --ca {cert.parent / 'ca.pem'}\n"
        f"copy {cert.name} and {key.name} to that worker and restart it; coordinators keep their files (the same CA).\n"
        "the certificate it replaces stays valid until it expires (nothing is revoked): for a leaked key, make a "
        f"new CA instead ('{PROG} certs init DIR --force', new files on every side)"
    )
    return EXIT_OK


# -- batuta version ----------------------------------------------------------------------


def add_version_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def cmd_version(args: argparse.Namespace) -> int:
    import platform

    print(f"{PROG} {__version__} (Python {platform.python_version()}, {sys.platform})")
    return EXIT_OK


# -- batuta cluster status ---------------------------------------------------------------


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="cluster_action", metavar="ACTION", title="actions")
    about = "reach every host and show its state, slots, GPUs and versions"
    status = actions.add_parser(
        "status", help=about, description=f"{about[0].upper()}{about[1:]} (exit 1 if one is not up)."
    )
    status.add_argument("-c", "--cluster", metavar="FILE", required=True, help="the cluster file (TOML)")
    status.add_argument("--json", action="store_true", help="one JSON object on stdout")
    status.add_argument(
        "--timeout",
        type=positive_seconds,
        default=30.0,
        metavar="S",
        help="seconds to wait for each host (default: 30)",
    )
    add_install_arguments(actions)


def cmd_cluster(args: argparse.Namespace) -> int:
    if args.cluster_action == "install":
        return cmd_cluster_install(args)
    if args.cluster_action != "status":
        raise UsageError(
            "'batuta cluster' needs an action: 'batuta cluster status --cluster FILE' "
            "or 'batuta cluster install --cluster FILE'"
        )
    import asyncio
    import json

    from batuta.runtime.cluster import host_specs
    from batuta.runtime.probe import probe_hosts

    cluster = load_cluster(args.cluster)
    _allocations_aside(cluster, args.cluster, "'batuta cluster status' has no host to reach")
    specs = host_specs(cluster)
    from batuta.cli._run import show_news

    # a host with bootstrap = true installs batuta first: say so, as batuta run does (22 s of silence)
    close_news = show_news(argparse.Namespace(quiet=False, log_format="text", log_level="warning"))
    try:
        with _agent_stderr_left_to_the_table([spec.name for spec in specs]):  # SIGTERM: main()'s interrupt
            reports = asyncio.run(probe_hosts(specs, timeout=args.timeout))
    finally:
        close_news()
    if args.json:
        print(json.dumps({"cluster": str(args.cluster), "hosts": [_report_dict(r) for r in reports]}))
    else:
        _print_host_table(reports)
    return EXIT_OK if all(r.ok for r in reports) else EXIT_FAILED


@contextlib.contextmanager
def _agent_stderr_left_to_the_table(names: list[str]) -> Iterator[None]:
    """An agent's stderr (forwarded by the transports as "NAME agent: ...") is in its host's
    row already, the error under the table: on the console too, each error was said twice."""
    prefixes = tuple(f"{name} agent{mark}" for name in names for mark in (":", "["))

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(prefixes)

    loggers = [logging.getLogger(name) for name in ("batuta.transport.ssh", "batuta.transport.local")]
    for logger in loggers:
        logger.addFilter(keep)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(keep)


def _allocations_aside(cluster: ClusterConfig, path: str, nothing: str) -> None:
    """An allocation's nodes exist only while it runs: a report over the other hosts says so,
    and one over nothing at all is a usage error, not an empty table that reads as a pass."""
    if not cluster.allocations:
        return
    asked = ", ".join(allocation.name for allocation in cluster.allocations)
    if not cluster.hosts and cluster.local is None:
        raise UsageError(
            f"{path} has only [[allocations]] ({asked}), whose nodes exist only while allocated, so {nothing}; "
            "run a job with 'batuta alloc' (its summary names each node's problem), or list hosts in [[hosts]]"
        )
    print(
        f"batuta: note: the nodes of [[allocations]] ({asked}) are not checked: they exist only while allocated",
        file=sys.stderr,
    )


def _report_dict(report: HostReport) -> dict[str, object]:
    hello = report.hello
    return {
        "host": report.name,
        "state": report.state,
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
        gpu_names = [g.name for g in report.hello.gpus] if report.hello else []
        gpus = (", ".join(gpu_names) or "no GPU") if report.ok else "-"
        state = "[green]up[/]" if report.ok else f"[red]{report.state}[/]"
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


def add_stack_arguments(parser: argparse.ArgumentParser) -> None:
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
        shown = sub.add_mutually_exclusive_group()
        shown.add_argument(
            "--format", choices=("text", "json", "markdown"), default="text", help="output format (default: text)"
        )
        shown.add_argument(  # as `run --json` and `ps --json`
            "--json", dest="format", action="store_const", const="json", help="the same as --format json"
        )
        sub.add_argument(
            "--timeout",
            type=positive_seconds,
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
        sub.add_argument(
            "--module",
            action="append",
            default=[],
            metavar="PATH",
            help="ship this .py file or package folder to every node and import it there, as `batuta run` does "
            "(repeatable); `gate` also checks its kernels that have a sample",
        )
        if action == "versions":
            continue
        sub.add_argument("--strict", action="store_true", help="warnings fail too (exit 1)")
        sub.add_argument("-q", "--quiet", action="store_true", help="print only the verdict")
        sub.add_argument(
            "--min-disk-gb",
            type=gigabytes,
            metavar="GB",
            help="free disk below this is an error, below twice it a warning (default: [policy], else 2)",
        )
        sub.add_argument(
            "--min-memory-gb",
            type=gigabytes,
            metavar="GB",
            help="available memory below this is an error, below twice it a warning (default: [policy], else 1)",
        )


def cmd_stack(args: argparse.Namespace) -> int:
    """Versions, health or the gate verdict of every node; stdout holds the report alone."""
    import os

    if args.stack_action is None:
        raise UsageError("'batuta stack' needs an action: versions, check or gate (e.g. 'batuta stack check -c FILE')")
    from batuta.observers.logs import configure
    from batuta.stack.report import render
    from batuta.stack.survey import EMBEDDED, StackOptions, run_stack

    cluster = load_cluster(args.cluster) if args.cluster else None
    if cluster is not None:
        _allocations_aside(cluster, args.cluster, "'batuta stack' has no node to check")
    options = StackOptions(
        timeout=args.timeout,
        strict=getattr(args, "strict", False),
        min_free_disk_gb=getattr(args, "min_disk_gb", None),
        min_free_memory_gb=getattr(args, "min_memory_gb", None),
        modules=tuple(Path(path) for path in args.module),
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
