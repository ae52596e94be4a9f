"""Field validation shared by the encoder and the decoder.

Every check raises `Invalid`, which carries the path from the message down to the field
(`.results`, `[3]`, `.status`). The codec turns it into a Local- or RemoteProtocolError once,
at its boundary, where the message name is known and the fault's owner is clear.

msgpack hands the decoder exact builtin types, so the fast branch (`type(x) is int`) takes
every valid decoded value. The encoder may meet subclasses (an IntEnum, numpy.float64,
numpy.str_); the slow branches accept those and normalise them to the builtin type.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = [
    "INT_MAX",
    "INT_MIN",
    "SHOWN_AS",
    "TUPLE_MARK",
    "UINT_MAX",
    "Invalid",
    "Malformed",
    "bytes_",
    "check_len",
    "choice",
    "code_path",
    "describe",
    "digest",
    "expected",
    "float_",
    "ids",
    "module_name",
    "name",
    "opt_float",
    "opt_int",
    "opt_str",
    "opt_uint",
    "posint",
    "records",
    "seq",
    "str_",
    "str_map",
    "strs",
    "uint",
]

DIGEST_CHARS = 64  # a sha256 in hex
MAX_PATH_CHARS = 1024  # a relative path of the user's code
MAX_MODULE_CHARS = 256

INT_MIN = -(1 << 63)
INT_MAX = (1 << 63) - 1
UINT_MAX = (1 << 64) - 1


class Invalid(Exception):
    """A field failed validation. `at()` prepends path parts as the error travels up."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.path = [field] if field else []
        self.reason = reason

    def at(self, part: str) -> Invalid:
        self.path.insert(0, part)
        return self

    def describe(self, message_name: str) -> str:
        return f"{message_name}{''.join(self.path)}: {self.reason}"


class Malformed:
    """Stands in for an ext payload that failed to decode, so the error can name its field.

    The msgpack ext hook must not raise (the error would lose its field path), so it returns
    one of these; whichever validator meets it reports `reason` under the field's path.
    """

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class Unheld:
    """Stands in for a streamed array its receiver could not allocate (out of memory).

    The stream's bytes are read and dropped, so the connection stays in step, and whoever
    handles the message carrying it answers that message as failed (the agent: a task that
    cannot run on this host, `agent.py`) instead of the host going down with everything it
    ran, to be relaunched and sent the same value again, for ever.
    """

    __slots__ = ("dtype", "nbytes", "reason", "shape")

    def __init__(self, dtype: Any, shape: tuple[int, ...], nbytes: int, reason: str) -> None:
        self.dtype = dtype
        self.shape = shape
        self.nbytes = nbytes
        self.reason = reason

    def describe(self) -> str:
        return f"{self.nbytes:,} bytes (a {self.dtype} array of shape {self.shape}): {self.reason}"


def first_unheld(value: Any, depth: int = 0) -> Unheld | None:
    """The first `Unheld` inside a decoded value (its lists, tuples and dicts), if any."""
    if isinstance(value, Unheld):
        return value
    if depth < 64 and isinstance(value, (list, tuple)):
        for item in value:
            found = first_unheld(item, depth + 1)
            if found is not None:
                return found
    elif depth < 64 and isinstance(value, dict):
        for item in value.values():
            found = first_unheld(item, depth + 1)
            if found is not None:
                return found
    return None


class TupleMark:
    """The decoded EXT_TUPLE marker: "this array is a tuple". One instance, `TUPLE_MARK`."""

    __slots__ = ()


TUPLE_MARK = TupleMark()


SHOWN_AS = "__batuta_shown_as__"
"""A module attribute: how its user names a module that runs under a made-up name (a job
file, `batuta/jobs/_load.py`), for error messages to name its classes that way."""


