"""Sending from a memory-mapped file without holding it: drop each piece's pages once sent.

A user who puts a value memory-mapped from a `.npy` file (`np.load(path, mmap_mode="r")`)
expects the coordinator not to hold the file: the issue's target is a coordinator under
1 GiB while it moves 4 GiB. Sending reads every page, and each page read stays mapped in the
process (its resident set, `VmHWM`) until the mapping goes: a 4 GiB put left a 4 GiB
resident set behind, though none of it is batuta's memory. Once a piece has been written to
the socket (the kernel or OpenSSL has copied it), its pages are unmapped from the process
with `MADV_DONTNEED`; the page cache keeps them, so reading the array again costs a minor
fault, never a read from disk.

Only for shared mappings of a file (`s` in /proc/self/maps, with a path): there the pages
belong to the file and nothing is lost, dirty ones included (the kernel carries their dirty
bit over to the page cache). Never for private mappings (a copy-on-write memmap, mode "c",
or any anonymous memory): `MADV_DONTNEED` would throw their contents away; nor for a
device's mapping (/dev/..., but for /dev/shm files), whose driver decides what it means.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import sys
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

MIN_BYTES = 64 << 20  # smaller sends leave little behind; not worth reading /proc/self/maps
PIECE = 32 << 20  # how much is sent between two drops: the most of the file held at once
_MADV_DONTNEED = 4  # Linux's value (mmap.MADV_DONTNEED where Python defines it)
_PAGE = mmap.PAGESIZE

_madvise = None
if sys.platform.startswith("linux"):
    # dlopen(NULL): libc is already in the process. ctypes.util.find_library("c") would run
    # `ldconfig -p` (or gcc) in a subprocess at every import, 8-10 ms of every start here.
    _libc = ctypes.CDLL(None, use_errno=True)
    _madvise = _libc.madvise
    _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    _madvise.restype = ctypes.c_int


def address_of(view: memoryview) -> int:
    """Where a contiguous buffer starts in this process (read-only ones too)."""
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data) if len(view) else 0


def in_shared_file_mapping(start: int, length: int, maps: str | None = None) -> bool:
    """Whether [start, start + length) lies in one shared mapping of a file.

    `maps` is /proc/self/maps' text (read when not given): `lo-hi perms offset dev inode path`.
    """
    if _madvise is None or length <= 0:
        return False
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return False
    end = start + length
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 6:
            continue  # anonymous: no path
        lo, _, hi = fields[0].partition("-")
        if int(lo, 16) <= start and end <= int(hi, 16):
            perms, inode, path = fields[1], fields[4], fields[5]
            return perms[3:4] == "s" and inode != "0" and _is_file(path)
    return False


def _is_file(path: str) -> bool:
    """A path in /proc/self/maps that names a file whose pages outlive the mapping: a regular
    file or a shared-memory one, not a device (a driver's mapping, a GPU's pinned memory)."""
    return path.startswith("/") and (not path.startswith("/dev/") or path.startswith("/dev/shm/"))


class DropBehind:
    """Unmaps a shared file mapping's pages behind a sender, piece by piece.

    The sender writes `piece(its own piece size)` bytes at a time and calls `done(sent)` after
    each write: every page wholly before `sent` (all of them once the view is sent) that is
    not yet dropped is dropped. For any other memory both do nothing.
    """

    def __init__(self, view: memoryview) -> None:
        self._base = address_of(view)
        self._length = len(view)
        # Mappings are whole pages, so the pages the view starts and ends in are the same
        # file's, and safe to drop with the rest.
        self._dropped = self._base // _PAGE * _PAGE  # below this, dropped
        self.enabled = len(view) >= MIN_BYTES and in_shared_file_mapping(self._base, len(view))

    def piece(self, default: int) -> int:
        return min(default, PIECE) if self.enabled else default

    def done(self, sent: int) -> None:
        """The first `sent` bytes have been written: drop their whole pages."""
        if not self.enabled or _madvise is None:
            return
        end = self._base + sent
        upto = -(-end // _PAGE) * _PAGE if sent >= self._length else end // _PAGE * _PAGE
        if upto <= self._dropped:
            return
        if _madvise(self._dropped, upto - self._dropped, _MADV_DONTNEED) != 0:
            errno = ctypes.get_errno()
            log.debug("madvise(MADV_DONTNEED) failed (errno %d): the file's pages stay mapped", errno)
            self.enabled = False
            return
        self._dropped = upto
