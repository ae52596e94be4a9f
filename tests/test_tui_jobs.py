"""What the dashboard says of the jobs it runs (`batuta tui --job FILE`): the checks `batuta run`
makes of a job's `main`, and the alert a finished job leaves. Pilot tests on a local pool."""

from __future__ import annotations

from pathlib import Path

import pytest
from batuta.tui.app import BatutaApp
from batuta.tui.snapshot import screen_text

from tests.test_tui_app import SIZE, local_pool, until


@pytest.mark.parametrize(
    ("returned", "said"),
    [
        (
            'await pool.submit(Task.kernel("spin", 60.0))',
            "returned a TaskFuture from main() without awaiting it; await it for its result: 'await "
            "pool.submit(task)' gives the future, 'await future' the result (1 unfinished task cancelled)",
        ),
        ("asyncio.sleep(0)", "returned a coroutine from main() without awaiting it; await it: 'return await ...'"),
    ],
    ids=["task-future", "coroutine"],
)
async def test_a_main_that_returns_what_it_did_not_await_is_the_jobs_error(
    tmp_path: Path, returned: str, said: str
) -> None:
    """`batuta run` calls it an error; the dashboard said "done", the future's repr its result,
    and left its task running (a coroutine: a RuntimeWarning pointing into batuta)."""
    job = tmp_path / "unawaited.py"
    job.write_text(f"import asyncio\nfrom batuta import Task\n\nasync def main(pool):\n    return {returned}\n")
    app = BatutaApp(local_pool(1))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.model.status == "running", "the pool to start")
        app.start_job(str(job))
        await until(
            pilot, lambda: "unawaited" in app.model.jobs and app.model.jobs["unawaited"].state != "running", "end"
        )
        row = app.model.jobs["unawaited"]
        assert (row.state, row.message) == ("failed", f"job 'unawaited' {said}")
        assert any(f"job unawaited failed: job 'unawaited' {said}" == line.message for line in app.model.logs)
        assert any(f"job 'unawaited' {said}" == str(n.message) for n in app._notifications)
        cancelled = 1 if "TaskFuture" in said else 0  # the future's task: left running, a job's already over
        await until(pilot, lambda: app.pool is not None and app.pool.stats().cancelled == cancelled, "cancelled")


ALL_FAIL_JOB = """\
import asyncio
from batuta import Task

async def main(pool):
    futures = [await pool.submit(Task.binary("/bin/sh", "-c", "exit 3")) for _ in range(10)]
    await asyncio.gather(*futures, return_exceptions=True)
    return "every task failed"
"""


async def test_a_job_whose_tasks_failed_is_an_alert_the_moment_it_ends(tmp_path: Path) -> None:
    """The jobs panel showed FAILED 10 beside "✔ all clear" until the next whole second."""
    job = tmp_path / "allfail.py"
    job.write_text(ALL_FAIL_JOB)
    app = BatutaApp(local_pool(2))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.model.status == "running", "the pool to start")
        app.start_job(str(job))
        await until(pilot, lambda: "allfail" in app.model.jobs and app.model.jobs["allfail"].state != "running", "end")
        # the frame that drew its row drew its alert: no waiting for the alerts' once-a-second look
        titles = [alert.title for alert in app.model.alerts]
        assert "job allfail done: 10 of 10 tasks failed" in titles, titles
        assert "10 tasks failed in the last minute" in titles, titles
        await until(pilot, lambda: "job allfail done: 10 of 10 tasks failed" in screen_text(app), "the alert on screen")
        assert "all clear" not in screen_text(app)
