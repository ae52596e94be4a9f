"""Kept results lent by their slot process (batuta/agent/lend.py), piece by piece.

The slot's encoder hook lends only the value's own C-contiguous arrays; a `Lent` reads an
array from a process's memory (this test process's own, here) through one reused buffer and
says once how it ended; the `Lender` holds Drops of lent objects until they are read, tells
when the host refused a read, and hands back the Fetches of a slot lost mid-way. The whole
path over a real data link: tests/test_data_link.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from batuta.agent.lend import LENT, PIECE_BYTES, Lender, Lent, lend_locator
from batuta.protocol.chunks import OutgoingStreams
from batuta.protocol.codec import FrameDecoder, encode_streamed_parts
from batuta.protocol.messages import Put

MIB = 2**20


def _address(array: np.ndarray) -> int:
    return int(array.__array_interface__["data"][0])


def test_the_slot_lends_its_own_contiguous_arrays_and_nothing_else() -> None:
    big = np.arange(4 * MIB // 8, dtype=np.float64)
    other = np.ones(4 * MIB // 4, dtype=np.float32)
    small = np.arange(10)
    value = {"a": big, "b": [small, (other, "text")], "c": None}
    locate = lend_locator(value, 1 * MIB)
    assert locate is not None
    pid, address, nbytes = LENT.unpack(locate(big.view(np.uint8)) or b"")
    assert (address, nbytes) == (_address(big), big.nbytes) and pid > 0
    assert locate(other.view(np.uint8)) is not None
    assert locate(big.copy().view(np.uint8)) is None  # a copy the encoder made is never lent
    assert lend_locator({"only": small}, 1 * MIB) is None  # nothing worth lending
    assert lend_locator([big, big[::2]], 1 * MIB) is None  # the encoder would copy the strided one


def test_a_lent_put_decodes_to_placeholders_whose_sources_read_the_arrays() -> None:
    """Round trip through the codec: the frame carries locators, not bytes, and each source
    reads back exactly the lender's array, in pieces no larger than its buffer."""
    value = [np.arange(3 * PIECE_BYTES // 8 + 5, dtype=np.int64), np.arange(7)]
    streams = OutgoingStreams(stream_min_bytes=1 * MIB)
    frame = b"".join(
        bytes(p) for p in encode_streamed_parts(Put(object_id=9, value=value), streams, locate=lend_locator(value, MIB))
    )
    assert len(frame) < 4096 and streams.pending_bytes == 0  # no bytes of the big array went
    ended: list[bool] = []
    lender = Lender(lambda fn, *args: fn(*args), lambda *a: None, lambda ids: None)
    decoder = FrameDecoder()
    decoder.streams.shared = lender.arrays_hook(0, lambda: os.getpid())
    decoder.feed(frame)
    put = decoder.next_message()
    assert isinstance(put, Put) and put.value[0].shape == value[0].shape and np.array_equal(put.value[1], value[1])
    [(placeholder, source)] = lender.take(0)
    assert lender.take(0) == []
    source.claim(ended.append)
    got, pieces = bytearray(), 0
    view = placeholder.data
    while len(got) < source.nbytes:
        assert source.wait_beyond(len(got), 0.0) == source.nbytes and not source.complete
        piece = source.piece(view, len(got), source.nbytes)
        assert len(piece) <= PIECE_BYTES
        got += piece
        pieces += 1
    assert pieces == 4 and bytes(got) == value[0].tobytes()
    assert ended == [True]
    source.abort()  # after the end: heard of once only
    assert ended == [True]


def test_a_read_that_cannot_be_had_aborts_and_says_so_once() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # gone: its memory cannot be read
    source = Lent(child.pid, 4096, 8 * MIB)
    ended: list[bool] = []
    source.claim(ended.append)
    with pytest.raises(OSError):
        source.piece(memoryview(bytearray(1)), 0, 8 * MIB)
    source.abort()  # what the data link's thread does on that OSError
    assert ended == [False] and source.wait_beyond(0, 0.0) == -1


def _lender() -> tuple[Lender, list[Any], list[tuple[int, ...]]]:
    refused: list[Any] = []
    dropped: list[tuple[int, ...]] = []
    lender = Lender(lambda fn, *args: fn(*args), lambda *args: refused.append(args), dropped.append)
    return lender, refused, dropped


def _lent(nbytes: int = 16) -> tuple[np.ndarray, Lent]:
    array = np.arange(nbytes, dtype=np.uint8)
    return array, Lent(os.getpid(), _address(array), nbytes)


def _read_all(source: Lent) -> None:
    view = memoryview(bytearray(source.nbytes))
    sent = 0
    while sent < source.nbytes:
        sent += len(source.piece(view, sent, source.nbytes))


def test_drops_of_a_lent_object_wait_until_it_is_read() -> None:
    lender, refused, dropped = _lender()
    arrays = [_lent(), _lent(32)]
    lender.start(0, 7, [101, 102], arrays)
    assert lender.lending(7) and not lender.lending(8)
    assert lender.drops((7, 8)) == (8,)  # 8 at once; 7 waits for its reads
    _read_all(arrays[0][1])
    assert dropped == []  # one array of two read
    _read_all(arrays[1][1])
    assert dropped == [(7,)] and not lender.lending(7) and refused == []


def test_a_refused_read_ends_lending_and_names_the_fetches_to_answer_again() -> None:
    lender, refused, _ = _lender()
    (_, source) = _lent()
    lender.start(2, 7, [101], [(np.empty(0), source)])
    source.abort()  # the data link could not read it
    assert refused == [(2, 7, [101])] and not lender.works


def test_a_lost_slot_hands_back_its_lends_and_refuses_nothing() -> None:
    lender, refused, dropped = _lender()
    first, second = _lent(), _lent()
    lender.start(1, 7, [101], [first])
    lender.start(2, 8, [102, 103], [second])
    assert lender.drops((7,)) == ()
    assert lender.slot_lost(1) == [(7, [101])]
    assert first[1].aborted and not second[1].aborted
    assert refused == [] and lender.works  # its death, not the host's refusal
    assert dropped == [(7,)]  # nothing reads 7 any more
    assert lender.slot_lost(1) == []


def test_arrays_lent_for_nothing_are_released_unread() -> None:
    source: Lent = _lent()[1]
    Lender.release([(np.empty(0), source)])  # before anyone claimed it: it tells no one
    assert source.aborted
    with pytest.raises(OSError):
        source.piece(memoryview(bytearray(16)), 0, 16)


def test_a_locator_from_another_process_or_of_the_wrong_size_is_refused() -> None:
    lender, _, _ = _lender()
    hook: Callable[..., np.ndarray] = lender.arrays_hook(0, lambda: 1234)
    dtype = np.dtype(np.float64)
    with pytest.raises(ValueError, match="lent by pid 99, not by slot 0's process"):
        hook(dtype, (4,), LENT.pack(99, 4096, 32))
    with pytest.raises(ValueError, match="32 bytes for shape"):
        hook(dtype, (5,), LENT.pack(1234, 4096, 32))
    with pytest.raises(ValueError, match="locator is 20 bytes"):
        hook(dtype, (4,), b"short")
    assert lender.take(0) == []


def test_a_drop_waits_from_the_ask_of_a_lend_until_its_answer_is_read() -> None:
    """The slot frees what it drops: a Drop that follows a lend's ask must not reach it
    before the lent bytes are read (the slot answers in order, then would free them)."""
    lender, _, dropped = _lender()
    lender.asked(0, 7)
    assert lender.drops((7,)) == ()
    lender.answered(7)  # it answered with the bytes (nothing lent): the Drop may follow
    assert dropped == [(7,)]
    lender.asked(0, 8)
    assert lender.drops((8,)) == ()
    _, source = _lent()
    lender.start(0, 8, [101], [(np.empty(0), source)])
    lender.answered(8)  # lent: still being read
    assert dropped == [(7,)]
    _read_all(source)
    assert dropped == [(7,), (8,)]
    lender.asked(1, 9)
    assert lender.drops((9,)) == () and lender.slot_lost(1) == []
    assert dropped[-1] == (9,) and not lender.lending(9)  # never answered now: nothing to wait for
