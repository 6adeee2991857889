"""``fieldgate run --log-format json``: one JSON object per line, for log shippers.

Fields: ``ts`` (RFC 3339, UTC, milliseconds), ``level``, ``logger``, ``msg`` (the formatted
message), and ``device`` / ``kind`` where the log call passed them (``extra=``: security events
carry both), ``exc`` for a traceback. Lines are written by the standard logging machinery, so
"transitions logged once" stays the log calls' own business.
"""

from __future__ import annotations

import logging
import time

from gateway.core import codec

# Attributes a log call may pass with extra= that become fields of their own.
FIELDS = ("device", "kind", "worker")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        doc: dict[str, object] = {
            "ts": f"{ts}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                doc[name] = value if isinstance(value, (str, int, float, bool)) else str(value)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return codec.dumps(doc).decode()


class WorkerField(logging.Filter):
    """Tags each record of a worker process with its ``I/W`` (the text format puts it in the
    prefix)."""

    def __init__(self, worker: str) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.worker
        return True
