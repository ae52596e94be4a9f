"""The coordinator's side of `batuta cluster install`: what a host must install, as wheels.

- `batuta_wheel`: this exact batuta as a wheel, built once per version and source digest.
  From a source tree (the repo an editable install runs from) it is `pip wheel --no-deps`;
  from an installed distribution it is repacked from the installed files (`repack_installed`).
- `pip_wheel`: the coordinator's own pip, repacked. A host runs pip from it
  (`python pip-X.whl/pip install ...`, which pip supports), so its Python needs no pip and no
  `ensurepip` (Debian ships those apart, as python3-venv).
- `runtime_pins`: every distribution batuta needs at run time, with the versions this
  coordinator runs, as `name==version`: a host gets the same numpy, numba, msgpack... as here.
- `wheelhouse`: those pins downloaded as binary wheels for one Python minor and platform
  (`pip download --only-binary=:all: --python-version X.Y --platform ...`), once per
  (batuta version, pins, Python, platform): the offline path, for hosts that cannot reach
  the package index.

Everything lands under the coordinator's cache folder (`$XDG_CACHE_HOME/batuta`, else
`~/.cache/batuta`) and is made in a temporary folder beside its final place and renamed into
it, so an interrupted build leaves nothing that looks finished.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import csv
import hashlib
import importlib.metadata as metadata
import io
import os
import re
import shutil
import signal
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import batuta._version
from batuta._version import __version__
from batuta.errors import InstallError
from batuta.transport.base import signal_process

PIP_TIMEOUT_S = 900.0  # one pip run on the coordinator (a wheelhouse download is ~100 MB)
SOURCE_SUFFIXES = (".py", ".tcss")  # what the package is made of (docs left out: editing them changes nothing)
SOURCE_FOLDERS = ("batuta", "tui", "kernels")  # pyproject.toml's package-dir
MIN_GLIBC_MINOR = {"x86_64": 5, "i686": 5}  # manylinux1 is glibc 2.5; other arches start at 2.17
LEGACY_MANYLINUX = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}


def cache_dir() -> Path:
    """The coordinator's cache folder for batuta: `$XDG_CACHE_HOME/batuta` or `~/.cache/batuta`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "batuta"


