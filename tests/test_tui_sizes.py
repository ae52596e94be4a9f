"""The dashboard on terminals other than 160x50: short, narrow, wide and short, resized mid-run.

Driven by Textual's Pilot on the seeded replay of tests/test_tui_snapshots.py (no pool, a
fixed clock), asserting on what the screen shows: every panel drawn whole inside the
screen, the task stream among them, the footer's way out, host names told apart.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from batuta.tui import format as fmt
from batuta.tui import render
from batuta.tui.app import BatutaApp
from batuta.tui.attach import AttachedApp
from batuta.tui.model import DashboardModel
from batuta.tui.snapshot import screen_text
from batuta.tui.widgets import AlertsPanel, JobsPanel, LogPanel, NodesPanel, StreamPanel
from rich.cells import cell_len
from textual.widget import Widget

from batuta.runtime import events as pe
from batuta.runtime.serve_client import Target
from tests.test_tui_snapshots import seeded_cluster_model

SMALL_SIZES = [(80, 24), (100, 30), (60, 20), (200, 15)]
ALWAYS_SHOWN = (NodesPanel, JobsPanel, StreamPanel, AlertsPanel, LogPanel)


async def _drawn(app: BatutaApp, pilot: object) -> str:
    await pilot.pause()  # type: ignore[attr-defined]
    app.sync_now()
    await pilot.pause()  # type: ignore[attr-defined]
    return screen_text(app)


def _panels_whole(app: BatutaApp) -> None:
    """Every panel on screen lies inside it, above the footer, with a line inside its border;
    the panels a newcomer needs (the task stream first) are among them."""
    width, height = app.size
    shown = [w for w in app.screen.query(Widget) if w.id in _PANEL_IDS and w.display]
    for panel in shown:
        region = panel.region
        assert region.bottom <= height - 1, f"{panel.id} runs off the screen at {width}x{height}: {region}"
        assert region.right <= width, f"{panel.id} runs off the screen at {width}x{height}: {region}"
        assert region.height >= 3, f"{panel.id} has no line inside its border at {width}x{height}: {region}"
    for kind in ALWAYS_SHOWN:
        panel = app.query_one(kind)
        assert panel.display and panel in shown, f"{kind.__name__} is not shown at {width}x{height}"


_PANEL_IDS = {"nodes", "jobs", "slots", "stream", "latency", "alerts", "log"}


@pytest.mark.parametrize("size", SMALL_SIZES, ids=[f"{w}x{h}" for w, h in SMALL_SIZES])
async def test_every_panel_is_whole_and_the_task_stream_shows_tasks(size: tuple[int, int]) -> None:
    """At 80x24 the jobs and slots panels took the whole column and ran off the screen's
    bottom (no border); the task stream, where tasks show as they run, was drawn nowhere."""
    model = seeded_cluster_model()
    app = BatutaApp(model=model, cluster_label=model.cluster_label, attach_logging=False)
    async with app.run_test(size=size) as pilot:
        text = await _drawn(app, pilot)
        _panels_whole(app)
        newest = max(model.running)  # the task running now: the stream's first line
        assert "Task stream" in text and f"#{newest}" in text


async def test_a_resize_mid_run_lays_the_panels_out_again() -> None:
    model = seeded_cluster_model()
    app = BatutaApp(model=model, cluster_label=model.cluster_label, attach_logging=False)
    async with app.run_test(size=(160, 50)) as pilot:
        assert "Slots" in await _drawn(app, pilot)
        await pilot.resize_terminal(80, 24)
        text = await _drawn(app, pilot)
        _panels_whole(app)
        assert "Task stream" in text
        await pilot.resize_terminal(160, 50)
        text = await _drawn(app, pilot)
        _panels_whole(app)
        assert "Slots" in text and "STEALS in/out" in text  # back with every panel


async def test_the_footer_shows_help_and_quit_on_an_80_column_terminal(tmp_path: Path) -> None:
    """The footer cuts what does not fit at its right end: '? Help' and 'q Quit' came last,
    and an 80-column terminal showed neither (nor an attached view's 'x Detach')."""
    model = seeded_cluster_model()
    app = BatutaApp(model=model, cluster_label=model.cluster_label, attach_logging=False)
    async with app.run_test(size=(80, 24)) as pilot:
        footer = (await _drawn(app, pilot)).splitlines()[-1]
        assert "? Help" in footer and "q Quit" in footer, footer
    viewer = AttachedApp(Target(path=tmp_path / "nobody.sock"))
    async with viewer.run_test(size=(80, 24)) as pilot:
        footer = (await _drawn(viewer, pilot)).splitlines()[-1]
        assert "q Quit" in footer and "x Detach" in footer, footer
        assert "d Demo" not in footer  # a view runs no jobs: its keys say so, but take no room
        await pilot.press("d")
        await pilot.pause()
        assert any("runs no jobs of its own" in toast.message for toast in viewer._notifications)


def _panel_text(app: BatutaApp, text: str, kind: type[Widget]) -> str:
    """The part of the screen's `text` that `kind`'s panel covers (ASCII lines)."""
    region = app.query_one(kind).region
    lines = text.splitlines()[region.y : region.bottom]
    return "\n".join(line[region.x : region.right] for line in lines)


def _cluster_of(names: list[str]) -> DashboardModel:
    model = DashboardModel(clock=lambda: 10.0, cluster_label="long names")
    for name in names:
        model.apply(
            pe.HostUp(
                host=name,
                slots=(f"{name}/0", f"{name}/1"),
                gpus=(),
                cpu_count=8,
                batuta_version="0.1.0",
                python_version="3.11",
                at=1.0,
            )
        )
    for task_id, name in enumerate(names, 1):
        model.apply(pe.TaskQueued(task_id=task_id, name="noop", backend="cpu", at=2.0, job="j"))
        model.apply(
            pe.TaskStarted(task_id=task_id, name="noop", host=name, slot=f"{name}/1", attempt=1, at=3.0, job="j")
        )
    model.set_status("running")
    model.tick(10.0)
    return model


async def test_long_host_names_that_differ_at_their_end_stay_apart_on_screen() -> None:
    """60-character host names that differ in their last characters all read the same when
    cut at the end ('rack-a-rack-a…'): in the nodes panel, the slots and the task stream."""
    names = [f"{'rack-a-' * 7}node-{i:03d}" for i in range(3)]
    model = _cluster_of(names)
    app = BatutaApp(model=model, cluster_label=model.cluster_label, attach_logging=False)
    async with app.run_test(size=(100, 30)) as pilot:
        text = await _drawn(app, pilot)
        nodes = _panel_text(app, text, NodesPanel)
        stream = _panel_text(app, text, StreamPanel)
    for i in range(3):
        assert f"ode-{i:03d} " in nodes, nodes  # the host column keeps each name's end
        assert f"-{i:03d}/1 " in stream, stream  # a slot keeps its host's end and its index


def test_names_are_cut_where_they_differ_and_by_terminal_cells() -> None:
    fqdn = [f"gpu-node-{i:03d}.cluster.example.org" for i in range(3)]
    assert fmt.short_names(tuple(fqdn), 14)[fqdn[1]] == "gpu-node-001.…"  # the end alike: cut there
    racks = [f"compute-rack-a-node-{i:03d}" for i in range(3)]
    labels = fmt.short_names(tuple(racks), 14)
    assert len(set(labels.values())) == 3 and all(cell_len(label) <= 14 for label in labels.values())
    assert labels[racks[2]] == "comput…ode-002"
    assert fmt.short_slot(f"{racks[2]}/12", tuple(racks), 11).endswith("002/12")
    # alike at both ends: "comput…ple.org" for every one of them; the part where they differ is kept
    both = [f"compute-rack-a-node-{i:03d}.cluster.example.org" for i in range(12)]
    labels = fmt.short_names(tuple(both), 14)
    assert len(set(labels.values())) == 12 and all(cell_len(label) <= 14 for label in labels.values())
    assert labels[both[11]] == "…node-011.clu…"
    # a CJK character takes two cells: padded by characters, the columns after it moved
    assert cell_len(render.fit("节点-3/3", 11)) == 11 and cell_len(render.fit("节点节点节点节点", 11)) == 11
