"""The user's code on a host: a real agent process sent `Code` bundles (see batuta/agent/code.py).

Each agent gets its own cache folder through XDG_CACHE_HOME, so nothing is found by accident.
Slot PIDs come from the kernels themselves (`os.getpid()`), so "replaced" is what the slot
that ran the task says, not a guess from the process table.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
import types
from pathlib import Path

import pytest

from batuta.agent.code import CODE_FOLDER, TEMP_PREFIX, CodeLoader, cache_root, install, prune
from batuta.core.task import KernelCall, Outcome
from batuta.protocol.messages import (
    Code,
    CodeFile,
    CodeLoaded,
    CodeStored,
    Run,
    SlotChanged,
    TaskRequest,
    code_digest,
)
from tests.test_agent_harness import BOTH_SPAWN_MODES, AgentProcess, StartAgent, start_agent, still_alive

__all__ = ["start_agent"]  # a fixture, imported to be found by pytest

KERNELS = """\
import os
from batuta.kernels import kernel

VERSION = {version}


@kernel("cs_whoami")
def cs_whoami():
    return [VERSION, os.getpid()]


cs_whoami.cpu(cs_whoami.reference)


@kernel("cs_block")
def cs_block(fifo):
    with open(fifo) as released:  # returns once the test writes a line to the FIFO
        return released.readline().strip()


