"""The wire codec on receive: every malformed frame is a RemoteProtocolError saying what was wrong.

No sockets: hand-made frames (bad msgpack, wrong fields, bad array and out-of-band payloads)
are fed to a FrameDecoder whole and in pieces. Separate from the round trips
(test_protocol_codec.py) and from what the codec refuses to send
(test_protocol_codec_refused.py).
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import numpy as np
import pytest

from batuta.protocol import (
    DEFAULT_MAX_FRAME_BYTES,
    TAGS,
    Bye,
    Cancel,
    Code,
    CodeFile,
    CodeLoaded,
    CodeStored,
    Done,
    Fetch,
    FrameDecoder,
    GpuCache,
    Heartbeat,
    Hello,
    Put,
    RemoteProtocolError,
    SlotChanged,
    code_digest,
    encode_message,
)
from batuta.protocol._values import ALIGN, EXT_ARRAY, EXT_ARRAY_OOB, EXT_SCALAR, EXT_TUPLE
from tests.support.codec import (
    decode_all,
    raw_frame,
    remote_error,
    run_wire,
)

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
    ("too few fields", raw_frame([TAGS[Hello], 1, "v"]), "Hello needs 9 or 10 fields, got 2"),
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
        raw_frame(run_wire([-1, 0, 1, [0, "k", []], None, "cpu", ""])),
        "Run.tasks[0].task_id: expected an int >= 0, got int -1",
    ),
    (
        "bool id",
        raw_frame(run_wire([True, 0, 1, [0, "k", []], None, "cpu", ""])),
        "Run.tasks[0].task_id: expected an int >= 0, got bool True",
    ),
    (
        "attempt 0",
        raw_frame(run_wire([1, 0, 0, [0, "k", []], None, "cpu", ""])),
        "Run.tasks[0].attempt: expected an int >= 1",
    ),
    (
        "unknown backend",
        raw_frame(run_wire([1, 0, 1, [0, "k", []], None, "tpu", ""])),
        "Run.tasks[0].backend: unknown backend 'tpu'",
    ),
    (
        "negative timeout",
        raw_frame(run_wire([1, 0, 1, [0, "k", []], -1.0, "cpu", ""])),
        "Run.tasks[0].timeout: expected a number > 0",
    ),
    (
        "nan timeout",
        raw_frame(run_wire([1, 0, 1, [0, "k", []], float("nan"), "cpu", ""])),
        "timeout: expected a finite number",
    ),
    (
        "unknown call kind",
        raw_frame(run_wire([1, 0, 1, [7, "k", []], None, "cpu", ""])),
        "Run.tasks[0].call: unknown call kind 7",
    ),
    (
        "short kernel call",
        raw_frame(run_wire([1, 0, 1, [0, "k"], None, "cpu", ""])),
        "Run.tasks[0].call: KernelCall needs 2 fields, got 1",
    ),
    (
        "empty kernel name",
        raw_frame(run_wire([1, 0, 1, [0, "", []], None, "cpu", ""])),
        "Run.tasks[0].call.name: expected a non-empty str",
    ),
    (
        "args not array",
        raw_frame(run_wire([1, 0, 1, [0, "k", 5], None, "cpu", ""])),
        "Run.tasks[0].call.args: expected an array",
    ),
    (
        "binary arg not str",
        raw_frame(run_wire([1, 0, 1, [1, "/bin/x", ["a", 2], {}, None], None, "cpu", ""])),
        "Run.tasks[0].call.args[1]: expected a str, got int 2",
    ),
    (
        "binary env not str",
        raw_frame(run_wire([1, 0, 1, [1, "/bin/x", [], {"A": 1}, None], None, "cpu", ""])),
        "call.env['A']: expected a str",
    ),
    (
        "bytes map key",
        raw_frame(run_wire([1, 0, 1, [0, "k", [{b"k": 1}]], None, "cpu", ""])),
        "Run.tasks[0].call.args[0]: map keys must be str",
    ),
    (
        "value of unknown ext",
        raw_frame(
            None, packed=msgpack.packb(run_wire([1, 0, 1, [0, "k", [1, msgpack.ExtType(42, b"zz")]], None, "cpu", ""]))
        ),
        "Run.tasks[0].call.args[1]: unknown ext type 42",
    ),
    (
        "timestamp ext",
        raw_frame(
            None, packed=msgpack.packb(run_wire([1, 0, 1, [0, "k", [msgpack.Timestamp(1, 0)]], None, "cpu", ""]))
        ),
        "call.args[0]: unexpected msgpack.ext.Timestamp",
    ),
    (
        "tuple mark alone",
        raw_frame(
            None,
            packed=msgpack.packb(
                run_wire([1, 0, 1, [0, "k", [[1, msgpack.ExtType(EXT_TUPLE, b"")]]], None, "cpu", ""])
            ),
        ),
        "call.args[0][1]: tuple marker outside the first slot",
    ),
    (
        "tuple mark with payload",
        raw_frame(
            None,
            packed=msgpack.packb(run_wire([1, 0, 1, [0, "k", [[msgpack.ExtType(EXT_TUPLE, b"x")]]], None, "cpu", ""])),
        ),
        "tuple marker with a payload",
    ),
    (
        "ext in an int field",
        raw_frame(
            None, packed=msgpack.packb(run_wire([msgpack.ExtType(EXT_TUPLE, b""), 0, 1, [0, "k", []], None, "cpu", ""]))
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
        raw_frame([TAGS[Heartbeat], 1, 1.0, 1, 1, [[0, "hot", None, None, None, None, 0, 0, 0]], ""]),
        "Heartbeat.gpus[0].utilization: expected a number",
    ),
    (
        "gpu sample of protocol 6",
        raw_frame([TAGS[Heartbeat], 1, 1.0, 1, 1, [[0, None, None, None, None, None]], ""]),
        "Heartbeat.gpus[0]: GpuSample needs 9 fields, got 6",
    ),
    (
        "negative cached bytes",
        raw_frame([TAGS[Heartbeat], 1, 1.0, 1, 1, [[0, None, None, None, None, None, 1, -5, 0]], ""]),
        "Heartbeat.gpus[0].cached_bytes: expected an int >= 0, got int -5",
    ),
    ("gpu cache short", raw_frame([TAGS[GpuCache], 0, 1, 2]), "GpuCache needs 4 fields, got 3"),
    (
        "gpu cache bytes not an int",
        raw_frame([TAGS[GpuCache], 0, 1, 2.5, 0]),
        "GpuCache.nbytes: expected an int >= 0, got float 2.5",
    ),
    (
        "gpu cache negative cap",
        raw_frame([TAGS[GpuCache], 0, 1, 2, -1]),
        "GpuCache.cap: expected an int >= 0, got int -1",
    ),
    (
        "bad packages",
        raw_frame([TAGS[Hello], 1, "v", "p", "h", 1, 1, [], [], {"numpy": 2}]),
        "Hello.packages['numpy']: expected a str",
    ),
    ("bad id list", raw_frame([TAGS[Cancel], [1, "2"]]), "Cancel.task_ids[1]: expected an int >= 0, got str '2'"),
    (
        "deep value",
        raw_frame(run_wire([1, 0, 1, [0, "k", [_nest(40)]], None, "cpu", ""])),
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


def _code_frame(files: list[Any], modules: list[Any] | None = None, digest: Any = None) -> bytes:
    """A Code frame around hand-made file records; its digest is right unless given."""
    modules = modules if modules is not None else []
    if digest is None:
        good = [
            CodeFile(path=f[0], data=f[1])
            for f in files
            if isinstance(f, list) and len(f) == 2 and isinstance(f[0], str) and isinstance(f[1], bytes)
        ]
        digest = code_digest(good, [m for m in modules if isinstance(m, str)])
    return raw_frame([TAGS[Code], digest, modules, files])


_SRC = [["mykernels.py", b"X = 1\n"]]
_HELLO = [TAGS[Hello], 4, "0.1.0", "3.11.7", "h", 1, 1, [], [], {"numpy": "2"}]  # an agent before protocol 4
MALFORMED += [
    ("code absolute path", _code_frame([["/etc/passwd", b"x"]]), "Code.files[0].path: expected a relative"),
    ("code dotdot", _code_frame([["a/../../x.py", b"x"]]), "Code.files[0].path: expected a path without"),
    ("code dotdot alone", _code_frame([["..", b"x"]]), "without empty, '.' or '..' parts"),
    ("code dot part", _code_frame([["./x.py", b"x"]]), "without empty, '.' or '..' parts"),
    ("code empty part", _code_frame([["a//x.py", b"x"]]), "without empty, '.' or '..' parts"),
    ("code trailing slash", _code_frame([["pkg/", b"x"]]), "without empty, '.' or '..' parts"),
    ("code empty path", _code_frame([["", b"x"]]), "expected a relative path of 1 to 1024 characters"),
    ("code long path", _code_frame([["a" * 1025, b"x"]]), "expected a relative path of 1 to 1024 characters"),
    ("code backslash", _code_frame([["..\\x.py", b"x"]]), "expected a relative '/'-separated path"),
    ("code nul", _code_frame([["x\x00.py", b"x"]]), "expected a relative '/'-separated path"),
    ("code path not str", _code_frame([[b"x.py", b"x"]]), "Code.files[0].path: expected a str, got bytes"),
    ("code data not bytes", _code_frame([["x.py", "text"]]), "Code.files[0].data: expected bytes, got str"),
    ("code short file", _code_frame([["x.py"]]), "Code.files[0]: CodeFile needs 2 fields, got 1"),
    ("code file not array", _code_frame(["x.py"]), "Code.files[0]: expected a CodeFile array, got str"),
    ("code files not array", raw_frame([TAGS[Code], "0" * 64, [], {}]), "Code.files: expected an array, got dict"),
    ("code twice", _code_frame([["x.py", b"1"], ["x.py", b"2"]]), "Code.files[1]: path 'x.py' appears twice"),
    ("code bad module", _code_frame(_SRC, ["my-kernels"]), "Code.modules[0]: expected a dotted module name"),
    ("code module dots", _code_frame(_SRC, ["a..b"]), "Code.modules[0]: expected a dotted module name"),
    ("code module not str", _code_frame(_SRC, [7]), "Code.modules[0]: expected a str, got int 7"),
    ("code digest not hex", _code_frame(_SRC, digest="z" * 64), "Code.digest: expected a sha256 digest"),
    ("code digest upper", _code_frame(_SRC, digest="A" * 64), "Code.digest: expected a sha256 digest"),
    ("code digest short", _code_frame(_SRC, digest="ab"), "Code.digest: expected a sha256 digest"),
    ("code digest empty", _code_frame(_SRC, digest=""), "Code.digest: expected a sha256 digest"),
    ("code digest wrong", _code_frame(_SRC, digest="0" * 64), "Code.digest: does not match the files and modules"),
    ("code short", raw_frame([TAGS[Code], "0" * 64, []]), "Code needs 3 fields, got 2"),
    ("code stored bad digest", raw_frame([TAGS[CodeStored], "0" * 63]), "CodeStored.digest: expected a sha256"),
    ("code loaded bad digest", raw_frame([TAGS[CodeLoaded], 5, {}]), "CodeLoaded.digest: expected a sha256"),
    ("code loaded bad errors", raw_frame([TAGS[CodeLoaded], "0" * 64, {"m": 1}]), "CodeLoaded.errors['m']"),
    ("code loaded bad module", raw_frame([TAGS[CodeLoaded], "0" * 64, {"1m": "x"}]), "expected a dotted module"),
    ("task bad code", raw_frame(run_wire([1, 0, 1, [0, "k", []], None, "cpu", "x"])), "Run.tasks[0].code"),
    ("task code not str", raw_frame(run_wire([1, 0, 1, [0, "k", []], None, "cpu", None])), "Run.tasks[0].code"),
    ("task short", raw_frame(run_wire([1, 0, 1, [0, "k", []], None, "cpu"])), "TaskRequest needs 7 fields, got 6"),
    ("task tail not bool", raw_frame(run_wire([1, 0, 1, [0, "k", []], None, "cpu", "", 0, 1])), "Run.tasks[0].tail"),
    ("task long", raw_frame(run_wire([1, 0, 1, [0, "k", []], None, "cpu", "", 0, True, 1])), "TaskRequest needs 7"),
    ("fetch lend not bool", raw_frame([TAGS[Fetch], 1, 0, 1]), "Fetch.lend: expected a boolean"),
    ("fetch long", raw_frame([TAGS[Fetch], 1, 0, True, 1]), "Fetch needs 2 or 3 fields, got 4"),
    ("hello long", raw_frame([*_HELLO, {}, 1]), "Hello needs 9 or 10 fields, got 11"),
    ("hello modules not map", raw_frame([*_HELLO, []]), "Hello.modules: expected a map of str to str"),
    ("hello module digest", raw_frame([*_HELLO, {"m": "abc"}]), "Hello.modules['m']: expected a sha256 digest"),
    ("hello module not str", raw_frame([*_HELLO, {"m": 5}]), "Hello.modules['m']: expected a str, got int 5"),
    ("hello module name", raw_frame([*_HELLO, {"my-mod": ""}]), "Hello.modules['my-mod']: expected a dotted module"),
    ("hello module key", raw_frame([*_HELLO, {b"m": ""}]), "Hello.modules: expected str keys, got key bytes"),
    ("hello many modules", raw_frame([*_HELLO, {f"m{i}": "" for i in range(1001)}]), "at most 1000 modules"),
]


def test_hello_without_modules_is_read_as_empty() -> None:
    """An agent before protocol 4 sends no Hello.modules: its Hello is still read (so the
    coordinator can tell it that its batuta differs), with no module digests."""
    decoder = FrameDecoder()
    decoder.feed(raw_frame(_HELLO))
    hello = decoder.next_message()
    assert isinstance(hello, Hello) and hello.modules == {} and hello.packages == {"numpy": "2"}


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


def test_a_malformed_object_reference_is_a_protocol_error() -> None:
    body = msgpack.packb([TAGS[Put], 1, msgpack.ExtType(5, b"\x00\x01")])
    with pytest.raises(RemoteProtocolError, match="object reference of 2 bytes"):
        decode_all(struct.pack(">I", len(body)) + body)
