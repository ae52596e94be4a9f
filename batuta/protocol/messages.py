"""The messages that travel between the coordinator and a host agent.

Small frozen dataclasses, validated by the codec when decoded. Direction is part of each
message's meaning; `connection.py` holds the table of who may send what in which state.

    agent -> coordinator: Hello, CodeStored, CodeLoaded, Started, Done, StealBackReply, SlotChanged,
                          ObjectsLost, Heartbeat, Bye, Error
    coordinator -> agent: Welcome, Code, Run, StealBack, Cancel, Put, Drop, Fetch, DataLink, Keepalive,
                          Shutdown, Error
    slot -> agent (a slot's pipe only, never on the coordinator's connection): GpuCache

Every message is encoded as a msgpack array `[tag, field, field, ...]` (see `codec.py`), so
fields are positional on the wire; their order here is the wire order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from batuta.core.task import BinaryCall, KernelCall, Outcome

PROTOCOL_VERSION = 15
"""2: Put, Drop and object references; 3: Code, CodeLoaded, TaskRequest.code; 4: Hello.modules;
5: streamed arrays and chunk frames (`chunks.py`); 6: ObjectsLost (kept results live in slots);
7: GpuSample's device cache fields (a protocol-6 coordinator could not read them);
8: CodeStored (the agent answers Code before it imports it); 9: a task in a Run may name an
object that a task sent to its slot before it keeps, not made yet (fed ahead,
`core/feedahead.py`): the agent takes it (a protocol-8 agent refused it as absent);
10: DataLink (streamed arrays over TLS connections the agent dials back); 11: a data link's
growing streams (a fetched value forwarded while it arrives, in pieces, abortable:
`transport/bulk.py`; a protocol-10 coordinator would misread the length); 12: DataLink.encryption
("none": plain TCP connections, both ends proven by an HMAC of the token; an older agent would
dial TLS and be refused); 13: TaskRequest.tail (a protocol-12 agent refused a request of 9 fields);
14: Keepalive and Welcome.silence_limit (a protocol-13 agent would refuse both); 15: the "unfit"
outcome (a task its host cannot run, `core/hostfit.py`; a protocol-14 coordinator would refuse it)."""

DATA_LINK_ENCRYPTIONS = frozenset({"tls", "none"})  # DataLink.encryption


# -- handshake ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SlotInfo:
    """One worker slot an agent offers: its index and capabilities ("cpu", "gpu", tags)."""

    slot: int
    capabilities: tuple[str, ...]
    gpu_index: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuInfo:
    """A GPU as the agent saw it at start (the seed's GpuExecutor: name and compute units)."""

    index: int
    name: str
    uuid: str = ""
    memory_total: int = 0  # bytes
    compute_units: int = 0  # streaming multiprocessors


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello:
    """First message from an agent: who it is and what it offers."""

    protocol: int
    batuta_version: str
    python_version: str
    hostname: str
    pid: int
    cpu_count: int
    slots: tuple[SlotInfo, ...]
    gpus: tuple[GpuInfo, ...] = ()
    packages: dict[str, str] = field(default_factory=dict)  # name -> version, for `stack versions`
    modules: dict[str, str] = field(default_factory=dict)
    """Each `--kernel-module` -> sha256 of its source files as this host's import path finds
    them (`agent.code.module_source_digest`), "" where it finds none: `batuta stack` compares
    them across hosts. Absent from the Hello of agents before protocol 4 (read as empty)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Welcome:
    """The coordinator accepts the agent. The agent sends heartbeats every `heartbeat_interval`,
    and exits once it has heard nothing from the coordinator for `silence_limit` seconds (0:
    never); the coordinator sends a `Keepalive` where it would otherwise stay silent that long."""

    protocol: int
    heartbeat_interval: float
    silence_limit: float = 0.0


# -- the user's code ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class CodeFile:
    """One file of the user's code: a relative path ("mypkg/sub.py", never absolute, never
    "..") and its bytes, as read on the coordinator."""

    path: str
    data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Code:
    """The user's own modules, as source: the agent writes `files` under its cache directory
    (one folder per `digest`), puts that folder first on the import path of itself and of
    every slot, and imports `modules` in order. Sent right after Welcome, before any Run;
    every TaskRequest then names the digest it must run with. `digest` is `code_digest(files,
    modules)`: the codec checks it both ways, so a bundle is always what its name says."""

    digest: str
    modules: tuple[str, ...]
    files: tuple[CodeFile, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class CodeStored:
    """The agent's first answer to Code: its files are under the agent's cache, checked against
    `digest` (written now, or found there), and the agent runs that digest from now on. It
    imports the modules next, before it reads another message, and says how in CodeLoaded: a
    task for the new code sent meanwhile waits for that import, and never meets the old code.
    (`Pool.ship` returns on this answer; compiling the code is the bulk of the import.)"""

    digest: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CodeLoaded:
    """The agent's second answer to Code, after CodeStored: the digest it now runs, and for
    each module that failed to import, one line saying why ("SyntaxError: invalid syntax (at
    mymod.py line 3)", the path in the bundle). Empty `errors`: every module imported."""

    digest: str
    errors: dict[str, str] = field(default_factory=dict)


