"""The `batuta` command, run as a real process: exit codes, one-line errors, the run summary.

Error cases need no runtime (a job file is checked before any pool starts); the runs that
start a local pool are skipped until `batuta.runtime.pool` exists. The summary's arithmetic
and the job loader are also tested in-process, where a subprocess would add nothing.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from batuta import TaskResult, TaskStatus
from batuta._version import __version__
from batuta.jobs import JobError, load_job
from batuta.jobs._summary import RunTracker, percentile

REPO_ROOT = Path(__file__).resolve().parent.parent

ERROR_TIMEOUT_S = 30
RUN_TIMEOUT_S = 90

needs_runtime = pytest.mark.skipif(
    importlib.util.find_spec("batuta.runtime.pool") is None,
    reason="batuta.runtime.pool is not written yet",
)


def _env() -> dict[str, str]:
    """This checkout's batuta first on the path, whatever else is installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


def batuta(*args: str, cwd: Path, timeout: float = ERROR_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """`python -m batuta ARGS` in `cwd`, with no terminal and a bounded run time."""
    return subprocess.run(
        [sys.executable, "-m", "batuta", *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def write(folder: Path, name: str, source: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(source))
    return path


# -- version -----------------------------------------------------------------------------


def test_python_dash_m_version(tmp_path: Path) -> None:
    done = batuta("--version", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"batuta {__version__}"


def test_version_subcommand(tmp_path: Path) -> None:
    done = batuta("version", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"batuta {__version__} (Python ")


def test_console_script_version(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "batuta"
    if not script.exists():
        pytest.skip(f"no console script at {script}: install with pip install -e '.[test]'")
    done = subprocess.run(
        [str(script), "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=ERROR_TIMEOUT_S
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"batuta {__version__}"


def test_cli_module_imports_nothing_heavy(tmp_path: Path) -> None:
    """`batuta agent` starts on every host: importing the CLI must not pull in the coordinator."""
    probe = (
        "import sys, batuta.cli\n"
        "heavy = {'asyncio', 'rich', 'numpy', 'numba', 'textual', 'asyncssh', 'batuta.runtime', 'batuta.jobs'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# -- usage errors: exit 2, one line ------------------------------------------------------

SYNTAX_ERROR = """\
async def main(pool):
    return (
"""


@pytest.mark.parametrize(
    ("files", "args", "expected"),
    [
        pytest.param({}, ["run", "missing.py"], "job file 'missing.py' not found", id="missing-file"),
        pytest.param({"job.py": SYNTAX_ERROR}, ["run", "job.py"], "job.py:2", id="syntax-error"),
        pytest.param({"job.py": "x = 1\n"}, ["run", "job.py"], "defines no 'main'", id="no-main"),
        pytest.param(
            {"job.py": "def main(pool):\n    return 1\n"}, ["run", "job.py"], "is not 'async def'", id="sync-main"
        ),
        pytest.param(
            {"job.py": "async def main(pool, extra):\n    pass\n"},
            ["run", "job.py"],
            "must take one argument, the pool",
            id="wrong-signature",
        ),
        pytest.param(
            {"job.py": "import batuta_no_such_module\n"},
            ["run", "job.py"],
            "job.py:1: ModuleNotFoundError: No module named 'batuta_no_such_module'",
            id="import-error",
        ),
        pytest.param({"job.txt": "x"}, ["run", "job.txt"], "is not a .py file", id="not-py"),
        pytest.param({}, ["run", "nosuchjob"], "unknown built-in job 'nosuchjob'", id="unknown-builtin"),
        pytest.param({}, ["run", "kmean"], "did you mean 'kmeans'?", id="misspelt-builtin"),
        pytest.param(
            {"job.py": "async def main(pool):\n    pass\n"},
            ["run", "job.py", "--workers", "0"],
            "--workers: 0 is too few",
            id="workers-zero",
        ),
        pytest.param(
            {"job.py": "async def main(pool):\n    pass\n"},
            ["run", "job.py", "--workers", "two"],
            "--workers: 'two' is not a whole number",
            id="workers-not-int",
        ),
        pytest.param(
            {"job.py": "async def main(pool):\n    pass\n"},
            ["run", "job.py", "--workers", "5000"],
            "--workers: 5000 is too many; one agent runs at most 1024 slots",
            id="workers-too-many",
        ),
        pytest.param({}, ["run"], "required: JOB", id="no-job"),
        pytest.param({}, [], "no command given", id="no-command"),
        pytest.param({}, ["frobnicate"], "invalid choice: 'frobnicate'", id="unknown-command"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(
    tmp_path: Path, files: dict[str, str], args: list[str], expected: str
) -> None:
    for name, source in files.items():
        write(tmp_path, name, source)
    done = batuta(*args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("batuta: error: ")
    assert expected in lines[0]
    assert done.stdout == ""


def test_unknown_builtin_suggests_the_file_beside_it(tmp_path: Path) -> None:
    write(tmp_path, "myjob.py", "async def main(pool):\n    pass\n")
    done = batuta("run", "myjob", cwd=tmp_path)
    assert done.returncode == 2
    assert "did you mean './myjob.py'?" in done.stderr


# -- the loader, in-process --------------------------------------------------------------


def test_job_file_imports_a_helper_beside_it_without_leaving_sys_path(tmp_path: Path) -> None:
    write(tmp_path, "helper_for_batuta_test.py", "ANSWER = 42\n")
    path = write(
        tmp_path, "job.py", "from helper_for_batuta_test import ANSWER\n\nasync def main(pool):\n    return ANSWER\n"
    )
    before = list(sys.path)
    job = load_job(str(path))
    assert sys.path == before
    assert job.origin == str(path.resolve())


def test_builtin_jobs_load() -> None:
    for name in ("demo", "pi"):
        assert load_job(name).origin == "built-in"


def test_module_level_exception_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "job.py", "x = 1\nraise ValueError('bad config')\n")
    with pytest.raises(JobError, match=r"job\.py:2: ValueError: bad config"):
        load_job(str(path))


# -- the summary's arithmetic ------------------------------------------------------------


def test_percentile_interpolates_like_numpy() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 10.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 95) == pytest.approx(8.8)
    assert percentile([5.0], 99) == 5.0
    assert math.isnan(percentile([], 50))


def test_tracker_counts_each_task_once() -> None:
    tracker = RunTracker()
    for task_id in (1, 2, 3):
        tracker.task_queued(task_id)
    tracker.task_queued(3)  # requeued after a lost host: still one task
    ok = TaskResult(task_id=1, name="spin", status=TaskStatus.SUCCEEDED, duration=0.5, queue_wait=0.25)
    bad = TaskResult(task_id=2, name="boom", status=TaskStatus.FAILED, error="ZeroDivisionError: x", attempts=1)
    for result in (ok, ok, bad):  # a duplicate result is counted once
        tracker.task_finished(result)
    summary = tracker.summary(job="j", wall_s=2.0, result=None, error=None).to_json()
    assert (summary["tasks"], summary["succeeded"], summary["failed"], summary["unfinished"]) == (3, 1, 1, 1)
    assert summary["latency_s"]["p50"] == pytest.approx(0.375)  # mean of 0.75 (ok) and 0.0 (bad)
    assert summary["failures"] == [bad.describe_failure()]
    assert summary["ok"] is False
    assert summary["tasks_per_s"] == 1.0


# -- real runs (need the runtime) --------------------------------------------------------

COUNTING_JOB = """\
import sys
from batuta import Task

async def main(pool):
    print("a line the job prints")
    futures = [await pool.submit(Task.kernel("spin", 0.001)) for _ in range(6)]
    values = await pool.map("spin", [0.001, 0.001, 0.001])
    {extra}
    for future in futures:
        await future
    return "done"
"""
FAILING_TASK = 'await (await pool.submit(Task.binary(sys.executable, "-c", "raise SystemExit(3)")))'


@needs_runtime
def test_run_json_counts_what_the_job_submitted(tmp_path: Path) -> None:
    write(tmp_path, "job.py", COUNTING_JOB.format(extra="pass"))
    done = batuta("run", "job.py", "--workers", "2", "--json", cwd=tmp_path, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)  # one JSON object and nothing else on stdout
    assert (summary["tasks"], summary["succeeded"], summary["failed"]) == (9, 9, 0)
    assert summary["result"] == "done"
    assert summary["ok"] is True
    assert summary["run_time_s"]["p50"] >= 0.001
    assert summary["latency_s"]["p99"] >= summary["run_time_s"]["p50"]
    assert "a line the job prints" in done.stderr


@needs_runtime
def test_run_with_a_failed_task_exits_1_and_counts_it(tmp_path: Path) -> None:
    write(tmp_path, "job.py", COUNTING_JOB.format(extra=FAILING_TASK))
    done = batuta("run", "job.py", "--workers", "2", "--json", cwd=tmp_path, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 1, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["tasks"], summary["succeeded"], summary["failed"]) == (10, 9, 1)
    assert len(summary["failures"]) == 1
    assert summary["error"] is None


@needs_runtime
def test_run_text_summary(tmp_path: Path) -> None:
    write(tmp_path, "job.py", COUNTING_JOB.format(extra=FAILING_TASK))
    done = batuta("run", "job.py", "-w", "2", cwd=tmp_path, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 1, done.stderr
    out = done.stdout
    assert "done" in out.splitlines()
    assert "10 tasks: 9 succeeded, 1 failed" in out
    assert "latency (queue + run)  p50" in out
    assert "failed: task" in out


@needs_runtime
def test_job_that_raises_exits_1_with_its_traceback(tmp_path: Path) -> None:
    write(tmp_path, "job.py", "async def main(pool):\n    raise ValueError('the job broke')\n")
    done = batuta("run", "job.py", "-w", "1", "--json", cwd=tmp_path, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 1
    summary = json.loads(done.stdout)
    assert summary["error"] == "job 'job.py' raised ValueError: the job broke"
    assert "Traceback (most recent call last)" in done.stderr
    assert 'job.py", line 2, in main' in done.stderr
    assert done.stderr.rstrip().splitlines()[-1] == "batuta: error: job 'job.py' raised ValueError: the job broke"


@needs_runtime
@pytest.mark.parametrize("name", ["demo", "pi"])
def test_builtin_jobs_run(tmp_path: Path, name: str) -> None:
    done = batuta("run", name, "--workers", "2", "--json", cwd=tmp_path, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["failed"] == 0
    assert summary["result"].startswith("pi ~ 3.14")


@needs_runtime
def test_ctrl_c_closes_the_pool_and_exits_130(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    write(
        tmp_path,
        "job.py",
        f"""\
        import asyncio, pathlib
        from batuta import Task

        async def main(pool):
            await pool.run(Task.kernel("spin", 0.001))
            pathlib.Path({str(marker)!r}).touch()
            await asyncio.sleep(60)
        """,
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "batuta", "run", "job.py", "-w", "1"],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the job never started"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, stderr
    assert stderr.rstrip().splitlines()[-1] == "batuta: interrupted"


@needs_runtime
def test_progress_bar_draws_on_a_terminal(tmp_path: Path) -> None:
    """With stderr on a terminal (a pty here), rich draws the bar: done/total and failures."""
    import pty
    import threading

    write(tmp_path, "job.py", COUNTING_JOB.format(extra="pass"))
    master, slave = pty.openpty()
    chunks: list[bytes] = []

    def drain() -> None:  # keep the pty from filling up and blocking the child
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    env = {**_env(), "TERM": "xterm-256color", "COLUMNS": "120"}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "batuta", "run", "job.py", "-w", "2"],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=slave,
            text=True,
            timeout=RUN_TIMEOUT_S,
        )
    finally:
        os.close(slave)
        reader.join(timeout=10)
        os.close(master)
    drawn = b"".join(chunks).decode(errors="replace")
    assert done.returncode == 0, drawn
    assert "9/9" in drawn
    assert "0 failed" in drawn
    assert "9 tasks: 9 succeeded, 0 failed" in done.stdout
