"""The agent's object store: its memory cap, spilling to batuta's cache folder, and cleanup;
and, over a real agent, kept results past the cap spilled, reported and still served."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from batuta import ObjectRef, Task
from batuta.agent.objects import SPILL_RETRY_S, ObjectStore, default_cap, parse_object_memory
from batuta.core.task import Backend
from batuta.errors import AgentError, UsageError
from batuta.runtime import events as pe
from batuta.runtime.builder import PoolConfig, local_host
from batuta.runtime.pool import Pool
from tests.test_pool import REPO, TEST_KERNELS


def test_values_past_the_cap_spill_oldest_first_and_come_back_equal(tmp_path: Path) -> None:
    store = ObjectStore(1_000_000, tmp_path)
    arrays = {i: np.full(100_000, float(i)) for i in range(1, 4)}  # 800 kB each
    for object_id, array in arrays.items():
        store.put(object_id, array)
    store.put(9, {"k": (1, "two", [np.float32(3)])})
    count, total, spilled = store.stats()
    assert count == 4 and spilled >= 2 * 800_000 and store.memory_bytes <= 1_000_000
    assert total == store.memory_bytes + spilled
    folder = next((tmp_path / "objects").iterdir())
    assert sorted(p.name for p in folder.iterdir()) == ["1.npy", "2.npy"]  # the oldest two
    for object_id, array in arrays.items():
        np.testing.assert_array_equal(store[object_id], array)
    assert store[9] == {"k": (1, "two", [np.float32(3)])}
    store.discard(1)
    assert not (folder / "1.npy").exists() and 1 not in store and store.stats()[2] == spilled - 800_000
    store.close()
    assert not folder.exists() and len(store) == 0


def test_a_value_kept_in_a_slot_is_fetched_to_spill_and_lost_with_its_slot(tmp_path: Path) -> None:
    evicted: list[tuple[int, int]] = []
    spilled: list[int] = []
    store = ObjectStore(1_000_000, tmp_path, on_spill=spilled.append, on_evict=lambda o, s: evicted.append((o, s)))
    store.keep_in_slot(1, 0, 800_000)
    store.keep_in_slot(2, 1, 800_000)  # over the cap: the oldest is asked of its slot, once
    store.keep_in_slot(3, 1, 100_000)
    assert evicted == [(1, 0)] and store.stats() == (3, 1_700_000, 0)
    with pytest.raises(KeyError):
        store[2]  # its bytes are in slot 1's process
    value = np.full(100_000, 1.0)
    store.settle(1, value)  # here now: written to disk, and the slots drop their copies
    assert spilled == [1] and store.stats() == (3, 1_700_000, 800_000) and store.slot_of(1) is None
    np.testing.assert_array_equal(store[1], value)
    assert store.lose_slot(1) == (2, 3) and store.was_lost(2) and 2 not in store
    assert store.stats() == (1, 800_000, 800_000)


def test_a_non_array_value_spills_as_a_frame(tmp_path: Path) -> None:
    store = ObjectStore(0, tmp_path)
    value = (np.arange(5), "label", {"nested": [1.5, None]})
    store.put(4, value)
    assert store.stats()[2] > 0 and store.memory_bytes == 0
    again = store[4]
    assert isinstance(again, tuple) and np.array_equal(again[0], np.arange(5)) and again[1:] == value[1:]
    store.close()


def _spill_under_file_limit(tmp_path: Path, puts: str) -> subprocess.CompletedProcess[str]:
    """`puts` run on a store spilling to `tmp_path` (warnings printed) in a process whose files
    may not pass 64 KiB (`ulimit -f`): the same OSError a full disk gives, with no disk to fill."""
    script = (
        "import resource, signal, sys\n"
        "import numpy as np\n"
        "from pathlib import Path\n"
        "from batuta.agent.objects import ObjectStore\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an EFBIG error instead of the signal\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))\n"
        "store = ObjectStore(0, Path(sys.argv[1]), warn=print)\n" + puts
    )
    return subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=60, check=False
    )


def test_a_spill_the_disk_refuses_leaves_no_partial_file_and_is_said_once(tmp_path: Path) -> None:
    """A full disk left a partial `.npy` in the spill folder and said nothing while the store
    went over its cap. (A file size limit stands in for the full disk: the same OSError.)"""
    done = _spill_under_file_limit(
        tmp_path,
        "store.put(1, np.ones(100_000))\n"
        "store.put(2, (np.ones(100_000), 'a frame'))\n"
        "print(store[1].sum(), store[2][0].sum(), store.stats())\n",
    )
    assert done.returncode == 0, done.stderr
    *warned, last = done.stdout.strip().splitlines()
    [folder] = (tmp_path / "objects").iterdir()
    assert len(warned) == 1 and warned[0].startswith(f"cannot spill object 1 (800,000 bytes) to {folder}: OSError: ")
    # numpy's write stopped short, with no errno, as it does on a full disk
    assert "free space there, or set XDG_CACHE_HOME in the host's env to a folder with room" in warned[0]
    assert last.startswith("100000.0 100000.0 (2, ")  # kept in memory, whole
    assert list(folder.iterdir()) == []  # no partial file


def test_a_refused_spill_says_free_space_only_when_the_disk_is_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every refused spill said "free space there", which frees nothing on a folder that
    cannot be written: the fix follows the errno, as the code cache's does."""
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the cache folder should be")
    unwritable: list[str] = []
    store = ObjectStore(0, blocker, warn=unwritable.append)
    store.put(1, np.ones(1000))
    np.testing.assert_array_equal(store[1], np.ones(1000))  # kept in memory
    [said] = unwritable
    assert said.startswith(f"cannot spill object 1 (8,000 bytes) to {blocker / 'objects'}: ")
    assert "free space" not in said
    assert (
        ": move aside what is in the way (a folder where a file goes, or a file where a folder goes), "
        "or set XDG_CACHE_HOME in the host's env to a folder with room (tried"
    ) in said

    def full(self: ObjectStore, object_id: int, value: object) -> Path:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path))

    monkeypatch.setattr(ObjectStore, "_write", full)
    out_of_room: list[str] = []
    ObjectStore(0, tmp_path, warn=out_of_room.append).put(1, np.ones(1000))
    [said] = out_of_room
    assert "OSError: No space left on device; objects stay in memory" in said
    assert ": free space there, or set XDG_CACHE_HOME in the host's env to a folder with room (tried" in said


