"""Token secrets never reach a log: a filter that redacts them from every record, and the logging set-up
``m2kt broker serve`` runs with.

What is redacted, wherever it appears in a record (message, arguments, traceback):

* anything shaped like an API token — ``m2kt_`` followed by token characters (``m2kt_[redacted]``),
  also percent-encoded (``m2kt%5F…``);
* the value of any ``name=value`` pair whose name looks like a credential (``token``, ``access_token``,
  ``api_key``, ``secret``, ``password`` …) — a query string in an access-log line, most of all;
* the credentials after ``Bearer`` (``Bearer [redacted]``).

The filter sits on uvicorn's loggers (``uvicorn``, ``uvicorn.error``, ``uvicorn.access``,
``uvicorn.asgi``), on the ``m2kt`` loggers and on their handlers; :func:`logging_config` also sends
every other library's records through one redacting handler.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "LOGGERS",
    "REDACTED",
    "RedactSecrets",
    "install_redaction",
    "looks_like_token",
    "is_credential_name",
    "logging_config",
    "redact",
]

REDACTED = "[redacted]"

#: Loggers whose records carry URLs or request data; their handlers get the filter too.
LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi", "m2kt", "m2kt.broker")

# m2kt_ + token characters (secrets.token_urlsafe: A-Z a-z 0-9 - _), also with the underscore
# percent-encoded; 8 or more, so that a short word such as "m2kt_t" is left alone.
_TOKEN = re.compile(r"m2kt(?:_|%5[fF])[A-Za-z0-9_\-%]{8,}")
_BEARER = re.compile(r"(?i)\b(bearer(?:\s+|%20|\+))(?!\[redacted\])[^\s\"',;&]{8,}")
# A name=value pair whose name looks like a credential: the value goes (up to &, #, space or a quote).
_CREDENTIAL_NAME = r"[A-Za-z0-9_.\-]*(?:token|api[_\-]?key|apikey|secret|password|passwd|auth)[A-Za-z0-9_.\-]*"
_PAIR = re.compile(rf"(?i)(?<![A-Za-z0-9_.\-])({_CREDENTIAL_NAME}=)(?!\[redacted\])[^&#\s\"';,]+")
_NAME = re.compile(
    r"(?i)(?:.*token.*|.*api[_\-.]?key.*|apikey|.*secret.*|.*password.*|passwd"
    r"|auth|authorization|bearer|access[_\-]?key)"
)
#: A whole value that is an API token (what the request guard refuses in a query string).
_TOKEN_VALUE = re.compile(r"m2kt_[A-Za-z0-9_\-]{16,}")


def redact(text: str) -> str:
    """``text`` with every token-like secret replaced (see the module's docstring)."""
    if "m2kt" in text:
        text = _TOKEN.sub("m2kt_" + REDACTED, text)
    if "=" in text:
        text = _PAIR.sub(lambda m: m.group(1) + REDACTED, text)
    if "earer" in text or "EARER" in text:
        text = _BEARER.sub(lambda m: m.group(1) + REDACTED, text)
    return text


def is_credential_name(name: str) -> bool:
    """Whether a query parameter's name says it carries a credential (``token``, ``api_key`` …)."""
    return _NAME.fullmatch(name.strip()) is not None


def looks_like_token(value: str) -> bool:
    """Whether a whole value is an API token (``m2kt_`` and 16 or more token characters), or a
    ``Bearer …`` credential."""
    value = value.strip()
    return _TOKEN_VALUE.fullmatch(value) is not None or value.lower().startswith("bearer ")


def _redact_arg(arg: Any) -> Any:
    if arg is None or isinstance(arg, (bool, int, float)):
        return arg  # numbers stay numbers, for %d
    if isinstance(arg, str):
        return redact(arg)
    if isinstance(arg, (bytes, bytearray)):
        text = bytes(arg).decode("latin-1")
        cleaned = redact(text)
        return arg if cleaned == text else cleaned.encode("latin-1")
    try:
        text = str(arg)
    except Exception:  # noqa: BLE001 - a broken __str__ must not break logging
        return arg
    cleaned = redact(text)
    return arg if cleaned == text else cleaned


class RedactSecrets(logging.Filter):
    """Rewrites a record in place so that no token secret is left in it; never drops a record.

    The arguments keep their shape (uvicorn's access formatter unpacks them), and a traceback is
    formatted here, redacted, and left in ``exc_text`` for the handler's formatter to use."""

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            if isinstance(record.msg, str):
                record.msg = redact(record.msg)
            elif record.msg is not None and not isinstance(record.msg, (int, float)):
                record.msg = _redact_arg(record.msg)
            args = record.args
            if isinstance(args, Mapping):
                record.args = {k: _redact_arg(v) for k, v in args.items()}
            elif isinstance(args, tuple):
                record.args = tuple(_redact_arg(a) for a in args)
            if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
                record.exc_text = self._formatter.formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = redact(record.exc_text)
            if record.stack_info:
                record.stack_info = redact(record.stack_info)
            for name in ("color_message",):  # uvicorn's coloured twin of msg
                value = record.__dict__.get(name)
                if isinstance(value, str):
                    record.__dict__[name] = redact(value)
        except Exception:  # noqa: BLE001 - redaction must never lose the record
            record.msg, record.args = "(a log record was dropped: it could not be redacted)", None
            record.exc_info = record.exc_text = None
        return True


def _add_filter(target: logging.Filterer) -> None:
    if not any(isinstance(f, RedactSecrets) for f in target.filters):
        target.addFilter(RedactSecrets())


def install_redaction(loggers: Iterable[str] = LOGGERS) -> None:
    """Put the filter on ``loggers``, every ``m2kt.*`` logger that exists, their handlers and the root's.

    Idempotent; run it again after anything that (re)configures logging (uvicorn's ``Config`` does)."""
    names = set(loggers)
    names.update(n for n in logging.root.manager.loggerDict if n == "m2kt" or n.startswith("m2kt."))
    for name in sorted(names):
        logger = logging.getLogger(name)
        _add_filter(logger)
        for handler in logger.handlers:
            _add_filter(handler)
    for handler in logging.getLogger().handlers:
        _add_filter(handler)


def logging_config(log_level: str = "info") -> dict[str, Any]:
    """uvicorn's logging configuration plus: the redacting filter on both its handlers, the ``m2kt``
    loggers at ``log_level``, and every other logger's warnings, through the same redacting handler."""
    from uvicorn.config import LOG_LEVELS, LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"redact_secrets": {"()": RedactSecrets}}
    for handler in config["handlers"].values():
        handler["filters"] = [*handler.get("filters", []), "redact_secrets"]
    config["loggers"]["m2kt"] = {"level": LOG_LEVELS[log_level.lower()], "propagate": True}
    config["root"] = {"handlers": ["default"], "level": "WARNING"}
    return config
