"""The agent's object store: `pool.put` values and kept results, capped in memory, spilled to disk.

The coordinator puts values here (`Put`) and tasks sent with `keep` leave their results here
(`TaskRequest.keep`): a consumer on this host reads them without the bytes leaving it, and
the coordinator fetches one only when asked (`Fetch`). Kept results of a long pipeline can
outgrow the host's memory, so the store holds at most `cap_bytes` in memory and writes the
least recently used values past that to its own folder under batuta's cache
(`<cache>/objects/<pid>-<n>`): arrays as `.npy` files read back memory-mapped (a slot gets
them without the agent ever holding them whole again), other values as one codec frame.
The folder is removed when the store closes, and folders of agents that died without
closing are removed when the next store on that host is made.

A kept result stays in the slot process that made it (as Dask keeps a result in its
worker): the store records only that object N lives in slot S and counts its bytes against
the cap (`keep_in_slot`). Its bytes leave the slot only on demand, through the agent
(`keeper.py` asks the slot, the slot answers with a `Put`): a `Fetch` (passed on to the
coordinator, or lent, read from the slot's memory, when the data link sends: `lend.py`; the
value stays in the slot alone, so that the host holds it once), a consumer
on another slot of this host (the value then stays in the store as well, `settle`), or a
spill, which asks the slot for it (`on_evict`) and writes it to disk once it is here. A slot process that
dies loses the values it held (`lose_slot`): the coordinator makes them again from their
lineage. Values that other slots were given are dropped from them when the value spills
(`on_spill`), so that the cap bounds their copies as well.

The cap defaults to `DEFAULT_FRACTION` of the host's RAM; `--object-memory` (bytes, or a
percentage of RAM such as `25%`) or `BATUTA_OBJECT_MEMORY` set it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from batuta.agent.code import cache_write_fix
from batuta.errors import UsageError
from batuta.protocol.codec import FrameDecoder, encode_message_parts
from batuta.protocol.messages import Put

OBJECT_MEMORY_ENV = "BATUTA_OBJECT_MEMORY"
ENV_GIVEN = f"{OBJECT_MEMORY_ENV} (in the host's environment, or its env in the cluster file)"
DEFAULT_FRACTION = 0.3  # of the host's RAM, when neither the option nor the variable says
_NO_LIMIT = 1 << 62  # a spilled frame is this host's own file, not a peer's message
_FOLDERS = itertools.count()  # several stores in one process (tests) get one folder each
# After the disk refused a spill, none is tried for this long, or until a spilled file is
# removed: every put past the cap tried again, paying a write (as large as the value) that
# failed the same way, while nothing on the host could have changed.
SPILL_RETRY_S = 30.0


def parse_amount(text: str, total: int, *, zero_share: bool = False) -> int:
    """Bytes (`4000000000`, `4G`, `512M`) or a share of `total` (`25%`; `0%` only with
    `zero_share`). Raises ValueError for anything else; callers name their option."""
    value = text.strip().upper()
    if value.endswith("%"):
        share = float(value[:-1])
        if not (0 <= share <= 100 if zero_share else 0 < share <= 100):
            raise ValueError(text)
        return int(total * share / 100)
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(value[-1:], 1)
    number = float(value[:-1] if scale > 1 else value)
    if number < 0:
        raise ValueError(text)
    return int(number * scale)


def parse_object_memory(text: str, memory_total: int, *, given: str = "--object-memory") -> int:
    """`--object-memory` (or what `given` names): a number of bytes (`4000000000`, `4G`,
    `512M`) or a share of RAM (`25%`). Raises UsageError naming where the value came from,
    the value and the forms it takes."""
    try:
        return parse_amount(text, memory_total)
    except ValueError:
        raise UsageError(f"{given} {text!r}: expected bytes (like 4G or 512M) or a share of RAM (like 25%)") from None


GPU_CACHE_ENV = "BATUTA_GPU_CACHE"  # the GPU slots' device cache (device_values.py)


def parse_gpu_cache(text: str, free_bytes: int) -> int:
    """`BATUTA_GPU_CACHE`: bytes (`8G`, `512M`, `0`) or a share of the card's free memory
    (`40%`). Raises UsageError naming the value and the forms it takes. Here, beside the
    object memory's, so that the agent refuses a bad value at its start without importing
    the device cache: read on a slot's first GPU task, it failed those tasks alone."""
    try:
        return parse_amount(text, free_bytes, zero_share=True)
    except ValueError:
        raise UsageError(
            f"{GPU_CACHE_ENV}={text!r}: expected bytes (like 8G or 512M, 0 for no cache) or a share of "
            "the GPU's free memory (like 40%)"
        ) from None


