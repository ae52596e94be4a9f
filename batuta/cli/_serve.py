"""Served coordinators: `batuta run JOB --serve`, `batuta ps`, `batuta stop`, `batuta tui --attach`.

`batuta run JOB --serve` checks everything the foreground run would (the job file, the
cluster file, the name), then starts the same command with `--foreground` in a new session
(no terminal, stdin closed, stdout and stderr to NAME.log beside the socket) and returns as
soon as the coordinator answers on its socket, printing how to attach and stop it. Closing
every terminal leaves it running. `--foreground` runs the served coordinator here (systemd,
a Slurm batch script, tests).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from batuta.cli._common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    hung_up,
    seconds_or_zero,
)
from batuta.errors import ServeError, UsageError, write_fix

if TYPE_CHECKING:
    from batuta.jobs import RunOutcome

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 120.0
DEFAULT_LINGER_S = 600.0


# -- arguments --------------------------------------------------------------------------------


def add_serve_run_arguments(parser: argparse.ArgumentParser) -> None:
    serve = parser.add_argument_group("serving (detach from the terminal, attach dashboards)")
    serve.add_argument(
        "--serve",
        action="store_true",
        help="run in the background, outliving this terminal; watch with 'batuta tui --attach', end with 'batuta stop'",
    )
    serve.add_argument("--name", metavar="NAME", help="with --serve: the coordinator's name (default: the job's)")
    serve.add_argument(
        "--foreground", action="store_true", help="with --serve: stay in this terminal (systemd, Slurm batch scripts)"
    )
    # the coordinator that a background --serve spawns, in the foreground of its own session:
    # what it says to run again (its resume note) leaves out the --foreground the user never gave
    serve.add_argument("--spawned", action="store_true", help=argparse.SUPPRESS)
    serve.add_argument(
        "--serve-linger",
        type=seconds_or_zero,
        default=None,  # None, not the default: so that --serve-linger without --serve is refused
        metavar="SECONDS",
        help=f"with --serve: a finished job stays listed by 'batuta ps' this long (default: {DEFAULT_LINGER_S:g})",
    )
    serve.add_argument(
        "--serve-bind",
        metavar="ADDR:PORT",
        help="with --serve: also listen on TCP, mutual TLS only (needs --serve-certs; viewers attach with tls://ADDR:PORT)",
    )
    serve.add_argument(
        "--serve-certs",
        metavar="DIR",
        help="a 'batuta certs init' folder: server.pem, server.key and ca.pem for --serve-bind",
    )


def add_attach_arguments(parser: argparse.ArgumentParser) -> None:
    attach = parser.add_argument_group("attaching to a served coordinator")
    attach.add_argument(
        "--attach",
        nargs="?",
        const="",
        metavar="TARGET",
        help="watch a served coordinator: NAME, a socket path, user@host:NAME (over SSH) or tls://HOST:PORT; "
        "alone: the only one running here",
    )
    attach.add_argument(
        "--serve",
        action="store_true",
        help="start the -j job as a served coordinator and attach to it; 'x' detaches, the job goes on",
    )
    attach.add_argument("--name", metavar="NAME", help="with --serve: the coordinator's name (default: the job's)")
    attach.add_argument("--certs", metavar="DIR", help="with --attach tls://...: client.pem, client.key and ca.pem")


def add_ps_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="one JSON object per coordinator, one a line")


def add_stop_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target",
        metavar="NAME",
        help="the coordinator to end: NAME (see 'batuta ps'), a socket path, user@host:NAME (over SSH) or "
        "tls://HOST:PORT",
    )
    parser.add_argument("--certs", metavar="DIR", help="for tls://HOST:PORT: client.pem, client.key and ca.pem")
    parser.add_argument(
        "-c",
        "--cluster",
        metavar="FILE",
        help="for user@host:NAME: reach the host with this cluster file's [ssh] settings (known_hosts, ssh config)",
    )


# -- batuta run JOB --serve ------------------------------------------------------------------


def check_serve_arguments(args: argparse.Namespace) -> None:
    given = (
        ("--name", args.name is not None),  # --name '' too: refused below, not taken for "no name"
        ("--foreground", args.foreground),
        ("--serve-linger", args.serve_linger is not None),
        ("--serve-bind", args.serve_bind is not None),
    )
    for flag, value in given:
        if value and not args.serve:
            raise UsageError(f"{flag} only applies to a served run; add --serve")
    if args.name is not None:
        from batuta.runtime import serve_paths

        serve_paths.check_name(args.name)
    if args.serve_bind is not None and not args.serve_certs:
        raise UsageError("--serve-bind needs --serve-certs DIR (a 'batuta certs init' folder): TCP is mutual TLS only")
    if args.serve_certs and args.serve_bind is None:
        raise UsageError(
            "--serve-certs is for --serve-bind ADDR:PORT; without it the coordinator serves its socket only"
        )


def _free_name(base: str) -> str:
    """`base`, or `base-2`, `base-3`, … : the first name no running coordinator has."""
    from batuta.runtime import serve_paths

    base = Path(base).stem if base.endswith(".py") else base
    stem = "".join(c if c.isalnum() or c in "._-" else "-" for c in base).strip(".-_")[:56] or "job"
    for number in range(1, 1000):
        name = stem if number == 1 else f"{stem}-{number}"
        path = serve_paths.socket_path(name)
        if not path.exists() or serve_paths.is_stale(path):
            return name
    raise UsageError(f"too many coordinators named {stem}-N; pass --name NAME")


def _linger(args: argparse.Namespace) -> float:
    return DEFAULT_LINGER_S if args.serve_linger is None else float(args.serve_linger)


def _tls(args: argparse.Namespace) -> tuple[tuple[str, int] | None, Any]:
    if args.serve_bind is None:
        return None, None
    from batuta.transport.tls import TLSError, server_context, split_address

    try:
        # no default port: the default (9443) is a worker's, and viewers must be told this one
        address = split_address(args.serve_bind, None)
    except ValueError as exc:
        raise UsageError(f"--serve-bind {args.serve_bind}: {exc}") from None
    certs = Path(args.serve_certs).expanduser()
    try:
        context = server_context(
            cert=certs / "server.pem", key=certs / "server.key", ca=certs / "ca.pem", who=f"--serve-certs {certs}"
        )
    except TLSError as exc:
        raise UsageError(str(exc)) from None
    return address, context


def cmd_run_served(args: argparse.Namespace, job: Any, cluster: Any) -> int:
    """`batuta run JOB --serve`: in the background (spawned), or here with --foreground."""
    import asyncio

    from batuta.runtime import serve_paths

    name = serve_paths.check_name(args.name) if args.name is not None else _free_name(job.name)
    tls_bind, tls_context = _tls(args)
    if not args.foreground:
        if getattr(args, "cluster_config", None) is not None:  # built by `batuta alloc`: no file to pass on
            raise UsageError(
                "batuta alloc --serve cannot start its coordinator in the background yet; add --foreground "
                "(under nohup or tmux to outlive this terminal)"
            )
        code, _ = _spawn_named(args, name, free_from=None if args.name is not None else job.name)
        return code
    from batuta.cli._run import announce_metrics, finish_run, report_run, unreachable
    from batuta.jobs import HostsUnreachableError, serve_job

    _outputs_that_may_fill()
    label = f"{Path(args.cluster).name}" if args.cluster else "local"
    reported: list[RunOutcome] = []

    def ended(outcome: RunOutcome) -> None:  # at the job's end, not after the linger
        report_run(outcome, args)
        reported.append(outcome)

    try:
        outcome = asyncio.run(
            serve_job(
                job,
                name=name,
                linger_s=_linger(args),
                tls_bind=tls_bind,
                tls_context=tls_context,
                cluster_label=label,
                on_listening=_announce,
                on_ended=ended,
                on_ending_signal=hung_up,  # after SIGHUP, what is said goes off the terminal that is gone
                workers=args.workers,
                seed=args.seed,
                cluster=cluster,
                journal=args.journal,
                resume=args.resume,
                metrics_port=args.metrics_port,
                metrics_bind=args.metrics_bind,
                metrics_textfile=args.metrics_textfile,
                metrics_linger=args.metrics_linger,
                on_metrics=None if args.quiet and args.metrics_port != 0 else announce_metrics,
                job_stdout=sys.stderr if args.json else None,  # stdout: the summary's JSON alone
                modules=args.module,
            )
        )
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except HostsUnreachableError as exc:  # as `batuta run` says it, and its exit code
        return unreachable(exc, args)
    if outcome is None:
        print(f"{PROG}: {name} stopped before its job started", file=sys.stderr)
        return EXIT_INTERRUPTED
    return finish_run(outcome, args, reported=bool(reported))


class _MayFill(io.TextIOBase):
    """A served coordinator's stdout or stderr (its NAME.log): a write the disk refuses is
    dropped, and the job goes on. The summary's print raised ENOSPC, and the coordinator exited
    1 at once, its linger skipped, its job's end said nowhere."""

    def __init__(self, inner: TextIO) -> None:
        self._inner = inner
        self._full = False

    def write(self, text: str) -> int:
        if not self._full:
            try:
                self._inner.write(text)
            except OSError:
                self._full = True
        return len(text)

    def flush(self) -> None:
        if not self._full:
            try:
                self._inner.flush()
            except OSError:
                self._full = True

    def fileno(self) -> int:
        return self._inner.fileno()

    def isatty(self) -> bool:
        return self._inner.isatty()

    def writable(self) -> bool:
        return True


