"""The journal's file format (version 2, `journal_records.py`): strings by number, their
records' copies, and version-1 journals resumed."""

from __future__ import annotations

import logging
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from batuta import Backend, TaskResult, TaskStatus
from batuta.observers import journal_records
from batuta.observers.journal import JOURNAL_FILE, Journal, place_key
from batuta.observers.journal_records import (
    KEEP,
    MAGIC,
    MAGIC_V1,
    Strings,
    encode_record,
    read_journal,
    read_records,
    record_header,
)

V1 = Path(__file__).parent / "snapshots" / "journal_v1.bin"  # written by batuta before version 2 (3 results)
# version 2 as batuta wrote it before the GPU device was journaled: one result of a GPU slot
V2_NO_DEVICE = Path(__file__).parent / "snapshots" / "journal_v2_no_device.bin"
CODE = "ab" * 32


def result(task_id: int, value: object, *, host: str = "node-1", code: str = "", device: str = "") -> TaskResult:
    return TaskResult(
        task_id=task_id,
        name="kmeans_partial",
        status=TaskStatus.SUCCEEDED,
        value=value,
        stdout=b"out",
        exit_code=None,
        duration=0.25,
        queue_wait=0.5,
        host=host,
        slot=f"{host}/cpu:1",
        attempts=2,
        backend=Backend.CPU,
        backend_reason="asked for cpu",
        job="kmeans",
        code=code,
        device=device,
    )


KEY = "job.py/kmeans_partial@abababababababab/0123456789abcdef0123456789abcdef"


async def test_every_field_and_key_form_comes_back_exactly(tmp_path: Path) -> None:
    journal = await Journal.open(tmp_path, job="job.py", resume=False)
    placed = place_key(KEY, ("default", 7))
    keys = {
        placed: ("default", 7),
        KEY: None,  # a derived content key: its hash kept as 16 bytes
        "kept:0123456789abcdef0123456789abcdef": None,
        "mine@abababababababab": None,  # a Task.key with a code digest: kept whole
        "ODD/0123456789ABCDEF0123456789ABCDEF": None,  # upper-case hex is no hash of ours: kept whole
        "own key, own place": ("default", 8),  # a key that is not its place's: kept whole, with the place
    }
    gpu = "NVIDIA H100 80GB HBM3 (132 SMs)"  # a restored result said no device where a fresh one did

    def made(n: int, value: object) -> TaskResult:
        return result(n, value, code=CODE if n % 2 else "", device=gpu if n % 3 else "")

    for n, (key, place) in enumerate(keys.items()):
        journal.record(key, made(n, (np.arange(3.0), n)), place, args="00ff" * 8)
    await journal.close()
    again = await Journal.open(tmp_path, job="job.py", resume=True)
    for n, (key, place) in enumerate(keys.items()):
        got = again.get(key)
        want = made(n, None)
        assert got is not None and got.value[1] == n and got.value[0].tolist() == [0.0, 1.0, 2.0]
        assert replace(got, value=None) == want
        assert again.args_at(key) == "00ff" * 8
        if place is not None:
            assert again.key_at(place) == key
    await again.close()


async def test_a_string_is_kept_once_however_many_results_name_it(tmp_path: Path) -> None:
    journal = await Journal.open(tmp_path, job="job.py", resume=False)
    for n in range(1000):
        journal.record(place_key(KEY, ("default", n)), result(n, n, code=CODE), ("default", n))
    await journal.close()
    data = (tmp_path / JOURNAL_FILE).read_bytes()
    assert data.count(CODE.encode()) == 2 and data.count(b"node-1/cpu:1") == 2  # one strings record, twice
    assert len(data) < 100 * 1000  # version 1: 470 bytes a result


def held(strings: Strings) -> tuple[int, int]:
    """The entries the table's lists and dicts hold, and their bytes with what they hold."""
    entries = size = 0
    for part in vars(strings).values():
        if isinstance(part, dict):
            items = [x for pair in part.items() for x in pair]
        elif isinstance(part, list):
            items = [x for x in part if x is not None]
        else:
            continue
        entries += len(part)
        size += sys.getsizeof(part) + sum(sys.getsizeof(x) for x in items)
    return entries, size


def test_the_writers_strings_stay_bounded_however_many_labels_tasks_have() -> None:
    """A task's own label (`Task.kernel(..., label=f"item-{i}")`) was kept by number for the
    job's whole life, with every other string written: 130 bytes a task, 130 MB a million.
    Now the writer keeps `KEEP` a generation, two at most; a host named by every result stays."""
    strings = Strings()
    records = 5 * KEEP
    for n in range(records):
        parts = encode_record(f"k{n}", replace(result(n, n, host=f"node-{n % 3}"), name=f"item-{n}"), strings)
        assert len(parts) == 3 and f"item-{n}".encode() in parts[0]  # its label, defined with it
        if n >= 3:
            assert b"node-" not in parts[0]  # the hosts and slots are still kept: not defined again
    entries, size = held(strings)
    assert entries <= 2 * KEEP, f"the writer keeps {entries} strings after {records} labelled results"
    assert size <= 2 * KEEP * 200, f"the writer's strings take {size} bytes after {records} labelled results"