HOST_MEMORY_ENV = "BATUTA_HOST_MEMORY"  # the memory the agent takes its host to have (host_memory)


def parse_host_memory(text: str) -> int:
    """`BATUTA_HOST_MEMORY`: bytes (`16G`, `512M`). Raises UsageError naming the value and its form."""
    try:
        if text.strip().endswith("%"):
            raise ValueError(text)  # a share of what? This is the figure shares are taken of.
        amount = parse_amount(text, 0)
    except ValueError:
        amount = 0
    if amount <= 0:
        raise UsageError(f"{HOST_MEMORY_ENV}={text!r}: expected the host's memory in bytes (like 16G or 512M)")
    return amount


def host_memory(
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    own: Path = Path("/proc/self/cgroup"),
    environ: Mapping[str, str] | None = None,
) -> int:
    """The memory this agent may use, in bytes (0 if unknown): the host's RAM, or its memory
    cgroup's limit where that is lower (a Slurm job's, a container's); `BATUTA_HOST_MEMORY`
    where set. With the RAM alone, the store's 30% of a 64 GiB node outgrew a job's 8 GiB, and
    the kernel killed the agent for it instead of its spilling to disk."""
    env = os.environ if environ is None else environ
    if env.get(HOST_MEMORY_ENV):
        return parse_host_memory(env[HOST_MEMORY_ENV])
    try:
        import psutil

        total = int(psutil.virtual_memory().total)
    except Exception:  # no psutil here: the cap falls back to a fixed size
        total = 0
    limit = _cgroup_memory_limit(cgroup_root, own)
    return min(total, limit) if total and limit else total or limit


def _cgroup_memory_limit(cgroup_root: Path, own: Path) -> int:
    """The lowest memory limit on this process's cgroup and its parents (v2 `memory.max`, v1
    `memory.limit_in_bytes`); 0 when there is none or it cannot be read."""
    try:
        lines = own.read_text().splitlines()
    except OSError:
        return 0
    limits: list[int] = []
    for line in lines:
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        if controllers == "":  # v2: one unified hierarchy
            folder, name = cgroup_root / path.lstrip("/"), "memory.max"
        elif "memory" in controllers.split(","):
            folder, name = cgroup_root / "memory" / path.lstrip("/"), "memory.limit_in_bytes"
        else:
            continue
        for level in (folder, *folder.parents):
            if not str(level).startswith(str(cgroup_root)):
                break
            try:
                text = (level / name).read_text().strip()
            except OSError:
                continue
            if text.isdigit() and int(text) < 1 << 60:  # "max", or v1's "no limit" (about 2^63)
                limits.append(int(text))
    return min(limits) if limits else 0


