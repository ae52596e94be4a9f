"""A put of a memory-mapped file leaves none of the file mapped in the coordinator
(transport/dropbehind.py, used by the data link's sender in transport/bulk.py).

The pieces on a real memory-mapped file: a shared mapping's pages are unmapped behind the
sender and read back intact from the page cache; a private (copy-on-write) mapping and
anonymous memory are never touched. Then a put over a real SSH namespace host's data link.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from batuta.core.task import Task
from batuta.runtime.cluster import ClusterHost, ssh_host
from batuta.runtime.datalink import SessionLink
from batuta.runtime.pool import Pool, PoolConfig
from batuta.runtime.session import HostSession
from batuta.transport import dropbehind
from batuta.transport.datalink_setting import DataLinkSetting
from batuta.transport.dropbehind import DropBehind, in_shared_file_mapping
from tests.support.hosts import TestHosts
from tests.test_ssh_transport import settings_for

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_DONTNEED and /proc: Linux")

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20
WAIT_S = 300.0


def _mapped_mib(path: Path) -> float:
    """How much of `path` is resident in this process's mappings (Rss in /proc/self/smaps)."""
    total_kib = 0
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            inside = len(head) == 6 and head[5] == str(path)
        elif inside and head[0] == "Rss:":
            total_kib += int(head[1])
    return total_kib / 1024


