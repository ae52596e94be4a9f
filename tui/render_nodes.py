"""Drawing the nodes panel: a line per host and per GPU, or, in a large cluster, a summary
line and one line per host with a cell per GPU. Pure functions of the view-model, like the
rest of `render.py` (whose helpers and `Palette` they use)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from rich.text import Text

from . import format as fmt
from .alerts import GPU_HOT_C, GPU_MEMORY_ALERT_FRACTION
from .model import DashboardModel, GpuRow, HostRow
from .render import (
    BLOCKS,
    STATE_ICONS,
    Cell,
    Column,
    Palette,
    fit,
    hbar,
    joined,
    spark,
    state_style,
    table_header,
    table_row,
    wrap_keeping_ends,
)

NODE_COLUMNS = (
    Column("HOST", fmt.HOST_CELLS),
    Column("STATE", 11),
    Column("CPU", 11),
    Column("MEMORY GiB", 19),
    Column("SLOTS", 7, right=True),
    Column("DONE", 9, right=True),
    Column("HEARTBEAT", 9, right=True),
)


def node_header(p: Palette) -> Text:
    return table_header(NODE_COLUMNS, p)


REASON_INDENT = 5  # "   └ ", as the GPU lines under a host
REASON_LINES = 4  # at most, for why a host is not up; a longer reason loses its middle


@dataclass(frozen=True, slots=True)
class _ReasonLine:
    text: str
    first: bool


@dataclass(frozen=True, slots=True)
class _UnusedGpus:
    """The host's GPUs no slot runs on (`gpus = [0, 2]` of four): one line, not their readings."""

    indices: tuple[int, ...]


class NodeRows:
    """The nodes panel's lines, drawn on demand: one per host, then why it is not up (wrapped,
    never cut at the end: the cause comes last), then one per GPU its slots run on, one for
    the GPUs they do not, or 'no GPU'.

    `compact` (a cluster whose lines do not fit the panel): one line per host, its GPUs drawn
    as one cell each at the end of it, and the hosts that are not up first, so that a lost
    host among 256 is on screen without scrolling."""

    def __init__(self, model: DashboardModel, now: float, p: Palette, width: int, *, compact: bool = False) -> None:
        self._busy = model.busy_slots()
        self._now, self._p, self._width = now, p, width
        self._compact = compact
        self._labels = fmt.short_names(tuple(model.hosts), fmt.HOST_CELLS)
        self._entries: list[tuple[HostRow, GpuRow | _ReasonLine | _UnusedGpus | None]] = []
        hosts = list(model.hosts.values())
        if compact:  # stable sort: trouble first, then the order hosts were listed in
            hosts.sort(key=lambda h: h.state not in _TROUBLE_STATES)
        for host in hosts:
            self._entries.append((host, None))
            if host.reason and host.state != "up":
                lines = wrap_keeping_ends(_live_reason(host, now), width - REASON_INDENT, REASON_LINES)
                self._entries.extend((host, _ReasonLine(text, i == 0)) for i, text in enumerate(lines))
            if compact:
                continue
            used, unused = host.used_gpus(), host.unused_gpus()
            self._entries.extend((host, gpu) for gpu in used)
            if unused:
                self._entries.append((host, _UnusedGpus(tuple(unused))))
            elif not used and (host.telemetry_seen or host.gpu_status):
                self._entries.append((host, _NO_GPU))

    def __len__(self) -> int:
        return len(self._entries)

    def _label(self, host: HostRow) -> str:
        return self._labels.get(host.name) or host.name

    def __getitem__(self, index: int) -> Text:
        host, gpu = self._entries[index]
        p = self._p
        if gpu is None:
            if self._compact and host.used_gpus():  # the cells at one column on every line, then failures
                cells = _gpu_cells(host, p, self._width - _CELLS_AT - 14)
                return _host_line(host, self._label(host), self._busy, self._now, p, gpu_cells=cells)
            return _host_line(host, self._label(host), self._busy, self._now, p)
        if isinstance(gpu, _ReasonLine):
            line = Text("   └ " if gpu.first else " " * REASON_INDENT, p.dim, no_wrap=True)
            line.append(gpu.text, p.bad if host.state in ("lost", "retired") else p.warn)
            return line
        if isinstance(gpu, _UnusedGpus):
            line = Text("   └ ", p.dim, no_wrap=True, overflow="ellipsis")
            line.append(f"GPU {', '.join(map(str, gpu.indices))}", p.dim)
            line.append(f"  unused: no slot runs on {'it' if len(gpu.indices) == 1 else 'them'}", p.dim)
            return line
        if gpu is _NO_GPU:
            line = Text("   └ ", p.dim, no_wrap=True, overflow="ellipsis")
            line.append("no GPU", p.label)
            line.append(f"  {host.gpu_status or 'none reported'}", p.dim)
            return line
        if host.state in _GONE:  # its last readings are old: shown as current, they told a lie
            line = Text("   └ ", p.dim, no_wrap=True, overflow="ellipsis")
            line.append(fit(f"GPU {gpu.index}", 6), p.label)
            line.append(fit(gpu.name, 16), p.dim)
            line.append(f" no readings while the host is {host.state}", p.dim)
            return line
        return _gpu_line(gpu, self._now, p, self._width)


