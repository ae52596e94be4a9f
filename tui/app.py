"""`BatutaApp`: the coordinator's dashboard, running the pool in Textual's own event loop.

The pool and the app share one asyncio loop, so nothing here may block: the pool starts in
a worker from `on_mount` (the screen is up at once, saying "starting hosts…"), jobs run as
workers, job files load in a thread, and the pool's events reach the screen only through
the view-model: the bus hands each event to `DashboardModel.inbox` (queued, folded a few
dozen at a time), and each frame folds the rest in (`drain`, no Textual). A timer at
`refresh_hz` asks each panel to redraw if its part of the model moved; scheduler views that
have no events (slot deques, steals) are polled on the same timer at `slot_poll_s`.

With `pool=None` the app only shows a model fed by someone else (the replay used by the
snapshot tests, screenshots and the load benchmark).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.driver import Driver
from textual.notifications import SeverityLevel
from textual.widgets import Footer
from textual.worker import Worker, get_current_worker

from batuta.errors import BatutaError
from batuta.jobs import JobError, builtin_job_names, load_job, printable

from . import render
from .commands import BatutaCommands
from .driver import TERMINAL_GONE_CODE
from .logbridge import LogBridge
from .model import DashboardModel
from .pace import FLOOD_EVENTS_PER_S, POOL_FLOOD_EVENTS_PER_S, RefreshPace
from .screens import FailuresScreen, HelpScreen, JobFileScreen, PickerScreen, TaskDetailScreen
from .widgets import (
    AlertsPanel,
    JobsPanel,
    LatencyPanel,
    LogPanel,
    NodesPanel,
    SlotsPanel,
    StreamPanel,
    SummaryBar,
    ThroughputBar,
)

if TYPE_CHECKING:
    from batuta.runtime.pool import Pool
    from batuta.runtime.shipping import CodeShipped

    from .rows import HostRow

log = logging.getLogger("batuta.tui")

FrameListener = Callable[[float, float], None]
JOB_FILE_CHOICE = "\x00job-file"


@dataclass(frozen=True, slots=True)
class PaletteCommand:
    """One command palette entry: what it says, a line of help, and what it does."""

    title: str
    help: str
    run: Callable[[], object]


def _one_line(text: str, limit: int = 400) -> str:
    """First line and last (a traceback's verdict), cut in the middle: the cause comes last."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    line = f"{lines[0]} … {lines[-1]}" if len(lines) > 1 else (lines[0] if lines else "")
    return render.keep_ends(line, limit)


UNDRAIN = "undrain:"  # a drain picker value that gives the host work again
_DRAINED = ("draining", "drained", "unfit")  # an unfit host's undrain gives it work again too


def drain_choices(hosts: Iterable[HostRow]) -> list[tuple[str, str]]:
    """The drain picker's (value, label)s: hosts to drain, and drained ones to give work again
    (a drain is undone the same way: draining the last host must not leave its work stuck)."""
    choices = [(h.name, h.name) for h in hosts if h.state in ("up", "suspected")]
    choices += [(f"{UNDRAIN}{h.name}", f"{h.name} (undrain: give it work again)") for h in hosts if h.state in _DRAINED]
    return choices


class BatutaApp(App[None]):
    """Nodes, job flow, slots, latency, task stream, alerts and log for one pool."""

    CSS_PATH = "batuta.tcss"
    TITLE = "batuta"
    AUTO_FOCUS = None  # no panel grabs the keys until clicked or tabbed to
    # the screen's class by its height, for batuta.tcss: under 40 rows the panels' caps shrink
    # and, in turn, the panels a short screen cannot draw readably give way to the task stream
    # (a ClassVar annotation here clashes with Textual's, which mypy reads as an instance's)
    VERTICAL_BREAKPOINTS = [(0, "-tiny"), (21, "-short"), (30, "-medium"), (40, "-tall")]  # noqa: RUF012
    COMMANDS: ClassVar = App.COMMANDS | {BatutaCommands}
    # The footer shows these in this order and cuts what does not fit at its right end: help
    # and quit first, so that an 80-column terminal still says how to leave and where the
    # other keys are (last, they were cut there). An attached view shows its detach key next.
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("question_mark,f1", "help", "Help"),
        Binding("q", "quit", "Quit"),
        Binding("x", "detach", "Detach", show=False),
        Binding("d", "start_job('demo')", "Demo"),
        Binding("r", "pick_job", "Run job"),
        Binding("c", "cancel_job", "Cancel job"),
        Binding("p", "toggle_pause", "Pause/resume"),
        Binding("n", "drain_host", "Drain host"),
        Binding("f", "show_failures", "Failures"),
        Binding("k", "cycle_latency('kernel')", "Latency kernel", show=False),
        Binding("b", "cycle_latency('backend')", "Latency backend", show=False),
        Binding("o", "cycle_latency('host')", "Latency host", show=False),
        Binding("g", "toggle_gpu_rows", "GPU rows", show=False),
    ]

    def toast(
        self, message: str, *, title: str = "", severity: SeverityLevel = "information", timeout: float | None = None
    ) -> None:
        """A toast whose text is shown as it is. What it says comes from jobs, hosts and errors:
        read as Rich markup, a job's value '[/tmp/out.npy]' raised MarkupError and ended the
        dashboard (and its jobs) with exit code 0, and '[ssh]' vanished from a hint. (`notify`
        keeps Textual's markup: its own toasts, such as ctrl+c's, are written in it.)"""
        self.notify(message, title=title, severity=severity, timeout=timeout, markup=False)

    def __init__(
        self,
        pool: Pool | None = None,
        *,
        model: DashboardModel | None = None,
        cluster_label: str = "local",
        start_jobs: Sequence[str] = (),
        refresh_hz: float = 12.0,
        slot_poll_s: float = 0.5,
        own_pool: bool = True,
        pool_started: bool = False,
        attach_logging: bool = True,
        frame_listener: FrameListener | None = None,
        held: str = "",
    ) -> None:
        """Show `pool` (started here unless `pool_started`; closed on exit when `own_pool`).

        `start_jobs` run once the pool is up (`batuta tui --job demo`). `held` names what the
        pool holds that costs while idle (a batch allocation's nodes): said when the last
        running job ends, since nothing else on screen says it. `frame_listener`,
        when given, is called with (perf_counter when a frame's refresh began, perf_counter
        once that frame reached the screen): the load benchmark measures with it.
        """
        super().__init__()
        self.pool = pool
        self.model = model if model is not None else DashboardModel(cluster_label=cluster_label)
        self._start_jobs = list(start_jobs)
        self._refresh_interval = 1.0 / refresh_hz
        self._slot_poll_s = slot_poll_s
        self._own_pool = own_pool
        self._pool_started = pool_started
        self._log_bridge = LogBridge(self.model) if attach_logging else None
        self._frame_listener = frame_listener
        self._held = held
        self._pool_unsubscribe: Callable[[], None] | None = None
        self._pool_ready = asyncio.Event()
        self._pool_failed = ""  # why the pool did not start: jobs asked for then are told, not held
        self._signals_before: dict[signal.Signals, Any] = {}  # the handlers ours replaced: put back at unmount
        self._polled_at = -1e18
        # a pool on this loop floods it at a lower rate than a dashboard fed from elsewhere (see RefreshPace)
        self._pace = RefreshPace(POOL_FLOOD_EVENTS_PER_S if pool is not None else FLOOD_EVENTS_PER_S)
        self._job_workers: dict[str, Worker[None]] = {}
        self._dash_panels: list[SummaryBar | NodesPanel | LogPanel] = []
        self.frames = 0  # refreshes that redrew at least one panel

    def get_driver_class(self) -> type[Driver]:
        """Textual's driver; on a terminal, one that exits the app once the terminal is gone (tui/driver.py)."""
        from textual.drivers.linux_driver import LinuxDriver

        from .driver import TerminalDriver

        found = super().get_driver_class()
        return TerminalDriver if found is LinuxDriver else found

    # -- layout -----------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        model = self.model
        yield SummaryBar(model, id="summary")
        yield ThroughputBar(model, id="throughput")
        yield NodesPanel(model, title="Nodes", id="nodes")
        with Horizontal(id="body"):
            with Vertical(id="flow"):
                yield JobsPanel(model, title="Jobs", id="jobs")
                yield SlotsPanel(model, title="Slots", id="slots")
                yield StreamPanel(model, title="Task stream", id="stream")
            with Vertical(id="side"):
                yield LatencyPanel(model, id="latency")
                yield AlertsPanel(model, title="Alerts", id="alerts")
                yield LogPanel(model, id="log")
        yield Footer()

    def on_mount(self) -> None:
        self._dash_panels = [
            *self.query(SummaryBar),  # the throughput bar and latency panel are SummaryBars too
            *self.query(NodesPanel),
            *self.query(JobsPanel),
            *self.query(SlotsPanel),
            *self.query(StreamPanel),
            *self.query(AlertsPanel),
            *self.query(LogPanel),
        ]
        if self._log_bridge is not None:
            self._log_bridge.attach()
        pool = self.pool
        if pool is not None:
            self._pool_unsubscribe = pool.subscribe(self.model.inbox)  # folded in batches
            if self._pool_started:
                self.model.seed_hosts(pool.hosts())
                self.model.set_status("running")
                self._pool_ready.set()
            else:
                self.run_worker(self._start_pool(), name="pool start", group="pool", exit_on_error=False)
        self.set_interval(self._refresh_interval, self._tick, name="dashboard refresh")
        self.call_after_refresh(self._tick)
        self._quit_on_sigterm()

    def _quit_on_sigterm(self) -> None:
        """`kill PID` quits as `q` does: the terminal back out of raw mode and the alternate
        screen, the pool closed (its agents stopped); the default action left the terminal
        raw, without echo, for the user to `reset`. SIGHUP (the terminal gone) quits so too,
        with the code a lost terminal has (tui/driver.py): raised as KeyboardInterrupt
        wherever the app was, it once left a viewer blocked on its dead terminal, spinning."""
        loop = asyncio.get_running_loop()
        quits: dict[signal.Signals, Callable[[], None]] = {signal.SIGTERM: self.exit, signal.SIGHUP: self._hung_up}
        for signum, quit in quits.items():
            if signal.getsignal(signum) == signal.SIG_IGN:
                continue  # under nohup: hanging up is no reason to stop
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
                before = signal.getsignal(signum)
                loop.add_signal_handler(signum, quit)
                self._signals_before[signum] = before

    def _hung_up(self) -> None:
        self.exit(return_code=TERMINAL_GONE_CODE)

    async def on_unmount(self) -> None:
        """Stop listening, give the logger back, and close the pool if it is ours."""
        for signum, before in self._signals_before.items():
            # the loop's removal sets the default action: a SIGHUP while the pool closes killed it
            with contextlib.suppress(RuntimeError, ValueError, TypeError):
                asyncio.get_running_loop().remove_signal_handler(signum)
                signal.signal(signum, before)
        self._signals_before.clear()
        if self._pool_unsubscribe is not None:
            self._pool_unsubscribe()
            self._pool_unsubscribe = None
        if self._log_bridge is not None:
            self._log_bridge.detach()
        if self.pool is not None and self._own_pool:
            await self.pool.close()

    # -- the refresh timer ------------------------------------------------------------------

    def _tick(self, *, everything: bool = False) -> None:
        """One frame: poll slot views when due, advance the model's clock, redraw what moved.

        Light panels (summary, stream, jobs, alerts, log) redraw whenever they moved; of the
        heavy ones (nodes, slots, latency: whole screens of lines) at most one redraws per
        frame, the one that waited longest, so their once-a-second redraws never pile into
        one long frame that would delay everything else on the loop. While the pool floods
        (see `RefreshPace`), frames come at 2 Hz and every panel but the summary takes turns.
        """
        began = time.perf_counter()
        model = self.model
        events = model.drain()
        if not everything and not self._pace.frame_due(began, events):
            return
        now = model.clock()
        pool = self.pool
        if pool is not None and self._pool_running and now - self._polled_at >= self._slot_poll_s:
            self._polled_at = now
            model.update_slots(pool.slots())
            model.set_paused(pool.paused)
        model.tick(now)
        drew = False
        # While the coordinator is flat out, every panel but the summary takes turns as if heavy.
        saturated = self._pace.saturated and not everything
        queue = []
        for panel in self._dash_panels:
            if getattr(panel, "heavy", False) or (saturated and panel.id != "summary"):
                queue.append(panel)
            else:
                drew = panel.sync(now) or drew
        queue.sort(key=lambda panel: getattr(panel, "_drawn_at", 0.0))
        for panel in queue:
            if panel.sync(now):
                drew = True
                if not everything:
                    break
        if drew:
            self.frames += 1
            if self._frame_listener is not None:
                self.call_after_refresh(self._frame_done, began)

    def _frame_done(self, began: float) -> None:
        if self._frame_listener is not None:
            self._frame_listener(began, time.perf_counter())

    @property
    def _pool_running(self) -> bool:
        return self._pool_ready.is_set() and not self._pool_failed

    def sync_now(self) -> None:
        """Redraw whatever moved right away (after an action), without waiting for the timer."""
        self._tick(everything=True)

    # -- the pool ---------------------------------------------------------------------------

    async def _start_pool(self) -> None:
        pool = self.pool
        assert pool is not None
        self.model.set_status("starting", "starting hosts…")
        self.model.seed_hosts(pool.hosts())  # every host, "starting": the one start-up waits for showed nowhere
        try:
            await pool.start()
        except Exception as exc:  # every start failure is shown, none crashes the app
            detail = _one_line(str(exc)) or type(exc).__name__
            self.model.set_status("failed", f"pool failed to start: {detail}")
            log.error("pool failed to start: %s", detail)
            self.toast(detail, title="pool failed to start", severity="error", timeout=30)
            self._pool_failed = detail
            self._pool_ready.set()  # wakes the jobs waiting for it, which then say why they cannot run
            return
        self.model.seed_hosts(pool.hosts())
        self.model.set_status("running")
        self._pool_ready.set()
        for spec in self._start_jobs:
            self.start_job(spec)

    # -- jobs -------------------------------------------------------------------------------

    def start_job(self, spec: str) -> None:
        """Load and run a built-in job or a job file as a worker; errors become notifications."""
        if self.pool is None:
            self.toast("this dashboard replays recorded events; it has no pool to run jobs on", severity="warning")
            return
        self.run_worker(self._run_job(spec), name=f"job {spec}", group="jobs", exit_on_error=False)

    def _label_for(self, name: str, origin: str) -> str:
        base = name if origin == "built-in" else Path(name).stem
        label, number = base, 1
        while label in self.model.jobs:
            number += 1
            label = f"{base}-{number}"
        return label

    async def _report_import_errors(self, shipped: CodeShipped) -> None:
        for host, errors in (await shipped.import_errors()).items():
            failures = "; ".join(f"{module}: {error}" for module, error in errors.items())
            self.toast(_one_line(failures), title=f"host {host} cannot import the job's code", severity="error")

    async def _run_job(self, spec: str) -> None:
        pool = self.pool
        assert pool is not None
        try:
            job = await asyncio.to_thread(load_job, spec)  # a job file's imports must not stall the loop
        except JobError as exc:
            log.error("cannot run job %s: %s", spec, _one_line(str(exc)))  # the log keeps it after the toast
            self.toast(str(exc), title="cannot run job", severity="error", timeout=15)
            return
        await self._pool_ready.wait()
        if self._pool_failed:
            why = f"the pool did not start ({self._pool_failed}); quit (q) and fix the cluster, then start again"
            log.error("cannot run job %s: %s", spec, why)
            self.toast(why, title="cannot run job", severity="error", timeout=15)
            return
        if job.origin != "built-in":  # its own modules go to every host first, never a stale copy
            try:
                shipped = await pool.ship(job_files=[job.origin])
            except BatutaError as exc:  # a CodeError (too much code), or the pool closed meanwhile
                self.toast(_one_line(str(exc)), title="cannot run job", severity="error", timeout=15)
                return
            # the hosts import it after `ship` returns (tasks sent meanwhile wait there): the job
            # starts now, and a module that fails to import is told when the hosts answer
            self.run_worker(self._report_import_errors(shipped), name=f"imports {spec}", exit_on_error=False)
        label = self._label_for(job.name, job.origin)
        self.model.job_started(label, job.origin)
        self._job_workers[label] = get_current_worker()
        log.info("job %s started (%s)", label, job.origin)
        try:
            with pool.job(label):
                value = await job.main(pool)
        except asyncio.CancelledError:
            self.model.job_ended(label, "cancelled", "cancelled")
            log.info("job %s cancelled", label)
            raise
        except Exception as exc:  # the job's bug is news, not a crash
            self._job_failed(label, f"{type(exc).__name__}: {_one_line(printable(exc))}")
        else:
            if inspect.isawaitable(value):  # `return pool.submit(...)`: it was "done", the future's repr its result
                from batuta.jobs import returned_unawaited

                self._job_failed(label, returned_unawaited(label, value))  # the name on screen
            else:
                message = _one_line(printable(value)) if value is not None else ""
                self.model.job_ended(label, "done", message)
                log.info("job %s finished%s", label, f": {message}" if message else "")
                self.toast(message or "finished", title=f"job {label} finished")
        finally:
            self._job_workers.pop(label, None)
            if self._held and not self._job_workers:
                log.warning("no job is running; %s until you quit (q)", self._held)
            self.sync_now()

    def _job_failed(self, label: str, message: str) -> None:
        """Job `label`'s `main` raised or returned what it should have awaited: said in the jobs
        panel, the log and a toast. Its tasks still queued or running are nobody's now: cancelled,
        as `batuta run` does (they ran on, the slots busy for a job already over)."""
        assert self.pool is not None
        left = self.pool.cancel_job(label)
        if left:
            message += f" ({left:,} unfinished task{'s' if left != 1 else ''} cancelled)"
        self.model.job_ended(label, "failed", message)
        log.warning("job %s failed: %s", label, message)
        self.toast(message, title=f"job {label} failed", severity="error", timeout=10)

    def cancel_job(self, label: str) -> None:
        """Cancel every unfinished task of job `label`, then the job's `main` itself."""
        count = self.pool.cancel_job(label) if self.pool is not None else 0
        worker = self._job_workers.get(label)
        if worker is not None:
            worker.cancel()
        self.toast(f"cancelled {count:,} unfinished task{'s' if count != 1 else ''}", title=f"job {label}")

    def running_jobs(self) -> list[str]:
        return list(self._job_workers)

    # -- actions (keys, palette, clicks) ----------------------------------------------------

    def action_start_job(self, spec: str) -> None:
        self.start_job(spec)

    def action_pick_job(self) -> None:
        choices = [(name, f"{name}  (built-in)") for name in builtin_job_names()]
        choices.append((JOB_FILE_CHOICE, "a job file…"))

        def chosen(value: str | None) -> None:
            if value == JOB_FILE_CHOICE:
                self.action_job_file()
            elif value:
                self.start_job(value)

        self.push_screen(PickerScreen("Run a workload", choices), chosen)

    def action_job_file(self) -> None:
        self.push_screen(JobFileScreen(), lambda path: self.start_job(path) if path else None)

    def action_cancel_job(self) -> None:
        """Ask which job, even of one: a stray `c` cancelled at once, and in an attached view that
        is a served job that may have run for hours (Enter confirms, Esc keeps it running)."""
        running = self.running_jobs()
        if not running:
            self.toast("no job is running", severity="warning")
            return
        self.push_screen(
            PickerScreen("Cancel which job?", [(label, f"cancel {label}") for label in running]),
            lambda label: self.cancel_job(label) if label else None,
        )

    def action_toggle_pause(self) -> None:
        pool = self.pool
        if pool is None or not self._pool_running:
            self.toast("the pool is not running", severity="warning")
            return
        if pool.paused:
            pool.resume()
            self.toast("scheduling resumed")
        else:
            pool.pause()
            self.toast("scheduling paused: running tasks finish, queued ones wait")
        self.model.set_paused(pool.paused)
        self.sync_now()

    def action_drain_host(self) -> None:
        choices = drain_choices(self.model.hosts.values())
        if self.pool is None or not choices:
            self.toast("no host to drain", severity="warning")
            return
        self.push_screen(
            PickerScreen("Drain which host? (it gets no new work)", choices),
            lambda host: self.drain_host(host) if host else None,
        )

    def drain_host(self, host: str) -> None:
        """Drain `host`, or undrain it when the picker's value starts with `UNDRAIN`."""
        if self.pool is None:
            return
        undo = host.startswith(UNDRAIN)
        host = host.removeprefix(UNDRAIN)
        try:
            self.pool.drain(host, undo=undo)
        except Exception as exc:
            self.toast(str(exc), title="cannot drain", severity="error")
            return
        if undo:
            self.toast(f"{host} takes work again")
        elif not any(h.state in ("up", "suspected") for h in self.model.hosts.values() if h.name != host):
            self.toast(
                f"draining {host}, the last host that takes work: queued tasks wait until it is undrained (n)",
                severity="warning",
            )
        else:
            self.toast(f"draining {host}: no new work goes there")
        self.sync_now()

    def action_show_failures(self) -> None:
        self.push_screen(
            FailuresScreen(self.model.latest_failures()),
            lambda task_id: self.action_show_task(task_id) if task_id is not None else None,
        )

    def action_show_task(self, task_id: int) -> None:
        failed = self.model.failure(task_id)
        if failed is None:
            self.toast(f"task {task_id} is not among the recent failures", severity="warning")
            return
        self.push_screen(TaskDetailScreen(failed))

    def action_detach(self) -> None:
        """Here the dashboard is the coordinator (see tui/attach.py for the attached one)."""
        self.toast(
            "this dashboard is the coordinator: closing it ends the job; start with 'batuta tui --serve' "
            "to detach and re-attach",
            severity="warning",
            timeout=10,
        )

    def action_cycle_latency(self, dimension: str) -> None:
        value = self.model.cycle_latency_filter(dimension)
        self.toast(f"latency: {dimension} {value or 'all'}", timeout=2)
        self.sync_now()

    def action_toggle_gpu_rows(self) -> None:
        self.query_one(NodesPanel).toggle_gpu_rows()

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def palette_commands(self) -> list[PaletteCommand]:
        """What the command palette offers now (see `commands.BatutaCommands`)."""
        commands = [
            PaletteCommand(f"Start workload: {name}", f"run the built-in job '{name}'", partial(self.start_job, name))
            for name in builtin_job_names()
        ]
        commands.append(
            PaletteCommand("Run a job file…", "a .py file with 'async def main(pool)'", self.action_job_file)
        )
        commands += [
            PaletteCommand(f"Cancel job: {label}", "cancel its unfinished tasks", partial(self.cancel_job, label))
            for label in self.running_jobs()
        ]
        paused = self.pool is not None and self.pool.paused
        commands.append(
            PaletteCommand(
                "Resume scheduling" if paused else "Pause scheduling",
                "queued tasks wait while paused; running ones finish",
                self.action_toggle_pause,
            )
        )
        commands += [
            PaletteCommand(f"Drain host: {host.name}", "send it no new work", partial(self.drain_host, host.name))
            for host in self.model.hosts.values()
            if host.state in ("up", "suspected")
        ]
        commands += [
            PaletteCommand("Show failed tasks", "attempts, hosts, error and stderr", self.action_show_failures),
            PaletteCommand(
                "Latency: next kernel", "cycle the histogram's kernel", lambda: self.action_cycle_latency("kernel")
            ),
            PaletteCommand(
                "Latency: next backend", "cycle the histogram's backend", lambda: self.action_cycle_latency("backend")
            ),
            PaletteCommand(
                "Latency: next host", "cycle the histogram's host", lambda: self.action_cycle_latency("host")
            ),
            PaletteCommand("Help", "keys, mouse and panels", self.action_help),
        ]
        return commands
