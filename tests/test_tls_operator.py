"""What an operator of `batuta worker` and `batuta certs` sees for a newcomer's mistakes: each
said once, on one line naming the file and the `chmod` that fixes it."""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import sys
from pathlib import Path

import pytest

from batuta.transport.certs import CertPaths, init_certs

REPO_ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 20.0


async def _start_worker(paths: CertPaths, *extra: str) -> tuple[asyncio.subprocess.Process, bytearray]:
    """`batuta worker` on a free loopback port, once it has said "listening"."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "batuta", "worker", "--bind", "127.0.0.1:0",
        "--cert", str(paths.server_cert), "--key", str(paths.server_key), "--ca", str(paths.ca_cert),
        "--slots", "1", "--gpus", "none", *extra,
        stderr=asyncio.subprocess.PIPE, cwd=REPO_ROOT,
    )  # fmt: skip
    assert proc.stderr is not None
    stderr = bytearray()
    try:
        async with asyncio.timeout(WAIT_S):
            while not re.search(rb"listening on 127\.0\.0\.1:\d+", stderr):
                line = await proc.stderr.readline()
                assert line, stderr.decode()
                stderr += line
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    return proc, stderr


async def _stop_worker(proc: asyncio.subprocess.Process, stderr: bytearray, signum: int) -> int:
    """Send `signum` and return the exit code, with the rest of its stderr in `stderr`."""
    assert proc.stderr is not None
    proc.send_signal(signum)
    try:
        async with asyncio.timeout(WAIT_S):
            stderr += await proc.stderr.read()
            return await proc.wait()
    except BaseException:
        proc.kill()
        await proc.wait()
        raise


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


async def test_a_worker_key_others_may_read_is_warned_about_once(tmp_path: Path) -> None:
    """`batuta worker --key` with a key of mode 0644 printed the same warning twice: once from
    the command, once where the key was loaded."""
    paths = init_certs(tmp_path / "certs")
    os.chmod(paths.server_key, 0o644)
    proc, stderr = await _start_worker(paths)
    assert await _stop_worker(proc, stderr, signal.SIGTERM) == 0, stderr.decode()
    said = [line for line in stderr.decode().splitlines() if "accessible by others" in line]
    assert len(said) == 1, said
    assert said[0].endswith(
        f"key file {paths.server_key} is accessible by others (mode 0644); run `chmod 600 {paths.server_key}`"
    )


def test_certs_reissue_warns_about_a_ca_key_others_may_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`batuta certs reissue` signed with a ca.key of mode 0644 without a word, though that key
    is the one that lets its reader mint certificates every worker and coordinator trusts."""
    from batuta.cli import main

    paths = init_certs(tmp_path / "certs")
    assert main(["certs", "reissue", str(paths.directory), "--host", "127.0.0.1"]) == 0
    assert "accessible by others" not in capsys.readouterr().err  # 0600, as `certs init` wrote it
    os.chmod(paths.ca_key, 0o644)
    assert main(["certs", "reissue", str(paths.directory), "--host", "127.0.0.1", "--name", "gpu2"]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip() == (
        f"batuta certs reissue: warning: key file {paths.ca_key} is accessible by others (mode 0644); "
        f"run `chmod 600 {paths.ca_key}`"
    )
    assert "gpu2.pem: batuta-worker (serverAuth) for 127.0.0.1" in captured.out
