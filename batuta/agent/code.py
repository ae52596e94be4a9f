"""The user's code on a host: written under batuta's cache folder, put first on the import path,
imported by the agent and by every slot.

The coordinator sends a `Code` message (paths and bytes, no pickle) right after `Welcome`, and
again for each `Pool.ship`. `CodeLoader.store` then:

1. takes the previous bundle off `sys.path` and out of `sys.modules` and the kernel
   registry (a kernel deleted from a module must be unknown, not run from the old copy);
2. writes the files to `<cache>/code/<digest>/` (`cache_root()`: `$XDG_CACHE_HOME/batuta`, else
   `~/.cache/batuta`): into a fresh temporary folder beside it first, renamed into place in
   one step, so no agent ever imports half a bundle. A folder already there under that
   digest is reused, not rewritten, once its files are checked against the digest (one that
   does not match, corrupted or edited by hand, is replaced).

The agent answers `CodeStored` there (a few milliseconds: `ship` waits for that, not for the
compile), and at once, before it handles another message, `CodeLoader.import_stored` (on a
thread, so that its heartbeats go on through a long import):

3. puts the folder first on `sys.path` and imports the bundle's modules, in order, through
   `BundleLoader` (compiled once per host, see "Bytecode" below). A module that fails is
   recorded with one line saying why ("SyntaxError: invalid syntax (at mymod.py line 3)"),
   and never takes the agent down: tasks of its kernels fail with that line, the
   others run. The agent answers `CodeLoaded` with those lines, then replaces its slots;
4. prunes old bundles, keeping the `KEEP_BUNDLES` most recently used, and any that an agent
   on the host runs now: the agent holds a shared flock on its bundle's folder while that
   bundle is its own (a forked slot closes the fds it inherits; the agent outlives its
   slots), and pruning removes a folder only under an exclusive one, so another run's
   prune never takes the files from under a long job's tasks.

Source only crosses the wire, and the host compiles it itself: the coordinator's bytecode
is never trusted (nor usable: a host may run another Python minor).

Bytecode. Compiling is most of loading a bundle: 200 KB of source is 100-170 ms of CPU, and
an exec'd slot would pay it again, and every host again after an edit of one file. So the
bundle's modules are imported through `BundleLoader`, which keeps their bytecode beside them
as PEP 552 *checked-hash* pycs (the interpreter's own format: the source's hash is in the
header and compared with the file's on every load, so a pyc never stands for other source).
It writes them whatever `sys.dont_write_bytecode` says (the folder is batuta's cache, not the
user's tree), and before compiling a module it looks for a pyc of the same source in the
bundles kept beside (same path in the bundle, same source hash): after an edit only the
edited files compile again, in a new agent as in a running one.

Slots see the result as a `SlotCode`: forked ones inherit the agent's imports, exec'd ones
get the folder and module names on their command line and import them themselves. Every
task names the digest it must run with; a slot with another digest refuses it (`slot.py`).
"""

from __future__ import annotations

import _imp
import contextlib
import fcntl
import hashlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import marshal
import os
import shutil
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from batuta.agent.execute import one_line
from batuta.errors import write_fix
from batuta.protocol.messages import Code, TaskRequest

CODE_FOLDER = "code"  # under the cache root: one folder per digest
KEEP_BUNDLES = 8  # most recently used bundles kept on a host
TEMP_PREFIX = ".tmp-"  # bundles being written (and what an agent killed mid-write left)
STALE_TEMP_S = 3600.0  # a temporary folder this old is left over from a dead agent
CHECKED_HASH_PYC = 0b11  # PEP 552 flags: hash-based, checked against the source on every load


