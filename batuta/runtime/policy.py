"""The cluster file's `[policy]` table: the version rules and thresholds `batuta stack check`
and `gate` hold every node to. Parsed by `batuta.runtime.cluster`, applied by `batuta.stack`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# `[policy]`: version rules of `batuta stack gate`, one level per component, compared with the
# coordinator's version: "exact", "minor" (same major.minor), "major" (same major) or "any".
POLICY_LEVELS = ("exact", "minor", "major", "any")
POLICY_COMPONENTS = (
    "batuta",
    "python",
    "numpy",
    "numba",
    "llvmlite",
    "numba-cuda",
    "msgpack",
    "psutil",
    "asyncssh",
    "textual",
    "prometheus-client",
    "nvidia-ml-py",
    "nvidia-driver",
    "cuda-driver",
)
POLICY_THRESHOLDS = ("min_free_disk_gb", "min_free_memory_gb")


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyConfig:
    """The `[policy]` table: what `batuta stack check` and `gate` hold every node to.

    `versions` holds only the components the file names (component -> level); the stack
    commands fill in their defaults for the rest. A threshold of None means the default.
    """

    versions: Mapping[str, str] = field(default_factory=dict)
    min_free_disk_gb: float | None = None
    min_free_memory_gb: float | None = None
