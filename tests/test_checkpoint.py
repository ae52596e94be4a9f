"""Checkpoints: exact round trips without pickle, atomic durable writes, corruption caught.

Corruption is made the ways it happens: bytes flipped in the middle of the newest file, the
file cut short (a torn copy), and a temporary file left by a writer that died mid-save.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from batuta.observers.checkpoint import (
    CheckpointError,
    CheckpointManager,
    CorruptCheckpointError,
    decode_tree,
    encode_tree,
    job_checkpoints,
    use_checkpoints,
)


def sample_state() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {
        "iteration": 7,
        "centroids": rng.standard_normal((5, 3)),
        "fortran": np.asfortranarray(rng.standard_normal((4, 6)).astype(np.float32)),
        "strided": np.arange(20, dtype=np.int16)[::3],
        "big_endian": np.arange(4, dtype=">i4"),
        "empty": np.zeros((0, 3)),
        "zero_d": np.array(2.5),
        "mask": np.array([True, False, True]),
        "when": np.array(["2026-11-28", "2026-11-29"], dtype="datetime64[D]"),
        "labels": np.array(["ab", "c"]),
        "complex": np.array([1 + 2j, -0.5j], dtype=np.complex64),
        "scalar32": np.float32(1.25),
        "int64": np.int64(-3),
        "nan": float("nan"),
        "neg_zero": -0.0,
        "huge": 2**63 + 5,
        "text": "héllo",
        "raw": b"\x00\xff",
        "nothing": None,
        "flag": True,
        "pair": (1, "two", (3.0, None)),
        "nested": {"history": [0.5, 0.25, np.arange(3)], "deeper": {"x": [np.uint8(9)]}},
    }


def assert_same(expected: Any, got: Any, where: str = "state") -> None:
    """Equal values of equal types, bit for bit (NaN included), at every depth."""
    if isinstance(expected, np.ndarray):
        assert isinstance(got, np.ndarray), where
        assert got.dtype == expected.dtype and got.shape == expected.shape, where
        assert got.tobytes() == np.ascontiguousarray(expected).tobytes(), where
        return
    assert type(got) is type(expected), f"{where}: {type(got)} != {type(expected)}"
    if isinstance(expected, dict):
        assert list(got) == list(expected), where
        for key in expected:
            assert_same(expected[key], got[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), where
        for i, (e, g) in enumerate(zip(expected, got, strict=True)):
            assert_same(e, g, f"{where}[{i}]")
    elif isinstance(expected, (float, np.floating)):
        assert np.array(expected).tobytes() == np.array(got).tobytes(), where
    else:
        assert got == expected, where


async def test_round_trip_is_exact_and_arrays_come_back_writable(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "ckpt")
    state = sample_state()
    info = await manager.save("iter_000007", state)
    assert info.path == tmp_path / "ckpt" / "iter_000007.ckpt" and info.size == info.path.stat().st_size
    loaded = await manager.load("iter_000007")
    assert_same(state, loaded)
    centroids = loaded["centroids"]
    assert centroids.flags.writeable and centroids.flags.c_contiguous and centroids.flags.aligned
    centroids[0, 0] = 42.0  # a job may update restored arrays in place
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["iter_000007.ckpt"]  # no temporaries left


async def test_no_pickle_and_arrays_stored_raw(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    big = np.arange(1 << 20, dtype=np.float64)  # 8 MiB
    info = await manager.save("big", {"x": big})
    assert info.size < big.nbytes + 4096  # raw buffer plus a small header, no text encoding
    data = info.path.read_bytes()
    assert data.startswith(b"BATUTACK")
    assert b"pickle" not in data and b"\x80\x04\x95" not in data  # no pickle protocol-4 frames
    assert_same({"x": big}, await manager.load("big"))


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"x": np.array([object()], dtype=object)}, "without pickle"),
        ({"x": {1: "int key"}}, "dict keys must be str"),
        ({"x": 2**70}, "does not fit in 64 bits"),
        ({"x": {1, 2}}, "cannot store a set"),
        ({"x": np.ma.masked_array([1.0], mask=[True])}, "mask"),
    ],
)
async def test_refuses_what_it_cannot_store_exactly(tmp_path: Path, state: dict[str, Any], message: str) -> None:
    manager = CheckpointManager(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        await manager.save("bad", state)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


@pytest.mark.parametrize("name", ["../escape", ".hidden", "a/b", "", "x" * 300])
async def test_refuses_names_that_are_not_plain_file_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(CheckpointError, match="bad checkpoint name"):
        await CheckpointManager(tmp_path).save(name, {"x": 1})


async def test_writes_are_fsynced_then_renamed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append("dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file")
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        calls.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    await CheckpointManager(tmp_path).save("one", {"x": np.ones(3)})
    assert calls == ["file", "rename", "dir"]


async def test_saving_a_large_state_does_not_block_the_event_loop(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    state = {"x": np.random.default_rng(1).standard_normal(16 << 20)}  # 128 MiB
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            ticks.append(time.perf_counter())
            await asyncio.sleep(0.002)

    ticking = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    started = time.perf_counter()
    await manager.save("large", state)
    took = time.perf_counter() - started
    ticking.cancel()
    during = [t for t in ticks if t >= started]
    gaps = np.diff(during)
    assert took > 0.05, "the state is too small to tell"
    assert len(during) >= 5 and gaps.max() < took / 2, f"loop stalled: max gap {gaps.max():.3f}s of {took:.3f}s"


async def write_three(manager: CheckpointManager) -> None:
    """Three checkpoints whose names do not sort by age; mtimes set 10 s apart."""
    now = time.time()
    for age, name in ((30, "iter_9"), (20, "iter_10"), (10, "iter_11")):
        info = await manager.save(name, {"iteration": int(name.split("_")[1])})
        os.utime(info.path, (now - age, now - age))


async def test_list_and_latest_go_by_time_written(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    assert manager.list() == [] and await manager.latest() is None
    await write_three(manager)
    assert [i.name for i in manager.list()] == ["iter_9", "iter_10", "iter_11"]
    latest = await manager.latest()
    assert latest is not None and latest.name == "iter_11" and latest.state == {"iteration": 11}
    assert await manager.load() == {"iteration": 11}


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 3] = bytes(b ^ 0xFF for b in data[middle : middle + 3])
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 7)


def zero_length(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize("damage", [flip_bytes, truncate, zero_length], ids=["flipped", "truncated", "empty"])
async def test_corrupt_newest_is_reported_and_the_previous_one_used(
    tmp_path: Path, damage: Any, caplog: pytest.LogCaptureFixture
) -> None:
    manager = CheckpointManager(tmp_path)
    await write_three(manager)
    newest = tmp_path / "iter_11.ckpt"
    mtime = newest.stat().st_mtime
    damage(newest)
    os.utime(newest, (mtime, mtime))  # still the newest by time
    with caplog.at_level(logging.WARNING, logger="batuta.observers.checkpoint"):
        latest = await manager.latest()
        assert latest is not None and latest.name == "iter_10" and latest.state == {"iteration": 10}
        assert await manager.load() == {"iteration": 10}
    warnings = [r for r in caplog.records if r.name == "batuta.observers.checkpoint" and r.levelno == logging.WARNING]
    assert warnings and all(str(newest) in r.getMessage() for r in warnings)
    with pytest.raises(CorruptCheckpointError, match="iter_11"):
        await manager.load("iter_11")  # asked for by name: no substitute


async def test_all_corrupt_means_no_checkpoint(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    await write_three(manager)
    for info in manager.list():
        flip_bytes(info.path)
    assert await manager.latest() is None
    with pytest.raises(CheckpointError, match="no good checkpoint"):
        await manager.load()


async def test_cleanup_never_deletes_the_newest_good_checkpoint(tmp_path: Path) -> None:
    """keep=1 with the newest file corrupt deleted the only good checkpoint, leaving latest() None."""
    manager = CheckpointManager(tmp_path)
    await write_three(manager)
    flip_bytes(manager.list()[-1].path)  # iter_11 no longer reads back
    assert await manager.cleanup(keep=1) == ["iter_9"]
    found = await manager.latest()
    assert found is not None and found.path.name == "iter_10.ckpt"
    assert await manager.cleanup(keep=1) == [] and await manager.cleanup(older_than=0) == []
    assert await manager.cleanup(keep=0) == ["iter_10", "iter_11"]  # asked for: none kept


async def test_cleanup_keeps_the_newest_and_removes_dead_writers_temporaries(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    await write_three(manager)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f".iter_12.ckpt.{int(dead.stdout)}.0badc0de.tmp"
    orphan.write_bytes(b"half a checkpoint")
    mine = tmp_path / f".iter_13.ckpt.{os.getpid()}.0badc0de.tmp"  # a save of ours in progress
    mine.write_bytes(b"")
    assert await manager.cleanup(keep=2) == ["iter_9"]
    assert not orphan.exists() and mine.exists()
    assert [i.name for i in manager.list()] == ["iter_10", "iter_11"]
    assert await manager.cleanup(older_than=15) == ["iter_10"]
    assert await manager.cleanup(older_than=0) == []  # the newest stays, however old
    assert [i.name for i in manager.list()] == ["iter_11"]
    with pytest.raises(CheckpointError, match="needs keep"):
        await manager.cleanup()


def test_tree_codec_round_trips_for_the_journal() -> None:
    state = sample_state()
    blob = b"".join(encode_tree(state))
    assert_same(state, decode_tree(blob))


async def test_job_checkpoints_is_set_by_the_runner_only(tmp_path: Path) -> None:
    assert job_checkpoints() is None
    manager = CheckpointManager(tmp_path)
    with use_checkpoints(manager):
        assert job_checkpoints() is manager
        assert await asyncio.create_task(_read_job_checkpoints()) is manager  # tasks inherit it
    assert job_checkpoints() is None


async def _read_job_checkpoints() -> CheckpointManager | None:
    return job_checkpoints()


async def test_another_programs_ckpt_files_are_never_listed_or_deleted(tmp_path: Path) -> None:
    """`--journal proj` without --resume deleted every *.ckpt in proj/checkpoints: PyTorch
    Lightning's files (`epoch=3-step=100.ckpt`, `last.ckpt`) included."""
    manager = CheckpointManager(tmp_path)
    theirs = [tmp_path / "epoch=3-step=100.ckpt", tmp_path / "last.ckpt"]
    for path in theirs:
        path.write_bytes(b"PK\x03\x04 not ours")
    await manager.save("it_1", {"x": 1})
    await manager.save("it_2", {"x": 2})
    assert [info.name for info in manager.list()] == ["it_1", "it_2"]
    assert await manager.cleanup(keep=0) == ["it_1", "it_2"]
    assert all(path.read_bytes() == b"PK\x03\x04 not ours" for path in theirs)


def test_a_save_the_disk_refuses_is_one_line_and_leaves_no_temporary(tmp_path: Path) -> None:
    """A full disk gave a 30-line OSError traceback from the job's save, and the half-written
    temporary file stayed. (A file size limit stands in for the full disk: the same OSError.)"""
    script = (
        "import resource, signal, sys\n"
        "import numpy as np\n"
        "from pathlib import Path\n"
        "from batuta.observers.checkpoint import CheckpointError, write_checkpoint\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an EFBIG error instead of the signal\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))\n"
        "try:\n"
        "    write_checkpoint(Path(sys.argv[1]) / 'big.ckpt', 'big', {'a': np.zeros(1 << 20)})\n"
        "except CheckpointError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        f"checkpoint 'big': cannot write {tmp_path / 'big.ckpt'}: File too large; free the disk (or fix the "
        "folder) and run again with --resume"
    )
    assert list(tmp_path.iterdir()) == []