def _outputs_that_may_fill() -> None:
    sys.stdout = _MayFill(sys.stdout)
    sys.stderr = _MayFill(sys.stderr)


def _announce(server: Any) -> None:
    from batuta.transport.tls import format_address

    tls = f" and tls://{format_address(*server.tls_address)}" if server.tls_address else ""
    print(f"{PROG}: serving job {server.job} as {server.name} on {server.path}{tls}", file=sys.stderr, flush=True)


def _child_argv(args: argparse.Namespace, name: str) -> list[str]:
    """The same run, in the foreground, under `name`."""
    argv = [sys.executable, "-m", "batuta", "run", args.job, "--serve", "--foreground", "--spawned", "--name", name]
    options: list[tuple[str, Any]] = [
        ("--cluster", args.cluster),
        ("--workers", args.workers),
        ("--seed", args.seed),
        ("--backend", args.backend),
        ("--journal", args.journal),
        ("--metrics-port", args.metrics_port),
        ("--metrics-textfile", args.metrics_textfile),
        ("--log-file", args.log_file),
        ("--serve-bind", args.serve_bind),
        ("--serve-certs", args.serve_certs),
    ]
    for flag, value in options:
        if value is not None:
            argv += [flag, str(value)]
    if args.metrics_port is not None:
        argv += ["--metrics-bind", args.metrics_bind]
    if args.metrics_linger:
        argv += ["--metrics-linger", str(args.metrics_linger)]
    for module in args.module:
        argv += ["--module", module]
    for flag in ("resume", "strict", "json", "quiet"):
        if getattr(args, flag):
            argv.append(f"--{flag}")
    argv += ["--log-format", args.log_format, "--log-level", args.log_level]
    if args.serve_linger is not None:  # as given: its resume note repeats only what the user said
        argv += ["--serve-linger", str(args.serve_linger)]
    return argv