cs_block.cpu(cs_block.reference)
"""


def bundle(files: dict[str, str | bytes], modules: tuple[str, ...]) -> Code:
    entries = tuple(
        CodeFile(path=path, data=data.encode() if isinstance(data, str) else data) for path, data in files.items()
    )
    return Code(digest=code_digest(entries, modules), modules=modules, files=entries)


def task(task_id: int, name: str, *args: object, code: Code | None = None, slot: int = 0) -> TaskRequest:
    return TaskRequest(
        task_id=task_id, slot=slot, attempt=1, call=KernelCall(name=name, args=args), code=code.digest if code else ""
    )


async def loaded(agent: AgentProcess, code: Code) -> CodeLoaded:
    agent.send(code)
    return await agent.message(CodeLoaded, lambda m: m.digest == code.digest)


@pytest.fixture
def cache(tmp_path: Path) -> dict[str, str]:
    return {"XDG_CACHE_HOME": str(tmp_path / "cache")}


@BOTH_SPAWN_MODES
async def test_new_code_replaces_the_slots_and_old_tasks_are_refused(
    start_agent: StartAgent, cache: dict[str, str], tmp_path: Path
) -> None:
    agent = await start_agent("--slots", "1", "--gpus", "none", "--name", "h1", env=cache)
    first = bundle({"cs_mod.py": KERNELS.format(version=1)}, ("cs_mod",))
    assert (await loaded(agent, first)).errors == {}
    agent.send(Run(tasks=(task(1, "cs_whoami", code=first),)))
    one = await agent.outcome(1)
    assert one.status is Outcome.OK, one
    version, first_pid = one.value

    second = bundle({"cs_mod.py": KERNELS.format(version=2)}, ("cs_mod",))
    assert second.digest != first.digest
    assert (await loaded(agent, second)).errors == {}
    agent.send(Run(tasks=(task(2, "cs_whoami", code=second), task(3, "cs_whoami", code=first))))
    two, stale = await agent.outcomes_for([2, 3])
    assert (version, two.status, two.value[0]) == (1, Outcome.OK, 2)
    assert two.value[1] != first_pid  # a new slot process: the one that imported version 1 is gone
    assert await still_alive([first_pid]) == []
    assert stale.status is Outcome.ERROR
    assert stale.error == (
        f"task 3 must run with code {first.digest[:12]}, but host h1 has code {second.digest[:12]}: "
        "not run, so that no task runs stale code"
    )
    assert agent.of_type(SlotChanged) == []  # a replacement for new code is not a restart
    stored = sorted(p.name for p in (tmp_path / "cache" / "batuta" / CODE_FOLDER).iterdir())
    assert stored == sorted([first.digest, second.digest])


async def test_tasks_queued_for_old_code_are_refused_when_the_code_changes(
    start_agent: StartAgent, cache: dict[str, str], tmp_path: Path
) -> None:
    agent = await start_agent("--slots", "1", "--gpus", "none", "--name", "h1", env=cache)
    first = bundle({"cs_mod.py": KERNELS.format(version=1)}, ("cs_mod",))
    second = bundle({"cs_mod.py": KERNELS.format(version=2)}, ("cs_mod",))
    await loaded(agent, first)
    # one task runs (until the test lets it end) while two wait for the slot; then the code changes
    fifo = tmp_path / "release"
    os.mkfifo(fifo)
    agent.send(
        Run(
            tasks=(
                task(1, "cs_block", str(fifo), code=first),
                task(2, "noop", 2, code=first),
                task(3, "noop", 3, code=first),
            )
        )
    )
    await agent.started_task(1)
    await loaded(agent, second)
    agent.send(Run(tasks=(task(4, "cs_whoami", code=second),)))
    release = os.open(fifo, os.O_RDWR)  # never blocks; the kernel's open returns once it is there
    try:
        os.write(release, b"done\n")
        running, queued_a, queued_b, new = await agent.outcomes_for([1, 2, 3, 4])
    finally:
        os.close(release)
    assert (running.status, running.value) == (Outcome.OK, "done"), running  # it ran with the code it was sent for
    assert {queued_a.status, queued_b.status} == {Outcome.ERROR}
    assert "must run with code" in (queued_a.error or "") and "now has code" in (queued_a.error or "")
    assert (new.status, new.value[0]) == (Outcome.OK, 2)


async def test_code_is_answered_stored_before_the_import_and_a_task_sent_meanwhile_waits_for_it(
    start_agent: StartAgent, cache: dict[str, str], tmp_path: Path
) -> None:
    """`CodeStored` goes out once the files are written, before the import (`ship` waits for
    that answer only); a task for the new code sent before `CodeLoaded` waits for the import and
    runs with the new code, and one for the old code is refused: never run with either."""
    agent = await start_agent("--slots", "1", "--gpus", "none", "--name", "h1", env=cache)
    first = bundle({"cs_mod.py": KERNELS.format(version=1)}, ("cs_mod",))
    await loaded(agent, first)
    agent.send(Run(tasks=(task(1, "cs_whoami", code=first),)))
    assert (await agent.outcome(1)).value[0] == 1
    gate = tmp_path / "import-gate"
    os.mkfifo(gate)
    gated = KERNELS.format(version=2) + f"\nwith open({str(gate)!r}) as gate:  # importing waits for the test\n"
    second = bundle({"cs_mod.py": gated + "    gate.readline()\n"}, ("cs_mod",))
    agent.send(second)
    await agent.message(CodeStored, lambda m: m.digest == second.digest)
    assert [answer.digest for answer in agent.of_type(CodeLoaded)] == [first.digest]  # importing: held at the gate
    agent.send(Run(tasks=(task(2, "cs_whoami", code=second), task(3, "cs_whoami", code=first))))
    release = os.open(gate, os.O_RDWR)  # never blocks; the module's open returns once it is there
    try:
        os.write(release, b"go\n")
        answer = await agent.message(CodeLoaded, lambda m: m.digest == second.digest)
        new, stale = await agent.outcomes_for([2, 3])
    finally:
        os.close(release)
    assert answer.errors == {}
    assert (new.status, new.value[0]) == (Outcome.OK, 2)
    assert stale.status is Outcome.ERROR and f"but host h1 has code {second.digest[:12]}" in (stale.error or "")
    kinds = [(type(m).__name__, m.digest) for m in agent.messages if isinstance(m, CodeStored | CodeLoaded)]
    assert kinds == [
        ("CodeStored", first.digest),
        ("CodeLoaded", first.digest),
        ("CodeStored", second.digest),
        ("CodeLoaded", second.digest),
    ]


@BOTH_SPAWN_MODES
async def test_a_module_that_fails_to_import_fails_its_kernels_not_the_agent(
    start_agent: StartAgent, cache: dict[str, str]
) -> None:
    agent = await start_agent("--slots", "1", "--gpus", "none", "--name", "h1", env=cache)
    code = bundle(
        {
            "cs_good.py": KERNELS.format(version=7),
            "cs_broken.py": "from batuta.kernels import kernel\n\n\nx = (\n",
            "cs_needs.py": "import numpy\nimport cs_missing_package_xyz\n",
        },
        ("cs_broken", "cs_needs", "cs_good"),
    )
    answer = await loaded(agent, code)
    assert answer.errors == {
        "cs_broken": "SyntaxError: '(' was never closed (at cs_broken.py line 4)",
        "cs_needs": (
            "ModuleNotFoundError: No module named 'cs_missing_package_xyz' (install 'cs_missing_package_xyz' "
            f"for this host's Python ({sys.executable}), or ship it with --module) (at cs_needs.py line 2)"
        ),
    }
    agent.send(
        Run(tasks=(task(1, "cs_lost", code=code), task(2, "cs_whoami", code=code), task(3, "noop", 5, code=code)))
    )
    lost, good, builtin = await agent.outcomes_for([1, 2, 3])
    assert lost.status is Outcome.ERROR
    assert lost.error == (
        "kernel 'cs_lost' is unknown on host h1: importing cs_broken failed: SyntaxError: '(' was never closed "
        "(at cs_broken.py line 4); importing cs_needs failed: ModuleNotFoundError: No module "
        f"named 'cs_missing_package_xyz' (install 'cs_missing_package_xyz' for this host's Python ({sys.executable}), "
        "or ship it with --module) (at cs_needs.py line 2)"
    )
    assert (good.status, good.value[0]) == (Outcome.OK, 7)
    assert (builtin.status, builtin.value) == (Outcome.OK, 5)
    assert agent.protocol_error is None and agent.proc.returncode is None


async def test_a_bundle_an_agent_runs_is_never_pruned_by_another_run(
    start_agent: StartAgent, cache: dict[str, str], tmp_path: Path
) -> None:
    """Other runs on the host prune the code folder to its 8 newest bundles: a long job's
    bundle was removed under it, and its tasks failed reading their package's files."""
    agent = await start_agent("--slots", "1", "--gpus", "none", "--name", "h1", env=cache)
    root = tmp_path / "cache" / "batuta"
    first = bundle({"cs_mod.py": KERNELS.format(version=1)}, ("cs_mod",))
    assert (await loaded(agent, first)).errors == {}
    agent.send(Run(tasks=(task(1, "cs_whoami", code=first),)))
    _, first_pid = (await agent.outcome(1)).value
    assert prune(root, keep=0) == []  # in use by the agent and its slot: kept
    assert (root / CODE_FOLDER / first.digest / "cs_mod.py").is_file()

    second = bundle({"cs_mod.py": KERNELS.format(version=2)}, ("cs_mod",))
    assert (await loaded(agent, second)).errors == {}
    agent.send(Run(tasks=(task(2, "cs_whoami", code=second),)))
    assert (await agent.outcome(2)).value[0] == 2
    assert await still_alive([first_pid]) == []  # the slot that ran the first is gone: the first is free
    assert prune(root, keep=0) == [first.digest]
    assert sorted(p.name for p in (root / CODE_FOLDER).iterdir()) == [second.digest]