def _type_name(kind: type) -> str:
    if kind.__module__ == "builtins":
        return kind.__name__
    shown = getattr(sys.modules.get(kind.__module__), SHOWN_AS, None)
    if isinstance(shown, str):  # not the made-up module name, which the user never wrote
        return f"{kind.__qualname__} (defined in {shown})"
    return f"{kind.__module__}.{kind.__name__}"


def describe(value: object) -> str:
    """A short description of a bad value for an error message: its type, itself if small."""
    if isinstance(value, Malformed):
        return f"a malformed ext ({value.reason})"
    if value is TUPLE_MARK:
        return "a tuple marker"
    kind = type(value)
    name = _type_name(kind)
    if value is None or kind in (bool, int, float, str, bytes):
        text = repr(value)
        if len(text) > 40:
            text = text[:37] + "..."
        return f"{name} {text}"
    if isinstance(value, (list, tuple, dict)):
        return f"{name} of {len(value)}"
    return name


def expected(field: str, what: str, value: object) -> Invalid:
    return Invalid(field, f"expected {what}, got {describe(value)}")


def uint(x: Any, field: str) -> int:
    """An int in [0, 2**64)."""
    if type(x) is int and 0 <= x <= UINT_MAX:
        return x
    if isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= UINT_MAX:
        return int(x)
    raise expected(field, "an int >= 0", x)


def flag(x: Any, field: str) -> bool:
    """A msgpack boolean (not an int that would pass as one)."""
    if type(x) is bool:
        return x
    raise expected(field, "a boolean", x)


def posint(x: Any, field: str) -> int:
    """An int in [1, 2**64)."""
    if type(x) is int and 1 <= x <= UINT_MAX:
        return x
    if isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= UINT_MAX:
        return int(x)
    raise expected(field, "an int >= 1", x)


def opt_uint(x: Any, field: str) -> int | None:
    return None if x is None else uint(x, field)


def opt_int(x: Any, field: str) -> int | None:
    """None or a signed 64-bit int (exit codes: negative for signals)."""
    if x is None:
        return None
    if type(x) is int and INT_MIN <= x <= INT_MAX:
        return x
    if isinstance(x, int) and not isinstance(x, bool) and INT_MIN <= x <= INT_MAX:
        return int(x)
    raise expected(field, "None or a 64-bit int", x)


def float_(x: Any, field: str, *, minimum: float | None = None, positive: bool = False) -> float:
    """A finite float, optionally bounded below; an int is accepted and converted."""
    if type(x) is not float:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise expected(field, "a number", x)
        x = float(x)
    if not math.isfinite(x):
        raise Invalid(field, f"expected a finite number, got {x!r}")
    if positive and not x > 0:
        raise Invalid(field, f"expected a number > 0, got {x!r}")
    if minimum is not None and x < minimum:
        raise Invalid(field, f"expected a number >= {minimum}, got {x!r}")
    return x


def opt_float(x: Any, field: str, *, minimum: float | None = None) -> float | None:
    return None if x is None else float_(x, field, minimum=minimum)


def str_(x: Any, field: str) -> str:
    if type(x) is str:
        return x
    if isinstance(x, str):
        return str(x)
    raise expected(field, "a str", x)


def name(x: Any, field: str) -> str:
    """A non-empty str (kernel names, binary paths)."""
    if type(x) is str and x:
        return x
    if isinstance(x, str) and x:
        return str(x)
    raise expected(field, "a non-empty str", x)


def opt_str(x: Any, field: str) -> str | None:
    return None if x is None else str_(x, field)


def bytes_(x: Any, field: str) -> bytes:
    if type(x) is bytes:
        return x
    if isinstance(x, (bytes, bytearray)):
        return bytes(x)
    raise expected(field, "bytes", x)


_HEX = frozenset("0123456789abcdef")


