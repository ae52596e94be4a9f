"""Structured logs: context on every record, valid JSON lines, the pool observer, clean teardown."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import logging.handlers
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from batuta import Pool, Task, TaskStatus
from batuta.observers.logs import (
    CONTEXT_KEYS,
    ContextFilter,
    JsonFormatter,
    PoolLogObserver,
    add_handler,
    configure,
    current_context,
    log_context,
)
from batuta.runtime.pool import PoolConfig, local_host

REPO = Path(__file__).resolve().parents[1]


class ListHandler(logging.Handler):
    """What the TUI's log panel does: keep records (cheaply) for later display."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _context(record: logging.LogRecord, *keys: str) -> tuple[object, ...]:
    """The context fields `keys` of `record`: ContextFilter sets them at run time, so
    LogRecord's type does not know them."""
    return tuple(getattr(record, key) for key in keys)


@pytest.fixture
def captured() -> Iterator[ListHandler]:
    handler = ListHandler()
    logger = logging.getLogger("batuta")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    remove = add_handler(handler)
    yield handler
    remove()
    logger.setLevel(level)


def test_context_comes_from_extra_then_log_context_and_is_none_otherwise(captured: ListHandler) -> None:
    log = logging.getLogger("batuta.test")
    log.info("plain")
    with log_context(job="kmeans", attempt=1):
        log.info("in a job")
        with log_context(task=7, attempt=2):
            log.info("in a task", extra={"host": "gpu1"})
        assert current_context() == {"job": "kmeans", "attempt": 1}
    plain, in_job, in_task = captured.records
    assert all(getattr(plain, key) is None for key in CONTEXT_KEYS)
    assert _context(in_job, "job", "task", "attempt") == ("kmeans", None, 1)
    assert _context(in_task, "job", "task", "host", "attempt") == ("kmeans", 7, "gpu1", 2)
    with pytest.raises(ValueError, match="unknown log context field"), log_context(tasks=1):
        pass


async def test_asyncio_tasks_inherit_the_context(captured: ListHandler) -> None:
    async def work() -> None:
        await asyncio.sleep(0)
        logging.getLogger("batuta.test").warning("from a spawned task")

    with log_context(job="pi"):
        task = asyncio.create_task(work())
    await task
    assert _context(captured.records[-1], "job") == ("pi",)


def test_json_lines_are_valid_json_with_the_documented_fields() -> None:
    handler = logging.StreamHandler(io.StringIO())
    remove = add_handler(handler, fmt="json")
    log = logging.getLogger("batuta.test.json")
    log.setLevel(logging.INFO)
    try:
        with log_context(job='quote " and \\ backslash'):
            log.warning("héllo %s", "wörld", extra={"task": 3, "slot": "a/0"})
            try:
                raise ValueError("inner")
            except ValueError:
                log.exception("it broke")
        log.info("no context")
    finally:
        remove()
        log.setLevel(logging.NOTSET)
    lines = [json.loads(line) for line in handler.stream.getvalue().splitlines()]
    first, broke, bare = lines
    assert list(first)[:4] == ["ts", "level", "logger", "message"]
    assert first["level"] == "WARNING" and first["logger"] == "batuta.test.json" and first["message"] == "héllo wörld"
    assert first["ts"].endswith("+00:00") and "T" in first["ts"]
    assert (first["job"], first["task"], first["slot"]) == ('quote " and \\ backslash', 3, "a/0")
    assert "host" not in first and "attempt" not in first  # context that does not apply is left out
    assert broke["level"] == "ERROR" and "ValueError: inner" in broke["exc"] and "Traceback" in broke["exc"]
    assert set(bare) == {"ts", "level", "logger", "message"}


