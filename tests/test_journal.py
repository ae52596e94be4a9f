"""The job journal: stable task keys, durable batched appends, torn tails, resume on a real pool."""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from batuta.kernels import registry

from batuta import Backend, Pool, Task, TaskFailedError, TaskResult, TaskStatus
from batuta.observers.journal import (
    JOURNAL_FILE,
    Journal,
    JournalError,
    JournalStore,
    is_pure,
    task_key,
)
from batuta.observers.journal_records import read_journal
from batuta.runtime import events as pe
from batuta.runtime.pool import PoolConfig, local_host

REPO = Path(__file__).resolve().parents[1]


def make_pool() -> Pool:
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    host = local_host(2, gpus="none", kernel_modules=["tests.support.misbehaving_kernels"], env=env)
    return Pool([host], PoolConfig())


# -- keys ----------------------------------------------------------------------------------


def test_derived_keys_are_stable_and_depend_on_every_input() -> None:
    a = np.arange(6, dtype=np.float64).reshape(2, 3)
    base = task_key(Task.kernel("kmeans_partial", a, 3), "kmeans")
    assert base.startswith("kmeans/kmeans_partial/") and len(base.rsplit("/", 1)[1]) == 32
    assert task_key(Task.kernel("kmeans_partial", a.copy(), 3), "kmeans") == base  # by value, not identity
    assert task_key(Task.kernel("kmeans_partial", np.asfortranarray(a), 3), "kmeans") == base  # layout is not value
    variants = [
        Task.kernel("kmeans_partial", a.astype(np.float32), 3),  # dtype
        Task.kernel("kmeans_partial", a.reshape(3, 2), 3),  # shape
        Task.kernel("kmeans_partial", np.where(a == 5, np.nextafter(5.0, 6.0), a), 3),  # one ulp of one value
        Task.kernel("kmeans_partial", np.where(a == 0, -0.0, a), 3),  # -0.0 is not 0.0 bitwise
        Task.kernel("kmeans_partial", a, 3.0),  # int vs float
        Task.kernel("kmeans_partial", a, np.int64(3)),  # numpy scalar vs int
        Task.kernel("kmeans_partial", a, (3,)),  # tuple vs scalar
        Task.kernel("kmeans_partial", a, 3, backend=Backend.CPU),  # backend asked for
        Task.kernel("linreg_partial", a, 3),  # kernel
    ]
    keys = {task_key(t, "kmeans") for t in variants}
    assert len(keys) == len(variants) and base not in keys
    assert task_key(Task.kernel("kmeans_partial", a, 3), "other-job") != base
    assert task_key(Task.kernel("noop", 1, key="mine"), "kmeans") == "mine"
    binary = task_key(Task.binary("/bin/echo", "hi", env={"A": "1"}), "j")
    assert binary.startswith("j//bin/echo/") and binary != task_key(Task.binary("/bin/echo", "hi"), "j")


def test_a_put_value_is_keyed_by_its_content_not_its_id() -> None:
    from batuta.core.objects import ObjectRef
    from batuta.runtime.objects import ObjectTable

    first, second = ObjectTable(), ObjectTable()
    second.put("another value first, so the ids differ")
    a = np.arange(1000.0)
    ref_1, ref_2 = first.put(a), second.put(a.copy())
    assert ref_1.object_id != ref_2.object_id and ref_1.digest == ref_2.digest
    key = task_key(Task.kernel("sum", ref_1), "j")
    assert task_key(Task.kernel("sum", ref_2), "j") == key  # a resumed run's new put finds the old result
    assert task_key(Task.kernel("sum", first.put(a + 1)), "j") != key
    with pytest.raises(JournalError, match="ObjectRef without a digest"):
        task_key(Task.kernel("sum", ObjectRef(1)), "j")


def test_derived_key_golden_value() -> None:
    """The derivation is part of the journal format: the same task gets the same key in every release."""
    key = task_key(Task.kernel("vadd", np.arange(3, dtype=np.float64), np.ones(3)), "demo")
    assert key == GOLDEN_VADD_KEY


GOLDEN_VADD_KEY = "demo/vadd/e87a8ae1673b65b00405f9ce8be98ca6"


# -- the file ------------------------------------------------------------------------------


def result(task_id: int, value: object, status: TaskStatus = TaskStatus.SUCCEEDED) -> TaskResult:
    return TaskResult(
        task_id=task_id,
        name="kmeans_partial",
        status=status,
        value=value,
        duration=0.25,
        queue_wait=0.5,
        host="local",
        slot="local/1",
        attempts=1,
        backend=Backend.CPU,
        job="kmeans",
    )


