"""The user's kernel modules on every node: which copy each one runs, and whether they agree.

Two ways a user module reaches a node (README, "Your own kernels on a cluster"):

* shipped: `--module PATH`, and the `kernel_modules` that resolve on the coordinator to the
  user's own files, travel as one bundle (`runtime/code.py`); the agent answers `CodeLoaded`
  with the bundle's digest and one line per module that failed to import. Every node runs the
  coordinator's copy, so what can go wrong is the import (a syntax error, a missing package);
* by name: a `kernel_modules` entry the coordinator does not ship (installed in its
  site-packages, or not there at all) is imported by each host from its own install. Each
  agent's Hello names the sha256 of that module's source as the host finds it
  (`agent.code.module_source_digest`); a host whose copy differs from the coordinator's
  (when the coordinator has one) or from the other hosts' runs other code under the same
  kernel names, which is the stale-copy fault this module exists to catch.

`plan_code` works out, before any node starts, what ships where and what each node imports by
name; `code_findings` and `module_findings` turn what the nodes said into findings, and
`node_versions` into rows of `batuta stack versions`. `import_on_coordinator` imports the
user's modules here, so that `stack gate` can compute their kernels' references.
"""

from __future__ import annotations

import importlib
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from batuta.agent.code import describe_import_failure, module_source_digest, short_digest
from batuta.protocol import messages as m
from batuta.runtime.code import CodeCollector, CodeSpec
from batuta.runtime.code_paths import loaded_in_user_files
from batuta.runtime.missing_package import installed_here, missing_package_pip
from batuta.stack.model import ERROR, HEALTHY, WARNING, Finding
from batuta.stack.nodes import NodeTarget

CODE_ROW = "code"  # the shipped bundle's digest, as the node loaded it
MODULE_ROW = "module "  # + a module's name: the digest of a module a node imports by name


@dataclass(frozen=True, slots=True, kw_only=True)
class CodePlan:
    """What each node gets: `bundles` (node -> the Code shipped there, None when nothing ships),
    `by_name` (node -> the kernel_modules it imports from its own install) and `ours` (module
    -> the coordinator's own digest of it, "" where it has none)."""

    bundles: Mapping[str, m.Code | None]
    by_name: Mapping[str, tuple[str, ...]]
    ours: Mapping[str, str]

    @property
    def rows(self) -> tuple[str, ...]:
        """The extra rows of `stack versions`: the bundle, then each module imported by name."""
        rows = (CODE_ROW,) if any(code is not None for code in self.bundles.values()) else ()
        return rows + tuple(MODULE_ROW + name for name in self.ours)

    def coordinator_versions(self) -> dict[str, str | None]:
        """The coordinator's cells of those rows: the digest it ships (when every node gets the
        same bundle), and its own copy of each module imported by name."""
        digests = {code.digest for code in self.bundles.values() if code is not None}
        versions: dict[str, str | None] = {}
        if digests:
            versions[CODE_ROW] = short_digest(digests.pop()) if len(digests) == 1 else "per node"
        for name, digest in self.ours.items():
            versions[MODULE_ROW + name] = short_digest(digest) if digest else None
        return versions

    def modules_to_import(self) -> list[tuple[str, str]]:
        """(module, where its folder is: "" for the import path) of every user module, shipped or not."""
        found: dict[str, str] = {}
        for code in self.bundles.values():
            for module in code.modules if code is not None else ():
                found.setdefault(module, "")
        for names in self.by_name.values():
            for module in names:
                found.setdefault(module, "")
        return list(found.items())


def plan_code(spec: CodeSpec, targets: Sequence[NodeTarget]) -> CodePlan:
    """Collect the bundles as the nodes' pools will (same collector, same result); raises
    CodeError (a UsageError: exit 2) for a bad `--module` or too much code."""
    collector = CodeCollector(spec)
    bundles: dict[str, m.Code | None] = {}
    by_name: dict[str, tuple[str, ...]] = {}
    for target in targets:
        code = collector.bundle(target.spec.kernel_modules)
        bundles[target.name] = code
        shipped = set(code.modules) if code is not None else set()
        tops = {f.path.split("/")[0].removesuffix(".py") for f in code.files} if code is not None else set()
        by_name[target.name] = tuple(
            name for name in target.spec.kernel_modules if name not in shipped and name.split(".")[0] not in tops
        )
    names = dict.fromkeys(name for names in by_name.values() for name in names)
    return CodePlan(bundles=bundles, by_name=by_name, ours={name: module_source_digest(name) for name in names})


def import_on_coordinator(plan: CodePlan, spec: CodeSpec) -> dict[str, str]:
    """Import the user's modules here, so their kernels are registered for `stack gate`;
    returns module -> why it failed, for those that did."""
    for path in spec.modules:  # --module PATH: its folder on the import path, as the hosts have it
        folder = str(path.expanduser().resolve().parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)
    importlib.invalidate_caches()
    errors: dict[str, str] = {}
    for module, _ in plan.modules_to_import():
        try:
            importlib.import_module(module)
        except (Exception, SystemExit) as exc:  # the user's module must not end the command
            errors[module] = describe_import_failure(exc, None)
    return errors


def node_versions(plan: CodePlan, node: str, loaded: m.CodeLoaded | None, hello: m.Hello) -> dict[str, str | None]:
    """A node's cells of the code rows: the digest it loaded, and its copy of each by-name module."""
    versions: dict[str, str | None] = {}
    if plan.rows and plan.rows[0] == CODE_ROW:
        versions[CODE_ROW] = short_digest(loaded.digest) if loaded is not None else None
    for name in plan.ours:
        digest = hello.modules.get(name, "") if name in plan.by_name.get(node, ()) else ""
        versions[MODULE_ROW + name] = short_digest(digest) if digest else None
    return versions


