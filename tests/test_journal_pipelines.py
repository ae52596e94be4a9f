"""The job journal and tasks that feed tasks: a resumed pipeline restores what it journaled,
and reruns a consumer whenever what it read may differ (its producer's arguments or code)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from batuta import Pool, Task, TaskResult
from batuta.observers.journal import JOURNAL_FILE, Journal, JournalStore
from batuta.observers.journal_records import read_journal
from batuta.runtime.pool import PoolConfig, local_host

REPO = Path(__file__).resolve().parents[1]
JOURNAL_LOG = "batuta.observers.journal"

Producer = Callable[[int], Task]


def pure_producer(i: int) -> Task:
    return Task.kernel("noop", np.full(1000, float(i)))  # noop is registered pure


def place_producer(i: int) -> Task:
    return Task.kernel("test_fill", 1000, float(i))  # known only on the hosts: keyed by place


def make_pool(modules: list[Path] | None = None) -> Pool:
    if modules:
        return Pool.builder().cpu_workers(2).gpu_workers("none").modules(modules).build()
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    host = local_host(2, gpus="none", kernel_modules=["tests.support.misbehaving_kernels"], env=env)
    return Pool([host], PoolConfig())


async def pipeline(
    journal_dir: Path,
    *,
    resume: bool,
    producers: list[Task],
    keep: bool,
    modules: list[Path] | None = None,
) -> tuple[list[float], list[TaskResult], int]:
    """Per producer: producer -> saxpy(2, p, p) -> vadd(c, c), each submitted before the one
    it reads has finished (kept or fed). Returns the sums, every result, and the tasks run."""
    journal = await Journal.open(journal_dir, job="pipe", resume=resume)
    async with make_pool(modules) as pool:
        pool.set_result_store(JournalStore(journal, resume=resume))
        with pool.job("pipe"):
            futures = []
            for make in producers:
                p = pool.submit_nowait(make, keep=keep)
                c1 = pool.submit_nowait(Task.kernel("saxpy", 2.0, p, p), keep=keep)
                futures += [p, c1, pool.submit_nowait(Task.kernel("vadd", c1, c1))]
            results = [await f for f in futures]
        ran = pool.stats().submitted
    await journal.close()
    assert all(r.is_success() for r in results), [r.error for r in results]
    return [float(np.sum(r.value)) for r in results[2::3]], results, ran


def expected(values: list[float], n: int = 1000) -> list[float]:
    return [(3 * v) * 2 * n for v in values]


@pytest.mark.parametrize("keep", [False, True], ids=["fed", "kept"])
@pytest.mark.parametrize("make", [pure_producer, place_producer], ids=["pure", "not-pure"])
async def test_a_resumed_pipeline_restores_every_journaled_task_and_runs_none(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, keep: bool, make: Producer
) -> None:
    """A consumer's key named its producer's value when the producer had finished, and how it
    is made when it had not: on resume the restored producers had, so every consumer fed by
    one ran again (a consumer keyed by place also warned that the job had changed)."""
    producers = [make(i) for i in range(3)]
    sums, _, ran = await pipeline(tmp_path, resume=False, producers=producers, keep=keep)
    assert sums == expected([0.0, 1.0, 2.0]) and ran == 9
    with caplog.at_level(logging.WARNING, logger=JOURNAL_LOG):
        again, results, ran = await pipeline(tmp_path, resume=True, producers=producers, keep=keep)
    assert (again, ran) == (sums, 0)
    assert all(r.restored for r in results)
    assert not [r.getMessage() for r in caplog.records if r.name == JOURNAL_LOG]


@pytest.mark.parametrize("keep", [False, True], ids=["fed", "kept"])
@pytest.mark.parametrize("make", [pure_producer, place_producer], ids=["pure", "not-pure"])
async def test_a_changed_producer_runs_its_consumers_again(tmp_path: Path, keep: bool, make: Producer) -> None:
    """Interrupted after two chains, resumed with the second chain's producer changed: the first
    chain is restored, the second and third run whole, and every value is the new job's."""
    await pipeline(tmp_path, resume=False, producers=[make(0), make(1)], keep=keep)
    sums, results, ran = await pipeline(tmp_path, resume=True, producers=[make(0), make(5), make(2)], keep=keep)
    assert sums == expected([0.0, 5.0, 2.0])
    assert [r.restored for r in results] == [True] * 3 + [False] * 6 and ran == 6


USER_KERNEL = """\
import numpy as np

from batuta import kernel

VERSION = {version}


@kernel("jp_vec", description="n values of x plus the module's version", pure={pure})
def jp_vec(n, x):
    return np.full(n, float(x + VERSION))


jp_vec.cpu(jp_vec.reference)
"""


@pytest.mark.parametrize("keep", [False, True], ids=["fed", "kept"])
@pytest.mark.parametrize("pure", [False, True], ids=["not-pure", "pure"])
async def test_consumers_of_an_edited_producer_run_again_with_its_new_code(
    tmp_path: Path, keep: bool, pure: bool
) -> None:
    """A consumer named its unfinished producer by kernel and arguments, not by the code the
    kernel came from: after an edit of the producer's module, the producer ran again with the
    new code while its built-in consumers were restored with the old code's results."""
    module = tmp_path / "project" / "jp_kernels.py"
    module.parent.mkdir()
    module.write_text(USER_KERNEL.format(version=0, pure=pure))
    producers = [Task.kernel("jp_vec", 1000, i) for i in range(2)]
    journal = tmp_path / "journal"
    sums, _, _ = await pipeline(journal, resume=False, producers=producers, keep=keep, modules=[module])
    assert sums == expected([0.0, 1.0])
    module.write_text(USER_KERNEL.format(version=10, pure=pure))
    sums, results, ran = await pipeline(journal, resume=True, producers=producers, keep=keep, modules=[module])
    assert sums == expected([10.0, 11.0])
    assert not any(r.restored for r in results) and ran == 6


