"""The import direction of DESIGN.md's layer table, checked on the source with `ast`.

Every import in batuta/, tui/ and kernels/ is read (function-level and TYPE_CHECKING ones
too: a type-only import still couples the layers), relative imports are resolved, and each
crossing is reported as `file:line`. The scheduler core and the protocol are sans-I/O: they
may not import the modules that do I/O, read clocks or own an event loop, and may not use
the `random` module's global generator (a seeded `random.Random(seed)` is fine).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

# layer of a source file, by its path in the repo (first match wins)
LAYER_OF_PATH: list[tuple[str, str]] = [
    ("kernels/", "kernels"),
    ("tui/", "tui"),
    ("batuta/core/", "core"),
    ("batuta/protocol/", "protocol"),
    ("batuta/transport/", "transport"),
    ("batuta/agent/", "agent"),
    ("batuta/runtime/", "runtime"),
    ("batuta/stack/", "stack"),
    ("batuta/cli.py", "cli"),
    ("batuta/__main__.py", "cli"),
]
# layer of an imported module, by its dotted name (first match wins)
LAYER_OF_MODULE: list[tuple[str, str]] = [
    ("batuta.kernels", "kernels"),
    ("kernels", "kernels"),
    ("batuta.tui", "tui"),
    ("tui", "tui"),
    ("batuta.core", "core"),
    ("batuta.protocol", "protocol"),
    ("batuta.transport", "transport"),
    ("batuta.agent", "agent"),
    ("batuta.runtime", "runtime"),
    ("batuta.stack", "stack"),
    ("batuta.cli", "cli"),
    ("batuta.__main__", "cli"),
    ("textual", "textual"),
    ("batuta", "batuta"),  # the package root and anything not named above (errors, jobs, ...)
]
# what each layer must never import
NEVER: dict[str, frozenset[str]] = {
    "kernels": frozenset({"batuta", "core", "protocol", "transport", "agent", "runtime", "stack", "tui", "cli"}),
    "core": frozenset({"protocol", "transport", "agent", "runtime", "stack", "tui", "cli", "textual"}),
    "protocol": frozenset({"transport", "agent", "runtime", "stack", "tui", "cli", "textual"}),
    "transport": frozenset({"core", "agent", "runtime", "stack", "tui", "cli", "textual"}),
    "agent": frozenset({"runtime", "stack", "tui", "cli", "textual"}),
    "runtime": frozenset({"stack", "tui", "cli", "textual"}),
    "stack": frozenset({"tui", "cli"}),
    "tui": frozenset({"core", "protocol", "transport", "agent", "cli"}),
}
# standard modules that would make a sans-I/O layer do I/O, read clocks or run a loop
SANS_IO_FORBIDDEN: dict[str, frozenset[str]] = {
    "core": frozenset(
        {"asyncio", "socket", "ssl", "selectors", "subprocess", "multiprocessing", "time", "threading", "os"}
    ),
    "protocol": frozenset({"asyncio", "socket", "ssl", "selectors", "subprocess", "multiprocessing"}),
}
SCANNED_FOLDERS = ("batuta", "tui", "kernels")


@dataclass(frozen=True, slots=True)
class Crossing:
    where: str  # file:line
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


def layer_of_path(rel: str) -> str | None:
    return next((layer for prefix, layer in LAYER_OF_PATH if rel.startswith(prefix)), None)


def layer_of_module(name: str) -> str | None:
    return next(
        (layer for prefix, layer in LAYER_OF_MODULE if name == prefix or name.startswith(prefix + ".")),
        None,
    )


def package_of(rel: str) -> str:
    """The dotted package a file belongs to once installed (tui/ and kernels/ live under batuta)."""
    parts = list(Path(rel).parent.parts)
    if parts and parts[0] in ("tui", "kernels"):
        parts.insert(0, "batuta")
    return ".".join(parts)


def imports_of(tree: ast.AST, package: str) -> list[tuple[int, str]]:
    """(line, dotted module) for every import; `from x import y` also yields `x.y`."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names if alias.name != "*"]
    return found