def digest(x: Any, field: str, *, empty: bool = False) -> str:
    """A sha256 in lowercase hex (a code digest); "" too when `empty`."""
    if type(x) is str and ((len(x) == DIGEST_CHARS and _HEX.issuperset(x)) or (empty and not x)):
        return x
    what = "a sha256 digest (64 lowercase hex digits)" + (' or ""' if empty else "")
    if isinstance(x, str):
        raise Invalid(field, f"expected {what}, got {describe(str(x))}")
    raise expected(field, what, x)


def code_path(x: Any, field: str) -> str:
    """A relative path of a file of the user's code, '/'-separated: not absolute, no '..' or
    '.' part, no empty part, no backslash or NUL, at most MAX_PATH_CHARS characters. The agent
    writes it under its cache folder, so these rules are what keep it there."""
    path = str_(x, field)
    if not path or len(path) > MAX_PATH_CHARS:
        raise Invalid(field, f"expected a relative path of 1 to {MAX_PATH_CHARS} characters, got {describe(path)}")
    if path.startswith("/") or "\\" in path or "\0" in path:
        raise Invalid(field, f"expected a relative '/'-separated path, got {describe(path)}")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise Invalid(field, f"expected a path without empty, '.' or '..' parts, got {describe(path)}")
    return path


def module_name(x: Any, field: str) -> str:
    """A dotted module name ("pkg.sub"), each part an identifier."""
    text = str_(x, field)
    if 0 < len(text) <= MAX_MODULE_CHARS and all(part.isidentifier() for part in text.split(".")):
        return text
    raise Invalid(field, f"expected a dotted module name, got {describe(text)}")


def choice(x: Any, field: str, allowed: frozenset[str], what: str) -> str:
    """One of a fixed set of strings (statuses, slot states, backends)."""
    if type(x) is str and x in allowed:
        return x
    if isinstance(x, str):
        raise Invalid(field, f"unknown {what} {str(x)!r} (known: {', '.join(sorted(allowed))})")
    raise expected(field, f"a {what} str", x)


def seq(x: Any, field: str) -> list[Any] | tuple[Any, ...]:
    """A list or tuple (the decoder only ever sees lists)."""
    if type(x) is list or type(x) is tuple:
        return x
    raise expected(field, "an array", x)


def ids(x: Any, field: str) -> list[int]:
    """A sequence of ints >= 0 (task ids)."""
    items = seq(x, field)
    for item in items:
        if type(item) is not int or not 0 <= item <= UINT_MAX:
            break
    else:
        return items if type(items) is list else list(items)
    return [uint(item, f"{field}[{i}]") for i, item in enumerate(items)]


def strs(x: Any, field: str) -> list[str]:
    """A sequence of str."""
    items = seq(x, field)
    for item in items:
        if type(item) is not str:
            break
    else:
        return items if type(items) is list else list(items)
    return [str_(item, f"{field}[{i}]") for i, item in enumerate(items)]


def str_map(x: Any, field: str) -> dict[str, str]:
    """A map of str to str (package versions, environment)."""
    if type(x) is not dict:
        if not isinstance(x, Mapping):
            raise expected(field, "a map of str to str", x)
        x = dict(x)
    for key, value in x.items():
        if type(key) is not str:
            raise Invalid(field, f"expected str keys, got key {describe(key)}")
        if type(value) is not str:
            raise expected(f"{field}[{key!r}]", "a str", value)
    return x


def records(fn: Callable[[Any], Any], x: Any, field: str) -> list[Any]:
    """Apply a record encoder or decoder to each element; a failure's path gets `field[i]`."""
    items = seq(x, field)
    out: list[Any] = []
    try:
        for item in items:
            out.append(fn(item))
    except Invalid as exc:
        raise exc.at(f"{field}[{len(out)}]") from None
    return out


def check_len(w: Any, count: int, what: str) -> Sequence[Any]:
    """A nested record must be an array of exactly `count` fields."""
    if type(w) is list and len(w) == count:
        return w
    if type(w) is list:
        raise Invalid("", f"{what} needs {count} fields, got {len(w)}")
    raise expected("", f"a {what} array", w)
