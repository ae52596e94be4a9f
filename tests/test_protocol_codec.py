"""The wire codec: round trips, framing over split streams, arrays, and every malformed case.

No sockets: frames are bytes, fed to a FrameDecoder in whatever pieces a test likes.
"""

from __future__ import annotations

import random
import struct
from typing import Any

import msgpack
import numpy as np
import pytest

from batuta.core.objects import ObjectRef
from batuta.core.task import BinaryCall, KernelCall, Outcome
from batuta.protocol import (
    DEFAULT_MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    TAGS,
    Bye,
    Cancel,
    Done,
    Drop,
    Error,
    FrameDecoder,
    GpuInfo,
    GpuSample,
    Heartbeat,
    Hello,
    LocalProtocolError,
    Message,
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
    check_value,
    encode_message,
    encode_messages,
)
from batuta.protocol._values import ALIGN, EXT_ARRAY, EXT_ARRAY_OOB, EXT_SCALAR, EXT_TUPLE
from batuta.protocol.codec import LARGE_FRAME_BYTES

# -- helpers ------------------------------------------------------------------------------------


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
            ),
        ),
        Heartbeat(seq=0, cpu_percent=0.0, memory_used=0, memory_total=0, gpu_status="no NVIDIA driver"),
        Shutdown(reason="coordinator closing"),
        Shutdown(),
        Bye(reason="shutdown requested"),
        Error(message="Run.tasks[0].slot: expected an int >= 0, got int -1"),
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


GOOD_TASK = [1, 0, 1, [0, "noop", [1]], None, "cpu"]


# -- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("msg", sample_messages(), ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg: Message) -> None:
    frame = encode_message(msg)
    assert struct.unpack(">I", frame[:4])[0] == len(frame) - 4
    decoded = one(frame)
    assert_same(decoded, msg)
    if not any(isinstance(v, np.ndarray) for v in _walk(msg)):
        assert decoded == msg  # plain dataclass equality too, where arrays don't prevent it


def _walk(value: Any) -> list[Any]:
    found: list[Any] = [value]
    if hasattr(value, "__dataclass_fields__"):
        for name in value.__dataclass_fields__:
            found += _walk(getattr(value, name))
    elif isinstance(value, (list, tuple)):
        for item in value:
            found += _walk(item)
    elif isinstance(value, dict):
        for item in value.values():
            found += _walk(item)
    return found


def test_tags_cover_every_message_and_are_the_first_element() -> None:
    for msg in sample_messages():
        body = msgpack.unpackb(encode_message(msg)[4:], ext_hook=lambda c, d: None)
        if isinstance(body, int):  # out-of-band payload: 0xce prefix first
            continue
        assert body[0] == TAGS[type(msg)]
    assert sorted(TAGS.values()) == list(range(1, 16))


def test_decoded_collections_have_the_dataclass_types() -> None:
    hello, run = one(encode_message(sample_messages()[0])), one(encode_message(sample_messages()[3]))
    assert isinstance(hello, Hello) and isinstance(run, Run)
    assert type(hello.slots) is tuple and type(hello.slots[1].capabilities) is tuple
    assert type(run.tasks) is tuple
    assert isinstance(run.tasks[0].call, KernelCall) and type(run.tasks[0].call.args) is tuple
    assert isinstance(run.tasks[2].call, BinaryCall) and run.tasks[2].call.args == ("-v", "x y")


def test_lists_and_tuples_keep_their_type_at_every_depth() -> None:
    value: Any = ([1, (2, [3, ()])], [], (), {"a": (1,), "b": [1]}, [[[]]])
    msg = Done(results=(TaskOutcome(task_id=1, slot=0, attempt=1, status=Outcome.OK, value=value),))
    assert_same(one(encode_message(msg)).results[0].value, value)


def test_numbers_at_the_edges() -> None:
    value = [0, -1, 2**63 - 1, -(2**63), 2**64 - 1, 0.0, -0.0, float("inf"), float("nan"), 1e308, True, False]
    msg = Done(results=(TaskOutcome(task_id=1, slot=0, attempt=1, status=Outcome.OK, value=value),))
    assert_same(one(encode_message(msg)).results[0].value, value)


