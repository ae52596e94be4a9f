"""The user's code that travels to every host, as source: which files, read as bytes, named by a digest.

What ships, collected on the coordinator when a pool starts (one snapshot per pool, so every
host of a run, relaunched or not, runs the same code):

* the job file's own modules: the modules of its folder that it imports, found by reading its
  imports with `ast`, and recursively those that they import from their folder. A module is
  `name.py`, a package a folder `name/`, shipped whole: with an `__init__.py`, or without one
  (a namespace package, as Python imports one when no regular module of that name is found;
  one that registers no kernel ships only when a shipped module imports it, since a plain
  folder that only the job imports is often its data, beside a loader that runs here);
* the modules named in `kernel_modules` (cluster file, `Pool.builder().kernel_modules`) that
  resolve here to files outside site-packages, the standard library and batuta itself (a
  module installed there is the host's own business: it is imported there by name, as before);
  a dotted name ships its whole top-level package;
* the paths given with `--module PATH` (`batuta run`, `batuta tui`) or
  `Pool.builder().modules(paths)`: a `.py` file or a package folder; the hosts import the
  package and those of its modules that register kernels (its `__init__` need not import
  them). A folder without an `__init__.py` ships as a namespace package, itself not imported:
  it has no code to run.

Files are read as bytes (no pickle: a bundle is paths and bytes). Left out: `__pycache__`,
`*.pyc`, files and folders whose names start with a dot, and what the globs of a
`.batutaignore` in a package's folder match (gitignore-like: `*` within a name, `**` across
folders, a leading `/` anchors at the package, a trailing `/` matches folders only; no `!`).
A bundle over the size limit (16 MiB unless told) is a `UsageError` naming its biggest files.

The hosts import the named modules, the job's own imports that register kernels (their code,
or what they import from their folder, calls `kernel(...)`), and every `--module`. The rest
is shipped, so that those modules can import it, but not imported by itself: a helper that
reads the coordinator's files at import time does not fail on every host.

The bundle is a `protocol.messages.Code`: its digest is sha256 over its sorted (path,
sha256(bytes)) entries and the module names, so a file changed between two runs is a new
digest, and every task names the digest it must run with.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import re
import sys
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from batuta.core.task import BinaryCall, KernelCall
from batuta.errors import UsageError
from batuta.protocol import SHOWN_AS
from batuta.protocol import messages as m
from batuta.runtime import code_paths
from batuta.runtime.missing_package import missing_package_fix, site_package_roots

log = logging.getLogger("batuta.runtime.code")
DEFAULT_MAX_CODE_BYTES = 16 * 2**20
MAX_CODE_MB = 255  # the most the limit may be raised to: a bundle travels in one frame (256 MiB at most)
IGNORE_FILE = ".batutaignore"
# What batuta's agents and slots import on a host (at start, or when a kernel first needs it):
# a shipped module of one of these names is never imported there (the host's own is, or its
# kernels break batuta's). tests/test_code_ship.py checks a real slot's modules against it.
HOST_PACKAGES = frozenset(
    {"numpy", "numba", "llvmlite", "cffi", "pycparser", "msgpack", "psutil", "threadpoolctl", "pynvml"}
    | {"numba_cuda", "cuda"}  # on a GPU host
)
MiB = 2**20


class CodeError(UsageError):
    """The user's code cannot be shipped (a bad --module path, a bundle over the limit). Exit code 2."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CodeSpec:
    """Where the code to ship comes from, as the user named it (see the module docstring)."""

    job_files: tuple[Path, ...] = ()
    modules: tuple[Path, ...] = ()  # --module PATH: .py files and package folders
    max_bytes: int = DEFAULT_MAX_CODE_BYTES
    # Where `kernel_modules` are looked for after the job files' folders, before sys.path: the
    # cluster file's folder, as its relative paths are (a mykernels.py beside cluster.toml)
    search_folders: tuple[Path, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class _Source:
    """One top-level module to ship: `name` (its import name) at `path` (a .py file or a
    package folder), and why it ships (for error messages)."""

    name: str
    path: Path
    why: str


# -- what is installed (the host's business) ----------------------------------------------


@functools.cache
def _installed_roots() -> tuple[str, ...]:
    """Folders whose modules are installed, not the user's: site-packages, the standard
    library, and batuta's own packages (an editable install lives in a checkout)."""
    roots = set(site_package_roots())
    for key in ("stdlib", "platstdlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            roots.add(path)
    for package in ("batuta", "batuta.kernels", "batuta.tui"):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin:
            roots.add(os.path.dirname(spec.origin))
    return tuple(sorted(os.path.realpath(r) + os.sep for r in roots))


def _is_installed(path: Path, roots: tuple[str, ...]) -> bool:
    real = os.path.realpath(path) + (os.sep if path.is_dir() else "")
    return any(real.startswith(root) for root in roots)


# -- reading imports ----------------------------------------------------------------------

_PARSED: dict[tuple[str, int, int], tuple[tuple[str, ...], bool]] = {}
"""(path, size, mtime_ns) -> (absolute imports, registers kernels): pools started one after
another in one process (tests, a dashboard) do not parse the same files again."""


def _scan(path: Path) -> tuple[tuple[str, ...], bool]:
    """The absolute module names a Python file imports (`from a.b import c` gives `a.b` and
    `a.b.c`), and whether it calls `kernel(...)` (registers kernels). A file that does not
    parse imports nothing here: it still ships, and its syntax error is reported by the host
    that imports it, naming the file and line."""
    try:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
    except OSError:
        return (), False
    cached = _PARSED.get(key)
    if cached is not None:
        return cached
    names: list[str] = []
    registers = False
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        tree = None
    if tree is not None:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.extend(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.append(node.module)
                names.extend(f"{node.module}.{alias.name}" for alias in node.names if alias.name != "*")
            elif isinstance(node, ast.Call):
                func = node.func
                if (isinstance(func, ast.Name) and func.id == "kernel") or (
                    isinstance(func, ast.Attribute) and func.attr == "kernel"
                ):
                    registers = True
    result = (tuple(dict.fromkeys(names)), registers)
    if len(_PARSED) > 4096:
        _PARSED.clear()
    _PARSED[key] = result
    return result


def _local_module(name: str, root: Path) -> tuple[Path, str] | None:
    """Where `name` ("a.b.c") lives in `root`, if its top level does: (the top-level .py file
    or package folder, the longest dotted prefix of `name` that is a module there). Found as
    Python's import finds it from `root`: in a folder, a package (`part/__init__.py`) before a
    module (`part.py`) before a namespace portion (a folder `part/` without `__init__.py`);
    and a top-level namespace package only when no regular module of that name is found
    anywhere on the path (an installed `numpy` wins over a folder `numpy/` here)."""
    parts = name.split(".")
    top = parts[0]
    if not top.isidentifier() or top == "__pycache__":
        return None
    package = root / top
    single = root / f"{top}.py"
    if (package / "__init__.py").is_file() or (
        not single.is_file() and package.is_dir() and _namespace_from(top, root)
    ):
        module, here = top, package
        for part in parts[1:]:
            if not part.isidentifier() or part == "__pycache__":
                break
            if (here / part / "__init__.py").is_file():
                here, module = here / part, f"{module}.{part}"
            elif (here / f"{part}.py").is_file():
                module = f"{module}.{part}"
                break
            elif (here / part).is_dir():  # a namespace sub-package, inside a package or another one
                here, module = here / part, f"{module}.{part}"
            else:
                break
        return package, module
    if single.is_file():
        return single, top
    return None


def _namespace_from(top: str, root: Path) -> bool:
    """Whether `import top` from a job in `root` gives the namespace package of which the
    folder `root/top` (no `__init__.py`) is a part, rather than a regular module found
    elsewhere on the path."""
    try:
        spec = importlib.machinery.PathFinder.find_spec(top, [str(root), *sys.path])
    except (ImportError, ValueError, OSError):
        return False
    if spec is None or spec.origin not in (None, "namespace") or not spec.submodule_search_locations:
        return False
    return str(root / top) in list(spec.submodule_search_locations)


def _local_names(root: Path) -> frozenset[str]:
    """The top-level names `_local_module` may find in `root`: `name.py` files and folders
    (packages, or namespace packages: which folders are is settled when one is imported)."""
    names: set[str] = set()
    try:
        entries = list(os.scandir(root))
    except OSError:
        return frozenset()
    for entry in entries:
        if entry.name.endswith(".py") and entry.name[:-3].isidentifier():
            names.add(entry.name[:-3])
        elif entry.name.isidentifier() and entry.name != "__pycache__" and entry.is_dir():
            names.add(entry.name)
    return frozenset(names)


def _mentions(file: Path, names: Iterable[str]) -> bool:
    """Whether `file`'s text contains one of `names` at all: a file that does not cannot import
    them, and is not parsed (parsing is most of collecting a big package)."""
    wanted = [name.encode() for name in names]
    if not wanted:
        return False
    try:
        data = file.read_bytes()
    except OSError:
        return False
    return any(name in data for name in wanted)


def _is_namespace(source: _Source) -> bool:
    return source.path.is_dir() and not (source.path / "__init__.py").is_file()


def _kernel_modules_in(source: _Source) -> list[str]:
    """The dotted names of a package's modules that register kernels, for the hosts to import
    (a namespace package itself has no code to run; a regular one's `__init__` may not import them)."""
    modules: list[str] = []
    for relative, path in _files(source):
        if relative.endswith(".py") and _scan(path)[1]:
            parts = relative[: -len(".py")].split("/")
            if parts[-1] == "__init__":
                parts.pop()
            if all(part.isidentifier() for part in parts):
                modules.append(".".join(parts))
    return modules


def _python_files(source: _Source) -> list[Path]:
    if source.path.is_file():
        return [source.path]
    return [path for rel, path in _files(source) if rel.endswith(".py")]


# -- .batutaignore ------------------------------------------------------------------------


class _Ignore:
    """The globs of a package's `.batutaignore`, matched against paths relative to it."""

    def __init__(self, lines: Iterable[str]) -> None:
        self._rules: list[tuple[re.Pattern[str], bool]] = []  # (regex, folders only)
        for raw in lines:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            folders_only = line.endswith("/")
            line = line.rstrip("/")
            anchored = line.startswith("/") or "/" in line
            line = line.lstrip("/")
            if not line:
                continue
            pattern = _glob_regex(line)
            self._rules.append((re.compile(pattern if anchored else f"(?:.*/)?{pattern}"), folders_only))

    @classmethod
    def of(cls, folder: Path) -> _Ignore:
        try:
            return cls((folder / IGNORE_FILE).read_text(encoding="utf-8").splitlines())
        except (OSError, UnicodeDecodeError):
            return cls(())

    def matches(self, relative: str, *, folder: bool) -> bool:
        return any(regex.fullmatch(relative) for regex, folders_only in self._rules if folder or not folders_only)


def _glob_regex(glob: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(glob):
        char = glob[i]
        if glob.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if glob.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = glob.find("]", i + 1)
            if end == -1:
                out.append(re.escape(char))
            else:
                out.append(f"[{glob[i + 1 : end].replace(chr(92), chr(92) * 2)}]")
                i = end
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out)


def _files(source: _Source) -> list[tuple[str, Path]]:
    """(path in the bundle, file here) for every file `source` ships, sorted."""
    if source.path.is_file():
        return [(source.path.name, source.path)]
    ignore = _Ignore.of(source.path)
    found: list[tuple[str, Path]] = []
    # A link to a folder is followed (it was left out, silently), but not one back up the tree.
    real_of: dict[str, str] = {}
    for folder, dirnames, filenames in os.walk(source.path, followlinks=True):
        real = real_of[folder] = os.path.realpath(folder)
        parent = os.path.dirname(folder)
        while parent in real_of:  # the folders above it in this walk
            if real_of[parent] == real:
                break
            parent = os.path.dirname(parent)
        else:
            parent = ""
        if parent:  # a cycle: this folder is one above it
            dirnames[:] = []
            continue
        here = Path(folder)
        relative_folder = here.relative_to(source.path).as_posix()
        prefix = "" if relative_folder == "." else relative_folder + "/"
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not d.startswith(".") and d != "__pycache__" and not ignore.matches(prefix + d, folder=True)
        )
        for filename in sorted(filenames):
            relative = prefix + filename
            if filename.startswith(".") or filename.endswith((".pyc", ".pyo")):
                continue
            if ignore.matches(relative, folder=False):
                continue
            found.append((f"{source.name}/{relative}", here / filename))
    return found


# -- collecting ---------------------------------------------------------------------------


class CodeCollector:
    """Collects what `spec` ships once, then a bundle per set of `kernel_modules` (hosts may
    name different ones). Raises CodeError (a UsageError) for what cannot be shipped."""

    def __init__(self, spec: CodeSpec, *, search_path: Sequence[str] | None = None) -> None:
        self.spec = spec
        # kernel_modules are found where the job files are first, as the job itself finds them
        job_folders = [str(Path(job).expanduser().resolve().parent) for job in spec.job_files]
        folders = job_folders + [str(folder) for folder in spec.search_folders]
        self._search = folders + list(sys.path if search_path is None else search_path)
        self._common: dict[str, _Source] = {}
        self._load: list[str] = []  # modules the hosts import, in order
        self._bundles: dict[tuple[str, ...], m.Code | None] = {}
        for path in spec.modules:
            source = self._module_path(path)
            self._add(self._common, source)
            # a package's own modules that register kernels too: importing the package alone runs
            # only its __init__, and its kernels were unknown on every host
            inside = _kernel_modules_in(source) if source.path.is_dir() else []
            self._load.extend(([] if _is_namespace(source) else [source.name]) + inside)
        for job in spec.job_files:
            self._job(job)
        self._close(self._common)

    def bundle(self, kernel_modules: Sequence[str] = ()) -> m.Code | None:
        """The Code message for a host that names `kernel_modules`; None when nothing ships."""
        key = tuple(kernel_modules)
        if key not in self._bundles:
            sources = dict(self._common)
            load = list(self._load)
            extra: dict[str, _Source] = {}
            for name in kernel_modules:
                source = self._kernel_module(name)
                if source is not None:
                    self._add(extra, source)
                    load.append(name)
            if extra:
                for source in extra.values():
                    self._add(sources, source)
                self._close(sources)
            self._bundles[key] = self._build(sources, load)
        return self._bundles[key]

    # -- finding sources

    def _module_path(self, path: Path) -> _Source:
        shown = str(path)
        path = path.expanduser()
        try:
            exists = path.exists()
        except OSError as exc:  # a folder on its path this user cannot enter
            raise CodeError(
                f"--module {shown}: cannot be read: {exc.strerror or exc}; make it, and the folders above it, "
                "readable by this user"
            ) from None
        if not exists:
            raise CodeError(f"--module {shown}: no such file or folder; give a .py file or a package folder")
        path = path.resolve()
        jobs_folders = {job.expanduser().resolve().parent for job in self.spec.job_files}
        if path.is_dir() and (path in jobs_folders or shown == "."):
            # shipped as a package named after the folder, its modules would register their
            # kernels a second time beside the job's own `import mykernels` of the same files
            what = (
                "the job's own folder, whose modules the job imports are sent already"
                if path in jobs_folders
                else ("this folder, which would ship as a package named after it")
            )
            raise CodeError(
                f"--module {shown}: {what}; name the kernel module files (--module kernels.py) "
                "or a package folder inside it"
            )
        if path.is_dir():
            name = path.name  # a folder without __init__.py ships as a namespace package
        elif path.suffix == ".py":
            name = path.stem
            folder = path.parent.name
            if any(imported.split(".")[0] == folder for imported in _scan(path)[0]) and (
                _local_module(folder, path.parent) is None
            ):
                # it imports its own folder as a package (`from helpers.util import x`): shipped
                # alone, as a top-level module, that package is missing on every host
                raise CodeError(
                    f"--module {shown}: it imports {folder} (its own folder) as a package, which would not "
                    f"ship with it; pass the folder instead: --module {_folder_of(shown, path)}"
                )
            package = _package_above(path) if _imports_relatively(path) else None
            if package is not None:
                # shipped alone it is a top-level module, where `from . import x` has no parent
                # package: every host failed to import it, and its kernels were unknown there
                raise CodeError(
                    f"--module {shown}: it imports relatively (`from . import ...`) from its package "
                    f"{package.name}, which would not ship with it; pass the package's folder instead: "
                    f"--module {_written(shown, package)}"
                )
        else:
            raise CodeError(f"--module {shown}: not a .py file or a package folder")
        if not name.isidentifier():
            raise CodeError(f"--module {shown}: {name!r} is not a valid module name; rename it")
        return _Source(name=name, path=path, why=f"--module {shown}")

    def _job(self, job_file: Path) -> None:
        job_file = job_file.expanduser().resolve()
        root = job_file.parent
        imports, _ = _scan(job_file)
        modules: list[str] = []
        for name in imports:
            found = _local_module(name, root)
            if found is None or self._excluded(found[0], job_file):
                continue
            path, module = found
            top = module.split(".")[0]
            source = _Source(name=top, path=path, why=f"imported by {job_file.name}")
            registers = self._registers_kernels(source, root)
            if not registers and _is_namespace(source):
                # A plain folder the job imports that registers no kernel is often the job's own
                # (a loader beside its data files): it ships only if the hosts' code imports it
                # (`_close`), so that its data never counts against the limit for nothing.
                continue
            self._add(self._common, source)
            if module not in modules and registers:
                modules.append(module)
        # `from pkg.sub import kern` names pkg.sub and pkg.sub.kern: importing the latter imports both
        for module in modules:
            if module not in self._load and not any(other.startswith(module + ".") for other in modules):
                self._load.append(module)

    def _registers_kernels(self, source: _Source, root: Path) -> bool:
        """Whether `source`, or a module of its folder that it imports (at any depth), calls
        kernel(...): then the hosts import it, so that its kernels are registered there."""
        seen: set[Path] = set()
        todo = [source]
        while todo:
            current = todo.pop()
            for file in _python_files(current):
                if file in seen:
                    continue
                seen.add(file)
                imports, registers = _scan(file)
                if registers:
                    return True
                for name in imports:
                    found = _local_module(name, root)
                    if found is not None and not self._excluded(found[0], None):
                        todo.append(_Source(name=name.split(".")[0], path=found[0], why=""))
        return False

    def _kernel_module(self, name: str) -> _Source | None:
        """The source of a `kernel_modules` name, if it resolves here outside what is installed."""
        top = name.split(".")[0]
        if top == "batuta":
            return None
        try:
            spec = importlib.machinery.PathFinder.find_spec(top, self._search)
        except (ImportError, ValueError, OSError):
            return None
        if spec is not None and spec.origin in (None, "namespace") and spec.submodule_search_locations:
            # A namespace package: folders without __init__.py, possibly several. Installed,
            # the hosts' business; the user's own ships when it is one folder. One split over
            # several folders would arrive merged into one, which is not what runs here: the
            # hosts would fail with "No module named", so say why here, where the fix is.
            roots = _installed_roots()
            locations = [Path(p) for p in spec.submodule_search_locations if not _is_installed(Path(p), roots)]
            if not locations:
                return None
            if len(locations) == 1:
                return _Source(name=top, path=locations[0], why=f"kernel_modules {name!r}")
            log.warning(
                "kernel_modules %r is not shipped: the namespace package %r here is split over several folders "
                "(%s); add an __init__.py to the one to ship, or make it importable on every host",
                name,
                top,
                ", ".join(map(str, locations)),
            )
            return None
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            return None  # not found here, or an extension module
        origin = Path(spec.origin)
        path = origin.parent if spec.submodule_search_locations is not None else origin
        if _is_installed(path, _installed_roots()):
            return None
        return _Source(name=top, path=path, why=f"kernel_modules {name!r}")

    def _excluded(self, path: Path, job_file: Path | None) -> bool:
        return path == job_file or path.name == "batuta" or _is_installed(path, _installed_roots())

    def _close(self, sources: dict[str, _Source]) -> None:
        """Add what the sources import from their own folders, until nothing new turns up."""
        todo = list(sources.values())
        local: dict[Path, frozenset[str]] = {}
        while todo:
            source = todo.pop()
            root = source.path.parent
            if root not in local:
                local[root] = _local_names(root)
            for file in _python_files(source):
                if not _mentions(file, local[root] - sources.keys()):
                    continue  # names no module of its folder that is not shipped yet: no need to parse it
                for name in _scan(file)[0]:
                    found = _local_module(name, root)
                    if found is None or self._excluded(found[0], None):
                        continue
                    top = name.split(".")[0]
                    if top in sources:
                        continue
                    added = _Source(name=top, path=found[0], why=f"imported by {file.name}")
                    self._add(sources, added)
                    todo.append(added)

    @staticmethod
    def _add(sources: dict[str, _Source], source: _Source) -> None:
        if source.name in sys.stdlib_module_names or source.name == "batuta" or source.name in HOST_PACKAGES:
            # the hosts import their own (the agent has imported many already): its kernels
            # would never register, and every task would find its kernel unknown
            if source.name == "batuta":
                whose = "as a module of batuta is"
            elif source.name in HOST_PACKAGES:
                whose = "as a package batuta runs on is"
            else:
                whose = "as a module of Python itself is"
            raise CodeError(
                f"{source.path} ({source.why}) is named {source.name!r}, {whose}, which the hosts "
                "import instead of it; rename it"
            )
        known = sources.get(source.name)
        if known is None:
            sources[source.name] = source
        elif known.path != source.path:
            raise CodeError(
                f"two different modules named {source.name!r} would ship: {known.path} ({known.why}) "
                f"and {source.path} ({source.why}); rename one of them"
            )

    # -- building

    def _build(self, sources: dict[str, _Source], load: list[str]) -> m.Code | None:
        if not sources:
            return None
        entries: list[tuple[str, Path]] = []
        for source in sources.values():
            entries.extend(_files(source))
        sizes: list[tuple[int, str]] = []
        for relative, path in entries:
            try:
                sizes.append((path.stat().st_size, relative))
            except OSError as exc:
                broken = " (a symbolic link to nothing: remove it or list it in .batutaignore)"
                why = f"{exc.strerror or exc}{broken if path.is_symlink() else ''}"
                raise CodeError(f"cannot read {path} to ship it: {why}") from None
        total = sum(size for size, _ in sizes)
        if total > self.spec.max_bytes:
            biggest = ", ".join(f"{rel} ({size / MiB:.1f} MiB)" for size, rel in sorted(sizes, reverse=True)[:3])
            raise CodeError(
                f"the code to ship to the hosts is {total / MiB:.1f} MiB, over the {self.spec.max_bytes / MiB:g} MiB "
                f"limit; the biggest files: {biggest}; list what the hosts do not need in a {IGNORE_FILE} in the "
                "package's folder, or raise the limit (max_code_mb in the cluster file's [pool], "
                "or Pool.builder().code_limit(bytes))"
            )
        files: list[m.CodeFile] = []
        for relative, path in entries:
            try:
                files.append(m.CodeFile(path=relative, data=path.read_bytes()))
            except OSError as exc:
                raise CodeError(f"cannot read {path} to ship it: {exc.strerror or exc}") from None
        modules = tuple(dict.fromkeys(load))
        bundle = m.Code(digest=m.code_digest(files, modules), modules=modules, files=tuple(files))
        code_paths.collected(bundle.digest, {relative: str(path) for relative, path in entries})
        return bundle


# -- which tasks run it -------------------------------------------------------------------


class ShippedCode:
    """The digest of what a pool ships, and which tasks' results depend on it: a job journal
    keys those tasks by it (`ResultStore`), so that after an edit they run again instead of
    resuming with results of the old code. One digest for the pool: every host's bundle's
    digest, or a sha256 over them when hosts name different `kernel_modules`."""

    def __init__(self, bundles: Iterable[m.Code | None] = ()) -> None:
        bundles = list(bundles)  # read twice below: a generator gave no sent modules, blaming the user's setup
        digests = sorted({bundle.digest for bundle in bundles if bundle is not None})
        if len(digests) > 1:
            self.digest = hashlib.sha256("\0".join(digests).encode()).hexdigest()
        else:
            self.digest = digests[0] if digests else ""
        self._installed: dict[str, bool] = {}  # module -> batuta's own or installed here
        # the top-level modules the hosts get from us: their files' first folder or name
        self._sent = {f.path.split("/", 1)[0].removesuffix(".py") for b in bundles if b is not None for f in b.files}
        self._paths = code_paths.UserPaths(bundle.digest for bundle in bundles if bundle is not None)

    def user_paths(self, stderr: bytes, host: str | None) -> bytes:
        """A failed task's `stderr` naming the user's files, not its host's copies (code_paths.py)."""
        return self._paths.stderr(stderr, host)

    def failure(self, call: KernelCall | BinaryCall, error: str | None, stderr: bytes) -> str | None:
        """A failed task's `error`, said as `unsent` does, ending with where in the user's files
        it was raised (code_paths.py), with the fix for a package installed here that its host
        lacks (missing_package.py)."""
        said = self._paths.error(self.unsent(call, error), stderr)
        return missing_package_fix(said) if said is not None else None

    def digest_for(self, call: KernelCall | BinaryCall) -> str:
        """The digest a task's result depends on: the code's for a kernel of the user's modules
        or one not registered here (only the hosts know where it comes from: assume the user's);
        none ("") for a binary, a built-in kernel and one that a module installed here registers."""
        if not self.digest or not isinstance(call, KernelCall):
            return ""
        from batuta.kernels import registry  # imported by the pool already; no numba

        module = registry.module_of(call.name) or call.name.rpartition(":")[0]  # "module:kernel" not yet loaded
        if not module:
            return self.digest
        installed = self._installed.get(module)
        if installed is None:
            installed = self._installed[module] = _installed_module(module)
        return "" if installed else self.digest

    def unsent(self, call: KernelCall | BinaryCall, error: str | None) -> str | None:
        """`error`, for a kernel a host did not know, with where it comes from here when that is
        a file of the user's this pool does not send (a script that imports its kernels from
        `mykernels.py`, a pool without `modules=`): the host cannot say, it never saw the file."""
        if error is None or not isinstance(call, KernelCall):
            return error
        name = call.name
        said = (f"unknown kernel {name!r}", f"kernel {name!r} is unknown", "cannot load kernel module")
        if not any(words in error for words in said):
            return error
        from batuta.kernels import registry

        module = registry.module_of(name) or name.rpartition(":")[0]
        if not module or module.split(".")[0] in self._sent or _installed_module(module):
            return error
        path = getattr(sys.modules.get(module), "__file__", None)
        if path is None:
            return error
        send, where = path, path
        if "." in module:
            # a module of a package ships with its package: the file alone, shipped as a
            # top-level module, fails there on the package's imports (`from . import util`)
            package = sys.modules.get(module.split(".")[0])
            send = next(iter(getattr(package, "__path__", None) or []), path)
            where = f"{path}, of the package {send}" if send != path else path
        # the cause, in place of the host's guesses (it never saw the file)
        if module == "__main__":
            return (
                f"kernel {name!r} is unknown on the hosts: here it is defined in the script being run "
                f"({path}), which they do not import; put it in a module of its own and send that with "
                "Pool.local(..., modules=[...]) or Pool.builder().modules([...])"
            )
        job_file = getattr(sys.modules.get(module), SHOWN_AS, None)
        if job_file is not None:  # a job file batuta loaded: named as the user wrote it, and Pool.local is not theirs
            also = f", or send the job file too: --module {job_file}" if Path(path).stem.isidentifier() else ""
            return (
                f"kernel {name!r} is unknown on the hosts: here it is defined in the job file {job_file}, which "
                "they do not import; move it to a module beside the job file and import that from the job "
                f"(it ships with the job){also}"
            )
        return (
            f"kernel {name!r} is unknown on the hosts: here it comes from {where}, which this pool does "
            f"not send them; pass Pool.local(..., modules=[{send!r}]) or Pool.builder().modules([...]) "
            "(batuta run: --module)"
        )


def _imports_relatively(path: Path) -> bool:
    """Whether a Python file has a relative import (`from . import x`, `from ..a import b`)."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return False
    return any(isinstance(node, ast.ImportFrom) and node.level > 0 for node in ast.walk(tree))


def _package_above(path: Path) -> Path:
    """The folder of the top-level package a module file belongs to: the highest of the
    folders above it that hold an `__init__.py`, or its own folder (a namespace package)."""
    top = path.parent
    if (top / "__init__.py").is_file():
        while (top.parent / "__init__.py").is_file():
            top = top.parent
    return top


def _written(shown: str, folder: Path) -> str:
    """`folder` as the user would write it beside `shown`: relative to here when they wrote
    a relative path."""
    return str(folder) if Path(shown).expanduser().is_absolute() else os.path.relpath(folder)


def _folder_of(shown: str, path: Path) -> str:
    """The folder of a --module file as the user would write it: relative when they did."""
    written = Path(shown).parent
    return str(path.parent) if str(written) in ("", ".") else str(written)


def _installed_module(module: str) -> bool:
    """Whether `module` is batuta's own or lives here in site-packages or the standard library
    (without importing it: a "module:kernel" name is looked up where the job would find it)."""
    if module.split(".")[0] == "batuta":
        return True
    loaded = sys.modules.get(module)
    origin = getattr(loaded, "__file__", None) if loaded is not None else None
    if origin is None:
        try:
            spec = importlib.machinery.PathFinder.find_spec(module.split(".")[0], sys.path)
        except (ImportError, ValueError, OSError):
            return False
        origin = spec.origin if spec is not None else None
    return origin is not None and _is_installed(Path(origin), _installed_roots())
