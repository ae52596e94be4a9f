"""Checkpoints: atomic, checksummed snapshots of a job's state, NumPy arrays stored raw.

The seed's API, in Python:

    checkpoint = CheckpointManager("./checkpoints")
    for epoch in range(start_epoch, total_epochs):
        await train_epoch(epoch)
        await checkpoint.save(f"epoch_{epoch}", state)

A state is a dict with str keys whose values are NumPy arrays, NumPy scalars, None, bool,
int (64-bit), float, str, bytes, or lists, tuples and dicts (str keys) of those. Nothing is
pickled: a checkpoint file is

    magic b"BATUTACK" | version: u32 LE | header_len: u32 LE | header: msgpack | pad to 64 |
    array buffers, each at a multiple of 64 bytes from the data start | sha256: 32 bytes

where the header holds the checkpoint's name, when it was written, and the state as msgpack
with each array replaced by an ext naming its dtype, shape and offset; the trailing SHA-256
covers every byte before it. Loading reads the file once into an aligned buffer, checks the
digest and hands out the arrays as writable views into that buffer (no second copy).

Writes are atomic: a temporary file in the same folder, fsync, rename over the final name,
fsync of the folder. A reader therefore sees the old checkpoint or the new one, never half
of one; a file that is torn or corrupted anyway (a disk, a copy, a person) fails its digest,
is reported as a warning naming the file, and `latest()` / `load()` fall back to the newest
good checkpoint before it. Every file operation runs in a worker thread
(`asyncio.to_thread`), so saving a large state never blocks the event loop.

**For job authors** (the K-Means and other iterative jobs): `batuta run --journal DIR` gives
the job a manager over `DIR/checkpoints`, found with `job_checkpoints()` (None when the run
has no journal). On `--resume` the folder holds what the interrupted run saved; without it
the folder starts empty. The pattern:

    ckpt = job_checkpoints()
    start, centroids = 0, initial_centroids
    if ckpt is not None and (last := await ckpt.latest()) is not None:
        start, centroids = int(last.state["iteration"]) + 1, last.state["centroids"]
    for it in range(start, iterations):
        centroids = await step(pool, centroids)
        if ckpt is not None:
            await ckpt.save(f"iter_{it:06d}", {"iteration": it, "centroids": centroids})

Checkpoints are ordered by when they were written (file modification time, then name), so
names need not sort; `cleanup(keep=3)` keeps the three newest.

**Places.** Under `--journal`, a task that is not pure is journaled at its place in the job
(the n-th submitted, `batuta.observers.journal`). A job that resumes from a checkpoint submits
again from there, so its places would start at 0: the n-th task after the checkpoint met the
n-th task of the first iteration, and where their arguments were equal (state kept in a file,
not in the arguments) got that iteration's result back. A checkpoint saved by such a run keeps
how many tasks each pool job had submitted (the header's `places`); the last one a resumed
run loads before its first task sets its count back there (`PlaceCounts`), so the tasks after
it meet their own. One saved while tasks were in flight (a loop that submits its next
iteration before it saves) has `places` nil: which of those tasks a restart submits again
cannot be told, and a run restarted from it restores no task by its place.
Only what a file's own header says is trusted: a folder may hold other programs' `.ckpt`
files (PyTorch Lightning writes `checkpoints/*.ckpt`), which are never deleted here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import re
import struct
import time
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import msgpack
import numpy as np

from batuta.errors import BatutaError
from batuta.observers.atomic import fsync_dir, replace_file

log = logging.getLogger("batuta.observers.checkpoint")

MAGIC = b"BATUTACK"
VERSION = 1
SUFFIX = ".ckpt"
ALIGN = 64
_PREFIX = struct.Struct("<8sII")  # magic, version, header length
_DIGEST_BYTES = 32
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}")
_TMP = re.compile(r"^\.(?P<name>.+)\.ckpt\.(?P<pid>\d+)\.[0-9a-f]+\.tmp$")

# msgpack ext codes inside a header's state tree
_EXT_ARRAY = 1  # packb([dtype str, shape, offset])
_EXT_SCALAR = 2  # packb([dtype str, raw bytes])
_EXT_TUPLE = 3  # packb(list of items)
_MAX_DEPTH = 64
_REFUSED_KINDS = frozenset("OV")  # objects would need pickle; records lose their fields


class CheckpointError(BatutaError):
    """A checkpoint could not be written or read (bad state, bad name, I/O)."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file failed its checks (torn, truncated, flipped bytes, not a checkpoint)."""


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    """A checkpoint on disk, as `list()` sees it (not yet read or verified)."""

    name: str
    path: Path
    size: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A checkpoint read back and verified: its name, state, and when it was written."""

    name: str
    path: Path
    state: dict[str, Any]
    created: float  # seconds since the epoch, as the writer's clock said
    places: dict[str, int] | None = None  # tasks submitted per pool job when it was saved (see Places)
    in_flight: bool = False  # saved under a journal while tasks ran: its places cannot be told


class PlaceCounts(Protocol):
    """The journal's count of tasks submitted per pool job (`JournalStore`); None while
    tasks are in flight."""

    def counts(self) -> dict[str, int] | None: ...

    def restart_at(self, counts: Mapping[str, int] | None, checkpoint: str) -> None: ...


# -- the state tree codec (shared with the journal) -----------------------------------------


def _dtype_str(dtype: np.dtype[Any], where: str) -> str:
    if dtype.kind in _REFUSED_KINDS or dtype.hasobject:
        raise CheckpointError(
            f"{where}: arrays of dtype {dtype!s} cannot be stored without pickle; "
            "use numeric, bool, datetime or fixed-width string dtypes"
        )
    return dtype.str


class TreeEncoder:
    """Turns a state tree into a msgpack header plus a list of raw array buffers."""

    def __init__(self) -> None:
        self.buffers: list[tuple[int, np.ndarray]] = []  # (offset in the data region, bytes view)
        self.size = 0

    def encode(self, value: Any, where: str = "state", depth: int = 0) -> Any:
        t = type(value)
        if value is None or t is bool or t is float or t is str or t is bytes:
            return value
        if t is int:
            if not -(2**63) <= value < 2**64:
                raise CheckpointError(f"{where}: int {value} does not fit in 64 bits; store it as a str")
            return value
        if depth >= _MAX_DEPTH:
            raise CheckpointError(f"{where}: nested deeper than {_MAX_DEPTH} levels")
        if isinstance(value, np.ndarray):
            return self._array(value, where)
        if isinstance(value, np.generic):
            dtype = _dtype_str(value.dtype, where)
            return msgpack.ExtType(_EXT_SCALAR, msgpack.packb([dtype, value.tobytes()]))
        if isinstance(value, dict):
            out = {}
            for key, item in value.items():
                if type(key) is not str:
                    raise CheckpointError(f"{where}: dict keys must be str, got {type(key).__name__} {key!r}")
                out[key] = self.encode(item, f"{where}[{key!r}]", depth + 1)
            return out
        if isinstance(value, (list, tuple)):
            items = [self.encode(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value)]
            return msgpack.ExtType(_EXT_TUPLE, msgpack.packb(items)) if isinstance(value, tuple) else items
        if isinstance(value, (int, float)):  # bool and numpy scalars were handled above
            return self.encode(int(value) if isinstance(value, int) else float(value), where, depth)
        raise CheckpointError(
            f"{where}: cannot store a {type(value).__name__}; a state holds arrays, numbers, str, bytes, "
            "None, and lists, tuples and dicts of those"
        )

    def _array(self, arr: np.ndarray, where: str) -> msgpack.ExtType:
        if isinstance(arr, np.ma.MaskedArray):
            raise CheckpointError(f"{where}: a masked array would lose its mask; store data and mask apart")
        dtype = _dtype_str(arr.dtype, where)
        flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        offset = -(-self.size // ALIGN) * ALIGN
        self.buffers.append((offset, flat))
        self.size = offset + flat.nbytes
        return msgpack.ExtType(_EXT_ARRAY, msgpack.packb([dtype, list(arr.shape), offset]))

    def data_parts(self) -> Iterator[bytes | memoryview]:
        """The data region: each buffer at its offset, zero padding between."""
        position = 0
        for offset, flat in self.buffers:
            if offset > position:
                yield bytes(offset - position)
            yield flat.data
            position = offset + flat.nbytes


class TreeDecoder:
    """Rebuilds a state tree from its header, with arrays as views into `data`."""

    def __init__(self, data: np.ndarray, *, copy: bool = False) -> None:
        self.data = data  # uint8, the data region
        self.copy = copy

    def hook(self, code: int, payload: bytes) -> Any:
        if code == _EXT_ARRAY:
            dtype_str, shape, offset = msgpack.unpackb(payload)
            dtype = np.dtype(dtype_str)
            shape = tuple(int(n) for n in shape)
            nbytes = math.prod(shape) * dtype.itemsize
            if offset < 0 or offset + nbytes > self.data.size:
                raise CorruptCheckpointError(f"array of {nbytes} bytes at {offset} runs past the data")
            arr = self.data[offset : offset + nbytes].view(dtype).reshape(shape)
            return arr.copy() if self.copy else arr
        if code == _EXT_SCALAR:
            dtype_str, raw = msgpack.unpackb(payload)
            return np.frombuffer(raw, dtype=np.dtype(dtype_str))[0].copy()
        if code == _EXT_TUPLE:
            return tuple(msgpack.unpackb(payload, ext_hook=self.hook, strict_map_key=True))
        raise CorruptCheckpointError(f"unknown ext type {code}")

    def unpack(self, header: bytes | memoryview) -> Any:
        return msgpack.unpackb(header, ext_hook=self.hook, strict_map_key=True)


def encode_tree(value: Any, where: str = "state") -> list[bytes | memoryview]:
    """`value` as self-contained byte parts: header length (u32 LE), header, pad, data.

    Used by the journal for one record; checkpoints add a file prefix and a digest.
    """
    encoder = TreeEncoder()
    header = msgpack.packb(encoder.encode(value, where))
    head = struct.pack("<I", len(header)) + header
    pad = -len(head) % ALIGN if encoder.buffers else 0
    return [head, bytes(pad), *encoder.data_parts()]


def decode_tree(blob: bytes | bytearray | memoryview | np.ndarray, *, copy: bool = True) -> Any:
    """The inverse of `encode_tree`. With `copy`, arrays do not keep `blob` alive."""
    data = np.frombuffer(blob, dtype=np.uint8) if not isinstance(blob, np.ndarray) else blob
    (header_len,) = struct.unpack_from("<I", data.data, 0)
    header_end = 4 + header_len
    if header_end > data.size:
        raise CorruptCheckpointError("header runs past the end")
    start = header_end + (-header_end % ALIGN)
    return TreeDecoder(data[start:], copy=copy).unpack(data[4:header_end].data)


# -- files ----------------------------------------------------------------------------------


def aligned_empty(nbytes: int) -> np.ndarray:
    raw = np.empty(nbytes + ALIGN, dtype=np.uint8)
    skip = -raw.__array_interface__["data"][0] % ALIGN
    return raw[skip : skip + nbytes]


def write_checkpoint(
    path: Path, name: str, state: dict[str, Any], *, places: Mapping[str, int] | None = None, in_flight: bool = False
) -> int:
    """Write `state` to `path` atomically and durably; returns the file's size. Blocking.
    Raises CheckpointError for a bad state and for a file that cannot be written (a full disk)."""
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {name!r}: the state must be a dict, not {type(state).__name__}")
    encoder = TreeEncoder()
    tree = encoder.encode(state, "state")
    fields: dict[str, Any] = {"name": name, "created": time.time(), "state": tree}
    if places is not None or in_flight:
        fields["places"] = dict(places) if places is not None else None  # nil: saved with tasks in flight
    header = msgpack.packb(fields, use_bin_type=True)
    prefix = _PREFIX.pack(MAGIC, VERSION, len(header)) + header
    parts: list[bytes | memoryview] = [prefix, bytes(-len(prefix) % ALIGN), *encoder.data_parts()]
    tmp = path.with_name(f".{path.stem}{SUFFIX}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        return replace_file(path, tmp, _digested(parts), sync_folder=True)
    except OSError as exc:  # said as the journal's own write errors are, not as a traceback
        why = exc.strerror or str(exc)
        raise CheckpointError(
            f"checkpoint {name!r}: cannot write {path}: {why}; free the disk (or fix the folder) and run again "
            "with --resume"
        ) from None


def _digested(parts: list[bytes | memoryview]) -> Iterator[bytes | memoryview]:
    """`parts`, then their SHA-256 (what `read_checkpoint` verifies)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
        yield part
    yield digest.digest()


