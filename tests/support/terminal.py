"""A pseudo-terminal for a child process, its output read as it comes (a pty nobody reads
fills up and blocks the child that writes to it)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import select
import struct
import termios
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def read_pty() -> Iterator[tuple[int, list[bytes]]]:
    """Yields (the terminal's fd to give the child, the chunks it wrote so far); both ends are
    closed on leaving, after the reader has taken what was left."""
    master, slave = pty.openpty()
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        yield slave, chunks
    finally:
        os.close(slave)
        reader.join(timeout=10)
        os.close(master)


class Terminal:
    """A pseudo-terminal whose far end the test closes, as a killed tmux or a dropped SSH
    session does; its output read as it comes. A child given `slave` that is no session
    leader does not take it as its controlling terminal: hanging up sends it no SIGHUP."""

    def __init__(self) -> None:
        self.master, self.slave = pty.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.chunks: list[bytes] = []
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        while not self._stop.is_set():  # a bounded wait, so that hang_up can close the master
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if not ready:
                continue
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            if not data:
                return
            self.chunks.append(data)

    def output(self) -> bytes:
        return b"".join(self.chunks)

    def hang_up(self) -> None:
        """Close the far end (the reader stops first: a read under way would keep it open)."""
        if self.master < 0:
            return
        self._stop.set()
        self._reader.join(timeout=10)
        os.close(self.master)
        self.master = -1

    def close(self) -> None:
        self.hang_up()
        if self.slave >= 0:
            os.close(self.slave)
            self.slave = -1
