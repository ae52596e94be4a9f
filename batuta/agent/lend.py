"""A kept result fetched for the coordinator is read from its slot's memory, not copied to the agent.

A kept result lives in the slot process that made it (`objects.py`). Sent down the slot's
pipe, a `pool.get` of it lands in fresh arrays of the agent's before the data link sends it
on: on a VM that hands freed memory back to its host, those fresh pages cost more than the
copies (`bench/RESULTS.md`, issue 15: a get touched fresh pages twice, Dask's gather once).
So when the data link is up, the agent asks the slot to *lend* the value (`Fetch.lend`):

1. The slot answers with a `Put` whose arrays of at least its stream threshold travel as
   `EXT_ARRAY_SHARED` with a locator of its own (`LENT`: its pid, the array's address and
   length) instead of their bytes, and keeps the value as it was (`lend_locator`). It lends
   only a host value (not a GPU slot's) whose large arrays are all C-contiguous; otherwise
   it answers with the bytes, as before.
2. The agent decodes each such array as an untouched placeholder of the same dtype and
   shape (virtual memory, no page of it ever written) and a `Lent` source, and answers the
   Fetch with that value at once (a `Forwarded` Done, `forward.py`). The data link's sending
   thread sends each array as a growing stream whose pieces `Lent.piece` reads with `preadv`
   from `/proc/<slot pid>/mem` into one buffer it reuses: no fresh page on the agent, no
   copy through the pipe, and the agent never holds the value.
3. The slot must not free what is being read: a `Drop` of an object reaches the slot only
   once every lend of it asked is answered and read (`Lender.drops`). A slot process that dies meanwhile
   fails its reads (the fd is bound to that process's memory, so a pid used again later is
   never read): its lends abort (`ABORTED` on the link: the coordinator forgets the Done),
   and the agent answers those Fetches again as errors once the objects are reported lost,
   as for a forwarded value (`Lender.slot_lost`). A host that refuses the read (`EPERM`
   under a seccomp policy or `ptrace_scope`) aborts the stream the same way; the agent then
   stops lending and fetches those values the old way.

The read needs the same right as a debugger's: the agent is the slot's parent and runs as
the same user. A consumer kernel on the same slot that changes the value in place while it
is read would be read half changed; kept values are not meant to be changed in place.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from batuta.protocol._values import aligned_empty
from batuta.protocol.chunks import SharedArrays
from batuta.transport.growing import Growing

__all__ = ["LENT", "PIECE_BYTES", "Lender", "Lent", "lend_locator"]

LENT = struct.Struct(">IQQ")  # the lending slot's pid, the array's address, its length
PIECE_BYTES = 8 << 20  # read and sent at a time, through one buffer per lent array
_MAX_DEPTH = 32  # nesting of the values searched for arrays (the codec's own limit is lower)


def lend_locator(value: Any, min_bytes: int) -> Callable[[np.ndarray], bytes | None] | None:
    """The slot's side: an encoder hook (`locate`) that lends `value`'s own arrays of at least
    `min_bytes`, or None when nothing of it would be lent (no such array, or one that is not
    C-contiguous: the encoder would send a copy, which must not be lent)."""
    own: set[tuple[int, int]] = set()
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, np.ndarray):
            if item.nbytes >= min_bytes:
                if not item.flags.c_contiguous:
                    return None
                own.add((item.__array_interface__["data"][0], item.nbytes))
        elif depth < _MAX_DEPTH and isinstance(item, list | tuple):
            stack.extend((v, depth + 1) for v in item)
        elif depth < _MAX_DEPTH and isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
    if not own:
        return None
    pid = os.getpid()

    def locate(flat: np.ndarray) -> bytes | None:
        key = (flat.__array_interface__["data"][0], flat.nbytes)
        return LENT.pack(pid, *key) if key in own else None

    return locate


class Lent(Growing):
    """One lent array as the data link sees it: a growing array all there at once (in the
    slot), whose pieces are read from the slot's memory when the sending thread asks
    (`piece`). Whoever `claim`s it hears once, from whichever thread ends it, how: read to
    the end, or aborted."""

    __slots__ = ("_address", "_buffer", "_fd", "_finished", "_lock", "_pid")

    def __init__(self, pid: int, address: int, nbytes: int) -> None:
        super().__init__(nbytes)  # never `complete`: what the link sends comes from elsewhere
        self._pid = pid
        self._address = address
        self._finished: Callable[[bool], None] | None = None
        self._fd = -1
        self._buffer: bytearray | None = None
        self._lock = threading.Lock()  # a read under way and closing the fd never overlap

    def wait_beyond(self, sent: int, timeout: float) -> int:
        """All of it is there (in the slot) at once, unless the lend was aborted (-1)."""
        return -1 if self.aborted else self.nbytes

    def claim(self, finished: Callable[[bool], None]) -> None:
        """Who hears how it ends (until then, ending it tells no one)."""
        self._finished = finished

    def piece(self, view: memoryview, start: int, end: int) -> memoryview:
        with self._lock:
            if self.aborted:
                raise OSError(errno.ECANCELED, "the lend was aborted")
            if self._fd < 0:
                self._fd = os.open(f"/proc/{self._pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
            if self._buffer is None:
                self._buffer = bytearray(min(PIECE_BYTES, self.nbytes))
            into = memoryview(self._buffer)[: min(end - start, len(self._buffer))]
            count = os.preadv(self._fd, [into], self._address + start)
            if count <= 0:
                raise OSError(errno.EIO, f"the memory of slot process {self._pid} ended at byte {start}")
            if start + count >= self.nbytes:
                self._end(True)
            return into[:count]

    def abort(self) -> None:
        super().abort()
        with self._lock:
            self._end(False)

    def _end(self, ok: bool) -> None:
        """Under the lock: close the fd, say how it ended (once)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        finished, self._finished = self._finished, None
        if finished is not None:
            finished(ok)