async def test_strings_forgotten_and_named_again_resume_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A string the writer no longer keeps is defined again under a new number, never an old
    one: results read back lazily (after every record was scanned) and those a resumed run
    appends (numbered after the file's) come back with the strings they were written with."""
    monkeypatch.setattr(journal_records, "KEEP", 4, raising=False)

    def made(n: int) -> TaskResult:  # labels that recur after they were forgotten, among unique ones
        return replace(result(n, n * 0.5, host=f"node-{n % 3}"), name=f"label-{n % 11}" if n % 2 else f"own-{n}")

    journal = await Journal.open(tmp_path, job="j", resume=False)
    for n in range(200):
        journal.record(f"k{n}", made(n))
    await journal.close()
    assert (tmp_path / JOURNAL_FILE).read_bytes().count(b"label-3") > 2  # defined again: more than two copies
    again = await Journal.open(tmp_path, job="j", resume=True)
    for n in range(200, 300):
        again.record(f"k{n}", made(n))
    assert [n for n in range(200) if again.get(f"k{n}") != made(n)] == []
    await again.close()
    resumed = await Journal.open(tmp_path, job="j", resume=True)
    assert len(resumed) == 300
    assert [n for n in range(300) if resumed.get(f"k{n}") != made(n)] == []
    await resumed.close()


async def test_one_damaged_strings_record_costs_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    journal = await Journal.open(tmp_path, job="j", resume=False)
    for n in range(3):
        journal.record(f"k{n}", result(n, n))
    await journal.close()
    path = tmp_path / JOURNAL_FILE
    data = bytearray(path.read_bytes())
    data[data.index(b"node-1/cpu:1")] ^= 0xFF  # in the first of its two strings records
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="batuta.observers.journal"):
        again = await Journal.open(tmp_path, job="j", resume=True)
    assert [r.slot for n in range(3) if (r := again.get(f"k{n}")) is not None] == ["node-1/cpu:1"] * 3
    assert any("skipped 1 damaged record" in r.getMessage() for r in caplog.records)
    await again.close()


