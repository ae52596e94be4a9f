"""Alerts the dashboard's model raises (tui/alerts.py) for finished jobs and long host names:
the model fed hand-written events at fixed instants, as in test_tui_model.py."""

from __future__ import annotations

from batuta.tui import format as fmt
from batuta.tui import render
from batuta.tui.model import DashboardModel

from batuta import TaskStatus
from batuta.runtime import events as pe
from tests.test_tui_model import PLAIN, Clock, host_up, lifecycle


def test_a_finished_job_with_failures_stays_an_alert_after_the_minute() -> None:
    """The alert that tasks failed "in the last minute" went after it; the job's row kept FAILED for good."""
    clock = Clock(100.0)
    model = DashboardModel(clock=clock)
    model.apply(host_up("h1"))
    model.job_started("etl", "etl.py")
    model.job_started("broken", "broken.py")
    model.apply_many(lifecycle(1, 100.0, job="etl"))
    model.apply_many(lifecycle(2, 100.0, TaskStatus.FAILED, job="etl", error="ValueError: bad row"))
    model.tick(100.1)
    model.job_ended("etl", "done", "ok")
    model.job_ended("broken", "failed", "RuntimeError: gave up")
    model.tick(100.2)  # the same second: re-evaluated because a job ended, not because a second passed
    shown = {alert.key: (alert.severity, alert.title, alert.detail) for alert in model.alerts}
    assert shown["job:broken"] == ("error", "job broken failed", "RuntimeError: gave up")
    severity, title, detail = shown["job:etl"]
    assert (severity, title) == ("warning", "job etl done: 1 of 2 tasks failed")
    assert detail.startswith("task 2 (spin) failed on h1/0") and detail.endswith("ValueError: bad row")
    assert next(a for a in model.alerts if a.key == "job:etl").task_id == 2  # a click opens the failed task
    clock.now = 200.0
    model.tick(200.0)
    assert {alert.key for alert in model.alerts} == {"job:broken", "job:etl"}  # "tasks-failing" aged out


def test_alert_titles_cut_host_names_as_the_nodes_panel_does() -> None:
    """`✖ host compute-rack-a-nod…`: a long host name, cut with the rest of the line at the
    panel's edge, took the reason (the one thing to act on) off it, and left two hosts alike."""
    hosts = ("compute-rack-a-node-001", "compute-rack-a-node-002")
    model = DashboardModel(clock=Clock(101.0))
    model.apply_many([host_up(name) for name in hosts])
    for name in hosts:
        model.apply(pe.HostDown(host=name, reason="no heartbeat for 8.1s", at=100.5))
    model.tick(101.0)
    labels = fmt.short_names(hosts, fmt.HOST_CELLS)
    assert [alert.title for alert in model.alerts] == [f"host {labels[name]} lost" for name in hosts]
    assert labels[hosts[0]] != labels[hosts[1]]  # told apart, as in the nodes panel's HOST column
    lines = [line.plain for line in render.alert_lines(model, 101.0, PLAIN)]
    assert all(line.endswith("  no heartbeat for 8.1s") and len(line) < 60 for line in lines), lines
    assert [alert.key for alert in model.alerts] == [f"host-lost:{name}" for name in hosts]  # the whole name
