"""Device-resident values through a real pool: a local agent with one CPU slot and one fake
GPU slot running numba's CUDA simulator (on a GPU host, `BATUTA_REAL_GPU=1` runs the same
tests on the card). Put values are uploaded once and reused, kept GPU results stay on the
device through a chain, CPU tasks and `pool.get` get them copied back, eviction loses nothing."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from batuta import ObjectRef, Pool, Task
from batuta.core.task import Backend, TaskStatus, gpu_index_of
from batuta.runtime import events as pe
from batuta.runtime.builder import PoolConfig, local_host
from tests.test_pool import REPO

GPU_KERNELS = "tests.support.gpu_value_kernels"
REAL_GPU = os.environ.get("BATUTA_REAL_GPU") == "1"
N = 4096  # float64: 32 KiB


def gpu_pool(**env: str) -> Pool:
    environ = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **env}
    if not REAL_GPU:
        environ |= {"BATUTA_FAKE_GPUS": "1", "NUMBA_ENABLE_CUDASIM": "1"}
    host = local_host(1, gpus="auto", kernel_modules=[GPU_KERNELS], env=environ)
    return Pool([host], PoolConfig())


@pytest.fixture
async def pool() -> AsyncIterator[Pool]:
    async with gpu_pool() as p:
        yield p


def on_gpu(name: str, *args: object) -> Task:
    return Task.kernel(name, *args, backend=Backend.GPU)


def on_cpu(name: str, *args: object) -> Task:
    return Task.kernel(name, *args, backend=Backend.CPU)


async def device_cache(pool: Pool, values: int, timeout: float = 30.0) -> pe.GpuReading:
    """The first heartbeat's reading of GPU 0 whose device cache holds `values` values."""
    seen: asyncio.Queue[pe.GpuReading] = asyncio.Queue()

    def on_event(event: object) -> None:
        if isinstance(event, pe.HostTelemetry) and event.gpus:
            seen.put_nowait(event.gpus[0])

    unsubscribe = pool.subscribe(on_event)
    try:
        async with asyncio.timeout(timeout):
            while (reading := await seen.get()).cached_values != values:
                pass
            return reading
    finally:
        unsubscribe()


async def value(pool: Pool, task: Task, *, keep: bool = False) -> Any:
    result = await (await pool.submit(task, keep=keep))
    assert result.is_success(), result.error
    return result.value


async def test_a_put_array_is_uploaded_once_and_every_gpu_task_gets_that_copy(pool: Pool) -> None:
    x = np.arange(N, dtype=np.float64)
    ref = pool.put(x)
    places = [await value(pool, on_gpu("test_where", ref)) for _ in range(3)]
    assert places[0][0] == "device" and places == [places[0]] * 3  # the same device pointer each time
    assert await value(pool, on_gpu("test_total", ref)) == x.sum()
    assert (await value(pool, on_cpu("test_where", ref)))[0] == "host"


async def test_a_chain_of_kept_gpu_results_stays_on_the_device_until_get(pool: Pool) -> None:
    x = np.linspace(0.0, 1.0, N)
    ref = pool.put(x)
    first = await value(pool, on_gpu("test_scale", ref, 2.0), keep=True)
    assert isinstance(first, ObjectRef) and first.shape == (N,) and first.dtype == "<f8" and first.nbytes == N * 8
    second = await value(pool, on_gpu("test_scale", first, 3.0), keep=True)
    assert isinstance(second, ObjectRef)
    # the put value's copy and both results: the results never went to the host and back
    reading = await device_cache(pool, 3)
    assert reading.cached_bytes == 3 * N * 8 and reading.cache_cap > reading.cached_bytes
    where = await value(pool, on_gpu("test_where", second))
    assert where[0] == "device" and where == await value(pool, on_gpu("test_where", second))
    np.testing.assert_allclose(await pool.get(second), x * 6.0)
    np.testing.assert_allclose(await pool.get(first), x * 2.0)
    # not kept: the result comes back to the host as before
    np.testing.assert_allclose(await value(pool, on_gpu("test_scale", second, 0.5)), x * 3.0)


async def test_a_cpu_task_gets_a_device_resident_value_copied_back(pool: Pool) -> None:
    x = np.arange(N, dtype=np.float64)
    ref = pool.put(x)
    kept = await value(pool, on_gpu("test_scale", ref, 4.0), keep=True)
    assert await value(pool, on_cpu("test_total", kept)) == (x * 4.0).sum()
    assert (await value(pool, on_cpu("test_where", kept)))[0] == "host"
    assert (await value(pool, on_gpu("test_where", kept)))[0] == "device"  # still there too


