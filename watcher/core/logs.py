"""structlog set-up: one JSON event per line (or a terminal's formats), secrets scrubbed
from every value."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

REDACTED = "***"
# WATCHER_LOG_FORMAT: `auto` is `human` on a terminal and `json` elsewhere.
LOG_FORMATS = ("auto", "json", "console", "human")
# In the `human` format one line per document says these (service/console.py).
TOLD_BY_DOCUMENT_LINES = frozenset({"document_failed", "document_deferred"})
_SENSITIVE_KEYS = ("secret", "password", "token", "authorization", "credential", "api_key")


class SecretScrubber:
    """A structlog processor that masks known secret values and secret-looking keys.

    Known values are matched anywhere inside strings, so a secret that leaks into an
    exception message or a URL is still masked.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: list[str] = []
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        for value in secrets:
            # Very short values would mask ordinary words; real keys are long.
            if value and len(value) >= 6 and value not in self._secrets:
                self._secrets.append(value)
        self._secrets.sort(key=len, reverse=True)

    def scrub(self, value: Any) -> Any:
        if isinstance(value, str):
            for secret in self._secrets:
                if secret in value:
                    value = value.replace(secret, REDACTED)
            return value
        if isinstance(value, dict):
            return {k: self._scrub_item(k, v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.scrub(v) for v in value]
        return value

    def _scrub_item(self, key: Any, value: Any) -> Any:
        if isinstance(key, str) and any(word in key.lower() for word in _SENSITIVE_KEYS):
            return REDACTED
        return self.scrub(value)

    def __call__(
        self, _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key in list(event_dict):
            event_dict[key] = self._scrub_item(key, event_dict[key])
        return event_dict


scrubber = SecretScrubber()


def resolve_format(fmt: str, stream: Any = None) -> str:
    """`auto` made definite: `human` when `stream` (stdout) is a terminal, else `json`."""
    if fmt != "auto":
        return fmt
    isatty = getattr(stream or sys.stdout, "isatty", None)
    return "human" if isatty is not None and isatty() else "json"


def _drop_told_by_document_lines(_logger: Any, _method: str,
                                 event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    if event_dict.get("event") in TOLD_BY_DOCUMENT_LINES:
        raise structlog.DropEvent
    return event_dict


def configure_logging(level: str = "INFO", fmt: str = "json", secrets: Iterable[str] = ()) -> None:
    """Route structlog and the standard library's logging through one renderer: JSON, or
    for a person at a terminal (`human`: warnings and errors only, beside the document
    lines that service/console.py prints)."""
    scrubber.add(secrets)
    fmt = resolve_format(fmt)
    renderer: Any = (
        structlog.processors.JSONRenderer(ensure_ascii=False)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    human: list[Any] = [_drop_told_by_document_lines] if fmt == "human" else []
    if fmt == "human" and logging.getLevelName(level) < logging.WARNING:
        level = "WARNING"
    shared: list[Any] = [
        *human,
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        scrubber,
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Library chatter at INFO is noise for operators; their warnings still come through.
    for noisy in ("botocore", "aiobotocore", "aiohttp.access", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


def get_logger(name: str = "watcher") -> Any:
    return structlog.get_logger(name)
