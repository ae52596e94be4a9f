"""`batuta stack` against real SSH hosts (network namespaces), some broken on purpose.

One set of five hosts serves the whole module (tests/support/hosts.py):

    host0  healthy
    host1  its `python` is a wrapper whose batuta calls itself 0.0.9
    host2  `import numba` fails there (a numba.py that raises, first on its PYTHONPATH)
    host3  its host key changed since known_hosts was written
    host4  its link is cut; [ssh] connect_timeout is short, so it times out quickly

and one more node, host0 again but with a `python` that does not exist there.

Each must be reported as itself, on the right node, with the right exit code; the healthy
cluster (host0 plus the coordinator's own local agent) must pass the gate.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batuta._version import __version__
from tests.support.conftest_hosts import require_test_hosts
from tests.support.hosts import TestHosts

REPO_ROOT = Path(__file__).resolve().parent.parent
RUN_TIMEOUT_S = 120
OLD_VERSION = "0.0.9"


def write_cluster(path: Path, hosts: TestHosts, body: str) -> Path:
    path.write_text(
        textwrap.dedent(
            f"""\
            [defaults]
            python = "{sys.executable}"
            gpus = "none"
            env = {{ PYTHONPATH = "{REPO_ROOT}" }}

            [ssh]
            known_hosts = "{hosts.known_hosts}"
            config = "{hosts.ssh_config}"
            connect_timeout = 1.5
            """
        )
        + textwrap.dedent(body)
    )
    return path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """The hosts, broken as the module docstring says, and two cluster files over them."""
    require_test_hosts()
    folder = tmp_path_factory.mktemp("stack")
    old_batuta = folder / "python-old-batuta"
    old_batuta.write_text(
        textwrap.dedent(
            f"""\
            #!/bin/sh
            # batuta test: a Python whose batuta calls itself {OLD_VERSION}. It is started as
            # "<this> -P -m batuta.agent ARGS": drop what comes before ARGS, run the agent patched.
            while [ $# -gt 0 ] && [ "$1" != batuta.agent ]; do shift; done
            shift
            exec {sys.executable} -c 'import runpy, batuta._version as v; v.__version__ = "{OLD_VERSION}"; \\
            runpy.run_module("batuta.agent", run_name="__main__", alter_sys=True)' "$@"
            """
        )
    )
    old_batuta.chmod(0o755)
    no_numba = folder / "no-numba"
    no_numba.mkdir()
    (no_numba / "numba.py").write_text('raise ImportError("numba is broken on this host on purpose (batuta test)")\n')
    with TestHosts(5) as hosts:
        hosts[3].regenerate_host_key()  # known_hosts keeps the old key
        hosts[4].cut_link()
        broken = write_cluster(
            folder / "broken.toml",
            hosts,
            f"""
            [[hosts]]
            address = "host0"

            [[hosts]]
            address = "host1"
            python = "{old_batuta}"

            [[hosts]]
            address = "host2"
            env = {{ PYTHONPATH = "{no_numba}:{REPO_ROOT}" }}

            [[hosts]]
            address = "host3"

            [[hosts]]
            address = "host4"

            [[hosts]]
            name = "host0-no-python"
            address = "host0"
            python = "/nonexistent/bin/python3"
            """,
        )
        healthy = write_cluster(
            folder / "healthy.toml",
            hosts,
            """
            [local]
            name = "coordinator-host"

            [[hosts]]
            address = "host0"

            [policy]
            batuta = "exact"
            numba = "minor"
            numpy = "major"
            min_free_disk_gb = 0.5
            """,
        )
        yield {"broken": broken, "healthy": healthy}


def stack(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "batuta", "stack", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )


def nodes_of(stdout: str) -> dict[str, dict[str, Any]]:
    return {node["name"]: node for node in json.loads(stdout)["nodes"]}


def findings_of(node: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["check"]: f for f in node["findings"]}


def test_check_reports_each_broken_host_as_itself(cluster: dict[str, Path]) -> None:
    done = stack("check", "--cluster", str(cluster["broken"]), "--format", "json")
    assert done.returncode == 1, done.stdout + done.stderr
    nodes = nodes_of(done.stdout)  # all of stdout is the JSON object
    assert list(nodes) == ["host0", "host1", "host2", "host3", "host4", "host0-no-python"]

    assert nodes["host0"]["severity"] == "healthy"
    ssh = findings_of(nodes["host0"])["ssh"]
    assert ssh["message"].startswith("reachable, host key verified; connected in ")
    assert 0 < nodes["host0"]["connect_s"] < nodes["host0"]["ready_s"]

    host1 = findings_of(nodes["host1"])
    assert host1["batuta"]["severity"] == "error"
    assert host1["batuta"]["message"].startswith(f"batuta {OLD_VERSION}, the coordinator {__version__}")
    assert f"then batuta cluster install --cluster {cluster['broken']}" in host1["batuta"]["suggestion"]
    assert "pip install" not in host1["batuta"]["suggestion"]
    assert {c for c, f in host1.items() if f["severity"] != "healthy"} == {"batuta"}

    host2 = findings_of(nodes["host2"])
    assert host2["numba"]["severity"] == "error"
    assert "ImportError: numba is broken on this host on purpose" in host2["numba"]["message"]
    assert "pip install 'numba==" in host2["numba"]["suggestion"]
    assert {c for c, f in host2.items() if f["severity"] != "healthy"} == {"numba"}

    (host3,) = nodes["host3"]["findings"]
    assert not nodes["host3"]["reachable"]
    assert (host3["check"], host3["severity"]) == ("ssh", "error")
    assert "HOST KEY CHANGED" in host3["message"] and "reinstalled" in host3["suggestion"]
    known_hosts = tomllib.loads(cluster["broken"].read_text())["ssh"]["known_hosts"]
    assert re.search(
        rf"remove its old key with `ssh-keygen -R '[\d.]+' -f {re.escape(known_hosts)}`", host3["suggestion"]
    )

    (host4,) = nodes["host4"]["findings"]
    assert not nodes["host4"]["reachable"]
    assert (host4["check"], host4["severity"]) == ("ssh", "error")
    assert host4["message"].startswith("unreachable: ") and "within 1.5s" in host4["message"]

    (no_python,) = nodes["host0-no-python"]["findings"]
    assert (no_python["check"], no_python["severity"]) == ("agent", "error")
    assert "No such file" in no_python["message"]
    assert no_python["message"].count("/nonexistent/bin/python3") == 1  # the agent's line, said once
    assert "/nonexistent/bin/python3 -m batuta version" in no_python["suggestion"]


def test_check_text_names_each_problem_without_colour(cluster: dict[str, Path]) -> None:
    done = stack("check", "-c", str(cluster["broken"]))
    assert done.returncode == 1
    text = done.stdout
    assert "\x1b[" not in text  # not a terminal
    assert text.splitlines()[-1] == "check: FAIL: 5 errors on 5 of 6 node(s)"
    assert f"  error  batuta  batuta {OLD_VERSION}, the coordinator {__version__}" in text
    assert "  error  numba   numba cannot compile and run a kernel: ImportError" in text
    assert "  error  ssh  host host3" in text and "HOST KEY CHANGED" in text
    assert "  error  ssh  unreachable: host host4" in text
    assert "-> " in text  # suggestions


def test_versions_matrix_marks_differences_and_fails_on_unreachable(cluster: dict[str, Path]) -> None:
    done = stack("versions", "-c", str(cluster["broken"]))
    assert done.returncode == 1, done.stdout + done.stderr  # host3, host4 and host0-no-python cannot be reached
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line.strip()}
    assert rows["COMPONENT"][:7] == ["COMPONENT", "coordinator", "host0", "host1", "host2", "host3", "host4"]
    assert rows["batuta"] == ["batuta", __version__, __version__, OLD_VERSION, "*", __version__, "?", "?", "?"]
    assert rows["numpy"][5:] == ["?", "?", "?"] and len(set(rows["numpy"][1:5])) == 1
    assert "* differs from the coordinator" in done.stdout
    assert done.stdout.splitlines()[-1] == "versions: FAIL: 3 of 6 nodes unreachable (host3, host4, host0-no-python)"


def test_gate_fails_the_broken_cluster_for_the_right_reasons(cluster: dict[str, Path]) -> None:
    done = stack("gate", "-c", str(cluster["broken"]), "--format", "json")
    assert done.returncode == 1, done.stdout + done.stderr
    data = json.loads(done.stdout)
    assert data["verdict"] == "fail"
    nodes = nodes_of(done.stdout)
    assert nodes["host0"]["severity"] == "healthy"
    policy = [f for f in nodes["host1"]["findings"] if f["check"] == "policy"]
    assert [f["severity"] for f in policy] == ["error"]
    assert policy[0]["message"] == (
        f'batuta {OLD_VERSION}, the coordinator {__version__}: [policy] batuta = "exact" wants exactly {__version__}'
    )
    host2 = findings_of(nodes["host2"])
    assert host2["kernels scalar"]["severity"] == "healthy"  # NumPy works there
    assert host2["kernels cpu"]["severity"] == "error" and "ImportError" in host2["kernels cpu"]["message"]
    cpu_results = {k["kernel"]: k["status"] for k in nodes["host2"]["kernels"] if k["backend"] == "cpu"}
    assert cpu_results["vadd"] == "error"
    quiet = stack("gate", "-c", str(cluster["broken"]), "--quiet")
    assert quiet.returncode == 1 and quiet.stdout.count("\n") == 1 and quiet.stdout.startswith("gate: FAIL: ")


def test_gate_passes_the_healthy_cluster(cluster: dict[str, Path]) -> None:
    done = stack("gate", "-c", str(cluster["healthy"]))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "gate: PASS: 2 node(s) healthy"
    assert any(line.startswith("coordinator-host  healthy") for line in lines)
    assert any(line.startswith("host0  healthy") for line in lines)
    assert (
        "versions within policy (batuta exact, python major, numpy major, numba minor, llvmlite minor)" in done.stdout
    )
    assert "skipped: no GPU slots on this node" in done.stdout
    markdown = stack("check", "-c", str(cluster["healthy"]), "--format", "markdown")
    assert markdown.returncode == 0
    assert "| host0 | ssh | ✅ healthy | reachable, host key verified; connected in " in markdown.stdout
