"""What the stack commands find: findings, per-node reports and the whole report.

Plain frozen data, built by `versions`, `check` and `gate` and drawn by `report`. Every
finding is about one node and one check, has a severity (healthy, warning or error), a
one-line message and, unless it is healthy, a one-line suggestion. A node that cannot be
reached is a node with an error finding, never an exception.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

HEALTHY = "healthy"
WARNING = "warning"
ERROR = "error"
SEVERITIES = (HEALTHY, WARNING, ERROR)
_RANK = {HEALTHY: 0, WARNING: 1, ERROR: 2}

COORDINATOR = "coordinator"  # the machine running the command (a column, not a host)
ROLE_LOCAL = "local"  # an agent started as a subprocess of the coordinator
ROLE_SSH = "ssh"  # an agent started over SSH
ROLE_TLS = "tls"  # a `batuta worker` daemon reached over mutual TLS

EXIT_OK = 0
EXIT_FAILED = 1


def worst(severities: Iterable[str]) -> str:
    """The most severe of `severities` (healthy when there are none)."""
    return max(severities, key=_RANK.__getitem__, default=HEALTHY)


@dataclass(frozen=True, slots=True, kw_only=True)
class Finding:
    """One check of one node: what was found and, when it is not healthy, what to do."""

    node: str
    check: str  # "ssh", "agent", "python", "batuta", "numba", "cuda", "nvml", "disk", "memory", "policy", "kernels"
    severity: str
    message: str
    suggestion: str = ""

    def __post_init__(self) -> None:
        if self.severity not in _RANK:
            raise ValueError(f"severity must be one of {', '.join(SEVERITIES)}, not {self.severity!r}")

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "check": self.check,
            "severity": self.severity,
            "message": self.message,
            "suggestion": self.suggestion or None,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class KernelResult:
    """One kernel on one backend of one node against its NumPy reference."""

    node: str
    kernel: str
    backend: str
    status: str  # "pass", "fail", "error" (did not run), "skip"
    detail: str = ""
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "kernel": self.kernel,
            "backend": self.backend,
            "status": self.status,
            "detail": self.detail or None,
            "seconds": round(self.seconds, 4),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeReport:
    """Everything learned about one node (the coordinator has one too, with role coordinator)."""

    name: str
    role: str
    reachable: bool
    where: str = ""  # "ssh host0 (10.0.0.2:22)", "local agent pid 123", "this process"
    ready_s: float | None = None  # from launch to the agent's hello
    connect_s: float | None = None  # of that, until the transport was open (SSH connected)
    versions: Mapping[str, str | None] = field(default_factory=dict)  # component -> version
    findings: tuple[Finding, ...] = ()
    kernels: tuple[KernelResult, ...] = ()
    error: str | None = None  # why it could not be reached

    @property
    def severity(self) -> str:
        return worst(f.severity for f in self.findings)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role,
            "reachable": self.reachable,
            "where": self.where or None,
            "ready_s": round(self.ready_s, 3) if self.ready_s is not None else None,
            "connect_s": round(self.connect_s, 3) if self.connect_s is not None else None,
            "severity": self.severity,
            "versions": dict(self.versions),
            "findings": [f.to_json() for f in self.findings],
            "kernels": [k.to_json() for k in self.kernels],
            "error": self.error,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class StackReport:
    """The answer of one `batuta stack` command.

    `nodes` are the cluster's nodes in file order (the local one first); `coordinator` is
    the machine the command ran on, the reference every node is compared with.
    """

    command: str  # "versions", "check" or "gate"
    source: str  # the cluster file, or "embedded"
    coordinator: NodeReport
    nodes: tuple[NodeReport, ...]
    components: tuple[str, ...] = ()
    policy: Mapping[str, str] = field(default_factory=dict)  # component -> level (gate)
    strict: bool = False

    @property
    def findings(self) -> list[Finding]:
        return [f for node in self.nodes for f in node.findings]

    @property
    def severity(self) -> str:
        return worst(f.severity for f in self.findings)

    @property
    def unreachable(self) -> list[str]:
        return [n.name for n in self.nodes if not n.reachable]

    def counts(self) -> dict[str, int]:
        """How many findings of each severity."""
        found = dict.fromkeys(SEVERITIES, 0)
        for finding in self.findings:
            found[finding.severity] += 1
        return found

    @property
    def ok(self) -> bool:
        """The verdict: `versions` fails only on an unreachable node; `check` and `gate` on any
        error, or on any warning when `strict`."""
        if self.command == "versions":
            return not self.unreachable
        severity = self.severity
        return severity == HEALTHY or (severity == WARNING and not self.strict)

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.ok else EXIT_FAILED

    def differences(self, node: NodeReport) -> list[str]:
        """Components whose version on `node` differs from the coordinator's."""
        ours = self.coordinator.versions
        return [c for c in self.components if node.reachable and node.versions.get(c) != ours.get(c)]

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "command": self.command,
            "source": self.source,
            "verdict": "pass" if self.ok else "fail",
            "exit_code": self.exit_code,
            "strict": self.strict,
            "counts": self.counts(),
            "components": list(self.components),
            "coordinator": self.coordinator.to_json(),
            "nodes": [n.to_json() | {"differs": self.differences(n)} for n in self.nodes],
        }
        if self.command == "gate":
            data["policy"] = dict(self.policy)
        return data


def backend_order(backend: str) -> tuple[int, int]:
    """How kernel results sort by backend: scalar, cpu, gpu, then gpu:0, gpu:1, ... in GPU order."""
    kind, _, index = backend.partition(":")
    return ({"scalar": 0, "cpu": 1, "gpu": 2}.get(kind, 3), int(index) if index.isdigit() else -1)