def cache_root(environ: Mapping[str, str] | None = None) -> Path:
    """batuta's cache folder on this host: `$XDG_CACHE_HOME/batuta`, else `~/.cache/batuta`
    (the XDG base directory rule: a relative XDG_CACHE_HOME is ignored)."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_CACHE_HOME", "")
    if not base or not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "batuta"


def cache_write_fix(exc: OSError) -> str:
    """What to do about a write under the cache folder that failed with `exc` (`write_fix`),
    ending with the way around it."""
    return write_fix(
        exc, runner="the host's agent", elsewhere="set XDG_CACHE_HOME in the host's env to a folder with room"
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class SlotCode:
    """The user's code as a slot runs it: every task it takes must name `digest`.

    `directory` is the bundle's folder (None when nothing was shipped, or it could not be
    written: `unwritten`), `modules` what to import, `errors` why a module failed in the agent (module ->
    one line), `host` the name the agent reports, for error messages."""

    digest: str = ""
    directory: str | None = None
    modules: tuple[str, ...] = ()
    errors: Mapping[str, str] = field(default_factory=dict)
    host: str = ""

    @property
    def unwritten(self) -> bool:
        """Code was shipped and this host could not write it: its kernels' tasks are refused
        as the host's failure ("unfit"), to run on another host."""
        return self.directory is None and bool(self.modules)

    def arguments(self) -> list[str]:
        """This as the command line of an exec'd slot (`slot.py` reads it back). The agent's
        import errors are left out: the slot meets them again when it imports. Why the code
        could not be written is not: without it the slot imported the modules from nowhere and
        said "No module named ...", naming neither the cache folder nor the fix."""
        argv = ["--code-digest", self.digest, "--host", self.host]
        if self.directory is not None:
            argv += ["--code-dir", self.directory]
        elif self.unwritten:
            argv += ["--code-unwritten", next(iter(self.errors.values()), "the code could not be written")]
        for module in self.modules:
            argv += ["--code-module", module]
        return argv


def module_source_digest(name: str, search_path: list[str] | None = None) -> str:
    """sha256 of the source of module `name` as `search_path` (default: `sys.path`) finds it,
    without importing anything: for a dotted name, of its whole top-level package, as the
    coordinator ships one. Hashed: the `.py` files (outside `__pycache__` and dot folders),
    each as its path relative to the module's folder and the sha256 of its bytes, sorted.
    "" when no source is found (not there, built in, or compiled only). The agent reports it
    for each `--kernel-module` in its Hello, and `batuta stack` computes the coordinator's own
    with this same function, so the two compare."""
    top = name.split(".")[0]
    try:
        spec = importlib.machinery.PathFinder.find_spec(top, search_path)
    except (ImportError, ValueError, OSError):
        return ""
    if spec is None:
        return ""
    files: list[tuple[str, Path]] = []
    if spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            root = Path(location)
            for folder, dirnames, filenames in os.walk(root):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
                for filename in filenames:
                    if filename.endswith(".py") and not filename.startswith("."):
                        path = Path(folder) / filename
                        files.append((path.relative_to(root).as_posix(), path))
    elif spec.origin and spec.origin.endswith(".py"):
        files.append((os.path.basename(spec.origin), Path(spec.origin)))
    if not files:
        return ""
    outer = hashlib.sha256(b"batuta-module-1\0")
    try:
        for relative, path in sorted(files):
            outer.update(
                relative.encode("utf-8", "surrogateescape") + b"\0" + hashlib.sha256(path.read_bytes()).digest()
            )
    except OSError:
        return ""
    return outer.hexdigest()


def short_digest(digest: str) -> str:
    """A digest as people read it: its first 12 hex digits ("none" when no code was shipped)."""
    return digest[:12] if digest else "none"


def stale_error(request: TaskRequest, code: SlotCode, holder: str) -> str:
    """Why a task that names other code than `code` is not run; `holder` says who has `code`
    ("host gpu1 now has", "slot 2 on host gpu1 has")."""
    return (
        f"task {request.task_id} must run with code {short_digest(request.code)}, but {holder} code "
        f"{short_digest(code.digest)}: not run, so that no task runs stale code"
    )


def install(code: Code, root: Path) -> Path:
    """The folder holding `code`'s files under `root`, written now or reused. Raises OSError."""
    base = root / CODE_FOLDER
    final = base / code.digest
    if final.is_dir():
        if _holds(final, code):
            with contextlib.suppress(OSError):
                os.utime(final)  # recently used: the last one pruning removes
            return final
        _remove(final, base)  # not what the digest says: write it again
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    temp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{code.digest[:16]}-", dir=base))
    try:
        for entry in code.files:
            target = temp.joinpath(*entry.path.split("/"))  # the codec allows no '..', no absolute path
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "xb") as out:  # "x": nothing there is overwritten
                out.write(entry.data)
        try:
            os.rename(temp, final)
        except OSError:
            if final.is_dir() and _holds(final, code):  # another agent on this host wrote it first
                shutil.rmtree(temp, ignore_errors=True)
                return final
            raise
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return final


def _holds(folder: Path, code: Code) -> bool:
    """Whether `folder` has `code`'s files with their bytes (the codec checked that those
    give the digest; other files, such as the __pycache__ that imports write, do not matter)."""
    for entry in code.files:
        path = folder.joinpath(*entry.path.split("/"))
        try:
            if path.is_symlink() or not path.is_file() or path.stat().st_size != len(entry.data):
                return False
            if path.read_bytes() != entry.data:
                return False
        except OSError:
            return False
    return True