def test_a_spilled_frame_past_the_file_size_limit_says_raise_it(tmp_path: Path) -> None:
    """A frame (not numpy) past `ulimit -f` fails with EFBIG: room would not help."""
    done = _spill_under_file_limit(tmp_path, "store.put(2, (np.ones(100_000), 'a frame'))\n")
    assert done.returncode == 0, done.stderr
    [said] = done.stdout.strip().splitlines()
    assert "OSError: File too large; objects stay in memory" in said
    assert ": raise the file size limit (ulimit -f) the host's agent runs under, or set XDG_CACHE_HOME" in said
    assert "free space" not in said


def test_a_dead_agents_spill_folder_is_removed_by_the_next_store(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / "objects" / f"{int(dead.stdout)}-0"
    stale.mkdir(parents=True)
    (stale / "1.npy").write_bytes(b"left over")
    alive = tmp_path / "objects" / f"{os.getppid()}-0"  # a live process's: kept
    alive.mkdir()
    store = ObjectStore(0, tmp_path)
    # at once, not at the store's first spill: a killed agent's gigabytes stayed on the disk of
    # a host whose next agents never spilled
    assert not stale.exists() and alive.exists()
    store.put(1, np.ones(10))
    store.close()


def test_the_cap_takes_bytes_or_a_share_of_ram_and_refuses_anything_else() -> None:
    assert parse_object_memory("25%", 8 << 30) == 2 << 30
    assert parse_object_memory("512M", 0) == 512 << 20 and parse_object_memory("1000", 0) == 1000
    assert default_cap(10 << 30, {}) == 3 << 30  # 30% of RAM by default
    assert default_cap(10 << 30, {"BATUTA_OBJECT_MEMORY": "1G"}) == 1 << 30
    with pytest.raises(UsageError, match=r"--object-memory 'lots': expected bytes \(like 4G or 512M\)"):
        parse_object_memory("lots", 0)
    with pytest.raises(UsageError, match="share of RAM"):
        parse_object_memory("250%", 1 << 30)


async def test_a_bad_cap_in_the_environment_is_named_as_the_environment_variable() -> None:
    """BATUTA_OBJECT_MEMORY=lots was reported as "--object-memory 'lots'", an option nobody gave,
    behind a Python exception's class name."""
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "BATUTA_OBJECT_MEMORY": "lots"}
    with pytest.raises(AgentError) as info:
        async with Pool([local_host(1, gpus="none", env=env)]):
            pass
    assert str(info.value).endswith(
        "agent exited before saying hello: batuta agent: error: BATUTA_OBJECT_MEMORY (in the host's environment, or "
        "its env in the cluster file) 'lots': expected bytes (like 4G or 512M) or a share of RAM (like 25%)"
    )


