"""Structured logs: every `batuta.*` record carries its context (job, task, host, slot, attempt).

Context comes from two places, merged by `ContextFilter` on each handler:

* `extra=` on the call, for code that knows the task it speaks of (the pool observer below
  logs `extra={"task": 12, "host": "gpu1", ...}`);
* `log_context(job="kmeans")`, a context manager over a `contextvars.ContextVar`, for code
  that runs *inside* a job or task and should not thread the fields through every call.
  Asyncio tasks copy the context when they are created, so a task spawned inside
  `with log_context(...)` keeps the fields.

Fields that do not apply are None on the record (and left out of JSON lines), so a handler
can always read `record.job` and friends.

`configure(...)` is what `batuta run --log-format/--log-level/--log-file` calls: it puts one
`QueueHandler` on the `batuta` logger and runs the real handlers (stderr, a file) in a
`QueueListener` thread, so that writing a log line never blocks the event loop. It returns a
`LogSetup` whose `close()` undoes all of it (tests and embedders call it).

Another consumer, such as the TUI's log panel, adds its own handler with `add_handler(h)`:
the handler is attached to the `batuta` logger directly, so it runs on the thread that
logged (the event loop, usually) with the context fields already set. It must therefore be
cheap and never block: append to a bounded buffer, and let the UI drain it.

JSON lines are one object per record: `ts` (ISO 8601, UTC), `level`, `logger`, `message`,
then whichever of `job`, `task`, `host`, `slot`, `attempt` apply, then `exc` (the formatted
traceback) when the record carries an exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import json
import logging
import logging.handlers
import queue
import sys
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

from batuta.runtime import events as pe

if TYPE_CHECKING:
    from batuta.runtime.pool import Pool

ROOT_LOGGER = "batuta"
CONTEXT_KEYS = ("job", "task", "host", "slot", "attempt")
"""The context fields, in the order JSON lines and text suffixes show them."""

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

_context: ContextVar[dict[str, Any] | None] = ContextVar("batuta_log_context", default=None)

log = logging.getLogger(__name__)


# -- context ------------------------------------------------------------------------------


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add context fields (`job`, `task`, `host`, `slot`, `attempt`) to records logged inside.

    Nested contexts merge, the inner one winning; a field set to None is removed.
    """
    unknown = set(fields) - set(CONTEXT_KEYS)
    if unknown:
        raise ValueError(f"unknown log context field(s) {sorted(unknown)}; use {', '.join(CONTEXT_KEYS)}")
    merged = {**(_context.get() or {}), **fields}
    token = _context.set({k: v for k, v in merged.items() if v is not None})
    try:
        yield
    finally:
        _context.reset(token)


def current_context() -> dict[str, Any]:
    """The context fields in effect here (a copy)."""
    return dict(_context.get() or {})


class ContextFilter(logging.Filter):
    """Sets every context field on the record: from `extra=` if given, else the context, else None.

    A filter, not a record factory, so that it only touches records batuta's handlers see.
    Put it on handlers (handler filters also see records from child loggers).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        context = _context.get()
        for key in CONTEXT_KEYS:
            if getattr(record, key, None) is None:
                setattr(record, key, context.get(key) if context else None)
        return True


# -- formatters ---------------------------------------------------------------------------


def _iso_utc(created: float) -> str:
    return _dt.datetime.fromtimestamp(created, tz=_dt.UTC).isoformat(timespec="microseconds")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, message, the context that applies, exc."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _iso_utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in CONTEXT_KEYS:
            value = getattr(record, key, None)
            if value is not None:
                line[key] = value if isinstance(value, (int, float, bool, str)) else str(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = record.stack_info
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """`2026-11-28T12:00:00.123Z WARNING batuta.x: message [job=kmeans task=12 host=a slot=a/0]`."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = _iso_utc(record.created)[:-9] + "Z"  # milliseconds are enough for a person
        context = " ".join(
            f"{key}={value}" for key in CONTEXT_KEYS if (value := getattr(record, key, None)) is not None
        )
        text = f"{stamp} {record.levelname} {record.name}: {record.getMessage()}"
        if context:
            text += f" [{context}]"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text += "\n" + record.exc_text
        if record.stack_info:
            text += "\n" + self.formatStack(record.stack_info)
        return text