async def test_results_survive_reopen_exactly_and_only_successes_are_kept(tmp_path: Path) -> None:
    journal = await Journal.open(tmp_path, job="kmeans", resume=False)
    value = (np.arange(12.0).reshape(4, 3), np.array([1, 2, 3, 4]), 0.125)
    journal.record("k1", result(1, value))
    journal.record("k2", result(2, None, TaskStatus.FAILED))
    journal.record("k3", result(3, {"nested": [b"x", None]}))
    await journal.close()
    assert journal.recorded == journal.synced == 2
    reopened = await Journal.open(tmp_path, job="kmeans", resume=True)
    assert len(reopened) == 2 and reopened.get("k2") is None
    got = reopened.get("k1")
    assert got is not None and got.status is TaskStatus.SUCCEEDED and got.backend is Backend.CPU
    assert got.slot == "local/1" and got.duration == 0.25 and got.job == "kmeans"
    sums, counts, inertia = got.value
    assert sums.tobytes() == value[0].tobytes() and counts.dtype == value[1].dtype and inertia == 0.125
    await reopened.close()


async def test_a_resume_holds_in_memory_only_the_results_it_is_asked_for(tmp_path: Path) -> None:
    """Opening a journal decoded every result into memory: one of 40 results of 20 MB each
    (an 839 MB journal) took 1.7 GB to resume a job that needed one of them."""
    import tracemalloc

    journal = await Journal.open(tmp_path, job="j", resume=False)
    for index in range(12):
        journal.record(f"k{index}", result(index, np.full(1 << 19, float(index))))  # 4 MiB each
    await journal.close()
    tracemalloc.start()
    try:
        again = await Journal.open(tmp_path, job="j", resume=True)
        _, opening = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        restored = again.get("k7")
        _, reading = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(again) == 12 and opening < 3 * (4 << 20)  # a record or two at a time, not 48 MiB
    assert reading < 2 * (4 << 20)
    assert restored is not None and np.array_equal(restored.value, np.full(1 << 19, 7.0))
    restored.value[0] = -1.0  # the caller's own array: writable, as before
    fresh = again.get("k7")
    assert fresh is not None and fresh.value[0] == 7.0 and again.get("absent") is None
    await again.close()


async def test_without_resume_the_journal_and_checkpoints_start_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = await Journal.open(tmp_path, job="j", resume=False)
    journal.record("k", result(1, 1))
    await journal.checkpoints.save("iter_0", {"x": 1})
    await journal.close()
    with caplog.at_level(logging.WARNING, logger="batuta.observers.journal"):
        fresh = await Journal.open(tmp_path, job="j", resume=False)
    assert len(fresh) == 0 and fresh.checkpoints.list() == []
    assert any("starting over" in r.getMessage() for r in caplog.records)
    assert any("discarding 1 checkpoint" in r.getMessage() for r in caplog.records)
    await fresh.close()
    assert read_journal(tmp_path / JOURNAL_FILE)[0] == {}


async def test_a_torn_tail_is_dropped_with_a_warning_and_appends_go_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = await Journal.open(tmp_path, job="j", resume=False)
    for i in range(3):
        journal.record(f"k{i}", result(i, np.full(100, i)))
    await journal.close()
    path = tmp_path / JOURNAL_FILE
    size = path.stat().st_size
    with open(path, "r+b") as f:  # a crash in the middle of the last append
        f.truncate(size - 50)
    with caplog.at_level(logging.WARNING, logger="batuta.observers.journal"):
        reopened = await Journal.open(tmp_path, job="j", resume=True)
    assert len(reopened) == 2 and reopened.get("k1") is not None and reopened.get("k2") is None
    assert any("torn" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
    reopened.record("k2", result(2, np.full(100, 2)))
    await reopened.close()
    entries, good, total = read_journal(path)
    assert sorted(entries) == ["k0", "k1", "k2"] and good == total
    assert entries["k2"].value.tolist() == [2] * 100


async def test_flipped_bytes_end_the_trusted_part(tmp_path: Path) -> None:
    journal = await Journal.open(tmp_path, job="j", resume=False)
    for i in range(3):
        journal.record(f"k{i}", result(i, i))
    await journal.close()
    path = tmp_path / JOURNAL_FILE
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the last record's payload: its CRC no longer matches
    path.write_bytes(bytes(data))
    assert sorted(read_journal(path)[0]) == ["k0", "k1"]


async def test_a_damaged_record_in_the_middle_costs_that_result_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Damage in the middle of a long job's journal dropped every result after it."""
    journal = await Journal.open(tmp_path, job="j", resume=False)
    for i in range(5):
        journal.record(f"k{i}", result(i, np.full(50, i)))
    await journal.close()
    path = tmp_path / JOURNAL_FILE
    data = bytearray(path.read_bytes())
    data[data.index(b"\xa2k2")] ^= 0xFF  # inside k2's payload: its key, a msgpack str of 2 bytes
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="batuta.observers.journal"):
        reopened = await Journal.open(tmp_path, job="j", resume=True)
    assert sorted(reopened.get(f"k{i}") is not None for i in range(5)) == [False, True, True, True, True]
    assert reopened.get("k2") is None and reopened.get("k4").value.tolist() == [4] * 50  # type: ignore[union-attr]
    assert any("skipped 1 damaged record" in r.getMessage() for r in caplog.records)
    reopened.record("k2", result(2, np.full(50, 2)))
    await reopened.close()
    entries, good, total = read_journal(path)  # rewritten without the damaged record: all sound
    assert sorted(entries) == ["k0", "k1", "k2", "k3", "k4"] and good == total


