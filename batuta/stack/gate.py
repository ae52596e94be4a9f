"""`batuta stack gate`: `check`, plus the version policy, plus kernel conformance.

The verdict for CI, or before a long job: pass only when every node is reachable and
healthy, its versions are within the cluster file's `[policy]` of the coordinator's, and
every registered kernel gives its NumPy reference's answer on every backend of every node.

This module turns the policy and the conformance results into findings; running the
kernels is `conformance.run_conformance`'s job.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from batuta.runtime.policy import PolicyConfig
from batuta.stack.conformance import TIMED_OUT
from batuta.stack.model import ERROR, HEALTHY, Finding, KernelResult, backend_order
from batuta.stack.versions import DEFAULT_POLICY, describe_level, within


def effective_policy(policy: PolicyConfig | None) -> dict[str, str]:
    """The defaults, overridden by what the cluster file's [policy] names; "any" rules dropped."""
    merged = dict(DEFAULT_POLICY)
    if policy is not None:
        merged.update(policy.versions)
    return {component: level for component, level in merged.items() if level != "any"}


def policy_findings(
    node: str,
    versions: Mapping[str, str | None],
    coordinator: Mapping[str, str | None],
    policy: Mapping[str, str],
) -> list[Finding]:
    """One error per component outside the policy, or one healthy finding naming the rules."""
    found = []
    for component, level in policy.items():
        ours, theirs = coordinator.get(component), versions.get(component)
        if within(level, ours, theirs):
            continue
        if theirs is None:
            message = f"{component} is missing; the coordinator has {ours} and [policy] says {level}"
            suggestion = f"install {component} {describe_level(level, str(ours))} on {node}"
        elif ours is None:
            message = f"{component} {theirs}, but the coordinator has none to compare with ({level})"
            suggestion = f'install {component} on the coordinator too, or set {component} = "any" in [policy]'
        else:
            wanted = describe_level(level, ours)
            message = f'{component} {theirs}, the coordinator {ours}: [policy] {component} = "{level}" wants {wanted}'
            suggestion = f"install {component} {wanted} on {node}, or relax {component} in [policy]"
        found.append(Finding(node=node, check="policy", severity=ERROR, message=message, suggestion=suggestion))
    if not found:
        rules = ", ".join(f"{c} {level}" for c, level in policy.items()) or "no rules"
        found.append(Finding(node=node, check="policy", severity=HEALTHY, message=f"versions within policy ({rules})"))
    return found


def conformance_findings(node: str, results: list[KernelResult]) -> list[Finding]:
    """One finding per backend: how many kernels matched, which did not, what was skipped."""
    found = []
    # "gpu:N" where a node has several GPUs: each is reported on its own
    backends = sorted({r.backend for r in results}, key=backend_order)
    for backend in backends:
        mine = [r for r in results if r.backend == backend]
        if not mine:
            continue
        ran = [r for r in mine if r.status != "skip"]
        bad = [r for r in ran if r.status != "pass"]
        skipped = [r for r in mine if r.status == "skip"]
        check = f"kernels {backend}"
        if not ran:
            reasons = sorted({r.detail for r in skipped})
            message = f"skipped: {'; '.join(reasons)}"
            found.append(Finding(node=node, check=check, severity=HEALTHY, message=message))
            continue
        skip_note = ""
        if skipped:
            skip_note = f"; {len(skipped)} skipped ({_grouped(skipped)})"  # which: a user kernel lacks a sample
        if not bad:
            message = f"{len(ran)} kernel(s) match their NumPy references{skip_note}"
            found.append(Finding(node=node, check=check, severity=HEALTHY, message=message))
            continue
        found.append(
            Finding(
                node=node,
                check=check,
                severity=ERROR,
                message=f"{len(bad)} of {len(ran)} kernel(s) fail: {_grouped(bad)}",
                suggestion=_suggestion(node, backend, bad, whole_backend=len(bad) == len(ran)),
            )
        )
    return found


def _grouped(bad: list[KernelResult]) -> str:
    """Failures that share a reason, named once: "ImportError: ... (dot, sum and 3 more); matmul: ...".
    Every reason is given: the one that matters may be any of them (the JSON lists every kernel)."""
    by_reason: dict[str, list[str]] = {}
    for result in bad:
        by_reason.setdefault(result.detail or result.status, []).append(result.kernel)
    parts = []
    for reason, kernels in by_reason.items():
        if len(kernels) == 1:
            parts.append(f"{kernels[0]}: {reason}")
        else:
            names = ", ".join(kernels[:3]) + (f" and {len(kernels) - 3} more" if len(kernels) > 3 else "")
            parts.append(f"{reason} ({names})")
    return "; ".join(parts)


