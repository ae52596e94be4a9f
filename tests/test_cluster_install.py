"""`batuta cluster install` and `bootstrap = true` on real SSH hosts (network namespaces).

Each host gets its own cache folder through the cluster file's `env` (XDG_CACHE_HOME) and a
PATH whose `python3` has no batuta, so nothing is found by accident on the shared file
system. The namespaces cannot reach the package index, so every install here takes the
offline path: the coordinator downloads a wheelhouse (once per session, into a session
folder used as its cache) and pushes it over SFTP.

    host0  /usr/bin/python3 (or a fresh venv without batuta): install, a task, install again
    host1  the same Python: an install killed while pip runs, then run again
    host2  another Python minor (3.12 from pyenv, if this machine has it): bootstrap = true
    host0  again, with `index_url` naming a simple index that a `python -m http.server` serves
           from the coordinator's wheelhouse on the root side of host0's link: the index path
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import re
import select
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from batuta._version import __version__
from batuta.core.task import Task
from batuta.runtime import events as pe
from batuta.runtime import wheels
from batuta.runtime.cluster import build_pool, load_cluster
from batuta.runtime.install import MARKER
from tests.support.conftest_hosts import require_test_hosts
from tests.support.hosts import TestHosts

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO_ROOT = Path(__file__).resolve().parent.parent
RUN_TIMEOUT_S = 300
OTHER_MINORS = ("3.12", "3.13")


def lacks_batuta(python: Path) -> bool:
    """`python` cannot import batuta (asked from / with no PYTHONPATH, as an SSH session would)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(python), "-c", "import batuta"], capture_output=True, timeout=60, cwd="/", env=env)
    return done.returncode != 0


