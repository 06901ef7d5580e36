"""Logging setup: human-readable lines by default, JSON lines for log collectors, and no secrets.

A request id (from ``X-Request-ID`` or made up) and a delivery id ride in context variables, so every
line logged while handling one request or sending one delivery can be found together. Secrets from the
config (tokens, app secrets, API keys) and phone-number-like digit runs are masked in every line at
INFO and above: personal data and credentials belong at DEBUG at most, and preferably nowhere.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, SecretStr

if TYPE_CHECKING:
    from scrm.config import Config

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("scrm_request_id", default=None)
delivery_id: contextvars.ContextVar[int | None] = contextvars.ContextVar("scrm_delivery_id", default=None)

#: Mainland mobile numbers (1[3-9]x, 11 digits) and international ones (+ and 8-15 digits).
_PHONE = re.compile(r"(?<![\w+])(?:\+\d[\d -]{6,16}\d|1[3-9]\d{9})(?!\w)")
_SECRET_KEYS = re.compile(r"(secret|token|key|password)", re.IGNORECASE)
_NOISY = ("alembic", "apscheduler", "httpx")


@contextmanager
def request_context(value: str | None = None) -> Iterator[str]:
    """Carry a request id for the duration of one request (made up when the caller sent none)."""
    rid = value if value and re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value) else os.urandom(8).hex()
    token = request_id.set(rid)
    try:
        yield rid
    finally:
        request_id.reset(token)


@contextmanager
def delivery_context(value: int) -> Iterator[None]:
    """Carry a delivery id while the outbox sends it: ``with logs.delivery_context(d.id): ...``."""
    token = delivery_id.set(value)
    try:
        yield
    finally:
        delivery_id.reset(token)


class _Redact(logging.Filter):
    """Adds the context ids to every record and masks secrets and phone numbers at INFO and above."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        # Longest first so a secret containing another is masked whole.
        self.secrets = sorted({s for s in secrets if len(s) >= 6}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        record.delivery_id = delivery_id.get()
        if record.levelno >= logging.INFO:
            message = self.redact(record.getMessage())
            record.msg, record.args = message, None
            if record.exc_info and not record.exc_text:
                record.exc_text = self.redact(logging.Formatter().formatException(record.exc_info))
        return True

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return _PHONE.sub(lambda m: "***" + m.group(0)[-2:], text)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, context ids, exception text."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in ("request_id", "delivery_id"):
            if (value := getattr(record, name, None)) is not None:
                data[name] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            data["exc"] = record.exc_text
        return json.dumps(data, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s%(context)s")

    def format(self, record: logging.LogRecord) -> str:
        parts = [f"{n}={v}" for n in ("request_id", "delivery_id") if (v := getattr(record, n, None)) is not None]
        record.context = f" [{' '.join(parts)}]" if parts else ""
        return super().format(record)


def config_secrets(config: Config) -> list[str]:
    """Every secret-looking value in the config: SecretStr fields and keys named like secrets."""
    found: list[str] = []

    def walk(value: Any, name: str = "") -> None:
        if isinstance(value, SecretStr):
            found.append(value.get_secret_value())
        elif isinstance(value, BaseModel):
            for field in type(value).model_fields:
                walk(getattr(value, field), field)
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, str(key))
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item, name)
        elif isinstance(value, str) and _SECRET_KEYS.search(name):
            found.append(value)

    walk(config)
    return found


def setup(config: Config, stream: Any = None) -> logging.Handler:
    """Install one root handler per the ``[logging]`` section; returns it (tests read its output)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if config.logging.format == "json" else TextFormatter())
    handler.addFilter(_Redact(config_secrets(config)))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(config.logging.level)
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    return handler