def test_configure_writes_text_and_json_off_the_loop_and_close_undoes_it(tmp_path: Path) -> None:
    logger = logging.getLogger("batuta")
    before = (logger.level, logger.propagate, list(logger.handlers))
    stream = io.StringIO()
    log_file = tmp_path / "batuta.log"
    setup = configure(level="info", fmt="json", file=log_file, stream=stream)
    assert isinstance(setup.queue_handler, logging.handlers.QueueHandler)  # the caller only enqueues
    assert logger.propagate is False
    with log_context(job="demo"):
        logging.getLogger("batuta.runtime.pool").info("host %s is up", "local", extra={"host": "local"})
        logging.getLogger("batuta.runtime.pool").debug("below the level")
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            logging.getLogger("batuta.x").exception("with a traceback")
    setup.close()
    assert (logger.level, logger.propagate, list(logger.handlers)) == before
    for text in (stream.getvalue(), log_file.read_text()):
        records = [json.loads(line) for line in text.splitlines()]
        assert [r["message"] for r in records] == ["host local is up", "with a traceback"]
        assert records[0]["job"] == "demo" and records[0]["host"] == "local"
        assert "ZeroDivisionError" in records[1]["exc"]
    text_stream = io.StringIO()
    with configure(level="warning", fmt="text", stream=text_stream), log_context(job="demo"):
        logging.getLogger("batuta.pool").warning("task %d failed", 4, extra={"task": 4, "slot": "local/0"})
    line = text_stream.getvalue().strip()
    assert line.endswith("WARNING batuta.pool: task 4 failed [job=demo task=4 slot=local/0]")
    with pytest.raises(ValueError, match="unknown log level"):
        configure(level="loud")
    with pytest.raises(ValueError, match="cannot open log file"):
        configure(file=tmp_path / "no" / "such" / "dir" / "x.log")
    assert (logger.level, logger.propagate, list(logger.handlers)) == before


def test_json_formatter_alone_copes_with_odd_context_values() -> None:
    record = logging.LogRecord("batuta.t", logging.INFO, __file__, 1, "m", None, None)
    record.task = object()
    ContextFilter().filter(record)
    assert json.loads(JsonFormatter().format(record))["task"].startswith("<object object")


async def test_pool_observer_logs_failures_and_host_changes_with_context(captured: ListHandler) -> None:
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    host = local_host(2, gpus="none", kernel_modules=["tests.support.misbehaving_kernels"], env=env)
    pool = Pool([host], PoolConfig())
    observer = PoolLogObserver(pool).attach()
    try:
        async with pool:
            with pool.job("kmeans"):
                bad = await pool.run(Task.kernel("test_raise", "boom"))
                good = await pool.run(Task.kernel("noop", 1))
                crashed = await pool.run(Task.kernel("test_crash", max_attempts=2))
            assert bad.status is TaskStatus.FAILED and good.is_success() and crashed.status is TaskStatus.LOST
            drained = asyncio.Event()
            pool.subscribe(lambda e: drained.set() if getattr(e, "state", None) == "drained" else None)
            pool.drain("local")
            await asyncio.wait_for(drained.wait(), 10)
    finally:
        observer.close()
    mine = [r for r in captured.records if r.name == "batuta.pool"]
    up = next(r for r in mine if "is up" in r.getMessage())
    assert up.levelno == logging.INFO and _context(up, "host") == ("local",)
    failure = next(r for r in mine if "boom" in r.getMessage())
    assert failure.levelno == logging.WARNING
    assert _context(failure, "job", "task", "host", "slot", "attempt") == (
        "kmeans",
        bad.task_id,
        "local",
        bad.slot,
        1,
    )
    requeued = next(r for r in mine if "requeued" in r.getMessage())
    assert requeued.levelno == logging.WARNING and _context(requeued, "job", "task", "attempt") == (
        "kmeans",
        crashed.task_id,
        1,
    )
    lost = next(r for r in mine if _context(r, "task") == (crashed.task_id,) and "lost" in r.getMessage())
    assert _context(lost, "attempt", "host") == (2, "local")
    success = next(r for r in mine if "succeeded" in r.getMessage())
    assert success.levelno == logging.DEBUG and _context(success, "task") == (good.task_id,)
    states = [r.getMessage() for r in mine if "host local is" in r.getMessage()]
    assert any("draining" in s for s in states) and any("drained" in s for s in states)