def normalized(name: str) -> str:
    """A distribution name as the package index compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


# -- what to install ------------------------------------------------------------------------


def runtime_pins(root: str = "batuta") -> tuple[str, ...]:
    """Every distribution `root` needs at run time (extras it asks for included), as
    `name==version` with the versions installed here, sorted; `root` itself left out."""
    from packaging.requirements import InvalidRequirement, Requirement  # only when installing

    versions: dict[str, str] = {}
    todo: list[tuple[str, frozenset[str]]] = [(root, frozenset())]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        key = (normalized(name), extras)
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise InstallError(
                f"{name} is needed by batuta but not installed on the coordinator; reinstall batuta here first"
            ) from None
        versions[normalized(dist.metadata["Name"])] = dist.version
        for text in dist.requires or []:
            try:
                requirement = Requirement(text)
            except InvalidRequirement:
                continue
            marker = requirement.marker
            if marker is not None and not any(marker.evaluate({"extra": e}) for e in (*extras, "")):
                continue
            todo.append((requirement.name, frozenset(requirement.extras)))
    versions.pop(normalized(root), None)
    return tuple(f"{name}=={version}" for name, version in sorted(versions.items()))


def digest_of(parts: Iterable[bytes]) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(len(part).to_bytes(8, "big"))
        hasher.update(part)
    return hasher.hexdigest()


def source_tree() -> Path | None:
    """The source tree this batuta runs from (an editable install, or the repo on sys.path),
    or None when it runs from an installed distribution."""
    root = Path(batuta._version.__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    try:
        text = pyproject.read_text(encoding="utf-8")
    except OSError:
        return None
    return root if re.search(r'^name\s*=\s*"batuta"', text, re.MULTILINE) else None


def source_digest() -> str:
    """A digest of what makes this batuta: its source files, or its installed RECORD."""
    root = source_tree()
    if root is None:
        dist = metadata.distribution("batuta")
        record = dist.read_text("RECORD") or ""
        return digest_of([dist.version.encode(), record.encode()])
    files = [root / "pyproject.toml"]
    for folder in SOURCE_FOLDERS:
        files += sorted(
            p
            for p in (root / folder).rglob("*")
            if p.is_file() and p.suffix in SOURCE_SUFFIXES and "__pycache__" not in p.parts
        )
    parts: list[bytes] = []
    for path in files:
        with contextlib.suppress(OSError):
            parts += [str(path.relative_to(root)).encode(), path.read_bytes()]
    return digest_of(parts)


@dataclass(frozen=True, slots=True, kw_only=True)
class Release:
    """What every host gets: this batuta (version and source digest) and its pinned deps."""

    version: str
    digest: str  # of batuta's source (see `source_digest`)
    pins: tuple[str, ...]

    @property
    def pins_digest(self) -> str:
        return digest_of(p.encode() for p in self.pins)[:12]

    @property
    def label(self) -> str:
        return f"{self.version}+{self.digest[:12]}"


def current_release() -> Release:
    return Release(version=__version__, digest=source_digest(), pins=runtime_pins())


# -- building -------------------------------------------------------------------------------


async def run_pip(args: list[str], *, what: str, timeout: float = PIP_TIMEOUT_S) -> str:
    """`python -m pip ARGS` with the coordinator's own Python; its output, or InstallError
    with the end of it."""
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pip",
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
        )
    except OSError as exc:
        raise InstallError(f"{what}: cannot run {sys.executable} -m pip: {exc}") from None
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        signal_process(process, signal.SIGKILL)
        await process.wait()
        raise InstallError(f"{what}: pip ran past {timeout:g}s on the coordinator; stopped") from None
    except asyncio.CancelledError:
        signal_process(process, signal.SIGKILL)
        raise
    text = output.decode("utf-8", "replace")
    if process.returncode != 0:
        raise InstallError(f"{what} failed on the coordinator: {last_lines(text)}")
    return text


def last_lines(text: str, count: int = 3) -> str:
    """The last meaningful lines of a tool's output, joined into one line."""
    lines = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.startswith("WARNING: Location") and "[notice]" not in line
    ]
    return " | ".join(lines[-count:]) or "(no output)"


@contextlib.contextmanager
def building(final: Path) -> Iterator[Path]:
    """A fresh temporary folder beside `final`, renamed to `final` when the block succeeds
    (another process that finished first wins; ours is then dropped)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield scratch
        try:
            scratch.rename(final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


async def batuta_wheel(release: Release, root: Path | None = None) -> Path:
    """This batuta as a wheel, under the cache folder; built if not there yet."""
    folder = (root or cache_dir()) / "wheels" / f"batuta-{release.version}-{release.digest[:16]}"
    found = sorted(folder.glob("batuta-*.whl")) if folder.is_dir() else []
    if found:
        return found[0]
    tree = source_tree()
    with building(folder) as scratch:
        if tree is None:
            repack_installed("batuta", scratch)
        else:
            args = ["wheel", "--no-deps", "--wheel-dir", str(scratch), str(tree)]
            if _has_build_backend():
                args.insert(1, "--no-build-isolation")  # builds offline, with the setuptools here
            await run_pip(args, what=f"building batuta's wheel from {tree}")
    found = sorted(folder.glob("batuta-*.whl"))
    if not found:
        raise InstallError(f"building batuta's wheel left no wheel in {folder}")
    return found[0]


def _has_build_backend() -> bool:
    try:
        metadata.distribution("setuptools")
        metadata.distribution("wheel")
    except metadata.PackageNotFoundError:
        return False
    return True


def pip_wheel(root: Path | None = None) -> Path:
    """The coordinator's pip, repacked as a wheel once per pip version."""
    try:
        version = metadata.version("pip")
    except metadata.PackageNotFoundError:
        raise InstallError(
            f"the coordinator's Python ({sys.executable}) has no pip; add it with `{sys.executable} -m ensurepip`"
        ) from None
    folder = (root or cache_dir()) / "wheels" / f"pip-{version}"
    found = sorted(folder.glob("pip-*.whl")) if folder.is_dir() else []
    if found:
        return found[0]
    with building(folder) as scratch:
        repack_installed("pip", scratch)
    return sorted(folder.glob("pip-*.whl"))[0]