def _remove(folder: Path, base: Path) -> None:
    """Move a folder aside (one rename, so no agent sees it half gone), then delete it."""
    aside = base / f"{TEMP_PREFIX}old-{folder.name[:16]}-{os.getpid()}-{time.monotonic_ns()}"
    try:
        os.rename(folder, aside)
    except OSError:
        aside = folder
    shutil.rmtree(aside, ignore_errors=True)


def prune(root: Path, keep: int = KEEP_BUNDLES, *, now: float | None = None) -> list[str]:
    """Remove all but the `keep` most recently used bundles, and temporary folders left by
    agents that died writing one; returns the names removed."""
    base = root / CODE_FOLDER
    try:
        entries = list(os.scandir(base))
    except OSError:
        return []
    now = time.time() if now is None else now
    bundles: list[tuple[float, str]] = []
    removed: list[str] = []
    for entry in entries:
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            mtime = entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if entry.name.startswith(TEMP_PREFIX):
            if now - mtime > STALE_TEMP_S:
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(entry.name)
        elif not entry.name.startswith("."):
            bundles.append((mtime, entry.name))
    bundles.sort(reverse=True)
    for _, name in bundles[keep:]:
        if _remove_unused(base / name, base):
            removed.append(name)
    return removed


def _remove_unused(folder: Path, base: Path) -> bool:
    """Remove `folder` unless an agent runs it (holds it, `hold`); whether it was removed. The
    exclusive lock is held across the rename, so no agent starts on it meanwhile."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # in use
        except OSError:
            pass  # a file system without locks: pruned as before they were used
        aside = base / f"{TEMP_PREFIX}old-{folder.name[:16]}-{os.getpid()}-{time.monotonic_ns()}"
        try:
            os.rename(folder, aside)
        except OSError:
            return False
    finally:
        os.close(fd)
    shutil.rmtree(aside, ignore_errors=True)
    return True


def hold(folder: Path) -> int | None:
    """A shared lock on a bundle's folder for as long as the returned fd is open (the agent
    keeps it while the bundle is its own): `prune` leaves it alone. None when the folder was pruned before it
    was locked (install it again), or the file system has no locks (then it is not held)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # a prune holds its exclusive lock for one rename only
        if os.stat(folder).st_ino == os.fstat(fd).st_ino:  # not renamed aside meanwhile
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def contest_clash(exc: BaseException) -> None:
    """A shipped module failed to import because another module registered one of its kernel
    names: that name runs neither (`registry.contest`), rather than whichever came first."""
    clash = getattr(exc, "clash", None)
    registry = sys.modules.get("batuta.kernels.registry")
    if clash is not None and registry is not None:
        registry.contest(*clash)


def describe_import_failure(exc: BaseException, directory: str | None) -> str:
    """One line saying why a module of the bundle failed to import, ending with the user's file
    and line (relative to the bundle) where there is one, as numba's errors do (the coordinator
    puts the user's own path there: runtime/code_paths.py):

        SyntaxError: invalid syntax (at mymod.py line 3)
        ModuleNotFoundError: No module named 'scipy' (install 'scipy' for this host's Python
            (/usr/bin/python3), or ship it with --module) (at mymod.py line 2)
    """
    name = type(exc).__name__
    if isinstance(exc, SyntaxError):
        where = _where(exc.filename, exc.lineno, directory)
        return one_line(f"{name}: {exc.msg}{where}")
    where = ""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        where = _where(frame.filename, frame.lineno, directory)
        if where:
            break
    message = str(exc) or name
    hint = ""
    if isinstance(exc, ModuleNotFoundError) and exc.name and not _in_bundle(exc.name, directory):
        # the coordinator, which can tell a third-party package from the user's own, keeps one
        # of the fixes (runtime/missing_package.py)
        python = f" ({sys.executable})" if sys.executable else ""
        hint = f" (install {exc.name.split('.')[0]!r} for this host's Python{python}, or ship it with --module)"
    return one_line(f"{name}: {message}{hint}{where}")


def _where(filename: str | None, lineno: int | None, directory: str | None) -> str:
    """' (at mymod.py line 3)' for a file of the bundle, '' for any other."""
    if not filename or not directory:
        return ""
    prefix = directory.rstrip(os.sep) + os.sep
    if not filename.startswith(prefix):
        return ""
    relative = filename[len(prefix) :]
    return f" (at {relative} line {lineno})" if lineno else f" (at {relative})"