_NO_GPU = GpuRow(index=-1, name="no GPU")
_GONE = frozenset({"lost", "unreachable", "retired", "closed"})  # states without live readings
_GPU_LINE_FIXED = 82  # a GPU line's cells besides its utilization history and its cache
_GPU_LINE_MARGIN = 3  # cells left free at its end
_CACHE_CELL = 13  # "  cache " and the bytes, right-aligned in 5
_HISTORY_MIN, _HISTORY_MAX = 10, 60  # seconds of utilization history shown (one cell each)
_CELLS_AT = sum(c.width + 1 for c in NODE_COLUMNS)  # where a compact host line's GPU cells start
_TROUBLE_STATES = frozenset({"suspected", "lost", "retired", "starting", "restarting", "unfit"})


_SILENT_FOR = re.compile(r"^no heartbeat for [0-9.]+s")


def _live_reason(host: HostRow, now: float) -> str:
    """A suspected host's reason with its silence as long as it is now: it kept the 3.2 s it
    had when suspected while the HEARTBEAT column counted on."""
    age = host.heartbeat_age(now)
    if host.state != "suspected" or age is None or not _SILENT_FOR.match(host.reason):
        return host.reason
    return _SILENT_FOR.sub(f"no heartbeat for {age:.1f}s", host.reason, count=1)


def _gpu_trouble(gpu: GpuRow) -> bool:
    fraction = gpu.memory_fraction
    hot = gpu.temperature is not None and gpu.temperature >= GPU_HOT_C
    return hot or (fraction is not None and fraction > GPU_MEMORY_ALERT_FRACTION)


def _gpu_cells(host: HostRow, p: Palette, room: int) -> Text:
    """A compact host line's GPUs: one cell each, its height the utilization (`·` unread),
    drawn as a problem when the card is hot or its memory nearly full; then their mean, and
    the bytes their device caches hold where the line has room for it besides every cell."""
    gpus = host.used_gpus()
    out = Text("  GPU ", p.dim, no_wrap=True)
    room = max(room, 16)
    readings = [g.utilization for g in gpus if g.utilization is not None]
    mean = f" {sum(readings) / len(readings):3.0f}%" if readings else "   ?%"
    cached = sum(g.cached_bytes for g in gpus)
    cache = f"  cache {fmt.size(cached)}"
    if room - out.cell_len - len(mean) - len(cache) < len(gpus):
        cache = ""  # the cells come first
    cells = max(1, room - out.cell_len - len(mean) - len(cache))
    shown = gpus if len(gpus) <= cells else gpus[: max(0, cells - 3)]
    for gpu in shown:
        if gpu.utilization is None:
            out.append("·", p.dim)
        else:
            level = max(1, min(8, math.ceil(gpu.utilization / 100 * 8)))
            out.append(BLOCKS[level], p.bad if _gpu_trouble(gpu) else p.spark)
    if len(shown) < len(gpus):
        out.append(f"+{len(gpus) - len(shown)}", p.dim)
    out.append(mean, p.text if readings else p.dim)
    if cache:
        out.append(cache, p.text if cached else p.dim)
    return out


def nodes_summary(model: DashboardModel, p: Palette) -> Text:
    """The line over a large cluster's table: hosts by state, busy slots, and its GPUs at a
    glance (mean utilization, how many are idle, hot, or nearly out of memory)."""
    states: dict[str, int] = {}
    for host in model.hosts.values():
        states[host.state] = states.get(host.state, 0) + 1
    count = len(model.hosts)
    out = Text(f" {count} host{'s' if count != 1 else ''}: ", p.label, no_wrap=True, overflow="ellipsis")
    order = sorted(states, key=lambda state: (state != "up", state))
    for i, state in enumerate(order):
        if i:
            out.append(" · ", p.dim)
        out.append(f"{states[state]} {state}", state_style(state, p))
    busy = len(model.busy_slots())
    out.append(f"   slots {busy}/{model.slot_count()} busy", p.text)
    gpus = [gpu for host in model.hosts.values() for gpu in host.used_gpus()]
    if gpus:
        readings = [g.utilization for g in gpus if g.utilization is not None]
        out.append(f"   {len(gpus)} GPUs", p.label)
        if readings:
            out.append(f": mean {sum(readings) / len(readings):.0f}%", p.text)
            idle = sum(1 for u in readings if u < 5)
            out.append(f" · {idle} idle", p.text)
        trouble = sum(1 for g in gpus if _gpu_trouble(g))
        out.append(f" · {trouble} hot or full", p.bad if trouble else p.text)
        cached = sum(g.cached_bytes for g in gpus)
        out.append(f" · cache {fmt.size(cached)}", p.text if cached else p.dim)
    return out