async def test_a_host_that_fails_to_start_is_warned_about_once(captured: ListHandler) -> None:
    """Each start failure printed two warnings, the runtime's ("failed to start ...; retrying")
    and the observer's ("is unreachable: ..."): the observer's is INFO now."""
    from batuta.errors import TransportError
    from batuta.runtime.session import HostSpec
    from batuta.transport.base import ByteStream

    async def refused() -> ByteStream:
        raise TransportError("host far: connection refused (test)")

    specs = [local_host(1, gpus="none"), HostSpec(name="far", launch=refused)]
    pool = Pool(specs, PoolConfig(relaunch_backoff=30.0))  # no relaunch while the test runs
    observer = PoolLogObserver(pool).attach()
    try:
        async with pool:
            assert (await pool.run(Task.kernel("noop", 1))).value == 1
    finally:
        observer.close()
    about = [r for r in captured.records if "far" in r.getMessage()]
    warned = [r for r in about if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in warned] == [
        "host far failed to start: host far: connection refused (test); retrying in the background"
    ]
    assert _context(warned[0], "host") == ("far",)
    assert any(r.name == "batuta.pool" and "is unreachable" in r.getMessage() for r in about)  # at INFO


LOGGING_JOB = """
import logging

from batuta import Task


async def main(pool):
    logging.getLogger("batuta.userjob").warning("about to fail on purpose")
    await pool.run(Task.kernel("spin", -1.0))  # refused by the kernel's validator: FAILED
    return "done"
"""


def test_batuta_run_log_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from batuta.cli import main

    job = tmp_path / "logging_job.py"
    job.write_text(LOGGING_JOB)
    log_file = tmp_path / "run.log"
    logger = logging.getLogger("batuta")
    before = (logger.level, logger.propagate, list(logger.handlers))
    code = main(["run", str(job), "-q", "--log-format", "json", "--log-level", "INFO", "--log-file", str(log_file)])
    assert code == 1  # a task failed
    assert (logger.level, logger.propagate, list(logger.handlers)) == before
    on_file = [json.loads(line) for line in log_file.read_text().splitlines()]
    err = capsys.readouterr().err
    on_stderr = [json.loads(line) for line in err.splitlines() if line.startswith('{"ts"')]
    mine = next(r for r in on_file if r["logger"] == "batuta.userjob")
    assert mine["level"] == "WARNING" and mine["job"] == str(job)
    failed = next(r for r in on_file if r["logger"] == "batuta.pool" and "spin" in r["message"])
    # the console leaves the failed task to the run's summary ("batuta: 1 task failed: ..."), the file keeps it
    assert on_stderr == [r for r in on_file if r is not failed]
    assert err.count("argument 'seconds' must be >= 0") == 1
    assert failed["level"] == "WARNING" and failed["job"] == str(job) and failed["host"] == "local"
    assert isinstance(failed["task"], int) and failed["slot"].startswith("local/") and failed["attempt"] == 1
    assert any(r["message"].startswith("host local is up") for r in on_file)  # INFO was on


def test_bad_log_options_are_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from batuta.cli import main

    assert main(["run", "pi", "--log-level", "loud"]) == 2
    assert main(["run", "pi", "--log-format", "xml"]) == 2
    assert main(["run", "pi", "--log-file", str(tmp_path / "missing" / "x.log")]) == 2
    assert "cannot open log file" in capsys.readouterr().err


