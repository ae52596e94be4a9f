"""The `batuta` command, run as a real process: exit codes, one-line errors, the run summary.

Error cases need no runtime (a job file is checked before any pool starts); the runs that
start a local pool are skipped until `batuta.runtime.pool` exists. The summary's arithmetic
and the job loader are also tested in-process, where a subprocess would add nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from batuta import TaskResult, TaskStatus
from batuta._version import __version__
from batuta.jobs import JobError, RunSummary, RunTracker, load_job
from batuta.jobs._samples import percentile
from batuta.jobs._summary import IdRanges
from tests.support.hosts import TestHosts

REPO_ROOT = Path(__file__).resolve().parent.parent

ERROR_TIMEOUT_S = 30
RUN_TIMEOUT_S = 90

needs_runtime = pytest.mark.skipif(
    importlib.util.find_spec("batuta.runtime.pool") is None,
    reason="batuta.runtime.pool is not written yet",
)


def _env() -> dict[str, str]:
    """This checkout's batuta first on the path, whatever else is installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


def batuta(*args: str, cwd: Path, timeout: float = ERROR_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """`python -m batuta ARGS` in `cwd`, with no terminal and a bounded run time."""
    return subprocess.run(
        [sys.executable, "-m", "batuta", *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def write(folder: Path, name: str, source: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(source))
    return path


# -- version -----------------------------------------------------------------------------


def test_python_dash_m_version(tmp_path: Path) -> None:
    done = batuta("--version", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"batuta {__version__}"


def test_version_subcommand(tmp_path: Path) -> None:
    done = batuta("version", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"batuta {__version__} (Python ")


def test_console_script_version(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "batuta"
    if not script.exists():
        pytest.skip(f"no console script at {script}: install with pip install -e '.[test]'")
    done = subprocess.run(
        [str(script), "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=ERROR_TIMEOUT_S
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"batuta {__version__}"


@pytest.mark.parametrize("args", [["version"], ["run", "pi", "--workers", "1", "--quiet"]], ids=["version", "run"])
def test_a_closed_stdout_is_no_traceback(tmp_path: Path, args: list[str]) -> None:
    """`batuta version >&-`: AttributeError: 'NoneType' object has no attribute 'flush'."""
    command = " ".join([shlex.quote(sys.executable), "-m", "batuta", *args])
    done = subprocess.run(
        ["sh", "-c", f"exec {command} >&-"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr


def test_a_reader_that_leaves_early_is_no_traceback(tmp_path: Path) -> None:
    """`batuta ps | head -1`: a BrokenPipeError traceback, then another at exit's flush."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # gone before a byte is written: the first write fails
    try:
        done = subprocess.run(
            [sys.executable, "-m", "batuta", "ps"],
            cwd=tmp_path,
            env={**_env(), "BATUTA_RUNTIME_DIR": str(tmp_path / "run")},
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=ERROR_TIMEOUT_S,
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
    assert done.returncode == 141


def test_cli_module_imports_nothing_heavy(tmp_path: Path) -> None:
    """`batuta agent` starts on every host: importing the CLI must not pull in the coordinator."""
    probe = (
        "import sys, batuta.cli\n"
        "heavy = {'asyncio', 'rich', 'numpy', 'numba', 'textual', 'asyncssh', 'batuta.runtime', 'batuta.jobs'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_local_hosts_and_cluster_files_start_without_asyncssh_or_a_subprocess(tmp_path: Path) -> None:
    """Every coordinator and agent start pays for its imports: reading a cluster file and
    starting local hosts import no asyncssh (a tenth of a second; it is imported when a host is
    reached over SSH), and no import runs a program (`ctypes.util.find_library` runs ldconfig)."""
    probe = (
        "import sys\n"
        "ran = []\n"
        "spawns = {'subprocess.Popen', 'os.posix_spawn', 'os.exec', 'os.fork', 'os.system'}\n"
        "sys.addaudithook(lambda event, args: event in spawns and ran.append((event, str(args)[:80])))\n"
        "import batuta.runtime.cluster, batuta.runtime.pool, batuta.cli._run, batuta.stack.nodes\n"
        "import batuta.agent.main, batuta.agent.slot\n"
        "print(ran, 'asyncssh' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[] False"


# -- usage errors: exit 2, one line ------------------------------------------------------

SYNTAX_ERROR = """\
async def main(pool):
    return (
"""


@pytest.mark.parametrize(
    ("files", "args", "expected"),
    [
        pytest.param({}, ["run", "missing.py"], "job file 'missing.py' not found", id="missing-file"),
        pytest.param({"job.py": SYNTAX_ERROR}, ["run", "job.py"], "job.py:2", id="syntax-error"),
        pytest.param(
            {"job.py": "import broken_helper\n", "broken_helper.py": SYNTAX_ERROR},
            ["run", "job.py"],
            "job file 'job.py' imports a module with a syntax error, at ",
            id="syntax-error-in-an-import",
        ),
        pytest.param({"job.py": "x = 1\n"}, ["run", "job.py"], "defines no 'main'", id="no-main"),
        pytest.param(
            {"job.py": "def main(pool):\n    return 1\n"}, ["run", "job.py"], "is not 'async def'", id="sync-main"
        ),
        pytest.param(
            {"job.py": "async def main(pool, extra):\n    pass\n"},
            ["run", "job.py"],
            "must take one argument, the pool",
            id="wrong-signature",
        ),
        pytest.param(
            {"job.py": "import batuta_no_such_module\n"},
            ["run", "job.py"],
            "job.py:1: ModuleNotFoundError: No module named 'batuta_no_such_module'",
            id="import-error",
        ),
        pytest.param(
            {"job.py": "from . import helpers\n", "helpers.py": ""},
            ["run", "job.py"],
            "in no package: import its neighbours by name ('import helpers')",
            id="relative-import",
        ),
        pytest.param({"job.txt": "x"}, ["run", "job.txt"], "is not a .py file", id="not-py"),
        pytest.param({}, ["run", "nosuchjob"], "unknown built-in job 'nosuchjob'", id="unknown-builtin"),
        pytest.param({}, ["run", "kmean"], "did you mean 'kmeans'?", id="misspelt-builtin"),
        pytest.param(
            {"job.py": "async def main(pool):\n    pass\n"},
            ["run", "job.py", "--workers", "0"],
            "--workers: 0 is too few",
            id="workers-zero",
        ),
        pytest.param(
            {"job.py": "async def main(pool):\n    pass\n"},
            ["run", "job.py", "--workers", "two"],
            "--workers: 'two' is not a whole number",
            id="workers-not-int",
        ),
        pytest.param(
            {"job.py": "async def main(pool):\n    pass\n"},
            ["run", "job.py", "--workers", "5000"],
            "--workers: 5000 is too many; one agent runs at most 1024 slots",
            id="workers-too-many",
        ),
        pytest.param(
            {
                "job.py": "async def main(pool):\n    pass\n",
                "cluster.toml": '[[hosts]]\naddress = "10.0.0.1"\n[ssh]\ndata_link_encryption = "off"\n',
            },
            ["run", "job.py", "-c", "cluster.toml"],
            'ssh.data_link_encryption: expected "tls" (the default) or "none" (plain TCP, for private networks), '
            "got 'off'",
            id="data-link-encryption",
        ),
        pytest.param(
            {
                "job.py": "async def main(pool):\n    pass\n",
                "cluster.toml": '[[hosts]]\naddress = "10.0.0.1"\n[ssh]\ndata_link_encryption = "none"\n',
            },
            ["run", "job.py", "-c", "cluster.toml"],
            'ssh.data_link_encryption: "none" applies to data links, and data_link is off: set data_link = "ssh" '
            "(or an address) as well, or remove data_link_encryption",
            id="plain-data-link-without-a-link",
        ),
        pytest.param(
            {"cluster.toml": '[[hosts]]\naddress = "10.0.0.1"\n'},
            ["cluster", "status", "-c", "cluster.toml", "--timeout", "-1"],
            "argument --timeout: -1 is not a positive number of seconds",
            id="status-timeout",
        ),
        pytest.param({}, ["run"], "required: JOB", id="no-job"),
        pytest.param({}, [], "no command given", id="no-command"),
        pytest.param({}, ["frobnicate"], "invalid choice: 'frobnicate'", id="unknown-command"),
        pytest.param({}, ["run", "demo", "--bogus"], "unrecognized arguments: --bogus; a job takes", id="run-option"),
        # what a newcomer passes to their job: said so, with where a job gets its settings
        pytest.param(
            {"job.py": "async def main(pool):\n    pass\n"},
            ["run", "job.py", "5"],
            "unrecognized arguments: 5; a job takes no arguments of its own: its main reads them from the "
            "environment (N=5 batuta run job.py, then os.environ['N']); see 'batuta run --help' for batuta's",
            id="run-job-argument",
        ),
        # no option from a prefix of its name: this was --name, "--name only applies to a served run"
        pytest.param(
            {"job.py": "async def main(pool):\n    pass\n"},
            ["run", "job.py", "--n", "5"],
            "unrecognized arguments: --n 5; a job takes no arguments of its own",
            id="run-job-option-not-an-abbreviation",
        ),
        pytest.param(
            {},
            ["stack", "check", "--tim", "5"],
            "unrecognized arguments: --tim 5; see 'batuta stack check --help'",
            id="stack-check-no-abbreviation",
        ),
        pytest.param(
            {},
            ["stack", "check", "--bogus", "x"],
            "unrecognized arguments: --bogus x; see 'batuta stack check --help'",
            id="stack-check-option",
        ),
        pytest.param({}, ["--bogus"], "unrecognized arguments: --bogus; see 'batuta --help'", id="top-option"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(
    tmp_path: Path, files: dict[str, str], args: list[str], expected: str
) -> None:
    for name, source in files.items():
        write(tmp_path, name, source)
    done = batuta(*args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("batuta: error: ")
    assert expected in lines[0]
    assert done.stdout == ""


@pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None, reason="root without setpriv")
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "locked/job.py"], "cannot read job file 'locked/job.py': Permission denied; make it, and the"),
        (["run", "pi", "--module", "locked/job.py"], "--module locked/job.py: cannot be read: Permission denied"),
    ],
    ids=["job-file", "module"],
)
def test_a_file_in_a_folder_this_user_cannot_enter_is_one_line(tmp_path: Path, args: list[str], expected: str) -> None:
    """A PermissionError traceback, exit 1 (root is made an ordinary user here by dropping the
    capabilities that let it read anything)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    write(locked, "job.py", "async def main(pool):\n    pass\n")
    locked.chmod(0)
    caps = "-dac_override,-dac_read_search"
    prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"] if os.geteuid() == 0 else []
    try:
        done = subprocess.run(
            [*prefix, sys.executable, "-m", "batuta", *args],
            cwd=tmp_path,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=ERROR_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
    finally:
        locked.chmod(0o755)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"batuta: error: {expected}") and len(done.stderr.splitlines()) == 1, done.stderr


def test_cluster_status_says_that_a_host_installs_batuta(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With bootstrap = true, status installed batuta on a bare host in 22 s of silence (batuta
    run says so)."""
    import logging

    import batuta.runtime.probe as probe
    from batuta.cli import main

    async def installing(specs: object, *, timeout: float) -> list[object]:
        logging.getLogger("batuta.runtime.install").info("host node1: installing batuta there")
        raise KeyboardInterrupt  # what the probe would have found is not this test's subject

    monkeypatch.setattr(probe, "probe_hosts", installing)
    write(tmp_path, "cluster.toml", '[[hosts]]\nname = "node1"\naddress = "10.0.0.1"\n')
    assert main(["cluster", "status", "-c", str(tmp_path / "cluster.toml")]) == 130
    assert "batuta: host node1: installing batuta there" in capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["sigterm", "sighup"])
def test_sigterm_before_the_run_has_its_own_handling_is_an_interrupt(tmp_path: Path, sig: signal.Signals) -> None:
    """SIGTERM while the job file loads (before the pool and its signal handling exist) killed
    the command: exit 143 and nothing said, where the README promises 130."""
    fifo = tmp_path / "loading"
    os.mkfifo(fifo)
    write(tmp_path, "job.py", f"import time\n\nopen({str(fifo)!r}, 'w').write('x')\ntime.sleep(60)\n")
    command = [sys.executable, "-m", "batuta", "run", "job.py", "--workers", "1"]
    proc = subprocess.Popen(
        command, cwd=tmp_path, env=_env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    try:
        with open(fifo) as loading:  # opens once the job file's top level runs
            assert loading.read() == "x"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=ERROR_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "batuta: interrupted"


def test_ctrl_c_while_the_command_imports_is_an_interrupt_not_a_traceback(tmp_path: Path) -> None:
    """Ctrl-C in the first tenth of a second (batuta.cli and its modules importing) printed
    Python's bare KeyboardInterrupt traceback."""
    interrupt_at_import = (
        "import sys\n"
        "class Interrupt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'batuta.cli':\n"
        "            raise KeyboardInterrupt  # as SIGINT arriving while it imports\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "sys.argv = ['batuta', 'ps']\n"
        "import runpy\n"
        "runpy.run_module('batuta', run_name='__main__')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", interrupt_at_import],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=ERROR_TIMEOUT_S,
    )
    assert (proc.returncode, proc.stderr) == (130, "batuta: interrupted\n")


@pytest.mark.parametrize(
    "second",
    [
        "signal.raise_signal(signal.SIGINT)",  # as the first's cancel unwinds the run: in its frames
        "asyncio.get_running_loop().call_soon(signal.raise_signal, signal.SIGINT)",  # in the loop's own code
    ],
    ids=["in-the-run", "in-the-loop"],
)
def test_two_ctrl_c_as_the_hosts_start_still_end_json_with_its_object(tmp_path: Path, second: str) -> None:
    """`batuta run --json`, Ctrl-C twice as the hosts started: asyncio.run's handler raises the
    second as KeyboardInterrupt in whatever frame runs then; in one of the run's, it went past
    run_job's on_interrupted, and stdout had no JSON object at all (CI, once). The signals are
    raised by the start itself, where they land, so that each case is deterministic."""
    two_interrupts = (
        "import asyncio, runpy, signal, sys\n"
        "import batuta.jobs._run as run\n"
        "async def start(pool):\n"
        "    signal.raise_signal(signal.SIGINT)  # the first: asyncio.run cancels the run's task\n"
        "    try:\n"
        "        await asyncio.Event().wait()\n"
        "    except asyncio.CancelledError:\n"
        f"        {second}\n"
        "        await asyncio.Event().wait()  # the cancel's unwinding, which the second cuts short\n"
        "run._start = start\n"
        "sys.argv = ['batuta', 'run', 'pi', '--workers', '1', '--json']\n"
        "runpy.run_module('batuta', run_name='__main__')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", two_interrupts],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=ERROR_TIMEOUT_S,
    )
    assert (proc.returncode, proc.stderr) == (130, "batuta: interrupted\n")
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert (summary["interrupted"], summary["exit_code"], summary["tasks"]) == (True, 130, 0)
    assert [host["host"] for host in summary["hosts"]] == ["local"]


def test_a_ctrl_c_that_wait_for_swallows_as_the_hosts_answer_still_interrupts(tmp_path: Path) -> None:
    """Python 3.11's `asyncio.wait_for` returns what it awaited when the cancel lands as that
    completes (the last host's hello): Ctrl-C then was lost, and the job ran in full (`batuta
    stop` and SIGTERM on a served run alike). The start here swallows it as wait_for does."""
    write(tmp_path, "job.py", "async def main(pool):\n    print('the job ran')\n")
    swallowed = (
        "import asyncio, runpy, signal, sys\n"
        "import batuta.jobs._run as run\n"
        "async def start(pool):\n"
        "    signal.raise_signal(signal.SIGINT)  # asyncio.run cancels the run's task\n"
        "    try:\n"
        "        await asyncio.Event().wait()\n"
        "    except asyncio.CancelledError:\n"
        "        pass  # as wait_for returns the hello that came with it\n"
        "run._start = start\n"
        "sys.argv = ['batuta', 'run', 'job.py', '--workers', '1', '--json']\n"
        "runpy.run_module('batuta', run_name='__main__')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", swallowed],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=ERROR_TIMEOUT_S,
    )
    assert "the job ran" not in proc.stdout + proc.stderr
    assert (proc.returncode, proc.stderr) == (130, "batuta: interrupted\n")
    assert json.loads(proc.stdout.splitlines()[-1])["interrupted"] is True


@needs_runtime
@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full here")
def test_a_log_file_the_disk_refuses_is_one_warning_and_the_run_goes_on(tmp_path: Path) -> None:
    """A full disk under --log-file printed a traceback per record, then one at close: the
    result and summary were never printed, and a run whose every task succeeded exited 1.
    (/dev/full refuses every write with ENOSPC, as a full disk does.)"""
    done = batuta("run", "pi", "--workers", "1", "--log-file", "/dev/full", "--log-level", "debug", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("pi ~ 3.14") and "16 tasks: 16 succeeded" in done.stdout
    warned = [line for line in done.stderr.splitlines() if "cannot write the log file" in line]
    assert warned == [
        "batuta: warning: cannot write the log file /dev/full: No space left on device; it is written no more "
        "(the run goes on)"
    ]
    assert "Traceback" not in done.stderr and "Logging error" not in done.stderr


def test_the_runs_signal_handling_hands_back_the_handlers_it_found() -> None:
    """The loop, removing its SIGTERM handler as it closed, left the default action: a SIGTERM
    between the run's end and the metrics linger killed the command (exit 143 after a run
    that succeeded; seen once in CI)."""
    from batuta.cli._run import _sigterm_as_interrupt

    def mine(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    async def nothing() -> int:
        return 7

    before = {signum: signal.signal(signum, mine) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        assert asyncio.run(_sigterm_as_interrupt(nothing())) == 7
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGHUP) is mine
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def test_unknown_builtin_suggests_the_file_beside_it(tmp_path: Path) -> None:
    write(tmp_path, "myjob.py", "async def main(pool):\n    pass\n")
    done = batuta("run", "myjob", cwd=tmp_path)
    assert done.returncode == 2
    assert "did you mean './myjob.py'?" in done.stderr


# -- the loader, in-process --------------------------------------------------------------


@needs_runtime
def test_a_builtin_job_named_like_a_file_here_says_which_ran(tmp_path: Path) -> None:
    """A newcomer's own pi.py run as `batuta run pi`: the built-in ran, and its output looked
    like theirs, without a word."""
    write(tmp_path, "pi.py", "async def main(pool):\n    return 'mine'\n")
    done = batuta("run", "pi", "--workers", "1", "--json", cwd=tmp_path, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["result"] != "mine"
    said = "batuta: note: running the built-in job 'pi'; for ./pi.py here: batuta run ./pi.py"
    assert said in done.stderr.splitlines(), done.stderr
    done = batuta("run", "./pi.py", "--workers", "1", "--json", cwd=tmp_path, timeout=RUN_TIMEOUT_S)
    assert json.loads(done.stdout)["result"] == "mine" and "note" not in done.stderr, done.stderr


def test_job_file_imports_a_helper_beside_it_without_leaving_sys_path(tmp_path: Path) -> None:
    write(tmp_path, "helper_for_batuta_test.py", "ANSWER = 42\n")
    path = write(
        tmp_path, "job.py", "from helper_for_batuta_test import ANSWER\n\nasync def main(pool):\n    return ANSWER\n"
    )
    before = list(sys.path)
    job = load_job(str(path))
    assert sys.path == before
    assert job.origin == str(path.resolve())


def test_a_job_files_class_is_named_as_the_user_wrote_it(tmp_path: Path) -> None:
    """A dataclass argument defined in a job file was refused naming
    `_batuta_job_types_job.P`, the loader's own module name for the file."""
    write(
        tmp_path,
        "types_job.py",
        """\
        from dataclasses import dataclass
        from batuta import Task

        @dataclass
        class P:
            x: int

        async def main(pool):
            return await pool.run(Task.kernel("noop", P(1)))
        """,
    )
    done = batuta("run", "types_job.py", "--workers", "1", "--quiet", cwd=tmp_path, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 1, done.stderr
    assert "task 'noop' arguments[0]: cannot send a value of type P (defined in types_job.py); allowed: " in (
        done.stderr
    )
    assert "_batuta_job" not in done.stderr


def test_builtin_jobs_load() -> None:
    for name in ("demo", "pi"):
        assert load_job(name).origin == "built-in"


def test_module_level_exception_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "job.py", "x = 1\nraise ValueError('bad config')\n")
    with pytest.raises(JobError, match=r"job\.py:2: ValueError: bad config"):
        load_job(str(path))


# -- the summary's arithmetic ------------------------------------------------------------


def test_percentile_interpolates_like_numpy() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 10.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 95) == pytest.approx(8.8)
    assert percentile([5.0], 99) == 5.0
    assert math.isnan(percentile([], 50))


def test_tracker_counts_each_task_once() -> None:
    tracker = RunTracker()
    for task_id in (1, 2, 3):
        tracker.task_queued(task_id)
    tracker.task_queued(3)  # requeued after a lost host: still one task
    ok = TaskResult(task_id=1, name="spin", status=TaskStatus.SUCCEEDED, duration=0.5, queue_wait=0.25)
    bad = TaskResult(task_id=2, name="boom", status=TaskStatus.FAILED, error="ZeroDivisionError: x", attempts=1)
    for result in (ok, ok, bad):  # a duplicate result is counted once
        tracker.task_finished(result)
    summary = tracker.summary(job="j", wall_s=2.0, result=None, error=None).to_json()
    assert (summary["tasks"], summary["succeeded"], summary["failed"], summary["unfinished"]) == (3, 1, 1, 1)
    assert summary["latency_s"]["p50"] == pytest.approx(0.375)  # mean of 0.75 (ok) and 0.0 (bad)
    assert summary["failures"] == [
        {
            "status": "failed",
            "reason": "ZeroDivisionError: x",
            "count": 1,
            "first": "task 2 (boom)",
            "varied": False,
            "stderr_tail": None,  # it wrote nothing to stderr
        }
    ]
    assert summary["ok"] is False
    assert summary["tasks_per_s"] == 1.0


def test_each_failure_group_carries_the_end_of_its_first_tasks_stderr() -> None:
    """`failures` in --json had each cause's one-line reason alone: the traceback that says how
    the kernel got there was in no output of `batuta run`."""
    traceback = (
        'Traceback (most recent call last):\n  File "job.py", line 3, in k\n    1 / x\n'
        "ZeroDivisionError: division by zero\n"
    )
    tracker = RunTracker()
    for task_id, stderr in ((1, traceback), (2, "another traceback\n")):  # the first of a group stands for it
        tracker.task_finished(failed(task_id, "h1", "ZeroDivisionError: division by zero", stderr=stderr.encode()))
    long = "".join(f"line {n}\n" for n in range(100))
    tracker.task_finished(failed(3, "h1", "it printed much", stderr=long.encode()))
    wide = ("x" * 3000 + "\n") * 5  # 40 lines would be far more than 8 KiB
    tracker.task_finished(failed(4, "h1", "it printed wide", stderr=wide.encode()))
    tracker.task_finished(failed(5, "h1", "it printed blank", stderr=b" \n"))
    groups = tracker.summary(job="j", wall_s=1.0, result=None, error=None).to_json()["failures"]
    tails = [group["stderr_tail"] for group in groups]
    assert tails[0] == traceback.rstrip()
    assert tails[1] == "[60 earlier lines left out]\n" + "\n".join(f"line {n}" for n in range(60, 100))
    assert tails[2] == "[3 earlier lines left out]\n" + "\n".join(["x" * 3000] * 2)
    assert tails[3] is None
    assert groups[0]["reason"] == "ZeroDivisionError: division by zero"  # as before


def test_the_tracker_holds_a_few_bytes_a_task_not_an_object_each() -> None:
    """A `batuta run` of a stream of tasks (as_completed, nothing else kept) grew by about 180
    bytes a task: two sets of task ids and three lists of float objects for the percentiles
    (400,000 noop tasks: +60 MiB). Its ids are ranges now and its samples 8-byte doubles."""
    import tracemalloc

    n = 50_000
    results = [
        TaskResult(task_id=i, name="noop", status=TaskStatus.SUCCEEDED, duration=i * 1e-6, queue_wait=1e-3, host="h")
        for i in range(1, n + 1)
    ]
    tracker = RunTracker()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(0, n, 2):  # a few in flight at once, ending a little out of order, one twice
            for result in (results[i], results[i + 1]):
                tracker.task_queued(result.task_id + 3)
                tracker.task_queued(result.task_id)
            for result in (results[i + 1], results[i], results[i + 1]):
                tracker.task_finished(result)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    summary = tracker.summary(job="j", wall_s=1.0, result=None, error=None)
    assert (summary.tasks, summary.succeeded, summary.unfinished) == (n + 3, n, 3)
    assert summary.run_time_s["p50"] == percentile([r.duration for r in results], 50)  # exact, as before
    assert held / n < 40, f"{held / n:.0f} bytes a task"  # three samples of 8 bytes, and slack


def test_id_ranges_are_a_set_of_ids() -> None:
    import random

    rng = random.Random(7)
    ids = IdRanges()
    plain: set[int] = set()
    for _ in range(5_000):
        task_id = rng.randrange(1, 400)
        assert ids.add(task_id) == (task_id not in plain)
        plain.add(task_id)
        probe = rng.randrange(0, 401)
        assert (probe in ids) == (probe in plain) and len(ids) == len(plain)
    assert ids.ranges == 1  # every id of 1..399 came: one range
    in_order = IdRanges()
    for task_id in range(1, 10_001):
        in_order.add(task_id)
    assert in_order.ranges == 1 and len(in_order) == 10_000 and 10_000 in in_order and 10_001 not in in_order


def failed(
    task_id: int, host: str, error: str, status: TaskStatus = TaskStatus.FAILED, stderr: bytes = b""
) -> TaskResult:
    return TaskResult(
        task_id=task_id, name="k", status=status, error=error, host=host, slot=f"{host}/0", attempts=1, stderr=stderr
    )


def test_a_kernel_failing_on_each_input_in_its_own_words_is_one_cause_not_five() -> None:
    """ "boom on 0", "boom on 1"... took every place in the summary, and the unknown kernel
    and the wrong arguments behind them went unsaid ("2 more failed for other reasons")."""
    tracker = RunTracker()
    for task_id in range(5):
        tracker.task_finished(failed(task_id, "h1", f"ValueError: boom on {task_id}"))
    tracker.task_finished(failed(5, "h1", "UnknownKernelError: unknown kernel 'nope'"))
    tracker.task_finished(failed(6, "h1", "KernelArgumentError: takes 1 argument, got 2"))
    summary = tracker.summary(job="j", wall_s=1.0, result=None, error=None)
    assert summary.failure_lines() == [
        "5 tasks failed: ValueError: boom on 0 (first: task 0 (k) on h1/0; the others alike, with other values)",
        "1 task failed: UnknownKernelError: unknown kernel 'nope' (first: task 5 (k) on h1/0)",
        "1 task failed: KernelArgumentError: takes 1 argument, got 2 (first: task 6 (k) on h1/0)",
    ]


def test_tracker_groups_failures_by_cause_and_keeps_each_reason_whole() -> None:
    tracker = RunTracker()
    hint = "unknown kernel 'k'; ... or name it 'module:kernel'" + " (a long hint)" * 40
    for task_id in range(12):
        tracker.task_finished(failed(task_id, "h1" if task_id % 2 else "h2", f"UnknownKernelError: {hint}"))
    tracker.task_finished(failed(12, "h1", "lost with h1", TaskStatus.LOST))
    summary = tracker.summary(job="j", wall_s=1.0, result=None, error=None)
    assert summary.failures == [
        f"12 tasks failed: UnknownKernelError: {hint} (first: task 0 (k) on h2/0)",
        "1 task lost: lost with h1 (first: task 12 (k) on h1/0)",
    ]
    assert summary.text_lines()[-2:] == summary.failures  # in the text once, whole
    assert summary.text_lines()[0].startswith("13 tasks: 0 succeeded, 13 failed")
    one = RunTracker()
    one.task_finished(failed(0, "h1", "lost with h1", TaskStatus.LOST))
    assert one.summary(job="j", wall_s=1.0, result=None, error=None).text_lines()[0].startswith("1 task: ")


def test_tracker_reports_each_hosts_share_and_fate() -> None:
    tracker = RunTracker()
    for name in ("h1", "h2", "h3", "h4"):
        tracker.host_up(name) if name != "h4" else None
    for task_id, (host, seconds) in enumerate([("h1", 0.1), ("h1", 0.3), ("h2", 2.0)]):
        tracker.task_finished(
            TaskResult(task_id=task_id, name="k", status=TaskStatus.SUCCEEDED, host=host, duration=seconds)
        )
    tracker.task_finished(failed(9, "h2", "ValueError: bad"))
    tracker.host_down("h2", "no heartbeat for 8.1s")
    tracker.host_state_changed("h2", "lost", "no SSH session within 10s")  # a relaunch failed: still lost
    tracker.host_up("h2")  # relaunched: back up, but it was lost once (and why is the loss's cause)
    tracker.host_state_changed("h3", "suspected", "no heartbeat for 3.2s")
    tracker.host_state_changed("h3", "up", "heard from again")  # a passing suspicion is no failure
    tracker.host_state_changed("h4", "retired", "host h4 (10.0.0.4:22): HOST KEY CHANGED: refused")
    late = "did not answer within start_wait (5 s); tasks started without it"
    tracker.host_state_changed("h6", "starting", late)  # start-up went on without it...
    tracker.host_state_changed("h7", "starting", late)
    tracker.host_up("h7")  # ...and it joined: no failure
    tracker.hosts_known(["h1", "h2", "h3", "h4", "h5", "h6", "h7"])  # h5: never heard of, never up
    summary = tracker.summary(job="j", wall_s=1.0, result=None, error=None)
    hosts = {h["host"]: h for h in summary.to_json()["hosts"]}
    assert (hosts["h1"]["tasks"], hosts["h1"]["failed"]) == (2, 0)
    assert hosts["h1"]["run_time_s"] == {"p50": pytest.approx(0.2), "p95": pytest.approx(0.29)}
    assert (hosts["h2"]["tasks"], hosts["h2"]["failed"], hosts["h2"]["losses"]) == (2, 1, 1)
    assert (hosts["h2"]["state"], hosts["h2"]["reason"]) == ("up", "no heartbeat for 8.1s")
    assert (hosts["h3"]["state"], hosts["h3"]["reason"]) == ("up", None)
    assert (hosts["h4"]["state"], hosts["h5"]["state"]) == ("retired", "unreachable")
    assert "never came up" in hosts["h5"]["reason"]
    assert (hosts["h6"]["state"], hosts["h6"]["reason"]) == (
        "starting",
        f"still starting when the run ended ({late})",
    )
    assert (hosts["h7"]["state"], hosts["h7"]["reason"]) == ("up", None)
    assert summary.to_json()["hosts_failed"] == ["h2", "h4", "h6", "h5"]  # in the order first heard of
    text = "\n".join(summary.host_lines())
    assert "lost once, back up: no heartbeat for 8.1s" in text
    assert "retired: host h4 (10.0.0.4:22): HOST KEY CHANGED: refused" in text


def test_a_host_said_unfit_is_a_failed_host_with_its_reason() -> None:
    """A host up throughout that failed tasks for a reason of its own (its memory, its disk,
    its slots: core/hostfit.py) was "up" with no reason, and `--strict` passed."""
    tracker = RunTracker()
    tracker.host_up("h1")
    tracker.host_up("h2")
    why = "host h2 could not hold put value 1 in memory: 8 bytes; run it on a host with more free memory"
    tracker.host_state_changed("h2", "unfit", why)
    tracker.hosts_known(["h1", "h2"])
    summary = tracker.summary(job="j", wall_s=1.0, result=None, error=None)
    hosts = {h["host"]: h for h in summary.to_json()["hosts"]}
    assert (hosts["h2"]["state"], hosts["h2"]["reason"]) == ("unfit", why)
    assert summary.to_json()["hosts_failed"] == ["h2"]
    assert f"unfit: {why}" in "\n".join(summary.host_lines())


# -- real runs (need the runtime) --------------------------------------------------------

COUNTING_JOB = """\
import sys
from batuta import Task

async def main(pool):
    print("a line the job prints")
    futures = [await pool.submit(Task.kernel("spin", 0.001)) for _ in range(6)]
    values = await pool.map("spin", [0.001, 0.001, 0.001])
    {extra}
    for future in futures:
        await future
    return "done"
"""
FAILING_TASK = (
    'await (await pool.submit(Task.binary(sys.executable, "-c", "import sys; print(\'no input\', file=sys.stderr); '
    'raise SystemExit(3)")))'
)


@needs_runtime
def test_run_json_counts_what_the_job_submitted(tmp_path: Path) -> None:
    write(tmp_path, "job.py", COUNTING_JOB.format(extra="pass"))
    done = batuta("run", "job.py", "--workers", "2", "--json", cwd=tmp_path, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)  # one JSON object and nothing else on stdout
    assert (summary["tasks"], summary["succeeded"], summary["failed"]) == (9, 9, 0)
    assert summary["result"] == "done"
    assert summary["ok"] is True
    assert summary["run_time_s"]["p50"] >= 0.001
    assert summary["latency_s"]["p99"] >= summary["run_time_s"]["p50"]
    assert "a line the job prints" in done.stderr
    [host] = summary["hosts"]
    assert (host["host"], host["state"], host["reason"], host["tasks"], host["failed"]) == ("local", "up", None, 9, 0)
    assert host["run_time_s"]["p95"] >= host["run_time_s"]["p50"] >= 0.001
    assert summary["hosts_failed"] == []


UNPRINTABLE_JOB = """
class Value:
    def __str__(self):
        raise RuntimeError("no str")

    def __repr__(self):
        raise RuntimeError("no repr")


async def main(pool):
    return Value()
"""


@needs_runtime
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_a_value_that_cannot_be_printed_still_gets_its_summary(tmp_path: Path, as_json: bool) -> None:
    """A returned object whose __str__ and __repr__ raise: a traceback and exit 1, no summary,
    no JSON, after the job had done its work."""
    write(tmp_path, "job.py", UNPRINTABLE_JOB)
    done = batuta(
        "run", "job.py", "--workers", "1", *(["--json"] if as_json else []), cwd=tmp_path, timeout=RUN_TIMEOUT_S
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    shown = "<unprintable Value: RuntimeError in its __str__ and __repr__>"
    if as_json:
        assert json.loads(done.stdout)["result"] == shown
    else:
        assert done.stdout.splitlines()[0] == shown and "0 tasks" in done.stdout


@needs_runtime
@pytest.mark.parametrize(("code", "rc"), [(3, 1), (0, 0)])
def test_a_job_that_calls_sys_exit_still_gets_its_summary(tmp_path: Path, code: int, rc: int) -> None:
    """sys.exit(3) in main ended the command with 3 (batuta's "no host could be started"), and
    with no summary or JSON."""
    write(tmp_path, "job.py", f"import sys\n\n\nasync def main(pool):\n    sys.exit({code})\n")
    done = batuta("run", "job.py", "--workers", "1", "--json", cwd=tmp_path, timeout=RUN_TIMEOUT_S)
    assert done.returncode == rc, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["ok"], summary["exit_code"]) == (code == 0, rc)
    if code:
        said = f"job 'job.py' called sys.exit({code}) at job.py:5; return from main() instead"
        assert summary["error"] == said and done.stderr.strip().endswith(f"batuta: error: {said}")


@needs_runtime
def test_json_when_no_host_starts_still_says_each_host_and_why(tmp_path: Path) -> None:
    """Exit 3 with nothing on stdout: a script reading --json had nothing to parse."""
    hosts = "".join(f'[[hosts]]\nname = "h{port}"\naddress = "127.0.0.1"\nport = {port}\n' for port in (1, 2))
    write(tmp_path, "cluster.toml", hosts + "[ssh]\nconnect_timeout = 5\n")
    done = batuta("run", "pi", "-c", "cluster.toml", "--json", cwd=tmp_path, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 3, done.stderr
    summary = json.loads(done.stdout)
    assert summary["ok"] is False and summary["tasks"] == 0 and summary["hosts_failed"] == ["h1", "h2"]
    assert summary["exit_code"] == 3
    for host, port in zip(summary["hosts"], (1, 2), strict=True):
        assert (
            host["state"] == "unreachable" and f"connection refused; is sshd running on port {port}?" in host["reason"]
        )
    assert summary["error"].startswith("no host could be started, so nothing ran: host h1 (")


@needs_runtime
def test_a_job_that_returns_without_awaiting_its_tasks_is_warned(tmp_path: Path) -> None:
    """`await pool.submit(...)` in a loop and return: the value printed, exit 0, and the tasks
    never awaited cancelled as the pool closed, said only as 'N unfinished' in the summary."""
    write(
        tmp_path,
        "job.py",
        """
        from batuta import Task


        async def main(pool):
            await (await pool.submit(Task.kernel("spin", 0.001)))
            for _ in range(300):
                await pool.submit(Task.kernel("spin", 0.05))
            return "submitted"
        """,
    )
    done = batuta("run", "job.py", "--workers", "1", "--json", cwd=tmp_path, timeout=RUN_TIMEOUT_S)
    summary = json.loads(done.stdout)
    assert summary["tasks"] == 301 and summary["unfinished"] > 0, summary
    said = f"job 'job.py' returned from main() with {summary['unfinished']} of its 301 task(s) unfinished"
    assert said in done.stderr and "await their futures" in done.stderr, done.stderr
    # a job that awaits what it submits is not warned
    write(tmp_path, "awaits.py", COUNTING_JOB.format(extra="pass"))
    done = batuta("run", "awaits.py", "--workers", "1", cwd=tmp_path, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0 and "unfinished" not in done.stderr, done.stderr


@needs_runtime
@pytest.mark.parametrize(
    ("returned", "said"),
    [
        (
            'await pool.submit(Task.kernel("spin", 0.001))',
            "returned a TaskFuture from main() without awaiting it; await it for its result: 'await "
            "pool.submit(task)' gives the future, 'await future' the result",
        ),
        ("asyncio.sleep(0)", "returned a coroutine from main() without awaiting it; await it: 'return await ...'"),
    ],
    ids=["task-future", "coroutine"],
)
def test_a_main_that_returns_what_it_did_not_await_is_an_error(tmp_path: Path, returned: str, said: str) -> None:
    """`return await pool.submit(...)` printed '<TaskFuture 1 spin done>' and exited 0, its task
    cancelled as the pool closed; a coroutine added a RuntimeWarning pointing into batuta."""
    source = f"import asyncio\nfrom batuta import Task\n\nasync def main(pool):\n    return {returned}\n"
    write(tmp_path, "job.py", source)
    done = batuta("run", "job.py", "--workers", "1", "--json", cwd=tmp_path, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 1, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["ok"], summary["result"], summary["error"]) == (False, None, f"job 'job.py' {said}")
    assert done.stderr.strip().splitlines() == [f"batuta: error: job 'job.py' {said}"]


@needs_runtime
def test_run_with_a_failed_task_exits_1_and_counts_it(tmp_path: Path) -> None:
    write(tmp_path, "job.py", COUNTING_JOB.format(extra=FAILING_TASK))
    done = batuta("run", "job.py", "--workers", "2", "--json", cwd=tmp_path, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 1, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["tasks"], summary["succeeded"], summary["failed"]) == (10, 9, 1)
    assert len(summary["failures"]) == 1
    assert summary["failures"][0]["stderr_tail"] == "no input"  # what it said, beside the one-line reason
    assert summary["error"] is None


@needs_runtime
def test_run_text_summary(tmp_path: Path) -> None:
    write(tmp_path, "job.py", COUNTING_JOB.format(extra=FAILING_TASK))
    done = batuta("run", "job.py", "-w", "2", cwd=tmp_path, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 1, done.stderr
    out = done.stdout
    assert "done" in out.splitlines()
    assert "10 tasks: 9 succeeded, 1 failed" in out
    assert "latency (queue + run)  p50" in out
    program = Path(sys.executable).name  # python, or python3 where pytest was started as such
    assert f"1 task failed: {sys.executable} exited with code 3 (first: task 10 ({program}) on local/" in out
    lines = out.splitlines()
    host_header, local = lines[lines.index(next(line for line in lines if line.startswith("host "))) :][:2]
    assert host_header.split() == ["host", "tasks", "failed", "run", "p50", "run", "p95"]
    assert local.split()[:3] == ["local", "10", "1"]


UNKNOWN_KERNEL_JOB = """\
from batuta import Task

async def main(pool):
    futures = [await pool.submit(Task.kernel("no_such_kernel_here", i)) for i in range(12)]
    return sum([(await future).is_success() for future in futures])
"""
HINT_END = "or name it 'module:kernel'"


@needs_runtime
@pytest.mark.parametrize("quiet", [False, True], ids=["summary", "quiet"])
def test_one_cause_is_printed_once_with_its_whole_hint(tmp_path: Path, quiet: bool) -> None:
    write(tmp_path, "job.py", UNKNOWN_KERNEL_JOB)
    done = batuta("run", "job.py", "-w", "2", *(["-q"] if quiet else []), cwd=tmp_path, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 1, done.stderr
    both = done.stdout + done.stderr
    assert both.count("unknown kernel 'no_such_kernel_here'") == 1, both
    assert both.count(HINT_END) == 1, both
    [line] = [line for line in both.splitlines() if "unknown kernel" in line]
    assert line.startswith(("12 tasks failed: UnknownKernelError:", "batuta: 12 tasks failed: UnknownKernelError:"))
    assert f"{HINT_END} (first: task " in line
    assert "WARNING" not in done.stderr  # the log leaves failed tasks to the summary


@needs_runtime
def test_cluster_status_says_a_hosts_error_once(tmp_path: Path) -> None:
    """The agent's stderr was on the console as well as under the table: each error twice."""
    fake = write(tmp_path, "python", "#!/bin/sh\necho 'No module named batuta (from the fake python)' >&2\nexit 1\n")
    fake.chmod(0o755)
    write(tmp_path, "cluster.toml", f'[local]\npython = "{fake}"\n')
    done = batuta("cluster", "status", "-c", "cluster.toml", cwd=tmp_path, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 1, done.stderr
    said = " ".join((done.stdout + done.stderr).split())  # the table wraps its error lines
    assert said.count("No module named batuta (from the fake python)") == 1, said


@needs_runtime
def test_no_host_started_exits_3_in_one_line(tmp_path: Path) -> None:
    """Distinct from 1 (the work failed) and 2 (bad input): nothing could run at all. One
    line: asyncio's "Unknown child process" warning came before it in about one run of four."""
    write(tmp_path, "job.py", "async def main(pool):\n    return 1\n")
    write(tmp_path, "cluster.toml", '[local]\npython = "/bin/false"\n')
    done = batuta("run", "job.py", "-c", "cluster.toml", "--json", cwd=tmp_path, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 3, done.stderr
    assert json.loads(done.stdout)["hosts_failed"] == ["local"]  # --json: the summary, for scripts
    [last] = done.stderr.splitlines()
    assert last == (
        "batuta: error: no host could be started, so nothing ran: host local: agent exited before saying hello, "
        "with nothing on stderr (is batuta installed for /bin/false? "
        "`batuta cluster install --cluster cluster.toml` puts it there); "
        "'batuta stack check -c cluster.toml' checks every host and says what to fix"
    )


@needs_runtime
def test_a_local_python_that_is_not_here_is_a_config_error(tmp_path: Path) -> None:
    """The interpreter of [local] is on this machine: a path that cannot be run is fixed in
    the cluster file (2), not a host that failed to come up (3)."""
    write(tmp_path, "job.py", "async def main(pool):\n    return 1\n")
    write(tmp_path, "cluster.toml", '[local]\npython = "/nonexistent/bin/python3"\n')
    done = batuta("run", "job.py", "-c", "cluster.toml", cwd=tmp_path, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 2, done.stderr
    [last] = done.stderr.splitlines()
    assert last == (
        "batuta: error: no host could be started, so nothing ran: host local: cannot run its python "
        "'/nonexistent/bin/python3' here: No such file or directory; fix python in the cluster file's [local] "
        f"table, or leave it out to run the agent with this Python ({sys.executable})"
    )


DIES_AT_IMPORT = """\
#!/bin/sh
echo "Traceback (most recent call last):" >&2
echo '  File "/opt/x/batuta/agent/objects.py", line 39, in <module>' >&2
echo "    import numpy as np" >&2
echo "ModuleNotFoundError: No module named 'numpy'" >&2
exit 1
"""


@needs_runtime
@pytest.mark.parametrize("level", ["warning", "info"])
def test_an_agent_that_dies_at_import_is_its_exception_at_the_console_and_whole_at_info(
    tmp_path: Path, level: str
) -> None:
    write(tmp_path, "job.py", "async def main(pool):\n    return 1\n")
    python = write(tmp_path, "python3", DIES_AT_IMPORT)
    python.chmod(0o755)
    write(tmp_path, "cluster.toml", f'[local]\npython = "{python}"\n')
    done = batuta("run", "job.py", "-c", "cluster.toml", "--log-level", level, cwd=tmp_path, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 3, done.stderr
    assert done.stderr.splitlines()[-1].startswith("batuta: error: no host could be started")
    assert "ModuleNotFoundError: No module named 'numpy'" in done.stderr
    frames = "Traceback (most recent call last)" in done.stderr and "objects.py" in done.stderr
    assert frames is (level == "info")  # at warning: no traceback on the console before the one-line error


SILENT_WRAPPER = """\
#!/bin/sh
sleep 300 &
echo $! > "$(dirname "$0")/child.pid"
wait
"""


@needs_runtime
def test_an_agent_wrapper_that_never_says_hello_is_stopped_with_what_it_started(tmp_path: Path) -> None:
    """A `[local] python` script whose child held the agent's stderr open: the child outlived
    the run, and asyncio's transport, never finished, printed 'Exception ignored ... Event loop
    is closed' after the one-line error. The agent's process group is stopped now."""
    write(tmp_path, "job.py", "async def main(pool):\n    return 1\n")
    python = write(tmp_path, "python3", SILENT_WRAPPER)
    python.chmod(0o755)
    write(tmp_path, "cluster.toml", f'[local]\npython = "{python}"\n[pool]\nstart_timeout = 2\n')
    done = batuta("run", "job.py", "-c", "cluster.toml", cwd=tmp_path, timeout=RUN_TIMEOUT_S)
    child = int((tmp_path / "child.pid").read_text())
    try:
        assert done.returncode == 3, done.stderr
        [last] = done.stderr.splitlines()
        assert last.startswith("batuta: error: no host could be started, so nothing ran: host local: agent did not")
        assert "or give it longer (start_timeout, in the cluster file's [pool] table)" in last, last
        state = Path(f"/proc/{child}/stat")
        assert not state.exists() or state.read_text().split(") ")[1].startswith("Z"), "the wrapper's child is alive"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


@needs_runtime
def test_text_printed_ahead_of_the_agent_is_shown_and_explained(tmp_path: Path) -> None:
    """A login banner or a shell startup file that prints: the coordinator read 'Welc' as the
    length of a frame, and the error was 'frame of 1466264675 bytes exceeds the limit'."""
    write(tmp_path, "job.py", "async def main(pool):\n    return 1\n")
    python = write(tmp_path, "python3", f'#!/bin/sh\necho "Welcome to node1!"\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    write(tmp_path, "cluster.toml", f'[local]\npython = "{python}"\n')
    done = batuta("run", "job.py", "-c", "cluster.toml", cwd=tmp_path, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 3, done.stderr
    [last] = done.stderr.splitlines()
    began = "host local: protocol error before the agent's hello: its stdout began with text 'Welcome to node1!\\n'"
    assert began in last, last
    assert "something printed before the agent started (a login banner, a shell startup file or a wrapper" in last


@needs_runtime
def test_a_kernel_module_that_does_not_import_is_reported_once_per_host_and_the_run_goes_on(tmp_path: Path) -> None:
    """Each of the four slots printed the same traceback: twenty lines for one missing module."""
    write(tmp_path, "cluster.toml", '[local]\nslots = 4\nkernel_modules = ["no_such_module_here"]\n')
    done = batuta("run", "pi", "-c", "cluster.toml", "--quiet", cwd=tmp_path, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("pi ~ 3.14")
    assert done.stderr.count("cannot load kernel module 'no_such_module_here'") == 1, done.stderr
    assert "Traceback" not in done.stderr and "direct cause" not in done.stderr  # one line, not a traceback


@needs_runtime
def test_a_kernel_module_beside_the_cluster_file_ships_as_one_beside_the_job_does(tmp_path: Path) -> None:
    """Relative paths in a cluster file are the file's folder's; its kernel_modules were looked
    for only beside the job file and on sys.path, and a module beside it was not found."""
    config, job = tmp_path / "config", tmp_path / "jobs"
    config.mkdir()
    job.mkdir()
    write(
        config,
        "beside_the_cluster_file.py",
        "from batuta import kernel\n\n@kernel('triple')\ndef triple(x):\n    return 3 * x\n",
    )
    write(config, "cluster.toml", '[local]\nslots = 1\nkernel_modules = ["beside_the_cluster_file"]\n')
    write(job, "job.py", "async def main(pool):\n    return sum(await pool.map('triple', [1, 2, 3]))\n")
    done = batuta("run", "job.py", "-c", str(config / "cluster.toml"), "-q", cwd=job, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "18"


PYTHON_310 = """\
#!/bin/sh
echo "Unknown option: -P" >&2
echo "usage: python3 [option] ... [-c cmd | -m mod | file | -] [arg] ..." >&2
echo 'Try `python -h'"'"' for more information.' >&2
exit 2
"""


@needs_runtime
def test_a_python_older_than_3_11_is_named_as_such_not_by_its_usage_line(tmp_path: Path) -> None:
    """Ubuntu 22.04's python3 is 3.10: the host was 'unreachable: agent exited before saying
    hello: Try `python -h' for more information', and relaunched five times."""
    write(tmp_path, "job.py", "async def main(pool):\n    return 1\n")
    python = write(tmp_path, "python3", PYTHON_310)
    python.chmod(0o755)
    write(tmp_path, "cluster.toml", f'[local]\npython = "{python}"\n')
    done = batuta("run", "job.py", "-c", "cluster.toml", cwd=tmp_path, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 3, done.stderr
    last = done.stderr.splitlines()[-1]
    assert f"host local: {python} does not know -P, so it is older than Python 3.11, which batuta needs" in last
    assert done.stderr.count("Unknown option: -P") == 1  # started once, not relaunched


NEWER_AGENT = """\
import sys
from batuta.protocol.codec import encode_message
from batuta.protocol.messages import PROTOCOL_VERSION, Hello, SlotInfo

hello = Hello(protocol=PROTOCOL_VERSION + 1, batuta_version="9.9", python_version="3.11.7", hostname="next",
              pid=1, cpu_count=1, slots=(SlotInfo(slot=0, capabilities=("cpu",)),))
sys.stdout.buffer.write(encode_message(hello))
sys.stdout.flush()
sys.stdin.read()
"""


@needs_runtime
def test_an_agent_of_another_protocol_is_named_as_such_not_as_text_ahead_of_the_agent(tmp_path: Path) -> None:
    """Its Hello is a frame, refused for what it says: not 'something printed before'."""
    write(tmp_path, "job.py", "async def main(pool):\n    return 1\n")
    write(tmp_path, "newer.py", NEWER_AGENT)
    python = write(tmp_path, "python3", f"#!/bin/sh\nexec {sys.executable} {tmp_path / 'newer.py'}\n")
    python.chmod(0o755)
    write(tmp_path, "cluster.toml", f'[local]\npython = "{python}"\n')
    done = batuta("run", "job.py", "-c", "cluster.toml", cwd=tmp_path, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 3, done.stderr
    last = done.stderr.splitlines()[-1]
    assert "agent 'next' speaks protocol" in last and "install the same batuta on both sides" in last, last
    assert "something printed before" not in last


MISSING_KEY_HOST = '[[hosts]]\nname = "far"\naddress = "127.0.0.1"\nidentity_file = "/nonexistent/id_far"\n'


@needs_runtime
@pytest.mark.parametrize("with_local", [False, True], ids=["alone", "with-a-broken-local"])
def test_an_identity_file_missing_here_is_a_config_error_only_when_every_host_failed_so(
    tmp_path: Path, with_local: bool
) -> None:
    """The key is read on this machine before anything is contacted: fixed in the cluster file
    (exit 2, naming the field), not on the host. With another host failing otherwise, the run
    is one that could not reach its hosts (3)."""
    write(tmp_path, "job.py", "async def main(pool):\n    return 1\n")
    local = '[local]\npython = "/bin/false"\n' if with_local else ""
    write(tmp_path, "cluster.toml", local + MISSING_KEY_HOST)
    done = batuta("run", "job.py", "-c", "cluster.toml", cwd=tmp_path, timeout=RUN_TIMEOUT_S)
    assert done.returncode == (3 if with_local else 2), done.stderr
    [last] = done.stderr.splitlines()
    if with_local:
        assert "host local: agent exited before saying hello" in last
        return
    assert last == (
        "batuta: error: no host could be started, so nothing ran: host far: cannot read its identity_file "
        "/nonexistent/id_far: No such file or directory; fix identity_file in the cluster file, or put the "
        "key there (it is read on this machine, not on the host)"
    )


@needs_runtime
def test_job_that_raises_exits_1_with_its_traceback(tmp_path: Path) -> None:
    write(tmp_path, "job.py", "async def main(pool):\n    raise ValueError('the job broke')\n")
    done = batuta("run", "job.py", "-w", "1", "--json", cwd=tmp_path, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 1
    summary = json.loads(done.stdout)
    assert summary["error"] == "job 'job.py' raised ValueError: the job broke"
    assert "Traceback (most recent call last)" in done.stderr
    assert 'job.py", line 2, in main' in done.stderr
    assert done.stderr.rstrip().splitlines()[-1] == "batuta: error: job 'job.py' raised ValueError: the job broke"


@needs_runtime
@pytest.mark.parametrize("name", ["demo", "pi"])
def test_builtin_jobs_run(tmp_path: Path, name: str) -> None:
    done = batuta("run", name, "--workers", "2", "--json", cwd=tmp_path, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["failed"] == 0
    assert summary["result"].startswith("pi ~ 3.14")


@needs_runtime
def test_a_host_up_with_no_slot_for_the_work_fails_it_in_one_line_instead_of_waiting(tmp_path: Path) -> None:
    """`slots = 0` leaves a machine without a GPU with no slot at all: the job used to wait
    forever for the CPU slot the configuration seemed to promise. Its tasks fail as
    unschedulable, and the job's error (batuta's own, complete) comes without a traceback,
    saying where the job met it."""
    write(tmp_path, "zero.toml", '[local]\nslots = 0\nenv = { BATUTA_FAKE_GPUS = "0" }\n')  # no GPU, even on one
    done = batuta("run", "pi", "--cluster", "zero.toml", "--quiet", cwd=tmp_path, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    last = done.stderr.rstrip().splitlines()[-1]
    assert last.startswith("batuta: error: job 'pi' raised TaskFailedError at pi.py:"), last
    assert "unschedulable after 0 attempt(s): no slot offers cpu (the cluster offers: no slots at all)" in last, last
    assert last.endswith("add such a host or change the task's backend"), last
    assert "host local is up but offers no slot, so it runs nothing" in done.stderr, done.stderr


@needs_runtime
@pytest.mark.parametrize("name", ["pi", "linreg", "forest"])
def test_backend_gpu_reaches_every_builtin_job(tmp_path: Path, name: str) -> None:
    """pi, demo and linreg ran on the CPU whatever --backend said. Without a GPU, a job whose
    kernels have a GPU variant now fails as unschedulable; forest's have none: it says so."""
    write(tmp_path, "cpu.toml", '[local]\nslots = 2\nenv = { BATUTA_FAKE_GPUS = "0" }\n')
    done = batuta("run", name, "-c", "cpu.toml", "--backend", "gpu", "-q", cwd=tmp_path, timeout=RUN_TIMEOUT_S)
    if name == "forest":
        assert done.returncode == 0, done.stderr
        assert "(on the CPU slots: the tree kernels have no GPU variant)" in done.stdout
        return
    assert done.returncode == 1, done.stderr
    last = done.stderr.rstrip().splitlines()[-1]
    assert f"job '{name}' raised TaskFailedError at {name}.py:" in last and "no slot offers gpu" in last, last


PROGRESS_JOB = """\
from batuta import Task

async def main(pool):
    futures = [await pool.submit(Task.kernel("spin", 0.05)) for _ in range(400)]
    for done, future in enumerate(futures, 1):
        await future
        print(f"finished {done}", flush=True)
"""

MAP_JOB = """\
async def main(pool):
    await pool.map("spin", [0.05] * 3)
    print("finished 3", flush=True)
    await pool.map("spin", [0.05] * 397)  # interrupted: map cancels what it waits for
"""


def wait_for_line(process: subprocess.Popen[str], needle: str, timeout: float) -> list[str]:
    """The lines `process` wrote to stdout up to the first one equal to `needle`, read in a
    thread (so that the wait is bounded even if the process stops writing)."""
    import queue
    import threading

    assert process.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    stream = process.stdout

    def read() -> None:
        for line in stream:
            lines.put(line.rstrip("\n"))
            if line.rstrip("\n") == needle:
                return
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if line == needle:
            return seen
    raise AssertionError(f"{needle!r} never came within {timeout} s; got {seen[-5:]}")


@needs_runtime
@pytest.mark.parametrize(
    ("with_journal", "to_group", "sig"),
    [
        (False, True, signal.SIGINT),
        (True, True, signal.SIGINT),
        (False, False, signal.SIGINT),
        (False, False, signal.SIGTERM),
        (True, False, signal.SIGHUP),  # its terminal closed: it died at once, pool unclosed, nothing said
    ],
    ids=["no-journal", "journal", "coordinator-only", "sigterm", "sighup"],
)
def test_ctrl_c_prints_what_finished_and_how_to_resume_then_exits_130(
    tmp_path: Path, with_journal: bool, to_group: bool, sig: signal.Signals
) -> None:
    """SIGINT to the whole process group, as a terminal's Ctrl-C sends it (agents included),
    or to the coordinator alone (its agents then answer each task "cancelled"); SIGTERM (`kill`,
    a batch system's end) ends the run the same way, its pool closed (an allocation cancelled)."""
    write(tmp_path, "job.py", PROGRESS_JOB if to_group else MAP_JOB)
    journal = ["--journal", str(tmp_path / "journal")] if with_journal else []
    process = subprocess.Popen(
        [sys.executable, "-m", "batuta", "run", "job.py", "-w", "1", *journal],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for_line(process, "finished 3", RUN_TIMEOUT_S)
        if to_group:
            os.killpg(process.pid, sig)
        else:
            process.send_signal(sig)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 130, stderr
    note = stderr.rstrip().splitlines()
    assert len(note) == 1, stderr  # one line: no warning per cancelled task, no traceback
    finished = int(note[0].split("interrupted: ")[1].split(" of ")[0])
    total = int(note[0].split(" of ")[1].split(" tasks")[0])  # what was submitted: a map stopped
    assert 3 <= finished < total <= 400  # while it submits never submits the rest (pool.submit)
    assert note[0].startswith(
        f"batuta: interrupted: {finished} of {total} tasks finished, {total - finished} cancelled; "
    )
    if with_journal:
        resume = f"batuta run job.py --workers 1 --journal {tmp_path / 'journal'} --resume"
        assert note[0].endswith(f"to run only what is not done: {resume}")
    else:
        assert "with --journal DIR a run can be resumed (run batuta run job.py --workers 1 --journal DIR" in note[0]
    assert f"{total} tasks: {finished} succeeded, 0 failed, " in stdout
    if to_group:
        assert f"{total - finished} cancelled by the interrupt" in stdout


def _interrupted_summary(job: str) -> RunSummary:
    """A run of 10 tasks interrupted after 4: what `_interrupted_note` is told."""
    return RunSummary(
        job=job,
        tasks=10,
        succeeded=4,
        failed=0,
        cancelled=6,
        unfinished=0,
        wall_s=1.0,
        latency_s={},
        run_time_s={},
    )


def test_the_resume_hint_names_the_modules_the_run_shipped() -> None:
    """Run as printed without them, every task failed: 'unknown kernel' on every host."""
    import argparse

    from batuta.cli._run import _interrupted_note

    summary = _interrupted_summary("job.py")
    args = argparse.Namespace(job="job.py", cluster="c.toml", module=["lib/k.py", "pkg"], journal="j")
    note = _interrupted_note(summary, args)
    assert note.endswith(
        "to run only what is not done: batuta run job.py --cluster c.toml --module lib/k.py --module pkg "
        "--journal j --resume"
    )
    # the options that shape the tasks are named too: '--backend gpu' is in their keys
    tuned = argparse.Namespace(
        job="kmeans", cluster=None, module=None, journal="j", workers=2, backend="gpu", seed=None
    )
    assert _interrupted_note(summary, tuned).endswith(
        "to run only what is not done: batuta run kmeans --workers 2 --backend gpu --journal j --resume"
    )
    # a served run: its note is in its log, and the command it gives runs it served again
    served = argparse.Namespace(job="job.py", cluster=None, module=None, journal="j", serve=True, name="long")
    assert _interrupted_note(summary, served).endswith(
        "to run only what is not done: batuta run job.py --serve --name long --journal j --resume"
    )
    # served in the foreground (systemd) with metrics: --foreground and the scraped port kept
    kept = argparse.Namespace(
        job="job.py",
        cluster=None,
        module=None,
        journal="j",
        serve=True,
        name="long",
        foreground=True,
        serve_bind="0.0.0.0:7070",
        serve_certs="pki",
        metrics_port=9100,
        metrics_bind="0.0.0.0",
    )
    assert _interrupted_note(summary, kept).endswith(
        "to run only what is not done: batuta run job.py --serve --name long --foreground --serve-bind 0.0.0.0:7070 "
        "--serve-certs pki --metrics-port 9100 --metrics-bind 0.0.0.0 --journal j --resume"
    )
    local = argparse.Namespace(
        job="job.py", cluster=None, module=None, journal="j", metrics_port=9100, metrics_bind="127.0.0.1"
    )
    assert _interrupted_note(summary, local).endswith("batuta run job.py --metrics-port 9100 --journal j --resume")
    # batuta alloc: 'batuta run job.py ...' would run here, on no allocation
    alloc = argparse.Namespace(job="job.py", cluster=None, module=None, journal=None, kind="slurm")
    assert _interrupted_note(summary, alloc).endswith(
        "with --journal DIR (before any '--') the same 'batuta alloc' command can be resumed (--resume)"
    )


@pytest.mark.parametrize("journal", [True, False], ids=["journal", "no-journal"])
def test_the_resume_hint_runs_as_printed(journal: bool) -> None:
    """The hint, parsed back by a shell (shlex) and by batuta's own parser, is the interrupted
    run's command: every option it was given, a path with a space or a quote in it one word."""
    import shlex

    from batuta.cli import build_parser
    from batuta.cli._run import _interrupted_note

    summary = _interrupted_summary("my job.py")
    given = ["run", "my job.py", "--cluster", "my cluster.toml", "--module", "it's/k.py", "--seed", "7"]
    given += ["--backend", "cpu", "--metrics-port", "0", "--metrics-linger", "2.5", "--metrics-textfile", "m s.prom"]
    given += ["--log-file", "/tmp/a b/run.log", "--log-level", "info", "--log-format", "json", "--strict", "-q"]
    given += ["--serve", "--name", "long", "--serve-linger", "90", "--serve-bind", "127.0.0.1:7070"]
    given += ["--serve-certs", "my pki"] + (["--journal", "the journal"] if journal else [])
    args = build_parser().parse_args(given)
    note = _interrupted_note(summary, args)
    if journal:
        head, command = note.split("to run only what is not done: ")
        again = shlex.split(command)
    else:  # DIR stands for the user's choice: with one given, the command runs
        head, command = note.split("a run can be resumed (run ")
        assert command.endswith(" --journal DIR, then the same with --resume)")
        again = shlex.split(command.removesuffix(" --journal DIR, then the same with --resume)"))
        again += ["--journal", "the journal", "--resume"]
    assert head.startswith("batuta: interrupted: 4 of 10 tasks finished, 6 cancelled; ")
    assert again[0] == "batuta"
    expected = build_parser().parse_args([*given, *([] if journal else ["--journal", "the journal"]), "--resume"])
    assert vars(build_parser().parse_args(again[1:])) == vars(expected)


@needs_runtime
def test_progress_bar_draws_on_a_terminal(tmp_path: Path) -> None:
    """With stderr on a terminal (a pty here), rich draws the bar: done/total and failures."""
    from tests.support.terminal import read_pty

    write(tmp_path, "job.py", COUNTING_JOB.format(extra="pass"))
    env = {**_env(), "TERM": "xterm-256color", "COLUMNS": "120"}
    with read_pty() as (slave, chunks):
        done = subprocess.run(
            [sys.executable, "-m", "batuta", "run", "job.py", "-w", "2"],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=slave,
            text=True,
            timeout=RUN_TIMEOUT_S,
        )
    drawn = b"".join(chunks).decode(errors="replace")
    assert done.returncode == 0, drawn
    assert "9/9" in drawn
    assert "0 failed" in drawn
    assert "9 tasks: 9 succeeded, 0 failed" in done.stdout


AGENT_KILLING_JOB = """\
import psutil
from batuta import Task

def is_agent(proc):
    try:
        return "batuta.agent" in " ".join(proc.cmdline())
    except psutil.NoSuchProcess:  # a short-lived child that ended while asked
        return False

async def main(pool):
    assert (await pool.run(Task.kernel("noop", 1))).is_success()
    [agent] = [p for p in psutil.Process().children() if is_agent(p)]
    agent.kill()  # the local host is lost; the pool relaunches it and the job goes on
    values = await pool.map("noop", range(4))
    return len(values)
"""


@needs_runtime
def test_a_host_lost_during_the_run_is_in_the_summary_and_strict_fails_it(tmp_path: Path) -> None:
    write(tmp_path, "job.py", AGENT_KILLING_JOB)
    done = batuta("run", "job.py", "-w", "1", "--json", "--strict", cwd=tmp_path, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 1, done.stderr  # every task succeeded, but a host was lost
    summary = json.loads(done.stdout)
    # the job itself succeeded (ok); what the command exits with, --strict included, is exit_code
    assert (summary["result"], summary["failed"], summary["ok"], summary["exit_code"]) == (4, 0, True, 1)
    [local] = summary["hosts"]
    assert (local["host"], local["state"], local["losses"]) == ("local", "up", 1)
    assert local["reason"]  # why it was lost
    assert summary["hosts_failed"] == ["local"]
    relaxed = batuta(
        "run",
        "job.py",
        "-w",
        "1",
        "--log-file",
        "log.jsonl",
        "--log-format",
        "json",
        cwd=tmp_path,
        timeout=RUN_TIMEOUT_S,
    )
    assert relaxed.returncode == 0, relaxed.stderr
    [row] = [line for line in relaxed.stdout.splitlines() if line.startswith("local ")]
    assert "lost once, back up: " in row
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    [lost] = [r for r in records if r["message"].startswith("host local lost: ")]
    assert lost.get("host") == "local", lost  # `jq 'select(.host == "local")'` finds the loss itself


# -- a host refused on a real SSH cluster (network namespaces) ----------------------------


@needs_runtime
def test_a_refused_host_is_in_the_summary_and_strict_fails_the_run(
    tmp_path: Path, ssh_hosts: Callable[..., TestHosts]
) -> None:
    """host0 healthy; host1's host key changed (a machine in the middle, maybe): the run
    succeeds on host0 alone, the summary names host1 and why, and --strict exits 1."""
    hosts = ssh_hosts(2)
    hosts[1].regenerate_host_key()  # known_hosts keeps the old key
    write(tmp_path, "job.py", COUNTING_JOB.format(extra="pass"))
    (tmp_path / "cluster.toml").write_text(
        textwrap.dedent(
            f"""\
            [defaults]
            python = "{sys.executable}"
            gpus = "none"
            slots = 2
            env = {{ PYTHONPATH = "{REPO_ROOT}" }}

            [ssh]
            known_hosts = "{hosts.known_hosts}"
            config = "{hosts.ssh_config}"
            connect_timeout = 5

            [[hosts]]
            address = "host0"

            [[hosts]]
            address = "host1"
            """
        )
    )
    done = batuta("run", "job.py", "-c", "cluster.toml", "--json", cwd=tmp_path, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr  # the work itself succeeded
    summary = json.loads(done.stdout)
    assert (summary["succeeded"], summary["failed"]) == (9, 0)
    hosts_by_name = {h["host"]: h for h in summary["hosts"]}
    assert (hosts_by_name["host0"]["state"], hosts_by_name["host0"]["tasks"]) == ("up", 9)
    refused = hosts_by_name["host1"]
    assert (refused["state"], refused["tasks"]) == ("retired", 0)
    assert "HOST KEY CHANGED" in refused["reason"] and "machine in the middle" in refused["reason"]
    assert summary["hosts_failed"] == ["host1"]

    quiet = batuta("run", "job.py", "-c", "cluster.toml", "-q", cwd=tmp_path, timeout=RUN_TIMEOUT_S)
    assert quiet.returncode == 0, quiet.stderr
    said = [line for line in quiet.stderr.splitlines() if "HOST KEY CHANGED" in line]
    assert len(said) == 1 and said[0].startswith("batuta: host host1 retired: "), quiet.stderr  # once, not logged too
    plain = batuta("run", "job.py", "-c", "cluster.toml", cwd=tmp_path, timeout=RUN_TIMEOUT_S)
    # said when it happens (a long run's summary comes late), and in the summary's row
    assert plain.stderr.count("HOST KEY CHANGED") == 1 and "HOST KEY CHANGED" in plain.stdout, plain.stderr

    strict = batuta("run", "job.py", "-c", "cluster.toml", "--strict", cwd=tmp_path, timeout=RUN_TIMEOUT_S)
    assert strict.returncode == 1, strict.stderr
    [row] = [line for line in strict.stdout.splitlines() if line.startswith("host1 ")]
    assert row.split()[1:3] == ["0", "0"] and "retired: host host1" in row and "HOST KEY CHANGED" in row
    assert (
        strict.stderr.splitlines()[-1] == "batuta: --strict: exit 1, as host(s) host1 failed during the run (see above)"
    )


def test_a_job_that_raises_with_work_in_flight_closes_the_pool_without_a_traceback(tmp_path: Path) -> None:
    """Closing used to resolve pending tasks behind the scheduler's back, and the next result
    crashed the host reader ('reader failed ... KeyError') every time a job was interrupted."""
    job = write(
        tmp_path,
        "raises.py",
        """
        from batuta import Task


        async def main(pool):
            futures = [await pool.submit(Task.kernel("noop", i)) for i in range(20_000)]
            await futures[100]  # results are streaming in
            raise RuntimeError("the job gave up")
        """,
    )
    done = batuta("run", str(job), "--workers", "2", cwd=tmp_path, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "raised RuntimeError: the job gave up" in done.stderr
    assert "reader failed" not in done.stderr and "KeyError" not in done.stderr, done.stderr
    assert done.stderr.count("Traceback") == 1  # the job's own, the author's best clue


@pytest.mark.parametrize(
    ("flags", "shown"),
    [([], True), (["--quiet"], False), (["--log-format", "json"], False), (["--log-level", "info"], False)],
    ids=["default", "quiet", "json-logs", "info-level"],
)
def test_what_a_run_waits_on_is_said_on_stderr_at_the_default_level(
    flags: list[str], shown: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """A queued allocation or a host installing batuta said nothing for minutes at the
    console's level (warnings); their info lines are shown as 'batuta: ...' (at info level
    the log shows them itself, once)."""
    import logging

    from batuta.cli import build_parser
    from batuta.cli._run import NEWS_LOGGERS, _configure_logging

    close = _configure_logging(build_parser().parse_args(["run", "demo", *flags]))
    try:
        for name in NEWS_LOGGERS:
            logging.getLogger(name).info("news from %s", name.rsplit(".", 1)[1])
        logging.getLogger("batuta.runtime.pool").info("not news")
        # a warning among them is said in their voice, not as a timestamped log line between them
        logging.getLogger(NEWS_LOGGERS[0]).warning("job 7 is PENDING")
    finally:
        close()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("batuta: ")]
    news = ["batuta: news from allocation", "batuta: news from install", "batuta: warning: job 7 is PENDING"]
    assert lines == (news if shown else [])
    if flags != ["--quiet"]:  # the warning, once: in the news' voice, or in the log's where news is off
        assert err.count("job 7 is PENDING") == 1, err
    assert logging.getLogger(NEWS_LOGGERS[0]).level == logging.NOTSET  # undone


def test_news_warnings_hold_to_the_log_level_and_the_log_file_keeps_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import logging

    from batuta.cli import build_parser
    from batuta.cli._run import NEWS_LOGGERS, _configure_logging

    log = tmp_path / "run.log"
    close = _configure_logging(
        build_parser().parse_args(["run", "demo", "--log-level", "error", "--log-file", str(log)])
    )
    try:
        logging.getLogger(NEWS_LOGGERS[0]).warning("job 7 is PENDING")  # below --log-level: not said
        logging.getLogger(NEWS_LOGGERS[0]).error("job 7 ended")
    finally:
        close()
    assert capsys.readouterr().err.splitlines() == ["batuta: error: job 7 ended"]
    assert " ERROR batuta.runtime.allocation: job 7 ended" in log.read_text()


def test_a_job_refilling_a_buffer_its_task_holds_is_told_why_it_is_read_only(tmp_path: Path) -> None:
    """The job's traceback ended in NumPy's bare "assignment destination is read-only"."""
    write(
        tmp_path,
        "job.py",
        """\
        import numpy as np
        from batuta import Task

        async def main(pool):
            buf = np.zeros(300_000)
            await pool.submit(Task.kernel("sum", buf))
            buf[:] = 1.0
        """,
    )
    done = batuta("run", "job.py", "--workers", "1", "-q", cwd=tmp_path, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 1, done.stderr
    assert (
        "ValueError: assignment destination is read-only\nbatuta: an array of over 1 MiB given to a task" in done.stderr
    )
    assert "submit buf.copy() or fill a new array each time" in done.stderr
