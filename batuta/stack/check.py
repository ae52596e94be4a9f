"""`batuta stack check`: is each node fit to take work?

For one started node (see `nodes.NodeSession`) this reads its facts and runs two small
tasks, then turns what it saw into findings, each healthy, warning or error with a one-line
suggestion:

    ssh / agent   reachable (host key verified, for SSH) and how long the agent took to say hello
    python        3.11 or newer; another minor than the coordinator's is fine (the wire is msgpack)
    batuta        the same version as the coordinator (the runtime refuses others)
    numba         imports, compiles a fresh function and runs it correctly
    cuda, nvml    where the cluster file declares GPUs, or the agent found some: a CUDA kernel
                  compiles and runs on each GPU's slot, NVML answers with a driver
    disk, memory  free space and available memory above the thresholds

The functions here are pure (facts in, findings out) apart from `check_node`, which runs
the tasks; the thresholds come from the cluster file's `[policy]` table or the command line.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from batuta.core.task import Backend, Task, TaskResult, TaskStatus, gpu_capability
from batuta.stack import node_kernels
from batuta.stack.model import ERROR, HEALTHY, ROLE_LOCAL, ROLE_SSH, ROLE_TLS, WARNING, Finding
from batuta.stack.nodes import NodeSession, NodeTarget, result_error, value_of
from batuta.stack.versions import release

GIB = 2**30
DEFAULT_MIN_FREE_DISK_GB = 2.0
DEFAULT_MIN_FREE_MEMORY_GB = 1.0
WARN_FACTOR = 2.0  # below this multiple of a threshold: a warning
_SMOKE_N = 1000


@dataclass(frozen=True, slots=True, kw_only=True)
class Thresholds:
    """Below `min_*`: an error; below `WARN_FACTOR` times that: a warning."""

    min_free_disk_gb: float = DEFAULT_MIN_FREE_DISK_GB
    min_free_memory_gb: float = DEFAULT_MIN_FREE_MEMORY_GB
    # where each came from, for the fix to name: a flag overrides the file
    disk_setting: str = "min_free_disk_gb in [policy]"
    memory_setting: str = "min_free_memory_gb in [policy]"


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeFacts:
    """What the node's tasks answered (None where a task failed; its error beside it)."""

    info: Mapping[str, Any] | None
    info_error: str = ""
    numba: TaskResult | None = None
    cuda: Mapping[int, TaskResult] | None = None  # by GPU index: the smoke test run on each GPU's slot


async def gather_facts(session: NodeSession, *, timeout: float, with_smoke: bool) -> NodeFacts:
    """Run the node-info task and, for `check`, the numba and CUDA smoke tests, concurrently."""
    runs: dict[str, Any] = {
        "info": session.run(Task.kernel(node_kernels.NODE_INFO, backend=Backend.SCALAR), timeout=timeout)
    }
    if with_smoke:
        runs["numba"] = session.run(
            Task.kernel(node_kernels.NUMBA_SMOKE, _SMOKE_N, backend=Backend.CPU), timeout=timeout
        )
        for index in session.gpu_indices:  # every GPU, each on its own slot
            smoke = Task.kernel(
                node_kernels.CUDA_SMOKE, _SMOKE_N, backend=Backend.GPU, requires=[gpu_capability(index)]
            )
            runs[f"cuda {index}"] = session.run(smoke, timeout=timeout)
    done = dict(zip(runs, await asyncio.gather(*runs.values()), strict=True))
    cuda = {index: done[f"cuda {index}"] for index in session.gpu_indices if f"cuda {index}" in done}
    info_result: TaskResult = done["info"]
    info = value_of(info_result)
    return NodeFacts(
        info=info if isinstance(info, dict) else None,
        info_error="" if isinstance(info, dict) else result_error(info_result),
        numba=done.get("numba"),
        cuda=cuda or None,
    )


# -- findings -----------------------------------------------------------------------------


def _gib(count: float) -> str:
    return f"{count / GIB:.1f} GiB"