def without_batuta(python: Path, folder: Path) -> Path:
    """`python` itself when it has no batuta, else a fresh venv of it (which has none)."""
    if lacks_batuta(python):
        return python
    venv = folder / f"bare-{python.name}"
    subprocess.run([str(python), "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    assert lacks_batuta(venv / "bin" / "python3")
    return venv / "bin" / "python3"


def bare_python(folder: Path) -> Path:
    """A Python 3.11+ with no batuta: /usr/bin/python3 if it is one, else one made from ours."""
    system = Path("/usr/bin/python3")
    if system.exists():
        check = subprocess.run([str(system), "-c", "import sys; print(sys.version_info >= (3, 11))"], **_text())
        if check.stdout.strip() == "True":
            return without_batuta(system, folder)
    return without_batuta(Path(sys.executable), folder)


def other_minor_python(folder: Path) -> Path | None:
    """A CPython of another minor than ours (pyenv's or Debian's) without batuta, or None."""
    ours = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for minor in OTHER_MINORS:
        if minor == ours:
            continue
        # real interpreters only: a pyenv shim picks its version by pyenv's own settings
        found = sorted(Path("/root/.pyenv/versions").glob(f"{minor}.*/bin/python{minor}"))
        found += [Path(f"/usr/bin/python{minor}"), Path(f"/usr/local/bin/python{minor}")]
        for path in found:
            if path.exists():
                return without_batuta(path, folder)
    return None


def _text() -> dict[str, Any]:
    return {"capture_output": True, "text": True, "timeout": 120}


@pytest.fixture(scope="session")
def coordinator_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The coordinator's XDG_CACHE_HOME for this session: batuta's wheel, pip's and the
    wheelhouse for the bare Python are built here once, and every test reuses them."""
    home = tmp_path_factory.mktemp("coordinator-cache")
    return home


@pytest.fixture(scope="module")
def hosts() -> Iterator[TestHosts]:
    require_test_hosts()
    with TestHosts(3) as run:
        yield run


def host_bin(folder: Path, python: Path) -> Path:
    """A folder holding only `python3` -> `python`: the host's PATH starts there."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "python3").symlink_to(python)
    return folder


def write_cluster(
    path: Path, hosts: TestHosts, index: int, python: Path, cache: Path, extra: str = "", env: str = ""
) -> Path:
    """One host of `hosts`, whose python3 is `python` and whose cache folder is `cache`; `extra`
    goes into [defaults], `env` (", NAME = \"value\"") into the host's environment."""
    bin_dir = host_bin(path.parent / f"bin{index}", python)
    host = hosts[index]
    path.write_text(
        textwrap.dedent(
            f"""\
            [defaults]
            gpus = "none"
            slots = 1
            user = "root"
            identity_file = "{hosts.identity_file}"
            {extra}

            [[hosts]]
            name = "h{index}"
            address = "{host.address}"
            env = {{ XDG_CACHE_HOME = "{cache}", PATH = "{bin_dir}:/usr/bin:/bin"{env} }}

            [ssh]
            known_hosts = "{hosts.known_hosts}"
            config = false
            """
        )
    )
    return path


def coordinator_env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env["XDG_CACHE_HOME"] = str(cache)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


def install(cluster: Path, cache: Path) -> tuple[int, dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-m", "batuta", "cluster", "install", "-c", str(cluster), "--json"],
        env=coordinator_env(cache),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )
    assert done.stdout.strip(), done.stderr
    return done.returncode, json.loads(done.stdout)


def python_version(python: Path) -> str:
    done = subprocess.run([str(python), "-c", "import platform; print(platform.python_version())"], **_text())
    return done.stdout.strip()


def venv_of(cache: Path, python: Path) -> Path:
    minor = subprocess.run([str(python), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], **_text())
    return cache / "batuta" / "venv" / f"{__version__}-py{minor.stdout.strip()}"


async def run_vadd(cluster: Path) -> tuple[str, str, list[float]]:
    """Start a pool over the file, run one task; (host that ran it, the Python its agent
    said hello with, the value)."""
    pool = build_pool(load_cluster(cluster))
    pythons: list[str] = []
    pool.subscribe(lambda event: pythons.append(event.python_version) if isinstance(event, pe.HostUp) else None)
    async with pool:
        a = np.arange(4.0)
        result = await pool.run(Task.kernel("vadd", a, a))
        assert result.is_success(), result.describe_failure()
        (python,) = pythons
        return str(result.host), python, [float(v) for v in result.value]


def test_a_bare_host_gets_batuta_from_the_wheelhouse_runs_a_task_and_a_second_install_does_nothing(
    hosts: TestHosts, coordinator_cache: Path, tmp_path: Path
) -> None:
    python = bare_python(tmp_path)
    cache = tmp_path / "host0-cache"
    cluster = write_cluster(tmp_path / "cluster.toml", hosts, 0, python, cache)

    code, report = install(cluster, coordinator_cache)
    assert code == 0, [h.get("error") for h in report["hosts"]]
    (host,) = report["hosts"]
    venv = venv_of(cache, python)
    assert (host["host"], host["ok"], host["path"]) == ("h0", True, "wheelhouse")
    assert host["venv_python"] == f"{venv}/bin/python"
    assert "the package index cannot give this host msgpack==" in host["note"]
    assert host["pushed_bytes"] > 0
    assert json.loads((venv / MARKER).read_text())["batuta"] == __version__
    assert not (cache / "batuta" / "wheels").exists() or not any((cache / "batuta" / "wheels").iterdir())

    # the agent runs from the new environment: python defaults to it
    ran_on, agent_python, value = asyncio.run(run_vadd(cluster))
    assert (ran_on, value) == ("h0", [0.0, 2.0, 4.0, 6.0])
    assert agent_python == python_version(python)

    marker_stamp = (venv / MARKER).stat().st_mtime_ns
    code, again = install(cluster, coordinator_cache)
    assert code == 0, again
    (host,) = again["hosts"]
    assert (host["ok"], host["path"], host["pushed_bytes"]) == (True, "already", 0)
    assert (venv / MARKER).stat().st_mtime_ns == marker_stamp


def test_two_hosts_sharing_a_home_folder_install_into_it_at_once(
    hosts: TestHosts, coordinator_cache: Path, tmp_path: Path
) -> None:
    """As on a cluster whose home folders are one NFS export: both hosts copy the same wheels
    into the same folder at once. A shared `NAME.part` was renamed away under the slower copy
    ('copying files to ... failed: No such file'), failing one host of two on every cold run."""
    python = bare_python(tmp_path)
    cache = tmp_path / "shared-cache"
    first = write_cluster(tmp_path / "h0.toml", hosts, 0, python, cache).read_text()
    second = write_cluster(tmp_path / "h1.toml", hosts, 1, python, cache).read_text()
    both = first + second[second.index("[[hosts]]") : second.index("[ssh]")]
    cluster = tmp_path / "cluster.toml"
    cluster.write_text(both)

    code, report = install(cluster, coordinator_cache)
    assert code == 0, [h.get("error") for h in report["hosts"]]
    assert sorted((h["host"], h["ok"]) for h in report["hosts"]) == [("h0", True), ("h1", True)]
    assert {h["path"] for h in report["hosts"]} <= {"wheelhouse", "already"}
    venv = venv_of(cache, python)
    assert json.loads((venv / MARKER).read_text())["batuta"] == __version__
    leftovers = sorted(p.name for p in cache.rglob("*") if ".part" in p.name)
    assert leftovers == []


def test_an_install_killed_while_pip_runs_is_redone_without_pushing_again(
    hosts: TestHosts, coordinator_cache: Path, tmp_path: Path
) -> None:
    python = bare_python(tmp_path)
    cache = tmp_path / "host1-cache"
    cluster = write_cluster(tmp_path / "cluster.toml", hosts, 1, python, cache)
    command = [sys.executable, "-m", "batuta", "cluster", "install", "-c", str(cluster)]
    first = subprocess.Popen(
        command, env=coordinator_env(coordinator_cache), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    seen: list[str] = []
    try:
        assert first.stdout is not None
        for line in first.stdout:  # ends at the step we wait for, or when the command exits
            seen.append(line.rstrip())
            if line.startswith("h1: pip from the wheelhouse"):
                break
        assert seen and seen[-1].startswith("h1: pip from the wheelhouse"), seen
        os.kill(first.pid, signal.SIGKILL)
    finally:
        first.kill()
        first.wait(timeout=30)
        if first.stdout is not None:
            first.stdout.close()
    venv = venv_of(cache, python)
    assert (venv / "bin").is_dir() and not (venv / MARKER).exists()  # half-made: killed before it could finish

    code, report = install(cluster, coordinator_cache)
    assert code == 0, report
    (host,) = report["hosts"]
    assert (host["ok"], host["path"]) == (True, "wheelhouse")
    assert host["pushed_bytes"] == 0  # every wheel was already there
    assert json.loads((venv / MARKER).read_text())["batuta"] == __version__
    done = subprocess.run([f"{venv}/bin/python", "-c", "import batuta.agent.main, numba; print('ok')"], **_text())
    assert done.stdout.strip() == "ok", done.stderr


def test_a_host_on_another_python_minor_is_bootstrapped_on_connect_and_runs_tasks(
    hosts: TestHosts, coordinator_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    python = other_minor_python(tmp_path)
    if python is None:
        pytest.skip(f"no CPython {' or '.join(OTHER_MINORS)} on this machine (pyenv's or Debian's)")
    cache = tmp_path / "host2-cache"
    cluster = write_cluster(tmp_path / "cluster.toml", hosts, 2, python, cache, extra="bootstrap = true")
    monkeypatch.setenv("XDG_CACHE_HOME", str(coordinator_cache))
    assert wheels.cache_dir() == coordinator_cache / "batuta"

    ran_on, agent_python, value = asyncio.run(run_vadd(cluster))
    assert (ran_on, value) == ("h2", [0.0, 2.0, 4.0, 6.0])
    assert agent_python == python_version(python) != platform.python_version()
    venv = venv_of(cache, python)
    marker_stamp = (venv / MARKER).stat().st_mtime_ns
    ours = f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert not venv.name.endswith(f"-py{ours}")  # the host's own minor, not the coordinator's

    # connecting again finds it installed and leaves it alone
    ran_on, _, value = asyncio.run(run_vadd(cluster))
    assert ran_on == "h2"
    assert (venv / MARKER).stat().st_mtime_ns == marker_stamp


# -- the package-index path -------------------------------------------------------------------

SERVER_START_TIMEOUT_S = 30.0


def simple_index(root: Path, files: list[Path]) -> Path:
    """A PEP 503 simple index of the wheels `files`: `root/simple/<project>/<wheel>`, whose
    folder listing (http.server's) is the page of links pip reads for a project."""
    for wheel in files:
        folder = root / "simple" / wheels.normalized(wheel.name.split("-")[0])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / wheel.name).symlink_to(wheel)
    return root


@contextlib.contextmanager
def http_server(folder: Path, address: str, access_log: list[str]) -> Iterator[int]:
    """`python -m http.server` serving `folder` on `address` (an ephemeral port, yielded);
    stopped by its PID after, its access log (stderr) appended to `access_log`."""
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "0", "--bind", address, "--directory", str(folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=folder,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], SERVER_START_TIMEOUT_S)
        line = proc.stdout.readline() if ready else ""
        found = re.search(r" port (\d+) ", line)
        assert found, f"http.server did not say where it listens: {line!r}"
        yield int(found.group(1))
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            _, err = proc.communicate(timeout=30)
        access_log.extend(err.splitlines())


def test_a_host_that_reaches_a_package_index_installs_from_it_not_from_a_pushed_wheelhouse(
    hosts: TestHosts, coordinator_cache: Path, tmp_path: Path
) -> None:
    python = bare_python(tmp_path)
    facts = subprocess.run(
        [
            str(python),
            "-c",
            "import os, platform, sys; print('%d.%d' % sys.version_info[:2], "
            "os.confstr('CS_GNU_LIBC_VERSION').split()[1], platform.machine())",
        ],
        **_text(),
    ).stdout.split()
    release = wheels.current_release()
    house = asyncio.run(wheels.wheelhouse(release, facts[0], facts[1], facts[2], coordinator_cache / "batuta"))
    served = wheels.wheel_files(house)
    index = simple_index(tmp_path / "index", served)
    cache = tmp_path / "host0-index-cache"
    access_log: list[str] = []
    with http_server(index, hosts[0].root_address, access_log) as port:
        url = f"http://{hosts[0].root_address}:{port}/simple/"
        # the hosts share this machine's files: its pip configuration (find-links, local
        # mirrors) and pip's cache would answer for wheels the index must serve
        no_cache = ', PIP_NO_CACHE_DIR = "1", PIP_CONFIG_FILE = "/dev/null"'
        cluster = write_cluster(
            tmp_path / "cluster.toml", hosts, 0, python, cache, extra=f'index_url = "{url}"', env=no_cache
        )
        code, report = install(cluster, coordinator_cache)
    assert code == 0, [h.get("error") for h in report["hosts"]]
    (host,) = report["hosts"]
    assert (host["ok"], host["path"], host["note"]) == (True, "index", None)
    base = [
        asyncio.run(wheels.batuta_wheel(release, coordinator_cache / "batuta")),
        wheels.pip_wheel(coordinator_cache / "batuta"),
    ]
    assert host["pushed_bytes"] == sum(p.stat().st_size for p in base)  # batuta and pip only: no wheelhouse
    fetched = {
        m.group(1) for line in access_log if (m := re.search(r'"GET /simple/[^/]+/([^ ]+\.whl) HTTP/[\d.]+" 200', line))
    }
    assert fetched == {wheel.name for wheel in served}, "\n".join(access_log)  # every dependency came from the index
    venv = venv_of(cache, python)
    assert json.loads((venv / MARKER).read_text())["batuta"] == __version__
    done = subprocess.run([f"{venv}/bin/python", "-c", "import batuta.agent.main, numba; print('ok')"], **_text())
    assert done.stdout.strip() == "ok", done.stderr


def test_a_host_whose_python3_is_too_old_is_retired_at_once_beside_a_host_that_runs(
    hosts: TestHosts, coordinator_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bootstrap = true on a host whose python3 is 3.9: it was shown "unreachable" and relaunched
    every few seconds for 2.5 minutes, each time meeting the same python3 (`batuta cluster
    status` already called it unusable)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(coordinator_cache))  # this session's built wheel
    old = tmp_path / "python3.9"  # a python3 that says it is 3.9, to the install's probe
    old.write_text(
        "#!/bin/sh\n"
        f'exec {sys.executable} -c \'import platform, sys; platform.python_version = lambda: "3.9.18"; '
        'sys.argv = sys.argv[1:]; exec(compile(sys.stdin.read(), "<probe>", "exec"))\' "$@"\n'
    )
    old.chmod(0o755)
    bin_dir = host_bin(tmp_path / "bin", old)
    cluster = tmp_path / "cluster.toml"
    cluster.write_text(
        textwrap.dedent(
            f"""\
            [defaults]
            gpus = "none"
            slots = 1
            user = "root"
            identity_file = "{hosts.identity_file}"

            [[hosts]]
            name = "fine"
            address = "{hosts[0].address}"
            python = "{sys.executable}"

            [[hosts]]
            name = "old"
            address = "{hosts[1].address}"
            bootstrap = true
            env = {{ XDG_CACHE_HOME = "{tmp_path / "cache"}", PATH = "{bin_dir}:/usr/bin:/bin" }}

            [ssh]
            known_hosts = "{hosts.known_hosts}"
            config = false

            [pool]
            start_wait = inf
            """
        )
    )
    changes: list[pe.HostStateChanged] = []
    pool = build_pool(load_cluster(cluster))
    pool.subscribe(lambda e: changes.append(e) if isinstance(e, pe.HostStateChanged) and e.host == "old" else None)

    async def run() -> dict[str, str]:
        async with asyncio.timeout(RUN_TIMEOUT_S), pool:  # start_wait = inf: each host up or failed
            states = {v.name: v.state for v in pool.hosts()}
            assert (await pool.run(Task.kernel("noop", 1))).value == 1
            return states

    assert asyncio.run(run()) == {"fine": "up", "old": "retired"}
    assert [e.state for e in changes][:1] == ["retired"]  # never "unreachable", never relaunched
    assert changes[0].reason.startswith("host old: python3 there is Python 3.9.18; batuta needs 3.11 or newer")


def test_a_cache_folder_the_host_cannot_write_is_named_with_its_cause(
    hosts: TestHosts, coordinator_cache: Path, tmp_path: Path
) -> None:
    """A read-only cache said "copying files to ... failed: .../batuta is not a directory":
    SFTP says only "Failure", which asyncssh's makedirs reports so."""
    python = bare_python(tmp_path)
    cache = Path("/sys/batuta-test-cache")  # sysfs: no folder can be made there, not even by root
    cluster = write_cluster(tmp_path / "cluster.toml", hosts, 0, python, cache)
    code, report = install(cluster, coordinator_cache)
    assert code == 1
    (host,) = report["hosts"]
    error = host["error"]
    assert "is not a directory" not in error and "No such file" not in error, error
    assert f"cannot create {cache}/batuta/" in error and "/sys/batuta-test-cache" in error, error
    assert error.endswith("point XDG_CACHE_HOME at a writable folder in the host's env (the cluster file's env = { "
                          'XDG_CACHE_HOME = "..." }), or make its home writable'), error  # fmt: skip


def test_an_index_without_the_packages_is_not_only_called_unreachable(
    hosts: TestHosts, coordinator_cache: Path, tmp_path: Path
) -> None:
    """pip reached the index, which lacked a package: the note said only that the index was not reachable."""
    python = bare_python(tmp_path)
    index = simple_index(tmp_path / "index", [])
    (index / "simple").mkdir(parents=True)  # an index with no project at all
    with http_server(index, hosts[1].root_address, []) as port:
        url = f"http://{hosts[1].root_address}:{port}/simple/"
        no_cache = ', PIP_NO_CACHE_DIR = "1", PIP_CONFIG_FILE = "/dev/null"'
        cluster = write_cluster(
            tmp_path / "cluster.toml", hosts, 1, python, tmp_path / "cache", extra=f'index_url = "{url}"', env=no_cache
        )
        code, report = install(cluster, coordinator_cache)
    assert code == 0, [h.get("error") for h in report["hosts"]]
    (host,) = report["hosts"]
    assert (host["ok"], host["path"]) == (True, "wheelhouse")  # it falls back, as for an unreachable one
    assert host["note"].startswith("the package index cannot give this host msgpack=="), host["note"]
    assert ": not reachable from it, or without it (pip: " in host["note"]