def node_lines(model: DashboardModel, now: float, p: Palette, width: int) -> list[Text]:
    """Every line of the nodes panel (the panel itself draws only the visible ones)."""
    rows = NodeRows(model, now, p, width)
    return [rows[i] for i in range(len(rows))]


def _host_line(
    host: HostRow, label: str, busy: dict[str, int], now: float, p: Palette, *, gpu_cells: Text | None = None
) -> Text:
    icon = STATE_ICONS.get(host.state, "◌")
    if host.state in _GONE:  # the last readings before it went: not what it does now
        cpu: Cell = ("-", p.dim)
    elif host.cpu_percent is None:
        cpu = ("?", p.dim)
    else:
        cpu = joined(hbar(host.cpu_percent / 100, 5, p.bar, p.bar_empty), (f"{host.cpu_percent:5.0f}%", p.text))
    if host.state in _GONE:
        memory: Cell = ("-", p.dim)
    elif host.memory_used is None or not host.memory_total:
        memory = ("?", p.dim)
    else:
        numbers = f"{fmt.gib(host.memory_used)}/{fmt.gib(host.memory_total)}"
        memory = joined(hbar(host.memory_used / host.memory_total, 5, p.bar, p.bar_empty), (f"{numbers:>14}", p.text))
    busy_here = sum(1 for slot in host.slot_ids if slot in busy)
    age = host.heartbeat_age(now)
    age_style = p.dim if age is None else (p.text if age < 3 else p.warn if age < 8 else p.bad)
    out = table_row(
        NODE_COLUMNS,
        [
            (label, p.label),
            (f"{icon} {host.state}", state_style(host.state, p)),
            cpu,
            memory,
            (f"{busy_here}/{len(host.slot_ids)}", p.accent if busy_here else p.text),
            (fmt.count(host.done), p.text),
            (fmt.age(age), age_style),
        ],
    )
    if gpu_cells is not None:
        out.append_text(gpu_cells)
    if host.failed:
        out.append(f"  {fmt.count(host.failed)} failed", p.bad)
    if host.objects:
        spilled = f", {fmt.gib(host.spilled_bytes)} GiB spilled" if host.spilled_bytes else ""
        out.append(f"  {fmt.count(host.objects)} obj {fmt.gib(host.object_bytes)} GiB{spilled}", p.dim)
    return out  # why it is not up: on the lines below (NodeRows), whole


def _gpu_line(gpu: GpuRow, now: float, p: Palette, width: int) -> Text:
    out = Text(no_wrap=True, overflow="ellipsis")
    out.append("   └ ", p.dim)
    out.append(fit(f"GPU {gpu.index}", 6), p.label)
    out.append(fit(gpu.name, 16), p.dim)
    out.append(" util ", p.dim)
    # The cache's cell where the line has room for it besides the shortest history; the
    # history takes what is left.
    cache = width >= _GPU_LINE_FIXED + _GPU_LINE_MARGIN + _CACHE_CELL + _HISTORY_MIN
    room = width - _GPU_LINE_FIXED - _GPU_LINE_MARGIN - (_CACHE_CELL if cache else 0)
    history_width = max(_HISTORY_MIN, min(_HISTORY_MAX, room))
    out.append_text(spark(gpu.utilization_history(now), history_width, 100.0, p.spark, p.dim))
    out.append(fit(fmt.percent(gpu.utilization), 5, right=True), p.dim if gpu.utilization is None else p.text)
    out.append("   mem ", p.dim)
    fraction = gpu.memory_fraction
    full = fraction is not None and fraction > GPU_MEMORY_ALERT_FRACTION
    out.append_text(hbar(fraction, 6, p.bad if full else p.bar, p.bar_empty))
    memory = f"{fmt.gib(gpu.memory_used)}/{fmt.gib(gpu.memory_total)} GiB"
    out.append(fit(memory, 15, right=True), p.dim if gpu.memory_used is None else (p.bad if full else p.text))
    if cache:
        out.append("  cache ", p.dim)
        out.append(fit(fmt.size(gpu.cached_bytes), 5, right=True), p.text if gpu.cached_bytes else p.dim)
    hot = gpu.temperature is not None and gpu.temperature >= GPU_HOT_C
    temperature = "? °C" if gpu.temperature is None else f"{gpu.temperature:.0f} °C"
    out.append(fit(temperature, 8, right=True), p.dim if gpu.temperature is None else (p.bad if hot else p.text))
    power = "? W" if gpu.power is None else f"{gpu.power:.0f} W"
    out.append(fit(power, 8, right=True), p.dim if gpu.power is None else p.text)
    return out
