"""The job journal: each succeeded task's result, durably, under a key naming what it did.

`batuta run JOB --journal DIR` gives the pool a `JournalStore` (the pool's `ResultStore`
hook), which records every task that succeeds into `DIR/journal.bin`.
`batuta run JOB --journal DIR --resume` reads that journal first, and a submitted task whose
key is in it is not run again: `submit()` hands back an already-resolved future holding the
journaled result. Together with the job's own checkpoints (`DIR/checkpoints`, see
`batuta.observers.checkpoint.job_checkpoints`), a job killed at any moment resumes where it was.

**Task keys.** `Task.key` when the caller set one. For a kernel registered `pure=True`
(equal arguments give an equal result: `batuta.kernels.registry.kernel`), the content key

    "<job>/<kernel name>/<hash>"

so every task with those arguments shares one journaled result, whatever its place. For any
other task (a binary, a kernel that is not known here to be pure, such as `spin`, which
measures time) the key is its place in the job as well:

    "<job>/<kernel name or binary path>/<hash>#<pool job>:<n>"

where `<n>` counts the tasks submitted under `pool.job(<pool job>)` in this run, from 0 (every
task counts, restored or not, whatever its key). Two hundred identical tasks are two hundred
places: a run killed after 56 of them resumes with exactly 56 restored. The hash is a check:
when the n-th task of a resumed run computes something else than the journaled n-th (the
job changed, or it submits from concurrent coroutines in another order), it is not restored
but runs again, with one warning per pool job. A job resuming from a checkpoint submits again
from there: the first checkpoint it loads sets the places back to where they were when it was
saved (`batuta.observers.checkpoint`, Places), so the tasks after it meet their own places
(without that, the n-th task after the checkpoint met the n-th task of the first iteration,
and where their arguments were equal got that iteration's result back).

In both forms `<job>` is the job's name as given to `batuta run` (for a job file, the path
as typed; a resume that names the same file another way takes the journal's spelling,
`_journaled_name`), and `<hash>` is the first 128 bits (hex) of a
SHA-256 over a canonical, type-tagged encoding of what the task computes: the kernel name
and its arguments (NumPy arrays by dtype, shape and bytes; floats by their IEEE bits; ints,
str, bytes, None, bools, lists, tuples and dicts by value and type), or a binary's path,
arguments, environment and working directory, plus the backend asked for (`Backend.CPU` and
`Backend.GPU` results may differ in the last bits). The same job submitting the same
computation gets the same hash in every run and on every coordinator of the same byte
order, so a pure kernel's journaled result is the result a rerun would give. A kernel whose
result depends on more than its arguments (the clock, unseeded randomness, the host) must
not be declared pure. Hashing reads every argument byte: for arguments of many megabytes
per task, setting `Task.key` saves that time (such a task is keyed by it alone: the caller
vouches that equal keys mean equal results). Its record keeps a sample of its arguments
(`args_sample`: an array's dtype, shape and first and last 4 KiB, the rest whole), so a
resume that restores it for a task with other arguments (one key reused in a loop, or an
argument changed and the key not) says so, once per key: it is restored all the same.

**The user's code.** A task whose kernel comes from the user's code that the pool ships to
the hosts (`batuta.runtime.code.ShippedCode`: any kernel but the built-ins, those that
modules installed here register, and binaries) has that code's digest in its key: the
kernel name reads `<kernel name>@<first 16 hex digits of the digest>` and the hash covers
the whole digest; a `Task.key` becomes `<key>@<16 hex digits>`. Editing a shipped file
makes a new digest, so those tasks run again on resume, with the new code, instead of
being restored with the old code's results. Built-in kernels keep their keys.

**Tasks that feed tasks.** A task whose arguments name other tasks' results (futures, kept
refs) hashes each by the name of that result (`batuta.runtime.journaling`): how it is made
(kernel, arguments, backend asked for, the user's code), whether or not the producer had
finished when the task was submitted, since a resumed run restores producers at once (the
value read was hashed then, so every consumer ran again). The readers of a producer that is
not pure are keyed by place; one that runs again in a resumed run (not restored) made another
value than its journaled readers read, so those run again too (and theirs: a pure task
reading a result that is not pure makes a result that is not pure either).

**What is journaled.** Succeeded results only: a task that failed, timed out or was lost
is run again on resume. Restored results are marked `restored` and keep the host, slot,
timings and attempts of the run that produced them.

**File format** (`journal_records.py`). `b"BATUTAJ2"`, then records `length: u32 LE | crc32: u32 LE | payload`,
where the payload is a result's value in the state-tree encoding of
`batuta.observers.checkpoint.encode_tree` (msgpack plus raw array buffers; no pickle) and
its key, place and other fields in one msgpack array, each string by a number that a
strings record (written twice) defined (a host's, once a journal): 85 bytes a noop result, where
version 1's map of every field by name took 300. A version-1 journal is converted (renamed
into place, synced) when a run resumes it. Records are
appended in batches from a worker thread, with one fsync per batch, so the event loop never
waits on the disk; a result is durable once its batch is synced. A crash mid-append leaves
a torn last record: opening the journal drops it (with a warning) and truncates the file
there. A resume reads the records one at a time and keeps only where each lies: a result is
read back from the file when its task asks for it (`Records`), so a journal larger than this
machine's memory resumes. A damaged record in the middle whose length still leads to a sound record is skipped
(with a warning; the file is rewritten without it): that one result runs again, not all
after it. Without `--resume` an existing journal, and the checkpoints beside it, are discarded
(with a warning): the run starts over; but that of a run that did not finish (killed,
interrupted, or its job raised: `run.json` says `"finished": false` until the job's main
returns) is refused, since it was `--resume` that the user had forgotten.

**One run at a time.** The run holds `DIR/.lock` (flock: released with the run, even when it
is killed); another is refused while it does. `DIR/run.json` names the job and the digest of
the code the pool ships; a resumed run of another job or other code discards the checkpoints
(its tasks' keys tell old results apart already).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import struct
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from batuta.core.objects import UNREPEATABLE, ObjectRef, refs_in
from batuta.core.task import BinaryCall, KernelCall, Task, TaskResult
from batuta.observers.atomic import fsync_dir, replace_file
from batuta.observers.checkpoint import SUFFIX as CHECKPOINT_SUFFIX
from batuta.observers.checkpoint import (
    CheckpointError,
    CheckpointManager,
)
from batuta.observers.journal_records import (
    MAGIC,
    JournalError,
    Place,
    Records,
    Scan,
    convert_v1,
    encode_record,
    is_v1,
    read_records,
    record_header,
)

log = logging.getLogger("batuta.observers.journal")

JOURNAL_FILE = "journal.bin"
CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = ".lock"  # held by the run that has the journal open (`_lock`)
RUN_FILE = "run.json"  # the job and code the checkpoints were made by (`Journal.bind`)
CODE_CHARS = 16  # of the code digest shown in a key (the hash covers all of it)


# -- keys ----------------------------------------------------------------------------------


def task_key(task: Task, job: str, code: str = "") -> str:
    """The task's journal key: `task.key`, or one derived from job, kernel and arguments;
    with `code` (the digest of the user's code its kernel comes from), that digest too."""
    if task.key is not None:
        return f"{task.key}@{code[:CODE_CHARS]}" if code else task.key
    digest = hashlib.sha256()
    call = task.call
    if isinstance(call, KernelCall):
        what = f"{call.name}@{code[:CODE_CHARS]}" if code else call.name
        computes: tuple[Any, ...] = ("kernel", call.name, call.args, task.backend.value)
        _feed(digest, (*computes, code) if code else computes)  # built-in kernels keep their keys
    else:
        assert isinstance(call, BinaryCall)
        what = call.path
        _feed(digest, ("binary", call.path, call.args, dict(call.env), call.cwd))
    return f"{job}/{what}/{digest.hexdigest()[:32]}"


SAMPLE_BYTES = 4096  # of a large array or bytes argument, read at each end for `args_sample`


def args_sample(task: Task) -> str | None:
    """A cheap digest of a keyed task's arguments, to tell a key reused for other arguments
    (`JournalStore`): arrays and bytes beyond twice `SAMPLE_BYTES` by dtype, shape (or
    length) and their first and last `SAMPLE_BYTES` bytes, the rest whole. A key exists to
    spare reading many megabytes, so arguments that differ only in their middle look equal
    (no warning then, never a false one). None for arguments that have no stable digest."""
    call = task.call
    what = (call.name, call.args) if isinstance(call, KernelCall) else (call.path, call.args, dict(call.env), call.cwd)
    digest = hashlib.sha256(b"batuta-args-1\0")
    try:
        _feed(digest, what, 0, SAMPLE_BYTES)
    except JournalError:
        return None
    return digest.hexdigest()[:32]


def place_key(content_key: str, place: Place) -> str:
    """The key of a task that is not pure: its content key and its place in the job."""
    job, n = place
    return f"{content_key}#{job}:{n}"


_KNOWN_PURITY: dict[str, bool] = {}


def is_pure(task: Task) -> bool:
    """Whether `task` is a kernel registered here with `pure=True`, reading no result of an
    unfinished task that is not (`UNREPEATABLE`: whose value its making does not tell);
    unknown kernels are not."""
    call = task.call
    if not isinstance(call, KernelCall):
        return False
    if any(ref.digest.startswith(UNREPEATABLE) for ref in refs_in(call.args)):
        return False  # two readers of two random samples were one task to the journal
    pure = _KNOWN_PURITY.get(call.name)
    if pure is None:
        from batuta.kernels import registry  # the built-ins import no numba: cheap, once

        found = registry.known(call.name)  # never imports a "module:kernel"'s module here
        if found is None:  # registered only on the hosts (or not at all): assume not
            return False  # not cached: a module loaded later may register it
        pure = found.pure
        _KNOWN_PURITY[call.name] = pure
    return pure


def _feed(h: Any, v: Any, depth: int = 0, sample: int = 0) -> None:
    """Feed a canonical, type-tagged encoding of `v` to hash `h` (lengths prefix variable parts);
    with `sample`, of arrays and bytes beyond twice that many bytes only those at each end."""
    if depth > 64:
        raise JournalError("task arguments nest deeper than 64 levels; set Task.key")
    t = type(v)
    if v is None:
        h.update(b"N")
    elif t is bool:
        h.update(b"T" if v else b"F")
    elif t is int:
        text = str(v).encode()
        h.update(b"i%d:" % len(text) + text)
    elif t is float:
        h.update(b"f" + struct.pack("<d", v))
    elif t is str:
        data = v.encode("utf-8", "surrogatepass")
        h.update(b"s%d:" % len(data) + data)
    elif t is bytes:
        h.update(b"b%d:" % len(v))
        if sample and len(v) > 2 * sample:
            h.update(v[:sample])
            h.update(v[-sample:])
        else:
            h.update(v)
    elif isinstance(v, np.ndarray):
        if v.dtype.hasobject:
            raise JournalError("an object array has no stable key; set Task.key")
        dtype = v.dtype.str.encode()
        h.update(b"a%d:%s%r" % (len(dtype), dtype, v.shape))
        if sample and v.nbytes > 2 * sample:  # its ends' elements (copied only when not contiguous)
            k = max(1, sample // v.itemsize)
            flat = v.reshape(-1) if v.flags.c_contiguous else None
            for end in (flat[:k], flat[-k:]) if flat is not None else (v.flat[:k], v.flat[v.size - k :]):
                h.update(end.view(np.uint8))
        else:
            h.update(np.ascontiguousarray(v).reshape(-1).view(np.uint8))
    elif isinstance(v, np.generic):
        dtype = v.dtype.str.encode()
        h.update(b"g%d:%s" % (len(dtype), dtype) + v.tobytes())
    elif t is list or t is tuple:
        h.update(b"%s%d:" % (b"l" if t is list else b"t", len(v)))
        for item in v:
            _feed(h, item, depth + 1, sample)
    elif t is ObjectRef:  # by content: the id changes from run to run, the digest does not
        if not v.digest:
            raise JournalError("an ObjectRef without a digest has no stable key; use pool.put's ref or set Task.key")
        h.update(b"r%d:" % len(v.digest) + v.digest.encode())
    elif t is dict:
        h.update(b"d%d:" % len(v))
        for key in sorted(v, key=str):
            _feed(h, key, depth + 1, sample)
            _feed(h, v[key], depth + 1, sample)
    else:
        raise JournalError(f"cannot derive a journal key from an argument of type {t.__name__}; set Task.key")


class Journal:
    """An append-only journal of succeeded task results in a folder, with its checkpoints.

    Open with `await Journal.open(folder, job=..., resume=...)`; `record()` is cheap and runs
    on the event loop; `close()` (or `flush()`) waits until everything recorded is synced.
    """

    def __init__(
        self,
        directory: Path,
        job: str,
        entries: Records,
        file: Any,
        places: dict[Place, str] | None = None,
        lock: int = -1,
    ) -> None:
        self.directory = directory
        self.path = directory / JOURNAL_FILE
        self.job = job
        self.checkpoints = CheckpointManager(directory / CHECKPOINT_DIR)
        self._entries = entries  # what the journal held when opened: resume looks these up (read when asked)
        self._places = places or {}  # the key journaled at each place, as opened
        self._file = file
        self._lock = lock  # the folder's lock, held until close (`_lock`)
        self._strings = entries.strings  # numbers of the strings its records name (`journal_records.Strings`)
        self._pending: list[list[bytes]] = []  # per result: its payloads
        self._flusher: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self.recorded = 0  # records appended by this run
        self._code: str | None = None  # the code digest `bind` was given (None: not bound)
        self.synced = 0  # of which on disk, fsynced

    # -- opening ----------------------------------------------------------------------------

    @classmethod
    async def open(cls, directory: str | os.PathLike[str], *, job: str, resume: bool) -> Journal:
        """Open (or create) the journal in `directory`; without `resume`, start it over."""
        folder = Path(directory)
        entries, places, file, lock = await asyncio.to_thread(_open_sync, folder, resume)
        if resume:
            job = _journaled_name(folder, job, entries)
        journal = cls(folder, job, entries, file, places, lock)
        if not resume:
            await asyncio.to_thread(_discard_checkpoints, journal.checkpoints)
        else:  # what a save killed midway left (a checkpoint's size, for good): its writer is gone
            await asyncio.to_thread(journal.checkpoints.remove_orphaned_temporaries)
        return journal

    async def bind(self, code: str) -> None:
        """The job's checkpoints belong to this job and this code (the digest of what the pool
        ships): those of another job, or of code edited since, are discarded, saying so. A
        resumed run took them regardless, and returned the other job's (or old code's) answer
        from a loop resumed halfway. Tasks need no such care: their keys hold both."""
        await asyncio.to_thread(self._bind, code)

    def _bind(self, code: str) -> None:
        run = self.directory / RUN_FILE
        now = {"job": self.job, "code": code, "finished": False}  # until `close(finished=True)`
        try:
            before = json.loads(run.read_text())
        except (OSError, ValueError):
            before = None
        same = isinstance(before, dict) and before.get("job") == self.job and before.get("code") == code
        # no run.json: a journal an older batuta wrote, whose checkpoints cannot be told apart: kept
        if before is not None and not same and self.checkpoints.list():
            why = "another job" if not isinstance(before, dict) or before.get("job") != self.job else "other code"
            log.warning(
                "journal %s: its checkpoints were made by %s, so they are not used: the job's loop starts over "
                "(task results of unchanged code are still restored)",
                self.directory,
                why,
            )
            _discard_checkpoints(self.checkpoints, say=False)  # said above, with why
        if before != now:
            self._write_run(now)
        self._code = code

    def _write_run(self, run: dict[str, Any]) -> None:
        path = self.directory / RUN_FILE
        tmp = path.with_name(f".{RUN_FILE}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(run))
            os.replace(tmp, path)
        except OSError as exc:
            raise JournalError(f"journal {self.directory}: cannot write {RUN_FILE}: {_reason(exc)}") from None

    def __len__(self) -> int:
        return len(self._entries)

    def key_for(self, task: Task, code: str = "") -> str:
        """The task's content key (`task_key`): `Task.key`, or from job, kernel and arguments;
        and the digest of the user's code its kernel comes from, if it does."""
        return task_key(task, self.job, code)

    def get(self, key: str, restored_as: tuple[int, str] | None = None) -> TaskResult | None:
        """The journaled result for `key`, from the journal as it was opened; `restored_as`
        (task id, pool job): as that task's result, restored."""
        return self._entries.get(key, restored_as)

    def args_at(self, key: str) -> str | None:
        """The sample of the arguments journaled under a `Task.key` (`args_sample`), as opened."""
        return self._entries.args(key)

    def key_at(self, place: Place) -> str | None:
        """The key journaled at `place` (pool job, n), from the journal as it was opened."""
        return self._places.get(place)

    # -- recording ------------------------------------------------------------------------

    def record(self, key: str, result: TaskResult, place: Place | None = None, args: str | None = None) -> None:
        """Journal `result` under `key` (at `place`, for a place key; with `args`, a `Task.key`'s
        arguments' sample) if it succeeded. On the loop: encodes, then queues."""
        if not result.is_success() or self._error is not None:  # after a failed write, said once, nothing more
            return
        if self._file is None:
            log.warning("journal %s is closed: task %d (%s) not journaled", self.path, result.task_id, key)
            return
        try:
            payloads = encode_record(key, result, self._strings, place, args)
        except (CheckpointError, ValueError, TypeError) as exc:
            log.warning("journal: not recording task %d (%s): %s", result.task_id, key, exc)
            return
        self._pending.append(payloads)
        self.recorded += 1
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_pending(), name="batuta-journal")

    async def _flush_pending(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                await asyncio.to_thread(self._write_batch, batch)
                self.synced += len(batch)
                log.debug("journal: %d result(s) synced, %d in all", len(batch), self.synced)
        except Exception as exc:
            self._error = exc
            log.error("journal %s: write failed, results since are not journaled: %s", self.path, exc)
        finally:
            self._flusher = None

    def _write_batch(self, batch: list[list[bytes]]) -> None:
        f = self._file
        for payloads in batch:
            for payload in payloads:
                f.write(record_header(payload))
                f.write(payload)
        f.flush()
        os.fsync(f.fileno())

    async def flush(self) -> None:
        """Wait until every result recorded so far is on disk."""
        while self._flusher is not None:
            await asyncio.shield(self._flusher)

    async def close(self, *, finished: bool = False) -> None:
        """Flush and close, releasing the folder. Raises JournalError if some write failed.
        `finished`: the job ran to its end, so a run without resume may start the journal over
        (a bound journal left unfinished is refused then: `_open_locked`)."""
        await asyncio.sleep(0)  # let done-callbacks already scheduled (tasks just finished) record
        try:
            await self.flush()
            if finished and self._code is not None and self._error is None:
                await asyncio.to_thread(self._write_run, {"job": self.job, "code": self._code, "finished": True})
        finally:
            if self._file is not None:
                try:
                    await asyncio.to_thread(self._file.close)
                except OSError as exc:  # its last buffered bytes: a full disk says so here
                    self._error = self._error or exc
                self._file = None
            self._entries.close()
            if self._lock >= 0:
                os.close(self._lock)
                self._lock = -1
        if self._error is not None:
            raise JournalError(
                f"journal {self.path}: a write failed ({_reason(self._error)}), so results since were not journaled; "
                "free the disk and run again with --resume"
            )


def _open_sync(folder: Path, resume: bool) -> tuple[Records, dict[Place, str], Any, int]:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # a file of that name, or one on its path
        raise JournalError(
            f"cannot use {str(folder)!r} as a journal folder: a file is in the way; name a folder (made if missing)"
        ) from None
    except OSError as exc:
        raise JournalError(f"cannot use {str(folder)!r} as a journal folder: {exc.strerror or exc}") from None
    lock = _lock(folder)
    try:
        entries, places, file = _open_locked(folder, resume)
    except OSError as exc:  # a folder that exists but cannot be written (read-only, full)
        os.close(lock)
        raise JournalError(f"cannot use {str(folder)!r} as a journal folder: {exc.strerror or exc}") from None
    except BaseException:
        os.close(lock)
        raise
    return entries, places, file, lock


def _lock(folder: Path) -> int:
    """Hold `folder/LOCK_FILE` for this run (released with its fd, or by the kernel when the
    process dies, even by kill -9): two runs on one journal interleaved their records, and one
    started over while it read the other's checkpoints, returning the other's result."""
    path = folder / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise JournalError(f"cannot use {str(folder)!r} as a journal folder: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise JournalError(
            f"journal {str(folder)!r} is in use by another run (process {holder}); wait for it to end, or give "
            "this run another --journal folder"
        ) from None
    with contextlib.suppress(OSError):  # who holds it, for the message above: a read-only folder still locks
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _open_locked(folder: Path, resume: bool) -> tuple[Records, dict[Place, str], Any]:
    path = folder / JOURNAL_FILE
    for leftover in folder.glob(f".{JOURNAL_FILE}.*.tmp"):  # a rewrite killed midway: we hold the lock now
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
    entries = Records()
    places: dict[Place, str] = {}
    if resume and path.exists():
        if is_v1(path):
            _convert(path)
        # its fd stays on the file as read: a rewrite below replaces the name, not what it reads
        entries, places, good, size, skipped = read_records(path)
        _say_damage(path, (good, size, skipped))
        if skipped:
            _rewrite_without(path, skipped, good)
        elif good < size:
            os.truncate(path, good)
        log.info("journal %s: %d result(s) to resume from", path, len(entries))
    elif resume:
        log.warning("journal %s does not exist yet: nothing to resume, starting a new one", path)
    if not resume or not path.exists():
        if path.exists() and path.stat().st_size > len(MAGIC):
            _refuse_unfinished(folder)
            log.warning("journal %s: starting over (pass --resume to reuse its results)", path)
        _replace(path, [MAGIC])
    file = open(path, "ab")  # noqa: SIM115 - lives as long as the journal
    fsync_dir(folder)
    return entries, places, file


def _say_damage(path: Path, scan: Scan) -> None:
    good, size, skipped = scan
    if good < size:
        log.warning(
            "journal %s: dropped its last %d bytes, from byte %d on, where a record is torn or corrupt (a crash "
            "mid-write, or damage to the file): the results after it run again",
            path,
            size - good,
            good,
        )
    if skipped:
        log.warning(
            "journal %s: skipped %d damaged record(s) before byte %d (the first at byte %d): their results run "
            "again, the rest resume",
            path,
            len(skipped),
            good,
            skipped[0][0],
        )


def _convert(path: Path) -> None:
    """Replace a version-1 journal by one of this version (`journal_records`), atomically: a
    run of an older batuta resumes in this one, and appends in this version's records."""
    scanned: list[Scan] = []
    before = path.stat().st_size
    after = replace_file(path, path.with_name(f".{JOURNAL_FILE}.{os.getpid()}.tmp"), convert_v1(path, scanned))
    _say_damage(path, scanned[0])  # left out of the new file
    log.info("journal %s: converted from the format of an older batuta (%d bytes, now %d)", path, before, after)


def _refuse_unfinished(folder: Path) -> None:
    """Starting over a journal whose run did not finish (killed, interrupted, its job raised)
    threw away what the run had done, with a warning, when `--resume` was forgotten."""
    try:
        run = json.loads((folder / RUN_FILE).read_text())
    except (OSError, ValueError):
        return  # none: a journal an older batuta wrote, or one no run bound
    if isinstance(run, dict) and run.get("finished") is False:
        raise JournalError(
            f"journal {str(folder)!r} holds the results of a run of {run.get('job')} that did not finish (killed, "
            "interrupted, or its job raised): add --resume to go on from them, or remove the folder to start over"
        )


def _rewrite_without(path: Path, skipped: list[tuple[int, int]], good: int) -> None:
    """Replace the journal by its sound records up to `good` (renamed into place, synced), so
    that appends follow sound records and the next resume does not warn again. Copied a
    piece at a time: the journal may be larger than this machine's memory."""
    kept, start = [], 0
    for begin, end in skipped:
        kept.append((start, begin))
        start = end
    kept.append((start, good))

    def pieces() -> Iterator[bytes]:
        with open(path, "rb") as source:
            for begin, end in kept:
                for at in range(begin, end, _COPY_PIECE):
                    yield os.pread(source.fileno(), min(_COPY_PIECE, end - at), at)

    _replace(path, pieces())


_COPY_PIECE = 1 << 22


def _replace(path: Path, parts: Iterable[bytes | memoryview]) -> None:
    """Write `parts` as `path`, atomically (`atomic.py`)."""
    replace_file(path, path.with_name(f".{JOURNAL_FILE}.{os.getpid()}.tmp"), parts)


def _reason(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def _journaled_name(folder: Path, job: str, entries: Records) -> str:
    """The job name a resumed run keys its tasks by: the journal's own where it names the same
    job file another way (`./job.py`, an absolute path, for `job.py`), since a task's key holds
    the job's name as typed and every task of the run then ran again, silently. A journal of
    another job is said once: only its tasks known by content (pure kernels, `Task.key`) are
    restored."""
    try:
        before = json.loads((folder / RUN_FILE).read_text())
    except (OSError, ValueError):
        return job  # a new journal, or one an older batuta wrote: nothing to compare
    journaled = before.get("job") if isinstance(before, dict) else None
    if not isinstance(journaled, str) or journaled == job:
        return job
    same = os.path.normpath(journaled) == os.path.normpath(job)
    if not same:
        with contextlib.suppress(OSError):
            same = os.path.samefile(journaled, job)
    if same:
        log.info("journal %s: resuming job %s as %s, the name its results were journaled under", folder, job, journaled)
        return journaled
    if any(key.startswith(f"{job}/") for key in entries):  # run.json names the last job only
        return job  # one journal for two jobs, run by turns: this one's results are there too
    log.warning(
        "journal %s was written by job %s, not %s: only its tasks known by content (pure kernels, Task.key) "
        "are restored; resume with 'batuta run %s ...' to restore the rest",
        folder,
        journaled,
        job,
        journaled,
    )
    return job


def _discard_checkpoints(manager: CheckpointManager, *, say: bool = True) -> None:
    stale = manager.list()  # batuta's only: another program's .ckpt files there are left alone
    if stale and say:
        log.warning("journal: discarding %d checkpoint(s) of an earlier run in %s", len(stale), manager.directory)
    for info in stale:
        with contextlib.suppress(FileNotFoundError):
            info.path.unlink()
    for leftover in manager.directory.glob(f".*{CHECKPOINT_SUFFIX}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()


# -- the pool the job sees --------------------------------------------------------------------


class JournalStore:
    """The pool's `ResultStore` over a journal: `pool.set_result_store(JournalStore(j, resume=True))`.

    Every succeeded task is recorded under its key (see the module docstring: content keys for
    pure kernels and `Task.key`, place keys for the rest); with `resume`, a submitted task
    whose key is already journaled resolves at once with that result (marked `restored`) and
    does not run. The pool counts those in `stats().restored` and still tells its observers.

    Places come from counting `lookup` calls per pool job: the pool asks once per submitted
    task, in submission order, naming the task's id, and `record` is told every task that
    ended, by its id: each is journaled at its own place. (Tasks of equal content took the
    oldest waiting place, so one that failed gave its place to the next that succeeded: a
    resumed run restored that one's result at the failed one's place.)
    """

    def __init__(self, journal: Journal, *, resume: bool) -> None:
        self._journal = journal
        self._resume = resume
        self._submitted: dict[str, int] = defaultdict(int)  # tasks looked up, per pool job
        self._place_of: dict[int, int] = {}  # task id -> its place, for place-keyed tasks not finished yet
        self._key_of: dict[int, str] = {}  # task id -> its content key, for tasks looked up and not ended yet
        self._warned: set[str] = set()  # pool jobs already warned about a changed task
        self._reused: set[str] = set()  # Task.keys already warned about as reused for other arguments
        self._restart_open = resume  # a checkpoint loaded before the first task sets the places
        self._placeless = False  # restarted from a checkpoint saved with tasks in flight: no place restores

    def counts(self) -> dict[str, int] | None:
        """Tasks submitted so far, per pool job, for a checkpoint saved now; None while a
        place-keyed task is unfinished (a loop that submits its next iteration before it saves
        the last): which of those a restart submits again, and where, cannot be told."""
        return None if self._place_of else dict(self._submitted)

    def restart_at(self, counts: Mapping[str, int] | None, checkpoint: str) -> None:
        """The job restarts from `checkpoint`, saved when its pool jobs had submitted `counts`:
        its next tasks take the places the saving run's next tasks took. Any checkpoint the job
        loads before its first task counts (a settings checkpoint, then the latest; the latest,
        then an older one to roll back): the last one loaded is where it restarts. `counts`
        None: saved with tasks in flight, so no task of this run is restored by its place."""
        if not self._restart_open:
            return
        self._submitted = defaultdict(int, counts or {})
        self._placeless = counts is None
        if counts is None:
            log.warning(
                "journal: checkpoint %s was saved while tasks were running, so which of them the job submits again "
                "cannot be told: tasks that are not pure run again (save checkpoints between iterations to avoid it)",
                checkpoint,
            )
        else:
            log.info("journal: the job restarts from checkpoint %s: its tasks take their places from there", checkpoint)

    def lookup(
        self,
        task: Task,
        job: str,
        *,
        code: str = "",
        task_id: int | None = None,
        restore: bool = True,
        given_key: str | None = None,
    ) -> TaskResult | None:
        """The journaled result of `task`, or None to run it; `restore` False: run it whatever
        the journal holds (it reads a value made anew: `runtime/journaling.py`), and journal it.
        `given_key`: the user's `Task.key` where `task`'s is a kept result's ("kept:...")."""
        self._restart_open = False  # the job has begun: a checkpoint loaded now is no restart
        n = self._submitted[job]
        self._submitted[job] = n + 1
        content = self._journal.key_for(task, code)
        resume = self._resume and restore
        as_task = None if task_id is None else (task_id, job)  # made as its result: not copied again for it
        if task.key is not None or is_pure(task):
            found = self._journal.get(content, as_task) if resume else None
            if found is not None and task.key is not None and content not in self._reused:
                self._check_reused(task, content, given_key or task.key)
            if found is None and task_id is not None:
                self._key_of[task_id] = content  # hashed once: `record` is told the same task and code
            return found
        if resume and not self._placeless:
            key = place_key(content, (job, n))
            kept = self._journal.get(key, as_task)
            if kept is not None:
                return kept  # restored: it never runs, so it waits for no record
            self._warn_if_changed(job, n, key)
        if task_id is not None:
            self._place_of[task_id] = n
            self._key_of[task_id] = content
        return None

    def record(self, task: Task, job: str, result: TaskResult, *, code: str = "") -> None:
        """Every task that ended is told (a failed one too: its place is its own, not the next
        equal task's to take); the journal keeps the succeeded ones."""
        content = self._key_of.pop(result.task_id, None) or self._journal.key_for(task, code)
        if task.key is not None:  # with its arguments' sample: a resume tells a key reused for others
            if result.is_success():
                self._journal.record(content, result, args=args_sample(task))
            return
        if is_pure(task):
            self._journal.record(content, result)
            return
        n = self._place_of.pop(result.task_id, None)
        if n is None:  # submitted before this store was set: no place to journal it at
            log.debug("journal: task %d (%s) has no place in job %r; not journaled", result.task_id, content, job)
            return
        self._journal.record(place_key(content, (job, n)), result, (job, n))

    def _check_reused(self, task: Task, key: str, given_key: str) -> None:
        """Say once per key when the result restored under a `Task.key` was made from other
        arguments (`args_sample`): a key names one result, so a loop that reused one for
        other arguments got one result back for all of them, silently."""
        journaled = self._journal.args_at(key)
        if journaled is None or journaled == args_sample(task):  # none: a journal from before samples
            return
        self._reused.add(key)
        log.warning(
            "journal: Task.key %r was journaled for other arguments than a task with that key now has; its one "
            "result is restored for every such task (a key names a result): give each computation its own key "
            "(with what varies in it, as key=f'step-{i}'), or no key, to key the task by its arguments",
            given_key,
        )

    def _warn_if_changed(self, job: str, n: int, key: str) -> None:
        journaled = self._journal.key_at((job, n))
        if journaled is None or job in self._warned:
            return
        self._warned.add(job)
        log.warning(
            "journal: task %d of job %r is not the one journaled there (%s, now %s): "
            "the job or its code changed, or it submits in another order, so it and other changed tasks run again",
            n,
            job,
            journaled,
            key,
        )
