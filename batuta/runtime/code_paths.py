"""The user's own paths in what a host says of a failed task of theirs.

A host runs the user's code from its cache, `<cache>/code/<digest>/mykernels.py` (see
batuta/agent/code.py), so a kernel's traceback names that copy, which no editor on the
coordinator can open. The coordinator knows where it read each file of the bundle
(`collected`, from `runtime.code.CodeCollector`); for a failed task only (a success costs
nothing), `UserPaths` puts the user's path in place of each copy's, says once on a last line
where the copies are, and ends the one-line error with the innermost line of the user's as
`path:line`, which editors and terminals open.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

KEPT = 64  # bundles whose origins a process remembers (each pool keeps those it ships)

# Where this process read each bundle's files: digest -> {path in the bundle: file here}
_ORIGINS: dict[str, dict[str, str]] = {}
# A path into a host's code cache, up to the bundle's folder (the rest is matched against the
# bundle's files: a name may hold anything a file name may)
_CACHED = re.compile(r"[^\s\"'(<>]*/code/(?P<digest>[0-9a-f]{64})/")
_FRAME = re.compile(r'File "(?P<path>[^"\n]+)", line (?P<line>\d+)')
# numba's compile errors, as the agent says them (agent/numba_errors.py): the path in the bundle
_AT_IN_BUNDLE = re.compile(r" \(at (?P<path>[^()]+?) line (?P<line>\d+)(?=[:)])")


def collected(digest: str, files: dict[str, str]) -> None:
    """The bundle `digest` was read from `files` (path in the bundle -> file here)."""
    _ORIGINS.pop(digest, None)  # the latest collected last: the oldest go first
    _ORIGINS[digest] = files
    while len(_ORIGINS) > KEPT:
        del _ORIGINS[next(iter(_ORIGINS))]


class UserPaths:
    """The origins of one pool's bundles, taken when it collected them."""

    def __init__(self, digests: Iterable[str]) -> None:
        # each bundle's files, the longest path in the bundle first (`mod.py.bak.py` before `mod.py`)
        self._origins = {
            digest: sorted(_ORIGINS[digest].items(), key=lambda item: -len(item[0]))
            for digest in digests
            if digest in _ORIGINS
        }

    def stderr(self, stderr: bytes, host: str | None) -> bytes:
        """`stderr` with the user's paths in place of the copies its host ran (`File
        "/home/me/proj/mykernels.py", line 6`), and a last line saying where those are."""
        if not self._origins or b"/code/" not in stderr:
            return stderr
        text, folders = self._mapped(stderr.decode("utf-8", "surrogateescape"))
        if not folders:
            return stderr
        where = f"host {host}" if host else "the host"
        text = f"{text.rstrip(chr(10))}\n[batuta: {where} ran its copies of these files, in {', '.join(folders)}]\n"
        return text.encode("utf-8", "surrogateescape")

    def error(self, error: str | None, stderr: bytes) -> str | None:
        """`error` ending with the innermost frame of the user's in `stderr`'s traceback:
        "IndexError: ... (at /home/me/proj/mykernels.py:6)"; a numba compile error's place, said
        in the bundle ("(at mymod.py line 5: ...)"), as the user's file."""
        if error is None or not self._origins:
            return error
        if " (at " in error:
            originals = {relative: original for files in self._origins.values() for relative, original in files}
            found = _AT_IN_BUNDLE.search(error)
            if found is None or found["path"] not in originals:
                return error
            return f"{error[: found.start()]} (at {originals[found['path']]}:{found['line']}{error[found.end() :]}"
        if b"/code/" not in stderr:
            return error
        text, folders = self._mapped(stderr.decode("utf-8", "surrogateescape"))
        if not folders:
            return error
        ours = {original for files in self._origins.values() for _, original in files}
        frames = [f"{frame['path']}:{frame['line']}" for frame in _FRAME.finditer(text) if frame["path"] in ours]
        return f"{error} (at {frames[-1]})" if frames else error

    def _mapped(self, text: str) -> tuple[str, list[str]]:
        """`text` with every path into a bundle's copy replaced by the file here, and the
        copies' folders that were (one per bundle)."""
        out: list[str] = []
        folders: dict[str, str] = {}  # digest -> its folder, absolute where the text has it so
        end = 0
        for match in _CACHED.finditer(text):
            files = self._origins.get(match["digest"])
            if files is None or match.start() < end:
                continue
            rest = text[match.end() : match.end() + 4096]
            for relative, original in files:
                if rest.startswith(relative):
                    out.append(text[end : match.start()] + original)
                    end = match.end() + len(relative)
                    # numba names a file relative to the working folder where it can (../../root/...)
                    if not folders.get(match["digest"], "").startswith("/"):
                        folders[match["digest"]] = match.group(0)
                    break
        out.append(text[end:])
        return "".join(out), list(folders.values())
