"""Window sizing: how many tasks a slot holds sent, to hide the round trip to its host.

The rule is in `batuta.core.scheduler`'s docstring ("Windows are sized to hide the round
trip"): `1 + ceil(round_trip / mean run time)` tasks, clamped to [min_window, max_window], from
an exponential moving average of the slot's run times and the round trip the runtime measured
to its host (`RoundTripMeasured`; `SchedulerConfig.default_round_trip` until then). Functions
of the scheduler whose tables they move, as `stealing.py`'s are.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from batuta.core.events import RoundTripMeasured
from batuta.core.placement import SlotRecord, SlotState

if TYPE_CHECKING:
    from batuta.core.scheduler import Scheduler


def on_round_trip(scheduler: Scheduler, ev: RoundTripMeasured) -> None:
    scheduler._round_trip[ev.host_id] = max(0.0, ev.seconds)
    for slot in scheduler._host_slots.get(ev.host_id, ()):
        resize(scheduler, slot)


def observe_run_time(scheduler: Scheduler, slot: SlotRecord, run_s: float) -> None:
    run_s = max(run_s, 1e-6)
    if slot.mean_run_s is None:
        slot.mean_run_s = run_s
    else:
        w = scheduler.config.run_time_smoothing
        slot.mean_run_s = (1 - w) * slot.mean_run_s + w * run_s
    resize(scheduler, slot)


def resize(scheduler: Scheduler, slot: SlotRecord) -> None:
    cfg = scheduler.config
    if slot.mean_run_s is None:
        return
    round_trip = scheduler._round_trip.get(slot.host_id, cfg.default_round_trip)
    wanted = 1 + math.ceil(round_trip / slot.mean_run_s)
    slot.window_limit = max(cfg.min_window, min(cfg.max_window, wanted))
    if slot.state is SlotState.UP and len(slot.window) < slot.window_limit:
        scheduler._hungry.add(slot)
