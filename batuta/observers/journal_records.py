"""The journal's file: its records, appended and read back (`batuta.observers.journal`).

`b"BATUTAJ2"`, then records `length: u32 LE | crc32: u32 LE | payload`. A payload is
`value | meta | len(meta): u32 LE`: the result's value in the state-tree encoding of
`batuta.observers.checkpoint` (msgpack plus raw array buffers, 64-byte aligned from the
payload's start; empty in a strings record) and `meta`, one msgpack array:

* `[0, first id, [str, ...]]` defines strings by number, from `first id` on;
* `[1, ...]` a result (`_RESULT_FIELDS`): every str of it by its number (kernel name, host,
  slot, pool job, code digest, GPU device, a key's `<job>/<kernel>/` part), a derived key's
  hash and an arguments' sample as 16 raw bytes, the rest by value. Records written before the
  GPU device was journaled lack that last field (`_RESULT_FIELDS_BEFORE_DEVICE`): read as "".

A journal of a million noop results holds "local/cpu:1" once, not a million times: version
1's records were a msgpack map of every field by name, 300 bytes for a noop, 443 for a
user's kernel (its code digest spelled out in each); 86 and 91 now (a CPU slot's device: 1 byte). A string is defined by
two copies of a strings record just before the first result that names it (a run
appending to a journal numbers its new strings from the journal's next number), and again,
under a new number, before one that names it after the writer forgot it (`Strings`: a
number is never given twice, so any batuta's reader, decoding a result after the whole file
was read, reads each number as the string written with it; a million labels cost the writer
no more memory than a few thousand): one
damaged record still costs no more than its own result, as in version 1, since the other
copy defines what a damaged strings record did; two damaged records in a row end the
trusted part, as they did. A result naming a number no record
defines is damaged, as one whose CRC fails.

Read back one record at a time, in large reads: `Records` keeps where each result lies
(its key and place were read at the start) and reads and decodes it when it is asked for,
so that a journal larger than this machine's memory resumes. A version-1 journal (an older batuta's)
is converted when a run resumes it (`convert_v1`), so a job started before an upgrade
resumes after it.
"""

from __future__ import annotations

import logging
import operator
import os
import re
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from batuta.core.task import Backend, TaskResult, TaskStatus
from batuta.errors import UsageError
from batuta.observers.checkpoint import CheckpointError, aligned_empty, decode_tree, encode_tree

log = logging.getLogger("batuta.observers.journal")

MAGIC = b"BATUTAJ2"
MAGIC_V1 = b"BATUTAJ1"  # a map of every field by name per record (`_decode_v1`)
_RECORD = struct.Struct("<II")  # payload length, crc32 of the payload
_U32 = struct.Struct("<I")
Place = tuple[str, int]  # (pool job, n): the n-th task submitted under pool.job(<pool job>)

_STRINGS, _RESULT = 0, 1  # a meta array's first item
_RESULT_FIELDS = 24  # [1, key's prefix, its hash (or the key), place job, place n, key ends in its place,
#   args, task_id, name, status, stdout, stderr, exit_code, error, duration, queue_wait, host, slot, attempts,
#   backend, backend_reason, job, code, device]
_RESULT_FIELDS_BEFORE_DEVICE = 23  # an older batuta's version-2 record: no device (a restored result said none)
_HASHED = re.compile(r"(.*[/:])([0-9a-f]{32})", re.DOTALL)  # `task_key`'s form: "<job>/<what>/<hash>", "kept:<hash>"
_HEX = re.compile(r"[0-9a-f]{32}")
_READ = 1 << 22  # bytes read at a time while opening
_STATUS = {status.value: status for status in TaskStatus}
_BACKEND = {backend.value: backend for backend in Backend}


class JournalError(UsageError):
    """The journal cannot be used: a bad folder, an unreadable file, an argument with no key."""


KEEP = 8192  # strings the writer keeps a number for, per generation (`Strings.ids`): two at most, ~2.5 MB


