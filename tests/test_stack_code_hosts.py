"""`batuta stack` and the user's own kernel modules, on two real SSH hosts (network namespaces).

    modules.toml  both hosts import `hostmod` by name (kernel_modules) from their own install:
                  each host's PYTHONPATH names another folder, whose hostmod.py differs; the
                  coordinator has no hostmod, so nothing ships and each host runs its own copy
    gate.toml     a kernel shipped with --module; host1's env makes its CPU variant wrong

`stack check` must find the odd copy (the fault behind "20 of 20 tasks ok" with a wrong total),
and `stack gate` must run the user's kernel on every backend of every node against its reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batuta.agent.code import module_source_digest, short_digest
from tests.support.conftest_hosts import require_test_hosts
from tests.support.hosts import TestHosts

REPO_ROOT = Path(__file__).resolve().parent.parent
RUN_TIMEOUT_S = 300

USER_KERNELS = """\
import os

from batuta import kernel


@kernel("user_scale")
def user_scale(x):
    return x * 2.0


@user_scale.cpu
def _user_scale_cpu(x):
    return x * (3.0 if os.environ.get("USERK_BUG") else 2.0)  # host1 is told to be wrong


@user_scale.sample
def _user_scale_sample(rng):
    return (rng.standard_normal(64),)


@kernel("user_unsampled")
def user_unsampled(x):
    return x
"""


def write_cluster(path: Path, hosts: TestHosts, host_env: list[str], body: str = "") -> Path:
    entries = "".join(
        f'\n[[hosts]]\naddress = "{host.name}"\nenv = {{ {env} }}\n' for host, env in zip(hosts, host_env, strict=True)
    )
    path.write_text(
        f'[defaults]\npython = "{sys.executable}"\ngpus = "none"\n{body}{entries}\n'
        f'[ssh]\nknown_hosts = "{hosts.known_hosts}"\nconfig = "{hosts.ssh_config}"\nconnect_timeout = 5\n'
    )
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    require_test_hosts()
    folder = tmp_path_factory.mktemp("stack-code")
    for name, value in (("copy-a", 1), ("copy-b", 2)):
        (folder / name).mkdir()
        (folder / name / "hostmod.py").write_text(f"SCALE = {value}\n")
    (folder / "userk.py").write_text(USER_KERNELS)
    with TestHosts(2) as hosts:
        modules = write_cluster(
            folder / "modules.toml",
            hosts,
            [f'PYTHONPATH = "{folder / name}:{REPO_ROOT}"' for name in ("copy-a", "copy-b")],
            body='kernel_modules = ["hostmod"]\n',
        )
        gate = write_cluster(
            folder / "gate.toml",
            hosts,
            [f'PYTHONPATH = "{REPO_ROOT}"', f'PYTHONPATH = "{REPO_ROOT}", USERK_BUG = "1"'],
        )
        yield {"folder": folder, "modules": modules, "gate": gate, "hosts": hosts}


def stack(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env["PYTHONPATH"] = str(REPO_ROOT)  # the coordinator has no hostmod of its own
    return subprocess.run(
        [sys.executable, "-m", "batuta", "stack", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )


def nodes_of(stdout: str) -> dict[str, dict[str, Any]]:
    return {node["name"]: node for node in json.loads(stdout)["nodes"]}


def findings_of(node: dict[str, Any], check: str) -> list[dict[str, Any]]:
    return [f for f in node["findings"] if f["check"] == check]


def test_check_finds_the_host_with_another_copy_of_a_module_it_imports_by_name(setup: dict[str, Any]) -> None:
    folder = setup["folder"]
    digest_a = short_digest(module_source_digest("hostmod", [str(folder / "copy-a")]))
    digest_b = short_digest(module_source_digest("hostmod", [str(folder / "copy-b")]))
    assert digest_a != digest_b

    done = stack("check", "-c", str(setup["modules"]), "--format", "json", cwd=folder)
    assert done.returncode == 1, done.stdout + done.stderr
    nodes = nodes_of(done.stdout)
    (odd,) = findings_of(nodes["host1"], "modules")
    assert odd["severity"] == "error"
    assert odd["message"] == f"hostmod on host1 is {digest_b}, on host0 {digest_a}"
    assert "ship hostmod from the coordinator instead (--module PATH" in odd["suggestion"]
    assert "reinstall the same copy of hostmod on host1" in odd["suggestion"]
    (other,) = findings_of(nodes["host0"], "modules")  # two copies, no reference: both are named
    assert other["message"] == f"hostmod on host0 is {digest_a}, on host1 {digest_b}"
    bad = {(n, f["check"]) for n, node in nodes.items() for f in node["findings"] if f["severity"] != "healthy"}
    assert bad == {("host0", "modules"), ("host1", "modules")}

    versions = stack("versions", "-c", str(setup["modules"]), "--format", "json", cwd=folder)
    assert versions.returncode == 0, versions.stderr  # versions fails only on an unreachable node
    data = json.loads(versions.stdout)
    assert "module hostmod" in data["components"]
    assert data["coordinator"]["versions"]["module hostmod"] is None
    columns = {n["name"]: n["versions"]["module hostmod"] for n in data["nodes"]}
    assert columns == {"host0": digest_a, "host1": digest_b}

    same = write_cluster(
        folder / "same.toml",
        setup["hosts"],
        [f'PYTHONPATH = "{folder / "copy-a"}:{REPO_ROOT}"'] * 2,
        body='kernel_modules = ["hostmod"]\n',
    )
    agreed = stack("check", "-c", str(same), "--format", "json", cwd=folder)
    assert agreed.returncode == 0, agreed.stdout + agreed.stderr
    for node in nodes_of(agreed.stdout).values():
        (finding,) = findings_of(node, "modules")
        assert finding["message"] == f"hostmod {digest_a}, as 2 of 2 nodes'"


def test_gate_runs_a_shipped_user_kernel_on_every_backend_and_fails_the_host_where_it_is_wrong(
    setup: dict[str, Any],
) -> None:
    folder = setup["folder"]
    done = stack("gate", "-c", str(setup["gate"]), "--module", "userk.py", "--format", "json", cwd=folder)
    assert done.returncode == 1 and done.stdout, done.stdout + done.stderr
    nodes = nodes_of(done.stdout)
    for name, wrong in (("host0", False), ("host1", True)):
        node = nodes[name]
        (code,) = findings_of(node, "code")
        assert code["severity"] == "healthy" and code["message"].endswith("shipped and imported (userk)")
        results = {(k["kernel"], k["backend"]): k for k in node["kernels"]}
        assert results["user_scale", "scalar"]["status"] == "pass"
        assert results["user_scale", "cpu"]["status"] == ("fail" if wrong else "pass")
        assert results["user_unsampled", "scalar"]["status"] == "skip"
        assert "no sample inputs" in results["user_unsampled", "scalar"]["detail"]
        cpu = findings_of(node, "kernels cpu")[0]
        assert cpu["severity"] == ("error" if wrong else "healthy")
    assert "user_scale: result: max abs error" in findings_of(nodes["host1"], "kernels cpu")[0]["message"]
    bad = {(n, f["check"]) for n, node in nodes.items() for f in node["findings"] if f["severity"] != "healthy"}
    assert bad == {("host1", "kernels cpu")}
