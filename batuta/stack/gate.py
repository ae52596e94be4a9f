"""`batuta stack gate`: `check`, plus the version policy, plus kernel conformance.

The verdict for CI, or before a long job: pass only when every node is reachable and
healthy, its versions are within the cluster file's `[policy]` of the coordinator's, and
every registered kernel gives its NumPy reference's answer on every backend of every node.

This module turns the policy and the conformance results into findings; running the
kernels is `conformance.run_conformance`'s job.
"""

from __future__ import annotations

from collections.abc import Mapping

from batuta.runtime.policy import PolicyConfig
from batuta.stack.model import ERROR, HEALTHY, Finding, KernelResult, backend_order
from batuta.stack.versions import DEFAULT_POLICY, describe_level, within

_SHOWN_FAILURES = 4


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
            skip_note = f"; {len(skipped)} skipped ({', '.join(sorted({r.detail for r in skipped}))})"
        if not bad:
            message = f"{len(ran)} kernel(s) match their NumPy references{skip_note}"
            found.append(Finding(node=node, check=check, severity=HEALTHY, message=message))
            continue
        shown = _grouped(bad)
        if all(r.status == "error" for r in bad) and len(bad) == len(ran):
            suggestion = f"the {backend} backend does not run at all on {node}: see `batuta stack check`"
        else:
            suggestion = (
                f"compare numba/numpy/driver versions of {node} with the coordinator (`batuta stack versions`); "
                "`--format json` lists every kernel"
            )
        found.append(
            Finding(
                node=node,
                check=check,
                severity=ERROR,
                message=f"{len(bad)} of {len(ran)} kernel(s) fail: {shown}",
                suggestion=suggestion,
            )
        )
    return found


def _grouped(bad: list[KernelResult]) -> str:
    """Failures that share a reason, named once: "ImportError: ... (dot, sum and 3 more); matmul: ..."."""
    by_reason: dict[str, list[str]] = {}
    for result in bad:
        by_reason.setdefault(result.detail or result.status, []).append(result.kernel)
    parts = []
    for reason, kernels in list(by_reason.items())[:_SHOWN_FAILURES]:
        if len(kernels) == 1:
            parts.append(f"{kernels[0]}: {reason}")
        else:
            names = ", ".join(kernels[:3]) + (f" and {len(kernels) - 3} more" if len(kernels) > 3 else "")
            parts.append(f"{reason} ({names})")
    if len(by_reason) > _SHOWN_FAILURES:
        parts.append(f"and {len(by_reason) - _SHOWN_FAILURES} other reason(s)")
    return "; ".join(parts)
