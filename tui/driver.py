"""Textual's terminal driver, made to end the app when its terminal goes away.

A terminal that goes (its tmux killed, its SSH session dropped) does not always end the app
by SIGHUP: the signal may reach only the shell, or land as the app writes. Then Textual's
input thread reads EOF from the dead terminal as fast as it can (its select says readable
for ever), and its writer thread dies on the first write that fails (EIO): its queue fills
and the app's next write blocks the loop for good. A viewer was seen spinning at 50-93% CPU
that way, and a `batuta tui` coordinator kept its agents running, SIGTERM unheard.

So a write that fails is dropped (the writer lives on: nothing blocks), and a terminal that
hangs up (POLLHUP on stdin, or that failed write) exits the app with `TERMINAL_GONE_CODE`:
the pool closes as on `q`, and the command exits 130 as it does on SIGHUP.
"""

from __future__ import annotations

import contextlib
import io
import os
import select
import threading
from typing import IO, Any, cast

from textual.app import App
from textual.drivers.linux_driver import LinuxDriver

TERMINAL_GONE_CODE = 130  # as SIGHUP ends the command (batuta.cli's EXIT_INTERRUPTED)
_GONE = select.POLLHUP | select.POLLERR | select.POLLNVAL


class TerminalDriver(LinuxDriver):
    """`LinuxDriver`, plus: the app exits once its terminal is gone, and never blocks on it."""

    def __init__(self, app: App[Any], **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._gone = threading.Event()
        if self._file is not None:  # typed as the stderr it is; Textual's writer thread only writes and flushes it
            self._file = cast(io.TextIOWrapper, _DroppingWrites(self._file, self.terminal_gone))
        self._wake: tuple[int, int] | None = None
        self._watcher: threading.Thread | None = None

    def terminal_gone(self) -> None:
        """The terminal hung up: exit the app (once), from whichever thread found it."""
        if self._gone.is_set():
            return
        self._gone.set()
        self._app.call_later(self._app.exit, None, TERMINAL_GONE_CODE)  # thread-safe: it posts a message

    def start_application_mode(self) -> None:
        super().start_application_mode()
        self._wake = os.pipe()
        self._watcher = threading.Thread(target=self._watch, args=(self._wake[0],), name="batuta-terminal", daemon=True)
        self._watcher.start()

    def stop_application_mode(self) -> None:
        if self._wake is not None:
            with contextlib.suppress(OSError):
                os.write(self._wake[1], b"x")
            if self._watcher is not None:
                self._watcher.join()
            for fd in self._wake:
                os.close(fd)
            self._wake = None
        super().stop_application_mode()

    def _watch(self, wake: int) -> None:
        """Block until stdin hangs up (the terminal is gone) or the app leaves (`wake`)."""
        poller = select.poll()
        poller.register(self.fileno, 0)  # no events asked: hang-up and errors are always reported
        poller.register(wake, select.POLLIN)
        while True:
            for fd, events in poller.poll():
                if fd == wake:
                    return
                if events & _GONE:
                    self.terminal_gone()
                    return


class _DroppingWrites:
    """The driver's output file, whose writes that fail are dropped after calling `gone`:
    Textual's writer thread, meeting an exception, dies and leaves the app blocked on its queue."""

    def __init__(self, file: IO[str], gone: Any) -> None:
        self._file = file
        self._gone = gone
        self._failed = False

    def write(self, text: str) -> int:
        if not self._failed:
            try:
                return self._file.write(text)
            except (OSError, ValueError):  # EIO from a hung-up terminal; ValueError: the file closed
                self._failed = True
                self._gone()
        return len(text)

    def flush(self) -> None:
        if not self._failed:
            try:
                self._file.flush()
            except (OSError, ValueError):
                self._failed = True
                self._gone()

    def fileno(self) -> int:
        return self._file.fileno()

    def isatty(self) -> bool:
        return self._file.isatty()
