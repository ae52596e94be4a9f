"""The job label of the tasks submitted from the current context (`Pool.job`).

A context variable: the label follows the coroutine that set it and the tasks it spawns,
so two jobs running at once on one pool (the dashboard's) label their own tasks only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

from batuta.errors import UsageError

current_job: ContextVar[str] = ContextVar("batuta_job", default="")


@contextlib.contextmanager
def job_label(name: str) -> Iterator[str]:
    """Label every task submitted inside as job `name`."""
    if not name:
        raise UsageError("a job needs a non-empty name")
    token = current_job.set(name)
    try:
        yield name
    finally:
        current_job.reset(token)
