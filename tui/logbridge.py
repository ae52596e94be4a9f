"""Forward batuta's stdlib logging records into the view-model's bounded log.

The runtime logs through the `batuta` logger hierarchy (host lost, relaunched, agent
stderr). While the dashboard runs, nothing may write to the terminal behind Textual's
back, so the app attaches this handler and the log panel shows the same records. The
handler only formats and appends (the model's deque is bounded), so a burst of records
never blocks the coordinator.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .model import DashboardModel

LOGGER_NAME = "batuta"


class ModelLogHandler(logging.Handler):
    """A logging handler whose sink is `DashboardModel.add_log`."""

    def __init__(self, model: DashboardModel, level: int = logging.INFO) -> None:
        super().__init__(level)
        self.model = model

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                message = f"{message}: {type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
            self.model.add_log(record.levelno, record.name, message, record.created)
        except Exception:  # a logging handler must never raise into the code that logged
            self.handleError(record)


class LogBridge:
    """Attach a `ModelLogHandler` to the `batuta` logger, and take it away again.

    While attached, the logger passes INFO and up (host relaunches are INFO) and does not
    propagate to the root logger, whose last-resort handler would write to stderr.
    """

    def __init__(self, model: DashboardModel, level: int = logging.INFO, logger_name: str = LOGGER_NAME) -> None:
        self.handler = ModelLogHandler(model, level)
        self.logger = logging.getLogger(logger_name)
        self._saved: tuple[int, bool] | None = None

    def attach(self) -> None:
        if self._saved is not None:
            return
        self._saved = (self.logger.level, self.logger.propagate)
        if self.logger.level == logging.NOTSET or self.logger.level > self.handler.level:
            self.logger.setLevel(self.handler.level)
        self.logger.propagate = False
        self.logger.addHandler(self.handler)

    def detach(self) -> None:
        if self._saved is None:
            return
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self._saved[0])
        self.logger.propagate = self._saved[1]
        self._saved = None
