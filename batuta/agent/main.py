"""Entry point of the host agent: `python -m batuta.agent --stdio ...` or `batuta agent ...`.

`main(argv)` parses the command line, takes the protocol stream off stdin/stdout, decides
the slots (CPU slots, then one per selected GPU, pinned with `CUDA_VISIBLE_DEVICES`) and runs
the `Agent` until the session ends. Exit codes: 0 after Shutdown or EOF, 1 after a protocol
error or a refused session, 2 for bad arguments, 128 + N after signal N.

Start-up is on the clock (a cluster of agents must be ready in well under a second), so
this imports only what the agent itself needs: no numba, no kernel registry, and slot
processes are spawned without waiting for each other (see `agent.py`).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
from collections.abc import Mapping

from batuta.agent.options import AgentOptions, GpuSelection, parse_args
from batuta.errors import UsageError
from batuta.protocol.messages import GpuInfo
from batuta.transport.fdio import widen_pipe

EXIT_USAGE = 2


def _claim_stdio() -> tuple[int, int]:
    """Move the protocol stream to private fds; fd 0 becomes /dev/null, fd 1 stderr.

    After this, a stray `print` (from a library, a kernel module, a warning) lands on stderr
    instead of corrupting frames, and nothing can read the coordinator's bytes by accident.
    The private fds are close-on-exec, so no child holds the coordinator's pipe open.
    """
    sys.stdout.flush()
    frames_in = os.dup(0)
    frames_out = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    return frames_in, frames_out


PER_THREAD_STREAM = "CUDA_PYTHON_CUDA_PER_THREAD_DEFAULT_STREAM"  # numba-cuda on the NVIDIA binding reads this one
MEMORY_MANAGER = "NUMBA_CUDA_MEMORY_MANAGER"
POOLED_MEMORY_MANAGER = "batuta.kernels.cuda_memory"  # named, not imported: it imports numba's driver
# The names of the variables above that the agent set for a GPU slot's own kernels, the user's
# environment having none: a binary the slot runs gets the user's environment, without them
AGENT_SET_ENV = "BATUTA_AGENT_SET_ENV"


def _visible(gpus: tuple[GpuInfo, ...], visible: str | None) -> tuple[GpuInfo, ...]:
    """The GPUs an unset-or-set `CUDA_VISIBLE_DEVICES` lets this agent use (NVML order)."""
    if visible is None:
        return gpus
    chosen: list[GpuInfo] = []
    for entry in (part.strip() for part in visible.split(",")):
        if entry.isdigit():
            match = [g for g in gpus if g.index == int(entry)]
        elif entry.startswith("GPU-"):
            match = [g for g in gpus if g.uuid and g.uuid.startswith(entry)]
        else:
            break  # CUDA stops at the first entry it cannot parse ("", "-1", MIG ids)
        if not match:
            break
        if match[0] not in chosen:
            chosen.append(match[0])
    return tuple(chosen)


def visible_devices_warning(gpus: tuple[GpuInfo, ...], environ: Mapping[str, str]) -> str | None:
    """Why `CUDA_VISIBLE_DEVICES` gives this agent fewer GPUs than it names, or None.

    CUDA (and so the agent, `_visible`) stops at the first entry it cannot find, silently: a
    MIG instance (`MIG-...`: the agent pins whole GPUs only), a number or UUID naming no GPU
    NVML can read here (a typo, a GPU this process may not open, as in a batch job whose
    devices are fenced off), and no GPU slot came from that entry on. An empty setting, "-1"
    or a word such as "NoDevFiles" hides GPUs on purpose and is not warned about."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if not visible:
        return None
    for entry in (part.strip() for part in visible.split(",")):
        if entry.startswith("MIG-"):
            return (
                f"CUDA_VISIBLE_DEVICES={visible!r} names MIG instances ({entry}), and batuta runs GPU slots on whole "
                "GPUs only, so no GPU slot from there on; name whole GPUs (nvidia-smi -L) or disable MIG on them"
            )
        if entry.isdigit():
            found = any(g.index == int(entry) for g in gpus)
        elif entry.startswith("GPU-"):
            found = any(g.uuid.startswith(entry) for g in gpus)
        else:
            return None
        if not found:
            readable = ", ".join(str(g.index) for g in gpus) or "none"
            return (
                f"CUDA_VISIBLE_DEVICES={visible!r}: {entry} is no GPU NVML can read here (GPUs: {readable}), so no GPU "
                "slot from there on, as CUDA would use none; name GPUs by nvidia-smi's numbers or UUIDs (nvidia-smi -L)"
            )
    return None


