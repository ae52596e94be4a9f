"""Jobs: the built-in example jobs, and the loading and running of job files.

A job is an `async def main(pool)`: a built-in one is a public module in this folder
(`batuta run demo`), a user's is a `.py` file (`batuta run ./my_job.py`). Modules whose
names start with `_` are the machinery, not jobs; what the command line and the dashboard
use of them is exported here. Importing this package is cheap: the runner (and with it the
runtime) is imported on first use of one of its names, when a job actually runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from batuta.jobs._load import Job, JobError, builtin_job_names, load_job
from batuta.jobs._text import printable

if TYPE_CHECKING:
    from batuta.jobs._data import job_backend, set_job_backend
    from batuta.jobs._progress import ProgressBar
    from batuta.jobs._run import (
        SUMMARISED,
        HostsUnreachableError,
        RunOutcome,
        drop_summarised,
        drop_summarised_quietly,
        linger_metrics,
        make_pool,
        returned_unawaited,
        run_job,
        start_metrics,
    )
    from batuta.jobs._serve import serve_job
    from batuta.jobs._summary import HostSummary, RunSummary, RunTracker

# name -> the private module that defines it, imported on first use (see __getattr__)
_LAZY = {
    "ProgressBar": "batuta.jobs._progress",
    "job_backend": "batuta.jobs._data",
    "set_job_backend": "batuta.jobs._data",
    "HostsUnreachableError": "batuta.jobs._run",
    "SUMMARISED": "batuta.jobs._run",
    "RunOutcome": "batuta.jobs._run",
    "drop_summarised": "batuta.jobs._run",
    "drop_summarised_quietly": "batuta.jobs._run",
    "linger_metrics": "batuta.jobs._run",
    "make_pool": "batuta.jobs._run",
    "returned_unawaited": "batuta.jobs._run",
    "run_job": "batuta.jobs._run",
    "start_metrics": "batuta.jobs._run",
    "serve_job": "batuta.jobs._serve",
    "HostSummary": "batuta.jobs._summary",
    "RunSummary": "batuta.jobs._summary",
    "RunTracker": "batuta.jobs._summary",
}

__all__ = [
    "SUMMARISED",
    "HostSummary",
    "HostsUnreachableError",
    "Job",
    "JobError",
    "ProgressBar",
    "RunOutcome",
    "RunSummary",
    "RunTracker",
    "builtin_job_names",
    "drop_summarised",
    "drop_summarised_quietly",
    "job_backend",
    "linger_metrics",
    "load_job",
    "make_pool",
    "printable",
    "returned_unawaited",
    "run_job",
    "serve_job",
    "set_job_backend",
    "start_metrics",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'batuta.jobs' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once imported, a plain attribute
    return value
