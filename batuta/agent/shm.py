"""Shared memory between the agent and its slots: a large task argument crosses to a slot once.

The agent receives every large frame and streamed array from the coordinator into a memfd
mapping (`SharedArena.allocate`). When it passes a task to a slot, each array argument that
lies in such a mapping travels as a reference (`EXT_ARRAY_SHARED`: the agent's pid, the fd,
the mapping's serial, the array's offset) instead of its bytes; the slot maps the same pages
(`SharedMapper`), copy-on-write, so a kernel that writes into its argument changes only its
own copy. The bytes are then copied once on the host (the coordinator's link into the
mapping), not three more times (into the slot's pipe, out of it, into the slot's frame).

Lifetime: a memfd has no name in any file system; its memory is freed when the agent has
closed the fd and the last mapping is gone, so nothing outlives the agent or a slot,
whichever way they die. The agent closes a mapping's fd once nothing references the
mapping (a finalizer); a task's request references its arguments until the slot has
answered it, so the slot has opened the fd by then. Put values go down the pipe instead (an
object may be dropped before the slot reads its Put). Mappings are not inherited by slots
forked later (MADV_DONTFORK). The slot checks that the fd it opens is the memfd the reference
names (its serial is in the memfd's name), so a reused fd number is refused, not misread.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import struct
import weakref
from typing import Any

import numpy as np

from batuta.protocol._values import aligned_empty

__all__ = ["SHARED_MIN_BYTES", "SharedArena", "SharedMapper"]

SHARED_MIN_BYTES = 1 << 20
"""Buffers at least this large are allocated in shared memory (smaller ones are not worth a
mapping: they cross the pipe quickly)."""

_LOCATOR = struct.Struct(">IIQQQ")  # agent pid, fd, serial, offset, mapping size
_NAME = "batuta-shm-"


class SharedArena:
    """The agent's memfd mappings: allocates them and says where an array lies in one."""

    def __init__(self, min_bytes: int = SHARED_MIN_BYTES) -> None:
        self._min_bytes = min_bytes
        self._serials = itertools.count(1)
        self._pid = os.getpid()
        self._live: dict[int, tuple[int, int, int]] = {}  # start address -> (end address, fd, serial)

    @property
    def live(self) -> int:
        """Mappings still referenced (what a test checks is back to zero)."""
        return len(self._live)

    def allocate(self, nbytes: int) -> np.ndarray:
        """A uint8 buffer of `nbytes`: in a memfd mapping if large enough and possible."""
        if nbytes < self._min_bytes or not hasattr(os, "memfd_create"):
            return aligned_empty(nbytes)
        serial = next(self._serials)
        try:
            fd = os.memfd_create(f"{_NAME}{serial}", os.MFD_CLOEXEC)
        except OSError:
            return aligned_empty(nbytes)
        try:
            os.ftruncate(fd, nbytes)
            mapping = mmap.mmap(fd, nbytes)
        except (OSError, ValueError):
            os.close(fd)
            return aligned_empty(nbytes)
        with contextlib.suppress(AttributeError, OSError):
            mapping.madvise(mmap.MADV_DONTFORK)  # slots forked later must not pin it
        buffer = np.frombuffer(mapping, dtype=np.uint8)
        start = buffer.__array_interface__["data"][0]
        self._live[start] = (start + nbytes, fd, serial)
        weakref.finalize(mapping, self._release, start, fd)
        return buffer

    def _release(self, start: int, fd: int) -> None:
        self._live.pop(start, None)
        with contextlib.suppress(OSError):
            os.close(fd)

    def locate(self, flat: np.ndarray) -> bytes | None:
        """Where the C-contiguous bytes `flat` lie in a mapping, as an EXT_ARRAY_SHARED
        locator; None when they are not in one."""
        if not self._live:
            return None
        address = flat.__array_interface__["data"][0]
        for start, (end, fd, serial) in self._live.items():
            if start <= address and address + flat.nbytes <= end:
                return _LOCATOR.pack(self._pid, fd, serial, address - start, end - start)
        return None


class SharedMapper:
    """The slot's side: maps what a locator names (only from its own agent) into an array."""

    def __init__(self, agent_pid: int) -> None:
        self._agent_pid = agent_pid
        self._maps: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()  # serial -> mmap

    def array(self, dtype: np.dtype[Any], shape: tuple[int, ...], locator: bytes) -> np.ndarray:
        """The array a locator names; ValueError saying why it cannot be had."""
        if len(locator) != _LOCATOR.size:
            raise ValueError(f"a shared-memory locator is {_LOCATOR.size} bytes, not {len(locator)}")
        pid, fd, serial, offset, size = _LOCATOR.unpack(locator)
        if pid != self._agent_pid:
            raise ValueError(f"shared memory of pid {pid}, not of this slot's agent ({self._agent_pid})")
        nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if offset % dtype.itemsize or offset + nbytes > size:
            raise ValueError(f"{nbytes} bytes at offset {offset} do not fit a {size}-byte mapping")
        mapping = self._maps.get(serial)
        if mapping is None:
            mapping = self._map(pid, fd, serial, size)
            self._maps[serial] = mapping
        flat = np.frombuffer(mapping, dtype=np.uint8, count=nbytes, offset=offset)
        return flat.view(dtype).reshape(shape)

    @staticmethod
    def _map(pid: int, fd: int, serial: int, size: int) -> mmap.mmap:
        try:
            own = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise ValueError(f"shared memory {serial} is gone ({exc.strerror})") from None
        try:
            name = os.readlink(f"/proc/self/fd/{own}")
            if not name.startswith(f"/memfd:{_NAME}{serial} "):
                raise ValueError(f"fd {fd} of the agent is not shared memory {serial} ({name!r})")
            actual = os.fstat(own).st_size
            if actual != size:
                raise ValueError(f"shared memory {serial} is {actual} bytes, not {size}")
            # copy-on-write: a kernel writing into its argument changes its own copy only
            return mmap.mmap(own, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(own)