def test_the_same_failure_over_and_over_is_warned_about_ten_times(captured: ListHandler) -> None:
    from batuta import TaskResult
    from batuta.observers.logs import FAILURES_WARNED_PER_KIND
    from batuta.runtime import events as pe

    class NoPool:
        def subscribe(self, callback: object) -> object:
            return lambda: None

    observer = PoolLogObserver(NoPool()).attach()  # type: ignore[arg-type]
    logging.getLogger("batuta.pool").setLevel(logging.DEBUG)
    try:
        for task_id in range(25):
            result = TaskResult(task_id=task_id, name="k", status=TaskStatus.FAILED, error=f"ValueError: bad {task_id}")
            observer.on_event(pe.TaskFinished(result=result, at=0.0))
        other = TaskResult(task_id=99, name="k", status=TaskStatus.FAILED, error="KeyError: 'x'")
        observer.on_event(pe.TaskFinished(result=other, at=0.0))
    finally:
        logging.getLogger("batuta.pool").setLevel(logging.NOTSET)
    mine = [r for r in captured.records if r.name == "batuta.pool"]
    warnings = [r for r in mine if r.levelno == logging.WARNING]
    assert len(warnings) == FAILURES_WARNED_PER_KIND + 1  # ten of the first kind, then the other kind
    assert "further failures of k like this one are logged at DEBUG" in warnings[9].getMessage()
    assert "KeyError" in warnings[-1].getMessage()
    assert sum(r.levelno == logging.DEBUG for r in mine) == 25 - FAILURES_WARNED_PER_KIND


async def test_a_lost_host_s_requeues_are_one_warning_and_each_reason_is_at_debug(
    captured: ListHandler, tmp_path: Path
) -> None:
    """A host with many slots lost printed one "task N requeued" warning per task at once (64
    slots: 64 lines). One line per host now; each task's reason stays at DEBUG."""
    import psutil

    from batuta.runtime import events as pe

    env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    host = local_host(6, gpus="none", kernel_modules=["tests.support.misbehaving_kernels"], env=env)
    pool = Pool([host], PoolConfig())
    observer = PoolLogObserver(pool).attach()
    started: set[int] = set()
    requeued: set[int] = set()
    all_started, all_requeued, summed = asyncio.Event(), asyncio.Event(), asyncio.Event()

    def watch(event: object) -> None:
        if isinstance(event, pe.TaskStarted):
            started.add(event.task_id)
            if len(started) == 6:
                all_started.set()
        elif isinstance(event, pe.TaskRequeued):
            requeued.add(event.task_id)
            if len(requeued) == 6:
                all_requeued.set()

    class Summed(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "tasks requeued" in record.getMessage():
                summed.set()

    remove = add_handler(Summed())
    gate = tmp_path / "gate"
    try:
        async with pool:
            pool.subscribe(watch)
            futures = [await pool.submit(Task.kernel("test_gate", str(gate), i, 60.0)) for i in range(6)]
            await asyncio.wait_for(all_started.wait(), 30)
            agent = next(p for p in psutil.Process().children() if "batuta.agent" in " ".join(p.cmdline()))
            agent.kill()
            await asyncio.wait_for(all_requeued.wait(), 30)
            await asyncio.wait_for(summed.wait(), 10)
            gate.touch()
            assert [(await f).value for f in futures] == list(range(6))
    finally:
        remove()
        observer.close()
    mine = [r for r in captured.records if r.name == "batuta.pool" and "requeued" in r.getMessage()]
    ids = sorted(f.task_id for f in futures)
    warned = [r for r in mine if r.levelno == logging.WARNING]
    assert len(warned) == 1, [r.getMessage() for r in warned]
    said = warned[0].getMessage()
    assert said.startswith(f"host local: 6 tasks requeued (ids {ids[0]}-{ids[-1]}); task {ids[0]}: local/")
    assert said.endswith("(each task's reason is logged at DEBUG)")
    assert _context(warned[0], "host") == ("local",)
    each = [r for r in mine if r.levelno == logging.DEBUG]
    assert sorted(int(str(_context(r, "task")[0])) for r in each) == ids
    assert all("local/" in r.getMessage() and "lost" in r.getMessage() for r in each)