def make_formatter(fmt: LogFormat) -> logging.Formatter:
    """The formatter for `--log-format text|json`."""
    if fmt == "json":
        return JsonFormatter()
    if fmt == "text":
        return TextFormatter()
    raise ValueError(f"unknown log format {fmt!r}; use one of {', '.join(LOG_FORMATS)}")


def parse_level(level: str | int) -> int:
    """`"info"`, `"INFO"` or `logging.INFO` -> `logging.INFO`; ValueError naming the choices."""
    if isinstance(level, int):
        return level
    value = logging.getLevelName(level.upper())
    if not isinstance(value, int):
        raise ValueError(f"unknown log level {level!r}; use one of {', '.join(LOG_LEVELS)}")
    return value


# -- handlers -----------------------------------------------------------------------------


def add_handler(
    handler: logging.Handler, *, fmt: LogFormat | None = None, logger: str = ROOT_LOGGER
) -> Callable[[], None]:
    """Attach `handler` to the `batuta` logger with context fields set; returns its remover.

    The handler runs on the logging thread (usually the event loop): keep it cheap. `fmt`
    sets one of batuta's formatters; leave it None to keep the handler's own formatter.
    """
    handler.addFilter(ContextFilter())
    if fmt is not None:
        handler.setFormatter(make_formatter(fmt))
    target = logging.getLogger(logger)
    target.addHandler(handler)

    def remove() -> None:
        target.removeHandler(handler)

    return remove


class _ContextQueueHandler(logging.handlers.QueueHandler):
    """Enqueues records with their message and traceback rendered, the context fields kept.

    The stock `prepare()` formats the whole record into `msg`, which would bake the text
    layout into JSON lines; this keeps the message and the traceback apart.
    """

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record = logging.makeLogRecord(record.__dict__)  # a copy: other handlers see the original
        record.message = record.getMessage()
        record.msg = record.message
        record.args = None
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        return record