def _pip(target: NodeTarget, requirement: str) -> str:
    python = target.python or "python3"
    return f"{python} -m pip install '{requirement}'"


def reach_finding(session: NodeSession) -> Finding:
    target = session.target
    ready = f"agent ready in {session.ready_s:.2f} s"
    if target.role in (ROLE_SSH, ROLE_TLS):
        connected = f"connected in {session.connect_s:.2f} s, " if session.connect_s is not None else ""
        verified = "host key verified" if target.role == ROLE_SSH else "certificates verified"
        message = f"reachable, {verified}; {connected}{ready}"
        return Finding(node=target.name, check=target.role, severity=HEALTHY, message=message)
    return Finding(node=target.name, check="agent", severity=HEALTHY, message=f"local {ready}")


# What the Hello says (checked before any task ran): still true of a node lost afterwards.
_FROM_HELLO = frozenset({"python", "batuta", "slots", "policy", "code", "modules", ROLE_SSH, ROLE_TLS, "agent"})


def lost_findings(session: NodeSession, findings: list[Finding]) -> list[Finding]:
    """A node lost in the middle of its check: one error that says so, in place of the task
    failures it caused ("numba cannot compile", "20 of 20 kernels fail", each with a fix
    that would not help). What the Hello told and what passed before the loss stay."""
    target = session.target
    reason = session.lost or "lost"
    over = {ROLE_SSH: "SSH", ROLE_TLS: "TLS"}.get(target.role)
    kept = [f for f in findings if f.severity == HEALTHY or f.check in _FROM_HELLO]
    if over:
        fix = f"check that {target.name} is up and its network ({over} to {target.address or target.name})"
    else:  # the local agent: its end says why (killed, out of memory)
        fix = "see why its agent ended (above)"
    lost = Finding(
        node=target.name,
        check="agent",
        severity=ERROR,
        message=f"lost during the check: {reason}; the checks that were still running did not finish",
        suggestion=f"{fix}, then run the check again",
    )
    return [lost, *kept]


def slots_finding(session: NodeSession) -> Finding | None:
    """An error where the file gives the node no CPU slot and it has no GPU: the pool would
    run nothing there (it is checked with one CPU slot, so the other checks pass regardless)."""
    target = session.target
    if target.slots != 0 or session.gpu_slots:
        return None
    table = "the [local] table" if target.role == ROLE_LOCAL else f"host {target.name}'s entry"
    return Finding(
        node=target.name,
        check="slots",
        severity=ERROR,
        message="slots = 0 and no GPU here: the pool would run nothing on this node",
        suggestion=f"set slots to 1 or more in {table} of the cluster file, or leave it out (one per core)",
    )


def python_finding(target: NodeTarget, theirs: str, ours: str) -> Finding:
    node = target.name
    if theirs == ours:
        return Finding(node=node, check="python", severity=HEALTHY, message=f"Python {theirs}, as the coordinator")
    if release(theirs)[:2] == release(ours)[:2]:
        message = f"Python {theirs}, the coordinator {ours} (same minor version)"
        return Finding(node=node, check="python", severity=HEALTHY, message=message)
    message = f"Python {theirs}, the coordinator {ours} (another minor works: tasks travel as msgpack, not pickle)"
    return Finding(node=node, check="python", severity=HEALTHY, message=message)


def batuta_finding(target: NodeTarget, theirs: str, ours: str) -> Finding:
    node = target.name
    if theirs == ours:
        return Finding(node=node, check="batuta", severity=HEALTHY, message=f"batuta {theirs}, as the coordinator")
    return Finding(
        node=node,
        check="batuta",
        severity=ERROR,
        message=f"batuta {theirs}, the coordinator {ours}: the pool refuses this node",
        suggestion=target.install_fix(ours),
    )


