"""Slurm, as an allocation needs it: the batch script, sbatch, squeue and scancel.

The batch script asks for N nodes with one task each and runs one job step over them
(`srun`), whose task on every node is `python -m batuta.agent.dial` (batuta/agent/dial.py):
the node's agent dials the coordinator. Options the user passes after `--` go to sbatch's
command line, where they override the script's `#SBATCH` lines. Every client command runs
with a time bound and its failure is one line naming the command and what Slurm said.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shlex
import signal
import subprocess
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from batuta.errors import HostConfigError, TransportError, UsageError
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

# Slurm's --time forms (src/common/parse_time.c, time_str2secs): MIN, MIN:SEC, H:MIN:SEC,
# D-H, D-H:MIN, D-H:MIN:SEC; digits, '-' and ':' only, so no spaces around them either
_TIME = re.compile(
    r"(?:(?P<days>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?|(?P<a>\d+)(?::(?P<b>\d+)(?::(?P<c>\d+))?)?)\Z",
    re.ASCII,  # Slurm reads 0-9 only; Python's \d alone also takes other scripts' digits
)
# What Slurm reads as no limit at all: these words (any case), -1 and a zero duration
_NO_LIMIT = ("infinite", "unlimited", "-1")
# time_str2secs adds the fields up in a C int: a longer limit wraps around there
_MAX_SECONDS = 2**31 - 1
_FORMS = "write minutes (30), H:MM:SS (1:00:00) or D-H (1-0) (Slurm also reads MM:SS, D-H:MM and D-H:MM:SS)"


class AllocationError(TransportError):
    """A batch allocation could not be submitted, or ended: its nodes cannot join (not retryable)."""

    retryable = False


class AllocationConfigError(AllocationError, HostConfigError):
    """An allocation cannot be had as its settings say: sbatch refused its options (a partition
    that does not exist, an unknown option), or this machine cannot listen on its bind or make
    its folder. The message names the allocation and the fix; `batuta run` says it as it is
    (no host of it could start, but the fix is in its settings) and exits 2."""


def time_limit_seconds(text: str) -> int:
    """Seconds in a Slurm time limit ("30", "1:00:00", "2-0"), in exactly the forms sbatch's
    --time reads. Raises UsageError for anything else, and also for what Slurm would take but
    is almost surely a slip: a field past its range (minutes or seconds over 59 after the
    first field, hours over 23 after a day), and no limit at all (zero, UNLIMITED): the nodes'
    credentials expire with the limit, so an allocation needs one."""
    if text.strip().lower() in _NO_LIMIT:
        raise UsageError(
            f"time {text!r} asks Slurm for no time limit, but an allocation needs one (its nodes' credentials "
            f"expire with it); {_FORMS}"
        )
    if text.strip() != text and text.strip():
        raise UsageError(f"time {text!r} has spaces around it, which Slurm does not read; write {text.strip()!r}")
    match = _TIME.match(text)
    if not match:
        raise UsageError(f"time {text!r} is not a Slurm time limit; {_FORMS}")
    field = {key: int(value) for key, value in match.groupdict().items() if value is not None}
    if "days" in field:  # D-H, D-H:MIN, D-H:MIN:SEC
        hours, minutes, seconds = field["dh"], field.get("dm", 0), field.get("ds", 0)
        ranges = [("hours", hours, 23), ("minutes", minutes, 59), ("seconds", seconds, 59)]
        total = ((field["days"] * 24 + hours) * 60 + minutes) * 60 + seconds
    elif "c" in field:  # H:MIN:SEC
        ranges = [("minutes", field["b"], 59), ("seconds", field["c"], 59)]
        total = (field["a"] * 60 + field["b"]) * 60 + field["c"]
    else:  # MIN or MIN:SEC
        ranges = [("seconds", field.get("b", 0), 59)]
        total = field["a"] * 60 + field.get("b", 0)
    for unit, value, most in ranges:
        if value > most:
            raise UsageError(
                f"time {text!r} has {value} {unit}, past 0 to {most}; Slurm would read it as "
                f"{slurm_form(total)}: write that, or the time you meant"
            )
    if total == 0:
        raise UsageError(
            f"time {text!r} is zero, which Slurm reads as no time limit, but an allocation needs one (its nodes' "
            f"credentials expire with it); {_FORMS}"
        )
    if total > _MAX_SECONDS:
        raise UsageError(f"time {text!r} is longer than Slurm can count ({slurm_form(_MAX_SECONDS)}); ask for less")
    return total


def slurm_form(seconds: int) -> str:
    """`seconds` as Slurm writes a time: D-HH:MM:SS, or HH:MM:SS under a day."""
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    clock = f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days}-{clock}" if days else clock


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
        # Slurm requeues a batch job whose node failed: it ran again after the run had ended,
        # its nodes dialling a coordinator long gone (and its output overwritten)
        "#SBATCH --no-requeue\n"
        "# written by batuta for one allocation; its nodes dial the coordinator (batuta/agent/dial.py)\n"
        f"exec {shlex.join(srun)}\n"
    )


async def _run(
    argv: Sequence[str], what: str, *, on_cancel: Callable[[str], Awaitable[None]] | None = None
) -> tuple[int, str, str]:
    """Run a Slurm client command, bounded by COMMAND_TIMEOUT_S. With `on_cancel`, a
    cancellation while it runs waits for it to end and hands that function what it printed
    (sbatch: the job it may have queued already), then goes on being a cancellation; without,
    the command (a query) is killed with the task."""
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError:
        raise AllocationError(f"{argv[0]} not found; is this a Slurm login node (PATH)?") from None
    except OSError as exc:
        raise AllocationError(f"cannot run {argv[0]}: {exc.strerror}") from None
    talk = asyncio.ensure_future(process.communicate())
    try:
        out, err = await asyncio.wait_for(asyncio.shield(talk), COMMAND_TIMEOUT_S)
    except asyncio.CancelledError:
        if on_cancel is None:  # a query (squeue): ended with the task, or it outlived the loop, and
            talk.cancel()  # its transport, collected after the loop had closed, printed a traceback at exit
            signal_process(process, signal.SIGKILL)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(process.wait(), COMMAND_TIMEOUT_S)
            raise
        with contextlib.suppress(Exception):
            done, _ = await asyncio.wait_for(talk, COMMAND_TIMEOUT_S)
            await on_cancel(done.decode(errors="replace"))
        raise
    except TimeoutError:
        talk.cancel()
        signal_process(process, signal.SIGKILL)
        await process.wait()
        raise AllocationError(f"{what}: {argv[0]} did not answer within {COMMAND_TIMEOUT_S:g}s") from None
    code = process.returncode if process.returncode is not None else -1
    return code, out.decode(errors="replace"), err.decode(errors="replace")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _said(text: str) -> str:
    """What a Slurm command said went wrong: its error lines, not the "Try ... --help" hint
    after them (sbatch's "unrecognized option '--bogus'" was dropped for that hint)."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("Try ")]
    errors = [line for line in lines if "error:" in line or "fatal:" in line or "unrecognized" in line]
    said = errors or lines[-1:]
    prefixes = ("sbatch: error: ", "sbatch: fatal: ", "sbatch: ")  # "sbatch refused ...: sbatch: ..." said it twice
    return "; ".join(next((line[len(p) :] for p in prefixes if line.startswith(p)), line) for line in said)


async def submit(script: Path, options: Sequence[str]) -> str:
    """`sbatch --parsable [options] SCRIPT`; returns the job id. Raises AllocationError. An
    interrupt while sbatch runs cancels the job it queued (its id was not known yet, so no one
    else could)."""

    async def cancel_queued(out: str) -> None:
        queued = out.strip().split(";")[0]
        if queued.isdigit():
            await cancel(queued)

    code, out, err = await _run(["sbatch", "--parsable", *options, str(script)], "sbatch", on_cancel=cancel_queued)
    job_id = out.strip().split(";")[0]
    if code != 0 or not job_id.isdigit():
        said = _said(err) or _last_line(out) or f"exit code {code}"
        given = f" (with {shlex.join(options)})" if options else ""
        if any(words in said for words in _NO_CONTROLLER):  # not the options' fault
            raise AllocationError(
                f"sbatch cannot reach Slurm's controller: {said}; run batuta where sbatch works (a login node), "
                "or check SLURM_CONF and that slurmctld is up (scontrol ping)"
            )
        raise AllocationConfigError(f"sbatch refused the job{given}: {said}; check the sbatch options")
    return job_id


# What sbatch says when it reaches no controller at all (src/common/slurm_protocol_api.c,
# src/common/read_config.c): a login node's configuration, not the options
_NO_CONTROLLER = ("Unable to contact slurm controller", "Could not establish a configuration source")

# Why a job pends, when Slurm will not start it as it was asked however long it waits, and
# what to change (squeue's %r; src/common/slurm_protocol_defs.c job_reason_string). One fix
# for all ("fewer nodes, less time or another partition") sent an invalid account to sinfo.
_OTHER_PARTITION = "or another partition (sinfo lists them, with their limits)"
_YOURS = "(sacctmgr show assoc user=$USER lists yours)"
HOPELESS_REASONS = {
    "PartitionConfig": (
        "it asks for more than the partition has (nodes, CPUs or memory)",
        f"ask for fewer nodes {_OTHER_PARTITION}",
    ),
    "PartitionNodeLimit": (
        "it asks for more nodes than the partition allows a job",
        f"ask for fewer {_OTHER_PARTITION}",
    ),
    "PartitionTimeLimit": (
        "its time limit is longer than the partition allows",
        f"ask for less time {_OTHER_PARTITION}",
    ),
    "BadConstraints": (
        "no node has the features or resources it asks for",
        "change the sbatch options that ask for them (--constraint, --gres, --mem)",
    ),
    "InvalidQOS": ("its QOS is not valid for this account or partition", f"pass another --qos {_YOURS}"),
    "InvalidAccount": ("its account is not valid", f"pass another --account {_YOURS}"),
    "QOSMaxNodePerJobLimit": (
        "it asks for more nodes than its QOS allows a job",
        "ask for fewer, or pass another --qos",
    ),
    "QOSMaxWallDurationPerJobLimit": (
        "its time limit is longer than its QOS allows",
        "ask for less time, or pass another --qos",
    ),
    "AssocMaxNodesPerJobLimit": (
        "it asks for more nodes than its association allows a job",
        "ask for fewer, or pass another --account",
    ),
    "AssocMaxWallDurationPerJobLimit": (
        "its time limit is longer than its association allows",
        "ask for less time, or pass another --account",
    ),
    "DependencyNeverSatisfied": (
        "a job it depends on (--dependency) ended in a way that will never satisfy it",
        "drop or change --dependency",
    ),
}

# What the usual reasons a job waits mean, said beside them: "PENDING (Resources)" alone left
# a user who does not read Slurm's codes wondering whether the run had hung
WAITING_REASONS = {
    "Resources": "waiting for nodes to free up",
    "Priority": "other jobs are ahead of it in the queue",
    "Dependency": "waiting for the job it depends on (--dependency)",
    "BeginTime": "waiting for its start time (--begin)",
    "ReqNodeNotAvail": "a node it needs is down, drained or reserved",
    "JobHeldUser": "held: scontrol release JOB lets it start",
    "JobHeldAdmin": "held by an administrator",
}

# States a job may be requeued from, by Slurm, after its node failed or it was preempted:
# cancelled at the run's end like a running one, though no node of it joins any more
REQUEUEABLE_STATES = frozenset({"COMPLETING", "NODE_FAIL", "PREEMPTED"})


async def job_state(job_id: str) -> tuple[str, str] | None:
    """The job's state as squeue says it (PENDING, RUNNING, COMPLETING...) and why it is in it
    (its reason: "Resources", "Priority", "None"...), `(ENDED, "")` once squeue no longer lists
    it, or None when squeue could not be asked (try again later)."""
    try:
        code, out, err = await _run(["squeue", "-h", "-j", job_id, "-o", "%T %r"], "squeue")
    except AllocationError:
        return None
    fields = out.split()
    if code == 0:
        return (fields[0], " ".join(fields[1:])) if fields else (ENDED, "")
    if "invalid job id" in err.lower():
        return (ENDED, "")
    return None


async def job_queued(job_id: str, name: str) -> bool:
    """Whether squeue lists the job `job_id`, under the job name `name`, in a state it may still
    run from (not CANCELLED, COMPLETED...). False when squeue cannot be asked."""
    try:
        code, out, _ = await _run(["squeue", "-h", "-j", job_id, "-o", "%j %T"], "squeue")
    except AllocationError:
        return False
    fields = out.split()
    return code == 0 and len(fields) == 2 and fields[0] == name and fields[1] not in FINAL_STATES - REQUEUEABLE_STATES


async def cancel(job_id: str) -> str:
    """`scancel JOB`; returns "" or what scancel said when it failed (the job may be gone).
    Run from a thread: an interrupt of the coordinator (a second Ctrl-C) cannot stop it
    halfway, and the loop's shutdown waits for it."""
    return await asyncio.to_thread(cancel_now, job_id)


def cancel_now(job_id: str) -> str:
    """`scancel JOB`, blocking (bounded by COMMAND_TIMEOUT_S): `cancel`, or at the exit."""
    try:
        done = subprocess.run(
            ["scancel", job_id], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
        )
    except FileNotFoundError:
        return "scancel: not found; is this a Slurm login node (PATH)?"
    except (OSError, subprocess.SubprocessError) as exc:
        return f"scancel: {exc}"
    return "" if done.returncode == 0 else _last_line(done.stderr) or f"scancel exit code {done.returncode}"