class Strings:
    """The journal's strings by number: those its records defined (`texts`, to read results
    back by), and the numbers of the strings the writer named lately, to name them again.

    The writer keeps a number for the strings it named in this generation and the last only
    (`KEEP` each): a string named again while kept moves to this generation, one that was not
    is defined anew under the next number. Every string it ever named was kept: each task's
    own label made a long job's coordinator grow by 130 bytes a task for its whole life. A
    number is never given twice, so a result read later names the string it was written with;
    a host, slot or kernel name, named every few results, stays kept and is defined once."""

    def __init__(self) -> None:
        self.texts: list[str | None] = []  # None: a number no record defined (a file batuta did not write whole)
        self.next = 0  # the number the writer gives its next new string: none the file's records gave
        self._ids: dict[str, int] = {}  # this generation's (`KEEP`)
        self._older: dict[str, int] = {}  # the last generation's: forgotten when this one is full

    def define(self, first: int, texts: list[Any]) -> None:
        """What a strings record of the file defines (the reader's; the writer's own strings
        are not read back in this run, so it keeps only their numbers)."""
        if first > len(self.texts):
            self.texts.extend([None] * (first - len(self.texts)))
        for number, text in enumerate(texts, first):
            if not isinstance(text, str):
                raise ValueError(f"string {number} is a {type(text).__name__}")
            if number == len(self.texts):
                self.texts.append(text)
            else:
                self.texts[number] = text
            self._keep(text, number)
        self.next = max(self.next, len(self.texts))

    def _keep(self, text: str, number: int) -> None:
        self._older.pop(text, None)
        if len(self._ids) >= KEEP and text not in self._ids:
            self._older, self._ids = self._ids, {}
        self._ids[text] = number

    def ids(self, texts: tuple[str | None, ...]) -> tuple[list[int | None], bytes | None]:
        """The numbers of `texts` (None stays None), and the payload of a strings record that
        defines those that had none kept, or None when all had."""
        ids, older = self._ids, self._older
        numbers: list[int | None] = []
        named: list[tuple[str, int]] = []  # not in this generation: kept in it below
        new: list[str] = []
        for text in texts:
            number = None if text is None else ids.get(text)
            if number is None and text is not None:
                number = older.get(text)
                if number is None:
                    if type(text) is not str:
                        raise TypeError(f"a {type(text).__name__} where the journal records a str")
                    if text not in new:
                        new.append(text)
                    number = self.next + new.index(text)
                named.append((text, number))
            numbers.append(number)
        definition = None
        if new:
            definition = _payload(b"", [_STRINGS, self.next, new])
            self.next += len(new)
        for text, number in named:
            self._keep(text, number)
        return numbers, definition

    def check(self, numbers: tuple[Any, ...]) -> None:
        """ValueError unless each of `numbers` is None or a defined string's."""
        texts = self.texts
        for number in numbers:
            if number is not None and (
                type(number) is not int or not 0 <= number < len(texts) or texts[number] is None
            ):
                raise ValueError(f"string {number!r} is defined by no record")

    def text(self, number: int | None) -> str | None:
        if number is None:
            return None
        text = self.texts[number] if type(number) is int and 0 <= number < len(self.texts) else None
        if text is None:
            raise ValueError(f"string {number!r} is defined by no record")
        return text


def record_header(payload: bytes) -> bytes:
    """What precedes `payload` in the file: its length and CRC."""
    return _RECORD.pack(len(payload), zlib.crc32(payload))


def _payload(tree: bytes, meta: list[Any]) -> bytes:
    packed = msgpack.packb(meta)
    return b"".join((tree, packed, _U32.pack(len(packed))))