def test_int_fields_from_subclasses_are_normalised() -> None:
    import enum

    class Slot(enum.IntEnum):
        FIRST = 0

    msg = Started(task_ids=(np.int64(3).item(), 4))
    assert one(encode_message(msg)) == Started(task_ids=(3, 4))
    state = one(encode_message(SlotChanged(slot=Slot.FIRST, state="up")))
    assert type(state.slot) is int
    beat = one(encode_message(Heartbeat(seq=1, cpu_percent=np.float64(12.5), memory_used=1, memory_total=2)))
    assert type(beat.cpu_percent) is float
    welcome = one(encode_message(Welcome(protocol=1, heartbeat_interval=2)))
    assert welcome == Welcome(protocol=1, heartbeat_interval=2.0) and type(welcome.heartbeat_interval) is float


# -- framing over a split stream ------------------------------------------------------------------


def test_frames_split_at_every_byte_boundary() -> None:
    messages = sample_messages()
    data = encode_messages(messages)
    for cut in range(1, len(data)):
        decoded = decode_all(data, [cut, len(data) - cut])
        assert len(decoded) == len(messages)
    decoded = decode_all(data, [1] * len(data))  # byte by byte
    for got, want in zip(decoded, messages, strict=True):
        assert_same(got, want)


@pytest.mark.parametrize("seed", range(20))
def test_frames_in_random_chunks(seed: int) -> None:
    rng = random.Random(seed)
    messages = [rng.choice(sample_messages()) for _ in range(30)]
    data = encode_messages(messages)
    chunks = []
    left = len(data)
    while left:
        size = min(left, rng.choice([1, 2, 3, 7, 64, 500, 4096]))
        chunks.append(size)
        left -= size
    for got, want in zip(decode_all(data, chunks), messages, strict=True):
        assert_same(got, want)


def test_many_frames_in_one_chunk() -> None:
    messages = [Started(task_ids=(i,)) for i in range(1000)]
    data = b"".join(encode_message(m) for m in messages)
    assert data == encode_messages(messages)
    assert decode_all(data) == messages


def test_next_message_without_data_needs_more() -> None:
    decoder = FrameDecoder()
    assert decoder.next_message() is None
    frame = encode_message(Bye())
    decoder.feed(frame[:3])
    assert decoder.next_message() is None and decoder.buffered_bytes == 3
    decoder.feed(memoryview(frame)[3:])
    assert decoder.next_message() == Bye()
    assert decoder.next_message() is None and decoder.buffered_bytes == 0


# -- arrays -------------------------------------------------------------------------------------

DTYPES = [
    "|b1",
    "|i1",
    "|u1",
    "<i2",
    ">i2",
    "<i4",
    ">u4",
    "<i8",
    ">i8",
    "<u8",
    "<f2",
    "<f4",
    ">f4",
    "<f8",
    ">f8",
    "<c8",
    ">c16",
]


def some_array(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    raw = np.asarray(np.random.default_rng(seed).integers(0, 100, size=shape))
    kind = np.dtype(dtype).kind
    values = raw + 1j * (raw + 1) if kind == "c" else raw % 2 if kind == "b" else raw
    return np.array(values, dtype=dtype)  # np.array: a 0-d array stays an array


def value_round_trip(value: Any) -> Any:
    msg = Done(results=(TaskOutcome(task_id=1, slot=0, attempt=1, status=Outcome.OK, value=value),))
    decoded = one(encode_message(msg))
    assert isinstance(decoded, Done)
    return decoded.results[0].value


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (7,), (4, 5), (2, 3, 4), (300, 7)])
def test_arrays_round_trip_exactly(dtype: str, shape: tuple[int, ...]) -> None:
    arr = some_array(dtype, shape)
    back = value_round_trip(arr)
    assert type(back) is np.ndarray
    assert back.dtype == arr.dtype and back.dtype.str == dtype  # byte order kept
    assert back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)
    assert back.flags.writeable and back.flags.c_contiguous


def test_fortran_strided_and_subclass_arrays_arrive_c_contiguous() -> None:
    base = np.arange(600, dtype=np.float64).reshape(20, 30)
    cases = [np.asfortranarray(base), base[::2, ::3], base.T, np.asfortranarray(base[:3, :4]), base.view(np.matrix)]
    for arr in cases:
        back = value_round_trip(arr)
        assert type(back) is np.ndarray and back.flags.c_contiguous
        np.testing.assert_array_equal(back, np.asarray(arr))