async def test_a_bad_gpu_cache_in_the_environment_stops_the_agent_at_its_start() -> None:
    """BATUTA_GPU_CACHE=lots was read at a slot's first GPU task: `stack gate` passed, then
    GPU tasks that read a put value failed one by one, and the others ran."""
    python_path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {"PYTHONPATH": python_path, "BATUTA_GPU_CACHE": "lots", "BATUTA_FAKE_GPUS": "1"}
    with pytest.raises(AgentError) as info:
        async with Pool([local_host(1, gpus="auto", env=env)]):
            pass
    assert str(info.value).endswith(
        "agent exited before saying hello: batuta agent: error: BATUTA_GPU_CACHE='lots': expected bytes (like 8G or "
        "512M, 0 for no cache) or a share of the GPU's free memory (like 40%)"
    )


async def test_kept_results_past_the_cap_spill_are_reported_and_still_served(tmp_path: Path) -> None:
    env = {
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "BATUTA_OBJECT_MEMORY": "3M",
        "XDG_CACHE_HOME": str(tmp_path),
    }
    host = local_host(1, gpus="none", kernel_modules=[TEST_KERNELS], env=env, name="capped")
    n = 250_000  # 2 MB each: from the second on, the store is over its 3 MB cap
    async with Pool([host], PoolConfig(heartbeat_interval=0.1)) as pool:
        spilled = asyncio.Event()
        seen: list[pe.HostTelemetry] = []

        def on_event(event: pe.PoolEvent) -> None:
            # every kept value is in, and the spill (which may lag the last one on a busy
            # machine: a heartbeat once saw 2 MB of the 4+ out) is done
            if isinstance(event, pe.HostTelemetry) and event.objects == 4 and event.spilled_bytes >= 2 * n * 8:
                seen.append(event)
                spilled.set()

        pool.subscribe(on_event)
        refs: list[ObjectRef] = await pool.map("test_fill", [(n, float(i)) for i in range(4)], keep=True)
        await asyncio.wait_for(spilled.wait(), 30)  # a heartbeat reports them
        report = seen[-1]
        assert report.objects == 4 and report.object_bytes == 4 * n * 8 and report.spilled_bytes >= 2 * n * 8
        assert report.slot_object_bytes >= report.spilled_bytes  # spilled values were asked of their slot
        assert list((tmp_path / "batuta" / "objects").iterdir())  # under batuta's cache folder
        for i, ref in enumerate(refs):
            np.testing.assert_array_equal(await pool.get(ref), np.full(n, float(i)))
        staged = await pool.run(Task.kernel("sum", refs[0], backend=Backend.CPU))  # a spilled input
        assert staged.is_success() and staged.value == 0.0
    assert not any((tmp_path / "batuta" / "objects").iterdir())  # removed when the agent exits


def test_the_store_is_capped_by_the_memory_cgroup_where_that_is_lower(tmp_path: Path) -> None:
    """The cap was 30% of the node's RAM: in a Slurm job or a container limited to less, the
    kernel killed the agent instead of its spilling to disk."""
    from batuta.agent.objects import _cgroup_memory_limit, host_memory

    v2 = tmp_path / "v2"
    (v2 / "slurm" / "job_7" / "step_0").mkdir(parents=True)
    (v2 / "slurm" / "memory.max").write_text("max\n")
    (v2 / "slurm" / "job_7" / "memory.max").write_text(f"{8 << 30}\n")
    (v2 / "slurm" / "job_7" / "step_0" / "memory.max").write_text("max\n")
    own_v2 = tmp_path / "own_v2"
    own_v2.write_text("0::/slurm/job_7/step_0\n")
    assert _cgroup_memory_limit(v2, own_v2) == 8 << 30  # a parent's limit holds its children
    v1 = tmp_path / "v1"
    (v1 / "memory" / "docker" / "abc").mkdir(parents=True)
    (v1 / "memory" / "docker" / "abc" / "memory.limit_in_bytes").write_text(f"{800 << 20}\n")
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    own_v1 = tmp_path / "own_v1"
    own_v1.write_text("5:devices:/docker/abc\n4:memory:/docker/abc\n")
    assert _cgroup_memory_limit(v1, own_v1) == 800 << 20
    assert host_memory(v1, own_v1) == 800 << 20  # under the RAM of any machine this runs on
    assert _cgroup_memory_limit(tmp_path / "none", tmp_path / "missing") == 0


