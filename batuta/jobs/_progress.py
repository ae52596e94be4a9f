"""`batuta run`'s progress bar: rich on stderr, fed from the run tracker on the event loop.

Here rather than in the command line module so that the command stays a thin face over
`batuta.jobs`; rich is imported only when a bar is made (on a terminal, without --quiet).
"""

from __future__ import annotations

import time
from types import TracebackType

from batuta.jobs._summary import RunTracker


class ProgressBar:
    """A rich progress bar on stderr: total = tasks submitted so far, done, failed, rate."""

    def __init__(self, job_name: str) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("[red]{task.fields[failed]} failed"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
        )
        self._task_id = self._progress.add_task(job_name, total=None, failed=0, rate="")
        self._first_update: float | None = None

    def __enter__(self) -> ProgressBar:
        self._progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._progress.stop()

    def update(self, tracker: RunTracker) -> None:
        """Called on the event loop for each queued or finished task; cheap, never blocks."""
        now = time.perf_counter()
        if self._first_update is None:
            self._first_update = now
        elapsed = now - self._first_update
        rate = f"{tracker.finished / elapsed:,.0f} tasks/s" if elapsed > 0.2 else ""
        self._progress.update(
            self._task_id,
            total=tracker.submitted,
            completed=tracker.finished,
            failed=tracker.failed,
            rate=rate,
        )
