"""The Connection state machine: an agent and a coordinator over a fake link, no sockets."""

from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest

from batuta.core.task import KernelCall, Outcome
from batuta.protocol import (
    CLOSED,
    NEED_DATA,
    PROTOCOL_VERSION,
    Bye,
    Cancel,
    Connection,
    ConnectionState,
    Done,
    Drop,
    Error,
    GpuCache,
    Heartbeat,
    Hello,
    Keepalive,
    LocalProtocolError,
    Message,
    Phase,
    Put,
    RemoteProtocolError,
    Role,
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
    encode_message,
)
from batuta.protocol.connection import AGENT_SENDS, COORDINATOR_SENDS, SLOT_PIPE_ONLY, TRANSITIONS

HELLO = Hello(
    protocol=PROTOCOL_VERSION,
    batuta_version="0.1.0",
    python_version="3.11.7",
    hostname="node-a",
    pid=100,
    cpu_count=2,
    slots=(SlotInfo(slot=0, capabilities=("cpu",)), SlotInfo(slot=1, capabilities=("cpu",))),
)
WELCOME = Welcome(protocol=PROTOCOL_VERSION, heartbeat_interval=1.0)


def deliver(sender: Connection, receiver: Connection, *msgs: Message) -> list[Message]:
    """Send `msgs` from one end, hand the bytes to the other, return what it received."""
    receiver.receive_data(sender.send_many(msgs))
    return drain(receiver)


def drain(conn: Connection) -> list[Message]:
    received: list[Message] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA or event is CLOSED:
            return received
        received.append(event)


def handshake() -> tuple[Connection, Connection]:
    agent, coordinator = Connection(Role.AGENT), Connection(Role.COORDINATOR)
    assert agent.state is coordinator.state is ConnectionState.HANDSHAKE
    assert deliver(agent, coordinator, HELLO) == [HELLO]
    assert coordinator.peer_hello == HELLO and coordinator.phase is Phase.AWAIT_WELCOME
    assert deliver(coordinator, agent, WELCOME) == [WELCOME]
    assert agent.peer_welcome == WELCOME
    assert agent.state is coordinator.state is ConnectionState.READY
    return agent, coordinator


def run_of(*task_ids: int) -> Run:
    return Run(
        tasks=tuple(
            TaskRequest(task_id=i, slot=i % 2, attempt=1, call=KernelCall(name="noop", args=(i,))) for i in task_ids
        )
    )


def done_of(*task_ids: int) -> Done:
    return Done(
        results=tuple(
            TaskOutcome(task_id=i, slot=i % 2, attempt=1, status=Outcome.OK, value=i * 2, run_s=1e-4) for i in task_ids
        )
    )


# -- the happy path ----------------------------------------------------------------------------


def test_handshake_then_run_and_done_both_ways() -> None:
    agent, coordinator = handshake()
    run = run_of(*range(256))
    assert deliver(coordinator, agent, run) == [run]
    started = Started(task_ids=tuple(range(256)))
    done = done_of(*range(256))
    assert deliver(agent, coordinator, started, done) == [started, done]
    beat = Heartbeat(seq=1, cpu_percent=50.0, memory_used=1, memory_total=2)
    steal = StealBack(slot=1, task_ids=(3,))
    assert deliver(coordinator, agent, steal, Cancel(task_ids=(4,))) == [steal, Cancel(task_ids=(4,))]
    reply = StealBackReply(slot=1, returned=(3,), refused=())
    slot_state = SlotChanged(slot=0, state="restarting", reason="died")
    assert deliver(agent, coordinator, reply, slot_state, beat) == [reply, slot_state, beat]


