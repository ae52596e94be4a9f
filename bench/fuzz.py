"""Fuzz a real host agent's frame handling: random and mutated frames after a valid handshake.

A real `python -m batuta.agent --stdio` process gets the handshake, then frames of these
kinds (each drawn from a seeded `random.Random`):

    valid      a well-formed Run / Cancel / StealBack / Put / Drop / Fetch / Code with random content
               (refs to objects put or never put; code that imports, fails to parse or imports
               a missing package; tasks naming those digests or none), now and then a DataLink
               to a closed loopback port (the dial fails; the agent keeps serving)
    stream     a valid Put or Run whose arrays stream: the frame, then its chunk frames
               (protocol/chunks.py), stream ids continuing the session's
    mutated    a valid or streamed frame with bytes flipped, inserted, deleted, cut or spliced
    chunk      a chunk frame for a stream never announced, finished or at a wrong offset, or
               a frame whose streamed-array ext is malformed
    garbage    random bytes, with or without a plausible length prefix
    header     a length prefix over the limit, or zero
    body       a frame whose msgpack body is a random value, or a message array whose
               fields have random types
    direction  a message the coordinator may not send here (Hello, Done, Welcome again, ...)

Every frame is also fed to a reference `Connection(Role.AGENT)` (the model), which says what
the agent must do: keep serving (then a probe task must come back within a bound), end with
`Error("protocol error from the coordinator: ...")` and exit 1, end with Bye and exit 0
(Shutdown), or wait for the rest of a frame (then EOF must make it exit). Anything else is
counted: `crashes` (a traceback, "agent failed", an exit or an Error the model did not
expect, a malformed frame from the agent), `hangs` (no answer or no exit within the bound),
`orphans` (a slot or child process alive after the agent exited).

Frames that would make the agent run something outside a small allowlist (a real kernel with
random arguments, a binary other than /bin/true and /bin/echo, `module:kernel` names that
import modules, a Code bundle other than the few harmless ones below) are not sent: `skipped`.
The agents keep what Code writes in a temporary cache folder.

    python bench/fuzz.py [--frames 100000] [--seed 0] [--slots 2]   # last line: one JSON object

`tests/test_fuzz_agent.py` runs the same driver briefly under hypothesis.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # its helpers beside it

import psutil
from _fuzz_frames import STREAM_MIN_BYTES, STREAMED_SHARE, is_safe, make_frame

from batuta.core.task import KernelCall
from batuta.protocol.chunks import OutgoingStreams
from batuta.protocol.codec import FrameDecoder, encode_message
from batuta.protocol.connection import CLOSED, NEED_DATA, Connection, Role
from batuta.protocol.errors import ProtocolError, RemoteProtocolError
from batuta.protocol.messages import (
    PROTOCOL_VERSION,
    Bye,
    Done,
    Error,
    Hello,
    Run,
    Shutdown,
    TaskRequest,
    Welcome,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
KINDS = ("valid", "stream", "mutated", "garbage", "header", "body", "direction", "chunk")
BAD_KINDS = KINDS[2:]
BAD_WEIGHTS = (50, 10, 8, 17, 15, 10)  # among frames that are not drawn valid
PROBE_BASE = 1 << 60  # probe task ids; fuzzed ids stay far below


# -- the agent under test -------------------------------------------------------------------


@dataclass
class Stats:
    frames: int = 0
    crashes: int = 0
    hangs: int = 0
    orphans: int = 0
    sessions: int = 0
    skipped: int = 0
    protocol_errors: int = 0  # frames the agent refused with Error, as the model said it must
    probes: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    findings: list[str] = field(default_factory=list)

    def note(self, kind: str, detail: str) -> None:
        if kind == "crash":
            self.crashes += 1
        elif kind == "hang":
            self.hangs += 1
        elif kind == "orphan":
            self.orphans += 1
        if len(self.findings) < 20:
            self.findings.append(f"{kind}: {detail}")

    def to_json(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "crashes": self.crashes,
            "hangs": self.hangs,
            "orphans": self.orphans,
            "sessions": self.sessions,
            "skipped": self.skipped,
            "protocol_errors": self.protocol_errors,
            "probes": self.probes,
            "by_kind": dict(sorted(self.by_kind.items())),
            "findings": self.findings,
        }


class AgentSession:
    """One agent process, driven synchronously: bounded waits on its pipes, never a block."""

    def __init__(self, slots: int, stats: Stats, *, timeout: float, cache: str) -> None:
        self.stats = stats
        self.timeout = timeout
        env = dict(os.environ)
        env.setdefault("NUMBA_DISABLE_JIT", "0")
        env["XDG_CACHE_HOME"] = cache  # where Code bundles are written
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "batuta.agent", "--stdio", "--slots", str(slots), "--gpus", "none"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO_ROOT,
            env=env,
        )
        assert self.proc.stdin and self.proc.stdout and self.proc.stderr
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            os.set_blocking(stream.fileno(), False)
        self.conn = Connection(Role.COORDINATOR)
        self.model_frames = FrameDecoder()
        self.outcomes: set[int] = set()
        self.errors: list[str] = []
        self.bye = False
        self.stdout_closed = False
        self.stderr = bytearray()
        self.pending = bytearray()
        self.next_id = [0]
        self.streams = OutgoingStreams(stream_min_bytes=STREAM_MIN_BYTES)  # what the fuzzer streams to it
        self.descendants: set[int] = set()
        self.ended = False
        self.model = Connection(Role.AGENT)

    def handshake(self) -> None:
        """Wait for Hello and answer Welcome (a spare session is spawned early, greeted late)."""
        self.stats.sessions += 1
        hello = self._wait(lambda: self.conn.peer_hello is not None, "Hello")
        if not hello:
            raise RuntimeError(f"agent did not say hello: {self.stderr.decode(errors='replace')[-2000:]}")
        welcome = Welcome(protocol=PROTOCOL_VERSION, heartbeat_interval=0.5)
        self.conn.send(welcome)
        assert self.conn.peer_hello is not None
        self.model = _agent_model(self.conn.peer_hello)
        self._send(encode_message(welcome))

    # -- pipes --

    def _send(self, data: bytes) -> None:
        self.pending += data
        self._pump(0.0)

    def _pump(self, wait: float) -> None:
        """Move bytes both ways for up to `wait` seconds (one select round if 0)."""
        proc = self.proc
        assert proc.stdin and proc.stdout and proc.stderr
        deadline = time.monotonic() + wait
        with selectors.DefaultSelector() as sel:
            if not self.stdout_closed:
                sel.register(proc.stdout, selectors.EVENT_READ, "out")
            with contextlib.suppress(ValueError, KeyError):
                sel.register(proc.stderr, selectors.EVENT_READ, "err")
            if self.pending and not proc.stdin.closed:
                sel.register(proc.stdin, selectors.EVENT_WRITE, "in")
            while True:
                remaining = max(0.0, deadline - time.monotonic())
                if not sel.get_map():
                    time.sleep(remaining)
                    return
                events = sel.select(remaining)
                for key, _ in events:
                    if key.data == "in":
                        try:
                            written = os.write(proc.stdin.fileno(), self.pending[: 1 << 16])
                        except BlockingIOError:
                            written = 0
                        except (BrokenPipeError, OSError):
                            self.pending.clear()
                            written = 0
                        del self.pending[:written]
                        if not self.pending:
                            sel.unregister(proc.stdin)
                    elif key.data == "out":
                        chunk = _read(proc.stdout.fileno())
                        if chunk is None:
                            continue
                        if not chunk:
                            self.stdout_closed = True
                            sel.unregister(proc.stdout)
                        self._on_agent_bytes(chunk)
                    else:
                        chunk = _read(proc.stderr.fileno())
                        if chunk == b"":
                            sel.unregister(proc.stderr)
                        elif chunk:
                            self.stderr += chunk[-65536:]
                            del self.stderr[:-65536]
                if time.monotonic() >= deadline or not events:
                    return

    def _on_agent_bytes(self, chunk: bytes) -> None:
        try:
            self.conn.receive_data(chunk)
            while True:
                event = self.conn.next_event()
                if event is NEED_DATA or event is CLOSED:
                    return
                if isinstance(event, Done):
                    self.outcomes.update(o.task_id for o in event.results)
                elif isinstance(event, Error):
                    self.errors.append(event.message)
                elif isinstance(event, Bye):
                    self.bye = True
        except ProtocolError as exc:
            if not self.ended:
                self.stats.note("crash", f"agent sent a malformed stream: {exc}")
                self.ended = True

    def _wait(self, predicate: Any, what: str, timeout: float | None = None) -> bool:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._pump(min(left, 0.05))
        return True

    def _remember_descendants(self) -> None:
        with contextlib.suppress(psutil.Error):
            self.descendants.update(p.pid for p in psutil.Process(self.proc.pid).children(recursive=True))

    # -- frames --

    def feed(self, frame: bytes) -> str:
        """Send one frame; returns the model's verdict: "ok", "fatal", "partial", "end"."""
        verdict = "ok"
        self.model_frames.feed(frame)
        with contextlib.suppress(RemoteProtocolError):
            while self.model_frames.next_message() is not None:
                pass
        try:
            self.model.receive_data(frame)
            while True:
                event = self.model.next_event()
                if event is NEED_DATA or event is CLOSED:
                    break
                if isinstance(event, Shutdown | Error):
                    verdict = "end"
                    break
        except RemoteProtocolError:
            verdict = "fatal"
        if verdict == "ok" and (self.model_frames.buffered_bytes or self.model.receiving_bytes):
            verdict = "partial"  # a frame or a streamed array cut short: EOF must end the agent
        self._send(frame)
        self.stats.frames += 1
        return verdict

    @property
    def expected_stream_id(self) -> int:
        """The stream id the agent (as its model says) expects next."""
        return self.model.expected_stream_id

    def probe(self) -> bool:
        """A noop task on slot 0 must come back: the agent is still serving."""
        self.stats.probes += 1
        self.next_id[0] += 1
        task_id = PROBE_BASE + self.next_id[0]
        frame = encode_message(Run(tasks=(TaskRequest(task_id=task_id, slot=0, attempt=1,
                                                      call=KernelCall(name="noop", args=(1,))),)))  # fmt: skip
        self.model.receive_data(frame)
        assert self.model.next_event() is not NEED_DATA
        self.model_frames.feed(frame)
        self.model_frames.next_message()
        self._send(frame)
        self._remember_descendants()
        if self._wait(lambda: task_id in self.outcomes or self.stdout_closed or self.ended, "probe"):
            if task_id in self.outcomes:
                return True
            self.stats.note("crash", f"agent stopped serving after valid frames: {self._last_words()}")
            return False
        self.stats.note("hang", f"probe task not answered within {self.timeout:g}s")
        return False

    def finish(self, verdict: str) -> None:
        """End the session as `verdict` says it must end, and check how it ended."""
        self._remember_descendants()
        if verdict == "partial" or verdict == "ok":
            with contextlib.suppress(OSError):
                self._pump(0.2)
                assert self.proc.stdin
                self.proc.stdin.close()
        code = self._wait_exit()
        if code is None:
            self.stats.note("hang", f"agent did not exit within {self.timeout:g}s after a {verdict} frame")
            self._kill()
        else:
            self._judge(verdict, code)
        self._check_orphans()
        self._close_pipes()

    def _judge(self, verdict: str, code: int) -> None:
        text = self.stderr.decode(errors="replace")
        if "Traceback" in text or any(e.startswith("agent failed") for e in self.errors):
            self.stats.note("crash", self._last_words())
            return
        if verdict in ("fatal", "partial"):
            if code == 1 and any(e.startswith("protocol error from the coordinator") for e in self.errors):
                self.stats.protocol_errors += 1
            else:
                self.stats.note("crash", f"after a {verdict} frame: exit {code}, errors {self.errors[-1:]}")
        elif verdict == "end":
            if code not in (0, 1):
                self.stats.note("crash", f"after Shutdown/Error: exit {code}")
        elif code != 0:
            self.stats.note("crash", f"after EOF: exit {code} {self._last_words()}")

    def _wait_exit(self) -> int | None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                self._pump(0.0)
                return code
            self._pump(0.02)
        return None

    def _check_orphans(self) -> None:
        deadline = time.monotonic() + self.timeout
        alive = list(self.descendants)
        while alive and time.monotonic() < deadline:
            alive = [pid for pid in alive if _alive(pid)]
            if alive:
                time.sleep(0.02)
        for pid in alive:
            self.stats.note("orphan", f"pid {pid} outlived its agent")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _kill(self) -> None:
        self._remember_descendants()
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)

    def _close_pipes(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(Exception):
                stream.close()  # type: ignore[union-attr]

    def _last_words(self) -> str:
        return (self.errors[-1:] or [""])[0][:300] + " | stderr: " + self.stderr.decode(errors="replace")[-600:]


def _agent_model(hello: Hello) -> Connection:
    """An agent-side Connection in the READY state: the reference for what the agent accepts."""
    model = Connection(Role.AGENT)
    model.send(hello)
    model.receive_data(encode_message(Welcome(protocol=PROTOCOL_VERSION, heartbeat_interval=0.5)))
    assert isinstance(model.next_event(), Welcome)
    return model


def _read(fd: int) -> bytes | None:
    try:
        return os.read(fd, 1 << 18)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# -- the driver ---------------------------------------------------------------------------


class Fuzzer:
    """Feeds frames to agent sessions, starting a new one whenever a frame ends the last."""

    def __init__(self, *, slots: int = 2, timeout: float = 10.0, probe_every: int = 50) -> None:
        self.stats = Stats()
        self.slots = slots
        self.timeout = timeout
        self.probe_every = probe_every
        self.session: AgentSession | None = None
        self._spare: AgentSession | None = None
        self._since_probe = 0
        self.cache = tempfile.mkdtemp(prefix="batuta-fuzz-cache-")

    def frames(self, rnd: random.Random, kinds: list[str], next_id: list[int] | None = None) -> None:
        """Send one frame of each kind in `kinds` (random content from `rnd`). Task ids count
        up from `next_id[0]` if given (so what is drawn depends on `rnd` alone, as hypothesis
        needs), else from the session's own counter."""
        for kind in kinds:
            session = self.session or self._start()
            session.streams.next_id = session.expected_stream_id  # after a mutated stream, say
            frame = make_frame(rnd, kind, self.slots, session.next_id if next_id is None else next_id, session.streams)
            if not frame:
                continue
            if not all(is_safe(message) for message in _decode_quietly(frame, session.expected_stream_id)):
                self.stats.skipped += 1
                continue
            self.stats.by_kind[kind] = self.stats.by_kind.get(kind, 0) + 1
            verdict = session.feed(frame)
            if verdict != "ok":
                session.finish(verdict)
                self.session = None
                continue
            self._since_probe += 1
            if self._since_probe >= self.probe_every:
                self._since_probe = 0
                if not session.probe():
                    session.finish("ok")
                    self.session = None

    def close(self) -> None:
        if self.session is not None:
            self.session.probe()
            self.session.finish("ok")
            self.session = None
        if self._spare is not None:
            self._spare.handshake()
            self._spare.finish("ok")
            self._spare = None
        shutil.rmtree(self.cache, ignore_errors=True)

    def _start(self) -> AgentSession:
        # the next agent starts while this one is fuzzed: a session is mostly the agent's start-up
        session = self._spare or AgentSession(self.slots, self.stats, timeout=self.timeout, cache=self.cache)
        self._spare = AgentSession(self.slots, self.stats, timeout=self.timeout, cache=self.cache)
        session.handshake()
        self.session = session
        return session


def _decode_quietly(frame: bytes, first_stream_id: int = 0) -> list[Any]:
    """The messages in `frame`, those still waiting for chunks included (they may complete
    later, and must be safe to run too)."""
    decoder = FrameDecoder()
    decoder.streams.next_id = first_stream_id
    decoder.feed(frame)
    messages: list[Any] = []
    with contextlib.suppress(RemoteProtocolError):
        while (message := decoder.next_message()) is not None:
            messages.append(message)
    return messages + decoder.streams.held_messages()


def choose_kinds(rnd: random.Random, count: int, bad_fraction: float) -> list[str]:
    """`count` frame kinds: valid ones, and a `bad_fraction` of the others (most end a session)."""
    return [
        ("stream" if rnd.random() < STREAMED_SHARE else "valid")
        if rnd.random() >= bad_fraction
        else rnd.choices(BAD_KINDS, weights=BAD_WEIGHTS)[0]
        for _ in range(count)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=15.0, help="bound on every wait (hang detection)")
    parser.add_argument("--probe-every", type=int, default=50, help="frames between liveness probes")
    parser.add_argument(
        "--bad-fraction",
        type=float,
        default=0.02,
        help="share of frames that are not well formed (most end a session, which costs an agent start)",
    )
    args = parser.parse_args(argv)
    rnd = random.Random(args.seed)
    fuzzer = Fuzzer(slots=args.slots, timeout=args.timeout, probe_every=args.probe_every)
    start = time.perf_counter()
    last_report = start
    try:
        while fuzzer.stats.frames < args.frames:
            fuzzer.frames(rnd, choose_kinds(rnd, min(100, args.frames - fuzzer.stats.frames), args.bad_fraction))
            now = time.perf_counter()
            if now - last_report > 10:
                last_report = now
                s = fuzzer.stats
                print(
                    f"{s.frames} frames, {s.sessions} sessions, {s.crashes} crashes, {s.hangs} hangs, "
                    f"{s.orphans} orphans ({s.frames / (now - start):.0f} frames/s)",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        fuzzer.close()
    result = fuzzer.stats.to_json()
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["seed"] = args.seed
    print(json.dumps(result))
    return 0 if not (result["crashes"] or result["hangs"] or result["orphans"]) else 1


if __name__ == "__main__":
    sys.exit(main())