async def test_a_journal_folder_is_one_runs_at_a_time(tmp_path: Path) -> None:
    """Two runs on one journal: the second started over while it read the first's checkpoints,
    and returned the first run's result as its own."""
    first = await Journal.open(tmp_path, job="j", resume=False)
    for resume in (False, True):
        with pytest.raises(JournalError) as info:
            await Journal.open(tmp_path, job="j", resume=resume)
        assert str(info.value) == (
            f"journal {str(tmp_path)!r} is in use by another run (process {os.getpid()}); wait for it to end, or "
            "give this run another --journal folder"
        )
    await first.close()
    second = await Journal.open(tmp_path, job="j", resume=True)  # the first ended: its folder is free
    await second.close()


async def test_checkpoints_of_another_job_or_other_code_are_not_resumed_from(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An edited kernel module, or another job file, resumed the loop from the old checkpoint:
    a result neither the old nor the new code gives."""
    journal = await Journal.open(tmp_path, job="job.py", resume=False)
    await journal.bind("code-1")
    await journal.checkpoints.save("iter_5", {"x": 5})
    await journal.close()
    again = await Journal.open(tmp_path, job="job.py", resume=True)
    await again.bind("code-1")  # the same job and code: its checkpoints stand
    assert [c.name for c in again.checkpoints.list()] == ["iter_5"]
    await again.close()
    (tmp_path / "run.json").unlink()  # a journal an older batuta wrote: its checkpoints are kept
    older = await Journal.open(tmp_path, job="job.py", resume=True)
    await older.bind("code-9")
    assert [c.name for c in older.checkpoints.list()] == ["iter_5"]
    await older.close()
    (tmp_path / "run.json").write_text('{"job": "job.py", "code": "code-1"}')
    for job, code, why in (("job.py", "code-2", "other code"), ("other.py", "code-1", "another job")):
        reopened = await Journal.open(tmp_path, job=job, resume=True)
        await reopened.checkpoints.save("iter_5", {"x": 5})
        with caplog.at_level(logging.WARNING, logger="batuta.observers.journal"):
            await reopened.bind(code)
        assert reopened.checkpoints.list() == []
        assert f"its checkpoints were made by {why}, so they are not used" in caplog.records[-1].getMessage()
        await reopened.close()


async def test_a_failed_write_is_said_once_and_closing_names_the_fix(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A full disk: 230 error lines, then a traceback from close(), and no summary."""

    class FullDisk:
        def write(self, data: bytes) -> int:
            raise OSError(28, "No space left on device")

        def flush(self) -> None:
            raise OSError(28, "No space left on device")

        def fileno(self) -> int:
            return 0

        def close(self) -> None:
            raise OSError(28, "No space left on device")

    journal = await Journal.open(tmp_path, job="j", resume=False)
    journal._file.close()
    journal._file = FullDisk()
    with caplog.at_level(logging.WARNING, logger="batuta.observers.journal"):
        for i in range(20):
            journal.record(f"k{i}", result(i, i))
            await asyncio.sleep(0)
            await journal.flush()
        with pytest.raises(JournalError) as info:
            await journal.close()
    assert str(info.value) == (
        f"journal {tmp_path / JOURNAL_FILE}: a write failed (No space left on device), so results since were not "
        "journaled; free the disk and run again with --resume"
    )
    assert sum("write failed" in r.getMessage() for r in caplog.records) == 1
    reopened = await Journal.open(tmp_path, job="j", resume=True)  # closing released the folder
    await reopened.close()


async def test_a_resume_naming_the_job_file_another_way_takes_the_journals_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`batuta run ./job.py --resume` of a run of `job.py`: its tasks are keyed by the job's
    name as typed, so every one ran again, and nothing said so."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "job.py").write_text("")
    (tmp_path / "other.py").write_text("")
    first = await Journal.open(tmp_path / "J", job="job.py", resume=False)
    await first.bind("")
    await first.close()
    for spelling in ("./job.py", str(tmp_path / "job.py")):
        again = await Journal.open(tmp_path / "J", job=spelling, resume=True)
        assert again.job == "job.py", spelling
        await again.close()
    with caplog.at_level(logging.WARNING, logger="batuta.observers.journal"):
        other = await Journal.open(tmp_path / "J", job="other.py", resume=True)
    assert other.job == "other.py"
    await other.close()
    [said] = [r.getMessage() for r in caplog.records]
    assert said.startswith(f"journal {tmp_path / 'J'} was written by job job.py, not other.py: only its tasks")


async def test_a_resume_clears_what_writes_killed_midway_left(tmp_path: Path) -> None:
    """A kill during a checkpoint's save, or during the journal's rewrite, left its temporary
    file (as big as the checkpoint, or the journal) for good: --resume kept it."""
    first = await Journal.open(tmp_path, job="j", resume=False)
    await first.checkpoints.save("it_0", {"x": 1})
    await first.close()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftovers = [
        tmp_path / "checkpoints" / f".it_1.ckpt.{int(dead.stdout)}.0badc0de.tmp",
        tmp_path / f".{JOURNAL_FILE}.{int(dead.stdout)}.tmp",
    ]
    for path in leftovers:
        path.write_bytes(b"half of it")
    again = await Journal.open(tmp_path, job="j", resume=True)
    assert not any(path.exists() for path in leftovers)
    assert [info.name for info in again.checkpoints.list()] == ["it_0"]
    await again.close()


async def test_a_journal_two_jobs_ran_by_turns_warns_of_neither(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """run.json names the last job only: resuming a.py after a run of b.py in its folder warned
    that the journal was b.py's, and told to resume b.py, then restored a.py's tasks."""
    for job in ("a.py", "b.py"):
        journal = await Journal.open(tmp_path, job=job, resume=True)
        await journal.bind("")
        journal.record(f"{job}/spin/00#{job}:0", result(1, 1), (job, 0))
        await journal.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="batuta.observers.journal"):
        again = await Journal.open(tmp_path, job="a.py", resume=True)
    assert again.job == "a.py" and not caplog.records
    assert again.get("a.py/spin/00#a.py:0") is not None
    await again.close()


async def test_a_folder_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    """An existing read-only folder gave a 25-line traceback; a missing one, one line."""
    with pytest.raises(JournalError, match=r"^cannot use '/sys/kernel' as a journal folder: Permission denied$"):
        await Journal.open("/sys/kernel", job="j", resume=False)  # sysfs: not even root writes there


async def test_not_a_journal_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / JOURNAL_FILE).write_bytes(b"something else entirely")
    with pytest.raises(JournalError, match="not a batuta journal"):
        await Journal.open(tmp_path, job="j", resume=True)