def _last_error(log_path: Path, start: int) -> str:
    """The last error line written to the log from `start` on (another start of the name may
    write there too), else its last line: why a served coordinator exited at start."""
    with open(log_path, "rb") as log:
        log.seek(start)
        lines = [line for line in log.read().decode(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"{PROG}: error: ")]
    return (errors or lines or ["(no output)"])[-1]


_NAME_TAKEN = -1  # _spawn: another start took the name between our look and the child's


def _log_fix(exc: OSError) -> str:
    """What to do about the log that could not be opened or written: what its errno asks."""
    return write_fix(exc, runner="this shell", elsewhere="set BATUTA_RUNTIME_DIR to a folder with room")


def _spawn_named(args: argparse.Namespace, name: str, *, free_from: str | None) -> tuple[int, str]:
    """`_spawn` under `name`; where the name was picked for the user (`free_from`, the job's),
    one that another start takes meanwhile gives way to the next free one (`kmeans-2`), as a
    name taken before the look does. (exit code, the name it runs under)."""
    for _ in range(8):  # bounded: each round, another start must have won a name
        code = _spawn(args, name, race=free_from is not None)
        if code != _NAME_TAKEN:
            return code, name
        assert free_from is not None
        name = _free_name(free_from)
    raise UsageError(f"other coordinators kept taking the name {name!r} as it was chosen; pass --name NAME")