def test_large_arrays_decode_as_aligned_views_into_the_frame() -> None:
    arrays = (np.arange(50_000, dtype="<f8").reshape(500, 100), np.ones(3000, dtype=">i4"), np.arange(5, dtype=np.int8))
    msg = Run(tasks=(TaskRequest(task_id=1, slot=0, attempt=1, call=KernelCall(name="k", args=arrays)),))
    data = encode_message(msg)
    assert data[4] == 0xCE  # the out-of-band form
    rng = random.Random(1)
    chunks = [rng.randint(1, 70_000) for _ in range(len(data) // 1000)]
    (decoded,) = decode_all(data, chunks)
    assert isinstance(decoded, Run) and isinstance(decoded.tasks[0].call, KernelCall)
    args = decoded.tasks[0].call.args
    for got, want in zip(args, arrays, strict=True):
        assert_same(got, want)
    big, medium, small = args
    for view in (big, medium):
        assert not view.flags.owndata  # a view, not a copy
        assert view.flags.writeable and view.flags.aligned
        assert view.__array_interface__["data"][0] % ALIGN == 0
    assert np.shares_memory(big.base, medium.base) or big.base.base is medium.base.base
    assert not np.shares_memory(big, medium)  # but never each other's bytes
    assert small.flags.owndata  # small arrays travel inside the body, as copies
    big[0, 0] = -1.0  # writable, and writing touches nothing else
    assert medium[0] == 1


def test_large_frame_received_in_pieces_is_decoded_once_complete() -> None:
    arr = np.arange(LARGE_FRAME_BYTES // 4, dtype=np.float64)
    frame = encode_message(Done(results=(TaskOutcome(task_id=1, slot=0, attempt=1, status=Outcome.OK, value=arr),)))
    tail = encode_message(Bye())
    decoder = FrameDecoder()
    step = 100_003
    for pos in range(0, len(frame), step):
        assert decoder.next_message() is None
        decoder.feed(frame[pos : pos + step] + (tail if pos + step >= len(frame) else b""))
    assert decoder.buffered_bytes == len(frame) + len(tail)
    done = decoder.next_message()
    assert isinstance(done, Done) and not done.results[0].value.flags.owndata
    np.testing.assert_array_equal(done.results[0].value, arr)
    assert decoder.next_message() == Bye()
    assert decoder.buffered_bytes == 0


def test_numpy_scalars_round_trip_with_their_dtype() -> None:
    scalars = [
        np.bool_(True),
        np.int8(-3),
        np.uint16(7),
        np.int64(-(2**62)),
        np.float16(1.5),
        np.float32(2.25),
        np.float64(np.pi),
        np.complex64(1 - 2j),
        np.complex128(3 + 4j),
    ]
    back = value_round_trip(scalars)
    for got, want in zip(back, scalars, strict=True):
        assert type(got) is type(want) and got == want


# -- what cannot be sent ------------------------------------------------------------------------


def outcome_with(value: Any) -> Done:
    return Done(
        results=(
            TaskOutcome(task_id=1, slot=0, attempt=1, status=Outcome.OK),
            TaskOutcome(task_id=2, slot=0, attempt=1, status=Outcome.OK, value=value),
        )
    )


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (np.array([object()]), "dtype '|O'"),
        (np.array(["text"]), "dtype '<U4'"),
        (np.array([1], dtype="datetime64[s]"), "datetime"),
        (np.zeros(2, dtype=[("a", "<i4")]), "dtype"),
        (np.ma.masked_array([1, 2], mask=[False, True]), "masked"),
        (object(), "type object"),
        ({1, 2}, "type set"),
        (bytearray(b"x"), "type bytearray"),
        ({1: "a"}, "dict keys must be str"),
        ([1, 2**64], "int 18446744073709551616 does not fit"),
        (lambda: 0, "type function"),
    ],
)
def test_unsendable_values_name_the_type_and_the_field(value: Any, words: str) -> None:
    with pytest.raises(LocalProtocolError) as info:
        encode_message(outcome_with(value))
    text = str(info.value)
    assert text.startswith("Done.results[1].value"), text
    assert words in text, text
    with pytest.raises(LocalProtocolError):
        check_value(value)


def test_unsendable_argument_names_its_index() -> None:
    msg = Run(
        tasks=(
            TaskRequest(task_id=1, slot=0, attempt=1, call=KernelCall(name="k", args=(1,))),
            TaskRequest(task_id=2, slot=0, attempt=1, call=KernelCall(name="k", args=(1, [2, {"x": object()}]))),
        )
    )
    with pytest.raises(
        LocalProtocolError, match=r"^Run\.tasks\[1\]\.call\.args\[1\]\[1\]\['x'\]: cannot send a value of type object"
    ):
        encode_message(msg)


def test_too_deep_and_self_referencing_values_are_refused() -> None:
    deep: Any = 1
    for _ in range(40):
        deep = [deep]
    with pytest.raises(LocalProtocolError, match="nested deeper than 32"):
        encode_message(outcome_with(deep))
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(LocalProtocolError, match="nested deeper"):
        check_value(loop)


@pytest.mark.parametrize(
    ("msg", "words"),
    [
        (TaskOutcome(task_id=1, slot=0, attempt=1, status="weird"), "Done.results[0].status: unknown status 'weird'"),
        (
            TaskOutcome(task_id=1, slot=0, attempt=1, status="ok"),
            "Done.results[0].status: expected an Outcome, got str",
        ),
        (
            TaskOutcome(task_id=-1, slot=0, attempt=1, status=Outcome.OK),
            "Done.results[0].task_id: expected an int >= 0, got int -1",
        ),
        (TaskOutcome(task_id=1, slot=0, attempt=0, status=Outcome.OK), "Done.results[0].attempt: expected an int >= 1"),
        (
            TaskOutcome(task_id=1, slot=0, attempt=1, status=Outcome.OK, run_s=float("nan")),
            "run_s: expected a finite number",
        ),
        (
            TaskOutcome(task_id=1, slot=0, attempt=1, status=Outcome.OK, stdout="text"),
            "stdout: expected bytes, got str",
        ),  # type: ignore[arg-type]
        (
            TaskOutcome(task_id=1, slot=0, attempt=1, status=Outcome.OK, error="\udcff"),
            "Done.results[0].error: str is not valid UTF-8",
        ),
        (
            TaskOutcome(task_id=True, slot=0, attempt=1, status=Outcome.OK),
            "task_id: expected an int >= 0, got bool True",
        ),
    ],
)
def test_bad_fields_are_local_errors_naming_the_field(msg: TaskOutcome, words: str) -> None:
    with pytest.raises(LocalProtocolError) as info:
        encode_message(Done(results=(msg,)))
    assert words in str(info.value)


WRONG: dict[str, Any] = {"str": "k", "env": {"A": 1}, "tasks": [1], "caps": ("cpu", 3)}
"""Values of the wrong type for a field, typed Any so the type checker lets the tests try them."""


def test_bad_message_level_fields_on_send() -> None:
    cases: list[tuple[Any, str]] = [
        (
            Run(tasks=(TaskRequest(task_id=1, slot=0, attempt=1, call=KernelCall(name="k"), backend="auto"),)),
            "backend: unknown backend 'auto'",
        ),
        (
            Run(tasks=(TaskRequest(task_id=1, slot=0, attempt=1, call=KernelCall(name="k"), timeout=0),)),
            "timeout: expected a number > 0",
        ),
        (
            Run(tasks=(TaskRequest(task_id=1, slot=0, attempt=1, call=WRONG["str"]),)),
            "Run.tasks[0].call: expected a KernelCall or BinaryCall",
        ),
        (
            Run(tasks=(TaskRequest(task_id=1, slot=0, attempt=1, call=KernelCall(name="")),)),
            "call.name: expected a non-empty str",
        ),
        (
            Run(tasks=(TaskRequest(task_id=1, slot=0, attempt=1, call=BinaryCall(path="x", env=WRONG["env"])),)),
            "call.env['A']: expected a str",
        ),
        (Run(tasks=WRONG["tasks"]), "Run.tasks[0]: expected a TaskRequest, got int 1"),
        (SlotChanged(slot=0, state="sleeping"), "SlotChanged.state: unknown slot state 'sleeping'"),
        (Welcome(protocol=1, heartbeat_interval=-1), "heartbeat_interval: expected a number > 0"),
        (Started(task_ids=(1, -2)), "Started.task_ids[1]: expected an int >= 0"),
        (
            Hello(
                protocol=1,
                batuta_version="",
                python_version="",
                hostname="",
                pid=1,
                cpu_count=1,
                slots=(SlotInfo(slot=0, capabilities=WRONG["caps"]),),
            ),
            "Hello.slots[0].capabilities[1]: expected a str",
        ),
        (
            Heartbeat(seq=1, cpu_percent=1, memory_used=1, memory_total=1, gpus=(GpuSample(index=0, power=-5.0),)),
            "Heartbeat.gpus[0].power: expected a number >= 0",
        ),
    ]
    for msg, words in cases:
        with pytest.raises(LocalProtocolError) as info:
            encode_message(msg)
        assert words in str(info.value), (str(info.value), words)


def test_non_message_cannot_be_encoded() -> None:
    with pytest.raises(LocalProtocolError, match=r"not a batuta\.protocol message"):
        encode_message(TaskOutcome(task_id=1, slot=0, attempt=1, status=Outcome.OK))  # type: ignore[arg-type]


def test_frame_over_the_limit_is_refused_on_send() -> None:
    msg = Started(task_ids=tuple(range(1000)))
    with pytest.raises(LocalProtocolError, match=r"Started frame of \d+ bytes exceeds the 100-byte limit"):
        encode_message(msg, max_frame_bytes=100)
    big = outcome_with(np.zeros(1000))
    with pytest.raises(LocalProtocolError, match="exceeds the 4096-byte limit"):
        encode_message(big, max_frame_bytes=4096)


# -- malformed input: every case is a RemoteProtocolError naming what was wrong -------------------


def test_oversized_frame_is_refused_from_its_header_alone() -> None:
    decoder = FrameDecoder()
    decoder.feed(struct.pack(">I", 300_000_000))  # nothing else sent yet
    with pytest.raises(RemoteProtocolError, match="frame of 300000000 bytes exceeds the 268435456-byte limit"):
        decoder.next_message()
    assert DEFAULT_MAX_FRAME_BYTES == 268435456
    assert "exceeds the 10-byte limit" in remote_error(encode_message(Bye(reason="long enough")), max_frame_bytes=10)


def _nest(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


MALFORMED: list[tuple[str, bytes, str]] = [
    ("empty frame", struct.pack(">I", 0), "empty frame"),
    ("garbage", raw_frame(None, packed=b"\xc1\xc1\xc1"), "not msgpack"),
    (
        "truncated body",
        raw_frame(None, packed=msgpack.packb([TAGS[Bye], "abcdef"])[:-2]),
        "ends inside a msgpack object",
    ),
    (
        "trailing bytes",
        raw_frame(None, packed=msgpack.packb([TAGS[Bye], ""]) + b"\x00\x00"),
        "2 bytes after its message",
    ),
    ("not an array", raw_frame({"tag": 1}), "must be a message array"),
    ("empty array", raw_frame([]), "must be a message array"),
    ("unknown tag", raw_frame([99, "x"]), "unknown message tag 99"),
    ("bool tag", raw_frame([True, "x"]), "message tag must be an int, got bool True"),
    ("str tag", raw_frame(["Bye", "x"]), "message tag must be an int"),
    ("too few fields", raw_frame([TAGS[Hello], 1, "v"]), "Hello needs 9 fields, got 2"),
    ("too many fields", raw_frame([TAGS[Bye], "", ""]), "Bye needs 1 fields, got 2"),
    ("bad utf-8", raw_frame(None, packed=b"\x92\x0c\xa2\xff\xfe"), "not UTF-8"),
    (
        "bad status",
        raw_frame(
            [
                TAGS[Done],
                [[1, 0, 1, "ok", None, b"", b"", None, None, 0.0]] * 3
                + [[1, 0, 1, "weird", None, b"", b"", None, None, 0.0]],
            ]
        ),
        "Done.results[3].status: unknown status 'weird'",
    ),
    (
        "status not str",
        raw_frame([TAGS[Done], [[1, 0, 1, 5, None, b"", b"", None, None, 0.0]]]),
        "Done.results[0].status: expected a status str, got int 5",
    ),
    (
        "short outcome",
        raw_frame([TAGS[Done], [[1, 0, 1, "ok"]]]),
        "Done.results[0]: TaskOutcome needs 10 fields, got 4",
    ),
    ("outcome not array", raw_frame([TAGS[Done], ["x"]]), "Done.results[0]: expected a TaskOutcome array, got str 'x'"),
    ("results not array", raw_frame([TAGS[Done], 5]), "Done.results: expected an array, got int 5"),
    (
        "negative id",
        raw_frame(run_wire([-1, 0, 1, [0, "k", []], None, "cpu"])),
        "Run.tasks[0].task_id: expected an int >= 0, got int -1",
    ),
    (
        "bool id",
        raw_frame(run_wire([True, 0, 1, [0, "k", []], None, "cpu"])),
        "Run.tasks[0].task_id: expected an int >= 0, got bool True",
    ),
    (
        "attempt 0",
        raw_frame(run_wire([1, 0, 0, [0, "k", []], None, "cpu"])),
        "Run.tasks[0].attempt: expected an int >= 1",
    ),
    (
        "unknown backend",
        raw_frame(run_wire([1, 0, 1, [0, "k", []], None, "tpu"])),
        "Run.tasks[0].backend: unknown backend 'tpu'",
    ),
    (
        "negative timeout",
        raw_frame(run_wire([1, 0, 1, [0, "k", []], -1.0, "cpu"])),
        "Run.tasks[0].timeout: expected a number > 0",
    ),
    (
        "nan timeout",
        raw_frame(run_wire([1, 0, 1, [0, "k", []], float("nan"), "cpu"])),
        "timeout: expected a finite number",
    ),
    (
        "unknown call kind",
        raw_frame(run_wire([1, 0, 1, [7, "k", []], None, "cpu"])),
        "Run.tasks[0].call: unknown call kind 7",
    ),
    (
        "short kernel call",
        raw_frame(run_wire([1, 0, 1, [0, "k"], None, "cpu"])),
        "Run.tasks[0].call: KernelCall needs 2 fields, got 1",
    ),
    (
        "empty kernel name",
        raw_frame(run_wire([1, 0, 1, [0, "", []], None, "cpu"])),
        "Run.tasks[0].call.name: expected a non-empty str",
    ),
    (
        "args not array",
        raw_frame(run_wire([1, 0, 1, [0, "k", 5], None, "cpu"])),
        "Run.tasks[0].call.args: expected an array",
    ),
    (
        "binary arg not str",
        raw_frame(run_wire([1, 0, 1, [1, "/bin/x", ["a", 2], {}, None], None, "cpu"])),
        "Run.tasks[0].call.args[1]: expected a str, got int 2",
    ),
    (
        "binary env not str",
        raw_frame(run_wire([1, 0, 1, [1, "/bin/x", [], {"A": 1}, None], None, "cpu"])),
        "call.env['A']: expected a str",
    ),
    (
        "bytes map key",
        raw_frame(run_wire([1, 0, 1, [0, "k", [{b"k": 1}]], None, "cpu"])),
        "Run.tasks[0].call.args[0]: map keys must be str",
    ),
    (
        "value of unknown ext",
        raw_frame(
            None, packed=msgpack.packb(run_wire([1, 0, 1, [0, "k", [1, msgpack.ExtType(42, b"zz")]], None, "cpu"]))
        ),
        "Run.tasks[0].call.args[1]: unknown ext type 42",
    ),
    (
        "timestamp ext",
        raw_frame(None, packed=msgpack.packb(run_wire([1, 0, 1, [0, "k", [msgpack.Timestamp(1, 0)]], None, "cpu"]))),
        "call.args[0]: unexpected msgpack.ext.Timestamp",
    ),
    (
        "tuple mark alone",
        raw_frame(
            None,
            packed=msgpack.packb(run_wire([1, 0, 1, [0, "k", [[1, msgpack.ExtType(EXT_TUPLE, b"")]]], None, "cpu"])),
        ),
        "call.args[0][1]: tuple marker outside the first slot",
    ),
    (
        "tuple mark with payload",
        raw_frame(
            None, packed=msgpack.packb(run_wire([1, 0, 1, [0, "k", [[msgpack.ExtType(EXT_TUPLE, b"x")]]], None, "cpu"]))
        ),
        "tuple marker with a payload",
    ),
    (
        "ext in an int field",
        raw_frame(
            None, packed=msgpack.packb(run_wire([msgpack.ExtType(EXT_TUPLE, b""), 0, 1, [0, "k", []], None, "cpu"]))
        ),
        "Run.tasks[0].task_id: expected an int >= 0, got a tuple marker",
    ),
    (
        "bad slot state",
        raw_frame([TAGS[SlotChanged], 0, "zombie", ""]),
        "SlotChanged.state: unknown slot state 'zombie'",
    ),
    (
        "bad gpu sample",
        raw_frame([TAGS[Heartbeat], 1, 1.0, 1, 1, [[0, "hot", None, None, None, None]], ""]),
        "Heartbeat.gpus[0].utilization: expected a number",
    ),
    (
        "bad packages",
        raw_frame([TAGS[Hello], 1, "v", "p", "h", 1, 1, [], [], {"numpy": 2}]),
        "Hello.packages['numpy']: expected a str",
    ),
    ("bad id list", raw_frame([TAGS[Cancel], [1, "2"]]), "Cancel.task_ids[1]: expected an int >= 0, got str '2'"),
    (
        "deep value",
        raw_frame(run_wire([1, 0, 1, [0, "k", [_nest(40)]], None, "cpu"])),
        "Run.tasks[0].call.args[0]" + "[0]" * 31 + ": nested deeper than 32 levels",
    ),
    ("very deep msgpack", raw_frame(None, packed=b"\x91" * 5000 + b"\x00"), "nests too deeply"),
]


def _array_ext(dtype: bytes, shape: tuple[int, ...], data: bytes, code: int = EXT_ARRAY) -> msgpack.ExtType:
    header = bytes([len(dtype)]) + dtype + bytes([len(shape)]) + struct.pack(f">{len(shape)}Q", *shape)
    return msgpack.ExtType(code, header + data)


def _value_frame(value: Any) -> bytes:
    return raw_frame(None, packed=msgpack.packb([TAGS[Done], [[1, 0, 1, "ok", value, b"", b"", None, None, 0.0]]]))


MALFORMED += [
    (
        "object dtype",
        _value_frame(_array_ext(b"|O", (1,), b"\x00" * 8)),
        "Done.results[0].value: bad ext 1 payload: dtype b'|O' is not allowed",
    ),
    ("unknown dtype", _value_frame(_array_ext(b"<f16", (1,), b"\x00" * 16)), "dtype b'<f16' is not allowed"),
    ("dtype too long", _value_frame(msgpack.ExtType(EXT_ARRAY, b"\xff<f8")), "payload ends inside the dtype"),
    (
        "array too short",
        _value_frame(_array_ext(b"<f8", (3,), b"\x00" * 16)),
        "shape (3,) of <f8 needs 24 bytes, got 16",
    ),
    ("array too long", _value_frame(_array_ext(b"<f8", (1,), b"\x00" * 9)), "needs 8 bytes, got 9"),
    ("shape overflow", _value_frame(_array_ext(b"<f8", (2**63, 2**63), b"")), "bad ext 1 payload"),
    ("zero-size huge shape", _value_frame(_array_ext(b"<f8", (0, 2**64 - 1), b"")), "bad ext 1 payload"),
    ("too many dims", _value_frame(msgpack.ExtType(EXT_ARRAY, b"\x03<f8\x21" + b"\x00" * 8 * 33)), "33 dimensions"),
    (
        "shape cut short",
        _value_frame(msgpack.ExtType(EXT_ARRAY, b"\x03<f8\x02" + b"\x00" * 8)),
        "ends inside the shape",
    ),
    ("no shape", _value_frame(msgpack.ExtType(EXT_ARRAY, b"\x03<f8")), "ends before the shape"),
    ("empty ext", _value_frame(msgpack.ExtType(EXT_ARRAY, b"")), "too short"),
    ("bad bools", _value_frame(_array_ext(b"|b1", (2,), b"\x01\x02")), "bool data holds bytes other than 0 and 1"),
    (
        "bad scalar size",
        _value_frame(msgpack.ExtType(EXT_SCALAR, b"\x03<f8" + b"\x00" * 4)),
        "a <f8 scalar needs 8 bytes",
    ),
    ("bad bool scalar", _value_frame(msgpack.ExtType(EXT_SCALAR, b"\x03|b1\x07")), "bool data"),
    (
        "oob ext in-band",
        _value_frame(_array_ext(b"<f8", (1,), struct.pack(">Q", 0), EXT_ARRAY_OOB)),
        "out-of-band array in a frame without out-of-band buffers",
    ),
]


def _oob_frame(exts: list[msgpack.ExtType], region: bytes, *, body_len_delta: int = 0) -> bytes:
    body = msgpack.packb([TAGS[Done], [[1, 0, 1, "ok", exts, b"", b"", None, None, 0.0]]])
    body_end = 9 + len(body)
    pad = -body_end % ALIGN
    payload = b"\xce" + struct.pack(">I", len(body) + body_len_delta) + body + b"\x00" * pad + region
    return struct.pack(">I", len(payload)) + payload


def _oob(shape: tuple[int, ...], offset: int, dtype: bytes = b"<f8") -> msgpack.ExtType:
    return _array_ext(dtype, shape, struct.pack(">Q", offset), EXT_ARRAY_OOB)


MALFORMED += [
    (
        "oob past the end",
        _oob_frame([_oob((16,), 0)], b"\x00" * 64),
        "buffer of 128 bytes at offset 0 runs past the frame",
    ),
    ("oob misaligned", _oob_frame([_oob((1,), 8)], b"\x00" * 64), "offset 8 is not a multiple of 64"),
    ("oob overlap", _oob_frame([_oob((8,), 0), _oob((8,), 0)], b"\x00" * 64), "overlaps the one before"),
    ("oob backwards", _oob_frame([_oob((8,), 64), _oob((8,), 0)], b"\x00" * 128), "overlaps the one before"),
    ("oob stray bytes", _oob_frame([_oob((8,), 0)], b"\x00" * 100), "36 stray bytes after its last buffer"),
    (
        "oob no offset",
        _oob_frame([_array_ext(b"<f8", (8,), b"", EXT_ARRAY_OOB)], b"\x00" * 64),
        "expected an 8-byte offset",
    ),
    ("oob body too long", _oob_frame([_oob((8,), 0)], b"\x00" * 64, body_len_delta=10_000), "announces a"),
    (
        "oob body too short",
        _oob_frame([_oob((8,), 0)], b"\x00" * 64, body_len_delta=-3),
        "ends inside a msgpack object",
    ),
    ("oob frame too short", struct.pack(">I", 3) + b"\xce\x00\x00", "too short"),
    ("oob bad bools", _oob_frame([_oob((64,), 0, b"|b1")], b"\x05" * 64), "bool data"),
]


@pytest.mark.parametrize(("data", "words"), [(d, w) for _, d, w in MALFORMED], ids=[n for n, _, _ in MALFORMED])
def test_malformed_frames_are_remote_errors_that_say_what_was_wrong(data: bytes, words: str) -> None:
    text = remote_error(data)
    assert words in text, text


def test_malformed_frames_are_refused_however_they_are_split() -> None:
    for _, data, _ in MALFORMED[::3]:
        decoder = FrameDecoder()
        with pytest.raises(RemoteProtocolError):
            for i in range(len(data)):
                decoder.feed(data[i : i + 1])
                decoder.next_message()
            pytest.fail("no error")


def test_good_oob_frame_built_by_hand_decodes() -> None:
    data = np.arange(8, dtype="<f8").tobytes()
    (done,) = decode_all(_oob_frame([_oob((8,), 0), _oob((2, 0), 64)], data))
    assert isinstance(done, Done)
    first, empty = done.results[0].value
    np.testing.assert_array_equal(first, np.arange(8.0))
    assert empty.shape == (2, 0)


def test_decoder_refuses_further_use_after_an_error() -> None:
    decoder = FrameDecoder()
    decoder.feed(raw_frame([99]) + encode_message(Bye()))
    with pytest.raises(RemoteProtocolError, match="unknown message tag 99"):
        decoder.next_message()
    with pytest.raises(RemoteProtocolError, match="unusable after an earlier error: unknown message tag 99"):
        decoder.next_message()


def test_decoder_argument_checked() -> None:
    with pytest.raises(ValueError):
        FrameDecoder(max_frame_bytes=0)


def test_a_large_put_travels_out_of_band_and_refs_decode_as_refs() -> None:
    value = np.arange(100_000, dtype=np.float32)
    [put] = decode_all(encode_message(Put(object_id=7, value=value)))
    assert isinstance(put, Put) and put.object_id == 7 and np.array_equal(put.value, value)
    call = KernelCall(name="sum", args=(ObjectRef(7, digest="ab", nbytes=400_000), {"w": ObjectRef(8)}))
    [run] = decode_all(encode_message(Run(tasks=(TaskRequest(task_id=1, slot=0, attempt=1, call=call),))))
    assert run.tasks[0].call.args == (ObjectRef(7), {"w": ObjectRef(8)})  # ids travel; digests stay home


def test_a_malformed_object_reference_is_a_protocol_error() -> None:
    body = msgpack.packb([TAGS[Put], 1, msgpack.ExtType(5, b"\x00\x01")])
    with pytest.raises(RemoteProtocolError, match="object reference of 2 bytes"):
        decode_all(struct.pack(">I", len(body)) + body)
