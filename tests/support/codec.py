"""Shared helpers of the wire-codec tests: sample messages, deep comparison, and framing by hand.

`sample_messages` (one or more of every message type, every field away from its default) and
`assert_same` are used by tests/test_protocol_codec*.py and tests/test_protocol_fuzz.py; the
rest decode frames in chosen pieces or build frames around hand-made msgpack bodies. They
live here, apart from the tests, so that each codec test file can import them.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import numpy as np
import pytest

from batuta.core.objects import ObjectRef
from batuta.core.task import BinaryCall, KernelCall, Outcome
from batuta.protocol import (
    PROTOCOL_VERSION,
    TAGS,
    Bye,
    Cancel,
    Code,
    CodeFile,
    CodeLoaded,
    CodeStored,
    DataLink,
    Done,
    Drop,
    Error,
    Fetch,
    FrameDecoder,
    GpuCache,
    GpuInfo,
    GpuSample,
    Heartbeat,
    Hello,
    Keepalive,
    Message,
    ObjectsLost,
    Put,
    RemoteProtocolError,
    Run,
    Shutdown,
    SlotChanged,
    SlotInfo,
    Started,
    StealBack,
    StealBackReply,
    TaskOutcome,
    TaskRequest,
    Welcome,
    code_digest,
)

__all__ = [
    "DIGEST",
    "GOOD_TASK",
    "assert_same",
    "decode_all",
    "one",
    "raw_frame",
    "remote_error",
    "run_wire",
    "sample_messages",
]


SAMPLE_FILES = (
    CodeFile(path="mykernels.py", data=b"from batuta import kernel\n"),
    CodeFile(path="mypkg/__init__.py", data=b""),
    CodeFile(path="mypkg/data/table.bin", data=bytes(range(256))),
)
SAMPLE_MODULES = ("mykernels", "mypkg.sub")
DIGEST = code_digest(SAMPLE_FILES, SAMPLE_MODULES)


def sample_messages() -> list[Message]:
    """One or more of every message type, with every field away from its default."""
    return [
        Hello(
            protocol=PROTOCOL_VERSION,
            batuta_version="0.1.0",
            python_version="3.11.7",
            hostname="gpu-node-1",
            pid=4242,
            cpu_count=64,
            slots=(
                SlotInfo(slot=0, capabilities=("cpu",)),
                SlotInfo(slot=1, capabilities=("gpu", "h100"), gpu_index=0),
            ),
            gpus=(GpuInfo(index=0, name="NVIDIA H100", uuid="GPU-1234", memory_total=80 << 30, compute_units=132),),
            packages={"numpy": "2.4.6", "numba": "0.61.0"},
            modules={"hostkernels": "ab" * 32, "site_pkg.sub": ""},
        ),
        Hello(
            protocol=PROTOCOL_VERSION,
            batuta_version="",
            python_version="",
            hostname="",
            pid=0,
            cpu_count=1,
            slots=(),
        ),
        Welcome(protocol=PROTOCOL_VERSION, heartbeat_interval=0.5),
        Run(
            tasks=(
                TaskRequest(task_id=0, slot=0, attempt=1, call=KernelCall(name="noop", args=(1,))),
                TaskRequest(
                    task_id=2**64 - 1,
                    slot=3,
                    attempt=2,
                    call=KernelCall(
                        name="kernels.vector:vadd",
                        args=(
                            np.arange(5.0),
                            np.float32(2.5),
                            None,
                            True,
                            -(2**63),
                            "s",
                            b"b",
                            [1, (2, 3)],
                            {"k": [4.5]},
                        ),
                    ),
                    timeout=12.5,
                    backend="gpu",
                    code=DIGEST,
                ),
                TaskRequest(
                    task_id=7,
                    slot=1,
                    attempt=1,
                    call=BinaryCall(path="./process", args=("-v", "x y"), env={"A": "1"}, cwd="/tmp"),
                    backend="scalar",
                ),
                TaskRequest(task_id=8, slot=1, attempt=1, call=BinaryCall(path="/bin/true")),
                TaskRequest(
                    task_id=9,
                    slot=0,
                    attempt=1,
                    call=KernelCall(name="sum", args=(ObjectRef(3), [ObjectRef(2**64 - 1)])),
                ),
                TaskRequest(task_id=10, slot=0, attempt=2, call=KernelCall(name="noop", args=()), keep=17),
                TaskRequest(task_id=11, slot=1, attempt=1, call=KernelCall(name="noop", args=()), tail=True),
            )
        ),
        Run(tasks=()),
        Started(task_ids=(1, 2, 3)),
        Done(
            results=(
                TaskOutcome(task_id=1, slot=0, attempt=1, status=Outcome.OK, value=(np.ones((2, 3)), 7), run_s=0.25),
                TaskOutcome(
                    task_id=2,
                    slot=1,
                    attempt=3,
                    status=Outcome.ERROR,
                    stdout=b"out\x00",
                    stderr=b"err",
                    exit_code=-9,
                    error="ZeroDivisionError: division by zero",
                ),
                TaskOutcome(task_id=3, slot=0, attempt=1, status=Outcome.TIMEOUT),
                TaskOutcome(task_id=4, slot=0, attempt=1, status=Outcome.CANCELLED),
                TaskOutcome(task_id=5, slot=0, attempt=1, status=Outcome.CRASHED, exit_code=139),
            )
        ),
        StealBack(slot=2, task_ids=(10, 11)),
        StealBackReply(slot=2, returned=(10,), refused=(11,)),
        Cancel(task_ids=(5,)),
        Put(object_id=3, value=np.arange(10.0)),
        Put(object_id=4, value={"k": (1, "two", [np.float32(3)])}),
        Drop(object_ids=(3, 4)),
        Fetch(object_id=17, request_id=2**40),
        Fetch(object_id=17, request_id=0, lend=True),
        SlotChanged(slot=1, state="restarting", reason="worker died (SIGSEGV)"),
        SlotChanged(slot=1, state="up"),
        SlotChanged(slot=1, state="down", reason="gave up after 5 restarts"),
        Heartbeat(
            seq=99,
            cpu_percent=37.5,
            memory_used=1 << 33,
            memory_total=1 << 36,
            gpus=(
                GpuSample(
                    index=0, utilization=98.0, memory_used=1 << 30, memory_total=80 << 30, temperature=61.0, power=412.5
                ),
                GpuSample(index=1),
                GpuSample(index=2, memory_used=5 << 30, cached_values=3, cached_bytes=3 << 30, cache_cap=40 << 30),
            ),
        ),
        Heartbeat(seq=0, cpu_percent=0.0, memory_used=0, memory_total=0, gpu_status="no NVIDIA driver"),
        Heartbeat(
            seq=1, cpu_percent=1.0, memory_used=1, memory_total=2, objects=3, object_bytes=1 << 34, spilled_bytes=5
        ),
        Heartbeat(seq=2, cpu_percent=1.0, memory_used=1, memory_total=2, objects=1, slot_object_bytes=1 << 33),
        GpuCache(slot=1, values=12, nbytes=(3 << 30) + 17, cap=40 << 30),
        GpuCache(slot=0, values=0, nbytes=0, cap=0),
        ObjectsLost(object_ids=(7, 9), reason="slot 0 worker process (pid 12) killed by signal 9 (SIGKILL)"),
        DataLink(host="10.0.0.1", port=40001, token=bytes(range(32)), fingerprint=bytes(range(32, 64))),
        DataLink(host="10.0.0.2", port=7000, token=bytes(range(32)), fingerprint=bytes(32), encryption="none"),
        Keepalive(),
        Welcome(protocol=PROTOCOL_VERSION, heartbeat_interval=1.0, silence_limit=32.0),
        Shutdown(reason="coordinator closing"),
        Shutdown(),
        Bye(reason="shutdown requested"),
        Error(message="Run.tasks[0].slot: expected an int >= 0, got int -1"),
        Code(digest=DIGEST, modules=SAMPLE_MODULES, files=SAMPLE_FILES),
        Code(digest=code_digest((), ()), modules=(), files=()),
        CodeLoaded(digest=DIGEST, errors={"mykernels": "SyntaxError: invalid syntax (at mykernels.py line 3)"}),
        CodeLoaded(digest=DIGEST),
        CodeStored(digest=DIGEST),
    ]


def assert_same(a: Any, b: Any) -> None:
    """Deep equality that also compares arrays (dtype, shape, values) and exact types."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and (a == b or (a != a and b != b))
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
    elif hasattr(a, "__dataclass_fields__"):
        for name in a.__dataclass_fields__:
            assert_same(getattr(a, name), getattr(b, name))
    else:
        assert a == b or (a != a and b != b), (a, b)


