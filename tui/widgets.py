"""Thin Textual widgets over the drawing code: they decide when to draw, never what.

Every panel has a `sync(now)` that the app calls on its refresh timer. A panel compares a
small signature (the model's version counters for its sections, its size, and for panels
showing ages the current second) with the one it last drew; only when it moved does it
redraw, and never more often than its `min_interval`. So a panel whose data did not change
costs a tuple comparison per frame, and a flood of events costs one redraw per frame.

Long panels (nodes, slots, jobs) use Textual's line API on a `ScrollView`: they turn only
the visible lines into strips, so 64 hosts with GPUs cost the same per frame as the 20
lines on screen (DESIGN.md: a naive DataTable of 64x6 cells at 10 Hz costs half a core).
"""

from __future__ import annotations

import logging
import time
from typing import ClassVar

from rich.console import Group, RenderableType
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import events
from textual.geometry import Size
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.widget import Widget
from textual.widgets import RichLog

from batuta._version import __version__

from . import render, render_nodes
from .model import DashboardModel, Versions
from .render import Palette

FRAME_SLACK_S = 0.03  # timer jitter: a frame a little early still counts as on time
_NO_STYLE = Style.null()  # before the stylesheet reached a widget (its first frame)
COMPONENT_CLASSES = frozenset(f"dash--{name.replace('_', '-')}" for name in Palette.names())


def palette_of(widget: Widget) -> Palette:
    """The widget's palette, from its `dash--*` component classes (defined in batuta.tcss)."""
    return Palette(
        **{
            name: widget.get_component_rich_style(f"dash--{name.replace('_', '-')}", partial=True, default=_NO_STYLE)
            for name in Palette.names()
        }
    )


class _Synced:
    """The redraw decision shared by every panel (a mixin for Widget subclasses)."""

    sections: ClassVar[tuple[str, ...]] = ()
    min_interval: ClassVar[float] = 0.0  # seconds between redraws, at most
    ticking: ClassVar[float] = 0.0  # also redraw this often while `is_ticking()` (ages, elapsed)
    heavy: ClassVar[bool] = False  # a screenful of lines: the app redraws one heavy panel per frame

    model: DashboardModel
    _signature: object
    _drawn_at: float
    _palette: tuple[str, Palette] | None

    def _init_sync(self, model: DashboardModel) -> None:
        self.model = model
        self._signature = None
        self._drawn_at = -1e18
        self._palette = None

    def palette(self) -> Palette:
        """This panel's palette, resolved once per theme (resolving it costs a style walk)."""
        assert isinstance(self, Widget)
        theme = self.app.theme
        if self._palette is None or self._palette[0] != theme:
            palette = palette_of(self)
            if palette.text is _NO_STYLE:  # styles not applied yet: do not remember this one
                return palette
            self._palette = (theme, palette)
        return self._palette[1]

    def is_ticking(self) -> bool:
        return False

    def signature(self, now: float, size: Size) -> tuple[object, ...]:
        """What the panel's look depends on: its sections' versions, size, theme, and the clock."""
        assert isinstance(self, Widget)
        versions: Versions = self.model.versions
        clock = int(now / self.ticking) if self.ticking and self.is_ticking() else 0
        return (*(getattr(versions, name) for name in self.sections), size, self.app.theme, clock)

    def invalidate(self) -> None:
        """Draw again at the next frame even if the model did not move (a view setting did)."""
        self._signature = None
        self._drawn_at = -1e18

    def needs_draw(self, now: float, size: Size) -> bool:
        """True (and the new signature remembered) when the panel should redraw now."""
        signature = self.signature(now, size)
        if signature == self._signature:
            return False
        if now - self._drawn_at < self.min_interval - FRAME_SLACK_S and self._signature is not None:
            return False  # coalesce: the change is picked up by a later frame
        self._signature = signature
        self._drawn_at = now
        return True


