"""A resumed task that the journal restores is asked for before its arguments are copied and
prepared for the wire (`runtime/journaling.py`): it is never sent, and what is not restored
is keyed, checked and journaled as before."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from batuta import Pool, Task, TaskResult
from batuta.errors import UsageError
from batuta.observers.journal import Journal, JournalStore
from batuta.runtime import events as pe
from batuta.runtime.pool import PoolConfig, local_host

REPO = Path(__file__).resolve().parents[1]
JOURNAL_LOG = "batuta.observers.journal"


def make_pool() -> Pool:
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    host = local_host(2, gpus="none", kernel_modules=["tests.support.misbehaving_kernels"], env=env)
    return Pool([host], PoolConfig())


def job_tasks() -> list[Task]:
    """Pure tasks (keyed by content), tasks keyed by their place (`test_print` is not known
    pure here), and tasks with a `Task.key`, interleaved."""
    tasks: list[Task] = []
    for i in range(6):
        tasks += [Task.kernel("noop", i), Task.kernel("test_print", i), Task.kernel("noop", -i, key=f"k{i}")]
    return tasks


async def run(tmp_path: Path, *, resume: bool, refuse_one: bool = False) -> tuple[list[TaskResult], list[int], int]:
    """The job under a journal: (its results, the ids its futures had, the tasks hosts ran:
    results that came back from a host, and tasks the scheduler was given)."""
    async with make_pool() as pool:
        ran: list[int] = []
        pool.subscribe(lambda e: ran.append(1) if isinstance(e, pe.TaskFinished) and not e.result.restored else None)
        journal = await Journal.open(tmp_path, job="test", resume=resume)
        pool.set_result_store(JournalStore(journal, resume=resume))
        futures = []
        with pool.job("resumed"):
            for n, task in enumerate(job_tasks()):
                if refuse_one and n == 4:  # between two tasks keyed by their place
                    with pytest.raises(UsageError, match="not valid UTF-8"):  # keyed, but it cannot travel
                        await pool.submit(Task.kernel("test_print", "\ud800"))
                futures.append(await pool.submit(task))
            results = [await f for f in futures]
        await journal.close()
        assert pool.stats().submitted == len(ran)
        return results, [f.task_id for f in futures], len(ran)


async def test_a_restored_task_is_sent_to_no_host_and_a_refused_one_takes_no_place(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first, _, ran = await run(tmp_path, resume=False)
    assert ran == len(first) and not any(r.restored for r in first)
    with caplog.at_level(logging.WARNING, logger=JOURNAL_LOG):
        again, ids, ran = await run(tmp_path, resume=True, refuse_one=True)
    assert ran == 0  # no host ran any of them
    assert all(r.restored and r.is_success() for r in again)
    assert [r.value for r in again] == [r.value for r in first]
    assert [r.task_id for r in again] == ids and {r.job for r in again} == {"resumed"}
    # the refused task counted no place: the place-keyed tasks after it met their own
    assert not [r.getMessage() for r in caplog.records if r.name == JOURNAL_LOG]


async def test_a_task_not_restored_is_journaled_with_its_arguments_as_submitted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Asked for before its arguments were copied, a task the journal lacks still keys and
    samples the copy: an array changed after submit changes neither its key nor its sample."""
    async with make_pool() as pool:
        journal = await Journal.open(tmp_path, job="test", resume=False)
        pool.set_result_store(JournalStore(journal, resume=False))
        content, keyed = np.arange(4.0), np.arange(4.0)
        futures = [
            pool.submit_nowait(Task.kernel("noop", content)),
            pool.submit_nowait(Task.kernel("noop", keyed, key="a")),
        ]
        content[:] = -1.0
        keyed[:] = -1.0
        made = [await f for f in futures]
        await journal.close()
    assert [r.value.tolist() for r in made] == [[0.0, 1.0, 2.0, 3.0]] * 2
    async with make_pool() as pool:
        journal = await Journal.open(tmp_path, job="test", resume=True)
        pool.set_result_store(JournalStore(journal, resume=True))
        with caplog.at_level(logging.WARNING, logger=JOURNAL_LOG):
            again = [
                await pool.run(Task.kernel("noop", np.arange(4.0))),
                await pool.run(Task.kernel("noop", np.arange(4.0), key="a")),
            ]
        await journal.close()
        assert pool.stats().submitted == 0
    assert all(r.restored for r in again)
    assert [r.value.tolist() for r in again] == [[0.0, 1.0, 2.0, 3.0]] * 2
    assert not [r.getMessage() for r in caplog.records if r.name == JOURNAL_LOG]  # no "key reused" warning