def global_random_uses(tree: ast.AST) -> list[tuple[int, str]]:
    """Uses of the `random` module's hidden global generator (anything but `random.Random`)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "random" and not node.level:
            found += [(node.lineno, f"random.{a.name}") for a in node.names if a.name not in ("Random",)]
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "random"
            and node.attr not in ("Random",)
        ):
            found.append((node.lineno, f"random.{node.attr}"))
    return found


def crossings_in(root: Path) -> list[Crossing]:
    """Every layering violation under `root` (a checkout, or a fake tree in a test)."""
    crossings: list[Crossing] = []
    for folder in SCANNED_FOLDERS:
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            layer = layer_of_path(rel)
            if layer is None:
                continue
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
            except (SyntaxError, UnicodeDecodeError) as exc:
                crossings.append(Crossing(rel, f"cannot be parsed ({type(exc).__name__}: {exc})"))
                continue
            crossings += _crossings_in_file(rel, layer, tree)
    return crossings


def _crossings_in_file(rel: str, layer: str, tree: ast.AST) -> list[Crossing]:
    crossings: list[Crossing] = []
    seen: set[tuple[int, str]] = set()
    for lineno, module in imports_of(tree, package_of(rel)):
        target = layer_of_module(module)
        if target and target != layer and target in NEVER.get(layer, frozenset()) and (lineno, target) not in seen:
            seen.add((lineno, target))
            crossings.append(Crossing(f"{rel}:{lineno}", f"{layer} imports {module} ({target})"))
        top = module.split(".")[0]
        if top in SANS_IO_FORBIDDEN.get(layer, frozenset()) and (lineno, top) not in seen:
            seen.add((lineno, top))
            crossings.append(Crossing(f"{rel}:{lineno}", f"{layer} is sans-I/O but imports {top}"))
    if layer in SANS_IO_FORBIDDEN:
        crossings += [
            Crossing(f"{rel}:{lineno}", f"{layer} uses the global generator {name}; pass a random.Random(seed)")
            for lineno, name in global_random_uses(tree)
        ]
    return crossings


def test_imports_point_down(repo_root: Path) -> None:
    crossings = crossings_in(repo_root)
    assert not crossings, "imports cross DESIGN.md's layers:\n" + "\n".join(map(str, crossings))


def test_the_check_sees_a_planted_crossing(tmp_path: Path) -> None:
    """The checker itself works: plant one of each kind of violation in a fake tree."""
    files = {
        "batuta/core/bad.py": "import time\nfrom batuta.runtime.pool import Pool\nx = random.random()\n",
        "batuta/protocol/bad.py": "from ..agent import main\n",
        "batuta/agent/bad.py": "def f():\n    from textual.app import App\n",
        "kernels/bad.py": "from batuta.errors import BatutaError\n",
        "tui/bad.py": "from batuta.core.task import Task\nfrom batuta import Pool\n",
        "batuta/core/good.py": "import random\nrng = random.Random(0)\nfrom batuta.errors import TaskError\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    found = {str(c) for c in crossings_in(tmp_path)}
    assert found == {
        "batuta/core/bad.py:1: core is sans-I/O but imports time",
        "batuta/core/bad.py:2: core imports batuta.runtime.pool (runtime)",
        "batuta/core/bad.py:3: core uses the global generator random.random; pass a random.Random(seed)",
        "batuta/protocol/bad.py:1: protocol imports batuta.agent (agent)",
        "batuta/agent/bad.py:2: agent imports textual.app (textual)",
        "kernels/bad.py:1: kernels imports batuta.errors (batuta)",
        "tui/bad.py:1: tui imports batuta.core.task (core)",
    }


def test_shared_layers_tool_agrees(repo_root: Path) -> None:
    """Cross-check with the team's own tool, ../shared/tools/layers.py, where it is present."""
    tool = repo_root.parent / "shared" / "tools" / "layers.py"
    if not tool.is_file():
        pytest.skip(f"{tool} is absent (it sits beside the clone in CI and on developer machines)")
    done = subprocess.run([sys.executable, str(tool)], cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{tool} found crossings:\n{done.stdout}{done.stderr}"