@pytest.mark.parametrize("keep", [False, True], ids=["fed", "kept"])
async def test_a_consumer_of_a_producer_that_runs_again_unrestored_runs_again(tmp_path: Path, keep: bool) -> None:
    """A producer that is not pure and is not restored (its record lost) makes a new value, so
    the consumers journaled from its old one must not be restored beside it."""
    producers = [place_producer(i) for i in range(2)]
    await pipeline(tmp_path, resume=False, producers=producers, keep=keep)
    journaled, _, _ = read_journal(tmp_path / JOURNAL_FILE)
    lost = next(key for key in journaled if "/test_fill" in key and key.endswith("#pipe:3"))  # chain 1's
    rewritten = await Journal.open(tmp_path, job="pipe", resume=False)
    for key, result in journaled.items():
        if key != lost:
            rewritten.record(key, result)
    await rewritten.close()
    _, results, ran = await pipeline(tmp_path, resume=True, producers=producers, keep=keep)
    assert [r.restored for r in results] == [True] * 3 + [False] * 3 and ran == 3


async def test_readers_of_readers_of_unrepeatable_results_are_not_one_task(tmp_path: Path) -> None:
    """A pure task reading a result that is not pure is keyed by place; so must be the pure
    tasks reading its result in turn: keyed by how it is made, the second readers of three
    timings were one task to the journal, and a resume gave all three the first's value."""
    journal = await Journal.open(tmp_path, job="pipe", resume=False)
    async with make_pool() as pool:
        pool.set_result_store(JournalStore(journal, resume=False))
        with pool.job("pipe"):
            timed = [pool.submit_nowait(Task.kernel("spin", 0.001)) for _ in range(3)]  # the time spun
            first = [pool.submit_nowait(Task.kernel("noop", future)) for future in timed]  # noop is pure
            second = [pool.submit_nowait(Task.kernel("noop", future)) for future in first]
            results = [await future for future in second]
    assert all(r.is_success() for r in results), [r.error for r in results]
    await journal.close()
    keys = [key for key in read_journal(tmp_path / JOURNAL_FILE)[0] if "/noop/" in key]
    assert len(keys) == 6 and all("#pipe:" in key for key in keys), keys  # each at its own place


# -- Task.key names its result -----------------------------------------------------------------


def keyed_tasks(values: list[float]) -> list[Task]:
    """A loop that reuses one key: every task is 'step' to the journal, whatever it adds."""
    return [Task.kernel("saxpy", v, np.ones(4), np.zeros(4), key="step") for v in values]


async def keyed_run(journal_dir: Path, tasks: list[Task], *, resume: bool, keep: bool = False) -> list[TaskResult]:
    journal = await Journal.open(journal_dir, job="pipe", resume=resume)
    async with make_pool() as pool:
        pool.set_result_store(JournalStore(journal, resume=resume))
        futures = [pool.submit_nowait(task, keep=keep) for task in tasks]
        results = [await future for future in futures]
    await journal.close()
    return results


@pytest.mark.parametrize("keep", [False, True], ids=["fed", "kept"])
async def test_a_key_reused_for_other_arguments_is_said_once_naming_the_key_and_the_fix(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, keep: bool
) -> None:
    """A key names a result: a resume restores the one journaled under it for every task with
    that key. It did so silently where the key was reused for other arguments (in a loop).
    A kept result's is the user's key too, not the journal's own for it ('kept:...')."""
    await keyed_run(tmp_path, keyed_tasks([1.0, 2.0, 3.0]), resume=False, keep=keep)
    with caplog.at_level(logging.WARNING, logger=JOURNAL_LOG):
        results = await keyed_run(tmp_path, keyed_tasks([1.0, 2.0, 3.0]), resume=True, keep=keep)
    assert all(r.restored for r in results)  # documented: the key is the caller's word
    said = [r.getMessage() for r in caplog.records if r.name == JOURNAL_LOG]
    assert len(said) == 1, said
    assert "Task.key 'step'" in said[0] and "other arguments" in said[0] and "own key" in said[0]


async def test_a_key_restored_for_its_own_arguments_says_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    big = np.arange(1 << 20, dtype=np.float64)  # sampled, not read whole: keys exist to spare that
    tasks = [Task.kernel("saxpy", 2.0, big, big, key="big"), *keyed_tasks([3.0])]
    await keyed_run(tmp_path, tasks, resume=False)
    with caplog.at_level(logging.WARNING, logger=JOURNAL_LOG):
        results = await keyed_run(tmp_path, tasks, resume=True)
    assert all(r.restored for r in results)
    assert not [r.getMessage() for r in caplog.records if r.name == JOURNAL_LOG]
    changed = big.copy()
    changed[-1] = -1.0  # its last element: in the sample
    with caplog.at_level(logging.WARNING, logger=JOURNAL_LOG):
        await keyed_run(tmp_path, [Task.kernel("saxpy", 2.0, changed, big, key="big")], resume=True)
    assert sum("Task.key 'big'" in r.getMessage() for r in caplog.records) == 1