@pytest.mark.skipif(REAL_GPU, reason="this host has a GPU: fake GPUs' slots run on it")
async def test_fake_gpus_without_the_simulator_fail_every_gpu_task_naming_the_setting() -> None:
    """A GPU task with a put value failed "slot 1 failed to run the task: CudaSupportError:
    ... driver library cannot be found", one without "no usable CUDA device": neither said
    that NUMBA_ENABLE_CUDASIM was the setting missing beside BATUTA_FAKE_GPUS."""
    environ = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    environ |= {"BATUTA_FAKE_GPUS": "1", "NUMBA_ENABLE_CUDASIM": "0"}
    host = local_host(1, gpus="auto", kernel_modules=[GPU_KERNELS], env=environ)
    async with Pool([host], PoolConfig()) as pool:
        ref = pool.put(np.arange(N, dtype=np.float64))
        for task in (on_gpu("test_where", ref), on_gpu("vadd", np.ones(4), np.ones(4))):
            failed = await (await pool.submit(task))
            assert failed.status is TaskStatus.FAILED and failed.error is not None
            assert "BATUTA_FAKE_GPUS=1" in failed.error and "set NUMBA_ENABLE_CUDASIM=1" in failed.error, failed.error
        assert (await pool.run(on_cpu("test_where", ref))).status is TaskStatus.SUCCEEDED  # the CPU slot works


async def test_eviction_under_a_small_cap_loses_no_value() -> None:
    async with gpu_pool(BATUTA_GPU_CACHE=str(2 * N * 8 + 100)) as pool:  # room for two arrays
        xs = [np.full(N, float(i)) for i in range(4)]
        refs = [pool.put(x) for x in xs]
        kept = [await value(pool, on_gpu("test_scale", r, 10.0), keep=True) for r in refs]
        for ref, x in zip(refs, xs, strict=True):  # every upload evicts older copies
            assert await value(pool, on_gpu("test_total", ref)) == x.sum()
        for ref, x in zip(kept, xs, strict=True):
            np.testing.assert_array_equal(await pool.get(ref), x * 10.0)
            assert await value(pool, on_gpu("test_total", ref)) == (x * 10.0).sum()
        reading = await device_cache(pool, 2)  # never more than the cap holds
        assert reading.cached_bytes == 2 * N * 8 and reading.cache_cap == 2 * N * 8 + 100
        for ref in refs + kept:
            pool.drop(ref)
        await device_cache(pool, 0)  # dropped values leave the card too


# -- the seed's workloads with their data resident on the GPU slot -----------------------------