def device_order_warning(gpus: tuple[GpuInfo, ...], environ: Mapping[str, str]) -> str | None:
    """Why a numbered `CUDA_VISIBLE_DEVICES` may not name the GPUs it is read as, or None.

    The agent reads "1" as NVML's GPU 1 (PCI order, nvidia-smi's numbers) and pins its slot by
    UUID; CUDA reads it in `CUDA_DEVICE_ORDER`, by default FASTEST_FIRST: a guess of which
    GPU is fastest first, the order of the rest unspecified. Among GPUs of one model that is
    PCI order all the same; among mixed ones it cannot be known without CUDA, so the agent
    says so once rather than guess. Fake GPUs are left out: CUDA never sees them."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or environ.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID":
        return None
    models = sorted({g.name for g in gpus if g.uuid.startswith("GPU-")})
    numbered = any(entry.strip().isdigit() for entry in visible.split(","))
    if len(models) < 2 or not numbered:
        return None
    order = environ.get("CUDA_DEVICE_ORDER") or "unset (FASTEST_FIRST)"
    return (
        f"CUDA_VISIBLE_DEVICES={visible!r} is read in PCI order (nvidia-smi's numbers), but with CUDA_DEVICE_ORDER "
        f"{order} CUDA numbers this host's mixed GPUs ({', '.join(models)}) fastest first, so they may not be "
        "the GPUs meant; set CUDA_DEVICE_ORDER=PCI_BUS_ID beside it, or name the GPUs by UUID (nvidia-smi -L)"
    )


def plan_gpu_slots(
    selection: GpuSelection,
    gpus: tuple[GpuInfo, ...],
    gpu_status: str,
    environ: Mapping[str, str],
) -> tuple[tuple[GpuInfo, dict[str, str]], ...]:
    """One (GPU, environment overrides) per GPU slot. Raises UsageError for absent indices."""
    if selection.mode == "none":
        return ()
    if selection.mode == "auto":
        chosen = _visible(gpus, environ.get("CUDA_VISIBLE_DEVICES"))
    else:
        by_index = {g.index: g for g in gpus}
        missing = [i for i in selection.indices if i not in by_index]
        if missing:
            have = ", ".join(str(g.index) for g in gpus) or f"none: {gpu_status or 'no GPU'}"
            raise UsageError(
                f"--gpus {','.join(map(str, selection.indices))}: "
                f"no GPU {','.join(map(str, missing))} on this host (GPUs: {have})"
            )
        visible_setting = environ.get("CUDA_VISIBLE_DEVICES")
        if visible_setting is not None:
            # A batch scheduler's (Slurm's) setting names the GPUs this job was given: listed
            # GPUs outside it were used all the same, someone else's on a shared node.
            visible = {g.index for g in _visible(gpus, visible_setting)}
            hidden = [i for i in selection.indices if i not in visible]
            if hidden:
                allowed = ", ".join(str(i) for i in sorted(visible)) or "none"
                raise UsageError(
                    f"--gpus {','.join(map(str, selection.indices))}: GPU {','.join(map(str, hidden))} is not among "
                    f"those CUDA_VISIBLE_DEVICES={visible_setting!r} lets this agent use ({allowed}; a batch scheduler "
                    'may have set it); list only those, or use gpus = "auto", which takes them all'
                )
        chosen = tuple(by_index[i] for i in selection.indices)
    plan = []
    for gpu in chosen:
        # A UUID pins the right device whatever order CUDA enumerates in; fake GPUs have no
        # real UUID, so they fall back to the index in PCI order (NVML's order).
        device = gpu.uuid if gpu.uuid.startswith("GPU-") else str(gpu.index)
        overrides = {"CUDA_VISIBLE_DEVICES": device, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
        # Each thread its own default stream: the slot's uploader thread copies the next task's
        # values while the main thread's kernels run (agent/device_values.py), unless the user
        # chose otherwise.
        overrides[PER_THREAD_STREAM] = environ.get(PER_THREAD_STREAM, "1")
        # Device memory from CUDA's stream-ordered pool, not a cuMemAlloc per array and a
        # device-wide synchronisation per free (kernels/cuda_memory.py), unless the user chose
        # a manager (RMM, or numba's "default").
        overrides[MEMORY_MANAGER] = environ.get(MEMORY_MANAGER, POOLED_MEMORY_MANAGER)
        added = [name for name in (PER_THREAD_STREAM, MEMORY_MANAGER) if name not in environ]
        if added:
            overrides[AGENT_SET_ENV] = ",".join(added)
        plan.append((gpu, overrides))
    return tuple(plan)


def check_host(options: AgentOptions) -> None:
    """What the agent checks at its start, and that its kernel modules are there, for `batuta
    worker` to check before it listens: one that listened with GPUs or modules it did not
    have failed every coordinator, the reason in its log alone. (An agent started over SSH
    runs without a missing kernel module, saying so once: its other kernels work.)"""
    from batuta.agent.telemetry import open_telemetry

    try:
        telemetry = open_telemetry()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        gpu_slots = plan_gpu_slots(options.gpus, telemetry.gpu_infos(), telemetry.gpu_status(), os.environ)
        _warn_gpu_choice(options.gpus, telemetry.gpu_infos())
    finally:
        telemetry.close()
    if options.cpu_slots == 0 and not gpu_slots:  # (a coordinator's host says it is up with no slot)
        raise UsageError("--slots 0 and no GPU slot: this worker would offer no slots at all; give --slots N or GPUs")
    for module in options.kernel_modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package that is missing or fails
            found = False
        if not found:
            raise UsageError(
                f"--kernel-module {module}: no such module on this host's Python ({sys.executable}); install it "
                "there, or leave it out"
            )


def _error(message: str) -> None:
    print(f"batuta agent: error: {message}", file=sys.stderr, flush=True)


def _warn_gpu_choice(selection: GpuSelection, gpus: tuple[GpuInfo, ...]) -> None:
    """Say once, on stderr (the coordinator's log), where CUDA_VISIBLE_DEVICES may not give the
    GPUs it was meant to."""
    if selection.mode == "none":
        return
    for warning in (visible_devices_warning(gpus, os.environ), device_order_warning(gpus, os.environ)):
        if warning is not None:
            print(f"batuta agent: warning: {warning}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    """Run the agent with `argv` (no program name); returns the exit code."""
    try:
        options: AgentOptions = parse_args(argv)
    except UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0

    from batuta.agent.agent import Agent
    from batuta.agent.telemetry import open_telemetry

    try:
        telemetry = open_telemetry()
    except ValueError as exc:
        _error(str(exc))
        return EXIT_USAGE
    try:
        gpus = telemetry.gpu_infos()
        gpu_slots = plan_gpu_slots(options.gpus, gpus, telemetry.gpu_status(), os.environ)
    except UsageError as exc:
        telemetry.close()
        _error(str(exc))
        return EXIT_USAGE
    _warn_gpu_choice(options.gpus, gpus)
    frames_in, frames_out = _claim_stdio()
    widen_pipe(frames_out)  # results with arrays; a no-op unless the coordinator's end is a pipe
    agent = Agent(
        options,
        telemetry,
        frames_in=frames_in,
        frames_out=frames_out,
        gpus=gpus,
        gpu_slots=gpu_slots,
    )
    try:
        return asyncio.run(agent.run())
    finally:
        telemetry.close()
