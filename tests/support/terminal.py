"""A pseudo-terminal for a child process, its output read as it comes (a pty nobody reads
fills up and blocks the child that writes to it)."""

from __future__ import annotations

import contextlib
import os
import pty
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