def test_a_refused_spill_is_not_tried_again_on_every_put_until_time_passes_or_a_spilled_file_goes(
    tmp_path: Path,
) -> None:
    """Each put past the cap after a full disk refused a spill wrote the oldest value again
    (as many bytes as it holds), failing the same way: the put paid a failed write each time."""
    now = [0.0]
    store = ObjectStore(1000, tmp_path, clock=lambda: now[0])
    store.put(1, np.ones(200))  # 1,600 bytes: spilled while the disk has room
    assert store.stats()[2] == 1600
    writes: list[int] = []
    real_write = store._write

    def full_disk(object_id: int, value: object) -> Path:
        writes.append(object_id)
        raise OSError(errno.ENOSPC, "No space left on device")

    store._write = full_disk  # type: ignore[method-assign]
    store.put(2, np.ones(200))
    assert writes == [2]  # refused: kept in memory, over the cap
    for object_id in range(3, 8):
        store.put(object_id, np.ones(200))
    assert writes == [2]  # not tried again: nothing could have changed
    now[0] += SPILL_RETRY_S
    store.put(8, np.ones(200))
    assert writes == [2, 2]  # the back-off is over: tried once, refused again
    store.put(9, np.ones(200))
    assert writes == [2, 2]
    store._write = real_write  # type: ignore[method-assign]
    store.discard(1)  # a spilled file removed: room on the disk
    store.put(10, np.ones(200))
    assert store.memory_bytes <= 1000 and [np.asarray(store[i]).sum() for i in range(2, 11)] == [200.0] * 9
    store.close()


async def test_a_value_larger_than_the_hosts_memory_is_refused_in_a_line_not_held_until_the_agent_is_killed() -> None:
    """The agent receives a big value into a memfd, which is made at once whatever its size and
    filled page by page: a 1 GiB put to a host whose memory cgroup allowed 600 MiB filled it
    until the kernel killed the agent, five times over, and the task failed as lost. It is
    refused now, as a value the host cannot allocate is. BATUTA_HOST_MEMORY stands in for a
    small host here (the cgroup's limit, or the RAM, where unset)."""
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "BATUTA_HOST_MEMORY": "40M"}
    host = local_host(1, gpus="none", kernel_modules=[TEST_KERNELS], env=env, name="small")
    value = np.arange(6 << 20, dtype=np.float64)  # 48 MiB: streamed, and more than the host has
    lost: list[pe.HostStateChanged] = []
    async with asyncio.timeout(120), Pool([host]) as pool:
        pool.subscribe(lambda e: lost.append(e) if isinstance(e, pe.HostStateChanged) and e.state == "lost" else None)
        result = await pool.run(Task.kernel("sum", pool.put(value), backend=Backend.CPU))
        assert not result.is_success()
        assert "host small could not hold put value 1 in memory: 50,331,648 bytes" in (result.error or ""), result.error
        assert "more than the 41,943,040 bytes of memory this host has" in (result.error or ""), result.error
        assert (await pool.run(Task.kernel("sum", np.arange(1000.0), backend=Backend.CPU))).value == 499500.0
    assert lost == []


def test_the_hosts_memory_in_the_environment_takes_bytes_and_refuses_anything_else() -> None:
    from batuta.agent.objects import host_memory, parse_host_memory

    assert host_memory(environ={"BATUTA_HOST_MEMORY": "512M"}) == 512 << 20
    assert parse_host_memory("2G") == 2 << 30
    for bad in ("lots", "50%", "0", "-1G"):
        with pytest.raises(UsageError, match=r"BATUTA_HOST_MEMORY='.*': expected the host's memory in bytes"):
            parse_host_memory(bad)


async def test_a_bad_hosts_memory_in_the_environment_stops_the_agent_at_its_start() -> None:
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "BATUTA_HOST_MEMORY": "50%"}
    with pytest.raises(AgentError) as info:
        async with Pool([local_host(1, gpus="none", env=env)]):
            pass
    assert str(info.value).endswith(
        "agent exited before saying hello: batuta agent: error: BATUTA_HOST_MEMORY='50%': expected the host's "
        "memory in bytes (like 16G or 512M)"
    )


def test_a_spill_folder_the_host_cannot_write_is_said_so_not_full(tmp_path: Path) -> None:
    """A read-only spill folder was reported with the full disk's fix, "free space there"."""
    warned: list[str] = []
    store = ObjectStore(0, tmp_path, warn=warned.append)

    def read_only(object_id: int, value: object) -> Path:
        raise OSError(errno.EROFS, "Read-only file system")

    store._write = read_only  # type: ignore[method-assign]
    store.put(1, np.ones(100))
    assert len(warned) == 1 and "OSError: Read-only file system" in warned[0], warned
    assert "until it can: make it writable, or set XDG_CACHE_HOME in the host's env to a folder with room" in warned[0]
    assert np.asarray(store[1]).sum() == 100.0  # kept in memory
    store.close()