def _spawn(args: argparse.Namespace, name: str, *, race: bool = False) -> int:
    """Start the served coordinator in a new session; return once it answers on its socket.
    UsageError when the name is taken; any other failure is said here, its exit code returned
    (`race`: `_NAME_TAKEN` when the child found the name taken, said by the caller)."""
    import asyncio
    import subprocess

    from batuta.runtime import serve_paths
    from batuta.runtime.serve_client import Target, ask_info

    path = serve_paths.socket_path(name)
    log_path = path.with_suffix(".log")
    if (path.exists() or path.is_symlink()) and not serve_paths.is_stale(path):
        # asked before the log is opened: a second start must not wipe the running one's log,
        # nor take the running one's answer on the socket for its own
        raise UsageError(
            f"a coordinator named {name!r} is already running ({path}); "
            f"pick another --name, or end it first with '{PROG} stop {name}'"
        )
    # Appended to, not truncated: a start that loses the name to another one at this moment
    # must not wipe the winner's log (nor a crashed run's, rerun under its name); each run's
    # lines follow a line of their own, so that `tail` shows the latest.
    try:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    except OSError as exc:
        raise ServeError(f"cannot open {name}'s log {log_path}: {exc.strerror or exc}; {_log_fix(exc)}") from None
    ours_from = os.fstat(fd).st_size
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    try:
        os.write(fd, f"--- {PROG} run {args.job} --serve as {name}, started {started} ---\n".encode())
    except OSError as exc:
        os.close(fd)
        raise ServeError(f"cannot write {name}'s log {log_path}: {exc.strerror or exc}; {_log_fix(exc)}") from None
    with os.fdopen(fd, "ab") as log_file:
        child = subprocess.Popen(
            _child_argv(args, name),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # no terminal: closing this one (SIGHUP) does not reach it
            close_fds=True,
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if child.poll() is not None:
            said = _last_error(log_path, ours_from).removeprefix(f"{PROG}: error: ")  # said once
            if race and child.returncode == EXIT_USAGE and f"named {name!r} is already running" in said:
                return _NAME_TAKEN
            print(
                f"{PROG}: error: the served coordinator exited at start ({child.returncode}): {said}",
                file=sys.stderr,
            )
            return child.returncode or EXIT_FAILED
        if path.exists():
            try:
                info = asyncio.run(ask_info(Target(path=path), timeout=2.0))
            except ServeError:
                pass
            else:
                if info.get("pid") != child.pid:  # another start of this name won the socket
                    time.sleep(0.1)
                    continue
                if info.get("state") == "starting" and time.monotonic() < deadline - 0.5:
                    # its hosts are starting: wait (within the start timeout) to see the job run,
                    # or the coordinator exit because none could start (said above, exit 3)
                    time.sleep(0.1)
                    continue
                print(f"{PROG}: serving job {args.job} as {name} (pid {child.pid}); log: {log_path}")
                print(f"{PROG}: watch it with '{PROG} tui --attach {name}', end it with '{PROG} stop {name}'")
                if info.get("metrics"):  # --metrics-port 0: the port it picked is said nowhere else
                    print(f"{PROG}: its metrics: {info['metrics']}")
                if info.get("tls"):
                    tls = f"tls://{info['tls']}"
                    print(
                        f"{PROG}: from other machines: '{PROG} tui --attach {tls} --certs DIR' "
                        "(DIR holding a client certificate of the same CA)"
                    )
                return EXIT_OK
        time.sleep(0.1)  # waiting on another process's socket: nothing to wait on but time
    print(f"{PROG}: error: {name} did not answer within {START_TIMEOUT_S:g} s; see {log_path}", file=sys.stderr)
    return EXIT_FAILED


# -- batuta ps ---------------------------------------------------------------------------------


def cmd_ps(args: argparse.Namespace) -> int:
    """List this user's coordinators; remove the sockets that crashed ones left behind."""
    import asyncio

    from batuta.runtime import serve_paths
    from batuta.runtime.serve_client import Target, ask_info

    rows: list[dict[str, Any]] = []
    for path in serve_paths.listed_sockets():
        name = serve_paths.name_of(path)
        if serve_paths.is_stale(path):
            path.unlink(missing_ok=True)
            rows.append(
                {
                    "name": name,
                    "state": "stale",
                    "socket": str(path),
                    "summary": "its coordinator is gone (crashed or killed); the socket was removed",
                }
            )
            continue
        try:
            rows.append(asyncio.run(ask_info(Target(path=path))))
        except ServeError as exc:  # a coordinator that does not answer too: ServeError says how long it waited
            reason = str(exc) or type(exc).__name__
            rows.append({"name": name, "state": "unreachable", "socket": str(path), "summary": reason})
    if args.json:
        for row in rows:
            print(json.dumps(row, sort_keys=True))
        return EXIT_OK
    if not rows:
        print(f"no coordinators; start one with '{PROG} run JOB --serve'")
        return EXIT_OK
    print(f"{'NAME':<20} {'JOB':<14} {'STATE':<11} {'HOSTS':>5} {'PROGRESS':>17} {'STARTED':<16} SOCKET")
    for row in rows:
        started = row.get("started")
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(started)) if isinstance(started, int | float) else "-"
        progress = f"{row.get('finished', 0):,}/{row.get('submitted', 0):,}" if "submitted" in row else "-"
        hosts = f"{row.get('hosts_up', 0)}/{row.get('hosts', 0)}" if "hosts" in row else "-"
        state = "paused" if row.get("paused") and row["state"] == "running" else row["state"]
        print(
            f"{row['name']:<20} {row.get('job', '-')!s:<14} {state:<11} {hosts:>5} {progress:>17} "
            f"{when:<16} {row['socket']}"
        )
        if row.get("summary"):
            print(f"{'':<20} {row['summary']}")
    return EXIT_OK