def encode_record(
    key: str, r: TaskResult, strings: Strings, place: Place | None = None, args: str | None = None
) -> list[bytes]:
    """The payloads that journal `r` under `key` (at `place`; for a `Task.key`, with `args`, its
    arguments' sample: `journal.args_sample`): the result's, after two copies of a strings
    record when it names strings the journal has not defined yet. One copy of the value:
    later mutation can't leak in. A result that cannot be encoded raises before `strings`
    gets a number that no record would define."""
    tree = b"".join(encode_tree(r.value, where=f"result of {key!r}"))
    content, suffixed = key, False
    if place is not None and key.endswith(suffix := f"#{place[0]}:{place[1]}"):
        content, suffixed = key[: -len(suffix)], True  # a place key (`journal.place_key`)
    hashed = _HASHED.fullmatch(content)
    prefix, rest = (hashed.group(1), bytes.fromhex(hashed.group(2))) if hashed else (None, content)
    texts = (
        prefix,
        place[0] if place is not None else None,
        r.name,
        r.status.value,
        r.host,
        r.slot,
        r.backend.value if r.backend is not None else None,
        r.backend_reason,
        r.job,
        r.code,
        r.device or None,  # a CPU slot's "": no string to define
    )
    numbers, definition = strings.ids(texts)
    prefix_id, place_job, name, status, host, slot, backend, reason, job, code, device = numbers
    meta = [
        _RESULT,
        prefix_id,
        rest,
        place_job,
        place[1] if place is not None else None,
        suffixed,
        bytes.fromhex(args) if args is not None and _HEX.fullmatch(args) else args,
        r.task_id,
        name,
        status,
        r.stdout,
        r.stderr,
        r.exit_code,
        r.error,
        r.duration,
        r.queue_wait,
        host,
        slot,
        r.attempts,
        backend,
        reason,
        job,
        code,
        device,
    ]
    head = [definition, definition] if definition is not None else []  # two copies: see the module's docstring
    return [*head, _payload(tree, meta)]


def _meta_of(payload: memoryview | np.ndarray) -> tuple[list[Any], int]:
    """A payload's meta array and the length of its value's part (before the meta)."""
    data = payload if isinstance(payload, memoryview) else payload.data
    size = len(data)
    if size < _U32.size:
        raise ValueError("a record too short for its meta's length")
    (length,) = _U32.unpack_from(data, size - _U32.size)
    tree = size - _U32.size - length
    if tree < 0:
        raise ValueError("a meta longer than its record")
    meta = msgpack.unpackb(data[tree : size - _U32.size])
    if type(meta) is not list or not meta or meta[0] not in (_STRINGS, _RESULT):
        raise ValueError("a record of no known kind")
    if meta[0] == _RESULT and len(meta) not in (_RESULT_FIELDS, _RESULT_FIELDS_BEFORE_DEVICE):
        raise ValueError(f"a result record of {len(meta)} fields, not {_RESULT_FIELDS}")
    return meta, tree


def _index_of(meta: list[Any], strings: Strings) -> tuple[str, Place | None, str | None]:
    """A result record's key, place and arguments' sample; ValueError when it names a string
    no record defines."""
    _kind, prefix_id, rest, place_job, n, suffixed, args = meta[:7]
    prefix = strings.text(prefix_id)
    key = rest if prefix is None else prefix + bytes(rest).hex()
    if type(key) is not str:
        raise ValueError("a key that is no str")
    place = None
    if n is not None:
        place = (str(strings.text(place_job)), int(n))
        if suffixed:
            key = f"{key}#{place[0]}:{place[1]}"
    if isinstance(args, bytes):
        args = args.hex()
    strings.check(_STRING_FIELDS(meta))  # checked now: `_result_of` reads them unchecked
    strings.check(tuple(meta[_RESULT_FIELDS_BEFORE_DEVICE:]))  # the device, where the record has it
    return key, place, args if isinstance(args, str) else None


_STRING_FIELDS = operator.itemgetter(8, 9, 16, 17, 19, 20, 21, 22)  # a result's strings but its key's


