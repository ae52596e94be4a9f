"""Files replaced atomically and durably: the journal's compacted file, a checkpoint, the
metrics textfile.

Each is written into a temporary file beside it, synced, and renamed over its name, so a
reader (a resumed run, node-exporter's textfile collector) sees the old file or the new one,
never half of one; the temporary file is removed when the write fails (a full disk), so that
a failed save leaves nothing behind. Its name is the caller's: each kind of file has its own
pattern, which its readers skip and a resume sweeps (`checkpoint.py`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path


def replace_file(path: Path, tmp: Path, parts: Iterable[bytes | memoryview], *, sync_folder: bool = False) -> int:
    """Write `parts` as `path` through `tmp` (in the same folder), synced, then renamed over
    `path`; with `sync_folder` the rename itself is made durable. Returns the bytes written.
    Raises OSError, the temporary file removed."""
    size = 0
    try:
        with open(tmp, "wb") as f:
            for part in parts:
                f.write(part)
                size += len(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if sync_folder:
            fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return size


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in `directory` durable (the folder's own entry)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
