"""The journal's file: its records, appended and read back (`batuta.observers.journal`).

`b"BATUTAJ1"`, then records `length: u32 LE | crc32: u32 LE | payload`, the payload a result
under its key (and place) in the state-tree encoding of `batuta.observers.checkpoint`. Read
back one record at a time: `Records` keeps where each lies and reads a result when it is
asked for, so that a journal larger than this machine's memory resumes.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from batuta.core.task import Backend, TaskResult, TaskStatus
from batuta.errors import UsageError
from batuta.observers.checkpoint import CheckpointError, aligned_empty, decode_tree, encode_tree

log = logging.getLogger("batuta.observers.journal")

MAGIC = b"BATUTAJ1"
_RECORD = struct.Struct("<II")  # payload length, crc32 of the payload
Place = tuple[str, int]  # (pool job, n): the n-th task submitted under pool.job(<pool job>)


class JournalError(UsageError):
    """The journal cannot be used: a bad folder, an unreadable file, an argument with no key."""


def record_header(payload: bytes) -> bytes:
    """What precedes `payload` in the file: its length and CRC."""
    return _RECORD.pack(len(payload), zlib.crc32(payload))


def encode_record(key: str, r: TaskResult, place: Place | None = None, args: str | None = None) -> bytes:
    """The payload of `r`'s record under `key` (at `place`; for a `Task.key`, with `args`, its
    arguments' sample: `journal.args_sample`)."""
    record = {
        "key": key,
        "args": args,
        "place_job": place[0] if place is not None else None,
        "place": place[1] if place is not None else None,
        "task_id": r.task_id,
        "name": r.name,
        "status": r.status.value,
        "value": r.value,
        "stdout": r.stdout,
        "stderr": r.stderr,
        "exit_code": r.exit_code,
        "error": r.error,
        "duration": r.duration,
        "queue_wait": r.queue_wait,
        "host": r.host,
        "slot": r.slot,
        "attempts": r.attempts,
        "backend": r.backend.value if r.backend is not None else None,
        "backend_reason": r.backend_reason,
        "job": r.job,
        "code": r.code,
    }
    return b"".join(encode_tree(record, where=f"result of {key!r}"))  # one copy: later mutation can't leak in


def _decode_record(payload: np.ndarray) -> tuple[str, TaskResult, Place | None, str | None]:
    """A record's key, result, place and arguments' sample; the result's arrays are views of
    `payload` (which they keep alive: read into a buffer of its own, as `Records.get` does,
    they are writable)."""
    d = decode_tree(payload, copy=False)
    backend = d["backend"]
    result = TaskResult(
        task_id=int(d["task_id"]),
        name=d["name"],
        status=TaskStatus(d["status"]),
        value=d["value"],
        stdout=d["stdout"],
        stderr=d["stderr"],
        exit_code=d["exit_code"],
        error=d["error"],
        duration=float(d["duration"]),
        queue_wait=float(d["queue_wait"]),
        host=d["host"],
        slot=d["slot"],
        attempts=int(d["attempts"]),
        backend=Backend(backend) if backend is not None else None,
        backend_reason=d["backend_reason"],
        job=d["job"],
        code=d.get("code") or "",  # absent in journals from before it was recorded
    )
    n = d.get("place")  # absent in journals from before places
    place = (str(d["place_job"]), int(n)) if n is not None else None
    args = d.get("args")  # absent in journals from before it was recorded
    return str(d["key"]), result, place, args if isinstance(args, str) else None


def read_journal(path: Path) -> tuple[dict[str, TaskResult], int, int]:
    """(results by key, bytes of good records incl. the magic, file size). Blocking."""
    records, _places, good, size, _skipped = read_records(path)
    try:
        return {key: result for key in records if (result := records.get(key)) is not None}, good, size
    finally:
        records.close()