async def test_a_package_with_submodules_and_data(start_agent: StartAgent, cache: dict[str, str]) -> None:
    agent = await start_agent("--slots", "1", "--gpus", "none", env=cache)
    code = bundle(
        {
            "cs_pkg/__init__.py": "",
            "cs_pkg/util.py": "def scale():\n    return 3\n",
            "cs_pkg/sub/__init__.py": "",
            "cs_pkg/sub/kern.py": (
                "import os\nfrom batuta.kernels import kernel\nfrom cs_pkg.util import scale\nfrom . import consts\n\n"
                "@kernel('cs_pkg_k')\ndef k():\n"
                "    data = open(os.path.join(os.path.dirname(__file__), 'table.txt')).read()\n"
                "    return int(data) * scale() + consts.OFFSET\n\n"
                "k.cpu(k.reference)\n"
            ),
            "cs_pkg/sub/consts.py": "OFFSET = 1\n",
            "cs_pkg/sub/table.txt": "14",
        },
        ("cs_pkg.sub.kern",),
    )
    assert (await loaded(agent, code)).errors == {}
    agent.send(Run(tasks=(task(1, "cs_pkg_k", code=code),)))
    result = await agent.outcome(1)
    assert (result.status, result.value) == (Outcome.OK, 43)


async def test_tasks_naming_code_the_agent_was_never_sent_are_refused(start_agent: StartAgent) -> None:
    agent = await start_agent("--slots", "1", "--gpus", "none", "--name", "h1")
    for task_id, args in ((1, ()), (2, (7,))):  # with arguments or without
        call = KernelCall(name="noop", args=args)
        agent.send(Run(tasks=(TaskRequest(task_id=task_id, slot=0, attempt=1, call=call, code="a" * 64),)))
        refused = await agent.outcome(task_id)
        assert refused.status is Outcome.ERROR
        assert refused.error == (
            f"task {task_id} must run with code aaaaaaaaaaaa, but host h1 has code none: not run, "
            "so that no task runs stale code"
        )


