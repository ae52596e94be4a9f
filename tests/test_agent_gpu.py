"""The agent on a host with real NVIDIA GPUs: NVML facts in Hello, readings in heartbeats,
one pinned slot per GPU. Skipped where NVML sees no GPU (CI, laptops); run on a GPU host."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from batuta.agent.main import _visible
from batuta.agent.telemetry import SystemTelemetry
from batuta.core.task import Outcome
from batuta.protocol.messages import GpuInfo, Run
from tests.test_agent_harness import StartAgent, binary_task, kernel_task, start_agent

__all__ = ["start_agent"]

# A kernel that asks the CUDA driver (through ctypes, no numba needed) what it can see.
CUDA_PROBE = """
import ctypes

from batuta.kernels.registry import kernel


@kernel("test_cuda_probe")
def cuda_probe():
    cuda = ctypes.CDLL("libcuda.so.1")
    status = cuda.cuInit(0)
    if status != 0:
        return [status, 0, "", ""]
    count = ctypes.c_int()
    cuda.cuDeviceGetCount(ctypes.byref(count))
    device = ctypes.c_int()
    cuda.cuDeviceGet(ctypes.byref(device), 0)
    name = ctypes.create_string_buffer(256)
    cuda.cuDeviceGetName(name, 256, device)
    uuid = (ctypes.c_ubyte * 16)()
    cuda.cuDeviceGetUuid(uuid, device)
    return [status, count.value, name.value.decode(), bytes(uuid).hex()]
"""


def _real_gpus() -> tuple[GpuInfo, ...]:
    telemetry = SystemTelemetry()
    try:
        return telemetry.gpu_infos()
    finally:
        telemetry.close()


GPUS = _real_gpus()
pytestmark = pytest.mark.skipif(not GPUS, reason="no NVIDIA GPU visible to NVML")


async def test_real_gpus_are_reported_sampled_and_pinned(start_agent: StartAgent) -> None:
    agent = await start_agent("--slots", "1", "--gpus", "auto", heartbeat_interval=0.1)
    hello = agent.hello
    assert hello is not None
    assert hello.gpus == GPUS
    for gpu in hello.gpus:
        print(f"\nGPU {gpu.index}: {gpu.name} {gpu.uuid} {gpu.memory_total / 2**30:.0f} GiB, {gpu.compute_units} SMs")
        assert gpu.name and gpu.uuid.startswith("GPU-")
        assert gpu.memory_total > 0 and gpu.compute_units > 0
    visible = _visible(GPUS, os.environ.get("CUDA_VISIBLE_DEVICES"))
    gpu_slots = [s for s in hello.slots if s.capabilities == ("gpu",)]
    assert [s.gpu_index for s in gpu_slots] == [g.index for g in visible]

    beats = await agent.heartbeats(2)
    beat = beats[-1]
    print(f"heartbeat: {beat}")
    assert beat.gpu_status == ""
    assert [g.index for g in beat.gpus] == [g.index for g in GPUS]
    for sample in beat.gpus:
        assert sample.utilization is not None and 0 <= sample.utilization <= 100
        assert sample.memory_total and sample.memory_used is not None
        assert sample.temperature is not None and sample.power is not None

    if gpu_slots:
        agent.send(Run(tasks=(binary_task(1, "/bin/sh", "-c", "echo $CUDA_VISIBLE_DEVICES", slot=gpu_slots[0].slot),)))
        outcome = await agent.outcome(1)
        assert outcome.status == Outcome.OK
        assert outcome.stdout.decode().strip() == visible[0].uuid


async def test_cuda_in_a_gpu_slot_sees_only_its_gpu(start_agent: StartAgent, tmp_path: Path) -> None:
    """CUDA initialises in a slot process (forked from an agent that ran NVML) and sees
    exactly the GPU the slot is pinned to."""
    (tmp_path / "batuta_cuda_probe.py").write_text(CUDA_PROBE)
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH", "")) if p)}
    agent = await start_agent("--slots", "0", "--gpus", "auto", "--kernel-module", "batuta_cuda_probe", env=env)
    assert agent.hello is not None
    gpu_slots = agent.hello.slots
    visible = _visible(GPUS, os.environ.get("CUDA_VISIBLE_DEVICES"))
    agent.send(
        Run(tasks=tuple(kernel_task(s.slot, "test_cuda_probe", slot=s.slot, backend="scalar") for s in gpu_slots))
    )
    for slot, gpu in zip(gpu_slots, visible, strict=True):
        outcome = await agent.outcome(slot.slot)
        assert outcome.status == Outcome.OK, outcome.error
        status, count, name, uuid = outcome.value
        print(f"\nslot {slot.slot}: cuInit={status}, {count} device(s): {name} {uuid}")
        assert (status, count, name) == (0, 1, gpu.name)
        assert uuid == gpu.uuid.removeprefix("GPU-").replace("-", "")
