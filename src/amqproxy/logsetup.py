"""Logging for a proxy whose clients come and go by the thousand.

One line per client connect and one per disconnect is what an operator wants, and at thousands
of clients a second it must cost little: lines logged during one event-loop turn are written
with one system call (``TurnBufferedHandler``), the date-time string is rendered once a second
(``LogFormatter``), and ``hot_info`` writes those per-client lines without building a
``LogRecord`` when the proxy's own handler is installed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any, TextIO

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FORMATS = ("text", "json")
# What a line may say about its subject, as keys of a JSON line (``extra=`` of a log call).
FIELDS = ("event", "client", "user", "vhost", "connection_name", "pool", "upstream", "code",
          "reason")  # fmt: skip
_handler: TurnBufferedHandler | None = None  # the proxy's handler, once configure() ran


def configure(level: str, stream: TextIO, fmt: str = "text", tag: str = "") -> None:
    """The proxy's logging: ``level`` and up, to ``stream``, buffered per loop turn, as text
    lines or (``fmt`` "json") one JSON object per line; ``tag`` names the process in every
    line ("worker 2", "supervisor": the processes of ``--workers`` share one stream)."""
    global _handler
    # No caller, thread or process lookups per record.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = TurnBufferedHandler(stream)
    handler.tag = f"[{tag}] " if tag else ""
    text = FORMAT.replace("%(name)s", handler.tag + "%(name)s")
    handler.setFormatter(JsonFormatter(tag) if fmt == "json" else LogFormatter(text))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    _handler = handler


def set_level(level: str) -> None:
    """A new log level (SIGHUP), for every logger of the proxy at once."""
    logging.getLogger().setLevel(level.upper())


def hot_info(
    logger: logging.Logger, message: str, fields: Callable[[], dict[str, Any]] | None = None
) -> None:
    """An INFO line on a hot path (a client came or went): the same line as ``logger.info``
    would write, without the record machinery when the proxy's text handler is in use.
    ``fields`` (the JSON line's subject) is called only when a record is built."""
    if not logger.isEnabledFor(logging.INFO):
        return
    if _handler is None or not isinstance(_handler.formatter, LogFormatter):
        logger.info("%s", message, extra=fields() if fields is not None else None)
    else:
        _handler.emit_line("INFO", logger.name, message)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, event, message, and the subject's
    fields (client address, user, vhost, connection name, pool, reason) where known."""

    def __init__(self, process: str = "") -> None:
        super().__init__()
        self.process = process  # "worker 2", "supervisor", or "" for the only process

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", "") or record.name.rsplit(".", 1)[-1],
            "message": record.getMessage(),
        }
        if self.process:
            line["process"] = self.process
        for key in FIELDS[1:]:
            value = getattr(record, key, None)
            if value not in (None, ""):
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class LogFormatter(logging.Formatter):
    """The standard format, with the date-time string rendered once per second: a proxy
    that logs every client connect and disconnect formats thousands of records a second."""

    _second = -1
    _stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self.stamp(record.created)

    def stamp(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return f"{self._stamp},{int((created - second) * 1000):03d}"


FLUSH_INTERVAL = 0.05  # seconds between two writes for the per-client lines, at least
FLUSH_LINES = 1000  # ... unless this many lines wait


class TurnBufferedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes the lines logged during one event-loop turn with one system call; the
    per-client lines of ``hot_info`` wait up to ``FLUSH_INTERVAL`` for the next write.

    Every client logs a line when it connects and one when it leaves: with short-lived clients
    that is thousands of lines a second, and a write per line (or per loop turn: one client
    cycle is several turns). Other lines go out at the end of their turn, records at ERROR
    and above, records logged outside the event loop and the ``FLUSH_LINES``-th pending line
    at once; ``flush`` (called by ``logging.shutdown``) writes whatever is pending.
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._written = -FLUSH_INTERVAL  # time.monotonic() of the last write
        self._flush_soon = False  # a flush is due at the end of this turn
        self._flush_later = False  # ... or after the interval
        self.tag = ""  # "[worker 2] " before the logger's name

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # the logging module's own policy for bad records
            self.handleError(record)
            return
        self._queue(line, urgent=record.levelno >= logging.ERROR)

    def emit_line(self, level: str, name: str, message: str) -> None:
        """A line in the handler's format from its parts (``hot_info``): written with the
        next write, at most ``FLUSH_INTERVAL`` from now."""
        formatter = self.formatter
        stamp = formatter.stamp(time.time()) if isinstance(formatter, LogFormatter) else ""
        self._queue(f"{stamp} {level} {self.tag}{name}: {message}", urgent=False, hot=True)

    def _queue(self, line: str, urgent: bool, hot: bool = False) -> None:
        """Keep ``line`` for the next write: now (``urgent``, outside the loop, too many
        waiting), at the end of this turn, or (``hot``, a write less than FLUSH_INTERVAL
        ago) after the interval."""
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        pending = self._pending
        pending.append(line)
        if loop is None or urgent or len(pending) >= FLUSH_LINES:
            self.flush()
        elif self._flush_soon or (hot and self._flush_later):
            return
        elif hot and self._written + FLUSH_INTERVAL > time.monotonic():
            self._flush_later = True
            loop.call_later(FLUSH_INTERVAL, self.flush)
        else:  # (a flush only due after the interval is brought forward)
            self._flush_soon = True
            loop.call_soon(self.flush)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            lines, self._pending = self._pending, []
            self._flush_soon = self._flush_later = False
            if lines:
                self._written = time.monotonic()
                try:
                    self.stream.write("\n".join(lines) + "\n")
                except Exception:  # a closed or broken log stream must not stop the proxy
                    return
            super().flush()
