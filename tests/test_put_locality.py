"""A GPU task that reads a put value prefers a GPU slot whose card already holds a copy of it
(core/deps.py, "Put values on GPUs"): the scheduler's rule with fake slots, then a pool of two
fake GPUs under numba's CUDA simulator."""

from __future__ import annotations

import numpy as np

from batuta import Pool, Task
from batuta.core.scheduler import Scheduler, SchedulerConfig
from batuta.core.task import Backend, gpu_capability
from batuta.runtime.builder import PoolConfig, local_host
from tests.scheduler_sim import Sim
from tests.test_pool import REPO

PUT = ((50, 8 << 20),)  # one put value of 8 MiB: over locality_min_bytes
GPU0 = ("cpu", "gpu", "gpu:0")
GPU1 = ("cpu", "gpu", "gpu:1")


def two_gpus(**config: object) -> Sim:
    sim = Sim(Scheduler(SchedulerConfig(initial_window=1, min_window=1, max_window=1, **config), seed=0))  # type: ignore[arg-type]
    sim.add_slot("g0", host_id="a", caps=GPU0)
    sim.add_slot("g1", host_id="a", caps=GPU1)
    return sim


def run_one(sim: Sim, slot_id: str) -> int | None:
    sim.start(slot_id)
    task_id = sim.finish(slot_id)
    sim.deliver(slot_id)
    return task_id


def test_a_gpu_reader_of_a_put_value_waits_for_the_gpu_holding_it_while_another_is_idle() -> None:
    sim = two_gpus()
    first = sim.submit(requires=("gpu:1",), puts=PUT)
    assert run_one(sim, "g1") == first
    busy = sim.submit(requires=("gpu:1",))  # g1 runs something else now
    sim.start("g1")
    assert sim.sched.where(busy) == ("window", "g1")
    reader = sim.submit(requires=("gpu",), puts=PUT)
    assert sim.sched.where(reader) == ("deque", "g1")  # not g0, idle but without the copy
    cpu_reader = sim.submit(requires=("cpu",), puts=PUT)
    assert sim.sched.where(cpu_reader) == ("window", "g0")  # a CPU task is placed as before
    sim.run_to_completion()
    assert sim.resolved[reader][0].slot_id == "g1"
    sim.sched.validate()


def test_a_long_deque_at_the_gpu_holding_the_copy_lets_the_other_gpu_take_work() -> None:
    sim = two_gpus(locality_slack=1)
    sim.submit(requires=("gpu:1",), puts=PUT)
    run_one(sim, "g1")
    readers = [sim.submit(requires=("gpu",), puts=PUT) for _ in range(8)]
    sim.run_to_completion()
    assert {sim.resolved[r][0].slot_id for r in readers} == {"g0", "g1"}
    sim.assert_each_resolved_once()


def test_small_put_values_and_lost_hosts_leave_no_preference() -> None:
    sim = two_gpus()
    small = ((51, 1024),)
    sim.submit(requires=("gpu:1",), puts=small + PUT)
    run_one(sim, "g1")
    assert sim.sched._deps.objects[51].copies == ["g1"] and sim.sched._deps.objects[50].copies == ["g1"]
    sim.submit(requires=("gpu:1",))
    sim.start("g1")
    reader = sim.submit(requires=("gpu",), puts=small)
    assert sim.sched.where(reader) == ("window", "g0")  # 1 KiB is not worth waiting for
    sim.run_to_completion()
    sim.lose_host("a")
    assert sim.sched._deps.objects[50].copies == []  # the copies went with the host's cards


async def test_a_pool_runs_gpu_readers_of_a_put_value_on_the_gpu_that_holds_it() -> None:
    env = {"BATUTA_FAKE_GPUS": "2", "NUMBA_ENABLE_CUDASIM": "1", "PYTHONPATH": str(REPO)}
    config = PoolConfig(scheduler=SchedulerConfig(locality_min_bytes=1024))
    async with Pool([local_host(1, gpus="auto", env=env)], config) as pool:
        ref = pool.put(np.ones(1024, dtype=np.float32))
        first = await pool.run(Task.kernel("sum", ref, backend=Backend.GPU, requires=[gpu_capability(1)]))
        readers = [await pool.run(Task.kernel("sum", ref, backend=Backend.GPU)) for _ in range(4)]
    assert first.is_success() and first.device.startswith("Fake GPU 1 ("), first.error
    assert [r.value for r in readers] == [1024.0] * 4
    assert [r.device.split(" (")[0] for r in readers] == ["Fake GPU 1"] * 4


async def test_gpu_tasks_submitted_together_run_one_on_each_gpu() -> None:
    """Three GPU tasks at once on three idle GPUs ran in the first GPU slot's window, one
    after another (each GPU slot, with its own "gpu:N", was a lone slot of its kind to the
    scheduler's tail rule): one per GPU, as CPU tasks spread over CPU slots."""
    env = {"BATUTA_FAKE_GPUS": "3", "NUMBA_ENABLE_CUDASIM": "1", "PYTHONPATH": str(REPO)}
    async with Pool([local_host(1, gpus="auto", env=env)], PoolConfig()) as pool:
        pool.pause()  # all three wait in the queue: where they go is the scheduler's choice alone
        futures = [await pool.submit(Task.kernel("sum", np.ones(8), backend=Backend.GPU)) for _ in range(3)]
        pool.resume()
        results = [await future for future in futures]
    assert all(r.is_success() for r in results), [r.error for r in results]
    assert sorted(r.device.split(" (")[0] for r in results) == ["Fake GPU 0", "Fake GPU 1", "Fake GPU 2"]