def import_timeout_finding(node: str, sent: m.Code | None, timeout: float) -> Finding:
    """The shipped bundle was not imported on `node` within `timeout` seconds."""
    modules = ", ".join(sent.modules) if sent is not None else ""
    return Finding(
        node=node,
        check="code",
        severity=ERROR,
        message=f"importing the shipped code ({modules}) did not finish within {timeout:g} s",
        suggestion="look for work done at import time in those modules (a loop, a download, a wait) and "
        "move it into a function; or give it longer with --timeout",
    )


def code_findings(node: str, sent: m.Code | None, loaded: m.CodeLoaded | None) -> list[Finding]:
    """The shipped bundle on one node: loaded, and every module imported (or why not)."""
    if sent is None:
        return []
    if loaded is None or loaded.digest != sent.digest:
        said = f"it says it runs {short_digest(loaded.digest)}" if loaded is not None else "it did not answer"
        return [
            Finding(
                node=node,
                check="code",
                severity=ERROR,
                message=f"the coordinator sent code {short_digest(sent.digest)}, but {said}",
                suggestion="run again with --log-level debug and report it with the log",
            )
        ]
    found = []
    for module, error in loaded_in_user_files(loaded).errors.items():
        if "ModuleNotFoundError" in error:
            # the host's own words (loaded.errors) hold the hint that missing_package.py reads
            pip = missing_package_pip(loaded.errors[module])
            if pip is not None:  # a third-party package installed here: --module cannot ship it
                fix = f"install the missing package for {node}'s Python: {pip}"
            else:
                fix = f"install the missing package for {node}'s Python, or ship it with --module PATH"
        else:
            fix = "fix the file and line named on the coordinator (the code ships from there), then run again"
        message = f"importing {module} failed: {error}"
        found.append(Finding(node=node, check="code", severity=ERROR, message=message, suggestion=fix))
    if not found:
        modules = ", ".join(sent.modules) or "no modules to import"
        message = f"code {short_digest(sent.digest)} shipped and imported ({modules})"
        found.append(Finding(node=node, check="code", severity=HEALTHY, message=message))
    return found


def _fix(module: str, node: str) -> str:
    return (
        f"ship {module} from the coordinator instead (--module PATH, or kernel_modules naming the user's own "
        f"copy there), or reinstall the same copy of {module} on {node}"
    )


def module_findings(plan: CodePlan, hellos: Mapping[str, m.Hello]) -> dict[str, list[Finding]]:
    """For each node (reached: its Hello in `hellos`), one finding per module it imports by
    name: the same copy as the reference, or an error naming both digests and the fix.

    The reference is the coordinator's copy where it has one, else the copy most nodes have
    (more than half of them); without either, every node whose copy differs from another's
    is an error naming that other node's.
    """
    found: dict[str, list[Finding]] = {node: [] for node in hellos}
    for module, ours in plan.ours.items():
        copies = {
            node: hello.modules.get(module, "")
            for node, hello in hellos.items()
            if module in plan.by_name.get(node, ())
        }
        present = [digest for digest in copies.values() if digest]
        reference, whose = ours, "the coordinator's"
        if not reference and present:
            digest, count = Counter(present).most_common(1)[0]
            if count * 2 > len(copies):
                reference, whose = digest, f"{count} of {len(copies)} nodes'"
        for node, digest in copies.items():
            if not digest:
                found[node].append(
                    Finding(
                        node=node,
                        check="modules",
                        severity=ERROR,
                        message=f"kernel module {module} has no source on {node}'s import path",
                        suggestion=_fix(module, node).replace("reinstall the same copy", "install the same copy"),
                    )
                )
                continue
            if reference and digest == reference:
                message = f"{module} {short_digest(digest)}, as {whose}"
                found[node].append(Finding(node=node, check="modules", severity=HEALTHY, message=message))
                continue
            if reference:
                message = f"{module} on {node} is {short_digest(digest)}, {whose} is {short_digest(reference)}"
            else:
                others = [(other, d) for other, d in copies.items() if d and d != digest]
                if not others:  # every copy is this one, and the coordinator has none
                    message = f"{module} {short_digest(digest)}, the same on every node (the coordinator has none)"
                    found[node].append(Finding(node=node, check="modules", severity=HEALTHY, message=message))
                    continue
                other, theirs = others[0]
                message = f"{module} on {node} is {short_digest(digest)}, on {other} {short_digest(theirs)}"
            found[node].append(
                Finding(node=node, check="modules", severity=ERROR, message=message, suggestion=_fix(module, node))
            )
    return found


def coordinator_import_findings(node: str, errors: Mapping[str, str]) -> list[Finding]:
    """`stack gate`: a user module the coordinator cannot import has no reference to compare with."""
    return [
        Finding(
            node=node,
            check="kernels",
            severity=WARNING,
            message=f"the coordinator cannot import {module} ({error}): its kernels are not checked",
            suggestion=_coordinator_import_fix(module),
        )
        for module, error in errors.items()
    ]


def _coordinator_import_fix(module: str) -> str:
    """A module installed here in site-packages is no code of the user's to ship with --module:
    its import fails on something it needs, which the error names."""
    distribution = installed_here(module)
    if distribution is None:
        return f"make {module} importable on the coordinator too (install it, or ship it with --module PATH)"
    return (
        f"{module} is installed on the coordinator ({distribution}) but does not import there: install what "
        f"the error says it lacks for the coordinator's Python ({sys.executable}), or reinstall {distribution}"
    )
