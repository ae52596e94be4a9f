"""`batuta alloc`'s options and the cluster file's `[[allocations]]` table: one set of checks.

A value the cluster file refuses is refused on the command line too, with the same reason,
as one line and exit code 2, before anything is submitted; a problem with the allocation's
local folder is one such line as well; a refusal by sbatch is said once, not once per node.

No Slurm is started: a stand-in `sbatch` first on PATH records each call (and refuses the
job, so nothing could ever be queued), which is how "nothing was submitted" is seen.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from batuta.errors import ConfigError, UsageError
from batuta.runtime.allocation import Allocation
from batuta.runtime.allocation_config import AllocationConfig
from batuta.runtime.cluster import build_pool, parse_cluster
from batuta.runtime.slurm import time_limit_seconds

REPO_ROOT = Path(__file__).resolve().parent.parent
RUN_TIMEOUT_S = 60
REFUSAL = "Batch job submission failed: Invalid partition name specified"


@pytest.fixture
def fake_sbatch(tmp_path: Path) -> Path:
    """A folder whose `sbatch` appends its arguments to `calls` and refuses the job."""
    folder = tmp_path / "bin"
    folder.mkdir()
    script = folder / "sbatch"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{folder}/calls"\necho "sbatch: error: {REFUSAL}" >&2\nexit 1\n')
    script.chmod(0o755)
    return folder


def calls(fake: Path) -> list[str]:
    record = fake / "calls"
    return record.read_text().splitlines() if record.exists() else []


def batuta(fake: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m batuta ARGS` in `tmp_path`, this checkout's, with the stand-in sbatch."""
    env = dict(os.environ)
    env["PATH"] = f"{fake}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["BATUTA_RUNTIME_DIR"] = str(tmp_path / "run")
    return subprocess.run(
        [sys.executable, "-m", "batuta", *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )


def alloc(fake: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """`batuta alloc slurm pi --nodes 3 --time 5 --directory TMP/jobs EXTRA...`."""
    argv = ["alloc", "slurm", "pi", "--nodes", "3", "--time", "5", "--directory", str(tmp_path / "jobs")]
    return batuta(fake, tmp_path, *argv, *extra)


def table(**values: str) -> str:
    """An `[[allocations]]` table of 3 nodes for 5 minutes, with `values` (TOML) set or replaced."""
    fields = {"kind": '"slurm"', "nodes": "3", "time": '"5"', **values}
    return "[[allocations]]\n" + "".join(f"{key} = {value}\n" for key, value in fields.items())


# (the option and its value, the same value as the table's key and TOML value, what both say)
SAME_VALUES = [
    (["--gpus", "x"], "gpus", '"x"', """expected "auto", "none" or a list of GPU indices like [0, 1], got 'x'"""),
    (["--node-prefix", "a b"], "name", '"a b"', "'a b': use letters, digits, '.', '_' and '-' (no spaces or '/')"),
    (["--time", "25:99:99"], "time", '"25:99:99"', "has 99 minutes, past 0 to 59; Slurm would read it as 1-02:40:39"),
    (["--time", "00:00:00"], "time", '"00:00:00"', "is zero, which Slurm reads as no time limit"),
    (["--time", "UNLIMITED"], "time", '"UNLIMITED"', "asks Slurm for no time limit"),
    (["--slots", "-1"], "slots", "-1", "expected a whole number >= 0, got -1"),
    (["--nodes", "5000"], "nodes", "5000", "expected 1 to 4096 nodes, got 5000"),
    (["--poll-interval", "1e-9"], "poll_interval", "1e-9", "at least 0.1 s: squeue is asked at this pace"),
]


@pytest.mark.parametrize(
    ("option", "key", "value", "says"), SAME_VALUES, ids=[" ".join(option) for option, *_ in SAME_VALUES]
)
def test_an_option_is_refused_as_its_cluster_file_key_is_and_nothing_is_submitted(
    option: list[str], key: str, value: str, says: str, fake_sbatch: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as in_file:
        parse_cluster(table(**{key: value}), source="lab.toml")
    assert says in str(in_file.value)
    reason = str(in_file.value).split(f".{key}: ", 1)[1]  # after "lab.toml:4: allocations[0].KEY: "
    done = alloc(fake_sbatch, tmp_path, *option)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"batuta: error: {option[0]}: {reason}"]
    assert calls(fake_sbatch) == []


def node_step(folder: Path) -> list[str]:
    """The command each node runs, from the one batch script written under `folder`."""
    (script,) = folder.glob("*/batch.sh")
    (exec_line,) = [line for line in script.read_text().splitlines() if line.startswith("exec ")]
    return shlex.split(exec_line)


def test_alloc_help_offers_no_local_pool_and_a_bad_count_suggests_a_count(fake_sbatch: Path, tmp_path: Path) -> None:
    """`alloc --help` listed --workers, which alloc refuses; '--nodes abc' suggested 'e.g. 0'."""
    assert "--workers" not in batuta(fake_sbatch, tmp_path, "alloc", "--help").stdout
    done = batuta(fake_sbatch, tmp_path, "alloc", "slurm", "pi", "--nodes", "abc", "--time", "5")
    assert done.returncode == 2 and "'abc' is not a whole number of nodes, e.g. 2" in done.stderr, done.stderr
    assert calls(fake_sbatch) == []


def test_values_the_cluster_file_takes_are_taken_and_read_alike_on_the_command_line(
    fake_sbatch: Path, tmp_path: Path
) -> None:
    """`--gpus "[1, 0,1]"`, the file's spelling as the refusal of a bad value shows it, is taken."""
    done = alloc(fake_sbatch, tmp_path, "--gpus", "[1, 0,1]", "--slots", "0", "--time", "1-2:03")
    assert done.returncode == 2 and len(calls(fake_sbatch)) == 1, done.stderr  # taken: sbatch was asked (and refused)
    by_options = node_step(tmp_path / "jobs")
    (tmp_path / "lab.toml").write_text(
        table(gpus='" 1, 0,1"', slots="0", time='"1-2:03"', directory=f'"{tmp_path / "from-file"}"')
    )
    assert batuta(fake_sbatch, tmp_path, "run", "pi", "-c", "lab.toml").returncode == 2
    by_file = node_step(tmp_path / "from-file")
    for step in (by_options, by_file):
        assert step[step.index("--gpus") + 1] == "1,0"  # the same indices, each once
        assert "--slots" not in step  # 0: each node's cores, as in the file
    assert "#SBATCH --time=1-2:03" in next((tmp_path / "jobs").glob("*/batch.sh")).read_text()


def test_a_controller_sbatch_cannot_reach_is_not_blamed_on_the_options(fake_sbatch: Path, tmp_path: Path) -> None:
    """It said "sbatch refused the allocation: ...; check the sbatch options", with none given."""
    unreachable = "Batch job submission failed: Unable to contact slurm controller (connect failure)"
    (fake_sbatch / "sbatch").write_text(f'#!/bin/sh\necho "sbatch: error: {unreachable}" >&2\nexit 1\n')
    done = alloc(fake_sbatch, tmp_path)
    assert done.returncode == 3, done.stderr
    assert f"sbatch cannot reach Slurm's controller: {unreachable}; run batuta where sbatch works" in done.stderr
    assert "check the sbatch options" not in done.stderr


def test_time_limits_are_taken_in_exactly_slurms_forms_with_every_field_in_range() -> None:
    taken = {
        "30": 1800,  # minutes
        "1:30": 90,  # minutes:seconds
        "90:00": 5400,  # the first field has no upper bound
        "1:00:00": 3600,
        "25:00:00": 90000,
        "2-0": 2 * 86400,  # days-hours
        "1-2:03": 86400 + 2 * 3600 + 3 * 60,  # days-hours:minutes
        "1-2:03:04": 86400 + 2 * 3600 + 3 * 60 + 4,
        "0:30": 30,
        "0-0:0:1": 1,
    }
    for text, seconds in taken.items():
        assert time_limit_seconds(text) == seconds, text
    refused = {
        "1:60": "has 60 seconds, past 0 to 59; Slurm would read it as 00:02:00",
        "1:60:00": "has 60 minutes",
        "1-24": "has 24 hours, past 0 to 23; Slurm would read it as 2-00:00:00",
        "1-0:0:60": "has 60 seconds",
        "0": "is zero",
        "0:00": "is zero",
        "0-0": "is zero",
        "infinite": "asks Slurm for no time limit",
        "Unlimited": "asks Slurm for no time limit",
        "-1": "asks Slurm for no time limit",
        " 5": "has spaces around it, which Slurm does not read; write '5'",
        "1-": "is not a Slurm time limit",
        "1:2:3:4": "is not a Slurm time limit",
        "\u0663\u0660": "is not a Slurm time limit",  # digits, but not the ASCII ones Slurm reads
        "99999999": "longer than Slurm can count",
    }
    for text, says in refused.items():
        with pytest.raises(UsageError) as refusal:
            time_limit_seconds(text)
        assert says in str(refusal.value), text


def test_a_bind_address_this_machine_cannot_listen_on_is_one_exit_2_line_and_no_folder(
    fake_sbatch: Path, tmp_path: Path
) -> None:
    """It was exit 3 ("no host could be started"), and left an empty allocation folder behind."""
    done = alloc(fake_sbatch, tmp_path, "--bind", "192.0.2.1:0")  # TEST-NET-1: no interface has it
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("batuta: error: ") and "allocation slurm: cannot listen on 192.0.2.1:0: " in line, line
    assert line.endswith("set bind to an address of this machine that the nodes reach"), line
    assert calls(fake_sbatch) == []
    assert not (tmp_path / "jobs").exists() or not any((tmp_path / "jobs").iterdir())


def test_a_directory_this_machine_cannot_use_is_one_exit_2_line_before_sbatch(
    fake_sbatch: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = alloc(fake_sbatch, tmp_path, "--directory", str(blocker / "jobs"))
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"batuta: error: allocation slurm: cannot create its folder in {blocker / 'jobs'}: {blocker} is not a "
        "folder; set --directory to a folder on a file system the nodes share"
    ]
    assert calls(fake_sbatch) == []
    # a folder that looks writable but is not (procfs): found only as it is made, still exit 2 (was 3)
    done = alloc(fake_sbatch, tmp_path, "--directory", "/proc/batuta-nope")
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("batuta: error: ") and "cannot create /proc/batuta-nope/slurm-" in line, line
    assert calls(fake_sbatch) == []


def test_the_cluster_files_directory_is_checked_by_the_same_rule_naming_its_key(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cluster = parse_cluster(table(directory=f'"{blocker}"'), source="lab.toml")
    with pytest.raises(ConfigError, match=rf"{blocker} is not a folder; set allocations\[0\].directory in lab.toml"):
        build_pool(cluster)
    with pytest.raises(ConfigError, match="set directory to a folder"):
        Allocation(AllocationConfig(nodes=1, time="5", directory=blocker))


def test_an_sbatch_refusal_is_said_once_as_the_allocations_configuration_error(
    fake_sbatch: Path, tmp_path: Path
) -> None:
    """It was "no host could be started, so nothing ran: sbatch refused ...", exit 3: hosts
    blamed for the allocation's own options."""
    done = alloc(fake_sbatch, tmp_path, "--gpus", "none")
    assert done.returncode == 2, done.stderr
    assert done.stderr.count(REFUSAL) == 1, done.stderr
    assert done.stderr.splitlines() == [
        f"batuta: error: allocation slurm: sbatch refused the job: {REFUSAL}; check the sbatch options"
    ]
    assert len(calls(fake_sbatch)) == 1  # one allocation, asked for once


def test_a_file_of_allocations_alone_is_not_sent_to_stack_check_which_has_nothing_to_check(
    fake_sbatch: Path, tmp_path: Path
) -> None:
    (tmp_path / "alloc.toml").write_text(table(directory=f'"{tmp_path / "jobs"}"'))
    done = batuta(fake_sbatch, tmp_path, "run", "pi", "-c", "alloc.toml")
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"batuta: error: allocation slurm: sbatch refused the job: {REFUSAL}; check the sbatch options"
    ]


def test_a_refusal_beside_other_hosts_is_left_to_the_summary_and_the_log_file(
    fake_sbatch: Path, tmp_path: Path
) -> None:
    (tmp_path / "local.toml").write_text('[local]\nslots = 1\ngpus = "none"\n')
    log = tmp_path / "run.log"
    done = alloc(fake_sbatch, tmp_path, "-c", "local.toml", "--log-file", str(log))
    assert done.returncode == 0, done.stderr
    assert REFUSAL not in done.stderr  # the summary's host table says it, host by host
    assert sum(REFUSAL in line and line.split()[0].startswith("slurm-") for line in done.stdout.splitlines()) == 3
    assert log.read_text().count(REFUSAL) >= 3  # the log file keeps every line


def test_quiet_says_a_refusal_beside_other_hosts_once_for_all_the_nodes(fake_sbatch: Path, tmp_path: Path) -> None:
    """-q's last lines said it once per node: `batuta: host slurm-0 retired: ...`, slurm-1, slurm-2."""
    (tmp_path / "local.toml").write_text('[local]\nslots = 1\ngpus = "none"\n')
    done = alloc(fake_sbatch, tmp_path, "-c", "local.toml", "-q")
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        "batuta: hosts slurm-0, slurm-1 and slurm-2 retired: allocation slurm: sbatch refused the job: "
        f"{REFUSAL}; check the sbatch options"
    ]
    many = alloc(fake_sbatch, tmp_path, "-c", "local.toml", "-q", "--nodes", "6", "--node-prefix", "n")
    assert many.stderr.splitlines() == [
        f"batuta: hosts n-0, n-1, n-2 and 3 more retired: allocation n: sbatch refused the job: {REFUSAL}; "
        "check the sbatch options"
    ]


QUEUED_JOB = """\
import asyncio

from batuta.runtime import events as pe


async def main(pool):
    told = asyncio.Event()
    pool.subscribe(lambda e: isinstance(e, pe.HostStateChanged) and "Priority" in e.reason and told.set())
    open("subscribed", "w").close()  # squeue's reason turns to Priority from now on: the event is not missed
    await asyncio.wait_for(told.wait(), 20)
    return "told"
"""


def test_nodes_of_a_queued_job_are_starting_saying_why_not_unreachable(fake_sbatch: Path, tmp_path: Path) -> None:
    """Beside other hosts, the nodes of a job still queued at the run's end were 'unreachable:
    never came up during the run; the log (batuta.runtime.pool) has its start errors': it had none."""
    (fake_sbatch / "sbatch").write_text("#!/bin/sh\necho 4242\n")
    reason = f'#!/bin/sh\nif [ -e "{tmp_path}/subscribed" ]; then echo PENDING Priority; else echo PENDING None; fi\n'
    (fake_sbatch / "squeue").write_text(reason)
    (fake_sbatch / "scancel").write_text(f'#!/bin/sh\necho "$@" >> "{fake_sbatch}/cancelled"\n')
    for name in ("sbatch", "squeue", "scancel"):
        (fake_sbatch / name).chmod(0o755)
    (tmp_path / "local.toml").write_text('[local]\nslots = 1\ngpus = "none"\n')
    (tmp_path / "job.py").write_text(QUEUED_JOB)
    argv = ["alloc", "slurm", "job.py", "--nodes", "2", "--time", "5", "--directory", str(tmp_path / "jobs")]
    done = batuta(fake_sbatch, tmp_path, *argv, "--poll-interval", "0.1", "-c", "local.toml", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["result"] == "told"
    nodes = {h["host"]: (h["state"], h["reason"]) for h in summary["hosts"] if h["host"].startswith("slurm-")}
    why = "still starting when the run ended (allocation slurm: job 4242 is PENDING (Priority: other jobs are ahead"
    assert set(nodes) == {"slurm-0", "slurm-1"}
    assert all(state == "starting" and reason.startswith(why) for state, reason in nodes.values()), nodes
    assert (fake_sbatch / "cancelled").read_text().split() == ["4242"]
    # squeue's first "PENDING None" was no news after the submission: not said again
    assert [line.split(": ", 2)[2] for line in done.stderr.splitlines()][1:] == [
        "job 4242 is PENDING (Priority: other jobs are ahead of it in the queue)"
    ], done.stderr


def test_sbatch_s_own_error_line_is_kept_and_its_help_hint_dropped() -> None:
    """`-- --bogus-option` said only 'Try "sbatch --help" for more information'."""
    from batuta.runtime.slurm import _said

    said = "sbatch: unrecognized option '--bogus-option'\nTry \"sbatch --help\" for more information\n"
    assert _said(said) == "unrecognized option '--bogus-option'"  # "sbatch refused the job: sbatch: ..." no more
    assert _said(f"sbatch: error: {REFUSAL}\n") == REFUSAL
    assert _said("something odd\n") == "something odd"


def test_a_node_s_slots_default_to_the_cpus_slurm_gave_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """One slot per core of the node ran more slots than the CPUs granted (1 by default)."""
    from batuta.agent.dial import _slurm_cpus

    for key in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        monkeypatch.delenv(key, raising=False)
    assert _slurm_cpus() is None  # outside Slurm: the agent's own default (its cores)
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "3")
    assert _slurm_cpus() == 3
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "8")  # --cpus-per-task: the one task's CPUs
    assert _slurm_cpus() == 8


@pytest.mark.parametrize(
    ("option", "fix"),
    [
        ("--time=1", "give the time limit as time (--time)"),
        ("-N2", "give the node count as nodes (--nodes)"),
        ("--ntasks-per-node=4", "batuta runs one task per node"),
        # sbatch takes an unambiguous prefix: --out=F replaced the output file batuta reads
        ("--out=/tmp/x", "batuta writes the output beside the script, where it reads why a job ended"),
        ("--array=0-1", "each array task would dial in as the same nodes; ask for the nodes with nodes (--nodes)"),
    ],
)
def test_sbatch_options_that_would_undo_batutas_own_are_refused(
    fake_sbatch: Path, tmp_path: Path, option: str, fix: str
) -> None:
    """`-- --time=1` overrode --time silently, while batuta said and used its own value."""
    done = alloc(fake_sbatch, tmp_path, "--", option)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"batuta: error: the sbatch options after --: {option!r} would override what batuta asks sbatch for; {fix}"
    ]
    assert calls(fake_sbatch) == []