def test_orderly_shutdown_and_close() -> None:
    agent, coordinator = handshake()
    assert deliver(coordinator, agent, Shutdown(reason="done")) == [Shutdown(reason="done")]
    assert not coordinator.can_send
    # The agent's last results and its Bye still flow after the Shutdown.
    assert deliver(agent, coordinator, done_of(1), Bye(reason="bye")) == [done_of(1), Bye(reason="bye")]
    assert agent.state is coordinator.state is ConnectionState.CLOSED
    coordinator.receive_data(b"")
    assert coordinator.next_event() is CLOSED
    assert coordinator.next_event() is CLOSED  # and stays closed


def test_clean_end_of_stream_yields_closed_after_buffered_messages() -> None:
    agent, coordinator = handshake()
    coordinator.receive_data(agent.send(Started(task_ids=(1,))))
    coordinator.receive_data(b"")
    assert coordinator.next_event() == Started(task_ids=(1,))
    assert coordinator.next_event() is CLOSED
    assert coordinator.state is ConnectionState.CLOSED
    with pytest.raises(LocalProtocolError, match="after the end of stream"):
        coordinator.receive_data(b"more")


def test_end_of_stream_before_hello_is_clean_too() -> None:
    coordinator = Connection(Role.COORDINATOR)
    assert coordinator.next_event() is NEED_DATA
    coordinator.receive_data(b"")
    assert coordinator.next_event() is CLOSED


def test_end_of_stream_inside_a_frame_is_a_remote_error() -> None:
    agent, coordinator = handshake()
    frame = agent.send(done_of(1, 2, 3))
    coordinator.receive_data(frame[:-5])
    assert coordinator.next_event() is NEED_DATA
    coordinator.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match=rf"stream closed inside a frame \({len(frame) - 5} bytes"):
        coordinator.next_event()
    assert coordinator.state is ConnectionState.ERROR


def test_messages_split_byte_by_byte_between_connections() -> None:
    agent, coordinator = handshake()
    data = coordinator.send_many([run_of(1, 2), Cancel(task_ids=(1,)), run_of(3)])
    received: list[Message] = []
    for i in range(len(data)):
        agent.receive_data(data[i : i + 1])
        received += drain(agent)
    assert received == [run_of(1, 2), Cancel(task_ids=(1,)), run_of(3)]


def test_in_flight_messages_after_our_bye_are_still_received() -> None:
    agent, coordinator = handshake()
    in_flight = coordinator.send(run_of(9))  # crosses the agent's Bye on the wire
    bye = agent.send(Bye(reason="SIGTERM"))
    agent.receive_data(in_flight)
    assert drain(agent) == [run_of(9)]
    coordinator.receive_data(bye)
    assert drain(coordinator) == [Bye(reason="SIGTERM")]


def test_coordinator_may_refuse_an_agent_with_an_error() -> None:
    agent, coordinator = Connection(Role.AGENT), Connection(Role.COORDINATOR)
    deliver(agent, coordinator, HELLO)
    refusal = Error(message="host name clash")
    assert deliver(coordinator, agent, refusal) == [refusal]
    assert not coordinator.can_send
    with pytest.raises(LocalProtocolError, match="the coordinator sent Welcome after its Error"):
        coordinator.send(WELCOME)


def test_agent_may_send_an_error_instead_of_hello() -> None:
    agent, coordinator = Connection(Role.AGENT), Connection(Role.COORDINATOR)
    assert deliver(agent, coordinator, Error(message="numba missing")) == [Error(message="numba missing")]
    assert coordinator.peer_hello is None


# -- the rules, from both sides ------------------------------------------------------------------


def test_direction_table_matches_the_messages_docstring() -> None:
    assert {t.__name__ for t in AGENT_SENDS} == {
        "CodeStored",
        "CodeLoaded",
        "Started",
        "Done",
        "StealBackReply",
        "SlotChanged",
        "ObjectsLost",
        "Heartbeat",
        "Bye",
        "Error",
    }
    assert {t.__name__ for t in COORDINATOR_SENDS} == {
        "Code",
        "Run",
        "StealBack",
        "Cancel",
        "Put",
        "Drop",
        "Fetch",
        "DataLink",
        "Keepalive",
        "Shutdown",
        "Error",
    }
    assert set(TRANSITIONS) == {(phase, role) for phase in Phase for role in Role}
    assert {t.__name__ for t in SLOT_PIPE_ONLY} == {"GpuCache"}


