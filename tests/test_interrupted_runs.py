"""A test run stopped by SIGTERM still runs its fixtures' finalisers (tests/conftest.py).

The multi-host tests start sshd in network namespaces, agents and Slurm daemons; a CI job's
timeout or a `kill` ends pytest with SIGTERM, which by default skips every finaliser and
leaves them running. Here a pytest run in a child process, with this suite's conftest, blocks
inside a test whose fixture writes a file when it is finalised; it gets SIGTERM and must end
as an interrupted run (exit code 2) with the finaliser run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

_CONFTEST = "from tests.conftest import pytest_configure  # noqa: F401\n"

_TEST = """
import signal
from pathlib import Path

import pytest


@pytest.fixture
def resource(tmp_path_factory):
    here = Path(__file__).parent
    (here / "started").write_text("")
    yield
    (here / "finalised").write_text("")


def test_blocks(resource):
    signal.pause()  # until the signal; its handler raises
"""


def test_sigterm_runs_the_finalisers(tmp_path: Path, repo_root: Path) -> None:
    (tmp_path / "conftest.py").write_text(_CONFTEST)
    (tmp_path / "test_blocking.py").write_text(_TEST)
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    child = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_blocking.py"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "started").exists():  # bounded: the child's fixture says when
            assert child.poll() is None, child.communicate()[0].decode()
            assert time.monotonic() < deadline, "the child's test never started"
            time.sleep(0.02)
        child.send_signal(signal.SIGTERM)
        output = child.communicate(timeout=60)[0].decode()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert (tmp_path / "finalised").exists(), output
    assert child.returncode == 2, output  # pytest's "interrupted"
    assert "stopped by signal 15 (SIGTERM)" in output, output
