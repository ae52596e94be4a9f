"""Jobs: the built-in example jobs, and the loading and running of job files.

A job is an `async def main(pool)`: a built-in one is a public module in this folder
(`batuta run demo`), a user's is a `.py` file (`batuta run ./my_job.py`). Modules whose
names start with `_` are the machinery, not jobs. Importing this package is cheap; the
runtime is imported only by `batuta.jobs._run`, when a job actually runs.
"""

from __future__ import annotations

from batuta.jobs._load import Job, JobError, builtin_job_names, load_job

__all__ = ["Job", "JobError", "builtin_job_names", "load_job"]
