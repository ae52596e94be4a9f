"""Modal screens: help, a failed task's details, the failures list, pickers, a job-file prompt.

Screens read the view-model once when they open (a failed task does not change) and
hand choices back through `dismiss`, so the app owns every action they lead to.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Grid, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Input, Label, Markdown, OptionList, Static
from textual.widgets.option_list import Option

from . import format as fmt
from .model import FailedTask
from .render import keep_ends

HELP = """\
# batuta dashboard

The coordinator runs inside this app: closing it stops the pool and its host agents.

| key | does |
|---|---|
| `d` | start the built-in **demo** workload |
| `r` | pick a workload to run: a built-in job, or a job file (`async def main(pool)`) |
| `c` | cancel a running job, chosen (and so confirmed) with Enter (its queued and running tasks are cancelled) |
| `p` | pause scheduling, or resume it (running tasks continue while paused) |
| `n` | drain a host: it gets no new work and shows *drained* once idle |
| `f` | failed tasks: pick one for attempts, hosts, error and stderr |
| `k` `b` `o` | latency histograms: cycle the kernel, backend or host shown |
| `g` | nodes: a line per GPU, or a line per host with its GPUs as cells |
| `x` | detach from a coordinator attached with `--attach` (it keeps running) |
| `ctrl+p` | command palette: every action above, searchable |
| `?` `f1` | this help |
| `q` | quit |

The mouse works too: click a failed task's `#id` in the task stream or the failures
alert, the latency filter labels, footer keys, and scroll any long panel.