def _file(tmp_path: Path, mib: int) -> tuple[Path, np.ndarray]:
    values = np.arange(mib * MIB // 8, dtype=np.float64)
    path = tmp_path / "values.npy"
    np.save(path, values)
    return path, values


def _link(session: HostSession) -> SessionLink:
    """The session's data link: a coordinator's, which counts its directions and has a sender."""
    assert isinstance(session.data_link, SessionLink)
    return session.data_link


def _send(view: memoryview, piece: int) -> int:
    """What the data link's sender does with a view: write it piece by piece (here: read
    it, as writing to a socket does), dropping behind. The pieces it read."""
    behind = DropBehind(view)
    step = behind.piece(piece)
    pieces = 0
    for start in range(0, len(view), step):
        np.frombuffer(view[start : start + step], dtype=np.uint8).sum()  # every page read
        behind.done(min(start + step, len(view)))
        pieces += 1
    return pieces


def test_a_shared_mapping_is_unmapped_behind_the_sender_and_reads_back_intact(tmp_path: Path) -> None:
    path, values = _file(tmp_path, 96)  # over MIN_BYTES
    mapped = np.load(path, mmap_mode="r")
    assert float(mapped.sum()) == float(values.sum())  # every page read: all of it resident
    assert _mapped_mib(path) > 90
    view = memoryview(mapped.view(np.ndarray).view(np.uint8))
    assert in_shared_file_mapping(dropbehind.address_of(view), len(view))
    pieces = _send(view, 1 << 28)
    assert pieces == 3  # 32 MiB pieces, not one 256 MiB write: the file is held a piece at a time
    assert _mapped_mib(path) < 1, "the file's pages stayed mapped after it was sent"
    assert np.array_equal(mapped, values)  # back from the page cache, unchanged


def test_a_writable_shared_mapping_keeps_what_was_written_to_it(tmp_path: Path) -> None:
    path, values = _file(tmp_path, 80)
    mapped = np.load(path, mmap_mode="r+")
    mapped[::4096] = -1.0  # dirty pages, never flushed
    _send(memoryview(mapped.view(np.ndarray).view(np.uint8)), 1 << 28)
    assert _mapped_mib(path) < 1
    expected = values.copy()
    expected[::4096] = -1.0
    assert np.array_equal(mapped, expected)
    del mapped
    assert np.array_equal(np.load(path), expected)  # and the file has them


def test_private_and_anonymous_memory_are_never_dropped(tmp_path: Path) -> None:
    path, values = _file(tmp_path, 80)
    private = np.load(path, mmap_mode="c")  # copy-on-write: dropping would lose what is written
    private[::4096] = -1.0
    view = memoryview(private.view(np.ndarray).view(np.uint8))
    assert not in_shared_file_mapping(dropbehind.address_of(view), len(view))
    assert _send(view, 1 << 28) == 1  # sent whole, as before
    assert (private[::4096] == -1.0).all()
    anonymous = values.copy()
    view = anonymous.view(np.uint8).data
    assert not DropBehind(view).enabled
    _send(view, 1 << 28)
    assert np.array_equal(anonymous, values)


def test_the_maps_line_decides() -> None:
    maps = (
        "7f0000000000-7f0010000000 r--s 00000000 fd:01 1234 /data/a.npy\n"
        "7f0010000000-7f0020000000 r--p 00000000 fd:01 1234 /data/a.npy\n"
        "7f0020000000-7f0030000000 rw-s 00000000 00:01 99 /dev/zero (deleted)\n"
        "7f0030000000-7f0040000000 rw-p 00000000 00:00 0\n"
        "7f0040000000-7f0050000000 rw-s 00000000 00:05 7 /dev/nvidiactl\n"
        "7f0050000000-7f0060000000 rw-s 00000000 00:1a 8 /dev/shm/batch.npy\n"
    )
    assert in_shared_file_mapping(0x7F0000001000, 1 << 20, maps)
    assert not in_shared_file_mapping(0x7F000FFFF000, 1 << 20, maps)  # runs past the mapping
    assert not in_shared_file_mapping(0x7F0010001000, 1 << 20, maps)  # private
    assert not in_shared_file_mapping(0x7F0020001000, 1 << 20, maps)  # a device's (shared anonymous)
    assert not in_shared_file_mapping(0x7F0030001000, 1 << 20, maps)  # anonymous
    assert not in_shared_file_mapping(0x7F0040001000, 1 << 20, maps)  # a driver's
    assert in_shared_file_mapping(0x7F0050001000, 1 << 20, maps)  # a shared-memory file


@pytest.mark.parametrize("link", [True, False], ids=["data-link", "channel"])
@pytest.mark.timeout(WAIT_S + 60)
async def test_a_put_of_a_memory_mapped_file_to_an_ssh_host_leaves_it_unmapped(
    ssh_hosts: Callable[..., TestHosts], tmp_path: Path, link: bool
) -> None:
    """Over the data link (bulk.py's sender drops each piece once written) and over the SSH
    channel (protocol/chunks.py tells the stream, at each ask for chunks and each drain, how
    far it went; at most the last write, 16 MiB, may stay mapped if it did not fill the
    session's high water, as nothing drains after it)."""
    hosts = ssh_hosts(1)
    path, values = _file(tmp_path, 128)
    mapped = np.load(path, mmap_mode="r")
    host = ClusterHost(
        name=hosts[0].name,
        address=hosts[0].name,
        python=sys.executable,
        slots=1,
        gpus="none",
        env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        kernel_modules=("tests.support.transfer_kernels",),
    )
    settings = settings_for(hosts, data_link=DataLinkSetting() if link else None)
    async with asyncio.timeout(WAIT_S), Pool([ssh_host(host, settings)], PoolConfig()) as pool:
        (session,) = pool._hosts.sessions.values()
        async with asyncio.timeout(WAIT_S):
            while link and (session.data_link is None or _link(session).directions < 2):
                await asyncio.sleep(0.005)
        print("before put", _mapped_mib(path), file=sys.stderr)
        ref = pool.put(mapped)
        assert _mapped_mib(path) < 1  # hashed for its digest without keeping it mapped
        print("after put", _mapped_mib(path), file=sys.stderr)
        dtype, shape, total, last = (await pool.run(Task.kernel("test_fingerprint", ref))).unwrap()
        assert (dtype, tuple(shape), total, last) == ("<f8", values.shape, float(values.sum()), values[-1])
        sender = _link(session)._sender if session.data_link is not None else None
        assert (sender is not None and sender.sent_bytes >= values.nbytes) == link
        left = _mapped_mib(path)
        assert left < (1 if link else 17), f"the put left {left:.0f} MiB of the file mapped in the coordinator"
        pool.drop(ref)
