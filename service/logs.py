"""Logging set-up, once per process: JSON lines or plain text, with structured fields."""

from __future__ import annotations

import json
import logging
import re
import sys
import textwrap
import time
from typing import Any

__all__ = ["configure_logging"]

# Attributes every LogRecord has; anything else was passed through `extra=` and is a field.
_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName", "color_message",  # the last: uvicorn's ANSI copy of the message
}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _RESERVED}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


# Line breaks and other control characters (C0, DEL, C1, Unicode line separators)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(text: str) -> str:
    """Control characters as `\\xNN` / `\\uNNNN`: a client's `%0A` cannot start a forged log line."""
    return _CONTROL.sub(lambda m: json.dumps(m.group())[1:-1] if ord(m.group()) > 0xFF
                        else f"\\x{ord(m.group()):02x}", text)


def _value(value: object) -> str:
    """A field value, quoted (JSON string) when a space, quote or `=` could make it read as another field."""
    text = str(value)
    if text and not _CONTROL.search(text) and not any(c in text for c in ' "=\\'):
        return text
    return json.dumps(text)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        return _escape(super().formatMessage(record))  # the traceback, appended after this, keeps its lines

    def formatException(self, ei: Any) -> str:  # noqa: N802 (logging's name)
        """Indented (and CR escaped): an exception message holding client text cannot pass for a log line."""
        return textwrap.indent(super().formatException(ei).replace("\r", "\\r"), "  ")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _fields(record)
        if fields:
            head, newline, trace = line.partition("\n")
            line = head + " " + " ".join(f"{k}={_value(v)}" for k, v in fields.items()) + newline + trace
        return line


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """Replace the root handlers with one stderr handler; uvicorn's loggers propagate to it."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries that brought their own stderr handler (uvicorn, huggingface_hub) log through
    # ours instead, so every line has one format.
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger) and logger.handlers:
            logger.handlers[:] = []
            logger.propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # the app writes its own access line
