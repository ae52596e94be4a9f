"""The `batuta` command: `batuta run JOB`, `batuta alloc slurm JOB`, `batuta agent`, `batuta version`.

`batuta agent ...` is dispatched before the parser is even built: it is started on every host
at every connection, so it must not pay for argparse help text, the runtime, rich or NumPy.
Every other command imports what it needs when it runs.

Exit codes: 0 success; 1 the work failed (a task failed, the job raised; with `run --strict`
also a host refused, unreachable or lost; `cluster status` and `stack`: a host could not be
reached); 2 the command line, a job file or a configuration is wrong; 3 `batuta run` could
start no host at all, so nothing ran; 130 interrupted.
Every error is one line on stderr that names the thing and the fix; a job's own traceback
is the one exception, printed because it is the job author's best clue.

To add a command, write `add_<name>_arguments(parser)` and `cmd_<name>(args) -> int` (in
`_hosts.py` or `_run.py`, beside its kind) and list them in `COMMANDS`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from batuta._version import __version__
from batuta.cli._alloc import add_alloc_arguments, cmd_alloc, split_sbatch_options
from batuta.cli._common import (
    EXIT_BROKEN_PIPE,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    print_error,
    sigterm_as_interrupt,
)
from batuta.cli._hosts import (
    add_agent_arguments,
    add_certs_arguments,
    add_cluster_arguments,
    add_stack_arguments,
    add_version_arguments,
    add_worker_arguments,
    cmd_agent,
    cmd_certs,
    cmd_cluster,
    cmd_stack,
    cmd_version,
    cmd_worker,
    run_agent,
)
from batuta.cli._run import (
    add_run_arguments,
    add_tui_arguments,
    cmd_run,
    cmd_tui,
)
from batuta.cli._serve import add_ps_arguments, add_stop_arguments, cmd_ps, cmd_stop
from batuta.errors import BatutaError, UsageError


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `batuta` command with `argv` (default: `sys.argv[1:]`); return the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["agent"]:
        return run_agent(args[1:])
    _null_for_closed_std_fds()
    with sigterm_as_interrupt():
        return _main(args)


def _main(args: list[str]) -> int:
    try:
        args, sbatch_options = split_sbatch_options(args)
        parsed = _parse(args)
        if isinstance(parsed, int):
            sys.stdout.flush()  # here, where a reader gone early is caught below, not at exit
            return parsed
        if sbatch_options:
            parsed.sbatch_options = sbatch_options
        handler: Callable[[argparse.Namespace], int] = parsed.handler
        code = handler(parsed)
        sys.stdout.flush()
        return code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UsageError as exc:  # ConfigError is a UsageError too
        print_error(exc)
        return EXIT_USAGE
    except BatutaError as exc:
        print_error(exc)
        return EXIT_FAILED
    except BrokenPipeError:  # `batuta ps | head -1`: the reader left; no traceback for that
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # else the flush at exit fails once more
        return EXIT_BROKEN_PIPE


def _null_for_closed_std_fds() -> None:
    """`batuta run JOB >&-`: with fd 1 closed, Python's sys.stdout is None (a traceback at the
    first print), and the next file opened would take fd 1, where agents and binaries write.
    /dev/null takes the place of each closed one."""
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
            continue
        except OSError:
            pass
        null = os.open(os.devnull, os.O_RDWR)
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, "r" if fd == 0 else "w", closefd=False))  # noqa: SIM115


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (raised as UsageError), not usage plus message,
    and no option is taken from a prefix of its name: `batuta run job.py --n 5`, meant for the
    job, was `--name 5` and said "--name only applies to a served run; add --serve"."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

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
        parsed, extra = build_parser().parse_known_args(args)
    except SystemExit as exc:  # --help and --version print and exit 0
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    if parsed.command is None:
        if extra:
            raise UsageError(f"unrecognized arguments: {' '.join(extra)}; see '{PROG} --help'")
        raise UsageError("no command given; try 'batuta run demo', or 'batuta --help' for all")
    if extra:  # the help that lists the options is the subcommand's, not the top level's
        action = getattr(parsed, f"{parsed.command}_action", None)  # stack check, cluster install ...
        command = " ".join(str(word) for word in (PROG, parsed.command, action) if word)
        if parsed.command == "run":  # most often meant for the job: `batuta run job.py 5`, `--size 5`
            raise UsageError(
                f"unrecognized arguments: {' '.join(extra)}; a job takes no arguments of its own: its main "
                "reads them from the environment (N=5 batuta run job.py, then os.environ['N']); "
                f"see '{command} --help' for batuta's"
            )
        raise UsageError(f"unrecognized arguments: {' '.join(extra)}; see '{command} --help'")
    return parsed


COMMANDS: list[Command] = [
    Command("run", "run a job file or a built-in job on a local pool or a cluster", add_run_arguments, cmd_run),
    Command("alloc", "run a job on the nodes of a batch allocation (Slurm)", add_alloc_arguments, cmd_alloc),
    Command("tui", "the live dashboard, coordinating a local pool or a cluster", add_tui_arguments, cmd_tui),
    Command("ps", "list the served coordinators of this user (batuta run --serve)", add_ps_arguments, cmd_ps),
    Command("stop", "end a served coordinator: its tasks cancelled, its hosts released", add_stop_arguments, cmd_stop),
    Command("cluster", "look at the hosts of a cluster file", add_cluster_arguments, cmd_cluster),
    Command("stack", "versions, health and a CI gate for every node", add_stack_arguments, cmd_stack),
    Command("agent", "run the host agent (started by the coordinator on each host)", add_agent_arguments, cmd_agent),
    Command("worker", "a long-lived host agent that coordinators reach over TLS", add_worker_arguments, cmd_worker),
    Command("certs", "make a private CA and TLS certificates for workers", add_certs_arguments, cmd_certs),
    Command("version", "print batuta's version", add_version_arguments, cmd_version),
]
