"""Structured logging for every beekeeper process: one logfmt or JSON line per event.

Extra context goes in `extra=` and becomes key=value pairs, so logs can be grepped by
node, program or resource without parsing prose.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

# kopf attaches its settings object and object refs to every record: not useful per line.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName", "settings", "k8s_skip", "k8s_ref"}


def _fields(record: logging.LogRecord) -> dict[str, object]:
    fields: dict[str, object] = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    fields.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
    if record.exc_info:
        fields["error"] = logging.Formatter().formatException(record.exc_info)
    return fields


class LogfmtFormatter(logging.Formatter):
    """key=value pairs, values quoted only when they need it."""

    def format(self, record: logging.LogRecord) -> str:
        parts = []
        for key, value in _fields(record).items():
            text = str(value)
            if not text or any(c in text for c in ' ="\n'):
                text = json.dumps(text)
            parts.append(f"{key}={text}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record), default=str)


def setup(level: str | None = None, fmt: str | None = None) -> None:
    """Configure the root logger from arguments or BEEKEEPER_LOG_LEVEL / BEEKEEPER_LOG_FORMAT."""
    level = (level or os.environ.get("BEEKEEPER_LOG_LEVEL") or "info").upper()
    fmt = fmt or os.environ.get("BEEKEEPER_LOG_FORMAT") or "logfmt"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("urllib3", "kubernetes.client.rest", "asyncio", "kopf.objects", "kopf._cogs", "kopf._core"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