def read_checkpoint(path: Path) -> Checkpoint:
    """Read and verify the checkpoint at `path`. Raises CorruptCheckpointError. Blocking."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < _PREFIX.size + _DIGEST_BYTES:
            raise CorruptCheckpointError(f"{path}: {size} bytes is too short for a checkpoint (truncated?)")
        buf = aligned_empty(size)
        got = f.readinto(buf.data)
    if got != size:
        raise CorruptCheckpointError(f"{path}: read {got} of {size} bytes")
    magic, version, header_len = _PREFIX.unpack_from(buf.data, 0)
    if magic != MAGIC:
        raise CorruptCheckpointError(f"{path}: not a batuta checkpoint (bad magic)")
    body = buf.data[: size - _DIGEST_BYTES]
    if hashlib.sha256(body).digest() != bytes(buf[size - _DIGEST_BYTES :]):
        raise CorruptCheckpointError(f"{path}: checksum mismatch (torn, truncated or corrupted)")
    if version != VERSION:
        raise CorruptCheckpointError(f"{path}: checkpoint format version {version}, this batuta reads {VERSION}")
    header_end = _PREFIX.size + header_len
    data_start = header_end + (-header_end % ALIGN)
    if data_start > size - _DIGEST_BYTES:
        raise CorruptCheckpointError(f"{path}: header runs past the end")
    decoder = TreeDecoder(buf[data_start : size - _DIGEST_BYTES])
    try:
        header = decoder.unpack(buf[_PREFIX.size : header_end].data)
        places = header.get("places")
        return Checkpoint(
            name=str(header["name"]),
            path=path,
            state=dict(header["state"]),
            created=float(header["created"]),
            places={str(job): int(n) for job, n in places.items()} if isinstance(places, dict) else None,
            in_flight="places" in header and places is None,
        )
    except CorruptCheckpointError as exc:
        raise CorruptCheckpointError(f"{path}: {exc}") from None
    except Exception as exc:  # a digest that matches over garbage is our bug or a forgery
        raise CorruptCheckpointError(f"{path}: unreadable header: {type(exc).__name__}: {exc}") from None


# -- the manager ----------------------------------------------------------------------------

_Infos = list[CheckpointInfo]  # spelled here: inside the class, `list` is the method
_Names = list[str]


class CheckpointManager:
    """Named checkpoints in one folder. File work runs in threads; the methods are coroutines.

    `save(name, state)` writes `name.ckpt` atomically (replacing an older one of that name);
    `load(name)` reads one; `latest()` reads the newest good one, skipping corrupt files with
    a warning; `list()` shows what is there, oldest first; `cleanup()` prunes.
    """

    def __init__(self, directory: str | os.PathLike[str], *, create: bool = True) -> None:
        self.directory = Path(directory)
        self.places: PlaceCounts | None = None  # a journaled run's (see Places in the module doc)
        if create:
            self.directory.mkdir(parents=True, exist_ok=True)
        elif not self.directory.is_dir():
            raise CheckpointError(f"checkpoint folder {str(self.directory)!r} does not exist")

    def path_of(self, name: str) -> Path:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise CheckpointError(
                f"bad checkpoint name {name!r}: use letters, digits, '_', '-' and '.', not starting with '.'"
            )
        return self.directory / f"{name}{SUFFIX}"

    async def save(self, name: str, state: dict[str, Any]) -> CheckpointInfo:
        """Write `state` as checkpoint `name`; returns where it went. Never blocks the loop."""
        path = self.path_of(name)
        places = self.places.counts() if self.places is not None else None  # now: the tasks before the save
        in_flight = self.places is not None and places is None
        size = await asyncio.to_thread(write_checkpoint, path, name, state, places=places, in_flight=in_flight)
        log.info("checkpoint %s saved (%d bytes) to %s", name, size, path)
        return CheckpointInfo(name=name, path=path, size=size, mtime_ns=path.stat().st_mtime_ns)

    async def load(self, name: str | None = None) -> dict[str, Any]:
        """The state of checkpoint `name`, or of the newest good one when `name` is None.

        A named checkpoint that is corrupt raises CorruptCheckpointError (after a warning):
        asking for it by name means no other will do. Without a name, corrupt ones are
        skipped as in `latest()`; CheckpointError if there is no good checkpoint at all.
        """
        if name is None:
            found = await self.latest()
            if found is None:
                raise CheckpointError(f"no good checkpoint in {str(self.directory)!r}")
            return found.state
        path = self.path_of(name)
        if not path.exists():
            raise CheckpointError(f"no checkpoint named {name!r} in {str(self.directory)!r}")
        try:
            return self._restarting(await asyncio.to_thread(read_checkpoint, path)).state
        except CorruptCheckpointError as exc:
            log.warning("checkpoint file %s is corrupt: %s", path, exc)
            raise

    async def latest(self) -> Checkpoint | None:
        """The newest checkpoint that reads back intact, or None if there is none."""
        found = await asyncio.to_thread(self._latest_sync)
        return self._restarting(found) if found is not None else None

    def _restarting(self, checkpoint: Checkpoint) -> Checkpoint:
        """A job that loads a checkpoint restarts from it: its tasks take their places again
        from where the saving run was (see Places in the module doc)."""
        if self.places is not None and (checkpoint.places is not None or checkpoint.in_flight):
            self.places.restart_at(checkpoint.places, checkpoint.name)
        return checkpoint

    def _latest_sync(self) -> Checkpoint | None:
        for info in reversed(self.list()):
            try:
                return read_checkpoint(info.path)
            except CorruptCheckpointError as exc:
                log.warning("checkpoint file %s is corrupt, using the one before it: %s", info.path, exc)
            except FileNotFoundError:  # pruned meanwhile
                continue
        return None

    def list(self) -> _Infos:
        """Checkpoints in the folder, oldest first (by modification time, then name). Unverified."""
        infos = []
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.name.startswith(".") or not entry.name.endswith(SUFFIX) or not entry.is_file():
                    continue
                if not is_checkpoint_file(entry.path):  # another program's .ckpt: not ours to read or delete
                    continue
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                infos.append(
                    CheckpointInfo(
                        name=entry.name[: -len(SUFFIX)],
                        path=Path(entry.path),
                        size=st.st_size,
                        mtime_ns=st.st_mtime_ns,
                    )
                )
        infos.sort(key=lambda i: (i.mtime_ns, _natural(i.name)))
        return infos

    async def cleanup(self, *, keep: int | None = None, older_than: float | None = None) -> _Names:
        """Delete checkpoints beyond the newest `keep`, and/or older than `older_than` seconds.

        Also removes temporary files left by writers that died mid-save. Returns the names
        deleted. The newest checkpoint is never deleted by `older_than` alone, and the newest
        that reads back intact (what `latest()` gives) only by `keep=0`.
        """
        if keep is None and older_than is None:
            raise CheckpointError("cleanup() needs keep=N and/or older_than=SECONDS")
        if keep is not None and keep < 0:
            raise CheckpointError(f"cleanup(keep={keep}): keep must be >= 0")
        return await asyncio.to_thread(self._cleanup_sync, keep, older_than)

    def _cleanup_sync(self, keep: int | None, older_than: float | None) -> _Names:
        infos = self.list()
        doomed: dict[str, CheckpointInfo] = {}
        if keep is not None:
            for info in infos[: max(0, len(infos) - keep)]:
                doomed[info.name] = info
        if older_than is not None:
            cutoff_ns = time.time_ns() - int(older_than * 1e9)
            for info in infos[:-1]:  # keep the newest, whatever its age
                if info.mtime_ns < cutoff_ns:
                    doomed[info.name] = info
        if doomed and keep != 0:  # not the newest that reads back: keep=1 kept a corrupt newer one instead
            good = self._latest_sync()
            if good is not None:
                doomed = {name: info for name, info in doomed.items() if info.path != good.path}
        removed = []
        for info in doomed.values():
            with contextlib.suppress(FileNotFoundError):
                info.path.unlink()
                removed.append(info.name)
        self.remove_orphaned_temporaries()
        if removed:
            fsync_dir(self.directory)
            log.info("removed %d checkpoint(s) from %s", len(removed), self.directory)
        return removed

    def remove_orphaned_temporaries(self) -> None:
        """Delete the temporary files of saves whose process is gone (killed midway)."""
        with os.scandir(self.directory) as entries:
            for entry in entries:
                match = _TMP.match(entry.name)
                if match and not _pid_alive(int(match["pid"])):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)


def is_checkpoint_file(path: str | os.PathLike[str]) -> bool:
    """Whether the file at `path` may be one of batuta's checkpoints: it starts with their
    magic, or with a part of it (a file cut short, empty included, which `latest()` then skips
    with a warning). A file that starts otherwise is another program's."""
    try:
        with open(path, "rb") as f:
            return MAGIC.startswith(f.read(len(MAGIC)))
    except OSError:
        return False


def _natural(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- the job's checkpoints ----------------------------------------------------------------

_job_checkpoints: ContextVar[CheckpointManager | None] = ContextVar("batuta_job_checkpoints", default=None)


def job_checkpoints() -> CheckpointManager | None:
    """The checkpoint manager `batuta run --journal DIR` gives the running job, else None."""
    return _job_checkpoints.get()


@contextlib.contextmanager
def use_checkpoints(manager: CheckpointManager | None) -> Iterator[CheckpointManager | None]:
    """Make `manager` what `job_checkpoints()` returns inside (the job runner sets this)."""
    token = _job_checkpoints.set(manager)
    try:
        yield manager
    finally:
        _job_checkpoints.reset(token)