# -- the cache, without processes ----------------------------------------------------------


def test_a_bundle_already_cached_is_reused_and_a_damaged_one_rewritten(tmp_path: Path) -> None:
    code = bundle({"m.py": "X = 1\n", "pkg/__init__.py": "", "pkg/d.bin": b"\x00\x01"}, ("m",))
    folder = install(code, tmp_path)
    assert folder == tmp_path / CODE_FOLDER / code.digest
    assert (folder / "pkg" / "d.bin").read_bytes() == b"\x00\x01"
    inode = (folder / "m.py").stat().st_ino
    (folder / "__pycache__").mkdir()  # what an import leaves there does not count as damage
    assert install(code, tmp_path) == folder
    assert (folder / "m.py").stat().st_ino == inode  # reused, not written again
    (folder / "m.py").write_text("X = 666\n")  # damaged (or edited by hand)
    assert install(code, tmp_path) == folder
    assert (folder / "m.py").read_text() == "X = 1\n"
    assert [p.name for p in (tmp_path / CODE_FOLDER).iterdir()] == [code.digest]  # nothing left aside


def test_prune_keeps_the_most_recently_used_and_removes_dead_temporaries(tmp_path: Path) -> None:
    base = tmp_path / CODE_FOLDER
    now = time.time()
    for age in range(10):
        folder = base / f"{age:064x}"
        folder.mkdir(parents=True)
        os.utime(folder, (now - age * 60, now - age * 60))
    old_temp, new_temp = base / f"{TEMP_PREFIX}old", base / f"{TEMP_PREFIX}new"
    old_temp.mkdir()
    new_temp.mkdir()
    os.utime(old_temp, (now - 7200, now - 7200))
    removed = prune(tmp_path, keep=8, now=now)
    assert sorted(removed) == sorted([f"{8:064x}", f"{9:064x}", old_temp.name])
    assert sorted(p.name for p in base.iterdir()) == sorted([*(f"{a:064x}" for a in range(8)), new_temp.name])


