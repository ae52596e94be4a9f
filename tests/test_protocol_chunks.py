"""Streamed arrays (protocol/chunks.py) over a fake link: no sockets, no event loop.

Values travel as a frame followed by chunk frames; these tests split the bytes at every
position and at every chunk boundary, check which messages may overtake a transfer and which
must wait for it, that the sender's chunks are views of its own arrays, that a receiver
frees what a lost link leaves half-received, and that every malformed chunk or streamed
ext is a RemoteProtocolError naming what was wrong.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import numpy as np
import pytest

from batuta.core.objects import ObjectRef
from batuta.core.task import KernelCall, Outcome
from batuta.protocol import (
    CLOSED,
    NEED_DATA,
    PROTOCOL_VERSION,
    TAGS,
    Cancel,
    Connection,
    Done,
    Drop,
    FrameDecoder,
    Heartbeat,
    Hello,
    LocalProtocolError,
    Message,
    Put,
    RemoteProtocolError,
    Role,
    Run,
    SlotChanged,
    SlotInfo,
    Started,
    TaskOutcome,
    TaskRequest,
    Welcome,
)
from batuta.protocol._values import EXT_ARRAY_STREAM
from batuta.protocol.chunks import CHUNK_MARK, OutgoingStreams, chunk_frame
from batuta.protocol.codec import encode_messages_parts, encode_streamed_parts
from tests.support.codec import assert_same

MIN = 256  # stream arrays of this many bytes or more
CHUNK = 100  # bytes of data per chunk


def _join(parts: list[Any]) -> bytes:
    return b"".join(bytes(memoryview(part).cast("B")) for part in parts)


def _streams() -> OutgoingStreams:
    return OutgoingStreams(stream_min_bytes=MIN, chunk_bytes=CHUNK)


def _wire(*messages: Message) -> tuple[bytes, list[int]]:
    """The bytes of `messages`, each streamed inline, and the offsets where frames start."""
    streams = _streams()
    data = b""
    boundaries = []
    for message in messages:
        boundaries.append(len(data))
        data += _join(encode_messages_parts((message,), streams=streams))
        while streams.active:  # one chunk at a time, to know where each starts
            boundaries.append(len(data))
            data += _join(streams.next_chunk_parts(1))
    return data, boundaries


def _decode(data: bytes, cuts: list[int], **kwargs: Any) -> list[Message]:
    decoder = FrameDecoder(**kwargs)
    out: list[Message] = []
    pos = 0
    for cut in [*cuts, len(data)]:
        decoder.feed(data[pos:cut])
        pos = cut
        while (msg := decoder.next_message()) is not None:
            out.append(msg)
    assert decoder.buffered_bytes == 0 and decoder.streams.open_streams == 0 and decoder.streams.held == 0
    return out


def _put() -> Put:
    rng = np.random.default_rng(0)
    value = (rng.standard_normal(50), rng.integers(0, 9, size=(7, 11)).astype(">i4"), np.arange(3.0), "label")
    return Put(object_id=4, value=value)


def _done(slot: int = 0) -> Done:
    result = np.arange(40, dtype=np.float32).reshape(4, 10)
    mask = np.arange(300) % 3 == 0
    return Done(
        results=(
            TaskOutcome(task_id=9, slot=slot, attempt=1, status=Outcome.OK, value={"x": result, "m": mask}),
            TaskOutcome(task_id=10, slot=slot, attempt=2, status=Outcome.ERROR, error="no"),
        )
    )


def _run(*args: Any, task_id: int = 1) -> Run:
    return Run(tasks=(TaskRequest(task_id=task_id, slot=0, attempt=1, call=KernelCall(name="k", args=args)),))


# -- round trips, split everywhere ---------------------------------------------------------------


def test_a_streamed_value_decodes_the_same_split_at_every_byte() -> None:
    messages: list[Message] = [_put(), _done(), Heartbeat(seq=1, cpu_percent=1.0, memory_used=1, memory_total=2)]
    data, boundaries = _wire(*messages)
    assert len(boundaries) > 10  # the arrays did go as chunks
    whole = _decode(data, [])
    assert_same(whole, messages)
    for cut in range(1, len(data)):
        assert_same(_decode(data, [cut]), messages)


def test_a_streamed_value_decodes_the_same_fed_byte_by_byte_and_at_each_chunk_boundary() -> None:
    messages: list[Message] = [_put(), _done()]
    data, boundaries = _wire(*messages)
    assert_same(_decode(data, list(range(1, len(data)))), messages)
    assert_same(_decode(data, boundaries[1:]), messages)
    assert_same(_decode(data, [b + 1 for b in boundaries]), messages)  # one byte into every frame


def test_streamed_arrays_arrive_as_writable_arrays_of_their_own_dtype_and_shape() -> None:
    (put,) = _decode(_wire(_put())[0], [])
    assert isinstance(put, Put)
    first, second, small, _ = put.value
    assert second.dtype == np.dtype(">i4") and second.shape == (7, 11)
    assert first.flags.writeable and first.flags.c_contiguous
    assert not np.shares_memory(first, second)
    assert small.nbytes < MIN  # went in the frame, not streamed


def test_the_sender_sends_views_of_its_own_array_never_a_copy() -> None:
    source = np.arange(1000, dtype=np.float64)
    streams = _streams()
    encode_messages_parts((Put(object_id=1, value=source),), streams=streams)
    parts = streams.all_chunk_parts()
    data_parts = parts[1::2]
    assert sum(len(p) for p in data_parts) == source.nbytes
    assert all(np.shares_memory(np.frombuffer(p, dtype=np.uint8), source) for p in data_parts)


def test_a_memory_mapped_array_streams_without_being_read_whole(tmp_path: Any) -> None:
    path = tmp_path / "big.npy"
    np.save(path, np.arange(10_000, dtype=np.float64))
    mapped = np.load(path, mmap_mode="r")
    streams = _streams()
    header = encode_messages_parts((Put(object_id=1, value=mapped),), streams=streams)
    assert sum(len(memoryview(p).cast("B")) for p in header) < 200  # the frame does not hold the data
    parts = streams.all_chunk_parts()
    assert all(np.shares_memory(np.frombuffer(p, dtype=np.uint8), mapped) for p in parts[1::2])
    (put,) = _decode(_join(header + parts), [])
    assert isinstance(put, Put)
    assert np.array_equal(put.value, np.arange(10_000, dtype=np.float64))


def test_streams_take_turns_so_a_small_value_does_not_wait_for_a_huge_one() -> None:
    streams = _streams()
    encode_messages_parts((Put(object_id=1, value=np.zeros(100_000, np.uint8)),), streams=streams)
    encode_messages_parts((Put(object_id=2, value=np.zeros(MIN, np.uint8)),), streams=streams)
    headers = [struct.unpack(">IBQQ", bytes(part)) for part in streams.next_chunk_parts(5 * CHUNK)[::2]]
    assert [stream_id for _, _, stream_id, _ in headers] == [0, 1, 0, 1, 0]


def test_behind_hears_only_of_chunks_an_earlier_ask_handed_out() -> None:
    """`behind` (transport/dropbehind.py on a session) may unmap what it is told of: never a
    chunk not yet written, i.e. one handed out by this very ask, nor any by all_chunk_parts."""
    told: dict[int, list[int]] = {}

    class Behind:
        def __init__(self, view: memoryview) -> None:
            self.calls = told.setdefault(len(view), [])

        def done(self, sent: int) -> None:
            self.calls.append(sent)

    streams = _streams()
    streams.behind = Behind
    encode_messages_parts((Put(object_id=1, value=np.zeros(5 * CHUNK, np.uint8)),), streams=streams)
    encode_messages_parts((Put(object_id=2, value=np.zeros(MIN, np.uint8)),), streams=streams)
    big, small = told[5 * CHUNK], told[MIN]
    streams.next_chunk_parts(3 * CHUNK)  # taking turns: big 0, small 0, big 1
    assert big == [0] and small == [0]
    streams.next_chunk_parts(2 * CHUNK)  # small 1, big 2: told of what the first ask gave
    assert (big[-1], small[-1]) == (2 * CHUNK, CHUNK)
    streams.written()  # the writer drained
    assert (big[-1], small[-1]) == (3 * CHUNK, 2 * CHUNK)
    while streams.active:
        streams.next_chunk_parts(CHUNK)
    streams.written()
    assert big[-1] == 5 * CHUNK and small[-1] == MIN and big == sorted(big)
    whole: list[int] = told.setdefault(7 * CHUNK, [])
    encode_messages_parts((Put(object_id=3, value=np.zeros(7 * CHUNK, np.uint8)),), streams=streams)
    streams.all_chunk_parts()  # written right after, by the caller: nothing to drop yet
    assert whole == []


def test_a_batch_that_fails_to_encode_commits_no_stream() -> None:
    streams = _streams()
    good = Put(object_id=1, value=np.zeros(MIN, np.uint8))
    with pytest.raises(LocalProtocolError):
        encode_messages_parts((good, Put(object_id=2, value=object())), streams=streams)
    assert streams.next_id == 0 and not streams.active
    parts = encode_streamed_parts(good, streams)
    (put,) = _decode(_join(parts), [])  # the receiver expects stream 0: it gets it
    assert isinstance(put, Put) and put.value.nbytes == MIN


# -- what overtakes a transfer, and what waits for it --------------------------------------------


def _pair() -> tuple[Connection, Connection]:
    coordinator = Connection(Role.COORDINATOR, stream_min_bytes=MIN, chunk_bytes=CHUNK)
    agent = Connection(Role.AGENT, stream_min_bytes=MIN, chunk_bytes=CHUNK)
    hello = Hello(
        protocol=PROTOCOL_VERSION,
        batuta_version="0",
        python_version="3.11.0",
        hostname="h",
        pid=1,
        cpu_count=2,
        slots=(SlotInfo(slot=0, capabilities=("cpu",)), SlotInfo(slot=1, capabilities=("cpu",))),
    )
    coordinator.receive_data(agent.send(hello))
    assert coordinator.next_event() == hello
    agent.receive_data(coordinator.send(Welcome(protocol=PROTOCOL_VERSION, heartbeat_interval=1.0)))
    assert isinstance(agent.next_event(), Welcome)
    return coordinator, agent


def _events(conn: Connection) -> list[Any]:
    out = []
    while (event := conn.next_event()) is not NEED_DATA:
        out.append(event)
        if event is CLOSED:
            break
    return out


def test_a_heartbeat_and_other_results_overtake_a_streaming_result_and_its_slot_change_waits() -> None:
    coordinator, agent = _pair()
    coordinator.receive_data(_join(agent.send_many_parts([_done(slot=0)])))
    beat = Heartbeat(seq=3, cpu_percent=1.0, memory_used=1, memory_total=2)
    other = Done(results=(TaskOutcome(task_id=11, slot=1, attempt=1, status=Outcome.OK, value=1),))
    down = SlotChanged(slot=0, state="down", reason="gave up")
    coordinator.receive_data(_join(agent.send_many_parts([beat, Started(task_ids=(12,)), other, down])))
    assert _events(coordinator) == [beat, Started(task_ids=(12,)), other]  # the slot change waits
    assert coordinator.receiving_bytes > 0
    coordinator.receive_data(_join(agent.next_chunk_parts(10**9)))
    done, changed = _events(coordinator)
    assert_same(done, _done(slot=0))
    assert changed == down


def test_a_task_waits_for_the_put_it_names_and_other_tasks_do_not() -> None:
    coordinator, agent = _pair()
    put = Put(object_id=7, value=np.ones(1000))
    agent.receive_data(_join(coordinator.send_many_parts([put])))
    naming = _run(ObjectRef(7), task_id=1)
    unrelated = _run(2.0, task_id=2)
    cancel_it = Cancel(task_ids=(1,))
    cancel_other = Cancel(task_ids=(2,))
    drop = Drop(object_ids=(7,))
    agent.receive_data(_join(coordinator.send_many_parts([naming, unrelated, cancel_it, cancel_other, drop])))
    assert _events(agent) == [unrelated, cancel_other]
    agent.receive_data(_join(coordinator.next_chunk_parts(10**9)))
    got_put, got_run, got_cancel, got_drop = _events(agent)
    assert_same(got_put, put)
    assert (got_run, got_cancel, got_drop) == (naming, cancel_it, drop)


def test_a_task_whose_own_argument_streams_holds_back_its_cancel() -> None:
    coordinator, agent = _pair()
    run = _run(np.arange(500.0), task_id=5)
    agent.receive_data(_join(coordinator.send_many_parts([run, Cancel(task_ids=(5,))])))
    assert _events(agent) == []
    agent.receive_data(_join(coordinator.next_chunk_parts(10**9)))
    got_run, got_cancel = _events(agent)
    assert_same(got_run, run)
    assert got_cancel == Cancel(task_ids=(5,))


def test_send_returns_the_chunks_too() -> None:
    coordinator, agent = _pair()
    agent.receive_data(coordinator.send(Put(object_id=1, value=np.ones(1000))))
    (put,) = _events(agent)
    assert np.array_equal(put.value, np.ones(1000)) and not coordinator.streaming


# -- a link lost during a transfer ---------------------------------------------------------------


def test_end_of_stream_inside_a_transfer_is_the_peers_fault_and_discard_frees_the_partial_array() -> None:
    coordinator, agent = _pair()
    agent.receive_data(_join(coordinator.send_many_parts([Put(object_id=1, value=np.ones(1000))])))
    agent.receive_data(_join(coordinator.next_chunk_parts(1)))
    assert _events(agent) == []
    assert agent.receiving_bytes == 8000
    agent.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match=r"stream closed with 1 streamed array\(s\) unfinished"):
        agent.next_event()
    agent.discard_transfers()
    assert agent.receiving_bytes == 0
    coordinator.discard_transfers()
    assert not coordinator.streaming


# -- malformed chunks and streamed exts ----------------------------------------------------------


def _stream_ext(dtype: bytes, shape: tuple[int, ...], stream_id: int) -> msgpack.ExtType:
    header = bytes((len(dtype),)) + dtype + bytes((len(shape),)) + struct.pack(f">{len(shape)}Q", *shape)
    return msgpack.ExtType(EXT_ARRAY_STREAM, header + struct.pack(">Q", stream_id))


def _put_frame(ext: Any, object_id: int = 1) -> bytes:
    body = msgpack.packb([TAGS[Put], object_id, ext])
    return struct.pack(">I", len(body)) + body


def _chunk(stream_id: int, offset: int, data: bytes) -> bytes:
    return _join(chunk_frame(stream_id, offset, memoryview(data)))


def _error(data: bytes, **kwargs: Any) -> str:
    decoder = FrameDecoder(**kwargs)
    decoder.feed(data)
    with pytest.raises(RemoteProtocolError) as info:
        for _ in range(100):
            decoder.next_message()
    return str(info.value)


GOOD = _put_frame(_stream_ext(b"<f8", (4,), 0))

MALFORMED: list[tuple[str, bytes, str]] = [
    ("chunk for a stream never announced", _chunk(0, 0, b"x"), "chunk for stream 0, which is not announced"),
    ("chunk past the end", GOOD + _chunk(0, 0, bytes(33)), "chunk of 33 bytes at offset 0 runs past stream 0's 32"),
    ("chunk at the wrong offset", GOOD + _chunk(0, 8, bytes(8)), "at offset 8, expected 0"),
    (
        "chunk after the stream finished",
        GOOD + _chunk(0, 0, bytes(32)) + _chunk(0, 32, b"x"),
        "chunk for stream 0, which is finished",
    ),
    ("chunk frame with no data", struct.pack(">IBQQ", 17, CHUNK_MARK, 0, 0), "has no data"),
    ("stream ids out of order", _put_frame(_stream_ext(b"<f8", (4,), 1)), "stream id 1 out of order (expected 0)"),
    ("empty stream", _put_frame(_stream_ext(b"<f8", (0,), 0)), "streamed array of 0 bytes"),
    ("stream over the limit", _put_frame(_stream_ext(b"<f8", (1 << 40,), 0)), "exceeds the 1099511627776-byte limit"),
    ("unknown dtype", _put_frame(_stream_ext(b"|O", (4,), 0)), "dtype b'|O' is not allowed"),
    ("no stream id", _put_frame(msgpack.ExtType(EXT_ARRAY_STREAM, b"\x03<f8\x01" + bytes(8))), "8-byte stream id"),
    (
        "bool bytes other than 0 and 1",
        _put_frame(_stream_ext(b"|b1", (4,), 0)) + _chunk(0, 0, b"\x00\x01\x02\x00"),
        "bool data holds bytes other than 0 and 1",
    ),
]


@pytest.mark.parametrize(("case", "data", "message"), MALFORMED, ids=[c[0] for c in MALFORMED])
def test_a_malformed_transfer_is_refused_naming_what_was_wrong(case: str, data: bytes, message: str) -> None:
    assert message in _error(data)
    for cut in range(1, len(data)):  # the same, however the bytes arrive
        decoder = FrameDecoder()
        decoder.feed(data[:cut])
        with pytest.raises(RemoteProtocolError) as info:
            for _ in range(100):
                decoder.next_message()
                decoder.feed(data[cut:])
                cut = len(data)
        assert message in str(info.value)


def test_a_streamed_array_on_a_link_that_does_not_stream_is_named() -> None:
    from batuta.protocol._fields import Malformed
    from batuta.protocol._values import decode_ext

    malformed = decode_ext(EXT_ARRAY_STREAM, b"")
    assert isinstance(malformed, Malformed) and "does not stream" in malformed.reason


def test_a_decoder_after_an_error_frees_what_it_allocated() -> None:
    decoder = FrameDecoder()
    decoder.feed(GOOD + _chunk(0, 8, bytes(8)))
    with pytest.raises(RemoteProtocolError):
        decoder.next_message()
    decoder.discard()
    assert decoder.streams.open_bytes == 0


# -- a data link beside the stream (transport/bulk.py): the hooks, without sockets -------------


def test_with_a_divert_a_stream_leaves_whole_and_its_frame_alone_goes_on_the_stream() -> None:
    streams = _streams()
    diverted: list[tuple[int, memoryview]] = []
    frame = _join(encode_messages_parts((_put(),), streams=streams))
    assert streams.active  # the first Put's array streams as chunks, as before
    streams.divert = lambda stream_id, view: diverted.append((stream_id, view))
    second = Put(object_id=5, value=np.arange(100.0))  # 800 bytes: streamed
    later = _join(encode_messages_parts((second,), streams=streams))
    assert [stream_id for stream_id, _ in diverted] == [2] and streams.next_id == 3  # after the first Put's two
    assert bytes(diverted[0][1]) == second.value.tobytes()  # the caller's own bytes, whole
    assert streams.pending_bytes == 400 + 308  # only the first Put's chunks wait here
    assert len(later) < 100 and CHUNK_MARK not in later[4:5] and frame


def test_a_stream_filled_elsewhere_delivers_its_message_and_the_hooks_see_every_stream() -> None:
    sender, decoder = _streams(), FrameDecoder()
    announced: dict[int, Any] = {}  # an array, or the size of one left unheld (below)
    decoder.streams.on_open = announced.__setitem__
    put = Put(object_id=5, value=(np.arange(100.0), "x"))
    sender.divert = lambda stream_id, view: None  # its bytes go "elsewhere": the test copies them
    decoder.feed(_join(encode_messages_parts((put, _run(ObjectRef(5)), _run(1, task_id=2)), streams=sender)))
    assert isinstance(decoder.next_message(), Run)  # the task not naming the Put overtakes it
    assert decoder.next_message() is None and list(announced) == [0]
    announced[0][:] = np.frombuffer(put.value[0].tobytes(), dtype=np.uint8)
    assert decoder.streams.filled_elsewhere(0, 800)
    arrived = decoder.next_message()
    assert isinstance(arrived, Put) and np.array_equal(arrived.value[0], put.value[0])
    assert isinstance(decoder.next_message(), Run) and decoder.streams.open_streams == 0
    decoder.discard()
    assert not decoder.streams.filled_elsewhere(0, 800)  # a link's late word about a stream gone


def test_a_stream_with_bytes_from_the_stream_too_or_a_wrong_length_is_the_peers_fault() -> None:
    for first_chunk in (True, False):
        sender, decoder = _streams(), FrameDecoder()
        decoder.feed(_join(encode_messages_parts((Put(object_id=5, value=np.arange(100.0)),), streams=sender)))
        if first_chunk:
            decoder.feed(_join(sender.next_chunk_parts(1)))
        assert decoder.next_message() is None
        with pytest.raises(RemoteProtocolError, match="both over the channel and the data link, or with a wrong"):
            decoder.streams.filled_elsewhere(0, 800 if first_chunk else 799)


def test_the_hooks_see_a_put_while_it_waits_and_each_chunk_as_it_fills() -> None:
    sender, decoder = _streams(), FrameDecoder()
    held: list[tuple[Message, list[int]]] = []
    progress: list[tuple[int, int]] = []
    decoder.streams.on_held = lambda message, opened: held.append((message, [i for i, _ in opened]))
    decoder.streams.on_progress = lambda stream_id, filled: progress.append((stream_id, filled))
    put = Put(object_id=5, value=np.arange(100.0))  # 800 bytes: 8 chunks of 100
    data = _join(encode_messages_parts((put,), streams=sender))
    decoder.feed(data)
    assert decoder.next_message() is None
    assert len(held) == 1 and held[0][1] == [0] and isinstance(held[0][0], Put)  # before any byte of it
    partial = held[0][0].value
    for step in range(8):
        decoder.feed(_join(sender.next_chunk_parts(1)))
        message = decoder.next_message()
        assert progress[-1] == (0, 100 * (step + 1))
        assert np.array_equal(partial.view(np.uint8)[: 100 * (step + 1)], put.value.view(np.uint8)[: 100 * (step + 1)])
        assert (message is None) == (step < 7)
    assert isinstance(message, Put) and message.value is partial  # the array the hooks saw, now whole
    assert len(held) == 1 and len(progress) == 8


def test_an_aborted_stream_forgets_its_message_and_releases_what_waited_behind_it() -> None:
    sender, decoder = _streams(), FrameDecoder()
    sender.divert = lambda stream_id, view: None  # its bytes would come over a data link
    done = Done(results=(TaskOutcome(task_id=7, slot=0, attempt=1, status=Outcome.OK, value=np.arange(100.0)),))
    down = SlotChanged(slot=0, state="down", reason="gave up")  # waits for slot 0's results
    pair = (np.ones(50), np.ones(50))  # two streams of one message
    other = Done(results=(TaskOutcome(task_id=8, slot=0, attempt=1, status=Outcome.OK, value=pair),))
    decoder.feed(_join(encode_messages_parts((done, other, down), streams=sender)))
    assert decoder.next_message() is None and decoder.streams.open_streams == 3
    assert decoder.streams.abort(0)  # the first Done's source died part-way
    assert decoder.next_message() is None  # the other Done still waits for its bytes, the SlotChanged for it
    assert decoder.streams.abort(1)  # one of the other's two streams: all of it goes
    assert decoder.streams.open_streams == 0 and decoder.streams.held == 0
    assert decoder.next_message() == down  # and what waited behind them goes on
    assert not decoder.streams.abort(2) and not decoder.streams.filled_elsewhere(2, 400)  # late words find nothing
    assert decoder.next_message() is None


# -- an array the receiver cannot allocate (out of memory) ------------------------------------


def _tight(limit: int) -> Any:
    """An allocator that refuses more than `limit` bytes, as a host out of memory does."""
    from batuta.protocol._values import aligned_empty

    def allocate(nbytes: int) -> np.ndarray:
        if nbytes > limit:
            raise OSError(12, "Cannot allocate memory")
        return aligned_empty(nbytes)

    return allocate


def test_an_array_the_agent_cannot_allocate_fails_its_message_and_the_stream_stays_in_step() -> None:
    """Its chunks are read and dropped, the Run or Put comes out with an `Unheld` where the
    array was, and what follows decodes: the agent answers for it instead of going down."""
    from batuta.protocol._fields import Unheld, first_unheld

    big = np.arange(100.0)  # 800 bytes, streamed as 8 chunks; the allocator takes 500 at most
    small = np.arange(40.0)  # 320 bytes, streamed too, and allocated
    messages: list[Message] = [_run(big, task_id=1), Put(object_id=5, value=("x", [big])), _run(small, task_id=2)]
    data, cuts = _wire(*messages)
    out = _decode(data, cuts, allocate=_tight(500), unheld_in=(Run, Put))
    assert [type(m) for m in out] == [Run, Put, Run]
    first, put, last = out
    assert isinstance(first, Run) and isinstance(put, Put) and isinstance(last, Run)
    unheld = first_unheld(first.tasks[0].call.args)
    assert isinstance(unheld, Unheld) and unheld.nbytes == 800 and unheld.shape == (100,)
    assert "800 bytes (a float64 array of shape (100,)): OSError" in unheld.describe()
    assert isinstance(first_unheld(put.value), Unheld)
    assert first_unheld(last.tasks[0].call.args) is None
    assert np.array_equal(last.tasks[0].call.args[0], small)


def test_an_array_nobody_answers_for_is_still_the_links_end_naming_the_size() -> None:
    """Where the receiver was not told it may leave a message's array unheld (a Done on the
    coordinator, or any message but Run and Put), the allocation failure is a protocol error."""
    data, cuts = _wire(_done())
    with pytest.raises(
        RemoteProtocolError, match=r"Done: cannot allocate 300 bytes \(a bool array of shape \(300,\)\)"
    ):
        _decode(data, cuts, allocate=_tight(100), unheld_in=(Run, Put))
    with pytest.raises(RemoteProtocolError, match="cannot allocate 800 bytes for a streamed array: OSError"):
        _decode(*_wire(_run(np.arange(100.0))), allocate=_tight(500))


def test_an_unheld_stream_over_a_data_link_is_announced_by_its_size_and_completes() -> None:
    sender, decoder = _streams(), FrameDecoder(allocate=_tight(500), unheld_in=(Run, Put))
    announced: dict[int, np.ndarray | int] = {}
    decoder.streams.on_open = announced.__setitem__
    sender.divert = lambda stream_id, view: None  # its bytes go over the link, which drops them
    decoder.feed(_join(encode_messages_parts((_run(np.arange(100.0)),), streams=sender)))
    assert decoder.next_message() is None and announced == {0: 800}
    assert decoder.streams.filled_elsewhere(0, 800)
    arrived = decoder.next_message()
    assert isinstance(arrived, Run) and decoder.streams.open_streams == 0 and decoder.streams.open_bytes == 0
