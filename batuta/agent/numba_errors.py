"""A numba compile error, said in one line a person reads.

numba's typing errors are a page: the pipeline step, what failed, every candidate overload it
tried with their signatures, and the function's source up to the failing line with the path
of the agent's code cache in it. Folded into one line that is 1,000 characters of candidates
with the cause at its start and the place at its end. What is kept: the cause (up to the
candidate list), and where, as the user's file and line (relative to the shipped bundle)
with that line's code.

    TypingError: No implementation of function Function(<built-in function add>) found for
    signature: >>> add(array(float64, 1d, C), Literal[str](a)) (at mymod.py line 5: return x + "a")
"""

from __future__ import annotations

import os
import re
import traceback
from collections.abc import Sequence
from typing import Any

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_FILE = re.compile(r'^File "(?P<path>.+?)", line (?P<line>\d+):')
_BUNDLE = re.compile(r"/batuta/code/[0-9a-f]{64}/")  # the agent's cache of shipped code (agent/code.py)
# Where the cause ends: the candidates tried, numba's "During:" trail, or the source excerpt
_CAUSE_ENDS = ("There are ", "During:", 'File "', "- Resolution failure", "Rewrite the", "Enable logging")
_PIPELINE = re.compile(r"^Failed in \S+ mode pipeline \(step: [^)]*\)$")


def numba_error(exc: BaseException, directory: str | None = None) -> str | None:
    """`exc` in one line if it is numba's error about compiling a function, else None."""
    if not type(exc).__module__.startswith("numba"):
        return None
    lines = [_ANSI.sub("", line).strip() for line in str(exc).splitlines()]
    cause: list[str] = []
    for line in lines:
        if line.startswith(_CAUSE_ENDS):
            break
        if line and not _PIPELINE.match(line):
            cause.append(line)
    where = _where(lines, directory)
    text = " ".join(cause) or (lines[0] if lines else "")
    return f"{type(exc).__name__}: {text}{where}"


def _where(lines: list[str], directory: str | None) -> str:
    """' (at mymod.py line 5: return x + "a")' from the last source excerpt, or ''."""
    for index in range(len(lines) - 1, -1, -1):
        match = _FILE.match(lines[index])
        if match is None:
            continue
        path = match["path"]
        bundle = _BUNDLE.search(path)
        if bundle is not None:
            path = path[bundle.end() :]
        elif directory and directory.rstrip("/") + "/" in path:
            path = path.split(directory.rstrip("/") + "/", 1)[1]
        excerpt = []
        for line in lines[index + 1 :]:
            if not line or line.startswith("During:"):
                break
            excerpt.append(line)
        code = [line for line in excerpt if set(line) != {"^"}]  # the caret under the failing line
        shown = f": {code[-1]}" if code else ""
        return f" (at {path} line {match['line']}{shown})"
    return ""


def from_numba(exc: BaseException) -> bool:
    """Whether `exc` is numba's or was raised inside numba (its `NotImplementedError: float16`)."""
    if type(exc).__module__.startswith("numba"):
        return True
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and f"{os.sep}numba{os.sep}" in frames[-1].filename


def argument_hint(args: Sequence[Any], backend: str) -> str:
    """For a numba error, what among a kernel's arguments numba cannot take, with the fix ("" if
    nothing): its own words name neither ("non-precise type pyobject" for a big-endian array,
    read from a file in network order, that batuta carried as it was)."""
    for index, arg in enumerate(args):
        dtype = getattr(arg, "dtype", None)
        if dtype is None or not hasattr(arg, "shape"):
            continue
        if not getattr(dtype, "isnative", True):
            return (
                f" (numba compiles for native byte order only, and argument {index} is {dtype.str!r}: "
                "send x.astype(x.dtype.newbyteorder('=')))"
            )
        if backend == "cpu" and getattr(dtype, "str", "")[1:] == "f2":
            return f" (numba has no float16 on the CPU, and argument {index} is one: send x.astype(np.float32))"
    return ""
