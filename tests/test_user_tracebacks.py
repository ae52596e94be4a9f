"""What a user reads when a kernel of theirs fails on a host: their own file's path (not the
host's copy in its code cache), and where the whole traceback is.

The pools are real (a local agent, the session's cache folder: tests/conftest.py).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from batuta.core.task import Task, TaskStatus
from batuta.runtime.code import CodeCollector, CodeSpec, ShippedCode
from batuta.runtime.pool import Pool

FAILING = """\
import numpy as np
from batuta import kernel


def _helper(x):
    return x[10**9]  # line 6: IndexError


@kernel("tb_fails")
def tb_fails(x):
    print("about to fail")
    return float(_helper(np.asarray(x)))


tb_fails.cpu(tb_fails.reference)


@kernel("tb_prints")
def tb_prints(x):
    import sys

    print("a warning of mine", file=sys.stderr)
    return x


tb_prints.cpu(tb_prints.reference)
"""


async def test_a_failed_kernels_traceback_names_the_users_file_and_its_error_the_line(tmp_path: Path) -> None:
    path = tmp_path / "tb_kernels.py"
    path.write_text(FAILING)
    async with Pool.local(1, gpu_workers="none", modules=[path]) as pool:
        failed = await pool.run(Task.kernel("tb_fails", [1.0, 2.0]))
        fine = await pool.run(Task.kernel("tb_prints", 3))
    assert failed.status is TaskStatus.FAILED
    stderr = failed.stderr_str()
    assert f'File "{path}", line 6, in _helper' in stderr, stderr
    assert f'File "{path}", line 12, in tb_fails' in stderr, stderr
    # from the kernel's frame on: batuta's runner and registry that called it are none of the user's
    assert stderr.splitlines()[:2] == ["Traceback (most recent call last):", f'  File "{path}", line 12, in tb_fails']
    # the host's copy is said once, on the last line, with the host
    assert stderr.count("/code/") == 1, stderr
    last = stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith("[batuta: host local ran its copies of these files, in ") and f"/code/{failed.code}/" in last
    # the one line ends with the innermost frame of the user's, as editors open it
    assert failed.error == f"IndexError: index 1000000000 is out of bounds for axis 0 with size 2 (at {path}:6)"
    assert failed.stdout_str() == "about to fail\n"
    # a success is left as the host said it
    assert (fine.status, fine.value, fine.stderr_str()) == (TaskStatus.SUCCEEDED, 3, "a warning of mine\n")


async def test_a_module_that_fails_to_import_is_named_by_the_users_path(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`import_errors()`, the log's line and the tasks' error name the user's file, as editors
    open it, not its path in the bundle ("SyntaxError: ... (at tb_broken.py line 4)")."""
    broken = tmp_path / "tb_broken.py"
    broken.write_text("from batuta import kernel\n\n\nx = (\n")
    needs = tmp_path / "tb_needs.py"
    needs.write_text("import numpy\nimport tb_missing_package_xyz\n")
    caplog.set_level(logging.WARNING, logger="batuta")
    async with Pool.local(1, gpu_workers="none") as pool:
        shipped = await pool.ship([broken, needs])
        errors = await shipped.import_errors()
        failed = await pool.run(Task.kernel("tb_lost"))
    said = {
        "tb_broken": f"SyntaxError: '(' was never closed (at {broken}:4)",
        "tb_needs": (
            "ModuleNotFoundError: No module named 'tb_missing_package_xyz' (install 'tb_missing_package_xyz' for "
            f"this host's Python ({sys.executable}), or ship it with --module) (at {needs}:2)"
        ),
    }
    assert errors == {"local": said}
    logged = [r.getMessage() for r in caplog.records if "importing" in r.getMessage()]
    assert logged == [f"host local: importing {module} failed: {error}" for module, error in said.items()]
    assert failed.error == (
        f"kernel 'tb_lost' is unknown on host local: importing tb_broken failed: {said['tb_broken']}; "
        f"importing tb_needs failed: {said['tb_needs']}"
    )


