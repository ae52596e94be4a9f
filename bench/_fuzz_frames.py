"""Frames for bench/fuzz.py: well-formed messages with random content, streamed ones, chunks
out of place, frames the coordinator may not send, and `is_safe`, which keeps the agent from
running anything outside a small allowlist (the fuzz's module text says what each kind is)."""

from __future__ import annotations

import os
import random
import struct
from typing import Any

import msgpack
import numpy as np
from _fuzz_bytes import mutate, wire_body
from batuta.kernels import registry

from batuta.core.objects import ObjectRef
from batuta.core.task import BinaryCall, KernelCall, Outcome
from batuta.protocol._values import EXT_ARRAY_STREAM
from batuta.protocol.chunks import OutgoingStreams, chunk_frame
from batuta.protocol.codec import DEFAULT_MAX_FRAME_BYTES, encode_message, encode_streamed_parts
from batuta.protocol.errors import LocalProtocolError
from batuta.protocol.messages import (
    PROTOCOL_VERSION,
    Bye,
    Cancel,
    Code,
    CodeFile,
    CodeLoaded,
    CodeStored,
    DataLink,
    Done,
    Drop,
    Fetch,
    Heartbeat,
    Hello,
    Put,
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

STREAMED_SHARE = 0.1  # of well-formed frames, those whose arrays stream
STREAM_MIN_BYTES = 64  # the fuzzer streams small arrays, so that many chunks stay cheap
SAFE_BINARIES = frozenset({"/bin/true", "/bin/echo"})
MAX_SPIN_S = 0.02  # per frame, so probes come back quickly
MAX_TASKS_PER_FRAME = 256
KNOWN_KERNELS = frozenset(registry.names())


def _bundle(files: dict[str, bytes], modules: tuple[str, ...]) -> Code:
    entries = tuple(CodeFile(path=path, data=data) for path, data in files.items())
    return Code(digest=code_digest(entries, modules), modules=modules, files=entries)


# The only user code the fuzzer ships: harmless to import, or failing to (a syntax error, a missing
# package, a module that is not there). A decoded Code is sent only if it is one of these.
CODE_BUNDLES = (
    _bundle({"fz_a.py": b"VALUE = 1\n"}, ("fz_a",)),
    _bundle(
        {"pkg/__init__.py": b"", "pkg/fz_b.py": b"VALUE = 2\n", "pkg/data/blob.bin": bytes(range(256))},
        ("pkg.fz_b",),
    ),
    _bundle({"fz_c.py": b"VALUE = (\n"}, ("fz_c",)),
    _bundle({"fz_d.py": b"import fuzz_missing_package_xyz\n"}, ("fz_d", "fz_nowhere")),
)
SAFE_DIGESTS = frozenset(code.digest for code in CODE_BUNDLES)
TASK_CODES = ("", "", *sorted(SAFE_DIGESTS))  # what tasks name: no code, or one of the bundles


# -- frames -------------------------------------------------------------------------------


def _value(rnd: random.Random, depth: int = 0) -> Any:
    """A random kernel argument the wire can carry (or, sometimes, cannot)."""
    pick = rnd.randrange(10 if depth < 2 else 6)
    if pick == 0:
        return rnd.randint(-(2**63), 2**63 - 1)
    if pick == 1:
        return rnd.choice([0.0, -1.5, 1e308, float("inf"), float("nan"), rnd.random()])
    if pick == 2:
        return "".join(chr(rnd.randrange(32, 0x3000)) for _ in range(rnd.randrange(12)))
    if pick == 3:
        return rnd.randbytes(rnd.randrange(16))
    if pick == 4:
        return rnd.choice([None, True, False])
    if pick == 5:
        dtype = rnd.choice(["<f4", "<f8", ">i4", "u1", "<c8", "?"])
        return np.zeros(rnd.randrange(5), dtype=dtype)
    if pick == 6:
        return tuple(_value(rnd, depth + 1) for _ in range(rnd.randrange(4)))
    if pick == 7:
        return [_value(rnd, depth + 1) for _ in range(rnd.randrange(4))]
    if pick == 8:
        return ObjectRef(rnd.choice([1, 2, 3, 2**64 - 1]))  # put below, or never put
    return {str(rnd.randrange(5)): _value(rnd, depth + 1) for _ in range(rnd.randrange(3))}


def _task(rnd: random.Random, task_id: int, slots: int) -> TaskRequest:
    slot = rnd.choice([0, 0, 1, slots - 1, slots, 7, 2**31])
    roll = rnd.random()
    call: KernelCall | BinaryCall
    if roll < 0.55:
        call = KernelCall(name="noop", args=tuple(_value(rnd) for _ in range(rnd.randrange(3))))
    elif roll < 0.65:
        call = KernelCall(name="spin", args=(rnd.choice([0.0, 0.001, -1.0]),))
    elif roll < 0.8:
        name = rnd.choice(["nope", "", "x" * 300, "no such kernel", "noop2", "\u00e9t\u00e9"])
        call = KernelCall(name=name, args=(_value(rnd),))
    elif roll < 0.9:
        call = BinaryCall(
            path=rnd.choice(["/bin/true", "/bin/echo", "/nonexistent", "relative/path", ""]),
            args=tuple(rnd.choice(["a", "-n", "\u00e9", "x" * 50]) for _ in range(rnd.randrange(3))),
            env=rnd.choice([{}, {"A": "1"}, {"PATH": ""}]),
            cwd=rnd.choice([None, "/", "/nonexistent"]),
        )
    else:
        call = KernelCall(name="noop", args=(rnd.randbytes(rnd.randrange(1, 4096)),))
    timeout = rnd.choice([None, None, None, 0.001, 0.5, 30.0])
    backend = rnd.choice(["cpu", "cpu", "scalar", "gpu"])
    keep = rnd.choice([0, 0, 0, 0, 1 << 20, rnd.randrange(1, 1 << 40)])  # a kept result, now and then
    return TaskRequest(task_id=task_id, slot=slot, attempt=rnd.randrange(1, 4), call=call, timeout=timeout,
                       backend=backend, code=rnd.choice(TASK_CODES), keep=keep, tail=rnd.random() < 0.2)  # fmt: skip


def valid_message(
    rnd: random.Random, slots: int, next_id: list[int]
) -> Run | Cancel | StealBack | Put | Drop | Fetch | Code | DataLink:
    roll = rnd.random()
    if roll < 0.005:  # port 1 on loopback: refused at once, nothing else is ever contacted
        return DataLink(host="127.0.0.1", port=1, token=rnd.randbytes(32), fingerprint=rnd.randbytes(32),
                        encryption=rnd.choice(("tls", "none")))  # fmt: skip
    if roll < 0.04:
        return rnd.choice(CODE_BUNDLES)
    if roll < 0.06:
        return Put(object_id=rnd.choice([1, 2, 3]), value=_value(rnd))
    if roll < 0.08:
        return Drop(object_ids=tuple(rnd.choice([1, 2, 3, 99]) for _ in range(rnd.randrange(3))))
    if roll < 0.1:  # a kept or put object, or one this agent never had; answered like a result
        return Fetch(object_id=rnd.choice([1, 2, 3, 1 << 20, 99]), request_id=(1 << 50) + rnd.randrange(1 << 20))
    if roll < 0.7:
        count = rnd.choice([1, 1, 2, 3, 8, 32])
        tasks = []
        for _ in range(count):
            next_id[0] += 1
            task_id = next_id[0] if rnd.random() < 0.97 else rnd.randrange(1, max(2, next_id[0]))  # some repeats
            tasks.append(_task(rnd, task_id, slots))
        return Run(tasks=tuple(tasks))
    ids = tuple(rnd.randrange(0, next_id[0] + 10) for _ in range(rnd.randrange(0, 6)))
    if roll < 0.85:
        return Cancel(task_ids=ids)
    return StealBack(slot=rnd.choice([0, 1, slots, 99]), task_ids=ids)


def _wrong_direction(rnd: random.Random) -> bytes:
    message = rnd.choice(
        [
            Welcome(protocol=PROTOCOL_VERSION, heartbeat_interval=1.0),
            Hello(
                protocol=PROTOCOL_VERSION,
                batuta_version="0",
                python_version="3.11.0",
                hostname="h",
                pid=1,
                cpu_count=1,
                slots=(SlotInfo(slot=0, capabilities=("cpu",)),),
            ),
            Done(results=(TaskOutcome(task_id=1, slot=0, attempt=1, status=Outcome.OK),)),
            Started(task_ids=(1,)),
            StealBackReply(slot=0, returned=(), refused=()),
            SlotChanged(slot=0, state="up"),
            Heartbeat(seq=0, cpu_percent=0.0, memory_used=0, memory_total=0),
            Bye(reason="x"),
            CodeStored(digest=CODE_BUNDLES[0].digest),
            CodeLoaded(digest=CODE_BUNDLES[0].digest),
        ]
    )
    return encode_message(message)


def valid_frame(rnd: random.Random, slots: int, next_id: list[int]) -> bytes:
    """An encoded random valid message (draws again when the codec refuses what was drawn)."""
    while True:
        try:
            return encode_message(valid_message(rnd, slots, next_id))
        except LocalProtocolError:
            continue


def _streamed_array(rnd: random.Random) -> np.ndarray:
    dtype = rnd.choice(["<f8", ">i4", "u1", "?", "<c16"])
    count = rnd.randrange(STREAM_MIN_BYTES, 4 * STREAM_MIN_BYTES)
    values = np.frombuffer(rnd.randbytes(count * np.dtype(dtype).itemsize), dtype=dtype).copy()
    return values.astype(bool) if dtype == "?" else values


def streamed_frame(rnd: random.Random, slots: int, next_id: list[int], streams: OutgoingStreams) -> bytes:
    """A valid Put or Run whose arrays stream: its frame followed by all its chunks."""
    streams.chunk_bytes = rnd.choice([1, 7, 64, 1000])
    if rnd.random() < 0.5:
        message: Put | Run = Put(object_id=rnd.choice([1, 2, 3]), value=(_streamed_array(rnd), _value(rnd)))
    else:
        next_id[0] += 1
        task = _task(rnd, next_id[0], slots)
        call = KernelCall(name="noop", args=(_streamed_array(rnd), *(_value(rnd) for _ in range(rnd.randrange(2)))))
        message = Run(tasks=(TaskRequest(task_id=task.task_id, slot=task.slot, attempt=1, call=call, code=task.code),))
    try:
        parts = encode_streamed_parts(message, streams)
    except LocalProtocolError:  # a random extra argument the wire cannot carry
        return valid_frame(rnd, slots, next_id)
    return b"".join(bytes(memoryview(part).cast("B")) for part in parts)


def _bad_chunk(rnd: random.Random, streams: OutgoingStreams) -> bytes:
    """A chunk for a stream that is not open, or a streamed-array ext that is malformed."""
    if rnd.random() < 0.6:
        stream_id = rnd.choice([streams.next_id, streams.next_id + 1, max(0, streams.next_id - 1), 2**64 - 1])
        data = rnd.randbytes(rnd.randrange(0, 32))
        frame = b"".join(bytes(p) for p in chunk_frame(stream_id, rnd.choice([0, 1, 2**63]), memoryview(data)))
        return frame
    shape = rnd.choice([(0,), (4,), (1 << 40,), (2, 3)])
    header = b"\x03<f8" + bytes((len(shape),)) + struct.pack(f">{len(shape)}Q", *shape)
    stream_id = rnd.choice([streams.next_id, streams.next_id + 5])
    ext = msgpack.ExtType(EXT_ARRAY_STREAM, header + struct.pack(">Q", stream_id)[: rnd.choice([8, 8, 3])])
    body = msgpack.packb([14, rnd.choice([1, 2, 3]), ext])  # a Put
    return struct.pack(">I", len(body)) + body


def make_frame(
    rnd: random.Random, kind: str, slots: int, next_id: list[int], streams: OutgoingStreams | None = None
) -> bytes:
    """One frame (or frame-like bytes) of `kind`. `streams` numbers streamed arrays: pass one
    per agent session, so that its stream ids continue (a fresh one starts at 0)."""
    if streams is None:
        streams = OutgoingStreams(stream_min_bytes=STREAM_MIN_BYTES)
    if kind == "valid":
        return valid_frame(rnd, slots, next_id)
    if kind == "stream":
        return streamed_frame(rnd, slots, next_id, streams)
    if kind == "chunk":
        return _bad_chunk(rnd, streams)
    if kind == "mutated":
        if rnd.random() < STREAMED_SHARE:
            return mutate(rnd, streamed_frame(rnd, slots, next_id, streams))
        return mutate(rnd, valid_frame(rnd, slots, next_id))
    if kind == "garbage":
        junk = rnd.randbytes(rnd.randrange(1, 64))
        return struct.pack(">I", len(junk)) + junk if rnd.random() < 0.5 else junk
    if kind == "header":
        return struct.pack(">I", rnd.choice([0, DEFAULT_MAX_FRAME_BYTES + 1, 2**32 - 1]))
    if kind == "body":
        return wire_body(rnd)
    if kind == "direction":
        return _wrong_direction(rnd)
    if kind == "shutdown":
        return encode_message(Shutdown(reason="fuzz"))
    raise ValueError(kind)


def is_safe(message: Any) -> bool:
    """Whether the agent may run what `message` asks without side effects we do not want."""
    if isinstance(message, Code):
        return message.digest in SAFE_DIGESTS
    if not isinstance(message, Run):
        return True
    if len(message.tasks) > MAX_TASKS_PER_FRAME:
        return False
    spin = 0.0
    for task in message.tasks:
        call = task.call
        if isinstance(call, BinaryCall):
            if call.path not in SAFE_BINARIES and os.path.exists(call.path):
                return False
            if call.path not in SAFE_BINARIES and "/" not in call.path and call.path:
                return False  # a bare name would be looked up on PATH
        elif call.name == "spin":
            (seconds,) = call.args if len(call.args) == 1 else (None,)
            if not isinstance(seconds, int | float) or seconds != seconds or seconds > MAX_SPIN_S:
                return False
            spin += max(0.0, float(seconds))
        elif call.name != "noop" and (call.name in KNOWN_KERNELS or ":" in call.name):
            return False
        if task.timeout is not None and task.timeout > 60:
            return False
    return spin <= MAX_SPIN_S * 4