# How conformance.run_conformance says that a kernel's own code failed on the coordinator,
# before any node ran it: the user's sample function, or the kernel's reference.
_SAMPLE_FAILED = "its sample failed on the coordinator"
_REFERENCE_FAILED = "reference failed on the coordinator"
# How a slot says a kernel is unknown because the user's module did not import there
# (agent/execute.py): the module is at fault, not the kernel's code.
_NOT_IMPORTED = "is unknown on host"


def _suggestion(node: str, backend: str, bad: list[KernelResult], *, whole_backend: bool) -> str:
    """What to do about `bad`: for the user's kernels, their code (the node is not at fault
    when the user's sample, reference or variant is wrong); for batuta's own, the node."""
    from batuta.kernels import registry

    modules = {r.kernel: registry.module_of(r.kernel) or "" for r in bad}
    users = [r for r in bad if modules[r.kernel] and not modules[r.kernel].startswith("batuta.")]
    ours = [r for r in bad if r not in users]
    broken = bool(ours) and whole_backend and all(r.status == "error" for r in bad)
    if broken:  # the backend itself: what the user's kernels raised there is not their fault
        users = [r for r in users if r.detail.startswith((_SAMPLE_FAILED, _REFERENCE_FAILED))]
    faults: dict[str, list[KernelResult]] = {}
    for result in users:
        faults.setdefault(_user_fault(result, backend), []).append(result)
    parts = []
    for fault, results in faults.items():
        kernels, where = _names(r.kernel for r in results), _names(modules[r.kernel] for r in results)
        its = "its" if len({r.kernel for r in results}) == 1 else "their"
        code = f"{its} reference (the @kernel function)" if backend == "scalar" else f"{its} {backend} variant"
        decorated = kernels if its == "its" else "<kernel>"
        parts.append(
            {
                "sample": f"fix the sample function (@{decorated}.sample) of {kernels} in {where}: it raised on "
                "the coordinator",
                "reference": f"fix the reference (the @kernel function) of {kernels} in {where}, or what {its} "
                "sample gives it: it raised on the coordinator",
                "raised": f"fix {kernels} in {where}: {code} raised on {node}",
                "not imported": f"make {where} import on {node} (the code finding says why it did not); "
                f"{kernels} never ran there",
                "timed out": f"make {kernels} in {where} finish sooner on {its} sample ({code} ran past --timeout "
                f"on {node}), or give {'it' if its == 'its' else 'them'} longer with --timeout",
                "nondeterministic": f"make the reference (the @kernel function) of {kernels} in {where} give one "
                f"answer for one input (no unseeded randomness), or compare numpy on {node} with the coordinator's",
                "differs": f"fix {kernels} in {where}: {code} disagrees with {its} reference (the @kernel function)",
            }[fault]
        )
    if broken:
        parts.append(f"the {backend} backend does not run at all on {node}: see `batuta stack check`")
    elif ours:
        theirs = " (for batuta's kernels)" if users else ""
        parts.append(
            f"compare numba/numpy/driver versions of {node} with the coordinator (`batuta stack versions`){theirs}; "
            "`--format json` lists every kernel"
        )
    return "; ".join(parts)


def _user_fault(result: KernelResult, backend: str) -> str:
    """Which code of the user's kernel is at fault (a key of `_suggestion`'s fixes)."""
    if result.detail.startswith(_SAMPLE_FAILED):
        return "sample"
    if result.detail.startswith(_REFERENCE_FAILED):
        return "reference"
    if result.status == "error" and result.detail.startswith(TIMED_OUT):
        return "timed out"
    if result.status == "error" and _NOT_IMPORTED in result.detail:
        return "not imported"
    if result.status == "error":
        return "raised"
    # on "scalar" the node ran the reference itself and got another answer than the coordinator
    return "nondeterministic" if backend == "scalar" else "differs"


def _names(names: Iterable[str]) -> str:
    """Each distinct name once, all of them: "a", "a and b", "a, b and c"."""
    unique = list(dict.fromkeys(names))
    return unique[0] if len(unique) == 1 else f"{', '.join(unique[:-1])} and {unique[-1]}"
