"""Slurm, as an allocation needs it: the batch script, sbatch, squeue and scancel.

The batch script asks for N nodes with one task each and runs one job step over them
(`srun`), whose task on every node is `python -m batuta.agent.dial` (batuta/agent/dial.py):
the node's agent dials the coordinator. Options the user passes after `--` go to sbatch's
command line, where they override the script's `#SBATCH` lines. Every client command runs
with a time bound and its failure is one line naming the command and what Slurm said.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import signal
from collections.abc import Sequence
from pathlib import Path

from batuta.errors import TransportError, UsageError
from batuta.transport.base import signal_process

COMMAND_TIMEOUT_S = 30.0
ENDED = "ENDED"  # what `job_state` says of a job squeue no longer lists
# States after which no node of the job joins any more (COMPLETING: its steps are being ended)
FINAL_STATES = frozenset(
    {
        ENDED,
        "COMPLETING",
        "COMPLETED",
        "CANCELLED",
        "FAILED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
    }
)

# Slurm's --time forms: MIN, MIN:SEC, H:MIN:SEC, D-H, D-H:MIN, D-H:MIN:SEC
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


class AllocationError(TransportError):
    """A batch allocation could not be submitted, or ended: its nodes cannot join (not retryable)."""

    retryable = False


def time_limit_seconds(text: str) -> int:
    """Seconds in a Slurm time limit ("30", "1:00:00", "2-0"). Raises UsageError."""
    match = _TIME.match(text.strip())
    if not match or text.strip() in ("0", ""):
        raise UsageError(f"time {text!r} is not a Slurm time limit; write minutes (30), H:MM:SS (1:00:00) or D-H (1-0)")
    days, first, second, third = match.groups()
    if days is not None:  # D-H, D-H:MIN, D-H:MIN:SEC
        hours, minutes, seconds = int(first), int(second or 0), int(third or 0)
        return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    if third is not None:  # H:MIN:SEC
        return (int(first) * 60 + int(second or 0)) * 60 + int(third)
    return int(first) * 60 + int(second or 0)  # MIN or MIN:SEC


def batch_script(*, name: str, nodes: int, time: str, output: Path, step: Sequence[str]) -> str:
    """The script sbatch runs: N nodes, one task per node, one step running `step` on each."""
    srun = ["srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=0", *step]
    return (
        "#!/bin/sh\n"
        f"#SBATCH --job-name={shlex.quote(name)}\n"
        f"#SBATCH --nodes={nodes}\n"
        "#SBATCH --ntasks-per-node=1\n"
        f"#SBATCH --time={time}\n"
        f"#SBATCH --output={shlex.quote(str(output))}\n"
        "# written by batuta for one allocation; its nodes dial the coordinator (batuta/agent/dial.py)\n"
        f"exec {shlex.join(srun)}\n"
    )


async def _run(argv: Sequence[str], what: str) -> tuple[int, str, str]:
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError:
        raise AllocationError(f"{what}: {argv[0]} not found; is this a Slurm login node (PATH)?") from None
    except OSError as exc:
        raise AllocationError(f"{what}: cannot run {argv[0]}: {exc.strerror}") from None
    try:
        out, err = await asyncio.wait_for(process.communicate(), COMMAND_TIMEOUT_S)
    except TimeoutError:
        signal_process(process, signal.SIGKILL)
        await process.wait()
        raise AllocationError(f"{what}: {argv[0]} did not answer within {COMMAND_TIMEOUT_S:g}s") from None
    code = process.returncode if process.returncode is not None else -1
    return code, out.decode(errors="replace"), err.decode(errors="replace")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


async def submit(script: Path, options: Sequence[str]) -> str:
    """`sbatch --parsable [options] SCRIPT`; returns the job id. Raises AllocationError."""
    code, out, err = await _run(["sbatch", "--parsable", *options, str(script)], "sbatch")
    job_id = out.strip().split(";")[0]
    if code != 0 or not job_id.isdigit():
        said = _last_line(err) or _last_line(out) or f"exit code {code}"
        said = said.removeprefix("sbatch: error: ")
        given = f" (with {shlex.join(options)})" if options else ""
        raise AllocationError(f"sbatch refused the allocation{given}: {said}; check the sbatch options")
    return job_id


async def job_state(job_id: str) -> str | None:
    """The job's state as squeue says it (PENDING, RUNNING, COMPLETING...), `ENDED` once squeue
    no longer lists it, or None when squeue could not be asked (try again later)."""
    try:
        code, out, err = await _run(["squeue", "-h", "-j", job_id, "-o", "%T"], "squeue")
    except AllocationError:
        return None
    state = out.strip()
    if code == 0:
        return state.split()[0] if state else ENDED
    if "invalid job id" in err.lower():
        return ENDED
    return None


async def cancel(job_id: str) -> str:
    """`scancel JOB`; returns "" or what scancel said when it failed (the job may be gone)."""
    try:
        code, _out, err = await _run(["scancel", job_id], "scancel")
    except AllocationError as exc:
        return str(exc)
    return "" if code == 0 else _last_line(err) or f"scancel exit code {code}"