async def test_both_copies_of_a_strings_record_damaged_end_the_trusted_part(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As two adjacent damaged records of version 1 did: the results after them run again."""
    journal = await Journal.open(tmp_path, job="j", resume=False)
    journal.record("a", result(0, 0, host="node-1"))
    journal.record("b", result(1, 1, host="node-2"))  # defines node-2 and its slot: damaged below
    journal.record("c", result(2, 2, host="node-1"))
    await journal.close()
    path = tmp_path / JOURNAL_FILE
    data = bytearray(path.read_bytes())
    first = data.index(b"node-2/cpu:1")
    data[first] ^= 0xFF
    data[data.index(b"node-2/cpu:1", first + 1)] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="batuta.observers.journal"):
        again = await Journal.open(tmp_path, job="j", resume=True)
    assert [key for key in "abc" if again.get(key) is not None] == ["a"]
    assert any("torn or corrupt" in r.getMessage() for r in caplog.records)
    again.record("b", result(1, 1, host="node-2"))
    await again.close()
    entries, good, total = read_journal(path)
    assert {key: r.slot for key, r in entries.items()} == {"a": "node-1/cpu:1", "b": "node-2/cpu:1"}
    assert good == total


async def test_a_result_naming_an_undefined_string_is_skipped_as_damaged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A result whose strings no record defines (a file no batuta wrote whole) is skipped
    as damaged, not read with another result's strings."""
    journal = await Journal.open(tmp_path, job="j", resume=False)
    journal.record("a", result(0, 0))
    await journal.close()
    path = tmp_path / JOURNAL_FILE
    unknown = Strings()
    unknown.define(0, [f"unused {n}" for n in range(50)])
    bad = encode_record("b", result(1, 1, host="node-2"), unknown)[-1]  # its strings records left out
    records = read_records(path)[0]
    known = records.strings  # the file's own, for a sound record after it
    records.close()
    with open(path, "ab") as f:
        for payload in [bad, *encode_record("c", result(2, 2, host="node-3"), known)]:
            f.write(record_header(payload) + payload)
    with caplog.at_level(logging.WARNING, logger="batuta.observers.journal"):
        again = await Journal.open(tmp_path, job="j", resume=True)
    assert any("defined by no record" in r.getMessage() for r in caplog.records)
    assert any("skipped 1 damaged record" in r.getMessage() for r in caplog.records)
    assert again.get("b") is None and again.get("a") is not None and again.get("c") is not None
    again.record("d", result(3, 3, host="node-4"))  # appended after the file rewritten without "b"
    await again.close()
    entries = read_journal(tmp_path / JOURNAL_FILE)[0]
    assert {key: r.host for key, r in entries.items()} == {"a": "node-1", "c": "node-3", "d": "node-4"}
    assert os.path.getsize(tmp_path / JOURNAL_FILE) == read_journal(tmp_path / JOURNAL_FILE)[1]


async def test_a_torn_strings_record_ends_the_journal_there(tmp_path: Path) -> None:
    journal = await Journal.open(tmp_path, job="j", resume=False)
    journal.record("k0", result(0, 0))
    await journal.close()
    path = tmp_path / JOURNAL_FILE
    before = path.stat().st_size
    again = await Journal.open(tmp_path, job="j", resume=True)
    again.record("k1", result(1, 1, host="node-2"))  # two strings records, then its result
    await again.close()
    with open(path, "r+b") as f:  # the crash came while the first strings record was written
        f.truncate(before + 10)
    resumed = await Journal.open(tmp_path, job="j", resume=True)
    assert resumed.get("k1") is None and resumed.get("k0") is not None
    resumed.record("k1", result(1, 1, host="node-2"))
    await resumed.close()
    assert {key: r.host for key, r in read_journal(path)[0].items()} == {"k0": "node-1", "k1": "node-2"}


async def test_a_version_1_journal_is_converted_on_resume(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    shutil.copy(V1, tmp_path / JOURNAL_FILE)
    with caplog.at_level(logging.INFO, logger="batuta.observers.journal"):
        again = await Journal.open(tmp_path, job="old", resume=True)
    assert any("converted from the format of an older batuta" in r.getMessage() for r in caplog.records)
    assert (tmp_path / JOURNAL_FILE).read_bytes()[: len(MAGIC)] == MAGIC
    first = again.get("old/kmeans_partial/0123456789abcdef0123456789abcdef")
    assert first is not None and first.slot == "local/1" and first.backend is Backend.CPU
    sums, counts, inertia = first.value
    assert sums.tolist() == np.arange(12.0).reshape(4, 3).tolist() and counts.dtype == np.int32 and inertia == 0.125
    sums[0, 0] = -1.0  # writable, as version 1 restored it
    placed = place_key("old/spin/fedcba9876543210fedcba9876543210", ("default", 0))
    assert again.key_at(("default", 0)) == placed
    second = again.get(placed)
    assert second is not None and second.stdout == b"out" and second.code == "ab" * 32 and second.value == 0.5
    third = again.get("mine")
    assert (
        third is not None
        and third.value == {"nested": [b"x", None]}
        and again.args_at("mine") == ("00112233445566778899aabbccddeeff")
    )
    again.record("new", result(4, 4))
    await again.close()
    assert sorted(read_journal(tmp_path / JOURNAL_FILE)[0]) == sorted(["new", "mine", placed, first_key()])


async def test_a_version_2_journal_from_before_the_device_was_journaled_resumes(tmp_path: Path) -> None:
    shutil.copy(V2_NO_DEVICE, tmp_path / JOURNAL_FILE)
    again = await Journal.open(tmp_path, job="old", resume=True)
    old = again.get("gpu")
    assert old is not None and old.value == 2.5 and old.slot == "gpu1/gpu:0" and old.device == ""
    again.record("new", result(2, 2, device="NVIDIA H200 (132 SMs)"))  # appended: the new form beside the old
    await again.close()
    entries = read_journal(tmp_path / JOURNAL_FILE)[0]
    assert {key: r.device for key, r in entries.items()} == {"gpu": "", "new": "NVIDIA H200 (132 SMs)"}


def first_key() -> str:
    return "old/kmeans_partial/0123456789abcdef0123456789abcdef"


async def test_a_version_1_journal_with_a_torn_tail_keeps_its_sound_records(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = V1.read_bytes()
    assert data[: len(MAGIC_V1)] == MAGIC_V1
    (tmp_path / JOURNAL_FILE).write_bytes(data[:-20])  # killed while it appended "mine"
    with caplog.at_level(logging.WARNING, logger="batuta.observers.journal"):
        again = await Journal.open(tmp_path, job="old", resume=True)
    assert any("torn" in r.getMessage() for r in caplog.records)
    assert again.get("mine") is None and again.get(first_key()) is not None and len(again) == 2
    await again.close()


async def test_without_resume_a_version_1_journal_starts_over_in_version_2(tmp_path: Path) -> None:
    shutil.copy(V1, tmp_path / JOURNAL_FILE)
    journal = await Journal.open(tmp_path, job="old", resume=False)
    journal.record("k", result(0, 0))
    await journal.close()
    assert (tmp_path / JOURNAL_FILE).read_bytes()[: len(MAGIC)] == MAGIC
    assert list(read_journal(tmp_path / JOURNAL_FILE)[0]) == ["k"]
