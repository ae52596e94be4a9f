"""Finding and loading a job: a built-in name (`demo`) or a `.py` file with `async def main(pool)`.

Everything that can be wrong with a job is found here, before a pool starts, and raised as
one `JobError` line that names the job and the fix: the command line turns it into exit
code 2, and a TUI palette can show it as a notification. Job files are loaded with
importlib from their path, the way `python job.py` would see them (their own folder is on
`sys.path` while the file runs its top level, so it can import a helper beside it), but
the caller's working directory is never added to `sys.path`.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import pkgutil
import re
import sys
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from batuta.errors import UsageError
from batuta.protocol import SHOWN_AS

JobMain = Callable[[Any], Awaitable[Any]]

_BUILTIN_PACKAGE = "batuta.jobs"


class JobError(UsageError):
    """A job could not be found or loaded, or its `main` has the wrong shape. Exit code 2."""


@dataclass(frozen=True, slots=True)
class Job:
    """A loaded job: `main` is its `async def main(pool)`; `name` is what the user typed."""

    name: str
    main: JobMain
    origin: str  # "built-in" or the file's resolved path


def builtin_job_names() -> list[str]:
    """The built-in jobs: every public module in `batuta/jobs/`, sorted."""
    package = importlib.import_module(_BUILTIN_PACKAGE)
    return sorted(
        info.name for info in pkgutil.iter_modules(package.__path__) if not info.name.startswith("_") and not info.ispkg
    )


def load_job(spec: str) -> Job:
    """Load the job named by `spec`: a built-in name, or a path to a `.py` file."""
    builtins = builtin_job_names()
    path = Path(spec)
    looks_like_path = spec.endswith(".py") or "/" in spec or "\\" in spec
    if not looks_like_path and spec in builtins:
        module = importlib.import_module(f"{_BUILTIN_PACKAGE}.{spec}")
        return Job(name=spec, main=_checked_main(module, spec), origin="built-in")
    try:
        exists, is_dir = path.exists(), path.is_dir()
        if exists and not is_dir:
            with open(path, "rb"):  # readable: else "raised at import ... PermissionError"
                pass
    except OSError as exc:  # a folder on its path this user cannot enter, or a file it cannot read
        raise JobError(
            f"cannot read job file {spec!r}: {exc.strerror or exc}; make it, and the folders above it, readable "
            "by this user"
        ) from None
    if not looks_like_path and not exists:
        close = difflib.get_close_matches(spec, builtins, n=1)
        guess = f"; did you mean {close[0]!r}?" if close else ""
        guess = f"; did you mean './{spec}.py'?" if Path(f"{spec}.py").is_file() else guess
        raise JobError(f"unknown built-in job {spec!r}; {_hint(builtins)}{guess}")
    if not exists:
        raise JobError(f"job file {spec!r} not found; {_hint(builtins)}")
    if is_dir:
        raise JobError(f"job file {spec!r} is a directory; {_hint(builtins)}")
    if path.suffix != ".py":
        raise JobError(f"job file {spec!r} is not a .py file; {_hint(builtins)}")
    module = _exec_file(path.resolve(), spec)
    return Job(name=spec, main=_checked_main(module, spec), origin=str(path.resolve()))


def _hint(builtins: list[str]) -> str:
    names = ", ".join(builtins) or "none installed"
    return f"pass the path to a .py file with 'async def main(pool)' or a built-in job name ({names})"


def _exec_file(path: Path, shown: str) -> ModuleType:
    """Run the file's top level as a fresh module; turn whatever goes wrong into a JobError."""
    module_name = "_batuta_job_" + re.sub(r"\W", "_", path.stem)
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise JobError(f"job file {shown!r} cannot be loaded as a Python module; rename it *.py")
    module = importlib.util.module_from_spec(spec)
    setattr(module, SHOWN_AS, shown)  # its classes named in errors as the user wrote the file, not as module_name
    # In sys.modules while its top level runs, as a normal import would be: dataclasses need it.
    sys.modules[module_name] = module
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        sys.modules.pop(module_name, None)
        if exc.filename in (None, str(path)):
            where = f"{shown}:{exc.lineno}" if exc.lineno else shown
            raise JobError(f"job file {shown!r} has a syntax error at {where}: {exc.msg}") from exc
        where = f"{exc.filename}:{exc.lineno}" if exc.lineno else exc.filename
        raise JobError(f"job file {shown!r} imports a module with a syntax error, at {where}: {exc.msg}") from exc
    except Exception as exc:
        sys.modules.pop(module_name, None)
        lineno = _innermost_lineno_in(exc, path)
        where = f"{shown}:{lineno}" if lineno else shown
        what = f"{type(exc).__name__}: {_first_line(str(exc))}"
        if isinstance(exc, ImportError):
            fix = "install the missing package or fix the import"
            if "relative import" in str(exc):  # the job file is a top-level module, in no package
                fix = "a job file runs on its own, in no package: import its neighbours by name ('import helpers')"
            raise JobError(f"job file {shown!r} failed to import at {where}: {what}; {fix}") from exc
        raise JobError(f"job file {shown!r} raised at import, at {where}: {what}") from exc
    finally:
        _remove_first(sys.path, str(path.parent))
    return module


def _innermost_lineno_in(exc: BaseException, path: Path) -> int | None:
    """The line of the last traceback frame inside `path` (where the job file went wrong)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename) == path]
    return frames[-1].lineno if frames else None


def _remove_first(items: list[str], value: str) -> None:
    if value in items:
        items.remove(value)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _checked_main(module: ModuleType, shown: str) -> JobMain:
    """The module's `main`, checked to be `async def main(pool)`."""
    where = f"in job {shown!r}"
    main = getattr(module, "main", None)
    if main is None:
        raise JobError(f"job {shown!r} defines no 'main'; add 'async def main(pool): ...'")
    if not callable(main):
        raise JobError(f"'main' {where} is not a function; define it as 'async def main(pool)'")
    if not inspect.iscoroutinefunction(main):
        raise JobError(f"'main' {where} is not 'async def'; define it as 'async def main(pool)'")
    try:
        signature = inspect.signature(main)
    except (TypeError, ValueError):  # nothing to inspect; let the call itself tell
        return main
    try:
        signature.bind(object())
    except TypeError:
        raise JobError(
            f"'main' {where} must take one argument, the pool, but is 'main{signature}'; "
            "define it as 'async def main(pool)'"
        ) from None
    return main
