"""Fuzzing the decoder: whatever arrives, the only exception is RemoteProtocolError.

Random bytes, random msgpack bodies, and valid frames with bytes flipped, inserted, deleted
or cut, fed whole and in pieces, to a FrameDecoder and to a Connection. Each property runs a
bounded, derandomized number of examples, so the file stays reproducible and takes seconds.
Also: random valid values survive a round trip exactly.
"""

from __future__ import annotations

import copy
import itertools
import struct
import time
from typing import Any

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batuta.core.task import Outcome
from batuta.protocol import (
    TAGS,
    Connection,
    Done,
    FrameDecoder,
    Message,
    RemoteProtocolError,
    Role,
    Sentinel,
    TaskOutcome,
    encode_message,
    encode_messages,
)
from tests.test_protocol_codec import assert_same, sample_messages

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
LIMIT = 1 << 20  # small frame limit, so random headers are often in range and parsed
VALID = [encode_message(m) for m in sample_messages()] + [
    encode_message(
        Done(
            results=(
                TaskOutcome(
                    task_id=1, slot=0, attempt=1, status=Outcome.OK, value=(np.arange(300.0), np.ones(2, ">i4"))
                ),
            )
        )
    )
]


def decode_everything(data: bytes, cuts: list[int], *, limit: int = LIMIT) -> list[Message]:
    """Feed `data` cut at `cuts`, pulling messages after each piece; must end quickly."""
    decoder = FrameDecoder(limit)
    out: list[Message] = []
    start = time.monotonic()
    bounds = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    try:
        for lo, hi in itertools.pairwise(bounds):
            decoder.feed(data[lo:hi])
            while (msg := decoder.next_message()) is not None:
                out.append(msg)
                assert len(out) <= len(data)  # each message needs at least 5 bytes
    except RemoteProtocolError as exc:
        assert str(exc)  # always says something
        try:
            decoder.next_message()
        except RemoteProtocolError:
            pass
        else:
            raise AssertionError("decoder kept going after an error") from None
    assert time.monotonic() - start < 5
    return out


def framed(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


@FUZZ
@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=8))
def test_random_bytes(data: bytes, cuts: list[int]) -> None:
    decode_everything(data, cuts)
    decode_everything(data, cuts, limit=1 << 28)


@FUZZ
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=4), st.lists(st.integers(0, 2000), max_size=4))
def test_random_bodies_with_valid_lengths(bodies: list[bytes], cuts: list[int]) -> None:
    decode_everything(b"".join(framed(b) for b in bodies), cuts)


_scalars = (
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats() | st.text(max_size=8) | st.binary(max_size=8)
)
_exts = (
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=40))
    | st.builds(msgpack.Timestamp, st.integers(0, 2**32), st.integers(0, 999_999_999))
    | st.builds(
        msgpack.ExtType,
        st.integers(1, 4),
        st.builds(
            lambda dt, nd, rest: bytes([len(dt)]) + dt + bytes([nd]) + rest,
            st.sampled_from([b"<f8", b"|b1", b">i4", b"|O", b"<c16", b"<f8x"]),
            st.integers(0, 3),
            st.binary(max_size=40),
        ),
    )
)
_wire = st.recursive(
    _scalars | _exts,
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=4) | st.binary(max_size=2), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(FUZZ, max_examples=150)
@given(st.sampled_from([*sorted(TAGS.values()), 0, 14]), st.lists(_wire, max_size=10))
def test_random_msgpack_messages(tag: int, fields: list[Any]) -> None:
    try:
        body = msgpack.packb([tag, *fields])
    except (OverflowError, ValueError):
        return
    decode_everything(framed(body), [])


@FUZZ
@given(
    st.sampled_from(range(len(VALID))),
    st.lists(
        st.tuples(st.sampled_from(["flip", "insert", "delete", "cut"]), st.integers(0, 10_000), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    ),
    st.booleans(),
    st.lists(st.integers(0, 10_000), max_size=4),
)
def test_mutated_valid_frames(which: int, edits: list[tuple[str, int, int]], fix_length: bool, cuts: list[int]) -> None:
    data = bytearray(VALID[which])
    for op, pos, byte in edits:
        if not data:
            break
        pos %= len(data)
        if op == "flip":
            data[pos] ^= byte or 1
        elif op == "insert":
            data.insert(pos, byte)
        elif op == "delete":
            del data[pos]
        else:
            del data[pos:]
    if fix_length and len(data) >= 4:  # keep the framing right so the body itself is judged
        data[:4] = struct.pack(">I", len(data) - 4)
    decode_everything(bytes(data) + VALID[0], cuts)


def _paths(node: Any, path: tuple[int, ...] = ()) -> list[tuple[int, ...]]:
    found = [path]
    if isinstance(node, list):
        for i, item in enumerate(node):
            found += _paths(item, (*path, i))
    return found


def _wire_of(frame: bytes) -> Any:
    return msgpack.unpackb(frame[4:], ext_hook=msgpack.ExtType)


WIRES = [_wire_of(f) for f in VALID if f[4] != 0xCE]


@FUZZ
@given(st.sampled_from(range(len(WIRES))), st.integers(0, 10_000), _wire)
def test_one_field_replaced_by_anything(which: int, where: int, replacement: Any) -> None:
    wire = copy.deepcopy(WIRES[which])
    paths = _paths(wire)[1:]
    path = paths[where % len(paths)]
    parent = wire
    for i in path[:-1]:
        parent = parent[i]
    parent[path[-1]] = replacement
    try:
        body = msgpack.packb(wire)
    except (OverflowError, ValueError):
        return
    decode_everything(framed(body), [])


@FUZZ
@given(st.binary(max_size=600), st.sampled_from(list(Role)), st.booleans())
def test_connection_only_raises_remote_errors(data: bytes, role: Role, eof: bool) -> None:
    conn = Connection(role, max_frame_bytes=LIMIT)
    if role is Role.AGENT:
        conn.send(sample_messages()[0])  # the Hello, so a Welcome would be in order
    try:
        conn.receive_data(VALID[2] + data if role is Role.AGENT else VALID[0] + data)
        if eof:
            conn.receive_data(b"")
        for _ in range(len(data) + 3):
            event = conn.next_event()
            if isinstance(event, Sentinel):
                break
    except RemoteProtocolError:
        pass


# -- valid values round-trip exactly ---------------------------------------------------------------

_arrays = st.builds(
    lambda dtype, shape, seed: np.asarray(np.random.default_rng(seed).integers(0, 2, size=shape)).astype(dtype),
    st.sampled_from(["|b1", "<i2", ">i8", "<u4", "<f4", ">f8", "<c8"]),
    st.lists(st.integers(0, 40), max_size=3).map(tuple),
    st.integers(0, 100),
)
_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=10)
    | st.binary(max_size=10)
    | _arrays
    | st.sampled_from([np.float32(1.5), np.int16(-2), np.bool_(False), np.complex128(1j)]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_values, max_size=4), st.lists(st.integers(0, 100_000), max_size=3))
def test_valid_values_round_trip(values: list[Any], cuts: list[int]) -> None:
    msgs = [
        Done(results=(TaskOutcome(task_id=i, slot=0, attempt=1, status=Outcome.OK, value=v),))
        for i, v in enumerate(values)
    ]
    decoded = decode_everything(encode_messages(msgs), cuts, limit=1 << 28)
    assert len(decoded) == len(msgs)
    for got, want in zip(decoded, msgs, strict=True):
        assert_same(got, want)
