"""The user's own kernels on SSH hosts, as a newcomer runs them: `batuta run my_job.py --cluster
cluster.toml` with the kernels beside the job file and nothing copied to the hosts by hand.

Real OpenSSH servers in network namespaces (tests/support/hosts.py). The hosts share this
machine's file system, so each has its own cache folder (XDG_CACHE_HOME, set by the harness)
and runs its agent in its own home, away from the job's folder: what a host imports, it was sent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.hosts import TestHosts

KERNELS = """\
import os
from batuta import kernel

VERSION = {version}


@kernel("cs_whoami")
def cs_whoami():
    return [VERSION, os.getpid(), __file__]


cs_whoami.cpu(cs_whoami.reference)
"""

PACKAGE_KERNEL = """\
from batuta import kernel

from . import consts


@kernel("cs_pkg_value")
def cs_pkg_value(x):
    return x * consts.SCALE


cs_pkg_value.cpu(cs_pkg_value.reference)
"""

JOB = """\
from batuta import Task

import cs_kernels
from cs_shippkg.sub import kern


async def main(pool):
    ran = []
    for tag in ("h0", "h1"):  # one task on each host
        who = await pool.run(Task.kernel("cs_whoami", requires=[tag]))
        value = await pool.run(Task.kernel("cs_pkg_value", 7, requires=[tag]))
        ran.append([who.host, who.value[0], who.value[1], value.value, who.code, who.value[2]])
    return ran
"""


def write(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def cluster_file(hosts: TestHosts, folder: Path) -> Path:
    path = folder / "cluster.toml"
    entries = "".join(f'\n[[hosts]]\naddress = "{host.name}"\ntags = ["h{host.index}"]\n' for host in hosts)
    path.write_text(
        f'[defaults]\npython = "{sys.executable}"\nslots = 1\ngpus = "none"\n{entries}\n'
        f'[ssh]\nknown_hosts = "{hosts.known_hosts}"\nconfig = "{hosts.ssh_config}"\nconnect_timeout = 5\n\n'
        "[pool]\nheartbeat_interval = 0.5\n"
    )
    return path


def batuta_run(*args: str, cwd: Path) -> tuple[int, dict[str, Any], str]:
    done = subprocess.run(
        [sys.executable, "-m", "batuta", "run", *args, "--json"],
        cwd=cwd,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.stdout.strip(), done.stderr
    return done.returncode, json.loads(done.stdout), done.stderr


def test_kernels_beside_the_job_run_on_two_hosts_and_an_edit_runs_new_code(
    ssh_hosts: Callable[..., TestHosts], tmp_path: Path
) -> None:
    hosts = ssh_hosts(2)
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    write(
        project,
        {
            "my_job.py": JOB,
            "cs_kernels.py": KERNELS.format(version=1),
            "cs_shippkg/__init__.py": "",
            "cs_shippkg/sub/__init__.py": "",
            "cs_shippkg/sub/kern.py": PACKAGE_KERNEL,
            "cs_shippkg/sub/consts.py": "SCALE = 6\n",
        },
    )
    elsewhere.mkdir()
    cluster = cluster_file(hosts, elsewhere)

    code, first, stderr = batuta_run(str(project / "my_job.py"), "--cluster", str(cluster), cwd=elsewhere)
    assert code == 0 and first["ok"], (first, stderr)
    assert [row[:2] + row[3:4] for row in first["result"]] == [["host0", 1, 42], ["host1", 1, 42]]
    digest = first["result"][0][4]
    assert len(digest) == 64 and first["result"][1][4] == digest
    for host, row in zip(hosts, first["result"], strict=True):  # each imported it from its own cache
        bundle = host.dir / "cache" / "batuta" / "code" / digest
        assert row[5] == str(bundle / "cs_kernels.py")
        assert (bundle / "cs_kernels.py").read_text() == KERNELS.format(version=1)
        assert (bundle / "cs_shippkg" / "sub" / "consts.py").is_file()

    (project / "cs_kernels.py").write_text(KERNELS.format(version=2))
    code, second, stderr = batuta_run(str(project / "my_job.py"), "--cluster", str(cluster), cwd=elsewhere)
    assert code == 0 and second["ok"], (second, stderr)
    assert [row[:2] for row in second["result"]] == [["host0", 2], ["host1", 2]]  # no stale value anywhere
    assert second["result"][0][4] != digest
    old_pids = {row[2] for row in first["result"]}
    assert not old_pids & {row[2] for row in second["result"]}  # slots that imported version 1 are gone
    assert second["hosts"][0]["code"] == second["result"][0][4]


def test_a_broken_module_fails_its_tasks_naming_the_file_and_line_and_the_rest_runs(
    ssh_hosts: Callable[..., TestHosts], tmp_path: Path
) -> None:
    hosts = ssh_hosts(2)
    write(
        tmp_path,
        {
            "job.py": """\
                from batuta import Task


                async def main(pool):
                    broken = await pool.run(Task.kernel("cs_broken_kernel"))
                    fine = await pool.map("noop", [(i,) for i in range(6)])
                    return [broken.status.value, broken.host, sorted(fine)]
            """,
            "cs_broken.py": "from batuta import kernel\n\n\n@kernel('cs_broken_kernel')\ndef k(:\n    pass\n",
            "cs_needs.py": "import cs_missing_package_xyz\n",
        },
    )
    cluster = cluster_file(hosts, tmp_path)
    code, summary, stderr = batuta_run(
        str(tmp_path / "job.py"), "--cluster", str(cluster),
        "--module", str(tmp_path / "cs_broken.py"), "--module", str(tmp_path / "cs_needs.py"),
        cwd=tmp_path,
    )  # fmt: skip
    assert code == 1, stderr  # a task failed; the coordinator carried on
    status, host, fine = summary["result"]
    assert (status, fine) == ("failed", [0, 1, 2, 3, 4, 5])
    (failure,) = summary["failures"]
    assert failure["reason"] == (
        f"kernel 'cs_broken_kernel' is unknown on host {host}: importing cs_broken failed: SyntaxError: "
        f"invalid syntax (at {tmp_path / 'cs_broken.py'}:5); importing cs_needs failed: ModuleNotFoundError: "
        "No module named 'cs_missing_package_xyz' (install 'cs_missing_package_xyz' for this host's "
        f"Python ({sys.executable}), or ship it with --module) (at {tmp_path / 'cs_needs.py'}:1)"
    )
    for host in hosts:  # each host said so once, and the coordinator logged it
        assert (
            f"host {host.name}: importing cs_broken failed: SyntaxError: invalid syntax (at {tmp_path}/cs_broken.py:5)"
            in stderr
        )