def default_cap(memory_total: int, environ: Mapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    if env.get(OBJECT_MEMORY_ENV):
        return parse_object_memory(env[OBJECT_MEMORY_ENV], memory_total, given=ENV_GIVEN)
    return int(memory_total * DEFAULT_FRACTION) if memory_total else 4 << 30


def value_nbytes(value: Any) -> int:
    """What `value` costs in memory: an array's bytes, else its encoded size."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    try:
        return sum(
            memoryview(p).nbytes for p in encode_message_parts(Put(object_id=0, value=value), max_frame_bytes=_NO_LIMIT)
        )
    except Exception:  # not encodable here: it came over the wire, so this is only a guess
        return 0


class ObjectStore(Mapping[int, object]):
    """Objects by id; a Mapping, so a slot's supervisor reads it like the dict it was.
    Not thread-safe: the agent calls it from its event loop."""

    def __init__(
        self,
        cap_bytes: int,
        root: Path,
        on_spill: Callable[[int], None] | None = None,
        on_evict: Callable[[int, int], None] | None = None,
        warn: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cap_bytes = max(0, cap_bytes)
        self._root = root
        self._warn = warn  # a spill the disk refused, said once until one succeeds again
        self._spill_refused = False
        self._clock = clock
        self._spill_retry_at = 0.0  # after a refusal: no spill tried before then (SPILL_RETRY_S)
        self._on_spill = on_spill  # told each object spilled: the slots drop their copies too
        self._on_evict = on_evict  # (object, slot): fetch it from that slot, to spill it
        self._folder: Path | None = None
        self._memory: dict[int, Any] = {}  # in insertion/use order: the oldest spill first
        self._nbytes: dict[int, int] = {}  # every object, in memory or spilled
        self._spilled: dict[int, Path] = {}
        self._in_slot: dict[int, int] = {}  # object -> the slot whose process alone holds it
        self._evicting: set[int] = set()  # of those, asked for to be spilled
        self._evicting_bytes = 0
        self._lost: set[int] = set()  # lost with a slot's process (a task naming one waits for lineage)
        self.memory_bytes = 0  # in this process or a slot's
        self.spilled_bytes = 0
        # Agents killed with values spilled left their folders: cleared now, not at this store's
        # first spill, which may never come (a killed agent's gigabytes stayed on the disk).
        with contextlib.suppress(OSError):
            _remove_dead_agents_folders(root / "objects")

    # -- Mapping --------------------------------------------------------------------------

    def __getitem__(self, object_id: int) -> object:
        value = self._memory.get(object_id, _MISSING)
        if value is _IN_SLOT:
            raise KeyError(object_id)  # its bytes are in a slot's process (`slot_of`)
        if value is not _MISSING:
            # used again: it is the last to spill (dict order is the LRU order)
            del self._memory[object_id]
            self._memory[object_id] = value
            return value
        path = self._spilled.get(object_id)
        if path is None:
            raise KeyError(object_id)
        return _load(path)

    def __contains__(self, object_id: object) -> bool:
        return object_id in self._nbytes

    def __iter__(self) -> Iterator[int]:
        return iter(self._nbytes)

    def __len__(self) -> int:
        return len(self._nbytes)

    # -- changes --------------------------------------------------------------------------

    def put(self, object_id: int, value: Any) -> int:
        """Keep `value` as `object_id` (replacing any); spill past the cap. Returns its bytes."""
        self.discard(object_id)
        nbytes = value_nbytes(value)
        self._memory[object_id] = value
        self._nbytes[object_id] = nbytes
        self.memory_bytes += nbytes
        self._spill_past_cap()
        return nbytes

    def keep_in_slot(self, object_id: int, slot: int, nbytes: int) -> None:
        """Object `object_id` (`nbytes`) lives in slot `slot`'s process, which made it."""
        self.discard(object_id)
        self._lost.discard(object_id)
        self._memory[object_id] = _IN_SLOT
        self._nbytes[object_id] = nbytes
        self._in_slot[object_id] = slot
        self.memory_bytes += nbytes
        self._spill_past_cap()

    def slot_of(self, object_id: int) -> int | None:
        """The slot whose process alone holds the object, if one does."""
        return self._in_slot.get(object_id)

    @property
    def in_slots(self) -> bool:
        return bool(self._in_slot)

    def settle(self, object_id: int, value: Any) -> None:
        """A slot sent the bytes of an object it held: keep them here too (or spill them, if
        that is why they were asked for). Ignored if the object was dropped meanwhile."""
        if self._in_slot.pop(object_id, None) is None:
            return
        nbytes = self._nbytes[object_id]
        if object_id in self._evicting:
            self._evicting.discard(object_id)
            self._evicting_bytes -= nbytes
            del self._memory[object_id]
            self.memory_bytes -= nbytes
            self._spill_one(object_id, value, nbytes)
            return
        self._memory[object_id] = value
        self._spill_past_cap()

    def lose_slot(self, slot: int) -> tuple[int, ...]:
        """Slot `slot`'s process is gone: forget the objects it alone held; returns them."""
        return self.lose(tuple(i for i, s in self._in_slot.items() if s == slot))

    def lose(self, object_ids: tuple[int, ...]) -> tuple[int, ...]:
        """Forget objects whose only copy is gone, remembering that they were lost."""
        for object_id in object_ids:
            self.discard(object_id)
        self._lost.update(object_ids)
        return object_ids

    def was_lost(self, object_id: int) -> bool:
        """Whether the object was lost with a slot's process (and not made again since)."""
        return object_id in self._lost

    def discard(self, object_id: int) -> None:
        self._lost.discard(object_id)  # dropped or replaced: no longer "lost"
        nbytes = self._nbytes.pop(object_id, None)
        if nbytes is None:
            return
        self._in_slot.pop(object_id, None)
        if object_id in self._evicting:
            self._evicting.discard(object_id)
            self._evicting_bytes -= nbytes
        if self._memory.pop(object_id, _MISSING) is not _MISSING:
            self.memory_bytes -= nbytes
        path = self._spilled.pop(object_id, None)
        if path is not None:
            self.spilled_bytes -= nbytes
            with contextlib.suppress(OSError):
                path.unlink()
            self._spill_retry_at = 0.0  # room on the disk again: a refused spill may fit now

    def nbytes(self, object_id: int) -> int:
        return self._nbytes.get(object_id, 0)

    def stats(self) -> tuple[int, int, int]:
        """(objects, their bytes, of which spilled to disk)."""
        return len(self._nbytes), self.memory_bytes + self.spilled_bytes, self.spilled_bytes

    def close(self) -> None:
        """Forget everything and remove the spill folder."""
        self._memory.clear()
        self._nbytes.clear()
        self._spilled.clear()
        self._in_slot.clear()
        self._evicting.clear()
        self._lost.clear()
        self.memory_bytes = self.spilled_bytes = self._evicting_bytes = 0
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    # -- spilling -------------------------------------------------------------------------

    def _spill_past_cap(self) -> None:
        if self._spill_refused and self._clock() < self._spill_retry_at:
            return  # the disk refused lately: over the cap until it may have room (SPILL_RETRY_S)
        while self.memory_bytes - self._evicting_bytes > self.cap_bytes:
            object_id = next((i for i in self._memory if i not in self._evicting), None)
            if object_id is None:
                return
            nbytes = self._nbytes[object_id]
            value = self._memory[object_id]
            if value is _IN_SLOT:  # its bytes are in a slot: ask for them, spill them when here
                self._evicting.add(object_id)
                self._evicting_bytes += nbytes
                if self._on_evict is not None:
                    self._on_evict(object_id, self._in_slot[object_id])
                continue
            del self._memory[object_id]
            self.memory_bytes -= nbytes
            if not self._spill_one(object_id, value, nbytes):
                return

    def _spill_one(self, object_id: int, value: Any, nbytes: int) -> bool:
        """Write a value that just left memory to disk; False if the disk refused it."""
        try:
            self._spilled[object_id] = self._write(object_id, value)
        except OSError as exc:  # a refused write (a full disk) keeps it in memory, over the cap, rather than lose it
            self._memory[object_id] = value
            self.memory_bytes += nbytes
            if not self._spill_refused and self._warn is not None:
                self._warn(
                    f"cannot spill object {object_id} ({nbytes:,} bytes) to {self._folder or self._root / 'objects'}: "
                    f"{type(exc).__name__}: {exc.strerror or exc}; objects stay in memory, over the "
                    f"{self.cap_bytes:,}-byte cap, until it can: {cache_write_fix(exc)} "
                    f"(tried again after {SPILL_RETRY_S:.0f} s or once a "
                    f"spilled value is freed; said again only after a spill succeeds)"
                )
            self._spill_refused = True
            self._spill_retry_at = self._clock() + SPILL_RETRY_S
            return False
        self._spill_refused = False
        self.spilled_bytes += nbytes
        if self._on_spill is not None:
            self._on_spill(object_id)
        return True

    def _write(self, object_id: int, value: Any) -> Path:
        """Write the value's file; a write the disk refuses part way leaves no file behind (a
        partial `.npy` stayed, and a later store might take it for a whole one)."""
        folder = self._spill_folder()
        array = isinstance(value, np.ndarray) and not value.dtype.hasobject
        path = folder / f"{object_id}.{'npy' if array else 'frame'}"
        try:
            if array:
                np.save(path, value, allow_pickle=False)
                return path
            with open(path, "wb") as out:
                for part in encode_message_parts(Put(object_id=object_id, value=value), max_frame_bytes=_NO_LIMIT):
                    out.write(part)
        except BaseException:
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        return path

    def _spill_folder(self) -> Path:
        if self._folder is None:
            base = self._root / "objects"
            base.mkdir(parents=True, exist_ok=True)
            _remove_dead_agents_folders(base)
            self._folder = base / f"{os.getpid()}-{next(_FOLDERS)}"
            self._folder.mkdir(mode=0o700, exist_ok=True)
        return self._folder


_MISSING = object()
_IN_SLOT = object()  # in `_memory`: the bytes are in a slot's process (`_in_slot` says which)


def _load(path: Path) -> object:
    if path.suffix == ".npy":
        return np.load(path, mmap_mode="r", allow_pickle=False)
    decoder = FrameDecoder(max_frame_bytes=max(path.stat().st_size, 1 << 20))
    decoder.feed(path.read_bytes())
    message = decoder.next_message()
    assert isinstance(message, Put)
    return message.value


def _remove_dead_agents_folders(base: Path) -> None:
    """Spill folders of agents on this host that died without closing their store."""
    if not base.is_dir():
        return
    for folder in base.iterdir():
        pid_text = folder.name.split("-", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:  # alive, someone else's: leave it
            continue