@pytest.mark.parametrize("where", ["afile", "afile/sub"])
async def test_a_file_where_the_journal_folder_goes_is_named_with_the_fix(tmp_path: Path, where: str) -> None:
    """mkdir's own words were 'File exists' and 'Not a directory'."""
    (tmp_path / "afile").write_text("")
    with pytest.raises(JournalError) as info:
        await Journal.open(tmp_path / where, job="j", resume=False)
    assert str(info.value) == (
        f"cannot use {str(tmp_path / where)!r} as a journal folder: a file is in the way; "
        "name a folder (made if missing)"
    )


# -- resume on a real pool -----------------------------------------------------------------


async def run_job(pool: Pool, tmp_path: Path, *, resume: bool) -> tuple[list[object], list[TaskResult], int]:
    """A small job: 20 noop tasks by submit, a map of 5, one failing task; returns values."""
    journal = await Journal.open(tmp_path, job="test", resume=resume)
    pool.set_result_store(JournalStore(journal, resume=resume))
    futures = [await pool.submit(Task.kernel("noop", i)) for i in range(20)]
    futures.append(pool.submit_nowait(Task.kernel("noop", np.arange(4))))
    results = [await f for f in futures]
    mapped = await pool.map("noop", [(i,) for i in range(100, 105)])
    failed = await pool.run(Task.kernel("test_raise", "boom"))
    assert failed.status is TaskStatus.FAILED
    with pytest.raises(TaskFailedError, match="boom"):
        await pool.map("test_raise", ["boom"])
    await journal.close()
    return [r.value for r in results] + mapped, results, pool.stats().restored