class LinesPanel(_Synced, ScrollView):
    """A bordered panel drawn as fixed header lines plus scrollable body lines (line API)."""

    COMPONENT_CLASSES: ClassVar[set[str]] = set(COMPONENT_CLASSES)
    ALLOW_MAXIMIZE = True
    scrolls: ClassVar[bool] = True  # False: the panel shows what fits and never scrolls

    def __init__(self, model: DashboardModel, *, title: str, id: str | None = None) -> None:
        super().__init__(id=id)
        self._init_sync(model)
        self.border_title = title
        self._header: list[Text] = []
        self._body: render.Rows = []
        self._strips: dict[int, Strip] = {}
        self._strips_width = 0  # the width the cached strips were cropped to
        self._base_style = Style.null()
        self._now = 0.0

    def build(self, now: float, palette: Palette, width: int, height: int) -> tuple[list[Text], render.Rows]:
        """(header lines, body rows) for the current model state; rows may draw lazily."""
        raise NotImplementedError

    def subtitle(self, now: float) -> str:
        return ""

    def sync(self, now: float) -> bool:
        """Redraw if the model moved since the last draw; returns whether it did."""
        if not self.is_mounted or not self.size.area:
            return False
        # the region without scrollbars: one appearing or going (a transient layout, a resize)
        # changes the width the lines are cut to while the widget's size stays the same
        region = self.scrollable_content_region
        if not self.needs_draw(now, region.size):
            return False
        self._now = now
        self._base_style = self.rich_style
        width = max(1, self.scrollable_content_region.width)
        header, body = self.build(now, self.palette(), width, self.scrollable_content_region.height)
        self._header, self._body = header, body
        self._strips.clear()
        # a change of virtual size relayouts the whole screen: only panels that scroll have one
        height = len(header) + len(body) if self.scrolls else self.scrollable_content_region.height
        if self.virtual_size.height != height:
            self.virtual_size = Size(width, height)
        subtitle = self.subtitle(now)
        if subtitle != self.border_subtitle:
            self.border_subtitle = subtitle
        self.refresh()
        return True

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        if width != self._strips_width:  # strips cut to another width would leave a column blank
            self._strips.clear()
            self._strips_width = width
        base = self._base_style
        header = self._header
        if y < len(header):
            index = -1 - y  # header lines never scroll
        else:
            index = self.scroll_offset.y + y - len(header)
            if index >= len(self._body):
                return Strip.blank(width, base)
        strip = self._strips.get(index)
        if strip is None:
            text = header[y] if index < 0 else self._body[index]  # rows draw lazily: only those on screen
            segments = Segment.apply_style(text.render(self.app.console), base)
            strip = self._strips[index] = Strip(list(segments)).crop_extend(0, width, base)
        return strip


COMPACT_FROM_HOSTS = 16  # hosts from which the nodes panel turns compact when its lines do not fit


class NodesPanel(LinesPanel):
    """One line per host (state, CPU, memory, slots, tasks done, heartbeat), one per GPU."""

    sections = ("hosts",)
    heavy = True
    min_interval = 1.0  # telemetry arrives once a second

    gpu_rows: bool | None = None  # one line per GPU: None = when they fit; `g` toggles

    def build(self, now: float, palette: Palette, width: int, height: int) -> tuple[list[Text], render.Rows]:
        body = render_nodes.NodeRows(self.model, now, palette, width)
        if not len(body):
            return [render_nodes.node_header(palette)], [Text(" waiting for hosts…", palette.dim)]
        if self.gpu_rows is not None:
            expanded = self.gpu_rows
        else:  # a few hosts scroll fine; in a large cluster a line per GPU buries the hosts
            expanded = len(self.model.hosts) < COMPACT_FROM_HOSTS or len(body) + 1 <= height
        if expanded:
            return [render_nodes.node_header(palette)], body
        # too many lines to see at once: a summary on top, one line per host, trouble first
        compact = render_nodes.NodeRows(self.model, now, palette, width, compact=True)
        return [render_nodes.nodes_summary(self.model, palette), render_nodes.node_header(palette)], compact

    def toggle_gpu_rows(self) -> None:
        """Switch between a line per GPU and a line per host (from the mode shown now)."""
        shown_expanded = len(self._header) == 1
        self.gpu_rows = not shown_expanded
        self.invalidate()

    def subtitle(self, now: float) -> str:
        gpus = sum(len(h.used_gpus()) for h in self.model.hosts.values())
        return f"{self.model.hosts_up()}/{len(self.model.hosts)} up · {gpus} GPUs"


class JobsPanel(LinesPanel):
    """One line per job: progress, counts by state, rate and ETA."""

    sections = ("jobs", "tasks")
    min_interval = 0.25

    def build(self, now: float, palette: Palette, width: int, height: int) -> tuple[list[Text], render.Rows]:
        body = render.job_lines(self.model, now, palette, width)
        if not body:
            body = [Text(" no jobs yet: press d for the demo, r to pick a job, ctrl+p for commands", palette.dim)]
        return [render.job_header(palette, width)], body


class SlotsPanel(LinesPanel):
    """One line per worker slot: deque depth, tasks in flight, steals in/out."""

    sections = ("slots", "tasks")
    heavy = True
    min_interval = 0.5  # slot views are polled at 2 Hz

    def build(self, now: float, palette: Palette, width: int, height: int) -> tuple[list[Text], render.Rows]:
        rows = render.SlotRows(self.model, palette, width)
        if not len(rows):
            return [render.slot_header(palette, width)], [Text(" waiting for slots…", palette.dim)]
        return [render.slot_header(palette, width)], rows

    def subtitle(self, now: float) -> str:
        steals = sum(s.steals_in for s in self.model.slots.values())
        return f"{len(self.model.slots)} slots · {steals:,} steals"


class StreamPanel(LinesPanel):
    """Running tasks as they run, then the latest endings (failed ids are clickable)."""

    sections = ("stream", "tasks")
    scrolls = False
    min_interval = 0.2  # faster scrolls past the eye; the summary shows every event at 10 Hz

    def build(self, now: float, palette: Palette, width: int, height: int) -> tuple[list[Text], render.Rows]:
        rows = self.model.stream(max(1, height))
        return [], render.stream_lines(rows, now, palette, tuple(self.model.hosts))

    def subtitle(self, now: float) -> str:
        return f"{self.model.running_count:,} running · click a failed id for details"


