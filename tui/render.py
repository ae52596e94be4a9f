"""Drawing code: view-model in, Rich `Text` lines out. No Textual, no state, no colours.

Like Textual's own Sparkline (drawing in `renderables/`, a thin widget around it), every
panel's look is a pure function here and the widgets only decide *when* to call it. Styles
arrive in a `Palette` that the widgets resolve from component classes in `batuta.tcss`
(theme variables such as `$success`), so this module never names a colour and the
snapshot tests can draw with `Palette.plain()` and compare text.

Clickable pieces (a failed task's id, a latency filter) carry Textual's `@click` action
in their style's meta, which Textual dispatches for any rendered segment.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Protocol

from rich.cells import cell_len
from rich.style import Style
from rich.text import Text

from . import format as fmt
from .alerts import ERROR
from .histogram import BUCKETS_PER_DECADE, DECADES, LogHistogram, bucket_of
from .model import (
    FAILED_STATUSES,
    LATENCY_DIMENSIONS,
    DashboardModel,
    JobRow,
    LogLine,
    SlotRow,
    StreamRow,
)

BLOCKS = " ▁▂▃▄▅▆▇█"  # vertical eighths, index 0..8
HBLOCKS = " ▏▎▍▌▋▊▉█"  # horizontal eighths
STATE_ICONS = {
    "up": "●",
    "suspected": "◐",
    "lost": "○",
    "retired": "✖",
    "draining": "◑",
    "drained": "◌",
    "closed": "·",
    "unfit": "✚",
}
FAILED_STATE_NAMES = frozenset(status.value for status in FAILED_STATUSES)
STREAM_ICONS = {"running": "▶", "succeeded": "✔", "requeued": "↻", "cancelled": "⊘"}


@dataclass(frozen=True, slots=True)
class Palette:
    """The styles the drawing code uses; the widgets fill it from `.tcss` component classes."""

    text: Style
    dim: Style
    heading: Style
    label: Style
    ok: Style
    warn: Style
    bad: Style
    accent: Style
    bar: Style
    bar_empty: Style
    spark: Style
    p50: Style
    p95: Style
    p99: Style
    link: Style

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def plain(cls) -> Palette:
        """No styling at all: for tests and plain-text snapshots."""
        null = Style.null()
        return cls(**{name: null for name in cls.names()})


def click(action: str) -> Style:
    """A style that makes a segment run a Textual action when clicked."""
    return Style.from_meta({"@click": action})


# -- small pieces ---------------------------------------------------------------------------


def fit(text: str, width: int, *, right: bool = False) -> str:
    """`text` padded or cut (with an ellipsis) to exactly `width` cells (a CJK character takes two)."""
    if width <= 0:
        return ""
    text = fmt.cut_end(text, width)
    pad = " " * (width - cell_len(text))
    return pad + text if right else text + pad


def keep_ends(text: str, limit: int) -> str:
    """`text` in at most `limit` characters, cut in the middle (…): a reason's start says what
    happened and its end why, or what to do ("No module named 'batuta'"); both must show."""
    if len(text) <= limit:
        return text
    marker = " … "
    room = max(limit - len(marker), 2)
    head = room // 2
    return text[:head] + marker + text[len(text) - (room - head) :]


def wrap_keeping_ends(text: str, width: int, max_lines: int) -> list[str]:
    """`text` on at most `max_lines` lines of `width` cells: wrapped, and when it needs more
    lines than that, cut in the middle first (`keep_ends`), never at the end."""
    width = max(width, 12)
    text = " ".join(text.split())
    budget = width * max_lines
    for _ in range(64):  # bounded: each round shortens the text by a quarter line
        lines = textwrap.wrap(keep_ends(text, budget), width, break_on_hyphens=False) or [""]
        if len(lines) <= max_lines:
            return lines
        budget -= max(width // 4, 1)
    return textwrap.wrap(keep_ends(text, width), width)[:1]


def hbar(fraction: float | None, width: int, fill: Style, empty: Style) -> Text:
    """A thin horizontal bar of `width` cells filled to `fraction` (half-cell resolution)."""
    out = Text(no_wrap=True)
    if width <= 0:
        return out
    if fraction is None:
        out.append("?".center(width, "┈"), empty)
        return out
    halves = round(max(0.0, min(1.0, fraction)) * width * 2)
    full, half = divmod(halves, 2)
    out.append("━" * full, fill)
    if half:
        out.append("╸", fill)
    out.append("─" * (width - full - half), empty)
    return out


def spark(values: Sequence[float | None], width: int, top: float, style: Style, gap: Style) -> Text:
    """A one-line sparkline of `values` scaled from 0 to `top`, in `width` cells.

    Values are grouped into `width` buckets (the maximum of each). A bucket with no value
    draws blank before the first reading and as a dot after it, so a missed heartbeat
    reads as missing data rather than as an idle device.
    """
    out = Text(no_wrap=True)
    if width <= 0:
        return out
    count = len(values)
    if count == 0:
        out.append(" " * width)
        return out
    top = top if top > 0 else 1.0
    seen = False
    for column in range(width):
        start = column * count // width
        end = max(start + 1, (column + 1) * count // width)
        bucket = [v for v in values[start:end] if v is not None]
        if not bucket:
            out.append("·" if seen else " ", gap)
            continue
        seen = True
        level = max(bucket) / top
        out.append(BLOCKS[max(1, min(8, math.ceil(level * 8)))] if level > 0 else "▁", style)
    return out


@dataclass(frozen=True, slots=True)
class Column:
    """A table column: its heading, its width in cells, and whether it is right-aligned."""

    title: str
    width: int
    right: bool = False


Cell = Text | tuple[str, Style]


def table_row(columns: Sequence[Column], cells: Sequence[Cell]) -> Text:
    """Cells laid out in `columns` (cut with an ellipsis or padded), one space apart."""
    out = Text(no_wrap=True, overflow="ellipsis")
    for index, (column, cell) in enumerate(zip(columns, cells, strict=False)):
        if index:
            out.append(" ")
        text = cell.copy() if isinstance(cell, Text) else Text(cell[0], cell[1])
        if text.cell_len > column.width:
            text.truncate(column.width, overflow="ellipsis")
        pad = " " * (column.width - text.cell_len)
        if column.right:
            out.append(pad)
            out.append_text(text)
        else:
            out.append_text(text)
            out.append(pad)
    return out


def table_header(columns: Sequence[Column], p: Palette) -> Text:
    return table_row(columns, [(c.title, p.heading) for c in columns])


def joined(*parts: Cell) -> Text:
    """One cell made of several styled pieces (a bar and its number)."""
    out = Text(no_wrap=True)
    for part in parts:
        if isinstance(part, Text):
            out.append_text(part)
        else:
            out.append(part[0], part[1])
    return out


# -- header ---------------------------------------------------------------------------------


SUMMARY_LABEL_CELLS = 20  # a cluster label cut to this where the line does not fit


def summary_line(model: DashboardModel, now: float, p: Palette, version: str, width: int = 0) -> Text:
    """The one-line cluster summary at the top of the screen. Where it does not fit `width`, the
    version, the scheduling word and the end of a long cluster label go first: at 80 columns
    the line was cut at "failed", its count gone with what followed."""
    full = _summary_line(model, p, version, compact=False)
    if width and full.cell_len > width:
        return _summary_line(model, p, version, compact=True)
    return full


def _summary_line(model: DashboardModel, p: Palette, version: str, *, compact: bool) -> Text:
    out = Text(no_wrap=True, overflow="ellipsis")
    out.append(" batuta " if compact else f" batuta {version} ", p.heading)
    out.append(" ")
    label = model.cluster_label
    if compact and cell_len(label) > SUMMARY_LABEL_CELLS:
        label = label[: SUMMARY_LABEL_CELLS - 1] + "…"
    out.append(label, p.label)
    out.append("  ")
    status = model.status
    if status == "failed":
        out.append(f"✖ {model.status_detail or 'failed to start'}", p.bad)
        return out
    if status == "starting":
        out.append(f"◌ {model.status_detail or 'starting hosts…'}", p.warn)
    elif model.paused:
        out.append("⏸ paused", p.warn)
    else:
        out.append("▶" if compact else "▶ scheduling", p.ok)
    up = model.hosts_up()
    total_hosts = len(model.hosts)
    busy = len(model.busy_slots())
    totals = model.totals
    # what a narrow terminal cuts is the end: done and failed come first (at 80 columns they were cut)
    pieces: list[tuple[str, str, Style]] = [
        ("hosts", f"{up}/{total_hosts}", p.ok if up == total_hosts else p.warn),
        ("done", fmt.count(totals.succeeded), p.ok),
        ("failed", fmt.count(totals.failed), p.bad if totals.failed else p.text),
        ("running", fmt.count(model.running_count), p.accent),
        ("queued", fmt.count(model.queued_count), p.text),
        ("busy", f"{busy}/{model.slot_count()}", p.text),
    ]
    if totals.requeued:
        pieces.append(("requeued", fmt.count(totals.requeued), p.warn))
    for label, value, style in pieces:
        out.append(" │ ", p.dim)
        out.append(f"{label} ", p.dim)
        out.append(value, style)
    return out


def throughput_line(model: DashboardModel, now: float, p: Palette, width: int) -> Text:
    """'throughput ▁▂▅▇█▆ 1,234/s  peak 2,000/s (last 60 s)' across `width` cells."""
    series = model.throughput.series(now)[:-1]  # the current second is still filling
    rate = model.throughput.rate(now)
    # the rate counts the filling second too: a burst read '339/s  peak 57/s' until it ended
    peak = max(max(series) if series else 0, round(rate))
    label = " throughput "
    tail = f"  {fmt.rate(rate)}  peak {fmt.rate(peak)}  last {len(series)} s "
    room = max(10, width - len(label) - len(tail))
    out = Text(no_wrap=True, overflow="ellipsis")
    out.append(label, p.dim)
    out.append_text(spark([float(v) for v in series], room, float(peak), p.spark, p.dim))
    out.append(f"  {fmt.rate(rate)}", p.accent)
    out.append(f"  peak {fmt.rate(peak)}  last {len(series)} s ", p.dim)
    return out


def state_style(state: str, p: Palette) -> Style:
    if state in ("up", "drained"):
        return p.ok
    if state in ("suspected", "draining", "starting", "restarting"):
        return p.warn
    return p.bad


class Rows(Protocol):
    """Lines a panel can index lazily: only the rows on screen are ever drawn."""

    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> Text: ...


# -- jobs -----------------------------------------------------------------------------------

JOB_COLUMNS = (
    Column("JOB", 12),
    Column("PROGRESS", 16),
    Column("QUEUED", 7, right=True),
    Column("RUNNING", 7, right=True),
    Column("DONE", 7, right=True),
    Column("FAILED", 6, right=True),
    Column("REQUEUED", 8, right=True),
    Column("RATE", 8, right=True),
    Column("ETA", 7, right=True),
)
JOB_COLUMNS_NARROW = (
    Column("JOB", 10),
    Column("PROGRESS", 11),
    Column("QUEUE", 6, right=True),
    Column("RUN", 5, right=True),
    Column("DONE", 6, right=True),
    Column("FAIL", 5, right=True),
    Column("REQ", 5, right=True),
    Column("RATE", 7, right=True),
    Column("ETA", 6, right=True),
)


# An 80-column terminal's jobs panel (about 46 cells): what ran, what failed and the state;
# the narrow layout cut it after DONE there, the failed count and the state with it
JOB_COLUMNS_TINY = (
    Column("JOB", 10),
    Column("PROGRESS", 11),
    Column("DONE", 6, right=True),
    Column("FAIL", 5, right=True),
    Column("RATE", 9, right=True),
)
_TINY_CELLS = (0, 1, 4, 5, 7)  # of the wide layout's cells: job, progress, done, failed, rate or state


def job_columns(width: int) -> tuple[Column, ...]:
    if width >= sum(c.width + 1 for c in JOB_COLUMNS):
        return JOB_COLUMNS
    # the narrow layout's last cell may be cut (its ETA); below that, whole columns were
    return JOB_COLUMNS_NARROW if width >= sum(c.width + 1 for c in JOB_COLUMNS_NARROW[:-1]) else JOB_COLUMNS_TINY


def job_header(p: Palette, width: int) -> Text:
    return table_header(job_columns(width), p)


def job_lines(model: DashboardModel, now: float, p: Palette, width: int) -> list[Text]:
    """One line per job, the newest first."""
    columns = job_columns(width)
    return [_job_line(job, now, p, columns) for job in reversed(model.jobs.values())]


def _job_line(job: JobRow, now: float, p: Palette, columns: Sequence[Column]) -> Text:
    state_style = {"done": p.ok, "failed": p.bad, "cancelled": p.warn}.get(job.state, p.label)
    bar_width = columns[1].width - 5
    # what ran, of what was submitted: a cancelled job's tasks that never ran filled the bar to 100%
    fraction = job.progress if job.state == "running" else (job.succeeded + job.failed) / max(1, job.submitted)
    progress = joined(hbar(fraction, bar_width, p.ok if job.state == "done" else p.bar, p.bar_empty))
    progress.append(f"{fraction:5.0%}")
    if job.state == "running":
        eta = job.eta(now)
        tail: list[Cell] = [(fmt.rate(job.rate(now)), p.text), (fmt.age(eta) if eta is not None else "-", p.dim)]
    else:
        tail = [(job.state, state_style), (fmt.age(job.elapsed(now)), p.dim)]
    cells: list[Cell] = [
        (job.name, state_style),
        progress,
        (fmt.count(job.queued), p.text),
        (fmt.count(job.running), p.accent if job.running else p.text),
        (fmt.count(job.succeeded), p.ok),
        (fmt.count(job.failed), p.bad if job.failed else p.dim),
        (fmt.count(job.requeued), p.warn if job.requeued else p.dim),
        *tail,
    ]
    if columns is JOB_COLUMNS_TINY:
        cells = [cells[i] for i in _TINY_CELLS]
    out = table_row(columns, cells)
    if job.waiting:
        out.append(f"  {fmt.count(job.waiting)} waiting on upstream", p.dim)
    if job.cancelled and job.state != "running":
        out.append(f"  {fmt.count(job.cancelled)} cancelled, never run", p.warn)
    if job.message:
        out.append(f"  {job.message}", p.bad if job.state == "failed" else p.dim)
    return out


# -- slots ----------------------------------------------------------------------------------

SLOT_COLUMNS = (
    Column("SLOT", 11),
    Column("KIND", 6),  # "gpu:12": a GPU slot names its GPU
    Column("STATE", 8),
    Column("DEQUE", 10),
    Column("IN FLIGHT", 9, right=True),
    Column("STEALS in/out", 13, right=True),
    Column("DONE", 8, right=True),
    Column("MEAN RUN", 9, right=True),
    Column("RUNNING", 14),
)
SLOT_COLUMNS_NARROW = (
    Column("SLOT", 9),
    Column("KIND", 5),
    Column("STATE", 5),
    Column("DEQUE", 8),
    Column("FLIGHT", 6, right=True),
    Column("STEALS", 7, right=True),
    Column("DONE", 6, right=True),
    Column("MEAN", 7, right=True),
    Column("RUNNING", 10),
)


def slot_columns(width: int) -> tuple[Column, ...]:
    wide = sum(c.width + 1 for c in SLOT_COLUMNS[:-1]) + 8
    return SLOT_COLUMNS if width >= wide else SLOT_COLUMNS_NARROW


def slot_header(p: Palette, width: int) -> Text:
    return table_header(slot_columns(width), p)


class SlotRows:
    """The slots panel's lines, drawn on demand."""

    def __init__(self, model: DashboardModel, p: Palette, width: int) -> None:
        self._columns = slot_columns(width)
        self._p = p
        self._running_on: dict[str, str] = {}
        for started in model.running.values():
            self._running_on.setdefault(started.slot, started.name)
        self._slots = list(model.slots.values())
        self._deepest = max((s.deque_depth for s in self._slots), default=0)
        self._hosts = tuple(model.hosts)

    def __len__(self) -> int:
        return len(self._slots)

    def __getitem__(self, index: int) -> Text:
        slot = self._slots[index]
        label = fmt.short_slot(slot.slot_id, self._hosts, self._columns[0].width)
        return _slot_line(slot, label, self._deepest, self._running_on.get(slot.slot_id, ""), self._p, self._columns)