class _Lend:
    """One lent value: its arrays still being read, the Fetches it answers."""

    __slots__ = ("failed", "object_id", "remaining", "requests", "slot", "sources")

    def __init__(self, slot: int, object_id: int, requests: list[int], sources: list[Lent]) -> None:
        self.slot = slot
        self.object_id = object_id
        self.requests = requests
        self.sources = sources
        self.remaining = len(sources)
        self.failed = False


Refused = Callable[[int, int, list[int]], None]
"""(slot, object id, requests): the host refused the reads of a lend (not the slot process's
death, which `Lender.slot_lost` handles): fetch it the old way."""


class Lender:
    """The agent's lends (see the module doc). Runs on the agent's loop; `Lent` sources end
    on the data link's thread and call back through `call_soon_threadsafe`."""

    def __init__(
        self,
        call_soon_threadsafe: Callable[..., Any],
        refused: Refused,
        drop_now: Callable[[tuple[int, ...]], None],
    ) -> None:
        self._call = call_soon_threadsafe
        self._refused = refused
        self._drop_now = drop_now  # Drops held for lent objects, passed to the slots once read
        self._arrived: dict[int, list[tuple[np.ndarray, Lent]]] = {}  # slot -> decoded, not yet claimed
        self._lends: dict[int, _Lend] = {}  # id() of a _Lend -> it, while its arrays are read
        self._asked: dict[int, tuple[int, int]] = {}  # object id -> (slot, lends asked, not answered)
        self._drops: set[int] = set()
        self.works = True  # False once the host refused a read: lend no more

    def arrays_hook(self, slot: int, pid: Callable[[], int | None]) -> SharedArrays:
        """The slot pipe decoder's `shared` hook: a lent array as a placeholder (never
        written), its source kept for `take`. ValueError for a locator that is not a lend
        by this slot's current process (the decoder then fails the frame)."""

        def lent(dtype: np.dtype[Any], shape: tuple[int, ...], locator: bytes) -> np.ndarray:
            if len(locator) != LENT.size:
                raise ValueError(f"a lent array's locator is {LENT.size} bytes, not {len(locator)}")
            lender_pid, address, nbytes = LENT.unpack(locator)
            if lender_pid != pid():
                raise ValueError(f"an array lent by pid {lender_pid}, not by slot {slot}'s process")
            if nbytes != int(np.prod(shape, dtype=object)) * dtype.itemsize:
                raise ValueError(f"a lent array of {nbytes} bytes for shape {shape} of {dtype}")
            placeholder = aligned_empty(nbytes)  # untouched: the link reads the slot's memory instead
            self._arrived.setdefault(slot, []).append((placeholder, Lent(lender_pid, address, nbytes)))
            return placeholder.view(dtype).reshape(shape)

        return lent

    def asked(self, slot: int, object_id: int) -> None:
        """A lend of `object_id` was asked of `slot`: from now, a Drop of it waits (the slot
        would free what it is about to lend)."""
        self._asked[object_id] = (slot, self._asked.get(object_id, (slot, 0))[1] + 1)

    def answered(self, object_id: int) -> None:
        """`object_id`'s slot answered an ask (after `start`, if it lent it)."""
        slot, count = self._asked.pop(object_id, (0, 0))
        if count > 1:
            self._asked[object_id] = (slot, count - 1)
        self._pass_drops()

    def take(self, slot: int) -> list[tuple[np.ndarray, Lent]]:
        """What the frame just decoded from `slot` lent (empty: its answer came whole)."""
        return self._arrived.pop(slot, [])

    def start(self, slot: int, object_id: int, requests: list[int], arrays: list[tuple[np.ndarray, Lent]]) -> None:
        """These arrays now answer `requests`: count them down as the link reads them."""
        lend = _Lend(slot, object_id, requests, [source for _, source in arrays])
        key = id(lend)
        self._lends[key] = lend
        for source in lend.sources:
            source.claim(lambda ok: self._notify(key, ok))

    @staticmethod
    def release(arrays: list[tuple[np.ndarray, Lent]]) -> None:
        """Arrays lent for nothing (no Fetch waits, or they cannot be forwarded): never read."""
        for _, source in arrays:
            source.abort()

    def lending(self, object_id: int) -> bool:
        return object_id in self._asked or any(lend.object_id == object_id for lend in self._lends.values())

    def drops(self, object_ids: tuple[int, ...]) -> tuple[int, ...]:
        """Of objects the agent drops, those the slots may forget now; the others once read."""
        held = {i for i in object_ids if self.lending(i)}
        self._drops |= held
        return tuple(i for i in object_ids if i not in held)

    def slot_lost(self, slot: int) -> list[tuple[int, list[int]]]:
        """`slot`'s process is gone: abort its lends; (object id, requests) to answer again."""
        lost = [lend for lend in self._lends.values() if lend.slot == slot]
        for object_id in [i for i, (asked_of, _) in self._asked.items() if asked_of == slot]:
            del self._asked[object_id]  # never answered now
        for lend in lost:
            del self._lends[id(lend)]
            for source in lend.sources:
                source.abort()
        self._pass_drops()
        return [(lend.object_id, lend.requests) for lend in lost]

    def _notify(self, key: int, ok: bool) -> None:
        """From the thread that ended a lent array: on to the loop (gone at the agent's exit)."""
        with contextlib.suppress(RuntimeError):
            self._call(self._one_ended, key, ok)

    def _one_ended(self, key: int, ok: bool) -> None:
        lend = self._lends.get(key)
        if lend is None:  # its slot was lost first
            return
        lend.failed |= not ok
        lend.remaining -= 1
        if lend.remaining > 0:
            return
        del self._lends[key]
        self._pass_drops()
        if lend.failed:
            self.works = False
            self._refused(lend.slot, lend.object_id, lend.requests)

    def _pass_drops(self) -> None:
        ready = tuple(i for i in self._drops if not self.lending(i))
        if ready:
            self._drops.difference_update(ready)
            self._drop_now(ready)