def numba_finding(target: NodeTarget, result: TaskResult | None, coordinator_numba: str | None) -> Finding:
    node = target.name
    requirement = f"numba=={coordinator_numba}" if coordinator_numba else "numba"
    if result is None or result.status is not TaskStatus.SUCCEEDED:
        why = result_error(result) if result is not None else "not run"
        return Finding(
            node=node,
            check="numba",
            severity=ERROR,
            message=f"numba cannot compile and run a kernel: {why}",
            suggestion=f"install numba for the agent's Python: {_pip(target, requirement)}",
        )
    value = result.value if isinstance(result.value, dict) else {}
    expected = sum(i * i for i in range(_SMOKE_N))
    if value.get("value") != expected:
        return Finding(
            node=node,
            check="numba",
            severity=ERROR,
            message=f"numba compiled a kernel that returned {value.get('value')!r}, expected {expected}",
            suggestion=f"reinstall numba and llvmlite there: {_pip(target, requirement)}",
        )
    seconds = float(value.get("compile_run_s") or 0.0)
    message = f"numba {value.get('numba')} compiles and runs a kernel ({seconds:.2f} s with import and compile)"
    return Finding(node=node, check="numba", severity=HEALTHY, message=message)


def gpu_findings(session: NodeSession, facts: NodeFacts) -> list[Finding]:
    """CUDA and NVML, where GPUs are declared in the file or found by the agent."""
    target = session.target
    node = target.name
    gpus_seen = session.hello.gpus
    if not target.declares_gpus and not gpus_seen and not session.gpu_slots:
        why = 'gpus = "none"' if target.gpus == "none" else "none found"
        return [
            Finding(node=node, check="gpu", severity=HEALTHY, message=f"no GPUs ({why}): CUDA and NVML not checked")
        ]
    if target.gpus == "none" and not session.gpu_slots:  # left out on purpose: an error failed every gate
        seen = f"{len(gpus_seen)} GPU{'s' if len(gpus_seen) != 1 else ''}"
        message = f'{seen} here, not used (gpus = "none"): CUDA and NVML not checked'
        return [Finding(node=node, check="gpu", severity=HEALTHY, message=message)]
    found: list[Finding] = []
    nvml = (facts.info or {}).get("nvml") or {}
    status = str(nvml.get("status") or facts.info_error or "unknown")
    unrunnable = _fake_gpus_without_simulator(node, status, facts)
    if unrunnable is not None:
        return [unrunnable]
    if status == "ok":
        count = len(nvml.get("gpus") or [])
        message = f"NVML answers: driver {nvml.get('driver')}, CUDA {nvml.get('cuda_driver')}, {count} GPU(s)"
        found.append(Finding(node=node, check="nvml", severity=HEALTHY, message=message))
    elif status == "fake":
        found.append(
            Finding(
                node=node,
                check="nvml",
                severity=WARNING,
                message=f"NVML not asked: the agent reports fake GPUs ({node_kernels.FAKE_GPUS_ENV} is set)",
                suggestion=f"unset {node_kernels.FAKE_GPUS_ENV} in {node}'s env outside tests",
            )
        )
    else:
        found.append(
            Finding(
                node=node,
                check="nvml",
                severity=ERROR,
                message=f"NVML does not work: {status}",
                suggestion=(
                    f"install the NVIDIA driver on {node} and nvidia-ml-py for the agent's Python; "
                    "nvidia-smi should list the GPUs"
                ),
            )
        )
    if not session.gpu_slots:
        declared = f"gpus = [{target.gpus}] in the cluster file" if target.declares_gpus else "GPUs were found"
        found.append(
            Finding(
                node=node,
                check="cuda",
                severity=ERROR,
                message=f"{declared}, but the agent offers no GPU slot",
                suggestion=f"check CUDA_VISIBLE_DEVICES and 'gpus' for {node}",
            )
        )
        return found
    if not facts.cuda:
        found.append(_cuda_finding(target, None, None, several=False))
        return found
    several = len(facts.cuda) > 1
    uuids = {g.index: g.uuid for g in gpus_seen}
    found.extend(
        _cuda_finding(target, index, result, several=several, uuid=uuids.get(index, ""))
        for index, result in sorted(facts.cuda.items())
    )
    return found


