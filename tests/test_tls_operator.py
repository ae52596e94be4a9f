"""What an operator of `batuta worker` and `batuta certs` sees for a newcomer's mistakes: each
said once, on one line naming the file and the `chmod` that fixes it."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import sys
from pathlib import Path

import pytest

from batuta.transport.certs import init_certs

REPO_ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 20.0


async def test_a_worker_stopped_as_soon_as_it_says_listening_stops_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's "listening" line came before its own signal handlers: a SIGTERM sent on
    seeing it (a service manager's stop right after the start) met `batuta`'s Ctrl-C handler
    and ended it as an interrupted command, exit 130, the worker not closed. Here the SIGTERM
    is sent by the write of that line itself; one that misses the worker's handler lands in
    the test's and the worker never stops."""
    from batuta.agent.daemon import WorkerOptions, run_worker

    paths = init_certs(tmp_path / "certs")
    missed: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: missed.append(signum))

    class SignalOnListening(io.StringIO):
        def write(self, text: str) -> int:
            if "listening on" in text:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().write(text)

    monkeypatch.setattr(sys, "stderr", SignalOnListening())
    options = WorkerOptions(
        cert=paths.server_cert, key=paths.server_key, ca=paths.ca_cert, port=0, slots=1, gpus="none"
    )
    try:
        worker = asyncio.create_task(run_worker(options))
        done, _ = await asyncio.wait([worker], timeout=WAIT_S)
        if not done:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
        assert missed == [] and done, "the SIGTERM came before the worker's handler"
        assert worker.result() == 0
    finally:
        signal.signal(signal.SIGTERM, previous)
