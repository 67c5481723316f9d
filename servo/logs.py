"""Logging for `servo up`: plain text by default, one JSON object per line with
`SERVO_LOG_FORMAT=json`. A loop decision is logged with `decision(...)`: the message names
the event, and its fields (model, version, reason, numbers) travel in `extra={"fields":
...}`, so the JSON line carries them as keys and the text line as `key=value` pairs."""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import sys
from typing import Any, Literal, TextIO

LogFormat = Literal["text", "json"]

#: third-party loggers kept at WARNING (their INFO lines are per job run / migration)
QUIET = ("apscheduler", "alembic")
#: the logger of the loop's decisions (one line each)
log = logging.getLogger("servo.loop")


def plain(value: Any) -> Any:
    """JSON-able and finite (NaN and infinities become null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(v) for v in value]
    if isinstance(value, str | int | bool) or value is None:
        return value
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, event (the message), the record's
    `fields` as keys of their own, and the traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                doc.setdefault(str(key), plain(value))
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, allow_nan=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and fields:
            pairs = " ".join(
                f"{k}={json.dumps(plain(v), ensure_ascii=False)}" for k, v in fields.items()
            )
            head, sep, tail = line.partition("\n")  # a traceback stays below the fields
            line = f"{head} {pairs}{sep}{tail}"
        return line


def configure(level: str = "INFO", fmt: LogFormat = "text", stream: TextIO | None = None) -> None:
    """The root logger writes to `stream` (stderr) in `fmt`; replaces earlier handlers."""
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be text or json, got {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for chatty in QUIET:  # a line per scheduled job run, per migration step
        logging.getLogger(chatty).setLevel(max(logging.WARNING, root.level))


def decision(event: str, level: int = logging.INFO, **fields: Any) -> None:
    """One structured line for one loop decision (`event` is a short snake_case name)."""
    log.log(level, event, extra={"fields": fields})


def flush() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
