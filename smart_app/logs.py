"""Log output for operators: plain lines for a terminal, or one JSON object per line for a log pipeline.

Query strings and launch session ids are already redacted by smart_app.security's filter on the request loggers;
the app itself never logs tokens or patient data. JSON lines carry only the fields below, so a log pipeline can
index them without parsing free text.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

from fhir_massage.errors import InvalidInput

PLAIN = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and record.exc_info[0] is not None:
            # The exception's type only: a traceback's locals and messages can hold request data.
            entry["error"] = record.exc_info[0].__name__
        return json.dumps(entry, ensure_ascii=False)


def configure(fmt: str = "plain", level: int = logging.INFO) -> None:
    """Root logging for the app's processes: ``fmt`` is "plain" or "json" (FHIR_MASSAGE_LOG_FORMAT)."""
    fmt = (fmt or "plain").strip().lower()
    if fmt not in ("plain", "json"):
        raise InvalidInput(f"FHIR_MASSAGE_LOG_FORMAT must be plain or json, not {fmt!r}.")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(PLAIN))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
