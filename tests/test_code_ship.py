"""What of the user's code ships (batuta/runtime/code.py), and a local pool and `batuta run` that ship it.

The collector is tested on folders made here; the pools are real (a local agent started by
the pool), with the cache folder of the session (tests/conftest.py), so nothing is found by
accident.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from batuta.core.task import Backend, Task, TaskStatus
from batuta.protocol import messages as m
from batuta.protocol.messages import code_digest
from batuta.runtime.code import HOST_PACKAGES, CodeCollector, CodeError, CodeSpec, ShippedCode
from batuta.runtime.pool import Pool
from batuta.runtime.session import HostSession
from tests.test_pool import agent_pids

KERNELS = """\
import os
from batuta import kernel
from cs_helpers import offset

VERSION = {version}


@kernel("cs_value", pure=True)
def cs_value(x):
    return x * 10 + VERSION + offset()


cs_value.cpu(cs_value.reference)


@kernel("cs_pid")
def cs_pid():
    return os.getpid()


cs_pid.cpu(cs_pid.reference)
"""

JOB = """\
from batuta import Task
import cs_kernels
from cs_reader import unused  # a helper: shipped, not imported on the hosts
import numpy


async def main(pool):
    result = await pool.run(Task.kernel("cs_value", 4))
    return f"{result.status.value} {result.value} {result.code}"
"""


def write(folder: Path, files: dict[str, str | bytes]) -> None:
    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(textwrap.dedent(data))


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A job file beside its modules, and things that must not ship."""
    folder = tmp_path / "project"
    write(
        folder,
        {
            "my_job.py": JOB,
            "cs_kernels.py": KERNELS.format(version=1),
            "cs_helpers.py": "def offset():\n    return 100\n",
            # reads a file beside it that only the coordinator has: importing it on a host would fail
            "cs_reader.py": "import os\n\nunused = open(os.path.join(os.path.dirname(__file__), 'local.txt')).read()\n",
            "local.txt": "coordinator only",
            "unrelated.py": "X = 1\n",  # not imported: not shipped
            "__pycache__/cs_kernels.cpython-311.pyc": b"\x00",
        },
    )
    return folder


def paths_of(code: m.Code | None) -> list[str]:
    assert code is not None
    return sorted(f.path for f in code.files)


def test_the_job_files_local_imports_ship_and_only_kernel_modules_are_imported(project: Path) -> None:
    code = CodeCollector(CodeSpec(job_files=(project / "my_job.py",))).bundle()
    assert code is not None
    # cs_helpers ships because cs_kernels imports it; numpy and batuta are installed; the job itself stays
    assert paths_of(code) == ["cs_helpers.py", "cs_kernels.py", "cs_reader.py"]
    assert code.modules == ("cs_kernels",)  # cs_reader registers no kernel: not imported on the hosts
    assert code.digest == code_digest(code.files, code.modules)
    assert {f.path: f.data for f in code.files}["cs_kernels.py"] == (project / "cs_kernels.py").read_bytes()


def test_a_changed_file_is_a_new_digest_and_the_same_files_the_same_one(project: Path) -> None:
    spec = CodeSpec(job_files=(project / "my_job.py",))
    first = CodeCollector(spec).bundle()
    again = CodeCollector(spec).bundle()
    (project / "cs_helpers.py").write_text("def offset():\n    return 200\n")
    changed = CodeCollector(spec).bundle()
    assert first is not None and again is not None and changed is not None
    assert first.digest == again.digest != changed.digest


def test_packages_ship_whole_without_caches_hidden_files_or_what_batutaignore_lists(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "job.py": "from cs_pkg.sub import kern\n\nasync def main(pool):\n    return 1\n",
            "cs_pkg/__init__.py": "",
            "cs_pkg/util.py": "X = 1\n",
            "cs_pkg/sub/__init__.py": "",
            "cs_pkg/sub/kern.py": "from batuta import kernel\n\n@kernel('k')\ndef k():\n    return 1\n",
            "cs_pkg/sub/table.txt": "14",
            "cs_pkg/.batutaignore": "# big things the hosts do not need\n*.npy\n/scratch/\nsub/**/*.tmp\n",
            "cs_pkg/weights.npy": b"\x00" * 100,
            "cs_pkg/sub/deep/x.npy": b"\x00",
            "cs_pkg/sub/deep/y.tmp": b"\x00",
            "cs_pkg/sub/deep/keep.dat": b"\x01",
            "cs_pkg/scratch/notes.txt": "scratch",
            "cs_pkg/sub/scratch/kept.txt": "only the package's own /scratch/ is ignored",
            "cs_pkg/.git/config": "hidden",
            "cs_pkg/.env": "SECRET=1",
            "cs_pkg/sub/__pycache__/kern.cpython-311.pyc": b"\x00",
            "cs_pkg/sub/kern.pyc": b"\x00",
        },
    )
    code = CodeCollector(CodeSpec(job_files=(tmp_path / "job.py",))).bundle()
    assert code is not None
    assert paths_of(code) == [
        "cs_pkg/__init__.py",
        "cs_pkg/sub/__init__.py",
        "cs_pkg/sub/deep/keep.dat",
        "cs_pkg/sub/kern.py",
        "cs_pkg/sub/scratch/kept.txt",
        "cs_pkg/sub/table.txt",
        "cs_pkg/util.py",
    ]
    assert code.modules == ("cs_pkg.sub.kern",)