def _fake_gpus_without_simulator(node: str, nvml_status: str, facts: NodeFacts) -> Finding | None:
    """Fake GPUs, numba's simulator off, and no GPU ran the smoke test: one finding naming the
    setting. It said "NVML not asked" and, per GPU, to check the driver and install numba-cuda."""
    env = (facts.info or {}).get("env") or {}
    simulator = str(env.get(node_kernels.CUDASIM_ENV, "")) not in ("", "0")
    ran = any(r.status is TaskStatus.SUCCEEDED for r in (facts.cuda or {}).values())
    if nvml_status != "fake" or simulator or ran or not facts.cuda:
        return None
    fake = node_kernels.FAKE_GPUS_ENV
    return Finding(
        node=node,
        check="cuda",
        severity=ERROR,
        message=f"fake GPUs ({fake}={env.get(fake, '?')}) without numba's CUDA simulator: no kernel runs on them",
        suggestion=f'set {node_kernels.CUDASIM_ENV} = "1" beside {fake} in {node}\'s env, or unset {fake}',
    )


def _cuda_finding(
    target: NodeTarget, index: int | None, result: TaskResult | None, *, several: bool, uuid: str = ""
) -> Finding:
    """What the CUDA smoke test on GPU `index`'s slot says (named by GPU where a node has several).
    `uuid`: that GPU's, as NVML told the agent; the card the kernel ran on must be it (a slot is
    pinned by UUID, so a GPU row that names another card means the pinning failed)."""
    node = target.name
    gpu = f"GPU {index}: " if several else ""
    if result is None or result.status is not TaskStatus.SUCCEEDED:
        why = result_error(result) if result is not None else "not run"
        return Finding(
            node=node,
            check="cuda",
            severity=ERROR,
            message=f"{gpu}CUDA cannot compile and run a kernel: {why}",
            suggestion=f"check the driver (nvidia-smi) and numba-cuda on {node}: {_pip(target, 'numba-cuda')}",
        )
    value = result.value if isinstance(result.value, dict) else {}
    expected = float(sum(2.0 * i for i in range(_SMOKE_N)))
    seconds = float(value.get("compile_run_s") or 0.0)
    if value.get("value") != expected:
        return Finding(
            node=node,
            check="cuda",
            severity=ERROR,
            message=f"{gpu}a CUDA kernel returned {value.get('value')!r}, expected {expected}",
            suggestion=f"check the GPU and driver of {node} (nvidia-smi -q; dmesg for Xid errors)",
        )
    if value.get("simulator"):
        return Finding(
            node=node,
            check="cuda",
            severity=WARNING,
            message=f"{gpu}CUDA kernels run under numba's simulator ({node_kernels.CUDASIM_ENV}=1), not on a GPU",
            suggestion=f"unset {node_kernels.CUDASIM_ENV} in {node}'s env to use its GPUs",
        )
    ran_on = str(value.get("uuid") or "")
    if uuid.startswith("GPU-") and _uuid_digits(ran_on) and _uuid_digits(ran_on) != _uuid_digits(uuid):
        return Finding(
            node=node,
            check="cuda",
            # a warning, not an error, until this is seen on a node of several real GPUs: a
            # binding that wrote the UUID otherwise would fail every healthy card (--strict fails it)
            severity=WARNING,
            message=f"{gpu}the kernel for GPU {index} ({uuid}) ran on another card, {ran_on}",
            suggestion=f"compare nvidia-smi -L on {node}; its GPU tasks and readings would name the wrong card",
        )
    capability = value.get("compute_capability")
    card = ", ".join(part for part in (f"compute {capability}" if capability else "", ran_on) if part)
    device = f"{value.get('device')}" + (f" ({card})" if card else "")
    return Finding(
        node=node,
        check="cuda",
        severity=HEALTHY,
        message=f"{gpu}CUDA compiles and runs a kernel on {device} ({seconds:.2f} s)",
    )