class Records:
    """The journal's results as opened, by key, each read from the file and decoded when it
    is asked for: they were all decoded into memory at the start, so a journal of 40 results
    of 20 MB took 1.7 GB to resume a job that needed one of them."""

    def __init__(self, path: Path | None = None) -> None:
        self._at: dict[str, tuple[int, int]] = {}  # key -> (offset of its payload, its length)
        self._args: dict[str, str] = {}  # Task.key -> the sample of the arguments journaled under it
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC) if path is not None else -1

    def add(self, key: str, offset: int, length: int, args: str | None = None) -> None:
        self._at[key] = (offset, length)
        if args is not None:
            self._args[key] = args
        else:
            self._args.pop(key, None)

    def args(self, key: str) -> str | None:
        """The sample of the arguments the result under `key` was made from (`Task.key`s only)."""
        return self._args.get(key)

    def __len__(self) -> int:
        return len(self._at)

    def __iter__(self) -> Iterator[str]:
        return iter(self._at)

    def get(self, key: str) -> TaskResult | None:
        """The result journaled under `key`, read now; None when there is none, or when the
        file no longer holds it (replaced meanwhile: the task then runs again, said once)."""
        where = self._at.get(key)
        if where is None or self._fd < 0:
            return None
        offset, length = where
        payload = aligned_empty(length)  # the restored arrays' own memory: writable, aligned
        try:
            if os.preadv(self._fd, [payload.data], offset) != length:
                raise ValueError("the file is shorter than when it was opened")
            return _decode_record(payload)[1]
        except (OSError, ValueError, CheckpointError) as exc:
            log.warning("journal: cannot read the result of %s back (%s); it runs again", key, exc)
            del self._at[key]
            return None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _record_at(fd: int, offset: int, size: int) -> tuple[np.ndarray, int] | None:
    """The payload of the record at `offset` and where the record ends, if it lies whole
    within `size` bytes with a matching CRC; else None."""
    if offset + _RECORD.size > size:
        return None
    length, crc = _RECORD.unpack(os.pread(fd, _RECORD.size, offset))
    end = offset + _RECORD.size + length
    if end > size:
        return None
    payload = aligned_empty(length)
    if os.preadv(fd, [payload.data], offset + _RECORD.size) != length or zlib.crc32(payload.data) != crc:
        return None
    return payload, end


def read_records(path: Path) -> tuple[Records, dict[Place, str], int, int, list[tuple[int, int]]]:
    """The journal's records (by key, read when asked for), the key journaled at each place,
    the bytes of good records (with the magic), the file's size and the (start, end) of
    damaged records skipped in the middle. It reads one record at a time.

    A damaged record whose length still leads to a sound one is skipped, so damage in the
    middle of a long job's journal costs that one result, not every result after it; one
    that leads nowhere (its length is damaged too, or it is the last: a torn append) ends
    the trusted part."""
    records = Records(path)
    fd = records._fd
    try:
        size = os.fstat(fd).st_size
        if os.pread(fd, len(MAGIC), 0) != MAGIC:
            raise JournalError(f"{path} is not a batuta journal (bad magic); pass another --journal folder")
        places: dict[Place, str] = {}
        skipped: list[tuple[int, int]] = []
        offset = len(MAGIC)
        while offset + _RECORD.size <= size:
            length = _RECORD.unpack(os.pread(fd, _RECORD.size, offset))[0]
            end = offset + _RECORD.size + length
            if end > size:
                break
            found = _record_at(fd, offset, size)
            decoded = None
            if found is not None:
                try:
                    decoded = _decode_record(found[0])
                except Exception as exc:  # passes its CRC but not the decoder: skipped or the end, as damage is
                    log.warning("journal %s: unreadable record at byte %d (%s)", path, offset, exc)
            if decoded is None:
                if _record_at(fd, end, size) is None:
                    break
                skipped.append((offset, end))
                offset = end
                continue
            key, _result, place, args = decoded  # checked whole; read again when asked for (Records.get)
            records.add(key, offset + _RECORD.size, length, args)
            if place is not None:
                places[place] = key
            offset = end
    except BaseException:
        records.close()
        raise
    return records, places, offset, size, skipped