def repack_installed(name: str, folder: Path) -> Path:
    """A pure-Python distribution installed here, packed again as a `py3-none-any` wheel in
    `folder`: its files from RECORD (compiled files and scripts left out; pip makes scripts
    from entry_points.txt), its metadata, a new WHEEL and RECORD."""
    dist = metadata.distribution(name)
    dist_name = re.sub(r"[-_.]+", "_", dist.metadata["Name"])
    info = f"{dist_name}-{dist.version}.dist-info"
    wheel_path = folder / f"{dist_name}-{dist.version}-py3-none-any.whl"
    skip_info = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json", "WHEEL"}
    records: list[tuple[str, str, str]] = []
    with zipfile.ZipFile(wheel_path, "w", zipfile.ZIP_DEFLATED) as wheel:

        def add(arcname: str, data: bytes) -> None:
            wheel.writestr(arcname, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            records.append((arcname, f"sha256={digest}", str(len(data))))

        for file in dist.files or []:
            parts = file.parts
            if not parts or parts[0] == ".." or "__pycache__" in parts or file.suffix == ".pyc":
                continue
            if parts[0].endswith(".dist-info"):
                if parts[-1] in skip_info:
                    continue
                arcname = "/".join((info, *parts[1:]))
            else:
                arcname = "/".join(parts)
            source = Path(str(dist.locate_file(file)))
            if source.is_file():
                add(arcname, source.read_bytes())
        if f"{info}/METADATA" not in {r[0] for r in records}:
            raise InstallError(f"cannot repack {name} {dist.version}: its installed files list no METADATA")
        add(
            f"{info}/WHEEL",
            b"Wheel-Version: 1.0\nGenerator: batuta (repacked)\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerows(records)
        writer.writerow((f"{info}/RECORD", "", ""))
        wheel.writestr(f"{info}/RECORD", out.getvalue())
    return wheel_path


def manylinux_platforms(glibc: str, machine: str) -> list[str]:
    """The manylinux platform tags a host with this glibc ("2.36") and machine ("x86_64")
    accepts, newest first: what `pip download --platform` needs, one tag at a time."""
    match = re.fullmatch(r"2\.(\d+)", glibc.strip())
    if match is None:
        raise InstallError(f"glibc {glibc!r}: not a version like 2.36")
    newest = int(match[1])
    oldest = MIN_GLIBC_MINOR.get(machine, 17)
    tags: list[str] = []
    for minor in range(newest, oldest - 1, -1):
        tags.append(f"manylinux_2_{minor}_{machine}")
        if minor in LEGACY_MANYLINUX and (minor == 17 or machine in MIN_GLIBC_MINOR):
            tags.append(f"{LEGACY_MANYLINUX[minor]}_{machine}")
    return tags


async def wheelhouse(release: Release, python_minor: str, glibc: str, machine: str, root: Path | None = None) -> Path:
    """Binary wheels of `release.pins` for CPython `python_minor` ("3.12") on glibc Linux,
    downloaded once into the cache folder. Needs the package index on the coordinator."""
    platforms = manylinux_platforms(glibc, machine)
    abi = "cp" + python_minor.replace(".", "")
    key = f"{release.version}-{release.pins_digest}-{abi}-{platforms[0]}"
    folder = (root or cache_dir()) / "wheelhouse" / key
    if (folder / ".complete").is_file():
        return folder
    args = ["download", "--only-binary=:all:", "--python-version", python_minor, "--implementation", "cp"]
    args += ["--abi", abi]
    for tag in platforms:
        args += ["--platform", tag]
    with building(folder) as scratch:
        await run_pip(
            [*args, "--dest", str(scratch), *release.pins],
            what=f"downloading wheels for Python {python_minor} on {platforms[0]} (the offline wheelhouse)",
        )
        (scratch / ".complete").write_text(" ".join(release.pins) + "\n", encoding="utf-8")
    return folder


def wheel_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.whl"))
