"""Running a stack command over every node at once: `versions`, `check` or `gate`.

    report = run_stack("check", load_cluster("cluster.toml"), source="cluster.toml")
    print(render(report, "text")); sys.exit(report.exit_code)

Every node is looked at concurrently, each through its own one-node pool (`nodes.py`), and
each ends as a `NodeReport`, whatever happened to it: a node that cannot be reached, or that
breaks half way, carries an error finding; nothing a node does raises out of here. The
coordinator (this process) is the reference every node is compared with.
"""

from __future__ import annotations

import asyncio
import logging
import platform
from dataclasses import dataclass, replace
from pathlib import Path

from batuta.errors import BatutaError
from batuta.protocol import messages as m
from batuta.runtime.cluster import ClusterConfig
from batuta.runtime.pool import PoolConfig
from batuta.stack.check import (
    DEFAULT_MIN_FREE_DISK_GB,
    DEFAULT_MIN_FREE_MEMORY_GB,
    Thresholds,
    check_findings,
    gather_facts,
    lost_findings,
)
from batuta.stack.code import (
    CodePlan,
    code_findings,
    coordinator_import_findings,
    import_on_coordinator,
    import_timeout_finding,
    module_findings,
    node_versions,
    plan_code,
)
from batuta.stack.conformance import run_conformance
from batuta.stack.gate import conformance_findings, effective_policy, policy_findings
from batuta.stack.model import COORDINATOR, ERROR, Finding, KernelResult, NodeReport, StackReport
from batuta.stack.nodes import (
    NodeTarget,
    cluster_targets,
    embedded_targets,
    keep_agent_stderr,
    open_node,
    stack_pool_config,
    unreachable_finding,
)
from batuta.stack.versions import COMPONENTS, coordinator_versions, driver_versions, hello_versions

log = logging.getLogger("batuta.stack")

COMMANDS = ("versions", "check", "gate")
EMBEDDED = "embedded"


@dataclass(frozen=True, slots=True, kw_only=True)
class StackOptions:
    """How a stack command runs. Thresholds left None come from [policy], then the defaults."""

    timeout: float = 60.0  # seconds for a node's agent to start, and for each task there
    strict: bool = False  # warnings fail `check` and `gate` too
    min_free_disk_gb: float | None = None
    min_free_memory_gb: float | None = None
    modules: tuple[Path, ...] = ()  # --module PATH: shipped to every node, as `batuta run` does


def thresholds_for(cluster: ClusterConfig | None, options: StackOptions) -> Thresholds:
    policy = cluster.policy if cluster is not None else None

    def pick(flag: float | None, configured: float | None, default: float) -> float:
        return flag if flag is not None else configured if configured is not None else default

    return Thresholds(
        min_free_disk_gb=pick(
            options.min_free_disk_gb, policy.min_free_disk_gb if policy else None, DEFAULT_MIN_FREE_DISK_GB
        ),
        min_free_memory_gb=pick(
            options.min_free_memory_gb, policy.min_free_memory_gb if policy else None, DEFAULT_MIN_FREE_MEMORY_GB
        ),
        **({"disk_setting": "--min-disk-gb"} if options.min_free_disk_gb is not None else {}),
        **({"memory_setting": "--min-memory-gb"} if options.min_free_memory_gb is not None else {}),
    )


def run_stack(
    command: str, cluster: ClusterConfig | None, *, source: str = EMBEDDED, options: StackOptions | None = None
) -> StackReport:
    """Run `command` over `cluster`'s nodes (None: the embedded local agent) and report."""
    return asyncio.run(survey(command, cluster, source=source, options=options or StackOptions()))


