"""The wire codec on send: what cannot be sent is a LocalProtocolError naming the field.

Values of types the wire does not carry, fields out of range, values nested too deeply and
frames over the limit are refused by `encode_message` before a byte is written, with the path
of the offending field. Separate from the round trips (test_protocol_codec.py) and from
malformed input (test_protocol_codec_malformed.py), which is the receiving side.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from batuta.core.task import BinaryCall, KernelCall, Outcome
from batuta.protocol import (
    Code,
    CodeFile,
    CodeLoaded,
    Done,
    GpuSample,
    Heartbeat,
    Hello,
    LocalProtocolError,
    Run,
    SlotChanged,
    SlotInfo,
    Started,
    TaskOutcome,
    TaskRequest,
    Welcome,
    check_value,
    code_digest,
    encode_message,
)
from tests.support.codec import decode_all

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
        (np.array([[1.0, 2.0], [3.0, 4.0]]).view(np.matrix), "np.matrix"),
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


@pytest.mark.parametrize(
    ("value", "fix", "instead"),
    [
        (
            np.array(["2024-01-01"], dtype="datetime64[D]"),
            "send a datetime as x.view('i8') and make it '<M8[D]' again",
            "view",
        ),
        (np.datetime64(7, "s"), "send a datetime as x.view('i8') and make it '<M8[s]' again", "view"),
        (
            np.array([1, 2], dtype="timedelta64[ms]"),
            "send a timedelta as x.view('i8') and make it '<m8[ms]' again with .view('<m8[ms]')",
            "view",
        ),
        (np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8")]), "send one array per field", "fields"),
        (np.array([1.5], dtype=np.longdouble), "send x.astype(np.float64)", "float64"),
        (np.array(["ab", "c"]), "send a list of str (x.tolist())", "list"),
        (np.array([b"ab"]), "send a list of bytes (x.tolist())", "list"),
        (np.array([1, "x"], dtype=object), "send a list (x.tolist())", "list"),
        (np.zeros(2, dtype="V4"), "send its bytes as x.view(np.uint8)", "bytes"),
        (np.ma.masked_array([1, 2], mask=[False, True]), "send x.data and np.ma.getmaskarray(x)", "masked"),
        (np.array([[1.0, 2.0], [3.0, 4.0]]).view(np.matrix), "send np.asarray(x) and multiply with @", "asarray"),
        (2**70, "send str(n) and int() it back", "str"),
    ],
)
def test_a_refused_value_says_what_to_send_instead_and_that_travels(value: Any, fix: str, instead: str) -> None:
    """A datetime, record or string array was refused naming only the dtypes that travel; the
    way round it was in the README alone. The fix the message gives must itself travel."""
    with pytest.raises(LocalProtocolError) as info:
        check_value(value, "task 'k' arguments[0]")
    text = str(info.value)
    assert fix in text and "\n" not in text, text
    if instead == "view":
        assert np.array_equal(value_round_trip(value.view("i8")).view(value.dtype), value)
    elif instead == "fields":
        back = value_round_trip({name: value[name] for name in value.dtype.names})
        assert all(np.array_equal(back[name], value[name]) for name in value.dtype.names)
    elif instead == "float64":
        assert value_round_trip(value.astype(np.float64)).tolist() == value.tolist()
    elif instead == "list":
        assert value_round_trip(value.tolist()) == value.tolist()
    elif instead == "bytes":
        assert value_round_trip(value.view(np.uint8)).tobytes() == value.tobytes()
    elif instead == "masked":
        data, mask = value_round_trip((value.data, np.ma.getmaskarray(value)))
        assert np.array_equal(np.ma.masked_array(data, mask=mask), value) and mask.tolist() == [False, True]
    elif instead == "asarray":  # the data travels; the product is said with @ on both sides
        back = value_round_trip(np.asarray(value))
        assert type(back) is np.ndarray and np.array_equal(
            back @ back, [[7.0, 10.0], [15.0, 22.0]]
        )  # value * value, for a matrix
    else:
        assert int(value_round_trip(str(value))) == value


def value_round_trip(value: Any) -> Any:
    (decoded,) = decode_all(encode_message(outcome_with(value)))
    assert isinstance(decoded, Done)
    return decoded.results[1].value


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
    [  # the ignored arg-types are the wrong types these cases send on purpose
        (
            TaskOutcome(task_id=1, slot=0, attempt=1, status="weird"),  # type: ignore[arg-type]
            "Done.results[0].status: unknown status 'weird'",
        ),
        (
            TaskOutcome(task_id=1, slot=0, attempt=1, status="ok"),  # type: ignore[arg-type]
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
            TaskOutcome(task_id=1, slot=0, attempt=1, status=Outcome.OK, stdout="text"),  # type: ignore[arg-type]
            "stdout: expected bytes, got str",
        ),
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


def _code(path: str, *, modules: tuple[str, ...] = (), digest: str | None = None) -> Code:
    files = (CodeFile(path=path, data=b"X = 1\n"),)
    return Code(digest=digest or code_digest(files, modules), modules=modules, files=files)


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
        (_code("../x.py"), "Code.files[0].path: expected a path without empty, '.' or '..' parts"),
        (_code("/abs.py"), "Code.files[0].path: expected a relative '/'-separated path"),
        (_code("x.py", modules=("x-y",)), "Code.modules[0]: expected a dotted module name"),
        (_code("x.py", digest="0" * 64), "Code.digest: does not match the files and modules"),
        (CodeLoaded(digest="nope"), "CodeLoaded.digest: expected a sha256 digest"),
        (
            Hello(
                protocol=1,
                batuta_version="",
                python_version="",
                hostname="",
                pid=1,
                cpu_count=1,
                slots=(),
                modules={"mykernels": "ABC"},
            ),
            "Hello.modules['mykernels']: expected a sha256 digest (64 lowercase hex digits) or \"\"",
        ),
        (
            Run(tasks=(TaskRequest(task_id=1, slot=0, attempt=1, call=KernelCall(name="k"), code="abc"),)),
            'Run.tasks[0].code: expected a sha256 digest (64 lowercase hex digits) or ""',
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
