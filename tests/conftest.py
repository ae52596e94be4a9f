"""Fixtures shared by several test files. Keep it small: a fixture one file uses lives in that file."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The checkout's root folder (where pyproject.toml is)."""
    return REPO_ROOT


# Real SSH hosts in network namespaces (tests/support/hosts.py): the `ssh_hosts` fixture.
from tests.support.conftest_hosts import ssh_hosts  # noqa: E402, F401
