"""`--journal DIR` without `--resume` on the journal of a run that did not finish is refused:
it threw the run's results away with a warning, when the user had only forgotten `--resume`."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from batuta import TaskResult, TaskStatus
from batuta.observers.journal import Journal, JournalError

REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 120


def result(task_id: int, value: object) -> TaskResult:
    return TaskResult(task_id=task_id, name="t", status=TaskStatus.SUCCEEDED, value=value, host="h", job="j")


async def bound_run(folder: Path, *, resume: bool, finished: bool) -> None:
    journal = await Journal.open(folder, job="job.py", resume=resume)
    await journal.bind("code-1")
    journal.record("k", result(1, 1.0))
    await journal.close(finished=finished)


async def test_a_run_that_did_not_finish_is_refused_without_resume(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await bound_run(tmp_path, resume=False, finished=False)  # killed, interrupted, or its job raised
    with pytest.raises(JournalError) as refused:
        await Journal.open(tmp_path, job="job.py", resume=False)
    assert "a run of job.py that did not finish" in str(refused.value)
    assert "add --resume" in str(refused.value) and "remove the folder" in str(refused.value)
    await bound_run(tmp_path, resume=True, finished=True)  # resumed, and this time to its end
    with caplog.at_level(logging.WARNING, logger="batuta.observers.journal"):
        fresh = await Journal.open(tmp_path, job="job.py", resume=False)  # a finished run's: started over
    assert len(fresh) == 0 and any("starting over" in r.getMessage() for r in caplog.records)
    await fresh.close()


async def test_a_journal_no_run_bound_is_started_over_as_before(tmp_path: Path) -> None:
    journal = await Journal.open(tmp_path, job="job.py", resume=False)  # the library's own use
    journal.record("k", result(1, 1.0))
    await journal.close()
    await (await Journal.open(tmp_path, job="job.py", resume=False)).close()


JOB = """\
    from pathlib import Path

    from batuta import Task


    async def main(pool):
        values = await pool.map("noop", [(i,) for i in range(4)])
        if Path("fail").exists():
            raise RuntimeError("the job's own bug")
        return sum(values)
"""


def batuta_run(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "batuta", "run", "job.py", "-w", "1", "--journal", "journal", *args],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )


def test_the_command_names_resume_and_exits_2(tmp_path: Path) -> None:
    (tmp_path / "job.py").write_text(textwrap.dedent(JOB))
    (tmp_path / "fail").touch()
    raised = batuta_run(tmp_path)
    assert raised.returncode == 1 and "the job's own bug" in raised.stderr + raised.stdout
    refused = batuta_run(tmp_path)
    assert refused.returncode == 2, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "did not finish" in lines[0] and "add --resume" in lines[0], refused.stderr
    (tmp_path / "fail").unlink()
    resumed = batuta_run(tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "(4 restored from the journal)" in resumed.stdout
    again = batuta_run(tmp_path)  # it finished: a run without --resume starts it over, as before
    assert again.returncode == 0, again.stderr
    assert "restored" not in again.stdout and "starting over" in again.stderr
