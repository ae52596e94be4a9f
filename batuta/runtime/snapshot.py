"""A task's arguments and a `pool.put` value are what they hold when they are given.

Arrays go to the hosts without a copy (written from their own memory, streamed when large),
some time after `submit` returns: on the next turn of the loop, as the pipe drains, or again
when a lost host's tasks are sent elsewhere. A buffer refilled after `submit` (the usual
loop: fill, submit, fill again) made earlier tasks compute on later data, some on a mix.

* A writeable array of up to `COPY_MAX_BYTES` is copied when it is given, as `pickle` would
  have taken it: next to the per-task cost, that copy costs nothing.
* A larger one is not copied (that cut the data path to a fifth of its speed: fresh pages,
  and the event loop copying instead of sending); it is made read-only until every task given it
  (or, put, until it is dropped) is done, so that a write to it meanwhile raises NumPy's
  "assignment destination is read-only" instead of changing what a task computes. A write
  through another view of its memory is not seen: that stays the caller's to avoid. NumPy's
  message names neither batuta nor the fix, and nothing can change it where the write fails:
  `explain_read_only` adds a note saying both when the error leaves the pool (`async with`,
  a `batuta run` job) while tasks hold arrays.
* A read-only array (`arr.flags.writeable = False`, a read-only memory map, `np.frombuffer`
  of bytes) is taken as a promise not to change, and goes as it is.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import numpy as np

from batuta.protocol.codec import MAX_VALUE_DEPTH

if TYPE_CHECKING:
    from batuta.runtime.pool import Pool

COPY_MAX_BYTES = 1 << 20
_SCALARS = frozenset({int, float, str, bytes, bool, type(None)})


def taken(value: Any, large: list[np.ndarray] | None = None, held: InFlight | None = None, depth: int = 0) -> Any:
    """`value` with each small writeable array in it (inside tuples, lists and dicts, at any
    depth the wire allows) replaced by a copy; the same object where nothing needed one. The
    large writeable arrays, left in place, are appended to `large` (for `InFlight.hold`), and
    so are those that `held` made read-only for other tasks."""
    if depth > MAX_VALUE_DEPTH:  # the check after this refuses it in a line (a list that holds itself)
        return value
    kind = type(value)
    if kind in _SCALARS:
        return value
    if isinstance(value, np.ndarray):
        if not value.flags.writeable:
            if held is not None and large is not None and id(value) in held:
                large.append(value)  # read-only for another task: one more user
            return value
        if value.nbytes <= COPY_MAX_BYTES:
            return value.copy()
        if large is not None:
            large.append(value)
        return value
    if kind is tuple or kind is list:
        items = [taken(item, large, held, depth + 1) for item in value]
        if all(new is old for new, old in zip(items, value, strict=True)):
            return value
        return tuple(items) if kind is tuple else items
    if kind is dict:
        entries = {key: taken(item, large, held, depth + 1) for key, item in value.items()}
        if all(entries[key] is item for key, item in value.items()):
            return value
        return entries
    return value  # numpy scalars, refs, and what the codec refuses (it says so at submit)


class InFlight:
    """The large arrays made read-only while tasks use them, each with how many do."""

    def __init__(self) -> None:
        self._held: dict[int, tuple[np.ndarray, int]] = {}  # id -> (the array, users)
        self._puts: dict[int, list[np.ndarray]] = {}  # a put value's object id -> its large arrays

    def __contains__(self, array_id: object) -> bool:
        return array_id in self._held

    def held(self) -> list[np.ndarray]:
        return [array for array, _users in self._held.values()]

    def hold_put(self, object_id: int, arrays: list[np.ndarray]) -> None:
        """A put value's large arrays, read-only until `drop_put` (or `release_puts`)."""
        self.hold(arrays)
        self._puts[object_id] = arrays

    def drop_put(self, object_id: int) -> None:
        self.release(self._puts.pop(object_id, []))

    def release_puts(self) -> None:
        """The pool closed: the caller's arrays are theirs to change again."""
        for arrays in self._puts.values():
            self.release(arrays)
        self._puts.clear()

    def hold(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Make `arrays` read-only until as many `release`s; returns them."""
        for array in arrays:
            _, users = self._held.get(id(array), (array, 0))
            array.flags.writeable = False
            self._held[id(array)] = (array, users + 1)
        return arrays

    def release(self, arrays: list[np.ndarray]) -> None:
        for array in arrays:
            entry = self._held.get(id(array))
            if entry is None:
                continue
            if entry[1] > 1:
                self._held[id(array)] = (array, entry[1] - 1)
                continue
            del self._held[id(array)]
            with contextlib.suppress(ValueError):  # its base was made read-only meanwhile: left so
                array.flags.writeable = True  # it was writeable when given


def explain_read_only(exc: BaseException | None, pool: Pool) -> None:
    """Note on NumPy's read-only `ValueError` ("assignment destination is read-only", "output
    array is read-only") what batuta did and what to do, where arrays are held now: the write
    that raised it most likely went to one of them (a buffer refilled while its task runs)."""
    held = pool._in_flight.held()
    if not held or not isinstance(exc, ValueError) or not str(exc).endswith("is read-only"):
        return
    if any(note.startswith("batuta:") for note in getattr(exc, "__notes__", ())):
        return  # said already (a job's error, then the pool's `async with`)
    shown = ", ".join(f"{a.dtype} {a.shape}" for a in held[:3]) + (
        f" and {len(held) - 3} more" if len(held) > 3 else ""
    )
    exc.add_note(
        f"batuta: an array of over {COPY_MAX_BYTES >> 20} MiB given to a task stays read-only until the task is done "
        f"(given to pool.put: until pool.drop), so that the task computes on what it was given (held now: {shown}); "
        "to refill a buffer while tasks use it, submit buf.copy() or fill a new array each time"
    )


def read_only(array: Any) -> Any:
    """A read-only view of `array` (a chunk that `map_chunked` cuts, the caller's array
    unchanged): sent without a copy, since the call awaits its tasks."""
    if isinstance(array, np.ndarray) and array.flags.writeable:
        view = array.view()
        view.flags.writeable = False
        return view
    return array