def test_cache_root_follows_xdg_and_falls_back_to_home(tmp_path: Path) -> None:
    assert cache_root({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "batuta"
    assert cache_root({"XDG_CACHE_HOME": "relative/ignored"}) == Path.home() / ".cache" / "batuta"
    assert cache_root({}) == Path.home() / ".cache" / "batuta"


def test_an_unwritable_cache_is_an_import_error_for_each_module_not_a_crash(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    loader = CodeLoader("h1", root=blocker)
    code = bundle({"m.py": "X = 1\n"}, ("m",))
    loaded_code = loader.load(code)
    assert loaded_code.digest == code.digest and loaded_code.directory is None
    assert loaded_code.errors["m"].startswith(f"cannot write the code under {blocker / CODE_FOLDER}: ")


def test_an_unwritable_cache_says_free_space_only_when_the_disk_is_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read-only home said "free space there", which frees nothing: the fix follows the errno."""
    import errno

    import batuta.agent.code as agent_code

    code = bundle({"m.py": "X = 1\n"}, ("m",))
    reasons = {}
    for number in (errno.EROFS, errno.ENOSPC):

        def refuse(code: object, root: Path, number: int = number) -> Path:
            raise OSError(number, os.strerror(number), str(root))

        monkeypatch.setattr(agent_code, "install", refuse)
        reasons[number] = CodeLoader("h1", root=tmp_path / str(number)).load(code).errors["m"]
    assert "Read-only file system" in reasons[errno.EROFS]
    assert "free space" not in reasons[errno.EROFS]
    assert reasons[errno.EROFS].endswith(
        "; make it writable, or set XDG_CACHE_HOME in the host's env to a folder with room"
    )
    assert reasons[errno.ENOSPC].endswith(
        "; free space there, or set XDG_CACHE_HOME in the host's env to a folder with room"
    )


def test_each_file_compiles_once_per_host_and_an_edit_compiles_only_what_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bytecode is kept beside the bundle as checked-hash pycs (even with PYTHONDONTWRITEBYTECODE),
    reused by a new bundle for the files it did not change, and names the new bundle's files."""
    import batuta.agent.code as host_code

    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    monkeypatch.setattr(sys, "path_hooks", list(sys.path_hooks))
    monkeypatch.setattr(sys, "path_importer_cache", dict(sys.path_importer_cache))
    monkeypatch.setattr(host_code, "_HOOKED", set())
    compiled: list[str] = []
    compile_source = host_code.BundleLoader.source_to_code

    def counting(self: host_code.BundleLoader, data: bytes, path: str) -> types.CodeType:
        compiled.append(Path(path).name)
        return compile_source(self, data, path)

    monkeypatch.setattr(host_code.BundleLoader, "source_to_code", counting)
    files: dict[str, str | bytes] = {
        "cs_bc/__init__.py": "from cs_bc import big, ver  # noqa: F401\n",
        "cs_bc/big.py": "def fail():\n    raise ValueError('from big')\n",
        "cs_bc/ver.py": "V = 1\n",
    }
    first = bundle(files, ("cs_bc",))
    edited = bundle({**files, "cs_bc/ver.py": "V = 2\n"}, ("cs_bc",))
    try:
        loader = CodeLoader("h1", root=tmp_path)
        assert loader.load(first).errors == {}
        assert sorted(compiled) == ["__init__.py", "big.py", "ver.py"]
        pyc = importlib.util.cache_from_source(str(tmp_path / CODE_FOLDER / first.digest / "cs_bc" / "big.py"))
        header = Path(pyc).read_bytes()[:16]
        assert header[:4] == importlib.util.MAGIC_NUMBER and int.from_bytes(header[4:8], "little") == 0b11

        compiled.clear()
        now = loader.load(edited)
        assert now.errors == {} and compiled == ["ver.py"]  # the others come from the first bundle's pycs
        assert sys.modules["cs_bc.ver"].V == 2
        big_file = sys.modules["cs_bc.big"].fail.__code__.co_filename
        assert big_file == str(tmp_path / CODE_FOLDER / edited.digest / "cs_bc" / "big.py")

        compiled.clear()
        again = CodeLoader("h1", root=tmp_path)  # a new agent on the same host
        loader._unload()
        assert again.load(first).errors == {} and compiled == []
        assert sys.modules["cs_bc.ver"].V == 1
        again._unload()
    finally:
        for name in [name for name in sys.modules if name == "cs_bc" or name.startswith("cs_bc.")]:
            del sys.modules[name]


def test_a_namespace_package_is_imported_and_unloaded_with_its_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Folders without __init__.py (namespace packages, at the top or inside a package) import
    from a bundle, and leave the module table with it: the next bundle's edit is what runs."""
    import batuta.agent.code as host_code

    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "path_hooks", list(sys.path_hooks))
    monkeypatch.setattr(sys, "path_importer_cache", dict(sys.path_importer_cache))
    monkeypatch.setattr(host_code, "_HOOKED", set())
    files: dict[str, str | bytes] = {"cs_ns/kern.py": "V = 1\n", "cs_np/__init__.py": "", "cs_np/deep/k.py": "W = 1\n"}
    first = bundle(files, ("cs_ns.kern", "cs_np.deep.k"))
    edited = bundle({**files, "cs_ns/kern.py": "V = 2\n", "cs_np/deep/k.py": "W = 2\n"}, ("cs_ns.kern", "cs_np.deep.k"))
    try:
        loader = CodeLoader("h1", root=tmp_path)
        assert loader.load(first).errors == {}
        assert (sys.modules["cs_ns.kern"].V, sys.modules["cs_np.deep.k"].W) == (1, 1)
        assert sys.modules["cs_ns"].__file__ is None  # a namespace package indeed
        assert loader.load(edited).errors == {}
        assert (sys.modules["cs_ns.kern"].V, sys.modules["cs_np.deep.k"].W) == (2, 2)
        loader._unload()
        assert not [name for name in sys.modules if name.split(".")[0] in ("cs_ns", "cs_np")]
    finally:
        for name in [name for name in sys.modules if name.split(".")[0] in ("cs_ns", "cs_np")]:
            del sys.modules[name]


def test_a_slot_refuses_a_task_for_other_code_even_if_the_agent_let_it_through() -> None:
    """The slot's own check: the last guard, behind the agent's and the supervisor's."""
    from batuta.agent.code import SlotCode
    from batuta.agent.slot import SlotWorker

    frames_in, unused_out = os.pipe()
    unused_in, frames_out = os.pipe()
    try:
        worker = SlotWorker(
            slot=2,
            frames_in=frames_in,
            frames_out=frames_out,
            kernel_modules=(),
            code=SlotCode(digest="b" * 64, host="h1"),
        )
        outcome = worker._run_one(task(9, "noop", 1, code=bundle({"m.py": "X = 1\n"}, ("m",))))
    finally:
        for fd in (frames_in, unused_out, unused_in, frames_out):
            os.close(fd)
    assert outcome.status is Outcome.ERROR
    assert outcome.error is not None and "but slot 2 on host h1 has code bbbbbbbbbbbb: not run" in outcome.error


def test_module_source_digest_covers_the_source_files_and_nothing_else(tmp_path: Path) -> None:
    """The digest `batuta stack` compares across hosts: it changes with any .py file of the
    module (a package's submodules too), not with caches or dot files, and is "" for a module
    that has no source there."""
    from batuta.agent.code import module_source_digest

    (tmp_path / "single.py").write_text("X = 1\n")
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "deep.py").write_text("Y = 1\n")
    path = [str(tmp_path)]
    single, whole = module_source_digest("single", path), module_source_digest("pkg.sub.deep", path)
    assert len(single) == 64 and len(whole) == 64 and single != whole
    assert module_source_digest("pkg", path) == whole  # a dotted name: its whole top-level package
    (package / "__pycache__").mkdir()
    (package / "__pycache__" / "x.pyc").write_bytes(b"\0")
    (package / ".hidden.py").write_text("Z = 1\n")
    assert module_source_digest("pkg", path) == whole
    (package / "sub" / "deep.py").write_text("Y = 2\n")
    assert module_source_digest("pkg", path) != whole
    (tmp_path / "single.py").write_text("X = 2\n")
    assert module_source_digest("single", path) != single
    assert module_source_digest("absent_module", path) == ""
    assert module_source_digest("sys", path) == ""  # built in: no source to compare


async def test_the_hello_names_each_kernel_modules_source_digest(start_agent: StartAgent, tmp_path: Path) -> None:
    from batuta.agent.code import module_source_digest

    (tmp_path / "hostkernels.py").write_text("X = 1\n")
    agent = await start_agent(
        "--slots", "0", "--gpus", "none", "--kernel-module", "hostkernels", "--kernel-module", "not_here",
        env={"PYTHONPATH": str(tmp_path)},
    )  # fmt: skip
    assert agent.hello is not None
    assert agent.hello.modules == {"hostkernels": module_source_digest("hostkernels", [str(tmp_path)]), "not_here": ""}
    assert agent.hello.modules["hostkernels"]


@BOTH_SPAWN_MODES
async def test_an_unwritable_cache_names_its_folder_in_the_refusal_in_either_spawn_mode(
    start_agent: StartAgent, tmp_path: Path
) -> None:
    """An exec'd slot (`BATUTA_SLOT_SPAWN=exec`) was not told why the agent had no code folder:
    it imported the module itself and the task was refused for "No module named 'cs_mod'",
    naming neither the cache folder nor the fix."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")  # the cache root cannot be made under it
    agent = await start_agent("--slots", "1", "--gpus", "none", "--name", "h1", env={"XDG_CACHE_HOME": str(blocker)})
    code = bundle({"cs_mod.py": KERNELS.format(version=1)}, ("cs_mod",))
    why = (await loaded(agent, code)).errors["cs_mod"]
    assert why.startswith(f"cannot write the code under {blocker / 'batuta' / CODE_FOLDER}: ")
    agent.send(Run(tasks=(task(1, "cs_whoami", code=code),)))
    refused = await agent.outcome(1)
    assert refused.status is Outcome.UNFIT
    assert refused.error == f"kernel 'cs_whoami' is unknown on host h1: importing cs_mod failed: {why}"
    assert "set XDG_CACHE_HOME in the host's env to a folder with room" in why