# -- batuta stop -----------------------------------------------------------------------------


def cmd_stop(args: argparse.Namespace) -> int:
    """Ask a coordinator to cancel its tasks, release its hosts and exit; wait until it has."""
    import asyncio

    from batuta.runtime.serve_client import NoAnswerError, ask_control, parse_target, wait_gone

    target, ssh = _lent_ssh(parse_target(args.target, f"{PROG} stop"), args.cluster, ask_passphrase=True)
    certs = Path(args.certs).expanduser() if args.certs else None
    try:
        ok, text = asyncio.run(ask_control(target, "stop", certs=certs, ssh=ssh))
    except NoAnswerError as exc:  # there, but stopped or hung: no mistake in the command line
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except ServeError as exc:
        raise UsageError(f"{exc}") from None
    if not ok:
        print(f"{PROG}: error: {text}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{PROG}: {text}", flush=True)
    if target.path is None:  # over SSH or TLS: until its connection ends
        if not asyncio.run(wait_gone(target, certs=certs, ssh=ssh, timeout=STOP_TIMEOUT_S)):
            print(f"{PROG}: error: {target.label} still runs after {STOP_TIMEOUT_S:g} s", file=sys.stderr)
            return EXIT_FAILED
        print(f"{PROG}: {target.label} stopped")
        return EXIT_OK
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while target.path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)  # another process removes its socket as it exits: nothing else to wait on
    if target.path.exists():
        print(f"{PROG}: error: {target.label} still runs after {STOP_TIMEOUT_S:g} s", file=sys.stderr)
        return EXIT_FAILED
    print(f"{PROG}: {target.label} stopped")
    return EXIT_OK


# -- batuta tui --attach / --serve --------------------------------------------------------------