async def test_kmeans_on_the_gpu_slot_keeps_its_data_there_and_matches_the_reference(pool: Pool) -> None:
    from batuta.jobs import kmeans

    result = await kmeans.run_kmeans(pool, n=3_000, d=4, k=5, iterations=3, backend=Backend.GPU)
    assert len(result.bounds) == 1 and result.tasks == 3  # one chunk per GPU slot, put once
    centroids, inertia = kmeans.reference_of(result)
    np.testing.assert_allclose(result.centroids, centroids, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(result.inertia, inertia, rtol=1e-9)


async def test_mlp_on_the_gpu_slot_matches_full_batch_training(pool: Pool) -> None:
    from batuta.jobs import mlp

    result = await mlp.run_mlp(pool, n=600, d=6, hidden=8, classes=3, steps=3, backend=Backend.GPU)
    assert result.data is not None
    x, y = result.data.rows(0, 600)
    params, losses = mlp.mlp_reference(x, y, result.initial, 3, mlp.LR)
    np.testing.assert_allclose(result.losses, losses, rtol=1e-9)
    for got, want in zip(result.params, params, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


JOB = """
from batuta.jobs import job_backend, kmeans


async def main(pool):
    result = await kmeans.run_kmeans(pool, n=2_000, d=4, k=4, iterations=2)
    centroids, _ = kmeans.reference_of(result)
    assert abs(result.centroids - centroids).max() < 1e-9
    print("backend", job_backend().value, "chunks", len(result.bounds))
"""


def test_run_backend_gpu_is_the_backend_of_the_built_in_jobs(tmp_path: Path) -> None:
    job = tmp_path / "small_kmeans.py"
    job.write_text(JOB)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if not REAL_GPU:
        env |= {"BATUTA_FAKE_GPUS": "1", "NUMBA_ENABLE_CUDASIM": "1"}
    argv = [sys.executable, "-m", "batuta", "run", str(job), "--backend", "gpu", "--workers", "1", "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "backend gpu chunks 1" in done.stderr  # with --json the job's prints go to stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["ok"] and summary["succeeded"] == 2, summary


@pytest.mark.skipif(not REAL_GPU, reason="set BATUTA_REAL_GPU=1 on a host with a GPU")
async def test_a_gpu_task_out_of_device_memory_fails_alone_and_its_slot_lives_on(pool: Pool) -> None:
    """On a real card: a kernel that asks for more than the card has free fails with CUDA's
    out-of-memory error, in its one attempt, and the slot process lives on with its cached
    values (a GPU slot forked from the agent died of SIGSEGV there instead)."""
    ref = pool.put(np.ones(1 << 30 >> 3, dtype=np.float64))
    assert (await value(pool, on_gpu("test_where", ref)))[0] == "device"
    pid, free = await value(pool, on_gpu("test_grab", 0))
    failed = await (await pool.submit(on_gpu("test_grab", free + (2 << 30))))
    assert failed.status is TaskStatus.FAILED and failed.attempts == 1, (failed.status, failed.attempts)
    assert failed.error is not None and "CUDA_ERROR_OUT_OF_MEMORY" in failed.error, failed.error
    assert (await value(pool, on_gpu("test_grab", 0)))[0] == pid  # the same process
    assert (await value(pool, on_gpu("test_where", ref)))[0] == "device"


async def test_a_sticky_cuda_error_restarts_its_slot_and_the_gpu_works_again(pool: Pool) -> None:
    """After an illegal address the process's CUDA context is unusable: the slot went on, and
    every later task on that GPU failed the same way. It answers the task, then restarts."""
    restarts: list[str] = []
    pool.subscribe(
        lambda e: restarts.append(e.reason) if isinstance(e, pe.SlotStateChanged) and e.state == "restarting" else None
    )
    before = await value(pool, on_gpu("test_pid"))
    faulted = await pool.run(on_gpu("test_fault", 3))
    assert faulted.status is TaskStatus.FAILED and "CUDA_ERROR_ILLEGAL_ADDRESS" in (faulted.error or "")
    after = await value(pool, on_gpu("test_pid"))  # the same GPU slot, a new process: it works
    assert after != before
    assert len(restarts) == 1 and "left after a sticky CUDA error" in restarts[0]
    assert await value(pool, on_gpu("test_where", np.arange(4.0))) is not None


async def test_a_binary_that_requires_a_gpu_runs_on_its_slot_and_sees_that_gpu_alone() -> None:
    """A compiled CUDA program run as `Task.binary(..., requires=["gpu:1"])` was unschedulable
    ("no slot offers cpu, gpu:1": a binary asked for a CPU slot as well); it runs on GPU 1's
    slot, with CUDA_VISIBLE_DEVICES naming that GPU alone, and without the CUDA memory manager
    and the per-thread default stream the agent set for its own kernels (a numba program's
    Python need not have batuta; a binary's streams are its own choice, from the user's
    environment)."""
    environ = {"BATUTA_FAKE_GPUS": "2", "NUMBA_ENABLE_CUDASIM": "1"}  # fake ones, even on a GPU host
    script = 'echo "$CUDA_VISIBLE_DEVICES|${NUMBA_CUDA_MEMORY_MANAGER-unset}|'
    script += '${CUDA_PYTHON_CUDA_PER_THREAD_DEFAULT_STREAM-unset}|${BATUTA_AGENT_SET_ENV-unset}"'
    async with Pool([local_host(1, gpus="auto", env=environ)], PoolConfig()) as pool:
        slots = {s.slot_id: s.capabilities for s in pool.slots()}
        for requires, gpu in ((["gpu:1"], "1"), (["gpu:0"], "0"), (["gpu"], None)):
            result = await (await pool.submit(Task.binary("/bin/sh", "-c", script, requires=requires)))
            assert result.is_success(), result.error
            assert result.slot is not None and "gpu" in slots[result.slot], (requires, result.slot)
            visible, manager, stream, marker = result.stdout_str().strip().split("|")
            assert (manager, stream, marker) == ("unset", "unset", "unset"), result.stdout_str()
            assert visible == (gpu if gpu is not None else str(gpu_index_of(slots[result.slot]))), (requires, visible)
            assert visible in ("0", "1"), visible  # one GPU, never both
            assert result.backend is Backend.GPU
        plain = await (await pool.submit(Task.binary("/bin/sh", "-c", script)))
        assert plain.is_success() and plain.slot is not None and "cpu" in slots[plain.slot], plain