def slot_lines(model: DashboardModel, p: Palette, width: int) -> list[Text]:
    """One line per worker slot: deque depth, tasks in flight, steals, and what runs there."""
    rows = SlotRows(model, p, width)
    return [rows[i] for i in range(len(rows))]


def _slot_line(slot: SlotRow, label: str, deepest: int, running: str, p: Palette, columns: Sequence[Column]) -> Text:
    bar_width = columns[3].width - 5
    deque = joined(hbar(slot.deque_depth / deepest if deepest else 0.0, bar_width, p.bar, p.bar_empty))
    deque.append(f"{slot.deque_depth:>5,}")
    return table_row(
        columns,
        [
            (label, p.label),
            (
                slot.kind if slot.gpu_index is None else f"gpu:{slot.gpu_index}",
                p.accent if slot.kind == "gpu" else p.dim,
            ),
            (slot.state, state_style(slot.state, p)),
            deque,
            (f"{slot.in_flight}/{slot.window_limit}", p.accent if slot.in_flight else p.text),
            (f"{fmt.count(slot.steals_in)}/{fmt.count(slot.steals_out)}", p.text),
            (fmt.count(slot.completed), p.text),
            (fmt.duration(slot.mean_run_s), p.dim),
            (running or "idle", p.text if running else p.dim),
        ],
    )


