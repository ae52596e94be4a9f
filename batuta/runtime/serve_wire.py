"""The wire between a served coordinator and its viewers: length-prefixed msgpack, no pickle.

Frames are the agent protocol's (batuta/protocol/codec.py): a big-endian uint32 length, then
one msgpack object. Every message is an array whose first element is its tag::

    coordinator -> viewer   ["hello", VERSION, info]     after "attach" (info: see `Info`)
                            ["snapshot", snapshot]       the coordinator's bounded history
                            ["events", [item, ...]]      what happened since, in order
                            ["info", info]               the answer to "info" (`batuta ps`)
                            ["reply", request_id, ok, text]   the answer to "control"
                            ["bye", reason]
    viewer -> coordinator   ["attach", VERSION] | ["info"] | ["control", request_id, action, argument]

An item is a pool event (batuta.runtime.events) or a coordinator note (a log line, a job's
state, the scheduler's status, pause, the polled slot views), each an array
`[kind, field, ...]` with a small integer kind. A task's result travels without its value
and stdout (a dashboard shows neither) and with at most `STDERR_KEPT` bytes of stderr.

Decoding is strict: every field's type is checked and any fault is a `ViewerProtocolError`
naming the field (`events[3].host: expected str, got int`), so a hostile or confused peer
is refused, never half-understood. The encoders only see what the runtime made.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from batuta.errors import ViewerProtocolError
from batuta.runtime import events as pe
from batuta.runtime.views import Backend, SlotView, TaskResult, TaskStatus

VERSION = 2
"""2: a GPU reading carries its device cache (cached values, bytes, cap)."""
HEADER = struct.Struct(">I")
VIEWER_FRAME_LIMIT = 64 * 1024  # what a viewer may send: requests only
COORDINATOR_FRAME_LIMIT = 256 * 1024 * 1024  # a snapshot of a big cluster, with room to spare
STDERR_KEPT = 4096

# item kinds
QUEUED, STARTED, REQUEUED, FINISHED = 1, 2, 3, 4
HOST_UP, HOST_STATE, HOST_DOWN, TELEMETRY, SLOT_STATE = 5, 6, 7, 8, 9
LOG, JOB, STATUS, PAUSED, SLOTS = 20, 21, 22, 23, 24
TASK_KINDS = frozenset({QUEUED, STARTED, REQUEUED, FINISHED})
CONTROL_ACTIONS = frozenset({"pause", "resume", "cancel_job", "drain_host", "undrain_host", "stop"})

_STATUSES = {status.value: status for status in TaskStatus}
_BACKENDS = {backend.value: backend for backend in Backend}


# -- coordinator notes: what a viewer learns besides the pool's events ---------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class LogNoted:
    level: int
    logger: str
    message: str
    created: float


@dataclass(frozen=True, slots=True, kw_only=True)
class JobChanged:
    """A job started or ended (`state`: running, done, failed, cancelled)."""

    name: str
    origin: str
    state: str
    message: str
    started_at: float | None
    ended_at: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusChanged:
    status: str  # starting | running | failed | closed
    detail: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PausedChanged:
    paused: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class SlotsPolled:
    views: tuple[SlotView, ...]


Note = LogNoted | JobChanged | StatusChanged | PausedChanged | SlotsPolled


# -- frames ---------------------------------------------------------------------------------


def frame(message: Sequence[Any]) -> bytes:
    """One message as a frame (length prefix and msgpack body)."""
    body = msgpack.packb(message, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def _no_ext(code: int, data: bytes) -> object:
    raise ViewerProtocolError(f"msgpack extension type {code} is not part of the viewer protocol")


class FrameReader:
    """Bytes in, messages (lists with a str tag first) out; a fault ends the stream for good."""

    __slots__ = ("_buf", "_failure", "_limit")

    def __init__(self, limit: int) -> None:
        self._buf = bytearray()
        self._limit = limit
        self._failure: str | None = None

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next(self) -> list[Any] | None:
        if self._failure is not None:
            raise ViewerProtocolError(f"stream unusable after an earlier error: {self._failure}")
        buf = self._buf
        if len(buf) < 4:
            return None
        (size,) = HEADER.unpack_from(buf)
        if size == 0 or size > self._limit:
            self._failure = f"frame of {size} bytes is outside 1..{self._limit}"
            raise ViewerProtocolError(self._failure)
        if len(buf) < size + 4:
            return None
        body = bytes(buf[4 : size + 4])
        del buf[: size + 4]
        try:
            message = msgpack.unpackb(body, raw=False, strict_map_key=True, ext_hook=_no_ext, use_list=True)
        except ViewerProtocolError as exc:
            self._failure = str(exc)
            raise
        except Exception as exc:  # nothing but a protocol error may escape a hostile stream
            # msgpack's FormatError and ExtraData say nothing of their own: the type is the reason
            self._failure = f"cannot decode frame: {type(exc).__name__}" + (
                f": {exc}" if str(exc) else " (not msgpack)"
            )
            raise ViewerProtocolError(self._failure) from exc
        if not isinstance(message, list) or not message or not isinstance(message[0], str):
            self._failure = "a message must be an array starting with its tag"
            raise ViewerProtocolError(self._failure)
        return message


# -- field checks ---------------------------------------------------------------------------


def _fail(where: str, expected: str, value: object) -> ViewerProtocolError:
    return ViewerProtocolError(f"{where}: expected {expected}, got {type(value).__name__}")


def want_str(value: object, where: str) -> str:
    if type(value) is not str:
        raise _fail(where, "str", value)
    return value


def want_int(value: object, where: str) -> int:
    if type(value) is not int:
        raise _fail(where, "int", value)
    return value


def want_count(value: object, where: str) -> int:
    """An int >= 0: a count, or a size in bytes."""
    if type(value) is not int:
        raise _fail(where, "int", value)
    if value < 0:
        raise ViewerProtocolError(f"{where}: expected an int >= 0, got {value}")
    return value


def want_bool(value: object, where: str) -> bool:
    if type(value) is not bool:
        raise _fail(where, "bool", value)
    return value


def want_float(value: object, where: str) -> float:
    if type(value) is float or type(value) is int:
        return float(value)
    raise _fail(where, "number", value)


def want_list(value: object, where: str, length: int | None = None) -> list[Any]:
    if type(value) is not list:
        raise _fail(where, "array", value)
    if length is not None and len(value) != length:
        raise ViewerProtocolError(f"{where}: expected {length} fields, got {len(value)}")
    return value


def want_map(value: object, where: str) -> dict[str, Any]:
    if type(value) is not dict:
        raise _fail(where, "map", value)
    return value


def _opt(check: Callable[[object, str], Any]) -> Callable[[object, str], Any]:
    def optional(value: object, where: str) -> Any:
        return None if value is None else check(value, where)

    return optional


opt_str = _opt(want_str)
opt_float = _opt(want_float)
opt_int = _opt(want_int)


def _str_tuple(value: object, where: str) -> tuple[str, ...]:
    return tuple(want_str(v, f"{where}[{i}]") for i, v in enumerate(want_list(value, where)))


# -- items: encoding ------------------------------------------------------------------------


def encode_result(result: TaskResult, at: float) -> list[Any]:
    failed = result.status is not TaskStatus.SUCCEEDED
    return [
        FINISHED,
        result.task_id,
        result.name,
        result.status.value,
        result.error,
        float(result.duration),
        float(result.queue_wait),
        result.host,
        result.slot,
        result.attempts,
        result.backend.value if result.backend is not None else None,
        result.job,
        bytes(result.stderr[-STDERR_KEPT:]) if failed else b"",
        at,
    ]


def encode_item(item: pe.PoolEvent | Note) -> list[Any]:
    """A pool event or coordinator note as a wire array (see the module docstring)."""
    if type(item) is pe.TaskFinished:  # the most frequent item first, by exact type
        return encode_result(item.result, item.at)
    if isinstance(item, pe.TaskQueued):
        return [
            QUEUED,
            item.task_id,
            item.name,
            item.backend,
            item.at,
            item.backend_reason,
            item.job,
            list(item.waiting_on),
        ]
    if isinstance(item, pe.TaskStarted):
        return [STARTED, item.task_id, item.name, item.host, item.slot, item.attempt, item.at, item.job]
    if isinstance(item, pe.TaskRequeued):
        return [REQUEUED, item.task_id, item.name, item.slot, item.attempts, item.reason, item.at, item.job]
    if isinstance(item, pe.HostUp):
        return [
            HOST_UP,
            item.host,
            list(item.slots),
            list(item.gpus),
            item.cpu_count,
            item.batuta_version,
            item.python_version,
            item.at,
        ]
    if isinstance(item, pe.HostStateChanged):
        return [HOST_STATE, item.host, item.state, item.reason, item.at]
    if isinstance(item, pe.HostDown):
        return [HOST_DOWN, item.host, item.reason, item.at]
    if isinstance(item, pe.HostTelemetry):
        gpus = [
            [
                g.index,
                g.name,
                g.utilization,
                g.memory_used,
                g.memory_total,
                g.temperature,
                g.power,
                g.cached_values,
                g.cached_bytes,
                g.cache_cap,
            ]
            for g in item.gpus
        ]
        return [
            TELEMETRY,
            item.host,
            item.cpu_percent,
            item.memory_used,
            item.memory_total,
            gpus,
            item.gpu_status,
            item.at,
            item.objects,
            item.object_bytes,
            item.spilled_bytes,
        ]
    if isinstance(item, pe.SlotStateChanged):
        return [SLOT_STATE, item.host, item.slot, item.state, item.reason, item.at]
    if isinstance(item, LogNoted):
        return [LOG, item.level, item.logger, item.message, item.created]
    if isinstance(item, JobChanged):
        return [JOB, item.name, item.origin, item.state, item.message, item.started_at, item.ended_at]
    if isinstance(item, StatusChanged):
        return [STATUS, item.status, item.detail]
    if isinstance(item, PausedChanged):
        return [PAUSED, item.paused]
    if isinstance(item, SlotsPolled):
        return [SLOTS, [_encode_slot(v) for v in item.views]]
    raise TypeError(f"not a pool event or coordinator note: {type(item).__name__}")


def _encode_slot(v: SlotView) -> list[Any]:
    return [
        v.slot_id,
        v.host_id,
        sorted(v.capabilities),
        v.state,
        v.deque_depth,
        v.in_flight,
        v.window_limit,
        v.steals_in,
        v.steals_out,
        v.completed,
        v.mean_run_s,
    ]


# -- items: decoding ------------------------------------------------------------------------


def _dec_queued(w: list[Any], at: str) -> pe.TaskQueued:
    want_list(w, at, 8)
    return pe.TaskQueued(
        task_id=want_int(w[1], f"{at}.task_id"),
        name=want_str(w[2], f"{at}.name"),
        backend=want_str(w[3], f"{at}.backend"),
        at=want_float(w[4], f"{at}.at"),
        backend_reason=want_str(w[5], f"{at}.backend_reason"),
        job=want_str(w[6], f"{at}.job"),
        waiting_on=tuple(
            want_int(t, f"{at}.waiting_on[{i}]") for i, t in enumerate(want_list(w[7], f"{at}.waiting_on"))
        ),
    )


def _dec_started(w: list[Any], at: str) -> pe.TaskStarted:
    want_list(w, at, 8)
    return pe.TaskStarted(
        task_id=want_int(w[1], f"{at}.task_id"),
        name=want_str(w[2], f"{at}.name"),
        host=want_str(w[3], f"{at}.host"),
        slot=want_str(w[4], f"{at}.slot"),
        attempt=want_int(w[5], f"{at}.attempt"),
        at=want_float(w[6], f"{at}.at"),
        job=want_str(w[7], f"{at}.job"),
    )


def _dec_requeued(w: list[Any], at: str) -> pe.TaskRequeued:
    want_list(w, at, 8)
    return pe.TaskRequeued(
        task_id=want_int(w[1], f"{at}.task_id"),
        name=want_str(w[2], f"{at}.name"),
        slot=want_str(w[3], f"{at}.slot"),
        attempts=want_int(w[4], f"{at}.attempts"),
        reason=want_str(w[5], f"{at}.reason"),
        at=want_float(w[6], f"{at}.at"),
        job=want_str(w[7], f"{at}.job"),
    )


def _dec_finished(w: list[Any], at: str) -> pe.TaskFinished:
    want_list(w, at, 14)
    status = _STATUSES.get(want_str(w[3], f"{at}.status"))
    if status is None:
        raise ViewerProtocolError(f"{at}.status: unknown status {w[3]!r}")
    backend_name = opt_str(w[10], f"{at}.backend")
    backend = None if backend_name is None else _BACKENDS.get(backend_name)
    if backend_name is not None and backend is None:
        raise ViewerProtocolError(f"{at}.backend: unknown backend {backend_name!r}")
    stderr = w[12]
    if type(stderr) is not bytes:
        raise _fail(f"{at}.stderr", "bin", stderr)
    result = TaskResult(
        task_id=want_int(w[1], f"{at}.task_id"),
        name=want_str(w[2], f"{at}.name"),
        status=status,
        error=opt_str(w[4], f"{at}.error"),
        duration=want_float(w[5], f"{at}.duration"),
        queue_wait=want_float(w[6], f"{at}.queue_wait"),
        host=opt_str(w[7], f"{at}.host"),
        slot=opt_str(w[8], f"{at}.slot"),
        attempts=want_int(w[9], f"{at}.attempts"),
        backend=backend,
        job=want_str(w[11], f"{at}.job"),
        stderr=stderr,
    )
    return pe.TaskFinished(result=result, at=want_float(w[13], f"{at}.at"))


def _dec_host_up(w: list[Any], at: str) -> pe.HostUp:
    want_list(w, at, 8)
    return pe.HostUp(
        host=want_str(w[1], f"{at}.host"),
        slots=_str_tuple(w[2], f"{at}.slots"),
        gpus=_str_tuple(w[3], f"{at}.gpus"),
        cpu_count=want_int(w[4], f"{at}.cpu_count"),
        batuta_version=want_str(w[5], f"{at}.batuta_version"),
        python_version=want_str(w[6], f"{at}.python_version"),
        at=want_float(w[7], f"{at}.at"),
    )


def _dec_host_state(w: list[Any], at: str) -> pe.HostStateChanged:
    want_list(w, at, 5)
    return pe.HostStateChanged(
        host=want_str(w[1], f"{at}.host"),
        state=want_str(w[2], f"{at}.state"),
        reason=want_str(w[3], f"{at}.reason"),
        at=want_float(w[4], f"{at}.at"),
    )


def _dec_host_down(w: list[Any], at: str) -> pe.HostDown:
    want_list(w, at, 4)
    return pe.HostDown(
        host=want_str(w[1], f"{at}.host"), reason=want_str(w[2], f"{at}.reason"), at=want_float(w[3], f"{at}.at")
    )


def _dec_gpu(w: object, at: str) -> pe.GpuReading:
    w = want_list(w, at, 10)
    return pe.GpuReading(
        index=want_int(w[0], f"{at}.index"),
        name=want_str(w[1], f"{at}.name"),
        utilization=opt_float(w[2], f"{at}.utilization"),
        memory_used=opt_int(w[3], f"{at}.memory_used"),
        memory_total=opt_int(w[4], f"{at}.memory_total"),
        temperature=opt_float(w[5], f"{at}.temperature"),
        power=opt_float(w[6], f"{at}.power"),
        cached_values=want_count(w[7], f"{at}.cached_values"),
        cached_bytes=want_count(w[8], f"{at}.cached_bytes"),
        cache_cap=want_count(w[9], f"{at}.cache_cap"),
    )


def _dec_telemetry(w: list[Any], at: str) -> pe.HostTelemetry:
    want_list(w, at, 11)
    gpus = tuple(_dec_gpu(g, f"{at}.gpus[{i}]") for i, g in enumerate(want_list(w[5], f"{at}.gpus")))
    return pe.HostTelemetry(
        host=want_str(w[1], f"{at}.host"),
        cpu_percent=want_float(w[2], f"{at}.cpu_percent"),
        memory_used=want_int(w[3], f"{at}.memory_used"),
        memory_total=want_int(w[4], f"{at}.memory_total"),
        gpus=gpus,
        gpu_status=want_str(w[6], f"{at}.gpu_status"),
        at=want_float(w[7], f"{at}.at"),
        objects=want_int(w[8], f"{at}.objects"),
        object_bytes=want_int(w[9], f"{at}.object_bytes"),
        spilled_bytes=want_int(w[10], f"{at}.spilled_bytes"),
    )


def _dec_slot_state(w: list[Any], at: str) -> pe.SlotStateChanged:
    want_list(w, at, 6)
    return pe.SlotStateChanged(
        host=want_str(w[1], f"{at}.host"),
        slot=want_str(w[2], f"{at}.slot"),
        state=want_str(w[3], f"{at}.state"),
        reason=want_str(w[4], f"{at}.reason"),
        at=want_float(w[5], f"{at}.at"),
    )


def _dec_log(w: list[Any], at: str) -> LogNoted:
    want_list(w, at, 5)
    return LogNoted(
        level=want_int(w[1], f"{at}.level"),
        logger=want_str(w[2], f"{at}.logger"),
        message=want_str(w[3], f"{at}.message"),
        created=want_float(w[4], f"{at}.created"),
    )


def _dec_job(w: list[Any], at: str) -> JobChanged:
    want_list(w, at, 7)
    return JobChanged(
        name=want_str(w[1], f"{at}.name"),
        origin=want_str(w[2], f"{at}.origin"),
        state=want_str(w[3], f"{at}.state"),
        message=want_str(w[4], f"{at}.message"),
        started_at=opt_float(w[5], f"{at}.started_at"),
        ended_at=opt_float(w[6], f"{at}.ended_at"),
    )


def _dec_status(w: list[Any], at: str) -> StatusChanged:
    want_list(w, at, 3)
    return StatusChanged(status=want_str(w[1], f"{at}.status"), detail=want_str(w[2], f"{at}.detail"))


def _dec_paused(w: list[Any], at: str) -> PausedChanged:
    want_list(w, at, 2)
    return PausedChanged(paused=want_bool(w[1], f"{at}.paused"))


def _dec_slot(w: object, at: str) -> SlotView:
    w = want_list(w, at, 11)
    return SlotView(
        slot_id=want_str(w[0], f"{at}.slot_id"),
        host_id=want_str(w[1], f"{at}.host_id"),
        capabilities=frozenset(_str_tuple(w[2], f"{at}.capabilities")),
        state=want_str(w[3], f"{at}.state"),
        deque_depth=want_int(w[4], f"{at}.deque_depth"),
        in_flight=want_int(w[5], f"{at}.in_flight"),
        window_limit=want_int(w[6], f"{at}.window_limit"),
        steals_in=want_int(w[7], f"{at}.steals_in"),
        steals_out=want_int(w[8], f"{at}.steals_out"),
        completed=want_int(w[9], f"{at}.completed"),
        mean_run_s=opt_float(w[10], f"{at}.mean_run_s"),
    )


def _dec_slots(w: list[Any], at: str) -> SlotsPolled:
    want_list(w, at, 2)
    return SlotsPolled(views=tuple(_dec_slot(v, f"{at}.views[{i}]") for i, v in enumerate(want_list(w[1], at))))


_DECODERS: dict[int, Callable[[list[Any], str], pe.PoolEvent | Note]] = {
    QUEUED: _dec_queued,
    STARTED: _dec_started,
    REQUEUED: _dec_requeued,
    FINISHED: _dec_finished,
    HOST_UP: _dec_host_up,
    HOST_STATE: _dec_host_state,
    HOST_DOWN: _dec_host_down,
    TELEMETRY: _dec_telemetry,
    SLOT_STATE: _dec_slot_state,
    LOG: _dec_log,
    JOB: _dec_job,
    STATUS: _dec_status,
    PAUSED: _dec_paused,
    SLOTS: _dec_slots,
}


def decode_item(wire: object, where: str) -> pe.PoolEvent | Note:
    if type(wire) is not list or not wire:
        raise _fail(where, "a non-empty array", wire)
    decoder = _DECODERS.get(wire[0]) if type(wire[0]) is int else None
    if decoder is None:
        raise ViewerProtocolError(f"{where}: unknown item kind {wire[0]!r}")
    return decoder(wire, where)


def decode_items(wire: object, where: str) -> list[pe.PoolEvent | Note]:
    return [decode_item(item, f"{where}[{i}]") for i, item in enumerate(want_list(wire, where))]


# -- viewer requests ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Control:
    """A viewer asks the coordinator to pause, resume, cancel a job, drain a host, or stop."""

    request_id: int
    action: str
    argument: str


def decode_request(message: list[Any]) -> tuple[str, int | Control]:
    """("attach", version) | ("info", 0) | ("control", Control); anything else is refused."""
    tag = message[0]
    if tag == "attach":
        want_list(message, "attach", 2)
        return "attach", want_int(message[1], "attach.version")
    if tag == "info":
        want_list(message, "info", 1)
        return "info", 0
    if tag == "control":
        want_list(message, "control", 4)
        action = want_str(message[2], "control.action")
        if action not in CONTROL_ACTIONS:
            raise ViewerProtocolError(f"control.action: unknown action {action!r}; one of {sorted(CONTROL_ACTIONS)}")
        argument = want_str(message[3], "control.argument")
        if len(argument) > 1024:
            raise ViewerProtocolError("control.argument: longer than 1024 characters")
        return "control", Control(
            request_id=want_int(message[1], "control.request_id"), action=action, argument=argument
        )
    raise ViewerProtocolError(f"unknown request {tag!r}; a viewer sends attach, info or control")
