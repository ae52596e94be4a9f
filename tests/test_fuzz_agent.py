"""Fuzzing the agent's side of the protocol, briefly (`bench/fuzz.py` is the long run).

Two properties, under hypothesis (derandomized, bounded example counts, < 20 s together):

* the agent-side `Connection`, after a valid handshake, fed random and mutated coordinator
  frames, yields messages or raises `RemoteProtocolError` and nothing else, quickly, and
  refuses further use after an error;
* a real agent process fed the same kinds of frames never crashes (no traceback, no
  "agent failed", no exit a frame did not call for), never hangs (every wait is bounded:
  liveness probes come back, bad frames end it with `Error` and exit 1 in time) and never
  leaves a slot or child process behind. The driver is `bench/fuzz.py`'s.
"""

from __future__ import annotations

import importlib.util
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batuta.protocol.connection import NEED_DATA, Connection, Role
from batuta.protocol.errors import RemoteProtocolError
from batuta.protocol.messages import PROTOCOL_VERSION, Hello, SlotInfo, Welcome

REPO_ROOT = Path(__file__).resolve().parent.parent


def _load_fuzz() -> ModuleType:
    spec = importlib.util.spec_from_file_location("batuta_bench_fuzz", REPO_ROOT / "bench" / "fuzz.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


fuzz = _load_fuzz()
KIND = st.sampled_from(fuzz.KINDS)
HELLO = Hello(
    protocol=PROTOCOL_VERSION,
    batuta_version="0",
    python_version="3.11.0",
    hostname="fuzz",
    pid=1,
    cpu_count=2,
    slots=(SlotInfo(slot=0, capabilities=("cpu",)), SlotInfo(slot=1, capabilities=("cpu",))),
)


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(rnd=st.randoms(use_true_random=False), kinds=st.lists(KIND, min_size=1, max_size=12), cut=st.integers(1, 97))
def test_agent_connection_yields_messages_or_protocol_errors(rnd: random.Random, kinds: list[str], cut: int) -> None:
    agent = fuzz._agent_model(HELLO)
    streams = fuzz.OutgoingStreams(stream_min_bytes=fuzz.STREAM_MIN_BYTES)  # stream ids go on across frames
    data = b"".join(fuzz.make_frame(rnd, kind, 2, [0], streams) for kind in kinds)
    start = time.monotonic()
    try:
        for offset in range(0, len(data), cut):  # split anywhere: frames arrive in pieces
            agent.receive_data(data[offset : offset + cut])
            while (event := agent.next_event()) is not NEED_DATA:
                assert event is not None
    except RemoteProtocolError as exc:
        assert str(exc)
        with pytest.raises(RemoteProtocolError):
            agent.next_event()
    assert time.monotonic() - start < 5


def test_agent_connection_refuses_welcome_twice_and_agent_messages() -> None:
    agent = fuzz._agent_model(HELLO)
    agent.receive_data(fuzz.encode_message(Welcome(protocol=PROTOCOL_VERSION, heartbeat_interval=1.0)))
    with pytest.raises(RemoteProtocolError, match="Welcome"):
        agent.next_event()
    other = Connection(Role.AGENT)
    other.receive_data(fuzz.encode_message(HELLO))
    with pytest.raises(RemoteProtocolError, match="may not send Hello"):
        other.next_event()


@pytest.fixture(scope="module")
def fuzzer() -> Iterator[object]:
    driver = fuzz.Fuzzer(slots=2, timeout=10.0, probe_every=4)
    yield driver
    driver.close()
    stats = driver.stats
    assert (stats.crashes, stats.hangs, stats.orphans) == (0, 0, 0), stats.findings


@pytest.mark.timeout(60)
def test_real_agent_survives_random_and_mutated_frames(fuzzer: object) -> None:
    @settings(
        max_examples=20,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(
        rnd=st.randoms(use_true_random=False),
        # Well-formed frames, then at most one bad one (most end the session: a restart each).
        kinds=st.tuples(st.integers(1, 10), st.none() | st.sampled_from(fuzz.BAD_KINDS)).map(
            lambda drawn: ["valid", "stream"] * (drawn[0] // 2) + ([drawn[1]] if drawn[1] else [])
        ),
    )
    def property(rnd: random.Random, kinds: list[str]) -> None:
        driver = fuzzer
        before = (driver.stats.crashes, driver.stats.hangs, driver.stats.orphans)  # type: ignore[attr-defined]
        driver.frames(rnd, kinds, next_id=[0])  # type: ignore[attr-defined]
        after = (driver.stats.crashes, driver.stats.hangs, driver.stats.orphans)  # type: ignore[attr-defined]
        assert after == before, driver.stats.findings  # type: ignore[attr-defined]

    property()
    stats = fuzzer.stats  # type: ignore[attr-defined]
    assert stats.frames >= 40 and stats.probes >= 5 and stats.protocol_errors >= 3, stats.to_json()
    assert stats.sessions >= 3
