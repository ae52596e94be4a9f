"""Component versions: what each node runs, and whether it is close enough to the coordinator.

A node's versions come from its agent's Hello (batuta, Python, the packages it finds on its
`sys.path`) plus `node_kernels.nvml_facts()` run there (NVIDIA driver, CUDA driver version, GPU
models). The coordinator's come from this process. `within(level, ours, theirs)` is the version
policy of `batuta stack gate`: "exact", "minor" (same major.minor), "major" or "any".
"""

from __future__ import annotations

import importlib.metadata
import platform
import re
from collections.abc import Mapping
from typing import Any

from batuta._version import __version__
from batuta.protocol import messages as m
from batuta.runtime.policy import POLICY_LEVELS

# Rows of `batuta stack versions`, in order. Package names are distribution names.
PACKAGES = (
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
)
DRIVER = "nvidia-driver"
CUDA_DRIVER = "cuda-driver"
GPUS = "gpus"
COMPONENTS = ("batuta", "python", *PACKAGES, DRIVER, CUDA_DRIVER, GPUS)

# The policy `stack gate` applies when the cluster file has no [policy] table (and under it,
# for components it does not name): what the runtime needs (batuta exact, as the handshake
# enforces; Python 3 of any minor, since the wire is msgpack) and what changes compiled code
# (numba and llvmlite minor, NumPy's ABI major).
DEFAULT_POLICY: Mapping[str, str] = {
    "batuta": "exact",
    "python": "major",
    "numpy": "major",
    "numba": "minor",
    "llvmlite": "minor",
}

assert all(level in POLICY_LEVELS for level in DEFAULT_POLICY.values())


def coordinator_versions() -> dict[str, str | None]:
    """This machine's column: read in process (importlib.metadata and NVML)."""
    from batuta.stack.node_kernels import nvml_facts

    versions: dict[str, str | None] = {"batuta": __version__, "python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    versions.update(driver_versions(nvml_facts()))
    return versions


def driver_versions(nvml: Mapping[str, Any] | None) -> dict[str, str | None]:
    """The driver rows from `nvml_facts()`' answer (None where it has none)."""
    if not nvml:
        return {DRIVER: None, CUDA_DRIVER: None, GPUS: None}
    gpus = nvml.get("gpus") or []
    return {
        DRIVER: nvml.get("driver") or ("fake" if nvml.get("status") == "fake" else None),
        CUDA_DRIVER: nvml.get("cuda_driver"),
        GPUS: gpu_models(gpus) if gpus else None,
    }


def gpu_models(names: list[str]) -> str:
    """["H100", "H100", "A10"] -> "2x H100, A10" (order of first appearance)."""
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{n}x {name}" if n > 1 else name for name, n in counts.items())


def hello_versions(hello: m.Hello) -> dict[str, str | None]:
    """A node's column as far as its Hello tells (drivers come from `driver_versions`).

    Agents that report the drivers in `Hello.packages` (keys "nvidia-driver" and
    "cuda-driver") need no extra task for them.
    """
    versions: dict[str, str | None] = {"batuta": hello.batuta_version, "python": hello.python_version}
    for package in PACKAGES:
        versions[package] = hello.packages.get(package)
    versions[DRIVER] = hello.packages.get(DRIVER)
    versions[CUDA_DRIVER] = hello.packages.get(CUDA_DRIVER)
    versions[GPUS] = gpu_models([g.name for g in hello.gpus]) if hello.gpus else None
    return versions


def release(version: str) -> tuple[int, ...]:
    """The leading numbers of a version: "0.60.0rc1" -> (0, 60, 0); "12.4" -> (12, 4)."""
    numbers = []
    for part in version.split("."):
        match = re.match(r"\d+", part)
        if match is None:
            break
        numbers.append(int(match[0]))
        if match.end() != len(part):
            break
    return tuple(numbers)


def within(level: str, ours: str | None, theirs: str | None) -> bool:
    """Does `theirs` satisfy policy `level` relative to `ours` (the coordinator's)?

    Absent on both sides is fine; absent on one side only is not (unless level is "any").
    """
    if level == "any" or ours == theirs:
        return True
    if ours is None or theirs is None:
        return False
    if level == "exact":
        return False
    width = {"major": 1, "minor": 2}[level]
    a, b = release(ours), release(theirs)
    return len(a) >= width and a[:width] == b[:width]


def describe_level(level: str, ours: str) -> str:
    """What `level` asks for, in words: "0.60.x", "1.x", "exactly 0.1.0"."""
    parts = release(ours)
    if level == "minor" and len(parts) >= 2:
        return f"{parts[0]}.{parts[1]}.x"
    if level == "major" and parts:
        return f"{parts[0]}.x"
    return f"exactly {ours}"