def cmd_tui_attached(args: argparse.Namespace) -> int:
    """The dashboard on a served coordinator (started here first with --serve)."""
    from batuta.cli._common import dumb_terminal, has_terminal
    from batuta.runtime.serve_client import parse_target

    if args.attach is not None and args.serve:
        raise UsageError("--attach watches a running coordinator and --serve starts one; pass one of them")
    if args.attach is not None and (args.workers or args.job or args.module):
        raise UsageError("--attach watches a coordinator that has its own hosts and job; drop --workers/-j/--module")
    if args.name is not None and not args.serve:
        raise UsageError("--name names the coordinator --serve starts; to attach to one by name, pass --attach NAME")
    if args.serve and len(args.job) != 1:
        raise UsageError("--serve runs one job as a served coordinator: pass exactly one -j JOB")
    target, ssh = None, None
    if args.attach is not None:
        target, ssh = _lent_ssh(parse_target(args.attach), args.cluster, ask_passphrase=False)
        if target.path is not None and not (target.path.exists() or target.path.is_symlink()):
            # said here, as `batuta stop` says it, not in a dashboard opened to say nothing else
            raise UsageError(f"no coordinator at {target.path}; 'batuta ps' lists the running ones")
        if target.tls is not None and not args.certs:  # as `batuta stop` says it, before any dashboard
            raise UsageError(
                f"{target.label} needs --certs DIR (client.pem, client.key, ca.pem of 'batuta certs init')"
            )
        if target.tls is not None and not Path(args.certs).expanduser().is_dir():
            raise UsageError(f"--certs {args.certs}: no such folder; give the one 'batuta certs init' made")
        if target.path is None:  # over TLS or SSH: a certificate, a host key or an address that fails
            _reach(target, Path(args.certs).expanduser() if args.certs else None, ssh)
    # before --serve starts anything: refused afterwards, its coordinator would be left running
    if not has_terminal():
        raise UsageError("batuta tui needs a terminal on stdin and stdout; 'batuta ps' lists coordinators without one")
    if dumb_terminal():
        raise UsageError(
            f"batuta tui needs a terminal that draws a screen, and TERM={dumb_terminal()} says this one does not; "
            "run it in a terminal emulator (TERM=xterm-256color); 'batuta ps' lists coordinators without one"
        )
    if target is None:  # --serve
        started = _serve_for_tui(args)
        if isinstance(started, int):
            return started
        target = parse_target(started)
    from batuta.tui.attach import AttachedApp
    from batuta.tui.driver import TERMINAL_GONE_CODE

    app = AttachedApp(target, certs=Path(args.certs).expanduser() if args.certs else None, ssh=ssh)
    app.run()
    if app.return_code == TERMINAL_GONE_CODE:  # its terminal went away (tui/driver.py): as on SIGHUP
        hung_up(signal.SIGHUP)
        return EXIT_INTERRUPTED
    if app.ended and app.model.status == "failed":
        print(f"{PROG}: error: {app.ended}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_FAILED if app.return_code else EXIT_OK  # a crash (Textual printed why) is no success


def _reach(target: Any, certs: Path | None, ssh: Any) -> None:
    """Connect once, and leave: a coordinator that cannot be reached is said here in one line
    (exit 2, as `batuta stop` says it), not in an empty dashboard that offered its demo."""
    import asyncio

    from batuta.runtime.serve_client import connect

    async def once() -> None:
        connection = await connect(target, certs=certs, ssh=ssh)
        await connection.close()

    try:
        asyncio.run(once())
    except ServeError as exc:
        raise UsageError(str(exc)) from None


def _lent_ssh(target: Any, cluster: str | None, *, ask_passphrase: bool) -> tuple[Any, Any]:
    """A user@host:NAME target reached as `cluster` reaches its hosts: its [ssh] settings, and
    where the host is one of its hosts by name, that entry's address, port, user (unless the
    target names one) and identity file. The target as given and None without a cluster."""
    if not cluster:
        return target, None
    if target.ssh_host is None:
        raise UsageError(f"--cluster only lends its [ssh] settings to user@host:NAME, not {target.label}; drop it")
    from dataclasses import replace

    from batuta.cli._common import load_cluster
    from batuta.transport.ssh_settings import SSHTarget

    config = load_cluster(cluster)
    # an SSH host's entry only: a TLS worker's port and address are its listener's, not sshd's
    host = next((h for h in config.hosts if h.name == target.ssh_host and h.transport == "ssh"), None)
    if host is not None:
        user = target.ssh_user or host.user
        via = SSHTarget(host=host.address, port=host.port, user=user, identity_file=host.identity_file, name=host.name)
        target = replace(target, ssh_via=via)
    return target, replace(config.ssh, ask_passphrase=ask_passphrase)


def _serve_for_tui(args: argparse.Namespace) -> str | int:
    """The -j job started as a served coordinator: its name, or the exit code of a start that
    failed (said already, once: a name already taken is a UsageError)."""
    from batuta.jobs import load_job
    from batuta.runtime import serve_paths

    job = load_job(args.job[0])
    name = serve_paths.check_name(args.name) if args.name is not None else _free_name(job.name)
    run_args = argparse.Namespace(
        job=args.job[0],
        cluster=args.cluster,
        workers=args.workers,
        seed=args.seed,
        backend=getattr(args, "backend", None),  # the served run sets it for its job, as `batuta run` does
        journal=None,
        metrics_port=args.metrics_port,
        metrics_bind=args.metrics_bind,
        metrics_textfile=None,
        log_file=args.log_file,
        serve_bind=None,
        serve_certs=None,
        module=args.module,
        resume=False,
        strict=False,
        json=False,
        quiet=False,
        metrics_linger=0.0,
        log_format=args.log_format,
        log_level=args.log_level,
        serve_linger=DEFAULT_LINGER_S,
    )
    code, name = _spawn_named(run_args, name, free_from=None if args.name is not None else job.name)
    return name if code == EXIT_OK else code
