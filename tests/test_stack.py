"""`batuta stack versions | check | gate` without SSH: the pieces in process, and the command on
the embedded local agent (no cluster file) as a real process.

The same commands against namespace hosts broken on purpose are in tests/test_stack_hosts.py.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pty
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from batuta._version import __version__
from batuta.core.task import TaskResult, TaskStatus
from batuta.errors import AgentError, ConfigError, HostUnusableError
from batuta.protocol.messages import PROTOCOL_VERSION, GpuInfo, Hello, SlotInfo
from batuta.runtime.cluster import parse_cluster
from batuta.runtime.policy import POLICY_COMPONENTS, PolicyConfig
from batuta.runtime.pool import local_host
from batuta.stack import conformance, report, versions
from batuta.stack.check import _SMOKE_N, NodeFacts, batuta_finding, gpu_findings, python_finding
from batuta.stack.gate import conformance_findings, effective_policy, policy_findings
from batuta.stack.model import (
    COORDINATOR,
    ERROR,
    HEALTHY,
    ROLE_LOCAL,
    ROLE_SSH,
    ROLE_TLS,
    WARNING,
    Finding,
    KernelResult,
    NodeReport,
    StackReport,
)
from batuta.stack.nodes import NodeSession, NodeTarget, unreachable_finding
from batuta.transport.ssh import HostKeyError, SSHConnectError

REPO_ROOT = Path(__file__).resolve().parent.parent
RUN_TIMEOUT_S = 120
ANSI = "\x1b["


def stack(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m batuta stack ARGS` as a real process, this checkout first on the path."""
    full_env = dict(os.environ)
    full_env.pop("NO_COLOR", None)
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), full_env.get("PYTHONPATH")) if p)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "batuta", "stack", *args],
        cwd=cwd or REPO_ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )


# -- versions and the policy ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "ours", "theirs", "ok"),
    [
        ("exact", "0.1.0", "0.1.0", True),
        ("exact", "0.1.0", "0.1.1", False),
        ("minor", "0.60.0", "0.60.1", True),
        ("minor", "0.60.0", "0.59.1", False),
        ("minor", "0.60.0rc1", "0.60.2", True),
        ("major", "2.1.3", "2.4.0", True),
        ("major", "2.1.3", "1.26.4", False),
        ("any", "2.1.3", None, True),
        ("minor", None, None, True),
        ("minor", "0.60.0", None, False),
        ("major", "550.54.15", "550.90.07", True),
    ],
)
def test_version_policy_levels(level: str, ours: str | None, theirs: str | None, ok: bool) -> None:
    assert versions.within(level, ours, theirs) is ok


def test_release_and_level_words() -> None:
    assert versions.release("0.60.0rc1") == (0, 60, 0)
    assert versions.release("12.4") == (12, 4)
    assert versions.release("unknown") == ()
    assert versions.describe_level("minor", "0.60.0") == "0.60.x"
    assert versions.describe_level("major", "2.1.3") == "2.x"
    assert versions.describe_level("exact", "0.1.0") == "exactly 0.1.0"
    assert versions.gpu_models(["H100", "H100", "A10"]) == "2x H100, A10"


def test_policy_components_are_the_version_rows() -> None:
    assert (*POLICY_COMPONENTS, versions.GPUS) == versions.COMPONENTS
    assert set(versions.DEFAULT_POLICY) <= set(POLICY_COMPONENTS)


def test_the_coordinator_column_is_read_in_process() -> None:
    ours = versions.coordinator_versions()
    assert ours["batuta"] == __version__
    assert ours["numpy"] == np.__version__
    assert set(ours) == set(versions.COMPONENTS)


def cluster_text(policy: str) -> str:
    return textwrap.dedent(
        """
        [[hosts]]
        address = "gpu1"

        [policy]
        """
    ) + textwrap.dedent(policy)