def _stand_in_site_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A site-packages on the coordinator's import path (not the host agent's) holding package
    tb_installed_xyz, which distribution tb-dist-xyz installs."""
    from batuta.runtime import missing_package

    site = tmp_path / "site-packages"
    (site / "tb_installed_xyz").mkdir(parents=True)
    (site / "tb_installed_xyz" / "__init__.py").write_text("")
    info = site / "tb_dist_xyz-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tb-dist-xyz\nVersion: 1.0\n")
    (info / "top_level.txt").write_text("tb_installed_xyz\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(missing_package, "site_package_roots", lambda: (str(site.resolve()) + "/",))
    return site


async def test_a_package_installed_on_the_coordinator_and_missing_on_a_host_says_pip_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ "(install 'scipy' for this host's Python, or ship it with --module)": --module is no way
    to ship a third-party package. One installed here in site-packages (here a stand-in
    site-packages the host's Python lacks) is said as pip's, naming the host's Python and the
    distribution that installs it (import name tb_installed_xyz, distribution tb-dist-xyz)."""
    from batuta.runtime import missing_package

    _stand_in_site_packages(tmp_path, monkeypatch)
    needs = tmp_path / "mods" / "tb_needs_installed.py"
    needs.parent.mkdir()
    needs.write_text(
        "import tb_installed_xyz\nfrom batuta import kernel\n\n\n@kernel('tb_needs_kernel')\ndef k():\n    return 1\n"
    )
    async with Pool.local(1, gpu_workers="none") as pool:
        shipped = await pool.ship([needs])
        errors = await shipped.import_errors()
        failed = await pool.run(Task.kernel("tb_needs_kernel"))
    installed = (
        "ModuleNotFoundError: No module named 'tb_installed_xyz' ('tb_installed_xyz' is a package installed on the "
        f"coordinator, not code of yours to ship: install it on this host, `{sys.executable} -m pip install "
        f"tb-dist-xyz`) (at {needs}:1)"
    )
    assert errors == {"local": {"tb_needs_installed": installed}}
    assert (
        failed.error
        == f"kernel 'tb_needs_kernel' is unknown on host local: importing tb_needs_installed failed: {installed}"
    )

    def said(top: str) -> str:  # as a host says it
        python = "/opt/py 3/python"
        return f"No module named {top!r} (install {top!r} for this host's Python ({python}), or ship it with --module)"

    # the host's Python quoted for a shell; a package found nowhere here may be the user's to ship: both fixes stay
    assert missing_package.missing_package_fix(said("tb_installed_xyz")) == (
        "No module named 'tb_installed_xyz' ('tb_installed_xyz' is a package installed on the coordinator, not "
        "code of yours to ship: install it on this host, `'/opt/py 3/python' -m pip install tb-dist-xyz`)"
    )
    assert missing_package.missing_package_fix(said("tb_missing_package_xyz")) == said("tb_missing_package_xyz")
    # found here outside site-packages: the user's own code, which --module ships
    monkeypatch.setattr(missing_package, "site_package_roots", lambda: ())
    assert missing_package.missing_package_fix(said("tb_installed_xyz")) == said("tb_installed_xyz")


def test_batuta_stack_names_the_users_file_of_a_module_that_failed_to_import(tmp_path: Path) -> None:
    """`batuta stack check`'s finding for a shipped module that failed on a node named the
    bundle's path ("fix the file and line named on the coordinator", which it did not name)."""
    from batuta.protocol import messages as m
    from batuta.stack.code import code_findings

    module = tmp_path / "tb_stack_broken.py"
    module.write_text("x = (\n")
    bundle = CodeCollector(CodeSpec(modules=(module,))).bundle()
    assert bundle is not None
    said = "SyntaxError: '(' was never closed (at tb_stack_broken.py line 1)"  # as the agent says it
    loaded = m.CodeLoaded(digest=bundle.digest, errors={"tb_stack_broken": said})
    (finding,) = code_findings("n1", bundle, loaded)
    assert finding.message == f"importing tb_stack_broken failed: SyntaxError: '(' was never closed (at {module}:1)"


def test_only_paths_into_a_bundle_of_this_pool_are_replaced_longest_name_first(tmp_path: Path) -> None:
    package = tmp_path / "tb_pkg"
    for name in ("__init__.py", "mod.py", "mod.py.bak.py", "sub/__init__.py", "sub/deep.py"):
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text("X = 1\n")
    bundle = CodeCollector(CodeSpec(modules=(package,))).bundle()
    assert bundle is not None
    shipped = ShippedCode([bundle])
    cache = f"/home/u/.cache/batuta/code/{bundle.digest}/"
    other = f"/home/u/.cache/batuta/code/{'0' * 64}/tb_pkg/mod.py"
    stderr = textwrap.dedent(
        f"""\
        Traceback (most recent call last):
          File "{cache}tb_pkg/sub/deep.py", line 3, in f
          File "{cache}tb_pkg/mod.py.bak.py", line 4, in g
          File "{other}", line 5, in h
        {cache}tb_pkg/mod.py:7: RuntimeWarning: overflow
        During: typing of intrinsic-call at ../..{cache}tb_pkg/mod.py (8)
        ValueError: bad
        """
    ).encode()
    mapped = shipped.user_paths(stderr, "gpu1").decode()
    assert mapped.splitlines() == [
        "Traceback (most recent call last):",
        f'  File "{package}/sub/deep.py", line 3, in f',
        f'  File "{package}/mod.py.bak.py", line 4, in g',
        f'  File "{other}", line 5, in h',  # another pool's, or an edited file's old bundle: left as it is
        f"{package}/mod.py:7: RuntimeWarning: overflow",
        f"During: typing of intrinsic-call at {package}/mod.py (8)",  # numba's, relative to where the slot runs
        "ValueError: bad",
        f"[batuta: host gpu1 ran its copies of these files, in {cache}]",
    ]
    # nothing of a bundle in it: as it was
    assert shipped.user_paths(b"ValueError: bad\n", "gpu1") == b"ValueError: bad\n"
    assert ShippedCode().user_paths(stderr, "gpu1") == stderr