def test_a_slot_pipe_message_never_travels_between_agent_and_coordinator() -> None:
    cache = GpuCache(slot=1, values=2, nbytes=3 << 20, cap=1 << 30)
    agent, coordinator = handshake()
    with pytest.raises(LocalProtocolError, match="GpuCache travels only from a slot to its agent"):
        agent.send(cache)
    coordinator.receive_data(encode_message(cache))  # an agent that ignores the rules
    with pytest.raises(RemoteProtocolError, match="GpuCache travels only from a slot to its agent"):
        coordinator.next_event()
    assert coordinator.state is ConnectionState.ERROR


AGENT_EXAMPLES: list[Message] = [
    Started(task_ids=(1,)),
    done_of(1),
    StealBackReply(slot=0, returned=(), refused=()),
    SlotChanged(slot=0, state="up"),
    Heartbeat(seq=0, cpu_percent=0.0, memory_used=0, memory_total=0),
    Bye(),
]
COORDINATOR_EXAMPLES: list[Message] = [
    run_of(1),
    StealBack(slot=0, task_ids=(1,)),
    Cancel(task_ids=(1,)),
    Put(object_id=1, value=2.5),
    Drop(object_ids=(1,)),
    Keepalive(),
    Shutdown(),
]


@pytest.mark.parametrize("msg", [*COORDINATOR_EXAMPLES, HELLO], ids=lambda m: type(m).__name__)
def test_agent_sending_a_coordinator_message_is_a_local_error(msg: Message) -> None:
    agent, _ = handshake()
    with pytest.raises(LocalProtocolError, match=f"may not send {type(msg).__name__}"):
        agent.send(msg)
    assert agent.state is ConnectionState.ERROR
    with pytest.raises(LocalProtocolError, match="unusable after an earlier error"):
        agent.send(Started(task_ids=(1,)))
    with pytest.raises(LocalProtocolError, match="unusable"):
        agent.next_event()
    with pytest.raises(LocalProtocolError, match="unusable"):
        agent.receive_data(b"x")


@pytest.mark.parametrize("msg", [*AGENT_EXAMPLES, WELCOME], ids=lambda m: type(m).__name__)
def test_coordinator_sending_an_agent_message_is_a_local_error(msg: Message) -> None:
    _, coordinator = handshake()
    with pytest.raises(LocalProtocolError, match=f"may not send {type(msg).__name__}"):
        coordinator.send(msg)
    assert coordinator.state is ConnectionState.ERROR


@pytest.mark.parametrize("msg", [*COORDINATOR_EXAMPLES, WELCOME], ids=lambda m: type(m).__name__)
def test_coordinator_receiving_a_coordinator_message_is_a_remote_error(msg: Message) -> None:
    _, coordinator = handshake()
    coordinator.receive_data(encode_message(msg))  # a peer that ignores the rules
    with pytest.raises(RemoteProtocolError, match=f"the agent may not send {type(msg).__name__}"):
        coordinator.next_event()
    assert coordinator.state is ConnectionState.ERROR
    with pytest.raises(RemoteProtocolError, match="unusable after an earlier error"):
        coordinator.next_event()


@pytest.mark.parametrize("msg", [*AGENT_EXAMPLES, HELLO], ids=lambda m: type(m).__name__)
def test_agent_receiving_an_agent_message_is_a_remote_error(msg: Message) -> None:
    agent, _ = handshake()
    agent.receive_data(encode_message(msg))
    with pytest.raises(RemoteProtocolError, match="the coordinator may not send"):
        agent.next_event()


