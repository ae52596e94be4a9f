"""What to do about a package a host lacks, said where that is known: on the coordinator.

A host whose import of the user's module fails with ModuleNotFoundError cannot tell a
package of the user's own, which `--module` ships, from a third-party one, so its hint names
both fixes (agent/code.py: "install 'scipy' for this host's Python (/usr/bin/python3), or ship
it with --module"). The coordinator can tell: a package installed here in site-packages is
not the user's code, and shipping it with `--module` is poor advice (compiled parts, its own
dependencies and metadata do not travel that way); the fix is pip, for the host's Python.
"""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import os
import re
import shlex
import site
import sys
import sysconfig

# the agent's hint, as agent/code.py `describe_import_failure` writes it
_HINT = re.compile(
    r" \(install '(?P<top>[A-Za-z_]\w*)' for this host's Python(?: \((?P<python>[^()]*)\))?, "
    r"or ship it with --module\)"
)


def site_package_roots() -> tuple[str, ...]:
    """The folders third-party packages are installed in here (site-packages, the user's
    site-packages), real paths ending with a separator."""
    roots = {path for key in ("purelib", "platlib") if (path := sysconfig.get_paths().get(key))}
    roots.update(site.getsitepackages())
    user_site = site.getusersitepackages()
    if isinstance(user_site, str):
        roots.add(user_site)
    return tuple(sorted(os.path.realpath(root) + os.sep for root in roots))


def _installed_package(top: str) -> str | None:
    """The distribution that installs top-level module `top` here in site-packages (what to
    pip install: `sklearn` is scikit-learn's), or None where it is not installed that way."""
    try:
        spec = importlib.machinery.PathFinder.find_spec(top, sys.path)
    except (ImportError, ValueError, OSError):
        return None
    if spec is None:
        return None
    places = [spec.origin] if spec.origin not in (None, "namespace") else list(spec.submodule_search_locations or ())
    roots = site_package_roots()
    if not places or not all(os.path.realpath(str(place)).startswith(roots) for place in places):
        return None
    distributions = importlib.metadata.packages_distributions().get(top)
    return distributions[0] if distributions else top


def installed_here(module: str) -> str | None:
    """The distribution that installs `module` (its top-level package) here in site-packages,
    or None where it is the user's own code or not here at all."""
    return _installed_package(module.split(".", 1)[0])


def _pip_command(found: re.Match[str]) -> tuple[str, str] | None:
    """(the package, the pip command that installs it for the host's Python) for one of the
    agent's hints, or None where the package is not installed here in site-packages."""
    top = found["top"]
    distribution = _installed_package(top)
    if distribution is None:  # the user's own, or nowhere here: either fix may be the one
        return None
    python = shlex.quote(found["python"]) if found["python"] else "python3"
    return top, f"`{python} -m pip install {distribution}`"


def missing_package_pip(text: str) -> str | None:
    """The pip command for the first package that `text` (a host's import error, as the agent
    says it) says the host lacks and that is installed here in site-packages; else None."""
    for found in _HINT.finditer(text):
        if (said := _pip_command(found)) is not None:
            return said[1]
    return None


def missing_package_fix(text: str) -> str:
    """`text` (a host's import error, or a task's error that holds it) with the hint for a
    package installed here in site-packages saying to install it on the host, not to ship it."""
    if "or ship it with --module)" not in text:
        return text

    def fixed(found: re.Match[str]) -> str:
        said = _pip_command(found)
        if said is None:
            return found.group(0)
        top, pip = said
        return (
            f" ({top!r} is a package installed on the coordinator, not code of yours to ship: install it on "
            f"this host, {pip})"
        )

    return _HINT.sub(fixed, text)