async def test_resume_runs_only_what_the_journal_lacks(tmp_path: Path) -> None:
    async with make_pool() as pool:
        values, results, restored = await run_job(pool, tmp_path, resume=False)
        first_submitted = pool.stats().submitted
    assert restored == 0 and first_submitted == 21 + 5 + 2
    async with make_pool() as pool:
        finished: list[TaskResult] = []
        pool.subscribe(lambda e: finished.append(e.result) if isinstance(e, pe.TaskFinished) else None)
        again, results2, restored2 = await run_job(pool, tmp_path, resume=True)
        # only the two failing tasks ran again: failures are never journaled
        assert pool.stats().submitted == 2
    assert restored2 == 26
    assert again[:20] == values[:20] and again[21:] == values[21:]
    assert isinstance(again[20], np.ndarray) and isinstance(values[20], np.ndarray)  # noop of np.arange(4)
    assert again[20].tobytes() == values[20].tobytes()
    assert all(r.restored and r.is_success() for r in results2)
    assert len({r.task_id for r in results2}) == len(results2)
    assert [r.slot for r in results2] == [r.slot for r in results]  # where it ran the first time
    assert sum(r.restored for r in finished) == 26  # observers (summary, metrics, TUI) see them


def test_resume_without_a_journal_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    from batuta.cli import main

    assert main(["run", "pi", "--resume"]) == 2
    assert "--resume needs --journal DIR" in capsys.readouterr().err


# -- places: equal tasks are not one task --------------------------------------------------

SPIN = Task.kernel("spin", 0.001)  # identical tasks; spin measures time, so it is not pure


async def killed_after(pool: Pool, tasks: list[Task], journaled: int) -> None:
    """Submit `tasks`; once `journaled` have succeeded, take the store away (as the last of
    them is recorded: what a kill -9 then leaves on disk) and abandon the rest."""
    killed = asyncio.Event()
    succeeded = 0

    def on_event(event: object) -> None:
        nonlocal succeeded
        if isinstance(event, pe.TaskFinished) and event.result.is_success() and not killed.is_set():
            succeeded += 1
            if succeeded == journaled:  # the store has just recorded this one
                pool.set_result_store(None)
                killed.set()

    unsubscribe = pool.subscribe(on_event)
    futures = [pool.submit_nowait(task) for task in tasks]
    await asyncio.wait_for(killed.wait(), timeout=60)
    unsubscribe()
    for future in futures:
        future.cancel()


async def interrupted_run(tmp_path: Path, tasks: list[Task], finished_before_kill: int) -> int:
    """Submit `tasks` under job "j" and stop journaling after `finished_before_kill`
    (`killed_after`). Returns the results journaled."""
    journal = await Journal.open(tmp_path, job="j", resume=False)
    async with make_pool() as pool:
        pool.set_result_store(JournalStore(journal, resume=False))
        with pool.job("j"):
            await killed_after(pool, tasks, finished_before_kill)
    await journal.close()
    return journal.synced


async def resumed_run(tmp_path: Path, tasks: list[Task]) -> tuple[list[TaskResult], int, int]:
    """Submit `tasks` under job "j" with --resume: (results, restored, submitted to run)."""
    journal = await Journal.open(tmp_path, job="j", resume=True)
    async with make_pool() as pool:
        pool.set_result_store(JournalStore(journal, resume=True))
        with pool.job("j"):
            futures = [pool.submit_nowait(task) for task in tasks]
        results = [await f for f in futures]
        stats = pool.stats()
    await journal.close()
    return results, stats.restored, stats.submitted


async def test_identical_tasks_interrupted_resume_only_the_ones_that_ran(tmp_path: Path) -> None:
    """Issue 13: 200 identical spin tasks killed after 56 resume as 56 restored, 144 run."""
    assert await interrupted_run(tmp_path, [SPIN] * 200, finished_before_kill=56) == 56
    results, restored, submitted = await resumed_run(tmp_path, [SPIN] * 200)
    assert (restored, submitted) == (56, 144)
    assert all(r.is_success() for r in results) and sum(r.restored for r in results) == 56
    # and the second run journaled its 144 at the places still open: a third run restores all
    _, restored, submitted = await resumed_run(tmp_path, [SPIN] * 200)
    assert (restored, submitted) == (200, 0)