@dataclass
class LogSetup:
    """What `configure()` installed; `close()` flushes the listener and undoes it all."""

    logger: logging.Logger
    queue_handler: logging.Handler
    listener: logging.handlers.QueueListener
    handlers: list[logging.Handler]
    previous_level: int
    previous_propagate: bool
    _closed: bool = field(default=False, repr=False)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.logger.removeHandler(self.queue_handler)
        self.listener.stop()  # drains what is queued, then joins the thread
        for handler in self.handlers:
            handler.close()
        self.logger.setLevel(self.previous_level)
        self.logger.propagate = self.previous_propagate

    def __enter__(self) -> LogSetup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _LogFile(logging.FileHandler):
    """`--log-file`: a write it cannot make (a full disk) is said once on stderr, and the file
    is then written no more. Python's handler printed a traceback for every record, and its
    close raised at the run's end: the job's result and summary were never printed, and a
    run whose every task succeeded exited 1."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if self.failed:
            return
        self.failed = True
        why = sys.exc_info()[1]
        reason = why.strerror if isinstance(why, OSError) and why.strerror else str(why)
        print(
            f"batuta: warning: cannot write the log file {self.baseFilename}: {reason}; it is written no more "
            "(the run goes on)",
            file=sys.stderr,
            flush=True,
        )

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def flush(self) -> None:
        try:
            super().flush()
        except OSError:
            if not self.failed:
                self.handleError(logging.makeLogRecord({}))

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # its last buffered lines: said once above, or now
            if not self.failed:
                self.handleError(logging.makeLogRecord({}))


def configure(
    *,
    level: str | int = "warning",
    fmt: LogFormat = "text",
    file: str | Path | None = None,
    stream: TextIO | None = None,
    logger: str = ROOT_LOGGER,
    console: bool = True,
) -> LogSetup:
    """Send `batuta.*` records at `level` and above to `stream` (default stderr) and `file`;
    with `console=False`, to `file` only (a full-screen app owns the terminal).

    Records are formatted and written in a listener thread. The `batuta` logger stops
    propagating to the root logger meanwhile, so an application that configured the root
    logger does not print every line twice; `close()` restores it.
    """
    numeric_level = parse_level(level)
    formatter = make_formatter(fmt)
    handlers: list[logging.Handler] = []
    if console:
        handlers.append(logging.StreamHandler(stream if stream is not None else sys.stderr))
    if file is not None:
        path = Path(file)
        try:
            handlers.append(_LogFile(path, encoding="utf-8"))
        except OSError as exc:
            raise ValueError(f"cannot open log file {str(path)!r}: {exc.strerror or exc}") from None
    for handler in handlers:
        handler.setFormatter(formatter)
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    queue_handler = _ContextQueueHandler(records)
    # its own level too: another handler on the logger (the dashboard's panel) may lower the
    # logger's, and this output must still hold to `level`
    queue_handler.setLevel(numeric_level)
    queue_handler.addFilter(ContextFilter())  # here: on the logging thread, where the context is
    listener = logging.handlers.QueueListener(records, *handlers, respect_handler_level=False)
    target = logging.getLogger(logger)
    setup = LogSetup(
        logger=target,
        queue_handler=queue_handler,
        listener=listener,
        handlers=handlers,
        previous_level=target.level,
        previous_propagate=target.propagate,
    )
    target.setLevel(numeric_level)
    target.propagate = False
    target.addHandler(queue_handler)
    listener.start()
    return setup


# -- the pool observer ----------------------------------------------------------------------

# INFO, not WARNING: "unreachable", "lost" (said again as a relaunch fails; the loss itself is
# HostDown) and "starting" are news the runtime logs itself as it acts (batuta.runtime.hosts:
# "failed to start ...; retrying", "relaunch N failed", "start-up goes on with ..."), and the
# same warning twice in a row reads as two failures.
_QUIET_HOST_STATES = frozenset({"up", "draining", "drained", "unreachable", "lost", "starting"})
FAILURES_WARNED_PER_KIND = 10  # then the same kind of failure is logged at DEBUG


class PoolLogObserver:
    """Logs what an operator wants to read about a pool: failures, retries, host changes.

    Subscribed with `attach()`; each event becomes at most one record with its context as
    `extra` fields. Successful tasks are logged at DEBUG only, and only when DEBUG is on, so
    the observer costs one level check per task in the usual case. The first
    `FAILURES_WARNED_PER_KIND` failures of a kind (kernel, status and error type) are
    warnings; the rest are DEBUG records, so ten thousand tasks failing the same way print
    ten lines and a note, not ten thousand (the run's summary still counts every one).
    """

    def __init__(self, pool: Pool, logger: logging.Logger | None = None) -> None:
        self._pool = pool
        self._log = logger or logging.getLogger("batuta.pool")
        self._unsubscribe: Callable[[], None] | None = None
        self._failures: dict[tuple[str, str, str], int] = {}  # kind -> failures seen
        self._requeues: dict[str | None, list[pe.TaskRequeued]] = {}  # host -> this turn's requeues

    def attach(self) -> PoolLogObserver:
        if self._unsubscribe is None:
            self._unsubscribe = self._pool.subscribe(self.on_event)
        return self

    def close(self) -> None:
        self._say_requeues()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def on_event(self, event: pe.PoolEvent) -> None:
        lg = self._log
        if isinstance(event, pe.TaskFinished):
            r = event.result
            if r.is_success():
                if lg.isEnabledFor(logging.DEBUG):
                    lg.debug("task %d (%s) succeeded in %.6fs", r.task_id, r.name, r.duration, extra=_result_context(r))
                return
            kind = (r.name, r.status.value, (r.error or "").split(":", 1)[0][:80])
            seen = self._failures[kind] = self._failures.get(kind, 0) + 1
            if seen < FAILURES_WARNED_PER_KIND:
                lg.warning("%s", r.describe_failure(), extra=_result_context(r))
            elif seen == FAILURES_WARNED_PER_KIND:
                lg.warning(
                    "%s (further failures of %s like this one are logged at DEBUG)",
                    r.describe_failure(),
                    r.name,
                    extra=_result_context(r),
                )
            elif lg.isEnabledFor(logging.DEBUG):
                lg.debug("%s", r.describe_failure(), extra=_result_context(r))
        elif isinstance(event, pe.TaskRequeued):
            self._requeued(event)
        elif isinstance(event, pe.HostStateChanged):
            level = logging.INFO if event.state in _QUIET_HOST_STATES else logging.WARNING
            lg.log(level, "host %s is %s: %s", event.host, event.state, event.reason, extra={"host": event.host})
        elif isinstance(event, pe.HostDown):
            lg.warning("host %s is down: %s", event.host, event.reason, extra={"host": event.host})
        elif isinstance(event, pe.HostUp):
            if not event.slots:  # `slots = 0` where no GPU answered: nothing will ever run there
                lg.warning(
                    "host %s is up but offers no slot, so it runs nothing: its slots setting is 0 and it has no GPU",
                    event.host,
                    extra={"host": event.host},
                )
            else:
                lg.info(
                    "host %s is up: %d slot(s), %d GPU(s), batuta %s, Python %s",
                    event.host,
                    len(event.slots),
                    len(event.gpus),
                    event.batuta_version,
                    event.python_version,
                    extra={"host": event.host},
                )
        elif isinstance(event, pe.SlotStateChanged):
            level = logging.INFO if event.state == "up" else logging.WARNING
            if lg.isEnabledFor(level):
                why = f": {event.reason}" if event.reason else ""
                lg.log(
                    level,
                    "slot %s is %s%s",
                    event.slot,
                    event.state,
                    why,
                    extra={"host": event.host, "slot": event.slot},
                )

    def _requeued(self, event: pe.TaskRequeued) -> None:
        """A lost host requeues every task on its slots in one turn of the loop: they are said
        in one warning per host at the end of the turn (64 slots printed 64 lines at once),
        each with its reason at DEBUG."""
        host = event.slot.split("/", 1)[0] if event.slot else None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # fed by hand, off the loop: said at once
            loop = None
        if not self._requeues and loop is not None:
            loop.call_soon(self._say_requeues)
        self._requeues.setdefault(host, []).append(event)
        if loop is None:
            self._say_requeues()

    def _say_requeues(self) -> None:
        requeues, self._requeues = self._requeues, {}
        for host, events in requeues.items():
            first = events[0]
            one_each = len(events) == 1 or self._log.isEnabledFor(logging.DEBUG)
            for event in events if one_each else ():
                self._log.log(
                    logging.WARNING if len(events) == 1 else logging.DEBUG,
                    "task %d (%s) requeued after attempt %d: %s",
                    event.task_id,
                    event.name,
                    event.attempts,
                    event.reason,
                    extra=_requeue_context(event, host),
                )
            if len(events) == 1:
                continue
            self._log.warning(
                "host %s: %d tasks requeued (ids %s); task %d: %s (each task's reason is logged at DEBUG)",
                host,
                len(events),
                _id_ranges(sorted(e.task_id for e in events)),
                first.task_id,
                first.reason,
                extra={"host": host},
            )


def _requeue_context(event: pe.TaskRequeued, host: str | None) -> dict[str, Any]:
    return {
        "job": event.job or None,
        "task": event.task_id,
        "host": host,
        "slot": event.slot,
        "attempt": event.attempts,
    }


def _id_ranges(ids: list[int], most: int = 8) -> str:
    """`12-75, 80, 82-90`: runs of consecutive ids, the first `most` of them and how many more."""
    runs: list[list[int]] = []
    for task_id in ids:
        if runs and task_id == runs[-1][1] + 1:
            runs[-1][1] = task_id
        else:
            runs.append([task_id, task_id])
    shown = ", ".join(f"{a}-{b}" if b > a else str(a) for a, b in runs[:most])
    return shown + (f", and {len(runs) - most} more runs" if len(runs) > most else "")


def _result_context(r: Any) -> dict[str, Any]:
    return {"job": r.job or None, "task": r.task_id, "host": r.host, "slot": r.slot, "attempt": r.attempts or None}
