"""Shared memory between the agent and its slots: a large task argument skips the slot's pipe.

The agent receives every large frame and streamed array from the coordinator into a memfd
mapping (`SharedArena.allocate`). When it passes a task to a slot, each array argument that
lies in such a mapping travels as a reference (`EXT_ARRAY_SHARED`: the agent's pid, the fd,
the mapping's serial, the array's offset) instead of its bytes, and the slot reads it with
one `preadv` from the memfd into an array of its own (`SharedReader`): one copy instead of
the pipe's two (into the pipe, out of it) and the wake-ups in between. The slot's array is
its own, as before: a kernel may keep or change its arguments.

Fresh memfd pages cost about seven times an anonymous allocation (the kernel allocates
and zeroes shmem pages), so a mapping of up to `REUSE_MAX_BYTES` whose last reference is
gone goes back to a free list (up to `FREE_BYTES`) and the next frame of its size class is
received into it. A larger mapping is never reused, so the slot maps it (copy-on-write)
instead of reading it: a value of gigabytes is then in the host's memory once, and a kernel
that keeps its argument keeps pages nobody will rewrite. A task's request references its
arguments until the slot has answered it, by which time the slot has read them. A Put value
goes the same way when it travels just before a Run that names it (the supervisor pins it
until the slot has answered every task fed so far: the object may be dropped or spilled
before the slot reads its Put); a Put on its own goes down the pipe. A memfd has no name in
any file system, so nothing outlives the agent, however it dies; mappings are not inherited
by slots forked later (MADV_DONTFORK). The slot checks that the fd it opens is the memfd the
reference names (the serial is in its name), so a reused fd number is refused, never misread.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import struct
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from batuta.protocol._values import aligned_empty

__all__ = ["FREE_BYTES", "REUSE_MAX_BYTES", "SHARED_MIN_BYTES", "SharedArena", "SharedReader"]

SHARED_MIN_BYTES = 1 << 20
"""Buffers at least this large are allocated in shared memory (smaller ones are not worth a
memfd: they cross the pipe quickly)."""

SIZE_CLASS = 1 << 20  # mappings are whole multiples of this, so that they can be reused
REUSE_MAX_BYTES = 64 * 2**20  # larger mappings are never reused: slots map them instead of reading
FREE_BYTES = 256 * 2**20  # unreferenced mappings kept for reuse, at most

_LOCATOR = struct.Struct(">IIQQQ?")  # agent pid, fd, serial, offset, mapping size, whether to map it
_NAME = "batuta-shm-"


class _Mapping:
    __slots__ = ("end", "fd", "mapping", "serial", "size", "start")

    def __init__(self, fd: int, mapping: mmap.mmap, serial: int, size: int) -> None:
        self.fd = fd
        self.mapping = mapping
        self.serial = serial
        self.size = size
        self.start = 0
        self.end = 0


class SharedArena:
    """The agent's memfd mappings: hands them out, takes them back, says where an array lies."""

    def __init__(self, min_bytes: int = SHARED_MIN_BYTES, free_bytes: int = FREE_BYTES, most_bytes: int = 0) -> None:
        self._min_bytes = min_bytes
        self._most_bytes = most_bytes  # the host's memory (0: unknown): a buffer past it cannot be held
        self._free_limit = free_bytes
        self._serials = itertools.count(1)
        self._pid = os.getpid()
        self._live: dict[int, _Mapping] = {}  # start address -> mapping in use
        self._free: dict[int, list[_Mapping]] = {}  # size -> mappings no longer referenced
        self._free_bytes = 0

    @property
    def live(self) -> int:
        """Mappings still referenced (what a test checks is back to zero)."""
        return len(self._live)

    @property
    def free(self) -> int:
        """Mappings kept for reuse."""
        return sum(len(mappings) for mappings in self._free.values())

    def allocate(self, nbytes: int) -> np.ndarray:
        """A uint8 buffer of `nbytes`: in a memfd mapping if large enough and possible.
        MemoryError for more than the host's memory: a memfd of any size is made at once and
        its pages come as they are written, so such a value filled the host until the kernel
        killed the agent (again each time the value came back) instead of being refused."""
        if self._most_bytes and nbytes > self._most_bytes:
            raise MemoryError(f"more than the {self._most_bytes:,} bytes of memory this host has")
        if nbytes < self._min_bytes:
            return aligned_empty(nbytes)
        size = -(-nbytes // SIZE_CLASS) * SIZE_CLASS
        reusable = self._free.get(size)
        if reusable:
            entry = reusable.pop()
            self._free_bytes -= size
        else:
            created = self._create(size)
            if created is None:
                return aligned_empty(nbytes)
            entry = created
        whole = np.frombuffer(entry.mapping, dtype=np.uint8)
        entry.start = whole.__array_interface__["data"][0]
        entry.end = entry.start + size
        self._live[entry.start] = entry
        weakref.finalize(whole, self._release, entry)  # views keep `whole` alive, not the mapping
        return whole[:nbytes]

    def _create(self, size: int) -> _Mapping | None:
        if not hasattr(os, "memfd_create"):
            return None
        serial = next(self._serials)
        try:
            fd = os.memfd_create(f"{_NAME}{serial}", os.MFD_CLOEXEC)
        except OSError:
            return None
        try:
            os.ftruncate(fd, size)
            mapping = mmap.mmap(fd, size)
        except (OSError, ValueError):
            os.close(fd)
            return None
        with contextlib.suppress(AttributeError, OSError):
            mapping.madvise(mmap.MADV_DONTFORK)  # slots forked later must not pin it
        return _Mapping(fd, mapping, serial, size)

    def _release(self, entry: _Mapping) -> None:
        self._live.pop(entry.start, None)
        if entry.size <= REUSE_MAX_BYTES and self._free_bytes + entry.size <= self._free_limit:
            self._free.setdefault(entry.size, []).append(entry)
            self._free_bytes += entry.size
            return
        with contextlib.suppress(OSError):
            os.close(entry.fd)  # the mapping itself goes when its last buffer does

    def locate(self, flat: np.ndarray) -> bytes | None:
        """Where the C-contiguous bytes `flat` lie in a mapping, as an EXT_ARRAY_SHARED
        locator; None when they are not in one."""
        if not self._live:
            return None
        address = flat.__array_interface__["data"][0]
        for start, entry in self._live.items():
            if start <= address and address + flat.nbytes <= entry.end:
                mapped = entry.size > REUSE_MAX_BYTES  # never rewritten: the slot may map it
                return _LOCATOR.pack(self._pid, entry.fd, entry.serial, address - start, entry.size, mapped)
        return None


class SharedReader:
    """The slot's side: reads what a locator names (only from its own agent) into an array of
    its own, or maps it copy-on-write where the agent never reuses the mapping."""

    def __init__(self, agent_pid: int, allocate: Callable[[int], np.ndarray] = aligned_empty) -> None:
        self._agent_pid = agent_pid
        self._allocate = allocate

    def array(self, dtype: np.dtype[Any], shape: tuple[int, ...], locator: bytes) -> np.ndarray:
        """The array a locator names, as an array of the slot's own; ValueError saying why not."""
        if len(locator) != _LOCATOR.size:
            raise ValueError(f"a shared-memory locator is {_LOCATOR.size} bytes, not {len(locator)}")
        pid, fd, serial, offset, size, mapped = _LOCATOR.unpack(locator)
        if pid != self._agent_pid:
            raise ValueError(f"shared memory of pid {pid}, not of this slot's agent ({self._agent_pid})")
        nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if offset + nbytes > size:
            raise ValueError(f"{nbytes} bytes at offset {offset} do not fit a {size}-byte mapping")
        try:
            own = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise ValueError(f"shared memory {serial} is gone ({exc.strerror})") from None
        try:
            name = os.readlink(f"/proc/self/fd/{own}")
            if not name.startswith(f"/memfd:{_NAME}{serial} "):
                raise ValueError(f"fd {fd} of the agent is not shared memory {serial} ({name!r})")
            if mapped:
                if os.fstat(own).st_size != size:
                    raise ValueError(f"shared memory {serial} is not {size} bytes")
                mapping = mmap.mmap(own, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
                flat = np.frombuffer(mapping, dtype=np.uint8, count=nbytes, offset=offset)
                return flat.view(dtype).reshape(shape)
            flat = self._allocate(nbytes)
            view = flat.data
            done = 0
            while done < nbytes:
                count = os.preadv(own, [view[done:]], offset + done)
                if count <= 0:
                    raise ValueError(f"shared memory {serial} ends at {offset + done}, before its array does")
                done += count
        finally:
            os.close(own)
        return flat.view(dtype).reshape(shape)
