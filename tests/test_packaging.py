"""The wheel claims only `batuta`: tui/ and kernels/ install as `batuta.tui` and `batuta.kernels`.

DESIGN.md's packaging decision, checked the way a user meets it: build a wheel and look inside;
install it, and separately an editable install, into fresh venvs and import from a folder
that is not the checkout (so the repo root is not on `sys.path`).

No downloads where the outer venv has the build requirements: the build runs without
isolation, and each fresh venv sees the outer venv's packages through a `.pth` file (a venv
made with `--system-site-packages` from inside a venv would see the base interpreter's
packages instead, not the dependencies installed here). Where the build requirements are
missing (a venv whose setuptools predates PEP 660 or lacks `wheel`), pip builds in an isolated
environment and downloads them, as a plain `pip install` would.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

pytestmark = pytest.mark.slow

PIP_TIMEOUT_S = 180
# (folder in the repo, where it lands in the wheel)
PACKAGE_ROOTS = (("batuta", "batuta"), ("tui", "batuta/tui"), ("kernels", "batuta/kernels"))
NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    ".whl",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    ".hypothesis",
    "bench",
    "screenshots",
)

IMPORT_CHECK = """
import importlib, sys
import batuta, batuta.kernels, batuta.tui
for name in ("kernels", "tui"):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        continue
    sys.exit(f"import {name} worked; the install must not claim the top-level name {name!r}")
print(batuta.__file__)
"""


def _run(cmd: list[str], cwd: Path, timeout: float = PIP_TIMEOUT_S) -> str:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, (
        f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    )
    return done.stdout


def _build_requirements_met(pyproject: Path) -> bool:
    """True when this interpreter has everything `[build-system].requires` asks for."""
    requires = tomllib.loads(pyproject.read_text())["build-system"]["requires"]
    for text in requires:
        requirement = Requirement(text)
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            return False
        if not requirement.specifier.contains(installed, prereleases=True):
            return False
    return True


def _isolation_flags(source: Path) -> list[str]:
    return ["--no-build-isolation"] if _build_requirements_met(source / "pyproject.toml") else []


@pytest.fixture(scope="module")
def source(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the checkout, so builds leave no build/ or egg-info in the real one."""
    copy = tmp_path_factory.mktemp("src") / "batuta-src"
    shutil.copytree(repo_root, copy, ignore=NOT_SOURCE)
    return copy


@pytest.fixture(scope="module")
def wheel(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", *_isolation_flags(source), "-w", str(out), "."]
    _run(pip, cwd=source)
    (built,) = out.glob("batuta-*.whl")
    return built


def _fresh_venv(where: Path) -> Path:
    """A venv without pip of its own that sees the outer venv's packages (pip included)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=60)
    python = where / "bin" / "python"
    inner_site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=where)
    outer_sites = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(inner_site.strip(), "_outer_venv.pth").write_text("\n".join(sorted(outer_sites)) + "\n")
    return python


def test_wheel_holds_only_the_batuta_package(wheel: Path, source: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {name.split("/")[0] for name in names if ".dist-info/" not in name}
    assert tops == {"batuta"}, f"the wheel claims top-level names {sorted(tops - {'batuta'})}"
    assert "batuta/tui/__init__.py" in names
    assert "batuta/kernels/__init__.py" in names
    top_level = next((n for n in names if n.endswith(".dist-info/top_level.txt")), None)
    if top_level is not None:
        assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["batuta"]
    for folder, installed in PACKAGE_ROOTS:
        for path in (source / folder).rglob("*"):
            if path.suffix not in (".py", ".tcss") or "__pycache__" in path.parts:
                continue
            expected = f"{installed}/{path.relative_to(source / folder).as_posix()}"
            # A file missing here usually means a package missing from pyproject's `packages`.
            assert expected in names, f"{folder}/{path.relative_to(source / folder)} is not in the wheel as {expected}"


def test_wheel_install_imports_batuta_namespace_only(wheel: Path, tmp_path: Path) -> None:
    python = _fresh_venv(tmp_path / "venv")
    pip = [str(python), "-m", "pip", "install", "--no-deps", "--ignore-installed", "--no-index", str(wheel)]
    _run(pip, cwd=tmp_path)
    _check_installed(python, tmp_path, expected_root=tmp_path / "venv")


def test_editable_install_imports_batuta_namespace_only(source: Path, tmp_path: Path) -> None:
    python = _fresh_venv(tmp_path / "venv")
    flags = _isolation_flags(source)
    pip = [str(python), "-m", "pip", "install", "--no-deps", "--ignore-installed", *flags, "-e", str(source)]
    _run(pip, cwd=tmp_path)
    _check_installed(python, tmp_path, expected_root=source)


def _check_installed(python: Path, cwd: Path, *, expected_root: Path) -> None:
    """Imports work from a folder outside the checkout; the console script answers --version."""
    elsewhere = cwd / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [str(python), "-c", IMPORT_CHECK], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr + done.stdout
    assert Path(done.stdout.strip()).is_relative_to(expected_root), f"batuta came from {done.stdout.strip()}"
    script = python.parent / "batuta"
    done = subprocess.run(
        [str(script), "--version"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("batuta "), done.stdout