# -- latency --------------------------------------------------------------------------------


def latency_empty(model: DashboardModel) -> str:
    """What an empty latency histogram says: none finished yet, or none that the filter keeps."""
    chosen = [f"{d} {model.latency_filter.get(d)}" for d in LATENCY_DIMENSIONS if model.latency_filter.get(d)]
    return f"no finished tasks match {' · '.join(chosen)} (k b o change it)" if chosen else "no finished tasks yet"


def latency_filter_line(model: DashboardModel, p: Palette) -> Text:
    """The clickable filter: 'kernel: all ▸  backend: cpu ▸  host: all ▸'."""
    out = Text(no_wrap=True, overflow="ellipsis")
    for index, dimension in enumerate(LATENCY_DIMENSIONS):
        if index:
            out.append("   ")
        value = model.latency_filter.get(dimension)
        action = click(f"app.cycle_latency('{dimension}')")
        out.append(f"{dimension} ", p.dim + action)
        out.append(f"{value or 'all'} ▸", (p.link if value is None else p.accent) + action)
    out.append("   keys k b o", p.dim)
    return out


def histogram_lines(
    title: str, hist: LogHistogram, p: Palette, width: int, bar_rows: int, empty: str = "no finished tasks yet"
) -> list[Text]:
    """A log-scale histogram in `bar_rows + 3` lines: title with percentiles, bars, axis, labels.

    The x axis spans whole decades around the occupied buckets (at least three, so a
    narrow distribution still reads as narrow) and each decade is labelled. The buckets
    holding p50, p95 and p99 are drawn in their marker's style, and a ▲ on the axis marks
    each; the title gives their values in the same styles.
    """
    marks = [
        ("p50", hist.percentile(50), p.p50),
        ("p95", hist.percentile(95), p.p95),
        ("p99", hist.percentile(99), p.p99),
    ]
    head = Text(no_wrap=True, overflow="ellipsis")
    head.append(fit(title, 11), p.label)
    for name, value, style in marks:
        head.append(f" {name} ", style)
        head.append(f"{fmt.duration(value, compact=True):<7}", p.text)
    if hist.total:
        head.append(f" max {fmt.duration(hist.max_s, compact=True)}", p.dim)
    lines = [head]
    occupied = hist.occupied()
    if occupied is None:
        lines.append(Text(f"  {empty}", p.dim))
        lines.extend(Text("") for _ in range(bar_rows + 1))
        return lines
    first_decade, last_decade = occupied[0] // BUCKETS_PER_DECADE, occupied[1] // BUCKETS_PER_DECADE + 1
    while last_decade - first_decade < 3 and (last_decade < DECADES or first_decade > 0):
        if last_decade < DECADES:
            last_decade += 1
        if last_decade - first_decade < 3 and first_decade > 0:
            first_decade -= 1
    plot = max(8, width - 2)
    while (last_decade - first_decade) * BUCKETS_PER_DECADE > plot and last_decade - first_decade > 1:
        last_decade -= 1  # too narrow for every decade: keep the fast end
    low = first_decade * BUCKETS_PER_DECADE
    count = (last_decade - first_decade) * BUCKETS_PER_DECADE
    columns = max(1, min(4, plot // count))
    counts = hist.counts[low : low + count]
    tallest = max(counts) or 1
    marked: dict[int, Style] = {}
    for _name, value, style in marks:
        if value is not None:
            marked[bucket_of(value)] = style
    eighths = [0 if c == 0 else max(1, round(c / tallest * bar_rows * 8)) for c in counts]
    body = columns - 1 if columns >= 3 else columns
    for row in reversed(range(bar_rows)):
        line = Text(" ", no_wrap=True)
        for index, height in enumerate(eighths):
            glyph = BLOCKS[max(0, min(8, height - row * 8))]
            line.append(glyph * body, marked.get(low + index, p.bar))
            if body < columns:
                line.append(" ")
        lines.append(line)
    axis = Text(" ", p.dim, no_wrap=True)
    ticks = ["─"] * (count * columns)
    for decade in range(first_decade, last_decade):
        ticks[(decade - first_decade) * BUCKETS_PER_DECADE * columns] = "┴"
    styles: dict[int, Style] = {}
    for _name, value, style in marks:
        if value is not None:
            column = (bucket_of(value) - low) * columns + body // 2
            if 0 <= column < len(ticks):
                ticks[column] = "▲"
                styles[column] = style
    for column, char in enumerate(ticks):
        axis.append(char, styles.get(column, p.dim))
    lines.append(axis)
    labels = [" "] * (count * columns + 12)
    for decade in range(first_decade, last_decade + 1):
        column = 1 + (decade - first_decade) * BUCKETS_PER_DECADE * columns
        text = fmt.axis_duration(10.0 ** (decade - 6))
        start = max(0, column - len(text) // 2)
        if all(ch == " " for ch in labels[max(0, start - 1) : start + len(text) + 1]):
            labels[start : start + len(text)] = list(text)
    lines.append(Text("".join(labels).rstrip(), p.dim, no_wrap=True))
    return lines


# -- task stream ----------------------------------------------------------------------------


def stream_lines(rows: Sequence[StreamRow], now: float, p: Palette, hosts: tuple[str, ...] = ()) -> list[Text]:
    """The task stream's lines: running tasks with their elapsed time, then endings (`hosts`:
    the cluster's, to cut long slot ids so that they stay apart; see `format.short_slot`)."""
    lines = []
    for row in rows:
        out = Text(no_wrap=True, overflow="ellipsis")
        failed = row.state in FAILED_STATE_NAMES
        icon = "✖" if failed else STREAM_ICONS.get(row.state, "•")
        style = p.bad if failed else {"running": p.accent, "succeeded": p.ok, "requeued": p.warn}.get(row.state, p.dim)
        out.append(f" {icon} ", style)
        id_style = p.link + click(f"app.show_task({row.task_id})") if failed else p.dim
        out.append(fit(f"#{row.task_id}", 8), id_style)
        out.append(fit(row.name, 12), p.label)
        out.append(" ")
        out.append(fit(row.job or "-", 10), p.dim)
        out.append(" ")
        out.append(fit(fmt.short_slot(row.slot, hosts, 11), 11), p.text)
        out.append(" ")
        if row.state == "running":
            out.append(f"running {fmt.duration(now - row.at)}", p.accent)
        elif row.state == "succeeded":
            out.append(fmt.duration(row.run_s), p.text)
        else:
            state = row.state.replace("_", " ")
            out.append(state, style)
            if row.detail and row.detail != state:  # not "cancelled: cancelled"
                out.append(f": {row.detail}", p.dim)
        lines.append(out)
    return lines


# -- alerts and log -------------------------------------------------------------------------


def alert_lines(model: DashboardModel, now: float, p: Palette) -> list[Text]:
    """Active alerts, errors first; a single 'all clear' line when there are none."""
    if not model.alerts:
        return [Text(" ✔ all clear", p.ok)]
    lines = []
    for alert in model.alerts:
        style = p.bad if alert.severity == ERROR else p.warn
        out = Text(no_wrap=True, overflow="ellipsis")
        out.append(" ✖ " if alert.severity == ERROR else " ▲ ", style)
        title_style = style + click(f"app.show_task({alert.task_id})") if alert.task_id is not None else style
        out.append(alert.title, title_style)
        if alert.since is not None:
            out.append(f"  {fmt.age(now - alert.since)}", p.dim)
        if alert.detail:
            out.append(f"  {alert.detail}", p.dim)
        lines.append(out)
    return lines


LEVEL_NAMES = {10: "DEBUG", 20: "INFO", 30: "WARN", 40: "ERROR", 50: "CRIT"}


def log_line(line: LogLine, p: Palette, timestamp: str, width: int = 80) -> Text:
    """One log record: time, level, logger (without 'batuta.'; left out when narrow), message.
    A long one wraps in the panel (a cut-off reason could be read nowhere else on screen)."""
    level = LEVEL_NAMES.get(line.level, str(line.level))
    style = p.bad if line.level >= 40 else p.warn if line.level >= 30 else p.dim
    out = Text(overflow="fold")
    out.append(f"{timestamp} ", p.dim)
    out.append(fit(level, 5), style)
    out.append(" ")
    if width >= 64:
        out.append(fit(line.logger.removeprefix("batuta."), 13), p.dim)
        out.append(" ")
    out.append(line.message, p.text if line.level < 30 else style)
    return out