async def test_a_pure_kernel_is_still_keyed_by_content(tmp_path: Path) -> None:
    """noop is pure: one journaled result answers every task with the same arguments."""
    same = Task.kernel("noop", np.arange(3))
    assert await interrupted_run(tmp_path, [same], finished_before_kill=1) == 1
    results, restored, submitted = await resumed_run(tmp_path, [same] * 3 + [Task.kernel("noop", 1)])
    assert (restored, submitted) == (3, 1)
    assert [r.restored for r in results] == [True, True, True, False]
    assert all(r.value.tolist() == [0, 1, 2] for r in results[:3])


async def test_a_changed_task_at_a_journaled_place_runs_again_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = [Task.kernel("spin", 0.001 * (i + 1)) for i in range(4)]
    assert await interrupted_run(tmp_path, first, finished_before_kill=4) == 4
    changed = [first[0], Task.kernel("spin", 0.0005), first[2], Task.kernel("spin", 0.0006)]
    with caplog.at_level(logging.WARNING, logger="batuta.observers.journal"):
        results, restored, submitted = await resumed_run(tmp_path, changed)
    assert (restored, submitted) == (2, 2)
    assert [r.restored for r in results] == [True, False, True, False]
    warnings = [r.getMessage() for r in caplog.records if "is not the one journaled there" in r.getMessage()]
    assert len(warnings) == 1 and "task 1 of job 'j'" in warnings[0]


async def checkpointed_run(
    tmp_path: Path, *, resume: bool, iterations: int, stop_after: int | None = None
) -> list[list[bool]]:
    """The checkpoint pattern of job authors: 4 identical `spin` tasks an iteration (their
    arguments say nothing of the state, as where the state is kept in a file), a checkpoint
    after each; resumed, from the newest. With `stop_after`, the last iteration journals only
    that many results (a kill). Returns, per iteration run, which tasks were restored."""
    journal = await Journal.open(tmp_path, job="j", resume=resume)
    store = JournalStore(journal, resume=resume)
    journal.checkpoints.places = store
    restored: list[list[bool]] = []
    async with make_pool() as pool:
        pool.set_result_store(store)
        last = await journal.checkpoints.latest()
        start = int(last.state["iteration"]) + 1 if last is not None else 0
        with pool.job("j"):
            for iteration in range(start, start + iterations):
                if stop_after is not None and iteration == start + iterations - 1:
                    await killed_after(pool, [SPIN] * 4, stop_after)
                    break
                futures = [pool.submit_nowait(SPIN) for _ in range(4)]
                restored.append([(await f).restored for f in futures])
                await journal.checkpoints.save(f"it_{iteration}", {"iteration": iteration})
    await journal.close()
    return restored


async def test_a_job_resumed_from_its_checkpoint_meets_its_own_places(tmp_path: Path) -> None:
    """A job resumed from its checkpoint at iteration 3 submitted its tasks as tasks 0, 1, 2...
    again: they met iteration 0's places and, their arguments equal, got iteration 0's results
    (a wrong answer, silently), and the iteration that was interrupted ran again whole."""
    await checkpointed_run(tmp_path, resume=False, iterations=4, stop_after=2)  # 0, 1, 2 saved; 3 half done
    resumed = await checkpointed_run(tmp_path, resume=True, iterations=3)
    assert [sum(flags) for flags in resumed] == [2, 0, 0]  # iteration 3's two done, nothing of 0 or 1


def test_only_kernels_registered_pure_here_are_pure() -> None:
    assert is_pure(Task.kernel("noop", 1)) and is_pure(Task.kernel("kmeans_partial", np.zeros((2, 2)), 1))
    assert not is_pure(Task.kernel("spin", 0.1))  # a timing probe
    assert not is_pure(Task.kernel("test_raise", "x"))  # registered on the hosts only (tests.support)
    assert not is_pure(Task.kernel("no.such.module:thing"))  # unknown here: assume not
    assert not is_pure(Task.binary("/bin/true"))


# -- the user's shipped code: an edit means new results, never stale ones ---------------------

USER_KERNELS = """\
from batuta import kernel

VERSION = {version}


@kernel("jr_place", description="10 x plus the module's version; not pure: keyed by place")
def jr_place(x):
    return x * 10 + VERSION


jr_place.cpu(jr_place.reference)


@kernel("jr_pure", description="100 x plus the module's version", pure=True)
def jr_pure(x):
    return x * 100 + VERSION


jr_pure.cpu(jr_pure.reference)
"""

USER_TASKS = [
    Task.kernel("jr_place", 1),
    Task.kernel("jr_place", 2),
    Task.kernel("jr_pure", 3),
    Task.kernel("jr_place", 4, key="mine"),
    Task.kernel("noop", 5),  # built in: its key names no code
]