def _uuid_digits(uuid: str) -> str:
    """The 32 hex digits of a GPU UUID as NVML ("GPU-2b5c...-...") or CUDA writes it, or "" for
    anything else (a fake GPU's, the simulator's, a format this does not know: never compared)."""
    digits = "".join(c for c in uuid.lower().removeprefix("gpu-") if c != "-")
    return digits if len(digits) == 32 and all(c in "0123456789abcdef" for c in digits) else ""


def _wanted(minimum_gb: float) -> str:
    return f"error below {minimum_gb:g} GiB, warning below {minimum_gb * WARN_FACTOR:g} GiB"


def _level(free: float, minimum_gb: float) -> str:
    if free < minimum_gb * GIB:
        return ERROR
    return WARNING if free < minimum_gb * GIB * WARN_FACTOR else HEALTHY


def disk_finding(node: str, info: Mapping[str, Any], thresholds: Thresholds) -> Finding:
    disks = [d for d in info.get("disks") or [] if "free" in d]
    if not disks:
        errors = "; ".join(str(d.get("error")) for d in info.get("disks") or []) or "no answer"
        return Finding(
            node=node,
            check="disk",
            severity=WARNING,
            message=f"cannot read free disk space: {errors}",
            suggestion=f"check that the temp and home folders exist on {node}",
        )
    tightest = min(disks, key=lambda d: d["free"])
    severity = _level(tightest["free"], thresholds.min_free_disk_gb)
    shown = ", ".join(f"{_gib(d['free'])} free in {d['path']}" for d in disks)
    if severity == HEALTHY:
        return Finding(node=node, check="disk", severity=HEALTHY, message=shown)
    return Finding(
        node=node,
        check="disk",
        severity=severity,
        message=f"{shown} ({_wanted(thresholds.min_free_disk_gb)})",
        suggestion=f"free space in {tightest['path']} on {node}, or lower {thresholds.disk_setting}",
    )


def memory_finding(node: str, info: Mapping[str, Any], thresholds: Thresholds) -> Finding:
    memory = info.get("memory") or {}
    if "available" not in memory:
        return Finding(
            node=node,
            check="memory",
            severity=WARNING,
            message=f"cannot read available memory: {memory.get('error', 'no answer')}",
            suggestion=f"install psutil for the agent's Python on {node}",
        )
    available, total = int(memory["available"]), int(memory.get("total") or 0)
    severity = _level(available, thresholds.min_free_memory_gb)
    shown = f"{_gib(available)} available of {_gib(total)}"
    if severity == HEALTHY:
        return Finding(node=node, check="memory", severity=HEALTHY, message=shown)
    return Finding(
        node=node,
        check="memory",
        severity=severity,
        message=f"{shown} ({_wanted(thresholds.min_free_memory_gb)})",
        suggestion=f"stop what holds memory on {node}, or lower {thresholds.memory_setting}",
    )


def check_findings(
    session: NodeSession, facts: NodeFacts, coordinator: Mapping[str, str | None], thresholds: Thresholds
) -> list[Finding]:
    """Every `check` finding for one reached node, in the order of the module docstring."""
    target, hello = session.target, session.hello
    found = [
        reach_finding(session),
        python_finding(target, hello.python_version, str(coordinator.get("python"))),
        batuta_finding(target, hello.batuta_version, str(coordinator.get("batuta"))),
        numba_finding(target, facts.numba, coordinator.get("numba")),
        *gpu_findings(session, facts),
    ]
    slots = slots_finding(session)
    if slots is not None:
        found.insert(1, slots)
    if facts.info is None:
        ours_batuta = coordinator.get("batuta")
        found.append(
            Finding(
                node=target.name,
                check="facts",
                severity=ERROR,
                message=f"cannot read the node's disk, memory and NVML facts: {facts.info_error}",
                suggestion=target.install_fix(str(ours_batuta)),
            )
        )
    else:
        found += [
            disk_finding(target.name, facts.info, thresholds),
            memory_finding(target.name, facts.info, thresholds),
        ]
    return found