def _loaded_from(module: object, prefix: str) -> bool:
    """Whether `module` came from the folder `prefix`: its file is there, or, for a namespace
    package (no file), every folder of its path is."""
    file = getattr(module, "__file__", None)
    if file:
        return str(file).startswith(prefix)
    spec = getattr(module, "__spec__", None)
    locations = list(getattr(spec, "submodule_search_locations", None) or ())
    return bool(locations) and all(str(location).startswith(prefix) for location in locations)


def _in_bundle(module: str, directory: str | None) -> bool:
    if not directory:
        return False
    top = Path(directory) / module.split(".")[0]
    return top.with_suffix(".py").is_file() or top.is_dir()  # a package, or a namespace package


# -- bytecode ------------------------------------------------------------------------------


class BundleLoader(importlib.machinery.SourceFileLoader):
    """Imports a module of a bundle from its checked-hash pyc, written here or found in an
    earlier bundle, compiling the source only when neither is there (module docstring)."""

    def get_code(self, fullname: str) -> types.CodeType:
        source_path = self.get_filename(fullname)
        source = self.get_data(source_path)
        key = importlib.util.source_hash(source)
        own = importlib.util.cache_from_source(source_path)
        found = _read_pyc(own, key)
        if found is None:
            for earlier in _earlier_pycs(source_path):
                found = _read_pyc(earlier, key)
                if found is not None:
                    _write_pyc(own, found[1], linked=earlier)  # as it is: the file name is set on each load
                    break
        if found is None:
            code = self.source_to_code(source, source_path)
            _write_pyc(own, _pyc_header(key) + marshal.dumps(code))
            return code
        code = found[0]
        # what the interpreter's own loader does with every pyc: the code names this file (its
        # tracebacks and import errors), not the bundle the pyc was compiled in
        _imp._fix_co_filename(code, source_path)  # type: ignore[attr-defined]  # typeshed's _imp stub lacks it
        return code


def _pyc_header(key: bytes) -> bytes:
    return importlib.util.MAGIC_NUMBER + CHECKED_HASH_PYC.to_bytes(4, "little") + key


def _read_pyc(path: str, key: bytes) -> tuple[types.CodeType, bytes] | None:
    """The code in a checked-hash pyc at `path` whose source hash is `key`, and the file's
    bytes; None if there is none."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError:
        return None
    if len(data) < 16 or data[:16] != _pyc_header(key):
        return None
    try:
        code = marshal.loads(memoryview(data)[16:])
    except (EOFError, ValueError, TypeError):
        return None
    return (code, data) if isinstance(code, types.CodeType) else None


def _write_pyc(path: str, data: bytes, *, linked: str | None = None) -> None:
    """Write a pyc (`data`, or a hard link to `linked`, the same bytes: nothing to copy) in one
    rename (two agents of a host may share the cache); a cache that cannot be written only
    costs a compile next time."""
    temp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        if not (linked is not None and _linked(linked, temp)):
            with open(temp, "wb") as file:
                file.write(data)
        os.replace(temp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temp)


def _linked(source: str, target: str) -> bool:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed there: the caller writes a copy
        return False
    return True


def _earlier_pycs(source_path: str) -> list[str]:
    """Where the pyc of `source_path` (`<base>/<digest>/<path in bundle>`) would be in the
    other bundles under `<base>`, most recently used first."""
    bundle, relative = _bundle_and_path(source_path)
    if bundle is None:
        return []
    base = os.path.dirname(bundle)
    try:
        entries = [entry for entry in os.scandir(base) if not entry.name.startswith(".") and entry.path != bundle]
        entries.sort(key=lambda entry: entry.stat().st_mtime, reverse=True)
    except OSError:
        return []
    return [importlib.util.cache_from_source(os.path.join(entry.path, relative)) for entry in entries[:KEEP_BUNDLES]]


def _bundle_and_path(source_path: str) -> tuple[str | None, str]:
    """(`<base>/<digest>`, the path in the bundle) of a file under a bundle folder."""
    parts = source_path.split(os.sep)
    for index in range(len(parts) - 2, 0, -1):
        if parts[index - 1] == CODE_FOLDER and len(parts[index]) == 64:  # <cache>/code/<sha256 hex>/...
            return os.sep.join(parts[: index + 1]), os.sep.join(parts[index + 1 :])
    return None, ""


_HOOKED: set[str] = set()  # the bundle folders' bases whose path hook this process has


def use_bundle(directory: str) -> None:
    """Put a bundle's folder first on the import path, its modules loaded by `BundleLoader`."""
    base = os.path.dirname(directory.rstrip(os.sep))
    if base not in _HOOKED:
        _HOOKED.add(base)
        sys.path_hooks.insert(0, _bundle_path_hook(base))
    sys.path_importer_cache.pop(directory, None)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    importlib.invalidate_caches()