async def run_user_kernels(module: Path, journal_dir: Path, *, resume: bool) -> list[TaskResult]:
    """USER_TASKS on a local pool that ships `module`, journaled in `journal_dir`."""
    journal = await Journal.open(journal_dir, job="j", resume=resume)
    async with Pool.builder().cpu_workers(1).gpu_workers("none").modules([module]).build() as pool:
        pool.set_result_store(JournalStore(journal, resume=resume))
        futures = [pool.submit_nowait(task) for task in USER_TASKS]
        results = [await future for future in futures]
    await journal.close()
    assert all(r.is_success() for r in results), [r.error for r in results]
    return results


@pytest.mark.parametrize("imported_here", [False, True], ids=["on-the-hosts-only", "imported-here-too"])
async def test_an_edited_user_module_runs_its_tasks_again_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, imported_here: bool
) -> None:
    """Without the edit every task is restored; after it, the user's kernels' tasks run again
    with the new code (their values change) while the built-in one is still restored."""
    folder = tmp_path / "project"
    folder.mkdir()
    module = folder / "jr_kernels.py"
    module.write_text(USER_KERNELS.format(version=1))
    if imported_here:  # as `batuta run` does when the job imports it: registered here, jr_pure known pure
        monkeypatch.syspath_prepend(str(folder))
        importlib.import_module("jr_kernels")
        assert is_pure(Task.kernel("jr_pure", 3))
    try:
        journal_dir = tmp_path / "journal"
        first = await run_user_kernels(module, journal_dir, resume=False)
        assert [r.value for r in first] == [11, 21, 301, 41, 5]
        again = await run_user_kernels(module, journal_dir, resume=True)
        assert [(r.value, r.restored) for r in again] == [(r.value, True) for r in first]
        assert [r.code for r in again] == [r.code for r in first] and first[0].code  # restored: said which code

        module.write_text(USER_KERNELS.format(version=2))
        edited = await run_user_kernels(module, journal_dir, resume=True)
        expected = [(12, False), (22, False), (302, False), (42, False), (5, True)]
        assert [(r.value, r.restored) for r in edited] == expected
        assert len({r.code for r in edited[:4]} | {first[0].code}) == 2  # ran with the new digest
        # and journaled under the new code's keys: resuming again restores them all
        settled = await run_user_kernels(module, journal_dir, resume=True)
        assert [(r.value, r.restored) for r in settled] == [(r.value, True) for r in edited]
    finally:
        if imported_here:
            registry.forget_modules(["jr_kernels"])
            sys.modules.pop("jr_kernels", None)


def test_keys_name_the_code_digest_only_when_given() -> None:
    task = Task.kernel("jr_place", 1)
    plain = task_key(task, "j")
    coded = task_key(task, "j", "ab" * 32)
    assert coded.startswith("j/jr_place@" + "ab" * 8 + "/") and coded != plain != task_key(task, "j", "cd" * 32)
    assert task_key(Task.kernel("noop", 1, key="mine"), "j", "ab" * 32) == "mine@" + "ab" * 8
    assert task_key(Task.kernel("noop", 1, key="mine"), "j") == "mine"


# -- kept results and dependencies ----------------------------------------------------------


async def run_pipeline(tmp_path: Path, *, resume: bool, chains: int, finals: int) -> tuple[list[float], int]:
    """`chains` chains of fill -> stage (both kept) -> sum; only the first `finals` get their sum."""
    async with make_pool() as pool:
        journal = await Journal.open(tmp_path, job="pipe", resume=resume)
        pool.set_result_store(JournalStore(journal, resume=resume))
        totals = []
        for i in range(chains):
            first = await pool.submit(Task.kernel("test_fill", 100_000, float(i)), keep=True)
            second = await pool.submit(Task.kernel("test_stage", first, 2.0), keep=True)
            if i < finals:
                total = await (await pool.submit(Task.kernel("sum", second)))
                assert total.is_success(), total.error
                totals.append(total.value)
        await journal.close()
        return totals, pool.stats().submitted


async def test_a_resumed_pipeline_restores_kept_results_and_makes_only_what_a_new_task_reads(
    tmp_path: Path,
) -> None:
    first_run, ran = await run_pipeline(tmp_path, resume=False, chains=3, finals=2)
    assert ran == 3 * 2 + 2
    second_run, ran_again = await run_pipeline(tmp_path, resume=True, chains=3, finals=3)
    # chains 0 and 1 are restored whole; chain 2's sum is new, so its two kept inputs are made again
    assert ran_again == 3
    assert second_run[:2] == first_run
    assert second_run[2] == pytest.approx(100_000 * (2.0 * 2 + 1))


