"""Messages to wire arrays and back: one explicit encoder and decoder per message type.

A message is `[tag, field1, field2, ...]` with `TAGS[type]` and the fields in dataclass order
(`messages.py`). Nested records (TaskRequest, TaskOutcome, SlotInfo, GpuInfo, GpuSample) are
arrays of their fields, without a tag; a call is `[0, name, args]` (KernelCall) or
`[1, path, args, env, cwd]` (BinaryCall); a CodeFile is `[path, bytes]`. Field counts are
fixed but for optional trailing fields. Kernel arguments and results are values (`_values.py`).

`to_wire()` raises LocalProtocolError and `from_wire()` RemoteProtocolError, both naming the
field at fault (`Done.results[3].status: unknown status 'weird'`). The same validators
(`_fields.py`) run both ways, so whatever encodes also decodes. The tags are in `_tags.py`, the
Code messages' encoders and decoders in `_wire_code.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NoReturn

from batuta.core.task import Backend, BinaryCall, KernelCall, Outcome
from batuta.protocol._fields import (
    Invalid,
    bytes_,
    check_len,
    choice,
    describe,
    digest,
    expected,
    flag,
    float_,
    ids,
    name,
    opt_float,
    opt_int,
    opt_str,
    opt_uint,
    posint,
    records,
    str_,
    str_map,
    strs,
    uint,
)
from batuta.protocol._tags import CALL_BINARY, CALL_KERNEL, TAGS
from batuta.protocol._values import OobWriter, decode_args, decode_value, encode_args, encode_value
from batuta.protocol._wire_code import (
    MAX_CODE_FILES,
    MAX_CODE_MODULES,
    dec_code,
    dec_code_loaded,
    dec_code_stored,
    enc_code,
    enc_code_loaded,
    enc_code_stored,
    module_digests,
)
from batuta.protocol.errors import LocalProtocolError, RemoteProtocolError
from batuta.protocol.messages import (
    DATA_LINK_ENCRYPTIONS,
    SLOT_DOWN,
    SLOT_RESTARTING,
    SLOT_UP,
    Bye,
    Cancel,
    Code,
    CodeLoaded,
    CodeStored,
    DataLink,
    Done,
    Drop,
    Error,
    Fetch,
    GpuCache,
    GpuInfo,
    GpuSample,
    Heartbeat,
    Hello,
    Keepalive,
    Message,
    ObjectsLost,
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
)

__all__ = ["CALL_BINARY", "CALL_KERNEL", "MAX_CODE_FILES", "MAX_CODE_MODULES", "TAGS", "from_wire", "to_wire"]


DATA_LINK_SECRET_BYTES, _LINK_FIELDS = 32, ("port", "token", "fingerprint", "encryption")  # secrets: 32 bytes

_BACKENDS = frozenset(b.value for b in Backend if b is not Backend.AUTO)
_SLOT_STATES = frozenset({SLOT_UP, SLOT_RESTARTING, SLOT_DOWN})
_OUTCOME_OF_VALUE: dict[str, Outcome] = {outcome.value: outcome for outcome in Outcome}
_OUTCOME_VALUES = frozenset(_OUTCOME_OF_VALUE)


def _refuse_status(status: Any) -> NoReturn:
    """Refuse a TaskOutcome status that is not an Outcome: the wire carries its string
    value, but the sender names the outcome itself (`Outcome.OK`, not "ok")."""
    if isinstance(status, str) and status not in _OUTCOME_VALUES:
        choice(status, ".status", _OUTCOME_VALUES, "status")  # raises: unknown status 'x' (known: ...)
    raise expected(".status", "an Outcome", status)


def _slot_setters(cls: type) -> tuple[Callable[[object, Any], None], ...]:
    """The slot setters of a frozen, slotted dataclass, in field order. Decoding builds hundreds of
    TaskRequests or TaskOutcomes per frame; the generated frozen `__init__` costs about three times
    as much as setting slots. The messages have no `__post_init__` (the codec validates), as checked."""
    if hasattr(cls, "__post_init__") or "__slots__" not in cls.__dict__:
        raise TypeError(f"{cls.__name__}: fast construction needs slots and no __post_init__")
    return tuple(cls.__dict__[f.name].__set__ for f in dataclasses.fields(cls))


_new = object.__new__
_TR_TASK_ID, _TR_SLOT, _TR_ATTEMPT, _TR_CALL, _TR_TIMEOUT, _TR_BACKEND, _TR_CODE, _TR_KEEP, _TR_TAIL = _slot_setters(
    TaskRequest
)
_KC_NAME, _KC_ARGS = _slot_setters(KernelCall)
(
    _TO_TASK_ID,
    _TO_SLOT,
    _TO_ATTEMPT,
    _TO_STATUS,
    _TO_VALUE,
    _TO_STDOUT,
    _TO_STDERR,
    _TO_EXIT_CODE,
    _TO_ERROR,
    _TO_RUN_S,
) = _slot_setters(TaskOutcome)


# -- messages: encoders (each returns the message's wire array; records are untagged arrays) --


def _enc_slot_info(s: Any) -> list[Any]:
    if type(s) is not SlotInfo:
        raise expected("", "a SlotInfo", s)
    return [
        uint(s.slot, ".slot"),
        strs(s.capabilities, ".capabilities"),
        opt_uint(s.gpu_index, ".gpu_index"),
    ]


def _enc_gpu_info(g: Any) -> list[Any]:
    if type(g) is not GpuInfo:
        raise expected("", "a GpuInfo", g)
    return [
        uint(g.index, ".index"),
        str_(g.name, ".name"),
        str_(g.uuid, ".uuid"),
        uint(g.memory_total, ".memory_total"),
        uint(g.compute_units, ".compute_units"),
    ]


def _enc_hello(m: Hello, oob: OobWriter) -> list[Any]:
    return [
        TAGS[Hello],
        uint(m.protocol, ".protocol"),
        str_(m.batuta_version, ".batuta_version"),
        str_(m.python_version, ".python_version"),
        str_(m.hostname, ".hostname"),
        uint(m.pid, ".pid"),
        uint(m.cpu_count, ".cpu_count"),
        records(_enc_slot_info, m.slots, ".slots"),
        records(_enc_gpu_info, m.gpus, ".gpus"),
        str_map(m.packages, ".packages"),
        module_digests(m.modules, ".modules"),
    ]


def _enc_welcome(m: Welcome, oob: OobWriter) -> list[Any]:
    return [
        TAGS[Welcome],
        uint(m.protocol, ".protocol"),
        float_(m.heartbeat_interval, ".heartbeat_interval", positive=True),
        float_(m.silence_limit, ".silence_limit", minimum=0.0),
    ]


def _enc_call(call: Any, oob: OobWriter) -> list[Any]:
    if type(call) is KernelCall:
        return [CALL_KERNEL, name(call.name, ".call.name"), encode_args(call.args, oob, ".call.args")]
    if type(call) is BinaryCall:
        return [
            CALL_BINARY,
            name(call.path, ".call.path"),
            strs(call.args, ".call.args"),
            str_map(call.env, ".call.env"),
            opt_str(call.cwd, ".call.cwd"),
        ]
    raise expected(".call", "a KernelCall or BinaryCall", call)


def _enc_run(m: Run, oob: OobWriter) -> list[Any]:
    def task(t: Any) -> list[Any]:
        if type(t) is not TaskRequest:
            raise expected("", "a TaskRequest", t)
        timeout = t.timeout
        return [
            uint(t.task_id, ".task_id"),
            uint(t.slot, ".slot"),
            posint(t.attempt, ".attempt"),
            _enc_call(t.call, oob),
            None if timeout is None else float_(timeout, ".timeout", positive=True),
            choice(t.backend, ".backend", _BACKENDS, "backend"),
            digest(t.code, ".code", empty=True),
            *((uint(t.keep, ".keep"), True) if t.tail else (uint(t.keep, ".keep"),) if t.keep else ()),
        ]

    return [TAGS[Run], records(task, m.tasks, ".tasks")]


def _enc_started(m: Started, oob: OobWriter) -> list[Any]:
    return [TAGS[Started], ids(m.task_ids, ".task_ids")]


def _enc_done(m: Done, oob: OobWriter) -> list[Any]:
    def outcome(o: Any) -> list[Any]:
        if type(o) is not TaskOutcome:
            raise expected("", "a TaskOutcome", o)
        try:
            value = encode_value(o.value, oob, 0)
        except Invalid as exc:
            raise exc.at(".value") from None
        status = o.status
        return [
            uint(o.task_id, ".task_id"),
            uint(o.slot, ".slot"),
            posint(o.attempt, ".attempt"),
            status._value_ if type(status) is Outcome else _refuse_status(status),  # _value_: .value, minus its cost
            value,
            bytes_(o.stdout, ".stdout"),
            bytes_(o.stderr, ".stderr"),
            opt_int(o.exit_code, ".exit_code"),
            opt_str(o.error, ".error"),
            float_(o.run_s, ".run_s", minimum=0.0),
        ]

    return [TAGS[Done], records(outcome, m.results, ".results")]


def _enc_steal_back(m: StealBack, oob: OobWriter) -> list[Any]:
    return [TAGS[StealBack], uint(m.slot, ".slot"), ids(m.task_ids, ".task_ids")]


def _enc_steal_back_reply(m: StealBackReply, oob: OobWriter) -> list[Any]:
    return [TAGS[StealBackReply], uint(m.slot, ".slot"), ids(m.returned, ".returned"), ids(m.refused, ".refused")]


def _enc_put(m: Put, oob: OobWriter) -> list[Any]:
    try:
        value = encode_value(m.value, oob, 0)
    except Invalid as exc:
        raise exc.at(".value") from None
    return [TAGS[Put], uint(m.object_id, ".object_id"), value]


def _enc_fetch(m: Fetch, oob: OobWriter) -> list[Any]:
    return [TAGS[Fetch], uint(m.object_id, ".object_id"), uint(m.request_id, ".request_id"), *(True,) * m.lend]


def _enc_drop(m: Drop, oob: OobWriter) -> list[Any]:
    return [TAGS[Drop], ids(m.object_ids, ".object_ids")]


def _enc_cancel(m: Cancel, oob: OobWriter) -> list[Any]:
    return [TAGS[Cancel], ids(m.task_ids, ".task_ids")]


def _enc_objects_lost(m: ObjectsLost, oob: OobWriter) -> list[Any]:
    return [TAGS[ObjectsLost], ids(m.object_ids, ".object_ids"), str_(m.reason, ".reason")]


def _enc_slot_changed(m: SlotChanged, oob: OobWriter) -> list[Any]:
    return [
        TAGS[SlotChanged],
        uint(m.slot, ".slot"),
        choice(m.state, ".state", _SLOT_STATES, "slot state"),
        str_(m.reason, ".reason"),
    ]


def _enc_gpu_sample(g: Any) -> list[Any]:
    if type(g) is not GpuSample:
        raise expected("", "a GpuSample", g)
    return [
        uint(g.index, ".index"),
        opt_float(g.utilization, ".utilization", minimum=0.0),
        opt_uint(g.memory_used, ".memory_used"),
        opt_uint(g.memory_total, ".memory_total"),
        opt_float(g.temperature, ".temperature"),
        opt_float(g.power, ".power", minimum=0.0),
        uint(g.cached_values, ".cached_values"),
        uint(g.cached_bytes, ".cached_bytes"),
        uint(g.cache_cap, ".cache_cap"),
    ]


def _enc_gpu_cache(m: GpuCache, oob: OobWriter) -> list[Any]:
    return [
        TAGS[GpuCache],
        uint(m.slot, ".slot"),
        uint(m.values, ".values"),
        uint(m.nbytes, ".nbytes"),
        uint(m.cap, ".cap"),
    ]


def _enc_heartbeat(m: Heartbeat, oob: OobWriter) -> list[Any]:
    return [
        TAGS[Heartbeat],
        uint(m.seq, ".seq"),
        float_(m.cpu_percent, ".cpu_percent", minimum=0.0),
        uint(m.memory_used, ".memory_used"),
        uint(m.memory_total, ".memory_total"),
        records(_enc_gpu_sample, m.gpus, ".gpus"),
        str_(m.gpu_status, ".gpu_status"),
        uint(m.objects, ".objects"),
        uint(m.object_bytes, ".object_bytes"),
        uint(m.spilled_bytes, ".spilled_bytes"),
        uint(m.slot_object_bytes, ".slot_object_bytes"),
    ]


def _link_field(x: Any, field: str) -> Any:  # a DataLink's port, token, fingerprint or encryption
    if field == ".encryption":
        return choice(x, field, DATA_LINK_ENCRYPTIONS, "data link encryption")
    if field == ".port" and not 1 <= uint(x, field) <= 65535:
        raise Invalid(field, f"must be a TCP port (1 to 65535), got {x}")
    if field != ".port" and len(bytes_(x, field)) != DATA_LINK_SECRET_BYTES:
        raise Invalid(field, f"must be {DATA_LINK_SECRET_BYTES} bytes, got {len(x)}")
    return x if field == ".port" else bytes(x)


def _enc_data_link(m: DataLink, oob: OobWriter) -> list[Any]:
    return [TAGS[DataLink], str_(m.host, ".host"), *(_link_field(getattr(m, f), f".{f}") for f in _LINK_FIELDS)]


def _enc_keepalive(m: Keepalive, oob: OobWriter) -> list[Any]:
    return [TAGS[Keepalive]]


def _enc_shutdown(m: Shutdown, oob: OobWriter) -> list[Any]:
    return [TAGS[Shutdown], str_(m.reason, ".reason")]


def _enc_bye(m: Bye, oob: OobWriter) -> list[Any]:
    return [TAGS[Bye], str_(m.reason, ".reason")]


def _enc_error(m: Error, oob: OobWriter) -> list[Any]:
    return [TAGS[Error], str_(m.message, ".message")]


_ENCODERS: dict[type, Callable[[Any, OobWriter], list[Any]]] = {
    Hello: _enc_hello,
    Welcome: _enc_welcome,
    Code: enc_code,
    CodeStored: enc_code_stored,
    CodeLoaded: enc_code_loaded,
    Run: _enc_run,
    Started: _enc_started,
    Done: _enc_done,
    StealBack: _enc_steal_back,
    StealBackReply: _enc_steal_back_reply,
    Cancel: _enc_cancel,
    Put: _enc_put,
    Drop: _enc_drop,
    Fetch: _enc_fetch,
    SlotChanged: _enc_slot_changed,
    ObjectsLost: _enc_objects_lost,
    GpuCache: _enc_gpu_cache,
    Heartbeat: _enc_heartbeat,
    DataLink: _enc_data_link,
    Keepalive: _enc_keepalive,
    Shutdown: _enc_shutdown,
    Bye: _enc_bye,
    Error: _enc_error,
}


# -- messages: decoders ----------------------------------------------------------------------
# Each takes the message's wire array, its length already checked against _DECODERS.


def _dec_slot_info(w: Any) -> SlotInfo:
    slot, capabilities, gpu_index = check_len(w, 3, "SlotInfo")
    return SlotInfo(
        slot=uint(slot, ".slot"),
        capabilities=tuple(strs(capabilities, ".capabilities")),
        gpu_index=opt_uint(gpu_index, ".gpu_index"),
    )


def _dec_gpu_info(w: Any) -> GpuInfo:
    index, gpu_name, uuid, memory_total, compute_units = check_len(w, 5, "GpuInfo")
    return GpuInfo(
        index=uint(index, ".index"),
        name=str_(gpu_name, ".name"),
        uuid=str_(uuid, ".uuid"),
        memory_total=uint(memory_total, ".memory_total"),
        compute_units=uint(compute_units, ".compute_units"),
    )


def _dec_hello(w: list[Any]) -> Hello:
    _, protocol, batuta_version, python_version, hostname, pid, cpu_count, slots, gpus, pkgs, *rest = w
    return Hello(
        protocol=uint(protocol, ".protocol"),
        batuta_version=str_(batuta_version, ".batuta_version"),
        python_version=str_(python_version, ".python_version"),
        hostname=str_(hostname, ".hostname"),
        pid=uint(pid, ".pid"),
        cpu_count=uint(cpu_count, ".cpu_count"),
        slots=tuple(records(_dec_slot_info, slots, ".slots")),
        gpus=tuple(records(_dec_gpu_info, gpus, ".gpus")),
        packages=str_map(pkgs, ".packages"),
        modules=module_digests(rest[0], ".modules") if rest else {},
    )


def _dec_welcome(w: list[Any]) -> Welcome:
    _, protocol, heartbeat_interval, silence_limit = w
    return Welcome(
        protocol=uint(protocol, ".protocol"),
        heartbeat_interval=float_(heartbeat_interval, ".heartbeat_interval", positive=True),
        silence_limit=float_(silence_limit, ".silence_limit", minimum=0.0),
    )


def _dec_call(w: Any) -> KernelCall | BinaryCall:
    if type(w) is list and len(w) == 3 and w[0] == CALL_KERNEL and type(w[0]) is int:
        call = _new(KernelCall)
        _KC_NAME(call, name(w[1], ".call.name"))
        _KC_ARGS(call, decode_args(w[2], ".call.args"))
        return call
    if type(w) is list and len(w) == 5 and w[0] == CALL_BINARY and type(w[0]) is int:
        return BinaryCall(
            path=name(w[1], ".call.path"),
            args=tuple(strs(w[2], ".call.args")),
            env=str_map(w[3], ".call.env"),
            cwd=opt_str(w[4], ".call.cwd"),
        )
    if type(w) is not list or not w or type(w[0]) is not int:
        raise expected(".call", "a call array [kind, ...]", w)
    if w[0] == CALL_KERNEL:
        raise Invalid(".call", f"KernelCall needs 2 fields, got {len(w) - 1}")
    if w[0] == CALL_BINARY:
        raise Invalid(".call", f"BinaryCall needs 4 fields, got {len(w) - 1}")
    raise Invalid(".call", f"unknown call kind {w[0]}")


def _dec_task_request(w: Any) -> TaskRequest:
    keep, tail = 0, False
    if type(w) is list and len(w) in (8, 9):  # TaskRequest.keep, then .tail: sent only when set
        keep, tail, w = uint(w[7], ".keep"), len(w) == 9 and flag(w[8], ".tail"), w[:7]
    if type(w) is not list or len(w) != 7:
        check_len(w, 7, "TaskRequest")
    task_id, slot, attempt, call, timeout, backend, code = w
    task = _new(TaskRequest)
    _TR_KEEP(task, keep)
    _TR_TAIL(task, tail)
    _TR_TASK_ID(task, task_id if type(task_id) is int and task_id >= 0 else uint(task_id, ".task_id"))
    _TR_SLOT(task, slot if type(slot) is int and slot >= 0 else uint(slot, ".slot"))
    _TR_ATTEMPT(task, attempt if type(attempt) is int and attempt >= 1 else posint(attempt, ".attempt"))
    _TR_CALL(task, _dec_call(call))
    _TR_TIMEOUT(task, None if timeout is None else float_(timeout, ".timeout", positive=True))
    _TR_BACKEND(
        task,
        backend if backend in _BACKENDS and type(backend) is str else choice(backend, ".backend", _BACKENDS, "backend"),
    )
    _TR_CODE(task, code if code == "" else digest(code, ".code", empty=True))
    return task


def _dec_run(w: list[Any]) -> Run:
    return Run(tasks=tuple(records(_dec_task_request, w[1], ".tasks")))


def _dec_started(w: list[Any]) -> Started:
    return Started(task_ids=tuple(ids(w[1], ".task_ids")))


def _dec_outcome(w: Any) -> TaskOutcome:
    if type(w) is not list or len(w) != 10:
        check_len(w, 10, "TaskOutcome")
    task_id, slot, attempt, status, value, stdout, stderr, exit_code, error, run_s = w
    out = _new(TaskOutcome)
    _TO_TASK_ID(out, task_id if type(task_id) is int and task_id >= 0 else uint(task_id, ".task_id"))
    _TO_SLOT(out, slot if type(slot) is int and slot >= 0 else uint(slot, ".slot"))
    _TO_ATTEMPT(out, attempt if type(attempt) is int and attempt >= 1 else posint(attempt, ".attempt"))
    outcome = _OUTCOME_OF_VALUE.get(status) if type(status) is str else None
    if outcome is None:
        choice(status, ".status", _OUTCOME_VALUES, "status")  # raises, naming what came instead
    _TO_STATUS(out, outcome)
    try:
        _TO_VALUE(out, decode_value(value, 0))
    except Invalid as exc:
        raise exc.at(".value") from None
    _TO_STDOUT(out, stdout if type(stdout) is bytes else bytes_(stdout, ".stdout"))
    _TO_STDERR(out, stderr if type(stderr) is bytes else bytes_(stderr, ".stderr"))
    _TO_EXIT_CODE(out, opt_int(exit_code, ".exit_code"))
    _TO_ERROR(out, opt_str(error, ".error"))
    _TO_RUN_S(out, float_(run_s, ".run_s", minimum=0.0))
    return out


def _dec_done(w: list[Any]) -> Done:
    return Done(results=tuple(records(_dec_outcome, w[1], ".results")))


def _dec_steal_back(w: list[Any]) -> StealBack:
    return StealBack(slot=uint(w[1], ".slot"), task_ids=tuple(ids(w[2], ".task_ids")))


def _dec_steal_back_reply(w: list[Any]) -> StealBackReply:
    return StealBackReply(
        slot=uint(w[1], ".slot"),
        returned=tuple(ids(w[2], ".returned")),
        refused=tuple(ids(w[3], ".refused")),
    )


def _dec_put(w: list[Any]) -> Put:
    try:
        value = decode_value(w[2], 0)
    except Invalid as exc:
        raise exc.at(".value") from None
    return Put(object_id=uint(w[1], ".object_id"), value=value)


def _dec_fetch(w: list[Any]) -> Fetch:
    lend = len(w) == 4 and flag(w[3], ".lend")
    return Fetch(object_id=uint(w[1], ".object_id"), request_id=uint(w[2], ".request_id"), lend=lend)


def _dec_drop(w: list[Any]) -> Drop:
    return Drop(object_ids=tuple(ids(w[1], ".object_ids")))


def _dec_cancel(w: list[Any]) -> Cancel:
    return Cancel(task_ids=tuple(ids(w[1], ".task_ids")))


def _dec_objects_lost(w: list[Any]) -> ObjectsLost:
    return ObjectsLost(object_ids=tuple(ids(w[1], ".object_ids")), reason=str_(w[2], ".reason"))


def _dec_slot_changed(w: list[Any]) -> SlotChanged:
    return SlotChanged(
        slot=uint(w[1], ".slot"),
        state=choice(w[2], ".state", _SLOT_STATES, "slot state"),
        reason=str_(w[3], ".reason"),
    )


def _dec_gpu_sample(w: Any) -> GpuSample:
    fields = check_len(w, 9, "GpuSample")
    index, utilization, memory_used, memory_total, temperature, power, cached_values, cached_bytes, cache_cap = fields
    return GpuSample(
        index=uint(index, ".index"),
        utilization=opt_float(utilization, ".utilization", minimum=0.0),
        memory_used=opt_uint(memory_used, ".memory_used"),
        memory_total=opt_uint(memory_total, ".memory_total"),
        temperature=opt_float(temperature, ".temperature"),
        power=opt_float(power, ".power", minimum=0.0),
        cached_values=uint(cached_values, ".cached_values"),
        cached_bytes=uint(cached_bytes, ".cached_bytes"),
        cache_cap=uint(cache_cap, ".cache_cap"),
    )


def _dec_gpu_cache(w: list[Any]) -> GpuCache:
    return GpuCache(
        slot=uint(w[1], ".slot"),
        values=uint(w[2], ".values"),
        nbytes=uint(w[3], ".nbytes"),
        cap=uint(w[4], ".cap"),
    )


def _dec_heartbeat(w: list[Any]) -> Heartbeat:
    _, seq, cpu_percent, memory_used, memory_total, gpus, gpu_status, *objects = w
    names = ("objects", "object_bytes", "spilled_bytes", "slot_object_bytes")
    counts = [uint(x, f".{n}") for x, n in zip(objects, names, strict=False)]
    counts += [0] * (4 - len(counts))
    return Heartbeat(
        seq=uint(seq, ".seq"),
        cpu_percent=float_(cpu_percent, ".cpu_percent", minimum=0.0),
        memory_used=uint(memory_used, ".memory_used"),
        memory_total=uint(memory_total, ".memory_total"),
        gpus=tuple(records(_dec_gpu_sample, gpus, ".gpus")),
        gpu_status=str_(gpu_status, ".gpu_status"),
        objects=counts[0],
        object_bytes=counts[1],
        spilled_bytes=counts[2],
        slot_object_bytes=counts[3],
    )


def _dec_data_link(w: list[Any]) -> DataLink:
    return DataLink(host=str_(w[1], ".host"), **{f: _link_field(w[i], f".{f}") for i, f in enumerate(_LINK_FIELDS, 2)})


def _dec_keepalive(w: list[Any]) -> Keepalive:
    return Keepalive()


def _dec_shutdown(w: list[Any]) -> Shutdown:
    return Shutdown(reason=str_(w[1], ".reason"))


def _dec_bye(w: list[Any]) -> Bye:
    return Bye(reason=str_(w[1], ".reason"))


def _dec_error(w: list[Any]) -> Error:
    return Error(message=str_(w[1], ".message"))


_DECODER_FNS: list[tuple[type, Callable[[list[Any]], Message]]] = [
    (Hello, _dec_hello),
    (Welcome, _dec_welcome),
    (Code, dec_code),
    (CodeStored, dec_code_stored),
    (CodeLoaded, dec_code_loaded),
    (Run, _dec_run),
    (Started, _dec_started),
    (Done, _dec_done),
    (StealBack, _dec_steal_back),
    (StealBackReply, _dec_steal_back_reply),
    (Cancel, _dec_cancel),
    (Put, _dec_put),
    (Drop, _dec_drop),
    (Fetch, _dec_fetch),
    (SlotChanged, _dec_slot_changed),
    (ObjectsLost, _dec_objects_lost),
    (GpuCache, _dec_gpu_cache),
    (Heartbeat, _dec_heartbeat),
    (DataLink, _dec_data_link),
    (Keepalive, _dec_keepalive),
    (Shutdown, _dec_shutdown),
    (Bye, _dec_bye),
    (Error, _dec_error),
]
_OPTIONAL_TRAILING: dict[type, int] = {Hello: 1, Heartbeat: 4, Fetch: 1}
"""Trailing fields left out: Hello.modules (protocol 4), Heartbeat's object counts, Fetch.lend.
A Hello is read from any agent, so that the coordinator can tell one of another batuta version what to do."""

_DECODERS: dict[int, tuple[type, int, int, Callable[[list[Any]], Message]]] = {
    TAGS[cls]: (cls, len(dataclasses.fields(cls)) - _OPTIONAL_TRAILING.get(cls, 0), len(dataclasses.fields(cls)), fn)
    for cls, fn in _DECODER_FNS
}
"""tag -> (message class, fewest fields, most fields, decoder)."""


def to_wire(msg: Message, oob: OobWriter) -> list[Any]:
    """The wire array for `msg`; arrays it sends out-of-band are added to `oob`."""
    encoder = _ENCODERS.get(type(msg))
    if encoder is None:
        raise LocalProtocolError(f"cannot send {describe(msg)}: not a batuta.protocol message")
    try:
        return encoder(msg, oob)
    except Invalid as exc:
        raise LocalProtocolError(exc.describe(type(msg).__name__)) from None


def from_wire(w: Any) -> Message:
    """A message from its decoded msgpack array `[tag, field, ...]`."""
    if type(w) is not list or not w:
        raise RemoteProtocolError(f"frame body must be a message array [tag, ...], got {describe(w)}")
    tag = w[0]
    entry = _DECODERS.get(tag) if type(tag) is int else None
    if entry is None:
        if type(tag) is int:
            raise RemoteProtocolError(f"unknown message tag {tag}")
        raise RemoteProtocolError(f"message tag must be an int, got {describe(tag)}")
    cls, fewest, most, decoder = entry
    if not fewest + 1 <= len(w) <= most + 1:
        needs = f"{most}" if fewest == most else f"{fewest} or {most}"
        raise RemoteProtocolError(f"{cls.__name__} needs {needs} fields, got {len(w) - 1}")
    try:
        return decoder(w)
    except Invalid as exc:
        raise RemoteProtocolError(exc.describe(cls.__name__)) from None