def _bundle_path_hook(base: str) -> Callable[[str], importlib.machinery.FileFinder]:
    prefix = base.rstrip(os.sep) + os.sep
    loaders: list[tuple[type[importlib.abc.Loader], list[str]]] = [
        (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES),
        (BundleLoader, importlib.machinery.SOURCE_SUFFIXES),
        (importlib.machinery.SourcelessFileLoader, importlib.machinery.BYTECODE_SUFFIXES),
    ]

    def hook(path: str) -> importlib.machinery.FileFinder:
        if not path.startswith(prefix):
            raise ImportError("not a folder of batuta's code cache")  # the next hook takes it
        return importlib.machinery.FileFinder(path, *loaders)

    return hook


class CodeLoader:
    """The agent's side of the user's code: which bundle it runs, and its import state."""

    def __init__(self, host: str, root: Path | None = None) -> None:
        self.host = host
        self.root = cache_root() if root is None else root
        self.current = SlotCode(host=host)
        self._to_import = False  # `store` wrote a bundle that `import_stored` has not imported yet
        self._held: int | None = None  # the lock on the current bundle's folder (`hold`)

    def load(self, code: Code) -> SlotCode:
        """Install `code` and import its modules here (`store`, then `import_stored`); returns
        what the slots must run with."""
        self.store(code)
        return self.import_stored()

    def store(self, code: Code) -> None:
        """The first half of taking `code`: write its files under the cache (or find them there)
        and forget the previous bundle. Cheap next to `import_stored`, which must follow before
        any task runs: the agent answers in between, so that the coordinator does not wait for
        the compile. Never raises for the user's faults: files that cannot be written are
        recorded in `errors`, for every module."""
        if code.digest == self.current.digest:
            return
        self._unload()
        try:
            folder = install(code, self.root)
            self._held = hold(folder)
            if self._held is None and not folder.is_dir():  # another run's prune took it just now
                folder = install(code, self.root)
                self._held = hold(folder)
        except OSError as exc:
            why = one_line(
                f"cannot write the code under {self.root / CODE_FOLDER}: {type(exc).__name__}: {exc}; "
                f"{cache_write_fix(exc)}"
            )
            self.current = SlotCode(
                digest=code.digest, modules=code.modules, errors=dict.fromkeys(code.modules, why), host=self.host
            )
            return
        self.current = SlotCode(digest=code.digest, directory=str(folder), modules=code.modules, host=self.host)
        self._to_import = True

    @property
    def import_pending(self) -> bool:
        """Whether `store` wrote a bundle that `import_stored` has yet to import."""
        return self._to_import and self.current.directory is not None

    def import_stored(self) -> SlotCode:
        """The second half: import the stored bundle's modules here (compiling what no pyc
        holds), each failure recorded in `errors` with one line, never raised; returns what the
        slots must run with. Does nothing when nothing new was stored."""
        if not self._to_import or self.current.directory is None:
            return self.current
        self._to_import = False
        directory = self.current.directory
        use_bundle(directory)
        errors: dict[str, str] = {}
        for module in self.current.modules:
            try:
                importlib.import_module(module)
            except (Exception, SystemExit) as exc:  # the user's module must not end the agent
                errors[module] = describe_import_failure(exc, directory)
                contest_clash(exc)
        self.current = replace(self.current, errors=errors)
        prune(self.root)
        return self.current

    def _unload(self) -> None:
        """Forget the current bundle: off the import path, out of the module table, and its
        kernels out of the registry."""
        if self._held is not None:  # another run may prune it now (its slots are being replaced)
            os.close(self._held)
            self._held = None
        directory = self.current.directory
        if directory is None:
            return
        prefix = directory.rstrip(os.sep) + os.sep
        # before the folder leaves sys.path: a namespace package's path is recomputed from it
        gone = [name for name, module in list(sys.modules.items()) if _loaded_from(module, prefix)]
        with contextlib.suppress(ValueError):
            sys.path.remove(directory)
        for name in gone:
            del sys.modules[name]
        registry = sys.modules.get("batuta.kernels.registry")
        if registry is not None:
            registry.forget_modules(gone)
        importlib.invalidate_caches()
        self.current = SlotCode(host=self.host)
        self._to_import = False
