"""`kill -9` the coordinator in the middle of `batuta run kmeans --journal DIR`; `--resume` finishes it.

The coordinator is a real subprocess. The test follows its JSON log on stderr and kills it
on an event, never after a sleep: once two iterations are checkpointed *and* the journal has
synced a result of the iteration in progress, so that the resumed run must use both the
checkpoint and the journal. The resumed run must end with the centroids, cluster counts and
inertia history of an uninterrupted run with the same seed in every bit (compared through
the final checkpoints both runs leave), and the killed coordinator must leave no agent or
worker process behind (a local agent exits when its stdin closes).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from batuta.jobs.kmeans import ITERATIONS
from batuta.observers.checkpoint import CheckpointManager, read_checkpoint

REPO = Path(__file__).resolve().parents[1]
LOGS = ("--log-format", "json", "--log-level", "debug")


def batuta_run(job: str, *options: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "-m", "batuta", "run", job, "--json", "-q", "--seed", "0", *options]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Wait for a run; return its JSON summary and its JSON log records."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{err[-3000:]}"
    return json.loads(out), [json.loads(line) for line in err.splitlines() if line.startswith('{"ts"')]


class MidIteration:
    """Kill condition for a fresh run that saves one checkpoint per iteration: iterations 0
    and 1 are checkpointed, and the journal has synced more results than those iterations
    produced, so at least one result of the iteration in progress is durable."""

    def __init__(self, chunks_per_iteration: Callable[[], int]) -> None:
        self.chunks_per_iteration = chunks_per_iteration
        self.saved = 0
        self.synced = 0

    def __call__(self, record: dict[str, Any]) -> bool:
        message = record.get("message", "")
        if record.get("logger") == "batuta.observers.checkpoint" and " saved " in message:
            self.saved += 1
        elif record.get("logger") == "batuta.observers.journal" and " synced, " in message:
            self.synced = int(message.split()[-3])  # "journal: N result(s) synced, TOTAL in all"
        return self.saved >= 2 and self.synced > self.saved * self.chunks_per_iteration()


def kill_when(proc: subprocess.Popen[str], condition: Callable[[dict[str, Any]], bool]) -> list[psutil.Process]:
    """Follow the run's JSON log; on `condition`, SIGKILL the coordinator. Returns its descendants."""
    watchdog = threading.Timer(90, proc.kill)  # a run that never meets the condition still ends
    watchdog.start()
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if not line.startswith('{"ts"'):
                continue
            if condition(json.loads(line)):
                descendants = psutil.Process(proc.pid).children(recursive=True)
                assert proc.poll() is None, "the job ended before it could be interrupted"
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)
                for rest in proc.stderr:  # what it logged before it died: the condition keeps count
                    if rest.startswith('{"ts"'):
                        condition(json.loads(rest))
                return descendants
        raise AssertionError(f"the run ended (exit {proc.wait()}) before the kill condition was met")
    finally:
        watchdog.cancel()


def restored_count(records: list[dict[str, Any]]) -> int:
    return sum(int(r["message"].split()[0]) for r in records if "restored from the journal" in r.get("message", ""))


def state_of(journal: Path, name: str) -> dict[str, Any]:
    return read_checkpoint(CheckpointManager(journal / "checkpoints", create=False).path_of(name)).state


def final_state(journal: Path) -> dict[str, Any]:
    return state_of(journal, f"kmeans_{ITERATIONS - 1:06d}")


def without_timing(result: str) -> str:
    return re.sub(r"\(\d+ tasks, [\d.]+ s\)", "(...)", result)


@pytest.mark.slow
def test_kill_9_mid_kmeans_then_resume_gives_identical_centroids(tmp_path: Path) -> None:
    reference_dir, journal = tmp_path / "uninterrupted", tmp_path / "journal"
    uninterrupted = batuta_run("kmeans", "--journal", str(reference_dir))
    killed = batuta_run("kmeans", "--journal", str(journal), *LOGS)  # both at once: the test takes less

    def chunks_per_iteration() -> int:  # as many as the job chose for this machine's slots
        first = CheckpointManager(journal / "checkpoints", create=False).list()[0]
        return len(state_of(journal, first.name)["params"]["bounds"])

    mid_iteration = MidIteration(chunks_per_iteration)
    descendants = kill_when(killed, mid_iteration)
    assert killed.returncode == -signal.SIGKILL
    assert descendants, "the coordinator had no agent to orphan"
    _gone, alive = psutil.wait_procs(descendants, timeout=15)
    for leftover in alive:  # never leak them into the next test, whatever the verdict
        leftover.kill()
    assert not alive, (
        f"processes left behind by the killed coordinator: {alive} "
        "(see test_agent_exits_on_eof_inside_a_frame_with_its_stderr_gone)"
    )
    checkpoints = CheckpointManager(journal / "checkpoints", create=False)
    last = checkpoints.list()[-1]
    resume_at = int(state_of(journal, last.name)["iteration"]) + 1
    assert 2 <= resume_at < ITERATIONS, "killed mid-run, after two checkpoints"
    chunks = chunks_per_iteration()

    resumed, records = finish(batuta_run("kmeans", "--journal", str(journal), "--resume", *LOGS))
    reference, _ = finish(uninterrupted)
    assert reference["ok"] and resumed["ok"], "the job checks itself against a single-process reference"
    assert without_timing(resumed["result"]) == without_timing(reference["result"])
    restored = restored_count(records)
    # Results synced past the last checkpoint on disk (the kill can land after one more
    # checkpoint than the condition saw: then there may be none to reuse).
    durable_after = mid_iteration.synced - resume_at * chunks
    if durable_after > 0:
        assert restored >= 1, f"{durable_after} results journaled after the last checkpoint were not reused"
    assert resumed["restored"] == restored
    # every task from the checkpoint on was submitted again; the journaled ones did not run
    assert resumed["tasks"] == (ITERATIONS - resume_at) * chunks
    expected, got = final_state(reference_dir), final_state(journal)
    for key in ("centroids", "counts"):
        assert got[key].dtype == expected[key].dtype and got[key].tobytes() == expected[key].tobytes(), key
    assert got["inertia"] == expected["inertia"]  # floats compared exactly: the same bits


def test_agent_exits_on_eof_inside_a_frame_with_its_stderr_gone() -> None:
    """What a coordinator killed while writing a large `Run` frame leaves its agent with."""
    read_end, write_end = os.pipe()
    agent = subprocess.Popen(
        [sys.executable, "-m", "batuta.agent", "--stdio", "--gpus", "none", "--slots", "1"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=write_end,
        cwd=REPO,
    )
    os.close(write_end)
    assert agent.stdin is not None and agent.stdout is not None
    try:
        agent.stdout.read(4)  # its Hello has begun: the agent is serving
        os.close(read_end)  # the coordinator's end of the agent's stderr dies with it
        agent.stdin.write(b"\x00\x00\x10\x00" + bytes(100))  # a 4096-byte frame, cut after 100
        agent.stdin.close()
        assert agent.wait(timeout=3) is not None
    finally:
        if agent.poll() is None:
            for child in psutil.Process(agent.pid).children(recursive=True):
                child.kill()
            agent.kill()
            agent.wait()
