"""The import direction of README.md's layer table, checked on the source with `ast`.

Every import in batuta/, tui/ and kernels/ is read (function-level and TYPE_CHECKING ones
too: a type-only import still couples the layers), relative imports are resolved, and each
crossing is reported as `file:line`. Every .py file there must map to a layer: a new loose
module is reported until it is given one here. `from batuta import X` counts as importing the
module that the facade's `_LAZY` table (batuta/__init__.py, read with `ast`) maps X to, so
the facade is no back door around a rule. The scheduler core and the protocol are sans-I/O:
they may not import the modules that do I/O, read clocks or own an event loop, and may not use
the `random` module's global generator (a seeded `random.Random(seed)` is fine).

Used by tests/test_layers.py, and from the command line (prints the crossings, exit 1 when
there are any)::

    python -m tests.support.layers [REPO_ROOT]
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# Layer of a source file, by its path in the repo: a folder (ending in "/") matches every
# file under it, a file matches itself. First match wins; a file matching none is reported.
LAYER_OF_PATH: list[tuple[str, str]] = [
    ("kernels/", "kernels"),
    ("tui/", "tui"),
    ("batuta/errors.py", "base"),
    ("batuta/_version.py", "base"),
    ("batuta/core/", "core"),
    ("batuta/protocol/", "protocol"),
    ("batuta/transport/", "transport"),
    ("batuta/agent/", "agent"),
    ("batuta/runtime/", "runtime"),
    ("batuta/observers/", "observers"),
    ("batuta/stack/", "stack"),
    ("batuta/jobs/", "jobs"),
    ("batuta/__init__.py", "facade"),
    ("batuta/cli/", "cli"),
    ("batuta/__main__.py", "cli"),
    ("batuta/_entry.py", "cli"),
]
# Layer of an imported module, by its dotted name (first match wins). What is left of
# `batuta.*` after the names above is an attribute of the package root: the facade.
LAYER_OF_MODULE: list[tuple[str, str]] = [
    ("batuta.kernels", "kernels"),
    ("kernels", "kernels"),
    ("batuta.tui", "tui"),
    ("tui", "tui"),
    ("batuta.errors", "base"),
    ("batuta._version", "base"),
    ("batuta.core", "core"),
    ("batuta.protocol", "protocol"),
    ("batuta.transport", "transport"),
    ("batuta.agent", "agent"),
    ("batuta.runtime", "runtime"),
    ("batuta.observers", "observers"),
    ("batuta.stack", "stack"),
    ("batuta.jobs", "jobs"),
    ("batuta.cli", "cli"),
    ("batuta.__main__", "cli"),
    ("batuta._entry", "cli"),
    ("textual", "textual"),
    ("batuta", "facade"),
]
BATUTA_LAYERS = frozenset(
    {"base", "kernels", "core", "protocol", "transport", "agent", "runtime", "observers", "stack", "jobs"}
    | {"facade", "tui", "cli"}
)
# layers that sit above the runtime: nothing at or below it may import them
ABOVE_RUNTIME = frozenset({"observers", "stack", "jobs", "facade", "tui", "cli", "textual"})
# what each layer must never import (cli is the top: it may import anything)
NEVER: dict[str, frozenset[str]] = {
    # errors and the version string: everything else imports them, so they import nothing of batuta
    "base": (BATUTA_LAYERS - {"base"}) | {"textual"},
    # the kernels run on every host without the rest of batuta
    "kernels": BATUTA_LAYERS - {"kernels"},
    "core": ABOVE_RUNTIME | {"protocol", "transport", "agent", "runtime"},
    "protocol": ABOVE_RUNTIME | {"transport", "agent", "runtime"},
    "transport": ABOVE_RUNTIME | {"core", "agent", "runtime"},
    "agent": ABOVE_RUNTIME | {"runtime"},
    "runtime": ABOVE_RUNTIME,
    "observers": frozenset({"stack", "jobs", "tui", "cli", "textual"}),
    "stack": frozenset({"tui", "cli"}),
    "jobs": frozenset({"tui", "cli", "textual"}),
    # the facade re-exports the user API (core, errors, kernels, runtime) and stays cheap to
    # import: `python -m batuta agent` on every host loads it
    "facade": frozenset({"protocol", "transport", "agent", "observers", "stack", "jobs", "tui", "cli", "textual"}),
    # the dashboard sees the cluster through the runtime (batuta.runtime.views), not the core
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
FACADE_PATH = "batuta/__init__.py"
FACADE_TABLE = "_LAZY"


@dataclass(frozen=True, slots=True, kw_only=True)
class Crossing:
    """One rule broken: where (`file` or `file:line`) and what."""

    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


def layer_of_path(rel: str) -> str | None:
    for pattern, layer in LAYER_OF_PATH:
        if rel == pattern or (pattern.endswith("/") and rel.startswith(pattern)):
            return layer
    return None


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


def facade_table(tree: ast.AST) -> dict[str, tuple[int, str]] | None:
    """The facade's `_LAZY` table as {public name: (line, module)}; None when it has none."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == FACADE_TABLE for t in targets) and isinstance(value, ast.Dict):
            return {
                key.value: (entry.lineno, entry.value)
                for key, entry in zip(value.keys, value.values, strict=True)
                if isinstance(key, ast.Constant)
                and isinstance(key.value, str)
                and isinstance(entry, ast.Constant)
                and isinstance(entry.value, str)
            }
    return None


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
    trees: dict[str, ast.AST] = {}
    for folder in SCANNED_FOLDERS:
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            try:
                trees[rel] = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
            except (SyntaxError, UnicodeDecodeError) as exc:
                crossings.append(Crossing(where=rel, what=f"cannot be parsed ({type(exc).__name__}: {exc})"))
    lazy: dict[str, tuple[int, str]] = {}
    if FACADE_PATH in trees:
        found = facade_table(trees[FACADE_PATH])
        if found is None:
            what = f"has no {FACADE_TABLE} table of string literals; the facade check cannot read it"
            crossings.append(Crossing(where=FACADE_PATH, what=what))
        else:
            lazy = found
    facade_modules = {name: module for name, (_, module) in lazy.items()}
    for rel, tree in trees.items():
        layer = layer_of_path(rel)
        if layer is None:
            what = "maps to no layer; give it one in LAYER_OF_PATH (tests/support/layers.py)"
            crossings.append(Crossing(where=rel, what=what))
            continue
        imported = imports_of(tree, package_of(rel))
        if rel == FACADE_PATH:  # the lazy table's modules are the facade's real imports
            imported += list(lazy.values())
        crossings += _crossings_in_file(rel, layer, imported, facade_modules, tree)
    return crossings