**Panels.** *Nodes*: one line per host (state, CPU, memory, busy/total slots, tasks done,
heartbeat age) and one per GPU (utilisation over the last 60 s, memory, temperature,
power; `?` is a reading NVML could not take). In a cluster of 16 hosts or more whose
lines do not fit, a summary line comes first and each host takes one line, its GPUs drawn as one cell each, hosts
not up first (`g` switches). *Jobs*: progress of the tasks submitted so
far, counts by state, rate and ETA. *Slots*: each worker slot's deque depth, tasks in
flight against its window, and work-stealing traffic. *Latency*: log-scale histograms of
queue wait and run time with p50, p95 and p99 marked. *Task stream*: tasks running now,
then the latest endings. *Alerts* and *Log*: hosts lost or suspected, hot or full GPUs,
failing tasks, imbalance; and the `batuta` logger's records.
"""


class HelpScreen(ModalScreen[None]):
    """Keys, mouse and what each panel shows."""

    AUTO_FOCUS = "#help-body"  # arrow keys and page keys scroll the help

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q,question_mark,f1", "dismiss", "Close"),
    ]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-body", classes="dialog") as body:
            body.border_title = "Help"
            body.border_subtitle = "esc to close"
            yield Markdown(HELP)


class TaskDetailScreen(ModalScreen[None]):
    """A failed task: status, where each attempt ran and how it ended, error, stderr, stdout."""

    AUTO_FOCUS = "#detail-output"

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q", "dismiss", "Close"),
        Binding("y", "copy", "Copy error"),
    ]

    def __init__(self, failed: FailedTask) -> None:
        super().__init__()
        self.failed = failed

    def compose(self) -> ComposeResult:
        result = self.failed.result
        with Vertical(id="detail-body", classes="dialog") as body:
            body.border_title = f"Task #{result.task_id} · {result.name} · {result.status.value.replace('_', ' ')}"
            body.border_subtitle = "y copy error · esc close"
            with Grid(id="detail-fields"):
                for key, value in self._fields():
                    yield Label(key, classes="field-key")
                    yield Label(Text(value), classes="field-value")
            yield Label("Attempts", classes="section")
            yield Static(self._attempts(), id="detail-attempts")
            yield Label("Error", classes="section")
            yield Static(Text(result.error or result.describe_failure()), id="detail-error", classes="error")
            with VerticalScroll(id="detail-output"):
                yield Label("stderr", classes="section")
                yield Static(Text(result.stderr_str().rstrip() or "(empty)"), id="detail-stderr", classes="output")
                yield Label("stdout", classes="section")
                yield Static(Text(result.stdout_str().rstrip() or "(empty)"), id="detail-stdout", classes="output")

    def _fields(self) -> list[tuple[str, str]]:
        result = self.failed.result
        backend = result.backend.value if result.backend else "-"
        if result.backend_reason:
            backend = f"{backend} ({result.backend_reason})"
        return [
            ("job", result.job or "-"),
            ("status", result.status.value.replace("_", " ")),
            ("attempts", str(result.attempts)),
            ("host / slot", f"{result.host or '-'} / {result.slot or '-'}"),
            ("backend", backend),
            ("queue wait", fmt.duration(result.queue_wait)),
            ("run time", fmt.duration(result.duration) if result.slot else "-"),
            ("exit code", "-" if result.exit_code is None else str(result.exit_code)),
        ]

    def _attempts(self) -> Text:
        out = Text()
        for row in self.failed.attempts:
            if out:
                out.append("\n")
            out.append(f"#{row.attempt:<3} {row.slot:<14} {row.outcome}")
        return out

    def action_copy(self) -> None:
        result = self.failed.result
        self.app.copy_to_clipboard(f"{result.describe_failure()}\n{result.stderr_str()}")
        self.notify("copied the error and stderr")


class FailuresScreen(ModalScreen[int | None]):
    """The most recent failed tasks; choosing one opens its details."""

    AUTO_FOCUS = "OptionList"

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q", "dismiss", "Close")]

    def __init__(self, failures: Iterable[FailedTask]) -> None:
        super().__init__()
        self.failures = list(failures)

    def compose(self) -> ComposeResult:
        with Vertical(id="picker-body", classes="dialog") as body:
            body.border_title = "Failed tasks (newest first)"
            body.border_subtitle = "enter details · esc close"
            if not self.failures:
                yield Label("no failed tasks", classes="empty")
            yield OptionList(
                *(Option(self._prompt(f), id=str(f.result.task_id)) for f in self.failures), id="picker-options"
            )

    @staticmethod
    def _prompt(failed: FailedTask, width: int = 92) -> str:
        """One line per failure (an option list wraps long prompts), cut in the middle of the
        error when too long: its end is the hint, and the whole of it is one enter away."""
        r = failed.result
        line = f"#{r.task_id:<7} {r.name:<12} {r.job or '-':<10} {r.slot or '-':<11} {r.status.value}: {r.error or ''}"
        return keep_ends(line, width)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(int(event.option.id) if event.option.id is not None else None)


class PickerScreen(ModalScreen[str | None]):
    """Choose one of a few labelled values (a job to run or cancel, a host to drain)."""

    AUTO_FOCUS = "OptionList"

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q", "dismiss", "Close")]

    def __init__(self, title: str, choices: Sequence[tuple[str, str]]) -> None:
        """`choices` are (value, label) pairs; the chosen value is the screen's result."""
        super().__init__()
        self.title_text = title
        self.choices = list(choices)

    def compose(self) -> ComposeResult:
        with Vertical(id="picker-body", classes="dialog") as body:
            body.border_title = self.title_text
            body.border_subtitle = "enter choose · esc close"
            yield OptionList(*(Option(label, id=value) for value, label in self.choices), id="picker-options")

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)


class JobFileScreen(ModalScreen[str | None]):
    """Ask for the path of a job file; the app loads it (and reports what is wrong with it)."""

    AUTO_FOCUS = "Input"

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        with Vertical(id="jobfile-body", classes="dialog") as body:
            body.border_title = "Run a job file"
            body.border_subtitle = "enter run · esc close"
            yield Label("A .py file that defines 'async def main(pool)':")
            yield Input(placeholder="path/to/job.py", id="jobfile-path")
            yield Label("", id="jobfile-error", classes="error")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        path = Path(event.value.strip()).expanduser()
        problem = ""
        if not event.value.strip():
            problem = "type a path to a .py file"
        elif not path.is_file():
            problem = f"no file at {path}"
        elif path.suffix != ".py":
            problem = f"{path.name} is not a .py file"
        if problem:
            self.query_one("#jobfile-error", Label).update(problem)
            return
        self.dismiss(str(path))
