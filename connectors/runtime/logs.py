"""Logging set-up: plain or JSON lines, with every registered secret scrubbed.

Secrets are registered as they become known (API keys at start, one-time tokens as
they are fetched); the formatter replaces them in the final text, exception
tracebacks included, so a secret cannot leak through a library's log line either.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading

_secrets: set[str] = set()
_lock = threading.Lock()
MASK = "***"
#: One pattern for all secrets (rebuilt when one is registered), for text and bytes.
_pattern: re.Pattern[str] | None = None
_bytes_pattern: re.Pattern[bytes] | None = None


def register_secret(value: str | None) -> None:
    """Scrub ``value`` from every log line from now on (ignores very short values)."""
    global _pattern, _bytes_pattern
    if value and len(value) >= 4:
        with _lock:
            if value in _secrets:
                return
            _secrets.add(value)
            ordered = sorted(_secrets, key=len, reverse=True)
            _pattern = re.compile("|".join(_piece(s) for s in ordered))
            _bytes_pattern = re.compile(
                "|".join(_piece(s) for s in ordered).encode("utf-8", "surrogateescape")
            )


def _piece(secret: str) -> str:
    # A numeric secret (an account id) is masked only as a whole number, so that the
    # digits inside an unrelated number (a price in a log line) stay as they are.
    escaped = re.escape(secret)
    return rf"(?<![0-9]){escaped}(?![0-9])" if secret.isdigit() else escaped


def redact(text: str) -> str:
    pattern = _pattern
    return text if pattern is None else pattern.sub(MASK, text)


def redact_bytes(data: bytes) -> bytes:
    """:func:`redact` for raw bytes (dead letters keep messages as they came)."""
    pattern = _bytes_pattern
    return data if pattern is None else pattern.sub(MASK.encode(), data)


class RedactingFormatter(logging.Formatter):
    def __init__(self, json_lines: bool) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.json_lines = json_lines

    def format(self, record: logging.LogRecord) -> str:
        if not self.json_lines:
            return redact(super().format(record))
        entry = {
            "ts": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return redact(json.dumps(entry))


def setup_logging(level: str = "INFO", json_lines: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter(json_lines))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # kafka-python and librdkafka are chatty at INFO about every connection; keep
    # their warnings.
    logging.getLogger("kafka").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("librdkafka").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("websockets").setLevel(max(logging.WARNING, root.level))
