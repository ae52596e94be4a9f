"""Checks for the values of a TOML file, each error naming the file, the line, the field and the fix.

`FieldReader` walks parsed TOML for a reader of one kind of file (the cluster file's
`_Reader` in batuta/runtime/cluster.py, whose `[[allocations]]` tables
batuta/runtime/allocation_config.py reads with the same checks): `error(path, message)`
makes a `ConfigError` like `cluster.toml:12: hosts[2].slots: expected a whole number, got
'4' (a string); write slots = 4`, finding the line of `path` in the text as best it can
(tomllib does not say where a value was), and each `_kind(path, value)` check returns the
value, converted, or raises that error with the fix.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from batuta.core.task import MAX_SLOTS, host_tag_problem
from batuta.errors import ConfigError

__all__ = ["ENV_NAME", "HOST_NAME", "MODULE_NAME", "FieldPath", "FieldReader", "field_name", "shown"]

HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*\Z")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")

FieldPath = tuple[str | int, ...]


def field_name(path: FieldPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


class FieldReader:
    """Walks parsed TOML, checking each value and remembering where errors point."""

    def __init__(self, text: str, source: str, base_dir: Path) -> None:
        self._lines = text.splitlines()
        self._source = source
        self._base_dir = base_dir

    # -- errors, with the line they are on --

    def error(self, path: FieldPath, message: str) -> ConfigError:
        line = self._line_of(path)
        where = f"{self._source}:{line}" if line else self._source
        name = field_name(path)
        return ConfigError(f"{where}: {name}: {message}" if name else f"{where}: {message}")

    def _line_of(self, path: FieldPath) -> int | None:
        """Best effort: the line of `path`'s key (or of its nearest enclosing key or table)."""
        for end in range(len(path), 0, -1):
            line = self._find(path[:end])
            if line:
                return line
        return None

    def _find(self, path: FieldPath) -> int | None:
        table: FieldPath = ()
        counts: dict[tuple[str, ...], int] = {}
        for number, raw in enumerate(self._lines, 1):
            line = raw.strip()
            if line.startswith("[["):
                name = _header(line[2:].split("]]", 1)[0])
                counts[name] = counts.get(name, -1) + 1
                table = (*name, counts[name])
                if table == path or name == path:  # an element, or the array itself (its first)
                    return number
                continue
            if line.startswith("["):
                table = _header(line[1:].split("]", 1)[0])
                if table == path:
                    return number
                continue
            match = re.match(r"""\s*("[^"]*"|'[^']*'|[A-Za-z0-9_\-]+)\s*=""", line)
            if match and (*table, match[1].strip("\"'")) == path:
                return number
        return None

    # -- tables --

    def _table(self, data: dict[str, Any], path: FieldPath) -> dict[str, Any]:
        value = data.get(str(path[-1]), {})
        if not isinstance(value, dict):
            raise self.error(path, f"expected a table ([{field_name(path)}]), got {shown(value)}")
        return value

    def _known_keys(self, table: dict[str, Any], path: FieldPath, allowed: tuple[str, ...]) -> None:
        for key in table:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
                hint = f"did you mean {close[0]!r}?" if close else "expected one of " + ", ".join(allowed)
                raise self.error((*path, key), f"unknown key; {hint}")

    # -- value checks: each returns the checked value or raises with the fix --

    def _string(self, path: FieldPath, value: Any) -> str:
        if not isinstance(value, str):
            raise self.error(path, f'expected a string, got {shown(value)}; write {path[-1]} = "..."')
        if not value.strip():
            raise self.error(path, "must not be empty")
        return value

    def _host_name(self, path: FieldPath, value: Any) -> str:
        name = self._string(path, value)
        if not HOST_NAME.match(name):
            raise self.error(path, f"{name!r}: use letters, digits, '.', '_' and '-' (no spaces or '/')")
        return name

    def _int(self, path: FieldPath, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            fix = f"; write {path[-1]} = {value.strip()}" if isinstance(value, str) and value.strip().isdigit() else ""
            raise self.error(path, f"expected a whole number, got {shown(value)}{fix}")
        return value

    def _count(self, path: FieldPath, value: Any) -> int:
        number = self._int(path, value)
        if number < 0:
            raise self.error(path, f"expected a whole number >= 0, got {number}")
        return number

    def _slots(self, path: FieldPath, value: Any) -> int:
        number = self._count(path, value)
        if number > MAX_SLOTS:
            raise self.error(path, f"{number} is more than the {MAX_SLOTS} slots one agent runs; split the host")
        return number

    def _port(self, path: FieldPath, value: Any) -> int:
        number = self._int(path, value)
        if not 1 <= number <= 65535:
            raise self.error(path, f"expected a port number from 1 to 65535, got {number}")
        return number

    def _seconds(self, path: FieldPath, value: Any, *, zero_means: str = "") -> float:
        """A finite number of seconds, > 0; or 0 where it has a meaning of its own (`zero_means`)."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(path, f"expected a number of seconds, got {shown(value)}")
        if zero_means and value == 0:
            return 0.0
        if not value > 0 or value == float("inf"):
            least = f"a number of seconds >= 0 (0: {zero_means})" if zero_means else "a positive number of seconds"
            raise self.error(path, f"expected {least}, got {value}")
        return float(value)

    def _bool(self, path: FieldPath, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.error(path, f"expected true or false, got {shown(value)}")
        return value

    def _path(self, path: FieldPath, value: Any) -> Path:
        text = self._string(path, value)
        candidate = Path(text).expanduser()
        return candidate if candidate.is_absolute() else self._base_dir / candidate

    def _gpus(self, path: FieldPath, value: Any) -> str:
        if isinstance(value, str):
            text = value.strip().lower()
            if text in ("auto", "all"):
                return "auto"
            if text in ("none", ""):
                return "none"
            if text.startswith("[") and text.endswith("]"):  # `--gpus "[0, 1]"`: the file's spelling
                text = text[1:-1]
            parts = [p.strip() for p in text.split(",")]
            if all(p.isdigit() for p in parts):
                return ",".join(str(int(p)) for p in dict.fromkeys(parts))
        elif isinstance(value, list) and value:
            if all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
                return ",".join(str(i) for i in dict.fromkeys(value))
        elif isinstance(value, list):
            return "none"
        elif isinstance(value, bool):
            return "auto" if value else "none"
        elif isinstance(value, int):
            raise self.error(
                path,
                f'gpus = {value} is ambiguous; write GPU indices (gpus = [0, 1]), "auto" or "none"',
            )
        raise self.error(path, f'expected "auto", "none" or a list of GPU indices like [0, 1], got {shown(value)}')

    def _env(self, path: FieldPath, value: Any) -> dict[str, str]:
        if not isinstance(value, dict):
            raise self.error(path, f'expected a table like {{ OMP_NUM_THREADS = "1" }}, got {shown(value)}')
        env: dict[str, str] = {}
        for key, item in value.items():
            if not ENV_NAME.match(key):
                raise self.error((*path, key), "not a valid environment variable name (letters, digits, _)")
            if not isinstance(item, str):
                raise self.error((*path, key), f'expected a string, got {shown(item)}; write {key} = "{item}"')
            env[key] = item
        return env

    def _tags(self, path: FieldPath, value: Any) -> frozenset[str]:
        items = self._string_list(path, value)
        for index, tag in enumerate(items):
            problem = host_tag_problem(tag)
            if problem is not None:
                raise self.error((*path, index), problem)
        return frozenset(items)

    def _modules(self, path: FieldPath, value: Any) -> tuple[str, ...]:
        items = self._string_list(path, value)
        for index, module in enumerate(items):
            if not MODULE_NAME.match(module):
                raise self.error((*path, index), f"{module!r} is not a dotted module name like mypkg.kernels")
        return tuple(items)

    def _string_list(self, path: FieldPath, value: Any) -> list[str]:
        if not isinstance(value, list):
            raise self.error(path, f'expected a list of strings like ["a", "b"], got {shown(value)}')
        return [self._string((*path, i), item) for i, item in enumerate(value)]


def _header(text: str) -> tuple[str, ...]:
    return tuple(part.strip().strip("\"'") for part in text.split("."))


def shown(value: Any) -> str:
    kinds = {str: "a string", bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "a table"}
    kind = kinds.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{text[:40]}… ({kind})" if len(text) > 40 else f"{text} ({kind})"