@pytest.mark.parametrize("msg", AGENT_EXAMPLES, ids=lambda m: type(m).__name__)
def test_before_the_handshake_only_hello_welcome_or_error(msg: Message) -> None:
    agent, coordinator = Connection(Role.AGENT), Connection(Role.COORDINATOR)
    with pytest.raises(LocalProtocolError, match="before the agent's Hello"):
        agent.send(msg)
    coordinator.receive_data(encode_message(msg))
    with pytest.raises(
        RemoteProtocolError, match=f"the agent may not send {type(msg).__name__} before the agent's Hello"
    ):
        coordinator.next_event()
    # Hello sent, Welcome not yet: still nothing else.
    agent, coordinator = Connection(Role.AGENT), Connection(Role.COORDINATOR)
    deliver(agent, coordinator, HELLO)
    with pytest.raises(LocalProtocolError, match="while the agent waits for Welcome"):
        agent.send(msg)


@pytest.mark.parametrize("msg", COORDINATOR_EXAMPLES, ids=lambda m: type(m).__name__)
def test_coordinator_cannot_skip_the_welcome(msg: Message) -> None:
    agent, coordinator = Connection(Role.AGENT), Connection(Role.COORDINATOR)
    deliver(agent, coordinator, HELLO)
    with pytest.raises(LocalProtocolError, match="while the agent waits for Welcome"):
        coordinator.send(msg)
    agent.receive_data(encode_message(msg))
    with pytest.raises(RemoteProtocolError, match=f"the coordinator may not send {type(msg).__name__}"):
        agent.next_event()


def test_second_hello_and_second_welcome_are_refused() -> None:
    _, coordinator = handshake()
    coordinator.receive_data(encode_message(HELLO))
    with pytest.raises(RemoteProtocolError, match="may not send Hello after the handshake"):
        coordinator.next_event()
    _, coordinator = handshake()
    with pytest.raises(LocalProtocolError, match="may not send Welcome after the handshake"):
        coordinator.send(WELCOME)


def test_protocol_version_mismatch_names_both_versions() -> None:
    coordinator = Connection(Role.COORDINATOR)
    future = Hello(
        protocol=PROTOCOL_VERSION + 1,
        batuta_version="9",
        python_version="3.13",
        hostname="new",
        pid=1,
        cpu_count=1,
        slots=(),
    )
    coordinator.receive_data(encode_message(future))
    with pytest.raises(RemoteProtocolError) as info:
        coordinator.next_event()
    text = str(info.value)
    assert f"speaks protocol {PROTOCOL_VERSION + 1}" in text and f"speaks protocol {PROTOCOL_VERSION}" in text
    # It may still say why it hangs up, once.
    assert coordinator.send(Error(message=text)) == encode_message(Error(message=text))
    with pytest.raises(LocalProtocolError, match="only an Error may be sent"):
        coordinator.send(WELCOME)

    agent = Connection(Role.AGENT)
    agent.send(HELLO)
    agent.receive_data(encode_message(Welcome(protocol=PROTOCOL_VERSION + 1, heartbeat_interval=1.0)))
    with pytest.raises(RemoteProtocolError, match=f"coordinator speaks protocol {PROTOCOL_VERSION + 1}"):
        agent.next_event()


def test_nothing_after_a_bye_or_shutdown() -> None:
    agent, coordinator = handshake()
    deliver(agent, coordinator, Bye())
    with pytest.raises(LocalProtocolError, match="the agent sent Heartbeat after its Bye"):
        agent.send(Heartbeat(seq=1, cpu_percent=0, memory_used=0, memory_total=0))
    coordinator.receive_data(encode_message(Started(task_ids=(1,))))
    with pytest.raises(RemoteProtocolError, match="the agent sent Started after its Bye"):
        coordinator.next_event()

    agent, coordinator = handshake()
    deliver(coordinator, agent, Shutdown())
    agent.receive_data(encode_message(run_of(1)))
    with pytest.raises(RemoteProtocolError, match="the coordinator sent Run after its Shutdown"):
        agent.next_event()