def test_task_failed_error_says_where_the_traceback_or_stderr_is() -> None:
    from batuta import TaskFailedError, TaskResult

    def raised(stderr: bytes = b"", exit_code: int | None = None) -> str:
        result = TaskResult(
            task_id=4, name="k", status=TaskStatus.FAILED, error="boom", host="h", slot="h/0", stderr=stderr,
            exit_code=exit_code,
        )  # fmt: skip
        with pytest.raises(TaskFailedError) as caught:
            result.unwrap()
        assert caught.value.result is result
        return str(caught.value)

    head = "task 4 (k) failed on h/0 after 0 attempt(s): boom"
    kernel = b'printed first\nTraceback (most recent call last):\n  File "k.py", line 1, in k\nValueError: boom\n'
    assert raised(stderr=kernel) == f"{head}; its traceback is in result.stderr (this error's .result)"
    assert raised(stderr=b"cp: no such file\n", exit_code=1) == (
        f"{head}; what it wrote to stderr is in result.stderr (this error's .result)"
    )
    assert raised() == head  # nothing more to see: nothing said


async def test_pool_map_raises_saying_where_the_traceback_is(tmp_path: Path) -> None:
    from batuta import TaskFailedError, TaskResult

    path = tmp_path / "tb_kernels.py"
    path.write_text(FAILING)
    async with Pool.local(1, gpu_workers="none", modules=[path]) as pool:
        with pytest.raises(TaskFailedError) as caught:
            await pool.map("tb_fails", [[1.0]])
    message = str(caught.value)
    assert message.endswith(f"(at {path}:6); its traceback is in result.stderr (this error's .result)"), message
    result = caught.value.result
    assert isinstance(result, TaskResult) and f'File "{path}", line 6' in result.stderr_str()


def test_batuta_run_prints_the_failed_tasks_traceback_when_the_job_raises_it(tmp_path: Path) -> None:
    (tmp_path / "tb_kernels.py").write_text(FAILING)
    (tmp_path / "tb_job.py").write_text(
        "import tb_kernels  # noqa: F401\n\nasync def main(pool):\n    return await pool.map('tb_fails', [[1.0]])\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "batuta", "run", "tb_job.py", "--workers", "1", "--quiet"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 1, done.stderr
    lines = done.stderr.rstrip().splitlines()
    start = lines.index("task 1 (tb_fails) wrote to stderr:")
    assert lines[start + 1] == "Traceback (most recent call last):", done.stderr
    assert f'File "{tmp_path / "tb_kernels.py"}", line 6, in _helper' in done.stderr, done.stderr
    assert lines[-1].startswith("batuta: error: job 'tb_job.py' raised TaskFailedError at tb_job.py:4: "), lines[-1]


def test_batuta_stack_says_pip_install_for_a_package_installed_on_the_coordinator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`batuta stack check`'s suggestion for a node lacking a package installed here in
    site-packages was "or ship it with --module PATH", which cannot ship a third-party package
    (its message already said pip); a package found nowhere here keeps both fixes."""
    from batuta.protocol import messages as m
    from batuta.stack.code import code_findings, coordinator_import_findings

    _stand_in_site_packages(tmp_path, monkeypatch)
    module = tmp_path / "tb_stack_needs.py"
    module.write_text("import tb_installed_xyz\n")
    bundle = CodeCollector(CodeSpec(modules=(module,))).bundle()
    assert bundle is not None

    def said(top: str) -> str:  # as the agent says it
        return (
            f"ModuleNotFoundError: No module named {top!r} (install {top!r} for this host's Python (/opt/py/python), "
            "or ship it with --module) (at tb_stack_needs.py line 1)"
        )

    loaded = m.CodeLoaded(digest=bundle.digest, errors={"tb_stack_needs": said("tb_installed_xyz")})
    (finding,) = code_findings("n1", bundle, loaded)
    assert "-m pip install tb-dist-xyz" in finding.message
    assert (
        finding.suggestion == "install the missing package for n1's Python: `/opt/py/python -m pip install tb-dist-xyz`"
    )
    loaded = m.CodeLoaded(digest=bundle.digest, errors={"tb_stack_needs": said("tb_nowhere_xyz")})
    (finding,) = code_findings("n1", bundle, loaded)
    assert finding.suggestion == "install the missing package for n1's Python, or ship it with --module PATH"

    # `stack gate`: a module installed here that does not import here is no code to ship either
    error = "ModuleNotFoundError: No module named 'tb_dep_xyz'"
    (installed,) = coordinator_import_findings("coordinator", {"tb_installed_xyz": error})
    assert installed.suggestion == (
        "tb_installed_xyz is installed on the coordinator (tb-dist-xyz) but does not import there: install what "
        f"the error says it lacks for the coordinator's Python ({sys.executable}), or reinstall tb-dist-xyz"
    )
    (unknown,) = coordinator_import_findings("coordinator", {"tb_nowhere_xyz": error})
    assert unknown.suggestion == (
        "make tb_nowhere_xyz importable on the coordinator too (install it, or ship it with --module PATH)"
    )
