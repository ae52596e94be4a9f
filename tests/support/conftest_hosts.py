"""pytest side of tests/support/hosts.py: the ``ssh_hosts`` fixture (registered in tests/conftest.py).

    def test_something(ssh_hosts):
        hosts = ssh_hosts(3)            # TestHosts, started; torn down after the test, pass or fail
        hosts = ssh_hosts(2, env={"PYTHONPATH": str(REPO)})   # more runs in one test are fine

Without root, ``ip`` or ``sshd`` the test is skipped with the reason; under ``CI=true`` (where
.ci/run installs openssh-server and iproute2) it fails instead, so CI never hides a broken setup.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support import hosts as _hosts
from tests.support.hosts import TestHosts


def running_in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def require_test_hosts() -> None:
    """Skip the calling test when test hosts cannot run here; fail instead under CI=true."""
    reason = _hosts.unavailable_reason()
    if reason is None:
        return
    if running_in_ci():
        pytest.fail(f"CI=true but real SSH test hosts are unavailable: {reason}", pytrace=False)
    pytest.skip(f"real SSH test hosts unavailable: {reason}")


@pytest.fixture
def ssh_hosts() -> Iterator[Callable[..., TestHosts]]:
    """Factory: ``ssh_hosts(count=3, **TestHosts options)`` returns started hosts; every run made
    is closed (killed by PID, deleted by name) when the test ends, also when it failed."""
    require_test_hosts()
    runs: list[TestHosts] = []

    def make(count: int = 3, **options: Any) -> TestHosts:
        hosts = TestHosts(count, **options)
        runs.append(hosts)
        return hosts.start()

    try:
        yield make
    finally:
        for hosts in reversed(runs):
            hosts.close()