def _crossings_in_file(
    rel: str, layer: str, imported: list[tuple[int, str]], facade_modules: Mapping[str, str], tree: ast.AST
) -> list[Crossing]:
    crossings: list[Crossing] = []
    seen: set[tuple[int, str]] = set()
    never = NEVER.get(layer, frozenset())
    for lineno, module in imported:
        resolved = _through_facade(module, facade_modules)
        target = layer_of_module(resolved)
        if target and target != layer and target in never and (lineno, target) not in seen:
            seen.add((lineno, target))
            via = f" through batuta's facade ({resolved})" if resolved != module else ""
            crossings.append(Crossing(where=f"{rel}:{lineno}", what=f"{layer} imports {module}{via} ({target})"))
        top = module.split(".")[0]
        if top in SANS_IO_FORBIDDEN.get(layer, frozenset()) and (lineno, top) not in seen:
            seen.add((lineno, top))
            crossings.append(Crossing(where=f"{rel}:{lineno}", what=f"{layer} is sans-I/O but imports {top}"))
    if layer in SANS_IO_FORBIDDEN:
        crossings += [
            Crossing(
                where=f"{rel}:{lineno}", what=f"{layer} uses the global generator {name}; pass a random.Random(seed)"
            )
            for lineno, name in global_random_uses(tree)
        ]
    return crossings


def _through_facade(module: str, facade_modules: Mapping[str, str]) -> str:
    """`batuta.X` for a name X of the facade's lazy table: the module that really provides X."""
    package, _, name = module.partition(".")
    if package == "batuta" and name in facade_modules:
        return facade_modules[name]
    return module


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else Path.cwd()
    if not (root / "batuta").is_dir():
        print(f"{root} has no batuta/ folder; run from the repository root or pass it", file=sys.stderr)
        return 2
    crossings = crossings_in(root)
    for crossing in crossings:
        print(crossing)
    print(f"{len(crossings)} layer crossing(s)" if crossings else "no layer crossings", file=sys.stderr)
    return 1 if crossings else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