def test_policy_table_is_read_and_checked() -> None:
    cluster = parse_cluster(
        cluster_text(
            'batuta = "exact"\nnumba = "Minor"\nnumpy = "any"\nmin_free_disk_gb = 5\nmin_free_memory_gb = 0.5\n'
        )
    )
    assert cluster.policy == PolicyConfig(
        versions={"batuta": "exact", "numba": "minor", "numpy": "any"}, min_free_disk_gb=5.0, min_free_memory_gb=0.5
    )
    assert parse_cluster(cluster_text("")).policy == PolicyConfig()
    # the defaults, with the file's rules on top; "any" drops a rule
    assert effective_policy(cluster.policy) == {
        "batuta": "exact",
        "python": "major",
        "numba": "minor",
        "llvmlite": "minor",
    }


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ('numab = "minor"\n', r"cluster\.toml:6: policy\.numab: unknown key; did you mean 'numba'\?"),
        ('numba = "patch"\n', r"cluster\.toml:6: policy\.numba: expected one of 'exact', 'minor', 'major', 'any'"),
        ("numba = 1\n", r"policy\.numba: expected one of .* got 1 \(a number\)"),
        ("min_free_disk_gb = -1\n", r"policy\.min_free_disk_gb: expected a number of GiB >= 0"),
        ('min_free_memory_gb = "2"\n', r"policy\.min_free_memory_gb: expected a number of GiB >= 0"),
    ],
)
def test_policy_table_errors_name_the_line_and_the_fix(policy: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        parse_cluster(cluster_text(policy), source="cluster.toml")


def test_policy_findings_say_what_is_wanted() -> None:
    ours = {"batuta": "0.1.0", "numba": "0.60.0", "numpy": "2.1.0", "llvmlite": "0.43.0"}
    policy = {"batuta": "exact", "numba": "minor", "numpy": "major", "llvmlite": "minor"}
    theirs = {"batuta": "0.1.0", "numba": "0.59.1", "numpy": "2.0.2", "llvmlite": None}
    found = policy_findings("gpu1", theirs, ours, policy)
    assert [(f.check, f.severity) for f in found] == [("policy", ERROR)] * 2
    numba, llvmlite = found
    assert numba.message == 'numba 0.59.1, the coordinator 0.60.0: [policy] numba = "minor" wants 0.60.x'
    assert numba.suggestion == "install numba 0.60.x on gpu1, or relax numba in [policy]"
    assert llvmlite.message.startswith("llvmlite is missing")
    healthy = policy_findings("gpu1", ours, ours, policy)
    assert [f.severity for f in healthy] == [HEALTHY] and "numba minor" in healthy[0].message


# -- conformance ---------------------------------------------------------------------------


def test_every_builtin_kernel_has_a_seeded_sample_its_reference_accepts() -> None:
    from batuta import kernels

    checked = dict(conformance.kernels_to_check())
    assert "vadd" in checked and not any(name.startswith("stack_") for name in checked)
    for name in checked:
        first, again = conformance.sample(name), conformance.sample(name)
        assert first is not None, f"kernel {name!r} has no sample in batuta/stack/conformance.py"
        assert again is not None
        want = kernels.reference(name, first.args)
        assert first.compare(want, kernels.reference(name, again.args)) == "", name  # seeded: same inputs


@pytest.mark.parametrize("origin", [0.5, 1234.5678, 987654.321])
def test_spin_and_its_conformance_check_agree_for_every_duration(
    origin: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A clock ticking 1 µs per reading, from origins where `start + seconds` rounds: a
    deadline-based spin returned 0.0019999999999527063 for 0.002 about one run in two here."""
    import itertools
    import time

    from batuta import kernels

    for step in range(1, 301):
        seconds = step * 1e-5
        ticks = itertools.count()
        monkeypatch.setattr(time, "perf_counter", lambda ticks=ticks: origin + next(ticks) * 1e-6)
        spun = kernels.reference("spin", (seconds,))
        assert conformance._spun(seconds)(spun, spun) == "", (origin, seconds, spun)
    monkeypatch.undo()
    gate_sample = conformance.sample("spin")
    assert gate_sample is not None
    assert gate_sample.compare(kernels.reference("spin", gate_sample.args), None) == ""


def test_comparison_tolerances() -> None:
    close = conformance._close
    a = np.linspace(0.0, 1.0, 11)
    assert close(a * (1 + 1e-9), a) == ""
    assert "max abs error" in close(a + 1e-3, a)
    assert "shape" in close(a[:5], a)
    assert close(np.arange(4), np.arange(4)) == ""
    assert "1 of 4 values differ" in close(np.array([0, 1, 2, 4]), np.arange(4))
    assert close((1.0, [np.zeros(2)]), (1.0, (np.zeros(2),))) == ""  # lists and tuples alike
    assert "expected a sequence of 2" in close((1.0,), (1.0, 2.0))
    assert close(math.nan, math.nan) == ""
    near_pi = conformance.sample("mc_pi")
    assert near_pi is not None
    assert near_pi.compare(3.14, 3.15) == ""
    assert "from pi" in near_pi.compare(3.3, 3.14)


def test_conformance_findings_group_failures_and_say_what_was_skipped() -> None:
    why = "ImportError: no numba"
    results = [KernelResult(node="n", kernel=k, backend="cpu", status="error", detail=why) for k in "abcde"]
    results += [KernelResult(node="n", kernel="f", backend="cpu", status="fail", detail="max abs error 1")]
    results += [KernelResult(node="n", kernel="a", backend="scalar", status="pass")]
    results += [KernelResult(node="n", kernel="a", backend="gpu", status="skip", detail="no GPU slots on this node")]
    scalar, cpu, gpu = conformance_findings("n", results)
    assert (scalar.severity, scalar.message) == (HEALTHY, "1 kernel(s) match their NumPy references")
    assert cpu.severity == ERROR
    assert cpu.message == f"6 of 6 kernel(s) fail: {why} (a, b, c and 2 more); f: max abs error 1"
    assert (gpu.severity, gpu.message) == (HEALTHY, "skipped: no GPU slots on this node")


def test_conformance_findings_name_the_kernels_skipped_for_want_of_a_sample() -> None:
    """'1 skipped (no sample inputs ...)' left the user to guess which kernel lacked a sample."""
    why = "no sample inputs"
    results = [KernelResult(node="n", kernel="dot", backend="cpu", status="pass")]
    results += [KernelResult(node="n", kernel="mine", backend="cpu", status="skip", detail=why)]
    (one,) = conformance_findings("n", results)
    assert one.message == f"1 kernel(s) match their NumPy references; 1 skipped (mine: {why})"
    results += [KernelResult(node="n", kernel=k, backend="cpu", status="skip", detail=why) for k in "wxyz"]
    (many,) = conformance_findings("n", results)
    assert many.message == f"1 kernel(s) match their NumPy references; 5 skipped ({why} (mine, w, x and 2 more))"


# -- findings for nodes that could not be reached ------------------------------------------


def target(role: str = ROLE_SSH) -> NodeTarget:
    return NodeTarget(name="gpu1", role=role, spec=local_host(1), address="10.0.0.1", python="/opt/py/bin/python")


def test_unreachable_findings_name_the_cause_and_the_fix() -> None:
    said = "host gpu1 (x:22): HOST KEY CHANGED: it offered K; refused (...). If the host was reinstalled, remove "
    said += "the old key with `ssh-keygen -R 'x' -f /lab/known_hosts` and add the new one after checking it"
    changed = unreachable_finding(target(), HostKeyError(said, changed=True), [])
    assert (changed.check, changed.severity) == ("ssh", ERROR)
    assert changed.message == "host gpu1 (x:22): HOST KEY CHANGED: it offered K"
    assert changed.suggestion.startswith(
        "if gpu1 was reinstalled, remove its old key with `ssh-keygen -R 'x' -f /lab/known_hosts` and add the new"
    )  # the cluster's known_hosts file, not ~/.ssh's that a bare `ssh-keygen -R` edits
    old = HostUnusableError("host gpu1: python3 there is Python 3.10.13; batuta needs 3.11 or newer: install one")
    python = unreachable_finding(target(), old, [])  # reached: not an "ssh" finding
    assert (python.check, python.message) == ("python", "host gpu1: python3 there is Python 3.10.13")
    assert python.suggestion == "batuta needs 3.11 or newer: install one"
    down = unreachable_finding(target(), SSHConnectError("host gpu1 (x): no SSH session within 2s; check it"), [])
    assert (down.check, down.message, down.suggestion) == (
        "ssh",
        "unreachable: host gpu1 (x): no SSH session within 2s",
        "check it",
    )
    agent = unreachable_finding(
        target(),
        AgentError("host gpu1: agent exited before saying hello"),
        ["", "sh: 1: /opt/py/bin/python: not found"],
    )
    assert agent.check == "agent"
    assert agent.message.endswith("the agent said: sh: 1: /opt/py/bin/python: not found")
    assert "/opt/py/bin/python -m batuta version" in agent.suggestion
    folder = unreachable_finding(  # python = a folder: its fix was "/opt/py -m batuta version"
        replace(target(), python="/opt/py"),
        AgentError("host gpu1: agent exited before saying hello"),
        ["sh: 1: /opt/py: Permission denied"],
    )
    assert folder.suggestion.startswith("python = '/opt/py' is not a Python interpreter on gpu1; name one")
    quoted = unreachable_finding(
        target(), AgentError("host gpu1: agent exited before saying hello: boom"), ["boom"]
    )  # the error quotes the agent's last line already: said once
    assert quoted.message == "host gpu1: agent exited before saying hello: boom"
    no_numpy = unreachable_finding(  # batuta is there, a dependency of it is not
        target(),
        AgentError("host gpu1: agent exited before saying hello"),
        ["ModuleNotFoundError: No module named 'numpy'"],
    )
    assert no_numpy.suggestion.startswith("/opt/py/bin/python on gpu1 lacks numpy, which batuta needs: remove python")
    no_msgpack = unreachable_finding(  # an ImportError raised by hand says it without quotes
        target(), AgentError("host gpu1: agent exited before saying hello"), ["ImportError: No module named msgpack"]
    )
    assert no_msgpack.suggestion.startswith("/opt/py/bin/python on gpu1 lacks msgpack, which batuta needs: ")
    slow = AgentError(
        "host gpu1: agent did not say hello within 5s (ssh x); check that batuta is installed there, "
        "or give it longer (start_timeout, in the cluster file's [pool] table)"
    )
    bounded = unreachable_finding(target(), slow, [], by_timeout=True)  # --timeout 5 was the limit
    assert bounded.message == "host gpu1: agent did not say hello within 5s (ssh x)"
    assert bounded.suggestion == "check that batuta is installed there, or give it longer with --timeout"
    assert "start_timeout" in unreachable_finding(target(), slow, []).suggestion  # the file's was
    # a host on the default python (no `python` in the file): the fix is `batuta cluster install`
    default = replace(target(), python="", cluster_file="lab.toml")
    bare = unreachable_finding(
        default, AgentError("host gpu1: agent exited before saying hello"), ["No module named batuta"]
    )
    assert bare.suggestion == "put the coordinator's batuta there: batuta cluster install --cluster lab.toml"


def test_version_findings_name_cluster_install_never_pip_install_batuta() -> None:
    other = batuta_finding(replace(target(), python="", cluster_file="lab.toml"), "0.0.9", "0.1.0")
    assert other.severity == ERROR
    assert other.suggestion == "put the coordinator's batuta there: batuta cluster install --cluster lab.toml"
    explicit = batuta_finding(replace(target(), cluster_file="lab.toml"), "0.0.9", "0.1.0")
    assert explicit.suggestion == (
        "remove python = '/opt/py/bin/python' for gpu1 from the cluster file, then "
        "batuta cluster install --cluster lab.toml"
    )
    tls = batuta_finding(target(ROLE_TLS), "0.0.9", "0.1.0")
    assert "`batuta worker`" in tls.suggestion
    assert all("pip install" not in f.suggestion for f in (other, explicit, tls))


def test_another_python_minor_is_healthy() -> None:
    """The pool takes a host on another Python minor (the wire is msgpack), so check does too."""
    same = python_finding(target(), "3.11.2", "3.11.7")
    other = python_finding(target(), "3.12.1", "3.11.7")
    assert (same.severity, other.severity) == (HEALTHY, HEALTHY)
    assert other.message.startswith("Python 3.12.1, the coordinator 3.11.7 (another minor works")


# -- the report ----------------------------------------------------------------------------


def sample_report(command: str = "check", *, strict: bool = False, severity: str = WARNING) -> StackReport:
    ours = {"batuta": "0.1.0", "python": "3.11.7"}
    finding = Finding(node="n1", check="numba", severity=severity, message="numba | odd", suggestion="fix it")
    return StackReport(
        command=command,
        source="c.toml",
        coordinator=NodeReport(name=COORDINATOR, role=COORDINATOR, reachable=True, versions=ours),
        nodes=(
            NodeReport(
                name="n1",
                role=ROLE_LOCAL,
                reachable=True,
                versions={"batuta": "0.0.9", "python": "3.11.7"},
                findings=(finding,),
            ),
            NodeReport(name="n2", role=ROLE_SSH, reachable=False, findings=()),
        ),
        components=("batuta", "python"),
        strict=strict,
    )


def test_exit_codes_follow_the_rules() -> None:
    assert sample_report("check").exit_code == 0  # a warning passes ...
    assert sample_report("check", strict=True).exit_code == 1  # ... unless --strict
    assert sample_report("gate", severity=ERROR).exit_code == 1
    assert sample_report("versions").exit_code == 1  # n2 unreachable
    assert sample_report("check", severity=HEALTHY).exit_code == 0


def test_text_colour_only_when_asked_and_never_alone() -> None:
    plain = report.render(sample_report("versions"), "text")
    assert ANSI not in plain
    assert "0.0.9 *" in plain and "* differs from the coordinator" in plain  # the star, without colour
    coloured = report.render(sample_report("versions"), "text", color=True)
    assert ANSI in coloured and "0.0.9 *" in coloured


def test_markdown_tables() -> None:
    text = report.render(sample_report("check"), "markdown")
    lines = text.splitlines()
    assert lines[0] == "### batuta stack check: c.toml (2 nodes)"
    assert "| node | check | status | finding | suggestion |" in lines
    assert "| n1 | numba | ⚠️ warning | numba \\| odd | fix it |" in lines  # pipes escaped
    assert lines[-1] == "**check: PASS: 1 warning on 1 of 2 node(s)**"
    matrix = report.render(sample_report("versions"), "markdown")
    assert "| component | coordinator | n1 | n2 |" in matrix
    assert "| batuta | 0.1.0 | **0.0.9** ⚠ | ? |" in matrix


def test_json_and_quiet() -> None:
    data = json.loads(report.render(sample_report("gate", severity=ERROR), "json"))
    assert data["verdict"] == "fail" and data["exit_code"] == 1
    assert data["nodes"][0]["differs"] == ["batuta"]
    assert data["nodes"][0]["findings"][0]["severity"] == ERROR
    assert json.loads(report.render(sample_report("gate"), "json", quiet=True)) == {
        "command": "gate",
        "verdict": "pass",
        "exit_code": 0,
    }
    assert report.render(sample_report("gate"), "text", quiet=True) == "gate: PASS: 1 warning on 1 of 2 node(s)"


# -- the command, on the embedded local agent ----------------------------------------------


@pytest.mark.parametrize("flags", [("--format", "json"), ("--json",)])  # --json as run and ps take it
def test_embedded_versions_json_is_clean(flags: tuple[str, ...]) -> None:
    done = stack("versions", *flags)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)  # all of stdout: nothing else is printed there
    assert data["source"] == "embedded"
    (node,) = data["nodes"]
    assert node["name"] == "local" and node["reachable"] and node["differs"] == []
    assert node["versions"]["batuta"] == __version__ == data["coordinator"]["versions"]["batuta"]


def test_embedded_check_text() -> None:
    done = stack("check")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "batuta stack check: embedded (1 node)"
    assert lines[-1] == "check: PASS: 1 node(s) healthy"
    for check in ("agent", "python", "batuta", "numba", "gpu", "disk", "memory"):
        assert any(line.split()[:2] == ["ok", check] for line in lines), (check, done.stdout)
    assert ANSI not in done.stdout


def test_embedded_gate_passes_and_quiet_prints_the_verdict_only() -> None:
    done = stack("gate", "--format", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(done.stdout)
    (node,) = data["nodes"]
    results = {(k["kernel"], k["backend"]): k["status"] for k in node["kernels"]}
    assert results[("vadd", "cpu")] == results[("matmul", "scalar")] == "pass"
    assert results[("vadd", "gpu")] == "skip"  # no GPU here
    assert {s for s in results.values()} == {"pass", "skip"}
    assert data["policy"]["batuta"] == "exact"
    quiet = stack("gate", "--quiet")
    assert quiet.returncode == 0 and quiet.stdout == "gate: PASS: 1 node(s) healthy\n"


def test_embedded_check_markdown() -> None:
    done = stack("check", "--format", "markdown")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("### batuta stack check: embedded (1 node)\n")
    assert "| local | numba | ✅ healthy | numba " in done.stdout


def test_fake_gpus_under_the_simulator_are_warnings_and_strict_fails_them() -> None:
    env = {"BATUTA_FAKE_GPUS": "1", "NUMBA_ENABLE_CUDASIM": "1"}
    done = stack("check", "--format", "json", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    (node,) = json.loads(done.stdout)["nodes"]
    found = {f["check"]: f for f in node["findings"]}
    assert found["nvml"]["severity"] == WARNING and "fake GPUs" in found["nvml"]["message"]
    assert found["cuda"]["severity"] == WARNING and "simulator" in found["cuda"]["message"]  # the kernel ran
    assert stack("check", "--strict", "--quiet", env=env).returncode == 1


@pytest.mark.skipif(os.environ.get("BATUTA_REAL_GPU") == "1", reason="this host has a GPU: fake GPUs' slots run on it")
def test_fake_gpus_without_the_simulator_are_one_error_naming_the_setting() -> None:
    """It said "NVML not asked", then per GPU "CUDA cannot compile ... CUDA driver library
    cannot be found" with "check the driver (nvidia-smi) and numba-cuda": a driver to install
    on a machine meant to have none."""
    env = {"BATUTA_FAKE_GPUS": "2", "NUMBA_ENABLE_CUDASIM": "0"}
    done = stack("check", "--format", "json", env=env)
    assert done.returncode == 1, done.stdout + done.stderr
    (node,) = json.loads(done.stdout)["nodes"]
    (gpu,) = [f for f in node["findings"] if f["check"] in ("nvml", "cuda", "gpu")]
    assert gpu["severity"] == ERROR and "BATUTA_FAKE_GPUS=2" in gpu["message"]
    assert gpu["suggestion"].startswith('set NUMBA_ENABLE_CUDASIM = "1" beside BATUTA_FAKE_GPUS')
    assert "driver" not in gpu["message"] + gpu["suggestion"]


def test_gate_checks_every_gpu_of_a_node_on_its_own_slot() -> None:
    env = {"BATUTA_FAKE_GPUS": "2", "NUMBA_ENABLE_CUDASIM": "1"}
    done = stack("gate", "--format", "json", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    (node,) = json.loads(done.stdout)["nodes"]
    cuda = [f["message"] for f in node["findings"] if f["check"] == "cuda"]
    assert [m.split(":")[0] for m in cuda] == ["GPU 0", "GPU 1"] and all("simulator" in m for m in cuda)
    gpu_checks = [f for f in node["findings"] if f["check"].startswith("kernels gpu")]
    assert [f["check"] for f in gpu_checks] == ["kernels gpu:0", "kernels gpu:1"]
    assert all(f["severity"] == HEALTHY for f in gpu_checks)
    ran = {(k["kernel"], k["backend"]): k["status"] for k in node["kernels"]}
    assert ran[("vadd", "gpu:0")] == ran[("vadd", "gpu:1")] == "pass" and ("vadd", "gpu") not in ran


def test_thresholds_from_the_command_line() -> None:
    done = stack("check", "--min-disk-gb", "1e9", "--min-memory-gb", "0", "--format", "json")
    assert done.returncode == 1, done.stdout + done.stderr
    (node,) = json.loads(done.stdout)["nodes"]
    found = {f["check"]: f for f in node["findings"]}
    assert found["disk"]["severity"] == ERROR and found["disk"]["suggestion"].endswith("or lower --min-disk-gb")
    assert found["memory"]["severity"] == HEALTHY


def run_on_a_terminal(*args: str, no_color: str | None) -> str:
    """`batuta stack ARGS` with stdout on a pseudo-terminal; returns what it printed there."""
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    if no_color is not None:
        env["NO_COLOR"] = no_color
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "batuta", "stack", *args],
            stdout=terminal,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        os.close(terminal)
        chunks = []
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert process.wait(RUN_TIMEOUT_S) == 0
    finally:
        os.close(controller)
    return b"".join(chunks).decode()


def test_colour_on_a_terminal_and_never_with_no_color() -> None:
    coloured = run_on_a_terminal("versions", no_color=None)
    assert ANSI in coloured and "batuta stack versions" in coloured
    assert ANSI not in run_on_a_terminal("versions", no_color="1")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "'batuta stack' needs an action"),
        (("check", "--format", "xml"), "invalid choice: 'xml'"),
        (("gate", "--timeout", "0"), "not a positive number of seconds"),
        (("check", "--cluster", "no-such-cluster.toml"), "no-such-cluster.toml: no such file"),
    ],
)
def test_usage_and_config_errors_exit_2(args: tuple[str, ...], message: str, tmp_path: Path) -> None:
    done = stack(*args, cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""
    assert message in done.stderr and done.stderr.count("\n") == 1


def test_a_bad_policy_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text(cluster_text('numba = "newest"\n'))
    done = stack("gate", "-c", str(path), "--format", "json")
    assert done.returncode == 2 and done.stdout == ""
    assert "cluster.toml:6: policy.numba: expected one of" in done.stderr


def test_agent_stderr_is_kept_without_hiding_errors_the_user_asked_for() -> None:
    import logging

    from batuta.stack.nodes import keep_agent_stderr

    class Collect(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    root, seen = logging.getLogger("batuta"), Collect()
    saved = (root.level, root.propagate)
    root.setLevel(logging.ERROR)  # what `batuta stack` does by default
    root.propagate = False
    root.addHandler(seen)
    transport = logging.getLogger("batuta.transport.ssh")
    try:
        with keep_agent_stderr(["gpu1", "local"]) as kept:
            transport.warning("%s: %s", "gpu1 agent", "bash: python9: command not found")
            logging.getLogger("batuta.transport.local").warning("%s: %s", "local agent[12]", "Traceback ...")
            transport.error("something the user asked to see")
        transport.warning("%s: %s", "gpu1 agent", "after: not kept")
    finally:
        root.removeHandler(seen)
        root.setLevel(saved[0])
        root.propagate = saved[1]
    assert kept == {"gpu1": ["bash: python9: command not found"], "local": ["Traceback ..."]}
    assert seen.messages == ["something the user asked to see"]  # warnings stay out of the user's log
    assert logging.getLogger("batuta.transport").propagate and logging.getLogger("batuta.transport").level == 0


def test_declared_gpus_that_are_not_there_are_a_finding(tmp_path: Path) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text('[local]\ngpus = [0]\nenv = { BATUTA_FAKE_GPUS = "0" }\n')
    done = stack("check", "-c", str(path), "--format", "json")
    assert done.returncode == 1, done.stdout + done.stderr
    (node,) = json.loads(done.stdout)["nodes"]
    (finding,) = node["findings"]
    assert not node["reachable"]
    assert (finding["check"], finding["severity"]) == ("gpu", ERROR)
    assert finding["message"].startswith("--gpus 0: no GPU 0 on this host")
    assert "set gpus for local" in finding["suggestion"]


def test_gpus_left_out_on_purpose_pass_the_gate(tmp_path: Path) -> None:
    """`gpus = "none"` (examples/cluster.toml's default) on a node with GPUs was "GPUs were
    found, but the agent offers no GPU slot", an error: every such gate failed."""
    path = tmp_path / "cluster.toml"
    path.write_text('[local]\ngpus = "none"\nenv = { BATUTA_FAKE_GPUS = "2", NUMBA_ENABLE_CUDASIM = "1" }\n')
    done = stack("gate", "-c", str(path), "--format", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    (node,) = json.loads(done.stdout)["nodes"]
    [gpu] = [f for f in node["findings"] if f["check"] in ("gpu", "cuda", "nvml")]
    assert (gpu["check"], gpu["severity"]) == ("gpu", HEALTHY)
    assert gpu["message"] == '2 GPUs here, not used (gpus = "none"): CUDA and NVML not checked'


def test_a_node_the_file_gives_no_slot_and_that_has_no_gpu_is_an_error(tmp_path: Path) -> None:
    """It is checked with one CPU slot, so every other check passes: the pool, started from
    the same file, would run nothing there."""
    path = tmp_path / "cluster.toml"
    path.write_text('[local]\nslots = 0\nenv = { BATUTA_FAKE_GPUS = "0" }\n')
    done = stack("check", "-c", str(path), "--format", "json")
    assert done.returncode == 1, done.stdout + done.stderr
    (node,) = json.loads(done.stdout)["nodes"]
    [finding] = [f for f in node["findings"] if f["severity"] == ERROR]
    assert finding["check"] == "slots"
    assert finding["message"] == "slots = 0 and no GPU here: the pool would run nothing on this node"
    assert finding["suggestion"].startswith("set slots to 1 or more in the [local] table of the cluster file")
    path.write_text('[local]\nslots = 0\nenv = { BATUTA_FAKE_GPUS = "1" }\n')  # a GPU slot: work can run
    done = stack("check", "-c", str(path), "--format", "json")
    (node,) = json.loads(done.stdout)["nodes"]
    assert "slots" not in [f["check"] for f in node["findings"]], done.stdout


ENDLESS_IMPORT = (
    "import threading\nfrom batuta import kernel\n\n@kernel('endless_k')\ndef endless_k(x):\n    return x\n\n"
    "if '/batuta/code/' in __file__:  # on a host only: the coordinator imports it quickly\n"
    "    threading.Event().wait()\n"
)


def test_check_does_not_wait_for_ever_on_a_module_whose_import_never_ends(tmp_path: Path) -> None:
    """Its tasks wait for the import: `--timeout` bounds that wait too, and the finding says
    where to look. It hung with no output, however small --timeout was."""
    (tmp_path / "endless.py").write_text(ENDLESS_IMPORT)
    done = stack("check", "--module", "endless.py", "--timeout", "3", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "importing the shipped code (endless) did not finish within 3 s" in done.stdout
    assert "move it into a function; or give it longer with --timeout" in done.stdout


def test_sigterm_ends_a_check_as_ctrl_c_does_and_stops_its_agent(tmp_path: Path) -> None:
    """`kill` or `timeout` on a `stack check` left its local agent running, orphaned."""
    import psutil

    (tmp_path / "endless.py").write_text(ENDLESS_IMPORT)  # holds the check while we look
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    check = subprocess.Popen(
        [sys.executable, "-m", "batuta", "stack", "check", "--module", "endless.py", "--timeout", "100"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        me = psutil.Process(check.pid)
        agents: list[psutil.Process] = []
        for _ in range(600):  # bounded: 60 s for the agent to be up
            agents = [p for p in me.children(recursive=True) if "batuta.agent" in " ".join(p.cmdline())]
            if agents:
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                check.wait(0.1)  # and it must not have ended meanwhile
            assert check.returncode is None, check.stderr.read() if check.stderr else ""
        assert agents, "the check started no agent"
        check.send_signal(signal.SIGTERM)
        _, stderr = check.communicate(timeout=60)
    finally:
        if check.poll() is None:
            check.kill()
    assert check.returncode == 130, stderr
    assert "batuta: interrupted" in stderr
    _, alive = psutil.wait_procs(agents, timeout=30)
    assert not alive, [p.pid for p in alive]


KILLS_ITS_AGENT = (
    "import os, signal\nfrom batuta import kernel\n\n@kernel('kills_agent_k')\ndef kills_agent_k(x):\n"
    "    if '/batuta/code/' in __file__:  # on a host only: the coordinator runs the reference too\n"
    "        os.kill(os.getppid(), signal.SIGKILL)\n"
    "    return x\n\n@kills_agent_k.sample\ndef _(rng):\n    return (rng.standard_normal(4),)\n"
)


def test_a_node_lost_during_the_gate_is_one_error_that_says_so_not_its_tasks_failures(tmp_path: Path) -> None:
    """A link cut mid-check was reported as "numba cannot compile and run a kernel" (fix:
    reinstall numba) and "20 of 20 kernels fail" (no slot offers cpu any more)."""
    (tmp_path / "killer.py").write_text(KILLS_ITS_AGENT)
    done = stack("gate", "--module", "killer.py", "--format", "json", "--timeout", "60", cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    (node,) = json.loads(done.stdout)["nodes"]
    errors = [f for f in node["findings"] if f["severity"] == ERROR]
    assert [f["check"] for f in errors] == ["agent"], errors
    assert errors[0]["message"].startswith("lost during the check: "), errors
    assert errors[0]["suggestion"] == "see why its agent ended (above), then run the check again"
    assert {"python", "batuta", "numba"} <= {f["check"] for f in node["findings"]}  # what passed before stays


def test_a_nodes_disk_check_covers_batutas_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped code and spilled objects go there; a full one passed the check, and every
    task on the node then failed to import the shipped code."""
    import tempfile

    from batuta.stack.node_kernels import _disks

    others = {os.stat(tempfile.gettempdir()).st_dev, os.stat(os.path.expanduser("~")).st_dev}
    if not Path("/dev/shm").is_dir() or os.stat("/dev/shm").st_dev in others:
        pytest.skip("no file system here besides the temp and home folders' to put the cache on")
    monkeypatch.setenv("XDG_CACHE_HOME", "/dev/shm/batuta-test-not-made")  # not made: the disk it goes on
    [cache] = [disk for disk in _disks() if disk["label"] == "cache"]
    assert cache["path"] == "/dev/shm" and cache["free"] > 0


def _two_gpu_session() -> NodeSession:
    gpus = (
        GpuInfo(index=0, name="NVIDIA H100 80GB HBM3", uuid="GPU-2b5c6b3e-5f5a-4c1d-9e8f-0123456789ab"),
        GpuInfo(index=1, name="NVIDIA H100 80GB HBM3", uuid="GPU-7d1e0a44-1c2b-4a3d-8e9f-fedcba987654"),
    )
    hello = Hello(
        protocol=PROTOCOL_VERSION,
        batuta_version=__version__,
        python_version="3.11.7",
        hostname="gpu1",
        pid=1,
        cpu_count=16,
        slots=(
            SlotInfo(slot=0, capabilities=("cpu",)),
            SlotInfo(slot=1, capabilities=("gpu",), gpu_index=0),
            SlotInfo(slot=2, capabilities=("gpu",), gpu_index=1),
        ),
        gpus=gpus,
    )
    target = NodeTarget(name="gpu1", role=ROLE_SSH, spec=local_host(1), address="10.0.0.1")
    return NodeSession(target=target, pool=cast(Any, None), hello=hello, ready_s=0.1, connect_s=0.05, where="gpu1")


def _smoke(ran_on: str) -> TaskResult:
    value: dict[str, Any] = {
        "value": float(sum(2.0 * i for i in range(_SMOKE_N))),
        "compile_run_s": 0.4,
        "simulator": False,
    }
    value |= {"device": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "uuid": ran_on}
    return TaskResult(task_id=1, name="stack_cuda_smoke", status=TaskStatus.SUCCEEDED, value=value)


def test_each_gpu_row_names_the_card_its_kernel_ran_on_and_a_wrong_card_is_an_error() -> None:
    """The per-GPU rows said "GPU 1: ... on NVIDIA H100" whichever card the slot ran on: on a
    node of eight alike, nothing showed that GPU 1's slot was pinned to GPU 1. The row now names
    the card's UUID (to hold against nvidia-smi -L), and a card that is not the one NVML calls
    GPU 1 is an error."""
    session = _two_gpu_session()
    first, second = (g.uuid for g in session.hello.gpus)
    info = {"nvml": {"status": "ok", "driver": "580.1", "cuda_driver": "13.0", "gpus": ["H100", "H100"]}}
    right = NodeFacts(info=info, cuda={0: _smoke(first), 1: _smoke(second.upper().removeprefix("GPU-"))})
    rows = [f for f in gpu_findings(session, right) if f.check == "cuda"]
    assert [(f.severity, f.message) for f in rows] == [
        (HEALTHY, f"GPU 0: CUDA compiles and runs a kernel on NVIDIA H100 80GB HBM3 (compute 9.0, {first}) (0.40 s)"),
        (
            HEALTHY,
            "GPU 1: CUDA compiles and runs a kernel on NVIDIA H100 80GB HBM3 (compute 9.0, "
            f"{second.upper().removeprefix('GPU-')}) (0.40 s)",
        ),
    ]
    swapped = NodeFacts(info=info, cuda={0: _smoke(second), 1: _smoke(first)})
    rows = [f for f in gpu_findings(session, swapped) if f.check == "cuda"]
    assert [f.severity for f in rows] == [WARNING, WARNING]
    assert rows[1].message == f"GPU 1: the kernel for GPU 1 ({second}) ran on another card, {first}"
    assert rows[1].suggestion.startswith("compare nvidia-smi -L on gpu1")
    unknown = NodeFacts(info=info, cuda={0: _smoke("GPU-00000000"), 1: _smoke("")})  # no UUID to hold it against
    assert {f.severity for f in gpu_findings(session, unknown) if f.check == "cuda"} == {HEALTHY}
