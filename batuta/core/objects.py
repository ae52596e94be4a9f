"""Object references: a value stored once per host and named by tasks instead of shipped.

`pool.put(value)` returns an `ObjectRef`; a task whose arguments contain the ref gets the
value in its place on the worker. The coordinator sends the value to a host once, the
first time a task that needs it goes there (again after that host's agent restarts), and
the agent substitutes it into every task for its slots. Dask calls this `scatter`, Ray
`put`. The ref is a name, not a handle: it says nothing about where the value lives.

`digest` identifies the content (a hash of its encoding), so that a job journal keys a
task by what it computes on, not by a number that changes from run to run.

A task submitted with `keep=True` resolves to an ObjectRef too: its value stays on the host
that made it, and the ref says what it is (`shape`, `dtype`, `nbytes`) and where it was made
(`host`). Passing it to another task runs that task there if it can; `pool.get(ref)` fetches
the value. A kept ref's digest names how it was made (the producing task), not its bytes.

`pool` names the pool that made the ref (0: decoded off the wire, or made by hand). Ids
count from 1 in every pool, so a pool refuses another pool's refs instead of reading its
own object of the same id in their place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# A ref to the result of an unfinished task whose kernel is not pure (a binary, a random or
# file-reading kernel) has a digest starting so: its value is not known from how it is made,
# and a journal must not key its readers by content (batuta.observers.journal).
UNREPEATABLE = "fed-once:"


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """A value put in the pool (`pool.put`), to pass as a kernel argument in its place."""

    object_id: int
    digest: str = field(default="", compare=False)
    nbytes: int = field(default=0, compare=False)
    size: int = field(default=0, compare=False)  # array elements inside: Backend.AUTO sizes by it
    shape: tuple[int, ...] = field(default=(), compare=False)  # of a kept array ((): not an array)
    dtype: str = field(default="", compare=False)  # of a kept array, numpy's `dtype.str`
    host: str = field(default="", compare=False)  # a kept value: the host that made it ("": put)
    pool: int = field(default=0, repr=False)  # the pool that made it (`ObjectTable.owner`)

    def __repr__(self) -> str:
        size = f", {self.nbytes:,} bytes" if self.nbytes else ""
        where = f" on {self.host}" if self.host else ""
        return f"ObjectRef({self.object_id}{size}{where})"


def refs_in(value: object, depth: int = 0) -> list[ObjectRef]:
    """Every ObjectRef inside `value` (arguments: tuples, lists and dict values), in order."""
    if type(value) is ObjectRef:
        return [value]
    if depth > 32:
        return []
    if type(value) is tuple or type(value) is list:
        found: list[ObjectRef] = []
        for item in value:
            t = type(item)
            if t is ObjectRef or t is tuple or t is list or t is dict:
                found += refs_in(item, depth + 1)
        return found
    if type(value) is dict:
        return [ref for item in value.values() for ref in refs_in(item, depth + 1)]
    return []


def replace_refs(args: tuple[Any, ...], lookup: dict[int, object]) -> tuple[Any, ...]:
    """A kernel's `args` with each ObjectRef inside replaced by `lookup[ref.object_id]` (KeyError if absent)."""
    return tuple(_replaced(item, lookup, 1) for item in args)


def _replaced(value: object, lookup: dict[int, object], depth: int) -> object:
    if type(value) is ObjectRef:
        return lookup[value.object_id]
    if depth > 32:
        return value
    if type(value) is tuple:
        return tuple(_replaced(item, lookup, depth + 1) for item in value)
    if type(value) is list:
        return [_replaced(item, lookup, depth + 1) for item in value]
    if type(value) is dict:
        return {key: _replaced(item, lookup, depth + 1) for key, item in value.items()}
    return value