def test_a_linked_folder_ships_once_and_a_link_to_nothing_says_so(tmp_path: Path) -> None:
    """A symlinked folder in a package was left out silently (its files missing on the hosts);
    a link to nothing failed with 'No such file or directory' about a file that is there."""
    write(
        tmp_path,
        {
            "job.py": "import cs_links\n\nasync def main(pool):\n    return 1\n",
            "cs_links/__init__.py": "",
            "elsewhere/data.txt": "shared",
        },
    )
    (tmp_path / "cs_links" / "shared").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "cs_links" / "again").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere" / "up").symlink_to(tmp_path / "cs_links", target_is_directory=True)  # a cycle
    code = CodeCollector(CodeSpec(job_files=(tmp_path / "job.py",))).bundle()
    assert code is not None
    # each link's path, the cycle (elsewhere/up back to cs_links) not followed
    assert paths_of(code) == ["cs_links/__init__.py", "cs_links/again/data.txt", "cs_links/shared/data.txt"]
    (tmp_path / "cs_links" / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    with pytest.raises(CodeError, match=r"gone\.txt to ship it: No such file or directory \(a symbolic link to"):
        CodeCollector(CodeSpec(job_files=(tmp_path / "job.py",))).bundle()


def test_kernel_modules_ship_when_they_are_the_users_files_not_when_installed(project: Path) -> None:
    collector = CodeCollector(CodeSpec(job_files=(project / "my_job.py",)))
    code = collector.bundle(("unrelated", "numpy", "batuta.kernels.basic", "not_anywhere_xyz"))
    assert code is not None
    assert "unrelated.py" in paths_of(code)  # found beside the job file
    assert code.modules == ("cs_kernels", "unrelated")  # the others are imported by name, as before
    assert not any(p.startswith(("numpy/", "batuta/", "kernels/")) for p in paths_of(code))
    common = collector.bundle(())
    assert common is not None and common.digest != code.digest


def test_a_kernel_module_in_a_folder_without_init_ships_as_a_namespace_package(
    project: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write(project, {"cs_tools/cs_kern.py": "X = 1\n"})  # a namespace package: no __init__.py
    collector = CodeCollector(CodeSpec(job_files=(project / "my_job.py",)))
    with caplog.at_level(logging.WARNING, logger="batuta.runtime.code"):
        code = collector.bundle(("cs_tools.cs_kern",))
    assert "cs_tools/cs_kern.py" in paths_of(code) and code is not None
    assert code.modules == ("cs_kernels", "cs_tools.cs_kern") and not caplog.records
    # split over two folders of the path, it cannot arrive as it runs here: not shipped, and why
    write(tmp_path / "other", {"cs_tools/cs_more.py": "Y = 2\n"})
    split = CodeCollector(CodeSpec(job_files=(project / "my_job.py",)), search_path=[str(tmp_path / "other")])
    with caplog.at_level(logging.WARNING, logger="batuta.runtime.code"):
        code = split.bundle(("cs_tools.cs_kern",))
    assert code is not None and not any(p.startswith("cs_tools/") for p in paths_of(code))
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "kernel_modules 'cs_tools.cs_kern' is not shipped: the namespace package 'cs_tools'" in warning
    assert str(project / "cs_tools") in warning and str(tmp_path / "other" / "cs_tools") in warning
    assert "add an __init__.py to the one to ship" in warning


def test_a_job_importing_from_folders_without_init_ships_them(tmp_path: Path) -> None:
    """Namespace packages, as Python imports them: at the top of the job's folder or inside a
    package, but never a folder that an installed module of the same name shadows."""
    write(
        tmp_path,
        {
            "job.py": "from cs_ns import kern\nimport cs_pk.sub.more\nimport numpy\n",
            "cs_ns/kern.py": "from batuta import kernel\nfrom cs_ns.tools import helper\n\nkernel('k')(helper)\n",
            "cs_ns/tools/helper.py": "def helper():\n    return 1\n",
            "cs_ns/notes.txt": "shipped with the folder",
            "cs_pk/__init__.py": "",
            "cs_pk/sub/more.py": "from batuta import kernel\n\n@kernel('m')\ndef m():\n    return 2\n",
            "numpy/fake.py": "X = 1\n",  # `import numpy` is the installed one: this folder is nobody's
        },
    )
    code = CodeCollector(CodeSpec(job_files=(tmp_path / "job.py",))).bundle()
    assert paths_of(code) == [
        "cs_ns/kern.py", "cs_ns/notes.txt", "cs_ns/tools/helper.py", "cs_pk/__init__.py", "cs_pk/sub/more.py"
    ]  # fmt: skip
    assert code is not None and code.modules == ("cs_ns.kern", "cs_pk.sub.more")


def test_nothing_to_ship_is_no_bundle() -> None:
    assert CodeCollector(CodeSpec()).bundle(("numpy",)) is None


def test_module_paths_a_file_or_a_package_and_the_errors(tmp_path: Path) -> None:
    write(tmp_path, {"lib/cs_one.py": "import cs_two\n", "lib/cs_two.py": "", "pkgdir/cs_p/__init__.py": ""})
    code = CodeCollector(CodeSpec(modules=(tmp_path / "lib" / "cs_one.py", tmp_path / "pkgdir" / "cs_p"))).bundle()
    assert code is not None
    assert paths_of(code) == ["cs_one.py", "cs_p/__init__.py", "cs_two.py"]
    assert code.modules == ("cs_one", "cs_p")  # named on purpose: imported whether or not they register kernels
    (tmp_path / "not-a-name.py").write_text("")
    (tmp_path / "data.txt").write_text("")
    for path, words in [
        (tmp_path / "missing.py", "no such file or folder; give a .py file or a package folder"),
        (tmp_path / "data.txt", "not a .py file or a package folder"),
        (tmp_path / "not-a-name.py", "'not-a-name' is not a valid module name; rename it"),
    ]:
        with pytest.raises(CodeError) as info:
            CodeCollector(CodeSpec(modules=(path,)))
        assert str(info.value) == f"--module {path}: {words}" or words in str(info.value)


def test_a_folder_without_init_that_only_the_job_uses_stays_here(tmp_path: Path) -> None:
    """A plain folder of the job's own (a loader beside its data) registers no kernel: it ships
    only when the hosts' code imports it, so its data never counts against the limit."""
    loader = "import os\n\ndef load():\n    return os.path.join(os.path.dirname(__file__), 'big.npy')\n"
    write(
        tmp_path,
        {
            "job.py": "from cs_data.loader import load\nimport cs_kern\n",
            "cs_data/loader.py": loader,
            "cs_data/big.npy": b"\x00" * 5000,
            "cs_kern.py": "from batuta import kernel\n\nkernel('k')(len)\n",
        },
    )
    code = CodeCollector(CodeSpec(job_files=(tmp_path / "job.py",), max_bytes=4096)).bundle()
    assert paths_of(code) == ["cs_kern.py"]  # and no "over the limit" error for the data
    (tmp_path / "cs_kern.py").write_text("from batuta import kernel\nfrom cs_data import loader\n\nkernel('k')(len)\n")
    code = CodeCollector(CodeSpec(job_files=(tmp_path / "job.py",))).bundle()
    assert paths_of(code) == ["cs_data/big.npy", "cs_data/loader.py", "cs_kern.py"]  # the kernels need it now


def test_a_module_path_without_init_ships_whole_and_its_kernel_modules_are_imported(tmp_path: Path) -> None:
    kernel_file = "from batuta import kernel\n\n@kernel('{0}')\ndef {0}():\n    return 1\n"
    write(
        tmp_path / "lib",
        {
            "cs_plain/a.py": kernel_file.format("cs_a"),
            "cs_plain/run_me.py": "raise SystemExit('a script: never imported on the hosts')\n",
            "cs_plain/deep/b.py": kernel_file.format("cs_b"),
            "cs_plain/deep/__init__.py": "",
        },
    )
    code = CodeCollector(CodeSpec(modules=(tmp_path / "lib" / "cs_plain",))).bundle()
    assert paths_of(code) == ["cs_plain/a.py", "cs_plain/deep/__init__.py", "cs_plain/deep/b.py", "cs_plain/run_me.py"]
    assert code is not None and code.modules == ("cs_plain.a", "cs_plain.deep.b")


def test_two_modules_with_one_name_are_refused(tmp_path: Path) -> None:
    write(tmp_path, {"a/cs_same.py": "", "b/cs_same.py": ""})
    with pytest.raises(CodeError, match=r"two different modules named 'cs_same' would ship: .*; rename one of them"):
        CodeCollector(CodeSpec(modules=(tmp_path / "a" / "cs_same.py", tmp_path / "b" / "cs_same.py")))


@pytest.mark.parametrize(
    ("name", "whose"),
    [
        ("signal", "a module of Python itself"),
        ("json", "a module of Python itself"),
        ("batuta", "a module of batuta"),
        ("psutil", "a package batuta runs on"),
        ("numba", "a package batuta runs on"),
    ],
)
def test_a_module_named_as_one_of_python_batuta_or_its_packages_is_refused(
    tmp_path: Path, name: str, whose: str
) -> None:
    """The hosts had imported theirs (signal, psutil) before the user's: its kernels never
    registered, and every task failed as 'unknown kernel' with nothing said of why."""
    path = tmp_path / f"{name}.py"
    path.write_text("from batuta import kernel\n")
    with pytest.raises(CodeError) as info:
        CodeCollector(CodeSpec(modules=(path,))).bundle()
    assert str(info.value) == (
        f"{path} (--module {path}) is named {name!r}, as {whose} is, which the hosts import instead of it; rename it"
    )


async def test_the_packages_a_slot_imports_are_all_refused_as_module_names(tmp_path: Path) -> None:
    """HOST_PACKAGES against what a real slot has imported once a numba kernel ran there."""
    from batuta.kernels import registry

    source = (
        "import sys\nfrom batuta import kernel\n\n@kernel('cs_imported')\ndef f(x):\n"
        "    return sorted({m.split('.')[0] for m in sys.modules})\n"
    )
    write(tmp_path, {"cs_imported.py": source})
    try:
        async with Pool.local(1, gpu_workers="none", modules=[str(tmp_path / "cs_imported.py")]) as pool:
            ran = await pool.run(Task.kernel("mc_pi", 1000, 1, backend=Backend.CPU))  # numba compiles it there
            assert ran.is_success() and ran.backend is Backend.CPU
            result = await pool.run(Task.kernel("cs_imported", 1))
        assert result.is_success(), result.error
        public = {
            name
            for name in result.value
            if not name.startswith("_") and name not in sys.stdlib_module_names and "editable" not in name
        }
        assert "numba" in public
        assert public - {"batuta", "cs_imported", "cython_runtime"} <= HOST_PACKAGES
    finally:
        registry.forget_modules(["cs_imported"])


def test_a_bundle_over_the_limit_names_its_biggest_files_and_the_fix(tmp_path: Path) -> None:
    write(
        tmp_path,
        {"cs_big/__init__.py": "", "cs_big/a.bin": b"\x00" * 3000, "cs_big/b.bin": b"\x00" * 2000, "cs_big/c.py": ""},
    )
    with pytest.raises(CodeError) as info:
        CodeCollector(CodeSpec(modules=(tmp_path / "cs_big",), max_bytes=4096)).bundle()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("the code to ship to the hosts is 0.0 MiB, over the 0.00390625 MiB limit; ")
    assert "the biggest files: cs_big/a.bin (0.0 MiB), cs_big/b.bin (0.0 MiB), cs_big/c.py (0.0 MiB)" in message
    assert message.endswith(
        "list what the hosts do not need in a .batutaignore in the package's folder, or raise the limit "
        "(max_code_mb in the cluster file's [pool], or Pool.builder().code_limit(bytes))"
    )


# -- a local pool -------------------------------------------------------------------------


async def test_a_local_pool_ships_the_job_files_modules_and_results_name_the_digest(project: Path) -> None:
    expected = CodeCollector(CodeSpec(job_files=(project / "my_job.py",))).bundle()
    assert expected is not None
    pool = Pool.builder().cpu_workers(1).gpu_workers("none").job_file(project / "my_job.py").build()
    async with pool:
        result = await pool.run(Task.kernel("cs_value", 4))
    assert (result.status, result.value, result.code) == (TaskStatus.SUCCEEDED, 141, expected.digest)


async def test_a_host_that_cannot_write_the_code_is_said_unfit_and_its_tasks_run_elsewhere(
    project: Path, tmp_path: Path
) -> None:
    """A host whose cache cannot be written (a full disk; here a file where its folder would go)
    failed every task of the user's kernels at once, and drew more of them for it: most of the
    12 failed while the other host could run them all. Now they run there, and the host is
    said unfit, naming the folder and the fix."""
    from batuta.runtime.builder import PoolConfig, local_host
    from batuta.runtime.events import HostStateChanged

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would be")
    full = local_host(1, gpus="none", name="full", env={"XDG_CACHE_HOME": str(blocker)})
    fine = local_host(1, gpus="none", name="fine")
    states: list[tuple[str, str, str]] = []
    pool = Pool([full, fine], PoolConfig(code=CodeSpec(job_files=(project / "my_job.py",))))
    pool.subscribe(lambda e: states.append((e.host, e.state, e.reason)) if isinstance(e, HostStateChanged) else None)
    async with pool:
        futures = [await pool.submit(Task.kernel("cs_value", 4, max_attempts=1)) for _ in range(12)]
        results = [await asyncio.wait_for(f, 60) for f in futures]
    assert [(r.status, r.value, r.host, r.attempts) for r in results] == [(TaskStatus.SUCCEEDED, 141, "fine", 1)] * 12
    [(host, reason)] = [(host, reason) for host, state, reason in states if state == "unfit"]
    assert host == "full"
    assert f"cannot write the code under {blocker / 'batuta' / 'code'}: " in reason
    assert "set XDG_CACHE_HOME in the host's env to a folder with room" in reason


async def test_a_relaunched_agent_is_sent_the_code_again_before_any_task(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[m.Message] = []
    original = HostSession.send

    def spy(self: HostSession, message: m.Message, nbytes: int = 0) -> None:
        sent.append(message)
        original(self, message, nbytes)

    monkeypatch.setattr(HostSession, "send", spy)
    builder = Pool.builder().cpu_workers(1).gpu_workers("none").job_file(project / "my_job.py")
    async with builder.relaunch(max_relaunches=5, backoff=0.1).build() as pool:
        first = await pool.run(Task.kernel("cs_pid"))
        [agent] = agent_pids()
        os.kill(agent.pid, signal.SIGKILL)
        again = await asyncio.wait_for(pool.run(Task.kernel("cs_value", 4, max_attempts=5)), 60)
    assert first.is_success() and again.is_success(), (first.error, again.error)
    assert (again.value, again.code) == (141, first.code)
    kinds = [type(message).__name__ for message in sent if not isinstance(message, m.Cancel | m.StealBack)]
    welcomes = [i for i, kind in enumerate(kinds) if kind == "Welcome"]
    assert len(welcomes) == 2
    for at in welcomes:  # each agent hears Code right after Welcome, before any Run
        assert kinds[at + 1] == "Code"
    assert [message.digest for message in sent if isinstance(message, m.Code)] == [first.code, first.code]


async def test_ship_puts_new_code_into_a_running_pool_and_an_edit_replaces_it(project: Path) -> None:
    """`Pool.ship`: the job file's modules reach a pool started without them; after an edit the
    next ship runs the new code on the same agent (its slots replaced), never the old one."""
    async with Pool.builder().cpu_workers(2).gpu_workers("none").build() as pool:
        before = await pool.run(Task.kernel("cs_value", 4))
        assert before.status is TaskStatus.FAILED and "cs_value" in (before.error or "")
        with pytest.raises(CodeError, match="no such file or folder"):
            await pool.ship([project / "missing.py"])
        shipped = await pool.ship(job_files=[project / "my_job.py"])
        assert (shipped.hosts, shipped.unchanged, await shipped.import_errors()) == (("local",), False, {})
        first = await pool.run(Task.kernel("cs_value", 4))
        assert (first.status, first.value, first.code) == (TaskStatus.SUCCEEDED, 141, shipped.digest)
        assert (await pool.ship(job_files=[project / "my_job.py"])).unchanged  # the same code: nothing sent

        write(project, {"cs_kernels.py": KERNELS.format(version=2)})
        edited = await pool.ship(job_files=[project / "my_job.py"])
        assert edited.digest != shipped.digest and edited.hosts == ("local",)
        results = await asyncio.gather(*(pool.run(Task.kernel("cs_value", i)) for i in range(8)))
    assert {(r.status, r.code) for r in results} == {(TaskStatus.SUCCEEDED, edited.digest)}
    assert [r.value for r in results] == [i * 10 + 102 for i in range(8)]  # every slot runs the new code


async def test_a_host_still_importing_the_users_modules_says_so_in_the_log(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Every task there waits for the import: a module doing work at import time held a run
    with nothing said. The agent says so after BATUTA_IMPORT_NOTE_S (30 s by default), then
    at twice that, and so on."""
    gate = tmp_path / "slow-gate"
    os.mkfifo(gate)
    monkeypatch.setenv("BATUTA_IMPORT_NOTE_S", "0.2")  # the local agent inherits it
    write(project, {"cs_slow.py": f"with open({str(gate)!r}) as gate:\n    gate.readline()\n"})

    def noted() -> list[str]:
        return [r.getMessage() for r in caplog.records if "still importing" in r.getMessage()]

    async with Pool.builder().cpu_workers(1).gpu_workers("none").build() as pool:
        shipped = await asyncio.wait_for(pool.ship([project / "cs_slow.py"]), 60)
        async with asyncio.timeout(60):
            while len(noted()) < 2:
                await asyncio.sleep(0.05)
        release = os.open(gate, os.O_RDWR)
        try:
            os.write(release, b"go\n")
            assert await asyncio.wait_for(shipped.import_errors(), 60) == {}
        finally:
            os.close(release)
    first, second = noted()[:2]
    assert first.endswith("still importing cs_slow after 0.2 s; the tasks sent here wait for it")
    assert second.endswith("still importing cs_slow after 0.4 s; the tasks sent here wait for it")


async def test_ship_returns_once_the_hosts_stored_the_code_and_import_errors_follow(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ship` returns when every host has the files (the import, the compile, follows): here
    the host's import of cs_gated waits for the test, and ship has returned meanwhile; a task
    sent then runs the new code once imported. A module that does not compile is in
    `import_errors()` and in its kernel's task failure, with the file and line, also when the
    next ship went out before that import was over."""
    gate = tmp_path / "import-gate"
    os.mkfifo(gate)
    code_sent = asyncio.Event()
    original = HostSession.send

    def spy(self: HostSession, message: m.Message, nbytes: int = 0) -> None:
        original(self, message, nbytes)
        if isinstance(message, m.Code):
            code_sent.set()

    monkeypatch.setattr(HostSession, "send", spy)
    write(
        project,
        {
            "cs_gated.py": f"""\
                from batuta import kernel

                with open({str(gate)!r}) as gate:  # importing waits for the test
                    WORD = gate.readline().strip()


                @kernel("cs_gated")
                def cs_gated():
                    return WORD


                cs_gated.cpu(cs_gated.reference)
            """,
            "cs_broken.py": "from batuta import kernel\n\n\n@kernel('cs_broken_kernel')\ndef k(:\n    pass\n",
            "cs_more.py": "X = 1\n",
        },
    )
    async with Pool.builder().cpu_workers(1).gpu_workers("none").build() as pool:
        shipped = await asyncio.wait_for(pool.ship([project / "cs_gated.py"]), 60)  # the host is held at the gate
        assert shipped.hosts == ("local",)
        imported = asyncio.ensure_future(shipped.import_errors())
        result = asyncio.ensure_future(pool.run(Task.kernel("cs_gated")))
        release = os.open(gate, os.O_RDWR)  # never blocks; the module's open returns once it is there
        try:
            os.write(release, b"opened\n")
            assert await asyncio.wait_for(imported, 60) == {}
            gated = await asyncio.wait_for(result, 60)
            assert (gated.status, gated.value, gated.code) == (TaskStatus.SUCCEEDED, "opened", shipped.digest)

            broken = await pool.ship([project / "cs_broken.py"])  # the new bundle imports cs_gated again: held
            code_sent.clear()
            shipping_more = asyncio.ensure_future(pool.ship([project / "cs_more.py"]))
            await asyncio.wait_for(code_sent.wait(), 60)  # out before the host answered how the import went
            os.write(release, b"again\n")
            syntax_error = {"local": {"cs_broken": f"SyntaxError: invalid syntax (at {project / 'cs_broken.py'}:5)"}}
            assert await asyncio.wait_for(broken.import_errors(), 60) == syntax_error
            more = await asyncio.wait_for(shipping_more, 60)
            os.write(release, b"more\n")  # for the third bundle's import
            assert await asyncio.wait_for(more.import_errors(), 60) == syntax_error  # it ships cs_broken too
            failed = await pool.run(Task.kernel("cs_broken_kernel"))
            again = await pool.run(Task.kernel("cs_gated"))
        finally:
            os.close(release)
    assert failed.status is TaskStatus.FAILED
    assert failed.error == (
        "kernel 'cs_broken_kernel' is unknown on host local: importing cs_broken failed: "
        f"SyntaxError: invalid syntax (at {project / 'cs_broken.py'}:5)"
    )
    assert (again.status, again.value, again.code) == (TaskStatus.SUCCEEDED, "more", more.digest)


BLOCK = """\
from batuta import kernel


@kernel("cs_block")
def cs_block(fifo):
    with open(fifo) as released:  # returns once the test writes a line to the FIFO
        return released.readline().strip()


cs_block.cpu(cs_block.reference)
"""


async def test_ship_waits_for_the_tasks_on_the_hosts_so_none_is_refused_as_stale(project: Path, tmp_path: Path) -> None:
    """A task running and others queued on the host for the old code: `ship` pauses, lets them
    finish with the code they were sent for, then ships and resumes."""
    write(project, {"cs_block.py": BLOCK})
    fifo = tmp_path / "release"
    os.mkfifo(fifo)
    pool = Pool.builder().cpu_workers(1).gpu_workers("none").modules([project / "cs_block.py"]).build()
    async with pool:
        first = await pool.submit(Task.kernel("cs_block", str(fifo)))
        queued = [await pool.submit(Task.kernel("noop", i)) for i in range(6)]
        writer = await asyncio.wait_for(asyncio.to_thread(open, fifo, "w"), 60)  # cs_block runs now
        shipping = asyncio.create_task(pool.ship(job_files=[project / "my_job.py"]))
        await asyncio.sleep(0)  # one turn: ship runs until it waits for the hosts' tasks
        assert pool.paused and not shipping.done()
        with writer:
            writer.write("released\n")
        results = [await first] + [await future for future in queued]
        shipped = await asyncio.wait_for(shipping, 60)
        assert not pool.paused
        after = await pool.run(Task.kernel("cs_value", 4))
    assert [(r.status, r.value) for r in results] == [(TaskStatus.SUCCEEDED, "released")] + [
        (TaskStatus.SUCCEEDED, i) for i in range(6)
    ]
    old_code = results[0].code
    assert shipped.digest != old_code and {r.code for r in results} <= {old_code, shipped.digest}
    assert any(r.code == old_code for r in results[1:])  # some were on the host, for the old code, when ship began
    assert (after.status, after.value, after.code) == (TaskStatus.SUCCEEDED, 141, shipped.digest)


SLOW_IMPORT = """\
import time
from batuta import kernel

time.sleep(2.0)  # a module that takes long to import (torch, a long compile at import)


@kernel("cs_slow_value", pure=True)
def cs_slow_value(x):
    return x + 1


cs_slow_value.cpu(cs_slow_value.reference)
"""


async def test_a_long_import_of_the_users_code_keeps_the_host_alive(tmp_path: Path) -> None:
    """The agent imports the shipped modules on a thread: one that takes longer than the
    host's `lost_after` must not get the host lost (it was, and relaunched, and lost again,
    for ever); the task sent meanwhile still waits for it (its kernel exists only then)."""
    write(tmp_path, {"cs_slow.py": SLOW_IMPORT})
    builder = (
        Pool.builder()
        .cpu_workers(1)
        .gpu_workers("none")
        .modules([tmp_path / "cs_slow.py"])
        .heartbeat_interval(0.1)
        .liveness(suspect_after=0.4, lost_after=0.8)
    )
    async with builder.build() as pool:
        [agent] = agent_pids()
        result = await asyncio.wait_for(pool.run(Task.kernel("cs_slow_value", 1)), 60)
        assert agent_pids() == [agent]  # never lost, never relaunched
    assert (result.status, result.value, result.attempts) == (TaskStatus.SUCCEEDED, 2, 1), result.error


async def test_a_pool_with_no_code_to_ship_names_none() -> None:
    async with Pool.builder().cpu_workers(1).gpu_workers("none").build() as pool:
        result = await pool.run(Task.kernel("noop", 3))
    assert (result.status, result.value, result.code) == (TaskStatus.SUCCEEDED, 3, "")


async def test_code_over_the_limit_stops_the_pool_before_any_host_starts(tmp_path: Path) -> None:
    write(tmp_path, {"cs_big.py": "X = 1\n" * 100})
    pool = Pool.builder().cpu_workers(1).gpu_workers("none").modules([tmp_path / "cs_big.py"]).code_limit(10).build()
    with pytest.raises(CodeError, match="over the"):
        await pool.start()
    assert pool.hosts()[0].state != "up"


# -- batuta run ---------------------------------------------------------------------------


def batuta(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batuta", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_batuta_run_ships_the_job_files_modules_and_module_paths(project: Path, tmp_path: Path) -> None:
    write(
        tmp_path / "elsewhere",
        {
            "cs_extra.py": """\
                from batuta import kernel

                @kernel("cs_extra")
                def cs_extra():
                    return "extra"

                cs_extra.cpu(cs_extra.reference)
            """
        },
    )
    (project / "job2.py").write_text(
        "from batuta import Task\n\n"
        "async def main(pool):\n"
        "    a = await pool.run(Task.kernel('cs_extra'))\n"
        "    return a.value\n"
    )
    done = batuta(
        "run", str(project / "job2.py"), "--workers", "1", "--json",
        "--module", str(tmp_path / "elsewhere" / "cs_extra.py"),
        cwd=tmp_path,  # not the job's folder, nor the module's: nothing is found through the working directory
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["result"] == "extra"


def test_a_kernel_name_two_shipped_modules_register_runs_neither(tmp_path: Path) -> None:
    """The job imports cs_dup_a; --module ships cs_dup_b, which the coordinator never imports,
    with the same kernel name. The host imported cs_dup_b first and ran its kernel: 101, exit
    0, a wrong answer with one warning. Now the name runs neither, saying why; the host's
    other kernels still run."""
    write(
        tmp_path / "proj",
        {
            "cs_dup_a.py": "from batuta import kernel\n\n@kernel('cs_dup')\ndef cs_dup(x):\n    return x + 1\n",
            "cs_dup_b.py": "from batuta import kernel\n\n@kernel('cs_dup')\ndef cs_dup(x):\n    return x + 100\n",
            "job.py": "import cs_dup_a  # noqa: F401\nfrom batuta import Task\n\n"
            "async def main(pool):\n"
            "    dup = await pool.run(Task.kernel('cs_dup', 1))\n"
            "    other = await pool.run(Task.kernel('noop', 2))\n"
            "    return [dup.status.value, dup.value, dup.error, other.value]\n",
        },
    )
    project = tmp_path / "proj"
    done = batuta("run", "job.py", "--workers", "1", "--json", "--module", "cs_dup_b.py", cwd=project)
    status, value, error, other = json.loads(done.stdout)["result"]
    assert (status, value, other) == ("failed", None, 2), error
    assert error.startswith(
        "kernel 'cs_dup' is defined by two modules, cs_dup_b.cs_dup and cs_dup_a.cs_dup, so neither runs under "
        "that name; rename one of them (importing cs_dup_a failed: KernelDefinitionError: "
    ), error
    assert error.endswith(f" (at {project / 'cs_dup_a.py'}:3))"), error


def test_a_shipped_kernel_named_like_a_built_in_one_runs_neither_and_says_rename_it(tmp_path: Path) -> None:
    """A --module file defining `sum`: its tasks failed as "kernel 'sum' is unknown ...: ...
    already registered by batuta.kernels.basic.sum_", unknown and registered in one line."""
    write(
        tmp_path / "proj", {"cs_mysum.py": "from batuta import kernel\n\n@kernel('sum')\ndef mysum(x):\n    return 0\n"}
    )
    job = "from batuta import Task\n\nasync def main(pool):\n    return (await pool.run(Task.kernel('sum', [1.0])))"
    job += ".error\n"
    (tmp_path / "proj" / "job.py").write_text(job)
    done = batuta("run", "job.py", "--workers", "1", "--json", "--module", "cs_mysum.py", cwd=tmp_path / "proj")
    error = json.loads(done.stdout)["result"]
    assert error == (
        "kernel 'sum' is built into batuta (batuta.kernels.basic.sum_) and defined again by cs_mysum.mysum, so "
        "neither runs; rename cs_mysum.mysum (importing cs_mysum failed: KernelDefinitionError: kernel 'sum' is "
        "one of batuta's built-in kernels (batuta.kernels.basic.sum_); pick another name "
        f"(at {tmp_path / 'proj' / 'cs_mysum.py'}:3))"
    )


def test_a_contested_kernel_name_comes_back_to_its_first_module_when_the_code_goes() -> None:
    from batuta.kernels import registry

    def first(x: int) -> int:
        return x

    def second(x: int) -> int:
        return -x

    second.__module__ = "cs_other_module"
    a = registry.kernel("cs_contested")(first)
    try:
        with pytest.raises(registry.KernelDefinitionError) as refused:
            registry.kernel("cs_contested")(second)
        clash = refused.value.clash
        assert clash is not None and clash[0] == "cs_contested" and clash[1] is a
        assert registry.lookup("cs_contested") is a  # refusing alone contests nothing
        registry.contest(*clash)
        with pytest.raises(registry.UnknownKernelError, match=r"defined by two modules, .*first and cs_other_module"):
            registry.lookup("cs_contested")
        with pytest.raises(registry.KernelDefinitionError, match="defined by two modules"):
            registry.kernel("cs_contested")(second)  # nor may a third take it meanwhile
        registry.forget_modules(["cs_other_module"])
        assert registry.lookup("cs_contested") is a
    finally:
        registry.unregister("cs_contested")


def test_batuta_run_ships_kernels_from_a_folder_without_init(tmp_path: Path) -> None:
    """The layout many projects have: kernels in a subfolder with no __init__.py."""
    write(
        tmp_path / "proj",
        {
            "cs_helpers/kern.py": "import numpy as np\nfrom batuta import kernel\n\n"
            "@kernel('cs_twice')\ndef cs_twice(x):\n    return 2 * x\n\ncs_twice.cpu(cs_twice.reference)\n",
            "job.py": "import numpy as np\nfrom cs_helpers import kern  # noqa: F401\nfrom batuta import Task\n\n"
            "async def main(pool):\n"
            "    return (await pool.run(Task.kernel('cs_twice', np.arange(3.0)))).unwrap().tolist()\n",
        },
    )
    done = batuta("run", str(tmp_path / "proj" / "job.py"), "--workers", "1", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["result"] == [0.0, 2.0, 4.0]


def test_a_module_file_that_imports_its_own_folder_as_a_package_is_told_to_pass_the_folder(tmp_path: Path) -> None:
    """`--module helpers/kern.py` where kern.py does `from helpers.util import ...`: shipped as
    a top-level `kern`, `helpers` was missing on every host and the kernel failed there (the
    gate blamed its reference); the folder ships whole and works."""
    write(
        tmp_path / "proj",
        {
            "cs_pkg/util.py": "def twice(x):\n    return 2 * x\n",
            "cs_pkg/kern.py": "from batuta import kernel\nfrom cs_pkg.util import twice\n\n"
            "@kernel('cs_pkg_twice')\ndef cs_pkg_twice(x):\n    return twice(x)\n",
            "job.py": "from batuta import Task\n\nasync def main(pool):\n"
            "    return (await pool.run(Task.kernel('cs_pkg_twice', 21))).value\n",
        },
    )
    project = tmp_path / "proj"
    refused = batuta("run", "job.py", "--workers", "1", "--module", "cs_pkg/kern.py", cwd=project)
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        "batuta: error: --module cs_pkg/kern.py: it imports cs_pkg (its own folder) as a package, which would not "
        "ship with it; pass the folder instead: --module cs_pkg"
    )
    done = batuta("run", "job.py", "--workers", "1", "--json", "--module", "cs_pkg", cwd=project)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["result"] == 42


def relative_package(folder: Path) -> Path:
    """A package whose kernel module imports its siblings relatively, two levels down."""
    write(
        folder,
        {
            "cs_relpkg/__init__.py": "",
            "cs_relpkg/consts.py": "SCALE = 3\n",
            "cs_relpkg/ops/__init__.py": "",
            "cs_relpkg/ops/kern.py": "from batuta import kernel\n\nfrom ..consts import SCALE\n\n"
            "@kernel('cs_relpkg_scale')\ndef cs_relpkg_scale(x):\n    return x * SCALE\n",
        },
    )
    return folder / "cs_relpkg"


def test_a_module_file_that_imports_its_package_relatively_is_told_to_pass_the_package(tmp_path: Path) -> None:
    """`--module mylab/ops/kern.py` where kern.py does `from ..consts import SCALE`: shipped as
    a top-level `kern`, every host failed "attempted relative import with no known parent
    package" and its tasks said to pass --module, which had been passed."""
    project = tmp_path / "proj"
    relative_package(project)
    write(
        project,
        {
            "job.py": "from batuta import Task\n\nasync def main(pool):\n"
            "    return (await pool.run(Task.kernel('cs_relpkg_scale', 14))).value\n"
        },
    )
    refused = batuta("run", "job.py", "--workers", "1", "--module", "cs_relpkg/ops/kern.py", cwd=project)
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        "batuta: error: --module cs_relpkg/ops/kern.py: it imports relatively (`from . import ...`) from its "
        "package cs_relpkg, which would not ship with it; pass the package's folder instead: --module cs_relpkg"
    )
    kern = project / "cs_relpkg" / "ops" / "kern.py"
    with pytest.raises(CodeError, match=rf"pass the package's folder instead: --module {project / 'cs_relpkg'}$"):
        CodeCollector(CodeSpec(modules=(kern,)))
    done = batuta("run", "job.py", "--workers", "1", "--json", "--module", "cs_relpkg", cwd=project)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["result"] == 42


async def test_a_kernel_of_a_package_imported_here_but_not_sent_says_to_send_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hint named the module's own file: sent alone, it failed on the hosts on its
    package's relative imports, and the tasks gave the same hint again."""
    from batuta.kernels import registry

    package = relative_package(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import cs_relpkg.ops.kern  # noqa: F401

    try:
        async with Pool.local(1, gpu_workers="none") as pool:
            result = await pool.run(Task.kernel("cs_relpkg_scale", 14))
        assert result.error == (
            f"kernel 'cs_relpkg_scale' is unknown on the hosts: here it comes from {package / 'ops' / 'kern.py'}, "
            f"of the package {package}, which this pool does not send them; pass "
            f"Pool.local(..., modules=[{str(package)!r}]) or Pool.builder().modules([...]) (batuta run: --module)"
        )
        async with Pool.local(1, gpu_workers="none", modules=[str(package)]) as pool:  # the hint, followed
            assert (await pool.run(Task.kernel("cs_relpkg_scale", 14))).value == 42
    finally:
        registry.unregister("cs_relpkg_scale")
        for name in ("cs_relpkg.ops.kern", "cs_relpkg.ops", "cs_relpkg.consts", "cs_relpkg"):
            sys.modules.pop(name, None)


def test_batuta_run_code_errors_are_one_line_and_exit_2(project: Path, tmp_path: Path) -> None:
    done = batuta(
        "run", str(project / "my_job.py"), "--workers", "1", "--module", str(tmp_path / "nope.py"), cwd=tmp_path
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"batuta: error: --module {tmp_path / 'nope.py'}: no such file or folder; give a .py file or a package folder"
    ]


@pytest.mark.parametrize("given", [".", "", "{project}"])
def test_module_naming_the_jobs_own_folder_is_refused_with_the_fix(project: Path, given: str) -> None:
    """Shipped as a package named after the folder, its modules registered their kernels a
    second time beside the job's own imports of the same files ("already registered")."""
    module = given.format(project=project)
    done = batuta("run", "my_job.py", "--workers", "1", "--module", module, cwd=project)
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert "the job's own folder, whose modules the job imports are sent already" in line
    assert "name the kernel module files (--module kernels.py)" in line


def test_batuta_tui_refuses_a_bad_module_before_the_screen_takes_over(tmp_path: Path) -> None:
    done = batuta("tui", "--workers", "1", "--module", str(tmp_path / "nope.py"), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"batuta: error: --module {tmp_path / 'nope.py'}: no such file or folder; give a .py file or a package folder"
    ]


def test_the_code_limit_is_bounded_by_what_one_frame_carries() -> None:
    from batuta.errors import UsageError

    bad_limits: list[Any] = [0, 256 * 2**20, 1.5]
    for bad in bad_limits:
        with pytest.raises(UsageError, match=r"give a number of bytes from 1 to 255 MiB"):
            Pool.builder().code_limit(bad)


def test_only_the_users_kernels_are_keyed_by_the_code_digest(project: Path, tmp_path: Path) -> None:
    """What a journal keys by the code (ShippedCode): the user's kernels and those unknown here,
    not built-ins, not kernels of installed modules, not binaries, and nothing without code."""
    code = CodeCollector(CodeSpec(job_files=(project / "my_job.py",))).bundle()
    assert code is not None
    shipped = ShippedCode([code, code])
    assert shipped.digest == code.digest
    assert shipped.digest_for(Task.kernel("cs_value", 1).call) == code.digest  # registered on the hosts only
    assert shipped.digest_for(Task.kernel("cs_kernels:cs_value", 1).call) == code.digest
    assert shipped.digest_for(Task.kernel("noop", 1).call) == ""
    assert shipped.digest_for(Task.kernel("json:dumps", 1).call) == ""  # the standard library's, not the user's
    assert shipped.digest_for(Task.binary("/bin/true").call) == ""
    assert ShippedCode([None]).digest_for(Task.kernel("cs_value", 1).call) == ""
    write(tmp_path / "other", {"cs_other.py": "X = 2\n"})
    other = CodeCollector(CodeSpec(modules=(tmp_path / "other" / "cs_other.py",))).bundle()
    assert other is not None
    both = ShippedCode([code, other, None])  # hosts naming different kernel_modules: one digest over both
    assert both.digest not in ("", code.digest, other.digest) and both.digest == ShippedCode([other, code]).digest


async def test_a_kernel_imported_here_but_not_sent_says_which_file_to_send(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A script imports its kernels from mykernels.py and starts Pool.local() without
    modules=: the host answered "unknown kernel ... to add one, decorate a function with
    @kernel", about a function that is decorated; only here is it known where it comes from."""
    from batuta.kernels import registry

    write(tmp_path, {"cs_unsent.py": "from batuta import kernel\n\n@kernel('cs_unsent')\ndef f(x):\n    return x\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    import cs_unsent  # noqa: F401

    path = str(tmp_path / "cs_unsent.py")
    try:
        async with Pool.local(1, gpu_workers="none") as pool:
            for name in ("cs_unsent", "cs_unsent:cs_unsent"):
                result = await pool.run(Task.kernel(name, 1))
                assert result.error == (
                    f"kernel {name!r} is unknown on the hosts: here it comes from {path}, which this pool does "
                    f"not send them; pass Pool.local(..., modules=[{path!r}]) or Pool.builder().modules([...]) "
                    "(batuta run: --module)"
                )
        async with Pool.local(1, gpu_workers="none", modules=[path]) as pool:  # sent: it runs
            assert (await pool.run(Task.kernel("cs_unsent", 7))).value == 7
    finally:
        registry.unregister("cs_unsent")
        sys.modules.pop("cs_unsent", None)


def test_a_kernel_defined_in_the_job_file_says_to_move_it_or_send_the_job_file(tmp_path: Path) -> None:
    """A newcomer's kernel in the job file itself: each task said to pass Pool.local(...,
    modules=[...]) with the file's absolute path, an API a `batuta run` user never called."""
    job = (
        "from batuta import Task, kernel\n\n"
        "@kernel('cs_in_job')\ndef twice(x):\n    return 2 * x\n\n"
        "async def main(pool):\n    return (await pool.run(Task.kernel('cs_in_job', 21))).unwrap()\n"
    )
    write(tmp_path, {"cs_job.py": job})
    done = batuta("run", "cs_job.py", "--workers", "1", "--json", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    said = (
        "kernel 'cs_in_job' is unknown on the hosts: here it is defined in the job file cs_job.py, which they do "
        "not import; move it to a module beside the job file and import that from the job (it ships with the "
        "job), or send the job file too: --module cs_job.py"
    )
    assert json.loads(done.stdout)["failures"][0]["reason"] == said
    done = batuta("run", "cs_job.py", "--workers", "1", "--json", "--module", "cs_job.py", cwd=tmp_path)
    assert done.returncode == 0, done.stderr  # the hint, followed
    assert json.loads(done.stdout)["result"] == 42


async def test_a_sent_module_that_fails_to_import_there_says_why_not_that_it_was_not_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A module imported here and sent, whose import fails on the hosts (a data file left
    here): every task said it was not sent and to pass --module, which it was."""
    from batuta.kernels import registry

    source = (
        "from pathlib import Path\nfrom batuta import kernel\n\n"
        "VALUE = (Path(__file__).parent / 'cs_data.txt').read_text()\n\n"
        "@kernel('cs_sent_bad')\ndef f(x):\n    return x\n"
    )
    write(tmp_path, {"cs_sent_bad.py": source, "cs_data.txt": "1"})  # a single file travels alone
    monkeypatch.syspath_prepend(str(tmp_path))
    import cs_sent_bad  # noqa: F401

    try:
        async with Pool.local(1, gpu_workers="none", modules=[str(tmp_path / "cs_sent_bad.py")]) as pool:
            error = (await pool.run(Task.kernel("cs_sent_bad", 1))).error
        assert error is not None and "importing cs_sent_bad failed: FileNotFoundError" in error, error
        assert "does not send" not in error
    finally:
        registry.unregister("cs_sent_bad")
        sys.modules.pop("cs_sent_bad", None)


async def test_a_data_file_beside_the_code_that_was_not_sent_is_said_so(tmp_path: Path) -> None:
    """A module that reads a file beside it at import (`Path(__file__).parent / "factor.txt"`),
    where that file was not sent (a single-file module travels alone; a .batutaignore left it
    out): the error named only the host's cache path, where the file was missing, not why."""
    from batuta.kernels import registry

    reader = (
        "from pathlib import Path\nfrom batuta import kernel\n\n"
        "FACTOR = float((Path(__file__).parent / {name!r}).read_text())\n\n"
        "@kernel({kernel!r})\ndef f(x):\n    return x * FACTOR\n"
    )
    write(
        tmp_path,
        {
            "single/cs_single.py": reader.format(name="factor.txt", kernel="cs_single"),
            "single/factor.txt": "5",
            "cs_ignpkg/__init__.py": "",
            "cs_ignpkg/.batutaignore": "data/\n",
            "cs_ignpkg/kern.py": reader.format(name="data/factor.txt", kernel="cs_ignpkg"),
            "cs_ignpkg/data/factor.txt": "5",
        },
    )
    single, package = tmp_path / "single" / "cs_single.py", tmp_path / "cs_ignpkg"
    try:
        async with Pool.local(1, gpu_workers="none", modules=[single, package]) as pool:
            errors = [(await pool.run(Task.kernel(name, 2.0))).error or "" for name in ("cs_single", "cs_ignpkg")]
    finally:
        registry.unregister("cs_single")
        registry.unregister("cs_ignpkg")
    assert (
        f"/factor.txt' (not sent: a single-file module travels alone, without {tmp_path / 'single' / 'factor.txt'} "
        "beside it: put both in a package folder, or give the data to the tasks as an argument or with pool.put) "
        f"(at {single}:4)"
    ) in errors[0], errors[0]
    assert (
        f"/cs_ignpkg/data/factor.txt' (not sent: {package / 'data' / 'factor.txt'} is left out of its package "
        "(a .batutaignore lists it, or it is hidden): let it ship, or give the data to the tasks as an argument "
        f"or with pool.put) (at {package / 'kern.py'}:4)"
    ) in errors[1], errors[1]


def regular_package(folder: Path) -> Path:
    """A package with an empty __init__.py, its kernels in modules of its own."""
    write(
        folder,
        {
            "cs_regpkg/__init__.py": "",
            "cs_regpkg/helpers.py": "def twice(x):\n    return 2 * x\n",
            "cs_regpkg/kern.py": (
                "from batuta import kernel\n\nfrom .helpers import twice\n\n\n"
                "@kernel('cs_regpkg_twice')\ndef cs_regpkg_twice(x):\n    return twice(x)\n"
            ),
            "cs_regpkg/sub/__init__.py": "from batuta import kernel\n\nkernel('cs_regpkg_sub')(lambda: 3)\n",
        },
    )
    return folder / "cs_regpkg"


def test_a_package_module_path_imports_its_kernel_modules_on_the_hosts(tmp_path: Path) -> None:
    """`modules=["mypkg"]` with an empty __init__.py: the hosts imported `mypkg` alone, its
    kernels in `mypkg/kern.py` never registered, and every task failed "unknown kernel ...
    decorate a function with @kernel", about functions that were decorated."""
    code = CodeCollector(CodeSpec(modules=(regular_package(tmp_path),))).bundle()
    assert code is not None and code.modules == ("cs_regpkg", "cs_regpkg.kern", "cs_regpkg.sub")


async def test_a_package_module_paths_kernels_run(tmp_path: Path) -> None:
    async with Pool.local(1, gpu_workers="none", modules=[regular_package(tmp_path)]) as pool:
        result = await pool.run(Task.kernel("cs_regpkg_twice", 21))
    assert (result.status, result.value, result.error) == (TaskStatus.SUCCEEDED, 42, None)