def _result_of(meta: list[Any], value: Any, strings: Strings, restored_as: tuple[int, str] | None = None) -> TaskResult:
    """The result of a record `_index_of` read (its strings checked then: a journal's
    strings only grow while it is open); `restored_as` (task id, pool job): made as the result
    of that task, restored (not copied again for it: `runtime/journaling.py`)."""
    texts = strings.texts

    def text(number: int | None) -> str | None:
        return None if number is None else texts[number]

    backend = text(meta[19])
    return TaskResult(
        task_id=int(meta[7]) if restored_as is None else restored_as[0],
        name=str(text(meta[8])),
        status=_STATUS[str(text(meta[9]))],
        value=value,
        stdout=meta[10],
        stderr=meta[11],
        exit_code=meta[12],
        error=meta[13],
        duration=float(meta[14]),
        queue_wait=float(meta[15]),
        host=text(meta[16]),
        slot=text(meta[17]),
        attempts=int(meta[18]),
        backend=_BACKEND[backend] if backend is not None else None,
        backend_reason=str(text(meta[20])),
        job=str(text(meta[21])) if restored_as is None else restored_as[1],
        restored=restored_as is not None,
        code=text(meta[22]) or "",
        device=(text(meta[23]) if len(meta) > _RESULT_FIELDS_BEFORE_DEVICE else None) or "",
    )


def _decode_v1(payload: np.ndarray | memoryview) -> tuple[str, TaskResult, Place | None, str | None]:
    """A version-1 record's key, result, place and arguments' sample (`convert_v1`)."""
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
        self._at: dict[str, tuple[int, int, bool]] = {}  # key -> (offset of its payload, its length, has arrays)
        self._args: dict[str, str] = {}  # Task.key -> the sample of the arguments journaled under it
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC) if path is not None else -1
        self.strings = Strings()  # as the file defines them: a run appending to it goes on from there

    def add(self, key: str, offset: int, length: int, args: str | None = None, arrays: bool = True) -> None:
        self._at[key] = (offset, length, arrays)
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

    def get(self, key: str, restored_as: tuple[int, str] | None = None) -> TaskResult | None:
        """The result journaled under `key`, read now; None when there is none, or when the
        file no longer holds it (replaced meanwhile: the task then runs again, said once).
        `restored_as`: see `_result_of`."""
        where = self._at.get(key)
        if where is None or self._fd < 0:
            return None
        offset, length, arrays = where
        # the restored arrays' own memory: writable, aligned (a value without arrays needs neither)
        data = aligned_empty(length) if arrays else np.empty(length, dtype=np.uint8)
        try:
            if os.preadv(self._fd, [data.data], offset) != length:
                raise ValueError("the file is shorter than when it was opened")
            meta, tree = _meta_of(data)
            value = decode_tree(data[:tree], copy=False)
            return _result_of(meta, value, self.strings, restored_as)
        except (OSError, ValueError, KeyError, TypeError, CheckpointError, msgpack.UnpackException) as exc:
            log.warning("journal: cannot read the result of %s back (%s); it runs again", key, exc)
            del self._at[key]
            return None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _Reader:
    """Reads a file's bytes `_READ` at a time: a record's payload is a view of the last read
    (two small reads per record made opening a journal of 400,000 noop results take 10 s)."""

    def __init__(self, fd: int, size: int) -> None:
        self._fd, self.size = fd, size
        self._start, self._data = 0, b""

    def view(self, offset: int, length: int) -> memoryview:
        end = offset + length
        if not (self._start <= offset and end <= self._start + len(self._data)):
            self._data = b""  # freed before the next read: a record of GBs is in memory once
            self._data = os.pread(self._fd, max(length, _READ), offset)
            self._start = offset
            if len(self._data) < length:
                raise OSError(f"read {len(self._data)} of {length} bytes at {offset}")
        return memoryview(self._data)[offset - self._start : end - self._start]

    def sound(self, offset: int) -> tuple[memoryview, int] | None:
        """The payload of the record at `offset` and where the record ends, if it lies whole
        within the file with a matching CRC; else None."""
        if offset + _RECORD.size > self.size:
            return None
        length, crc = _RECORD.unpack(self.view(offset, _RECORD.size))
        end = offset + _RECORD.size + length
        if end > self.size:
            return None
        payload = self.view(offset + _RECORD.size, length)
        return (payload, end) if zlib.crc32(payload) == crc else None


Scan = tuple[int, int, list[tuple[int, int]]]  # bytes of good records with the magic, file size, skipped