async def survey(command: str, cluster: ClusterConfig | None, *, source: str, options: StackOptions) -> StackReport:
    """The async body of `run_stack`, for callers that own an event loop."""
    if command not in COMMANDS:
        raise ValueError(f"command must be one of {', '.join(COMMANDS)}, not {command!r}")
    targets = cluster_targets(cluster) if cluster is not None else embedded_targets()
    config = stack_pool_config(cluster.pool if cluster is not None else PoolConfig(), options.timeout, options.modules)
    plan = plan_code(config.code, targets)  # a bad --module is a usage error before any node starts
    import_errors = import_on_coordinator(plan, config.code) if command == "gate" else {}
    ours = coordinator_versions() | plan.coordinator_versions()
    coordinator = NodeReport(name=COORDINATOR, role=COORDINATOR, reachable=True, where=platform.node(), versions=ours)
    policy = effective_policy(cluster.policy if cluster is not None else None) if command == "gate" else {}
    thresholds = thresholds_for(cluster, options)
    hellos: dict[str, m.Hello] = {}
    with keep_agent_stderr([t.name for t in targets]) as stderr:
        nodes = await asyncio.gather(
            *(
                _survey_node(
                    command,
                    target,
                    config,
                    coordinator=ours,
                    policy=policy,
                    thresholds=thresholds,
                    timeout=options.timeout,
                    stderr=stderr[target.name],
                    plan=plan,
                    hellos=hellos,
                )
                for target in targets
            )
        )
    by_module = module_findings(plan, hellos)  # a copy is odd only next to the others
    nodes = [
        replace(
            node,
            findings=(
                *node.findings,
                *by_module.get(node.name, ()),
                *coordinator_import_findings(node.name, import_errors),  # gate only: empty otherwise
            ),
        )
        if node.reachable
        else node
        for node in nodes
    ]
    return StackReport(
        command=command,
        source=source,
        coordinator=coordinator,
        nodes=tuple(nodes),
        components=COMPONENTS + plan.rows,
        policy=policy,
        strict=options.strict,
    )


async def _survey_node(
    command: str,
    target: NodeTarget,
    config: PoolConfig,
    *,
    coordinator: dict[str, str | None],
    policy: dict[str, str],
    thresholds: Thresholds,
    timeout: float,
    stderr: list[str],
    plan: CodePlan,
    hellos: dict[str, m.Hello],
) -> NodeReport:
    try:
        return await _survey_reachable(
            command,
            target,
            config,
            coordinator=coordinator,
            policy=policy,
            thresholds=thresholds,
            timeout=timeout,
            stderr=stderr,
            plan=plan,
            hellos=hellos,
        )
    except Exception as exc:  # a bug here must cost one node's report, not the command
        log.exception("stack %s: node %s", command, target.name)
        finding = Finding(
            node=target.name,
            check="internal",
            severity=ERROR,
            message=f"batuta failed while checking this node: {type(exc).__name__}: {exc}",
            suggestion="run again with --log-level debug and report it with the log",
        )
        return NodeReport(
            name=target.name, role=target.role, reachable=False, findings=(finding,), error=finding.message
        )


async def _survey_reachable(
    command: str,
    target: NodeTarget,
    config: PoolConfig,
    *,
    coordinator: dict[str, str | None],
    policy: dict[str, str],
    thresholds: Thresholds,
    timeout: float,
    stderr: list[str],
    plan: CodePlan,
    hellos: dict[str, m.Hello],
) -> NodeReport:
    try:
        session = await open_node(target, config)
    except (BatutaError, OSError) as exc:
        # stack_pool_config bounds the agent's start by --timeout: raising start_timeout alone may not help
        finding = unreachable_finding(target, exc, stderr, by_timeout=config.start_timeout >= timeout)
        return NodeReport(
            name=target.name,
            role=target.role,
            reachable=False,
            where=target.address,
            findings=(finding,),
            error=finding.message,
        )
    try:
        versions = hello_versions(session.hello)
        findings: list[Finding] = []
        kernels: tuple[KernelResult, ...] = ()
        if not await session.code_imported(timeout):  # its tasks would wait for it: nothing else runs there
            findings.append(import_timeout_finding(target.name, session.code_sent, timeout))
        else:
            facts = await gather_facts(session, timeout=timeout, with_smoke=command != "versions")
            if facts.info is not None:  # drivers: from the Hello where the agent reports them, else NVML there
                for component, value in driver_versions(facts.info.get("nvml")).items():
                    versions[component] = versions.get(component) or value
            versions.update(node_versions(plan, target.name, session.code_loaded, session.hello))
            hellos[target.name] = session.hello
            if command != "versions":
                findings += check_findings(session, facts, coordinator, thresholds)
            findings += code_findings(target.name, session.code_sent, session.code_loaded)
            if command == "gate":
                findings += policy_findings(target.name, versions, coordinator, policy)
                results = await run_conformance(session, timeout=timeout)
                findings += conformance_findings(target.name, results)
                kernels = tuple(results)
        if session.lost is not None:
            findings = lost_findings(session, findings)
        return NodeReport(
            name=target.name,
            role=target.role,
            reachable=True,
            where=session.where,
            ready_s=session.ready_s,
            connect_s=session.connect_s,
            versions=versions,
            findings=tuple(findings),
            kernels=kernels,
        )
    finally:
        await session.close()
