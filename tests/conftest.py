"""Fixtures shared by several test files. Keep it small: a fixture one file uses lives in that file."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
_PYTEST_PID = os.getpid()


def _interrupted(signum: int, frame: FrameType | None) -> None:
    if os.getpid() != _PYTEST_PID:  # a child forked by a test: die as SIGTERM means there
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise KeyboardInterrupt(f"stopped by signal {signum} (SIGTERM)")


def pytest_configure(config: pytest.Config) -> None:
    """A run stopped by SIGTERM (a CI job's timeout, `kill`) ends as Ctrl-C does: pytest runs
    the fixtures' finalisers, which stop by PID the sshd, agents and Slurm daemons they started
    and remove their namespaces. By default SIGTERM ends the process on the spot and leaves
    them running until a later run sweeps them up."""
    signal.signal(signal.SIGTERM, _interrupted)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The checkout's root folder (where pyproject.toml is)."""
    return REPO_ROOT


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """batuta's cache folder for this session (XDG_CACHE_HOME, inherited by every agent the
    tests start here): the user's code that pools ship (batuta/agent/code.py) lands there, not
    in ~/.cache, so nothing is found there by accident and nothing is left behind. SSH test
    hosts get one folder each (tests/support/sshd.py)."""
    folder = tmp_path_factory.mktemp("xdg-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("XDG_CACHE_HOME", str(folder))
    yield folder
    patch.undo()


# Real SSH hosts in network namespaces (tests/support/hosts.py): the `ssh_hosts` fixture.
from tests.support.conftest_hosts import ssh_hosts  # noqa: E402, F401