def test_garbage_from_the_peer_breaks_the_connection() -> None:
    agent, coordinator = handshake()
    coordinator.receive_data(struct.pack(">I", 3) + b"\xc1\xc1\xc1")
    with pytest.raises(RemoteProtocolError, match="not msgpack"):
        coordinator.next_event()
    assert coordinator.error is not None and "not msgpack" in coordinator.error
    with pytest.raises(RemoteProtocolError):
        coordinator.receive_data(agent.send(Bye()))


def test_oversized_header_is_refused_at_once() -> None:
    agent = Connection(Role.AGENT, max_frame_bytes=1024)
    agent.send(HELLO)
    agent.receive_data(struct.pack(">I", 4096))
    with pytest.raises(RemoteProtocolError, match="frame of 4096 bytes exceeds the 1024-byte limit"):
        agent.next_event()


# -- sending is all or nothing ---------------------------------------------------------------------


def test_unsendable_content_raises_but_leaves_the_connection_usable() -> None:
    agent, coordinator = handshake()
    bad = Run(tasks=(TaskRequest(task_id=1, slot=0, attempt=1, call=KernelCall(name="k", args=(object(),))),))
    with pytest.raises(
        LocalProtocolError, match=r"Run\.tasks\[0\]\.call\.args\[0\]: cannot send a value of type object"
    ):
        coordinator.send(bad)
    assert coordinator.state is ConnectionState.READY
    assert deliver(coordinator, agent, run_of(1)) == [run_of(1)]


def test_send_many_checks_every_message_before_moving() -> None:
    agent, coordinator = handshake()
    with pytest.raises(LocalProtocolError, match="the agent sent Started after its Bye"):
        agent.send_many([Started(task_ids=(1,)), Bye(), Started(task_ids=(2,))])
    assert agent.state is ConnectionState.ERROR

    agent, coordinator = handshake()
    with pytest.raises(LocalProtocolError, match="unknown status"):
        bad = TaskOutcome(task_id=1, slot=0, attempt=1, status="?")  # type: ignore[arg-type]  # an unknown status, on purpose
        agent.send_many([Done(results=(bad,)), Bye()])
    assert agent.can_send  # the Bye did not count: nothing was sent
    assert deliver(agent, coordinator, Bye()) == [Bye()]


def test_frame_over_the_connection_limit_is_refused_on_send() -> None:
    agent = Connection(Role.AGENT, max_frame_bytes=32)
    with pytest.raises(LocalProtocolError, match=r"Hello frame of \d+ bytes exceeds the 32-byte limit"):
        agent.send(HELLO)
    assert agent.state is ConnectionState.HANDSHAKE


def test_not_a_message() -> None:
    agent, _ = handshake()
    with pytest.raises(LocalProtocolError, match="not a protocol message"):
        agent.send("Bye")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Connection("agent")  # type: ignore[arg-type]


def test_repr_and_raw_frames_match_encode_message() -> None:
    agent, _ = handshake()
    assert "agent ready" in repr(agent)
    assert agent.send(Started(task_ids=(1,))) == encode_message(Started(task_ids=(1,)))
    body = msgpack.unpackb(encode_message(Bye(reason="x"))[4:])
    assert body == [12, "x"]


def test_end_of_stream_inside_a_large_frame_is_a_remote_error() -> None:
    agent, coordinator = handshake()
    big = Done(results=(TaskOutcome(task_id=1, slot=0, attempt=1, status=Outcome.OK, value=np.zeros(300_000)),))
    frame = agent.send(big)
    coordinator.receive_data(frame[: len(frame) // 2])
    assert coordinator.next_event() is NEED_DATA
    coordinator.receive_data(frame[len(frame) // 2 : -1])
    assert coordinator.next_event() is NEED_DATA
    coordinator.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match=rf"stream closed inside a frame \({len(frame) - 1} bytes"):
        coordinator.next_event()
