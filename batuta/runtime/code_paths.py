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

import os
import re
from collections.abc import Iterable
from dataclasses import replace

from batuta.protocol.messages import CodeLoaded
from batuta.runtime.missing_package import missing_package_fix

KEPT = 64  # bundles whose origins a process remembers (each pool keeps those it ships)

# Where this process read each bundle's files: digest -> {path in the bundle: file here}
_ORIGINS: dict[str, dict[str, str]] = {}
# A path into a host's code cache, up to the bundle's folder (the rest is matched against the
# bundle's files: a name may hold anything a file name may)
_CACHED = re.compile(r"[^\s\"'(<>]*/code/(?P<digest>[0-9a-f]{64})/")
_FRAME = re.compile(r'File "(?P<path>[^"\n]+)", line (?P<line>\d+)')
# numba's compile errors, as the agent says them (agent/numba_errors.py): the path in the bundle
_AT_IN_BUNDLE = re.compile(r" \(at (?P<path>[^()]+?) line (?P<line>\d+)(?=[:)])")
# a file the user's code opened beside itself on the host (`Path(__file__).parent / "table.txt"`)
_MISSING = re.compile(r"No such file or directory: '(?P<path>[^'\n]*/code/[0-9a-f]{64}/(?P<relative>[^'\n]+))'")


def collected(digest: str, files: dict[str, str]) -> None:
    """The bundle `digest` was read from `files` (path in the bundle -> file here)."""
    _ORIGINS.pop(digest, None)  # the latest collected last: the oldest go first
    _ORIGINS[digest] = files
    while len(_ORIGINS) > KEPT:
        del _ORIGINS[next(iter(_ORIGINS))]


def in_user_files(text: str, digest: str) -> str:
    """`text` with each place said in the bundle `digest`, "(at mymod.py line 5" (numba's
    compile errors, a module's failed import: as the agent says them), as the user's file, "(at
    /home/me/proj/mymod.py:5"; every one of them (an unknown kernel's error names each module
    that failed). By digest, a bundle that is no longer the pool's (its next ship went out
    before the host's import of it was over) is found too."""
    return _placed(text, dict(_ORIGINS.get(digest, {})))


def loaded_in_user_files(loaded: CodeLoaded) -> CodeLoaded:
    """A host's `CodeLoaded`, its import errors naming the user's files (`in_user_files`), and
    the fix for a package installed here that the host lacks (`missing_package_fix`)."""
    if not loaded.errors:
        return loaded
    return replace(
        loaded,
        errors={module: missing_package_fix(in_user_files(e, loaded.digest)) for module, e in loaded.errors.items()},
    )


def _placed(text: str, originals: dict[str, str]) -> str:
    """`in_user_files` with `originals`: path in a bundle -> the user's file."""

    def placed(found: re.Match[str]) -> str:
        original = originals.get(found["path"])
        return found.group(0) if original is None else f" (at {original}:{found['line']}"

    return _unsent_files(_AT_IN_BUNDLE.sub(placed, text), originals) if originals else text


def _unsent_files(text: str, originals: dict[str, str]) -> str:
    """`text` saying, of a file a host's copy of the code lacks that lies beside the user's
    code here (a data file beside a single-file module, one a .batutaignore lists), that it was
    not sent: the host's path alone, in its cache, did not say why it was missing."""
    roots = {original[: -len(relative)] for relative, original in originals.items() if original.endswith(relative)}

    def unsent(found: re.Match[str]) -> str:
        here = next(
            (root + found["relative"] for root in sorted(roots) if os.path.isfile(root + found["relative"])), None
        )
        if here is None or found["relative"] in originals:
            return found.group(0)
        if "/" in found["relative"]:  # in a package folder, which goes whole but for what it leaves out
            why = f"{here} is left out of its package (a .batutaignore lists it, or it is hidden): let it ship"
        else:
            why = f"a single-file module travels alone, without {here} beside it: put both in a package folder"
        return f"{found.group(0)} (not sent: {why}, or give the data to the tasks as an argument or with pool.put)"

    return _MISSING.sub(unsent, text)


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
        "IndexError: ... (at /home/me/proj/mykernels.py:6)"; a place said in the bundle (a numba
        compile error's, "(at mymod.py line 5: ...)", a failed import's), as the user's file."""
        if error is None or not self._origins:
            return error
        if " (at " in error:
            return self.places(error)
        if b"/code/" not in stderr:
            return error
        text, folders = self._mapped(stderr.decode("utf-8", "surrogateescape"))
        if not folders:
            return error
        ours = {original for files in self._origins.values() for _, original in files}
        frames = [f"{frame['path']}:{frame['line']}" for frame in _FRAME.finditer(text) if frame["path"] in ours]
        return f"{error} (at {frames[-1]})" if frames else error

    def places(self, text: str) -> str:
        """`text` with each place said in one of this pool's bundles as the user's file
        (`in_user_files`)."""
        return _placed(text, {relative: original for files in self._origins.values() for relative, original in files})

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
