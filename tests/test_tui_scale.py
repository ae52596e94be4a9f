"""The nodes panel at cluster scale: 256 simulated hosts and 1,024 GPUs stay readable.

The seeded replay (`batuta.tui.replay`) feeds the view-model the public events a pool of
that size would publish; one host is lost. What fits no longer gets a line per GPU: a
summary line comes first, each host takes one line with a cell per GPU, and the lost host
is on screen without scrolling. `g` switches to a line per GPU and back.
"""

from __future__ import annotations

from batuta.tui.app import BatutaApp
from batuta.tui.model import DashboardModel
from batuta.tui.replay import SyntheticCluster, replay
from batuta.tui.snapshot import screen_text

from batuta.runtime import events as pe

SIZE = (160, 50)


def _big_model() -> DashboardModel:
    start = 10_000.0
    model = DashboardModel(clock=lambda: start + 30, cluster_label="256 simulated hosts")
    cluster = SyntheticCluster(hosts=256, gpus_per_host=4, seed=0)
    replay(model.apply, cluster, start, start + 30, 2000)
    model.update_slots(cluster.slot_views(start + 30))
    lost = cluster.host_names()[200]
    model.apply(pe.HostDown(host=lost, reason="no heartbeat for 8.0s", at=start + 29))
    model.set_status("running")
    model.tick(start + 30)
    return model


async def test_256_hosts_get_a_summary_and_one_line_each_with_the_lost_host_first() -> None:
    model = _big_model()
    gpus = sum(len(h.gpus) for h in model.hosts.values())
    assert len(model.hosts) == 256 and gpus >= 800
    lost = next(name for name, h in model.hosts.items() if h.state == "lost")
    app = BatutaApp(model=model, cluster_label=model.cluster_label, attach_logging=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(0.2)
        app.sync_now()
        await pilot.pause(0.1)
        text = screen_text(app)
        assert "256 hosts: 255 up · 1 lost" in text
        assert f"{gpus} GPUs: mean" in text
        assert lost in text, "the lost host is not on screen"
        assert "└ GPU 0" not in text  # one line per host, GPUs as cells
        host_lines = [line for line in text.splitlines() if " up " in line and " GPU " in line]
        assert host_lines, "no compact host line with its GPU cells"

        await pilot.press("g")
        await pilot.pause(0.2)
        app.sync_now()
        await pilot.pause(0.1)
        text = screen_text(app)
        assert "└ GPU 0" in text and "256 hosts:" not in text

        await pilot.press("g")
        await pilot.pause(0.2)
        app.sync_now()
        await pilot.pause(0.1)
        assert "256 hosts:" in screen_text(app)
