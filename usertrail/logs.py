"""How every command logs: ``--log-format text`` (a line of prose each, the
default) or ``json`` (one JSON object per line, for log collectors: Loki,
Elasticsearch, CloudWatch), both on standard error."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

# attributes every LogRecord has: anything else was passed as ``extra=``
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "color_message",  # faust's colour-coded twin of the message
}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (UTC, RFC 3339), ``level``,
    ``logger``, ``message``, ``pid``, ``exception`` when there is one, and
    whatever the call passed as ``extra``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        return json.dumps(out, default=str, ensure_ascii=False)


def error_line(message: str, exit_code: int) -> str:
    """The one line a command that fails says, as a JSON log line."""
    return json.dumps(
        {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "level": "ERROR",
            "logger": "usertrail",
            "message": message,
            "exitCode": exit_code,
        },
        ensure_ascii=False,
    )


COMMAND_HANDLER = "usertrail"
"""The name of the handler ``configure`` puts on the root logger."""


def configure(level: str, fmt: str) -> None:
    """The root logger: ``level``, in ``fmt`` ("text" or "json"), to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(COMMAND_HANDLER)
    formatter = JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    logging.root.handlers[:] = [handler]
    logging.root.setLevel(level)


def worker_config(level: str, fmt: str) -> dict[str, Any] | None:
    """faust's worker sets logging up itself; in JSON, this dictConfig for
    it (None: faust's own text lines)."""
    if fmt != "json":
        return None
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{__name__}.JsonFormatter"}},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": level, "handlers": ["default"]},
    }
