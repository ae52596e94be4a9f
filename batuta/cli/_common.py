"""What every `batuta` command shares: the exit codes, the one-line error, argument types."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import stat
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from batuta.core.task import MAX_SLOTS

if TYPE_CHECKING:
    from batuta.runtime.cluster import ClusterConfig

PROG = "batuta"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # as a tool killed by SIGPIPE exits: its reader went away (`| head`)


def print_error(exc: BaseException | str) -> None:
    message = " ".join(str(exc).split()) or type(exc).__name__
    print(f"{PROG}: error: {message}", file=sys.stderr)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; pass a count of 1 or more, e.g. 2") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is too few; pass a count of 1 or more, e.g. 2")
    return value


def slot_count(text: str) -> int:
    value = positive_int(text)
    if value > MAX_SLOTS:
        raise argparse.ArgumentTypeError(f"{value} is too many; one agent runs at most {MAX_SLOTS} slots")
    return value


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number, e.g. 0") from None


def port(text: str) -> int:
    value = integer(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port; pass 0 to 65535, e.g. 9464")
    return value


# Signals that end a command as Ctrl-C does: SIGTERM (`kill`, `timeout`, a batch system's
# stop) and SIGHUP (its terminal closed, its SSH session dropped), whose default action killed
# it at once, its pool never closed: hosts not released, an allocation left queued or running.
ENDING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def hung_up(signum: int) -> None:
    """After SIGHUP the terminal is gone: what the command still says (the summary, how to
    resume) goes to /dev/null rather than fail on it, half-way through closing the pool. A
    stdout or stderr sent to a file or pipe is kept."""
    if signum != signal.SIGHUP:
        return
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            # a terminal once hung up is no tty to isatty (its ioctls fail): a character device
            if os.isatty(fd) or stat.S_ISCHR(os.fstat(fd).st_mode):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, fd)
                os.close(devnull)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP (`ENDING_SIGNALS`) end the command as Ctrl-C does, from its first
    moment (`batuta run` installs its own on its loop once it has one): the pool it started
    closes and stops its agents, where the default action killed it at once, 143 and nothing
    said, a local agent left running. Left alone where the caller set its own (`nohup`
    ignores SIGHUP), and off the main thread, where no handler may be set (a test calling
    main() from a thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, _frame: object) -> None:
        hung_up(signum)
        raise KeyboardInterrupt

    ours = [signum for signum in ENDING_SIGNALS if signal.getsignal(signum) == signal.SIG_DFL]
    for signum in ours:
        signal.signal(signum, interrupt)
    try:
        yield
    finally:
        for signum in ours:
            signal.signal(signum, signal.SIG_DFL)


def has_terminal() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


# TERM values of terminals that draw no screen (Rich reads them so too): Emacs' M-x shell, a
# CI job's log view. A dashboard opened there was pages of escape codes around its numbers.
DUMB_TERMS = frozenset({"dumb", "unknown"})


def dumb_terminal() -> str:
    """This terminal's TERM when it says the terminal cannot draw a screen, else ''."""
    term = os.environ.get("TERM", "")
    return term if term.lower() in DUMB_TERMS else ""


def load_cluster(path: str) -> ClusterConfig:
    from batuta.runtime.cluster import load_cluster

    return load_cluster(path)


def positive_seconds(text: str) -> float:
    return _seconds(text, zero=False)


def seconds_or_zero(text: str) -> float:
    return _seconds(text, zero=True)


def _seconds(text: str, *, zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds, e.g. 30") from None
    if not (value >= 0 if zero else value > 0) or not value < float("inf"):  # NaN fails both
        what = "a number of seconds >= 0" if zero else "a positive number of seconds"
        raise argparse.ArgumentTypeError(f"{text} is not {what}, e.g. 30")
    return value


def gigabytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of GiB, e.g. 2") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a number of GiB >= 0, e.g. 2")
    return value