def code_digest(files: Iterable[CodeFile], modules: Iterable[str]) -> str:
    """The content address of a bundle: sha256 over its entries (relative path, sha256 of
    the bytes) sorted by path, then the module names in import order. Hex, 64 characters."""
    outer = hashlib.sha256(b"batuta-code-1\0")
    for path, data in sorted((f.path, f.data) for f in files):
        outer.update(b"f" + path.encode("utf-8", "surrogatepass") + b"\0" + hashlib.sha256(data).digest())
    for module in modules:
        outer.update(b"m" + module.encode("utf-8", "surrogatepass") + b"\0")
    return outer.hexdigest()


# -- work -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskRequest:
    """One task sent to a slot. `attempt` starts at 1. `code` is the digest of the user's code
    the task must run with ("" when none was shipped): a slot with other code refuses it.
    `keep` (> 0): keep the value on this host as object `keep` (`pool.submit(task, keep=True)`)
    and report in its place the tuple `(ObjectRef(keep), nbytes, shape, dtype)` (shape and
    dtype of an array, `()` and `""` otherwise). Sent only when set, so older agents read
    every other request. `tail`: sent near the end of the work behind a task the slot already
    holds (`core/tailfeed.py`): the agent feeds it to the slot process only once that is idle,
    so that a steal-back can still take it meanwhile (sent only when set, after `keep`)."""

    task_id: int
    slot: int
    attempt: int
    call: KernelCall | BinaryCall
    timeout: float | None = None
    backend: str = "cpu"
    code: str = ""
    keep: int = 0
    tail: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Run:
    """Queue these tasks on their slots, in order. Tasks for several slots may share a frame."""

    tasks: tuple[TaskRequest, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Started:
    """These tasks began running (each on the slot it was sent to)."""

    task_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskOutcome:
    """How one task ended on its slot. `run_s` is wall time on the slot, in seconds.

    `status` travels as the outcome's string value ("ok", "error", ...)."""

    task_id: int
    slot: int
    attempt: int
    status: Outcome
    value: Any = None
    stdout: bytes = b""
    stderr: bytes = b""
    exit_code: int | None = None
    error: str | None = None
    run_s: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Done:
    """Results, batched."""

    results: tuple[TaskOutcome, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class StealBack:
    """Give back these tasks of `slot` if they have not started (a transactional steal)."""

    slot: int
    task_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class StealBackReply:
    """The agent's answer: `returned` were removed unstarted; `refused` started or are unknown."""

    slot: int
    returned: tuple[int, ...]
    refused: tuple[int, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Put:
    """Keep `value` on this host as object `object_id`: tasks name it with an ObjectRef, and the
    agent puts the value in the ref's place before a slot sees the task."""

    object_id: int
    value: Any


@dataclass(frozen=True, slots=True, kw_only=True)
class Drop:
    """Forget these objects (unknown ids are ignored)."""

    object_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Fetch:
    """Send object `object_id` (kept or put here) back: the answer is a Done holding one
    TaskOutcome with `task_id=request_id`, slot 0, attempt 1, status ok and the value (or
    status error and why), so that a fetched value travels exactly like a task's result.
    The coordinator draws `request_id` from its task ids, so it names no task. `lend` (agent
    to slot only, sent only when set): answer with the value's large arrays as references to
    the slot's own memory, which the agent reads while it forwards them (`agent/lend.py`)."""

    object_id: int
    request_id: int
    lend: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class ObjectsLost:
    """Kept results that lived in a slot's worker process are gone with it (it died, was
    killed at a timeout or cancel, or was replaced for new code): the coordinator makes
    them again from their lineage. Sent before any outcome that follows from the loss."""

    object_ids: tuple[int, ...]
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Cancel:
    """Drop these tasks if queued, kill them if running; each is answered by a `cancelled` outcome."""

    task_ids: tuple[int, ...]


# -- health ---------------------------------------------------------------------------------

SLOT_UP = "up"
SLOT_RESTARTING = "restarting"
SLOT_DOWN = "down"


@dataclass(frozen=True, slots=True, kw_only=True)
class SlotChanged:
    """A slot's worker process changed state (died and is restarting, gave up, came back)."""

    slot: int
    state: str
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuSample:
    """One NVML reading; a field NVML cannot read is None (shown as unknown, never hides the rest)."""

    index: int
    utilization: float | None = None  # percent
    memory_used: int | None = None  # bytes
    memory_total: int | None = None  # bytes
    temperature: float | None = None  # degrees Celsius
    power: float | None = None  # watts
    cached_values: int = 0  # values resident in this GPU's device cache, over its slots (GpuCache)
    cached_bytes: int = 0  # their bytes on the card
    cache_cap: int = 0  # the cache's cap on this GPU, summed over its slots; 0: no device cache


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuCache:
    """A GPU slot's device cache as it stands now (values uploaded once to the card and kept
    there): how many values, their bytes, and the cache's cap in bytes. The slot sends it to
    its agent whenever the cache changed, after a batch of results; it travels on the slot's
    pipe only, and the agent sums it per GPU into the Heartbeat's `GpuSample`s."""

    slot: int
    values: int
    nbytes: int
    cap: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat:
    """Sent every heartbeat interval; carries telemetry sampled at that moment."""

    seq: int
    cpu_percent: float
    memory_used: int
    memory_total: int
    gpus: tuple[GpuSample, ...] = ()
    gpu_status: str = ""  # why there is no GPU data ("no NVIDIA driver"), empty when there is
    objects: int = 0  # objects in the agent's store (put and kept), in memory or spilled
    object_bytes: int = 0  # their bytes, wherever they are (a slot's process included)
    spilled_bytes: int = 0  # of which on local disk (past the store's memory cap)
    slot_object_bytes: int = 0  # kept bytes that crossed a slot's pipe to the agent, in all


@dataclass(frozen=True, slots=True, kw_only=True)
class DataLink:
    """Dial the coordinator's data listener at `host`:`port` (`transport/bulk.py`): streamed
    arrays then travel there, beside this channel. The listener's certificate must have the
    SHA-256 `fingerprint`; `token` (one-time, this session's) proves the dialler is this agent.
    Both are secrets of this channel: they never appear in argv or logs. `encryption` "none":
    the connections are plain TCP (no certificate: `fingerprint` is unused), and each end
    proves it knows the token by an HMAC over both ends' nonces, never sending it."""

    host: str
    port: int
    token: bytes
    fingerprint: bytes
    encryption: str = "tls"

    def __repr__(self) -> str:  # never the token in a log or a traceback
        return f"DataLink(host={self.host!r}, port={self.port}, encryption={self.encryption!r})"


@dataclass(frozen=True, slots=True, kw_only=True)
class Keepalive:
    """The coordinator is there: sent when it has sent nothing else for a while. A host cut
    off from its coordinator (a network partition) gets no end of stream; an agent that hears
    nothing at all for long enough knows it is alone, and exits with its slots."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Shutdown:
    """Stop: kill running work, stop the slots, say Bye and exit."""

    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Bye:
    """The agent is exiting."""

    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Error:
    """The sender hit a protocol error and will close. `message` names what was wrong."""

    message: str


Message = (
    Hello
    | Welcome
    | Code
    | CodeStored
    | CodeLoaded
    | Run
    | Started
    | Done
    | StealBack
    | StealBackReply
    | Put
    | Drop
    | Fetch
    | Cancel
    | SlotChanged
    | ObjectsLost
    | GpuCache
    | Heartbeat
    | DataLink
    | Keepalive
    | Shutdown
    | Bye
    | Error
)