def _scan(
    path: Path, fd: int, magic: bytes, take: Callable[[int, memoryview], None], scanned: list[Scan]
) -> Iterator[None]:
    """Call `take(offset of its payload, payload)` for each sound record of the file after
    `magic`, yielding after each record; then append to `scanned` (the bytes of good records
    with the magic, the file's size, the (start, end) of damaged records skipped in the
    middle). `take` raising (a decoding error) marks its record damaged.

    A damaged record whose length still leads to a sound one is skipped, so damage in the
    middle of a long job's journal costs that one result, not every result after it; one
    that leads nowhere (its length is damaged too, or it is the last: a torn append) ends
    the trusted part."""
    size = os.fstat(fd).st_size
    if os.pread(fd, len(magic), 0) != magic:
        raise JournalError(f"{path} is not a batuta journal (bad magic); pass another --journal folder")
    reader = _Reader(fd, size)
    skipped: list[tuple[int, int]] = []
    offset = len(magic)
    while offset + _RECORD.size <= size:
        length = _RECORD.unpack(reader.view(offset, _RECORD.size))[0]
        end = offset + _RECORD.size + length
        if end > size:
            break
        found = reader.sound(offset)
        taken = False
        if found is not None:
            try:
                take(offset + _RECORD.size, found[0])
                taken = True
            except Exception as exc:  # passes its CRC but not the decoder: skipped or the end, as damage is
                log.warning("journal %s: unreadable record at byte %d (%s)", path, offset, exc)
        found = None  # its payload freed before the next record's is read
        if not taken:
            if reader.sound(end) is None:
                break
            skipped.append((offset, end))
        offset = end
        yield
    scanned.append((offset, size, skipped))


def read_records(path: Path) -> tuple[Records, dict[Place, str], int, int, list[tuple[int, int]]]:
    """The journal's records (by key, read when asked for), the key journaled at each place,
    the bytes of good records (with the magic), the file's size and the (start, end) of
    damaged records skipped in the middle (`_scan`). A version-1 journal is not read here:
    `convert_v1` makes one of this version of it."""
    records = Records(path)
    strings = records.strings
    places: dict[Place, str] = {}

    def take(at: int, payload: memoryview) -> None:
        meta, tree = _meta_of(payload)
        if meta[0] == _STRINGS:
            strings.define(int(meta[1]), meta[2])
            return
        key, place, args = _index_of(meta, strings)
        arrays = tree > 0 and _U32.size + _U32.unpack_from(payload, 0)[0] < tree  # a data region after its header
        records.add(key, at, len(payload), args, arrays)
        if place is not None:
            places[place] = key

    scanned: list[Scan] = []
    try:
        for _ in _scan(path, records._fd, MAGIC, take, scanned):
            pass
    except BaseException:
        records.close()
        raise
    good, size, skipped = scanned[0]
    return records, places, good, size, skipped


def is_v1(path: Path) -> bool:
    """Whether `path` is a journal of version 1 (`convert_v1`)."""
    with open(path, "rb") as f:
        return f.read(len(MAGIC_V1)) == MAGIC_V1


def convert_v1(path: Path, scanned: list[Scan]) -> Iterator[bytes]:
    """A version-1 journal as a journal of this version, from its magic on, made a record at
    a time as it is consumed (a journal may be larger than this machine's memory); then what
    `_scan` said of the old file is in `scanned`. Its torn tail and damaged records are left
    out, as a resume of it left them out."""
    yield MAGIC
    strings = Strings()
    out: list[bytes] = []

    def take(_at: int, payload: memoryview) -> None:
        data = aligned_empty(len(payload))  # its arrays aligned, as version 1 read them
        data[:] = np.frombuffer(payload, dtype=np.uint8)
        key, result, place, args = _decode_v1(data)
        for part in encode_record(key, result, strings, place, args):
            out.extend((record_header(part), part))

    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for _ in _scan(path, fd, MAGIC_V1, take, scanned):
            yield from out
            out.clear()
    finally:
        os.close(fd)