@pytest.mark.parametrize("keep", [False, True], ids=["fed", "kept"])
async def test_readers_of_unrepeatable_results_are_not_one_task_to_the_journal(tmp_path: Path, keep: bool) -> None:
    """A pure reader of an unfinished task's result was keyed by how that result is made: ten
    readers of ten random samples shared one journal key, and a resume gave them one value.
    Kept (keep=True), the samplers themselves shared one key too."""
    journal = await Journal.open(tmp_path, job="j", resume=False)
    async with make_pool() as pool:
        pool.set_result_store(JournalStore(journal, resume=False))
        with pool.job("j"):
            timed = [pool.submit_nowait(Task.kernel("spin", 0.001), keep=keep) for _ in range(3)]  # the time spun
            readers = [pool.submit_nowait(Task.kernel("noop", future)) for future in timed]  # noop is pure
            values = [(await reader).value for reader in readers]
    await journal.close()
    journaled = read_journal(tmp_path / JOURNAL_FILE)[0]
    for kernel in ("/noop/", "/spin/"):
        keys = [key for key in journaled if kernel in key]
        assert len(keys) == 3 and all("#j:" in key for key in keys), keys  # each at its own place
    assert all(isinstance(value, float) for value in values)


async def test_a_failed_task_keeps_its_place_from_the_next_equal_one(tmp_path: Path) -> None:
    """Places waited in one queue per content: a task that failed left its place to the next
    equal one to succeed, and a resume restored that one's result at the failed one's place."""
    journal = await Journal.open(tmp_path, job="j", resume=False)
    store = JournalStore(journal, resume=False)
    assert store.lookup(SPIN, "j", task_id=1) is None and store.lookup(SPIN, "j", task_id=2) is None
    store.record(SPIN, "j", result(2, "second"))  # the second ends first...
    store.record(SPIN, "j", result(1, None, TaskStatus.FAILED))  # ...and the first fails
    await journal.close()
    again = await Journal.open(tmp_path, job="j", resume=True)
    resumed = JournalStore(again, resume=True)
    assert resumed.lookup(SPIN, "j", task_id=1) is None  # runs again: it failed
    second = resumed.lookup(SPIN, "j", task_id=2)
    assert second is not None and second.value == "second"
    await again.close()


async def test_the_checkpoint_loaded_last_before_the_first_task_is_where_the_job_restarts(tmp_path: Path) -> None:
    """Only the first one loaded counted: a job that loads its settings' checkpoint first,
    then the latest, restarted at the settings' places (0), and met the first iterations'."""
    journal = await Journal.open(tmp_path, job="j", resume=True)
    store = JournalStore(journal, resume=True)
    store.restart_at({"j": 0}, "config")
    store.restart_at({"j": 8}, "it_1")
    assert store.counts() == {"j": 8}
    store.lookup(SPIN, "j", task_id=1)
    store.restart_at({"j": 0}, "config")  # once the job has begun, a load is no restart
    assert store.counts() is None  # task 1 is in flight
    store.record(SPIN, "j", result(1, 0.5))
    assert store.counts() == {"j": 9}
    await journal.close()


async def test_a_checkpoint_saved_with_tasks_in_flight_restores_no_task_by_its_place(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A loop that submits its next iteration before it saves: the checkpoint's count included
    tasks the resumed job submits again after it, which met the places of the iteration after
    theirs and, their arguments equal, got its results."""
    first = await Journal.open(tmp_path, job="j", resume=False)
    store = JournalStore(first, resume=False)
    first.checkpoints.places = store
    for task_id in range(1, 5):
        store.lookup(SPIN, "j", task_id=task_id)
        store.record(SPIN, "j", result(task_id, float(task_id)))
    store.lookup(SPIN, "j", task_id=5)  # the next iteration's, running as the checkpoint is saved
    await first.checkpoints.save("it_0", {"x": 1})
    await first.close()
    again = await Journal.open(tmp_path, job="j", resume=True)
    resumed = JournalStore(again, resume=True)
    again.checkpoints.places = resumed
    with caplog.at_level(logging.WARNING, logger="batuta.observers.journal"):
        last = await again.checkpoints.latest()
    assert last is not None and last.in_flight
    assert any("was saved while tasks were running" in r.getMessage() for r in caplog.records)
    assert all(resumed.lookup(SPIN, "j", task_id=10 + n) is None for n in range(6))  # none restored by place
    await again.close()
