"""Process logging for services and the CLI: `text` (one human-readable line per record) or
`json` (one JSON object per line, for log collectors: time, level, logger, message, plus the
record's `fields` when it carries some, e.g. the router's per-request line).

Invariant: every record becomes exactly one line; a JSON line always parses, whatever the message
or field values (anything not JSON-native is written as its string form).
"""

from __future__ import annotations

import datetime
import json
import logging

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def setup_logging(level: str, log_format: str = "text") -> None:
    """Configure the root logger once for this process (a later call replaces the handler)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)} (got {log_format!r})")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