def decode_all(data: bytes, chunks: list[int] | None = None, **kwargs: Any) -> list[Message]:
    """Feed `data` in pieces of the given sizes (default: all at once); collect messages."""
    decoder = FrameDecoder(**kwargs)
    out: list[Message] = []
    pos = 0
    for size in chunks or [len(data)]:
        decoder.feed(data[pos : pos + size])
        pos += size
        while (msg := decoder.next_message()) is not None:
            out.append(msg)
    assert pos >= len(data)
    assert decoder.buffered_bytes == 0
    return out


def one(data: bytes) -> Any:
    (msg,) = decode_all(data)
    return msg


def raw_frame(body: Any, *, packed: bytes | None = None) -> bytes:
    """A frame around a hand-made msgpack body (for malformed input)."""
    payload = msgpack.packb(body) if packed is None else packed
    return struct.pack(">I", len(payload)) + payload


def remote_error(data: bytes, **kwargs: Any) -> str:
    """Decode `data`, expecting RemoteProtocolError; returns its message."""
    decoder = FrameDecoder(**kwargs)
    decoder.feed(data)
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_message()
    return str(info.value)


def run_wire(task: list[Any]) -> list[Any]:
    return [TAGS[Run], [task]]


GOOD_TASK = [1, 0, 1, [0, "noop", [1]], None, "cpu", ""]