class AlertsPanel(LinesPanel):
    """Active alerts: hosts lost or suspected, GPU memory and heat, failures, imbalance."""

    sections = ("alerts",)
    min_interval = 1.0
    ticking = 1.0

    def is_ticking(self) -> bool:
        return bool(self.model.alerts)

    def build(self, now: float, palette: Palette, width: int, height: int) -> tuple[list[Text], render.Rows]:
        return [], render.alert_lines(self.model, now, palette)

    def subtitle(self, now: float) -> str:
        return f"{len(self.model.alerts)} active" if self.model.alerts else ""


class SummaryBar(_Synced, Widget):
    """The top line: version, cluster, scheduling state, hosts, slots and task counts."""

    COMPONENT_CLASSES: ClassVar[set[str]] = set(COMPONENT_CLASSES)
    sections = ("summary", "tasks")
    min_interval = 0.0  # every frame: it shows every event's effect

    def __init__(self, model: DashboardModel, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._init_sync(model)
        self._now = 0.0

    def sync(self, now: float) -> bool:
        if not self.is_mounted or not self.size.area or not self.needs_draw(now, self.size):
            return False
        self._now = now
        self.on_sync(now)
        self.refresh()
        return True

    def on_sync(self, now: float) -> None:
        """Anything to update besides the content (a border subtitle) before the redraw."""

    def render(self) -> RenderableType:
        return render.summary_line(self.model, self._now, self.palette(), __version__, self.size.width)


class ThroughputBar(SummaryBar):
    """Cluster throughput: a 60-second sparkline of tasks finished per second."""

    min_interval = 1.0  # one bar per second

    def render(self) -> RenderableType:
        return render.throughput_line(self.model, self._now, self.palette(), self.size.width)


class LatencyPanel(SummaryBar):
    """Queue-wait and run-time histograms (log buckets, p50/p95/p99) under a clickable filter."""

    sections = ("latency", "tasks")
    heavy = True
    min_interval = 0.5

    def __init__(self, model: DashboardModel, *, id: str | None = None) -> None:
        super().__init__(model, id=id)
        self.border_title = "Latency"

    def on_sync(self, now: float) -> None:
        subtitle = f"{self.model.latency()[1].total:,} tasks ran"
        if subtitle != self.border_subtitle:
            self.border_subtitle = subtitle

    def render(self) -> RenderableType:
        palette = self.palette()
        width = self.content_region.width
        height = self.content_region.height
        queue, run = self.model.latency()
        bar_rows = max(1, (height - 1) // 2 - 3)  # each histogram takes bar_rows + 3 lines
        lines = [render.latency_filter_line(self.model, palette)]
        empty = render.latency_empty(self.model)
        lines += render.histogram_lines("queue wait", queue, palette, width, bar_rows, empty)
        lines += render.histogram_lines("run time", run, palette, width, bar_rows, empty)
        return Group(*lines)


class LogPanel(RichLog):
    """The `batuta` logger's records (via the logging bridge) and what jobs print, newest last.

    While the dashboard runs, a job's `print` cannot reach the terminal (Textual owns it),
    so the panel captures prints too and files each line in the model's bounded log as a
    record of the logger "print" (stderr lines as warnings).
    """

    COMPONENT_CLASSES: ClassVar[set[str]] = set(COMPONENT_CLASSES)
    MAX_PER_FRAME = 100

    def __init__(self, model: DashboardModel, *, id: str | None = None, capture_print: bool = True) -> None:
        super().__init__(id=id, max_lines=500, wrap=True, markup=False, highlight=False, auto_scroll=True)
        self.model = model
        self.border_title = "Log"
        self._seen = 0  # the last log sequence number written
        self._capture_print = capture_print
        self._partial = {False: "", True: ""}  # printed text not yet ended by a newline, per stream

    def on_mount(self) -> None:
        if self._capture_print:
            self.app.begin_capture_print(self)

    def on_unmount(self) -> None:
        if self._capture_print:
            self.app.end_capture_print(self)

    def on_print(self, event: events.Print) -> None:
        text = self._partial[event.stderr] + event.text
        *lines, self._partial[event.stderr] = text.split("\n")
        for line in lines:
            if line.strip():
                self.model.add_log(logging.WARNING if event.stderr else logging.INFO, "print", line.rstrip())

    @staticmethod
    def timestamp(created: float) -> str:
        """Local wall-clock time of a record (tests replace this for fixed snapshots)."""
        return time.strftime("%H:%M:%S", time.localtime(created))

    def sync(self, now: float) -> bool:
        """Write the records that arrived since the last frame (at most `MAX_PER_FRAME`)."""
        logs = self.model.logs
        if not self.is_mounted or not self.size.area or not logs or logs[-1].seq <= self._seen:
            return False
        fresh = [line for line in logs if line.seq > self._seen][-self.MAX_PER_FRAME :]
        palette = palette_of(self)  # only when records arrive: rare next to the other panels
        for line in fresh:
            self.write(render.log_line(line, palette, self.timestamp(line.created), self.size.width))
        self._seen = logs[-1].seq
        return True
