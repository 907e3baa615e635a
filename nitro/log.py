"""logfmt structured logs on stderr.

One line per record, ``key=value`` pairs in a fixed order, then the caller's
fields in the order given::

    ts=2026-11-26T06:00:00.123Z level=info logger=nitro.vhost msg="frontend connected" device=vol0

Fields come from ``logger.info("msg", extra={"fields": {...}})`` or from
:func:`log_event`. A value is quoted when it is empty or contains a space, a
quote, ``=``, a backslash or a control character; inside quotes ``"`` and
``\\`` are backslash-escaped and newlines/tabs become ``\\n``/``\\t``, so one
record is always one line (tracebacks included, under ``exc=``).

Formatting never raises: a value whose ``str()`` fails is logged as its
``repr()`` or as a placeholder, and a message whose ``%`` arguments do not
match is logged verbatim with ``log_error=...``. A log line must never be the
reason the daemon dies.

Under systemd, when stderr is the journal stream (``$JOURNAL_STREAM``), each
line is prefixed with the syslog priority (``<6>``), which journald strips and
records, so ``journalctl -p warning -u nitro`` works.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

__all__ = ["LogfmtFormatter", "setup_logging", "log_event", "format_value", "LEVELS"]

#: The accepted level names (``setup_logging(level=...)``, config ``log.level``).
LEVELS: Mapping[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# Keys the formatter writes itself; a caller field with one of these names is
# written as "field_<name>" so that a line never has the same key twice.
_RESERVED = frozenset({"ts", "level", "logger", "msg", "exc", "stack", "log_error"})

# syslog priorities (sd-daemon.h SD_ERR ...) for the journald prefix.
_SYSLOG_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))

_NEEDS_QUOTES = frozenset(' "=\\')
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _to_text(value: Any) -> str:
    if value is None:
        return ""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    try:
        return str(value)
    except Exception:
        pass
    try:
        return repr(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def format_value(value: Any) -> str:
    """Render one logfmt value, quoted and escaped when needed. Never raises."""
    text = _to_text(value)
    if text and not any(c in _NEEDS_QUOTES or c < " " or c == "\x7f" for c in text):
        return text
    out = []
    for c in text:
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif c < " " or c == "\x7f":
            out.append(f"\\x{ord(c):02x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _format_key(key: Any) -> str:
    text = _to_text(key)
    cleaned = "".join(c if (c.isalnum() or c in "_.-") and c.isascii() else "_" for c in text)
    cleaned = cleaned or "_"
    return "field_" + cleaned if cleaned in _RESERVED else cleaned


class LogfmtFormatter(logging.Formatter):
    """A :class:`logging.Formatter` writing one logfmt line per record.

    ``syslog_prefix=True`` prepends ``<N>`` (the syslog priority) for journald.
    """

    def __init__(self, *, syslog_prefix: bool = False) -> None:
        super().__init__()
        self.syslog_prefix = syslog_prefix

    def format(self, record: logging.LogRecord) -> str:
        try:
            return self._format(record)
        except Exception as exc:  # last resort: never raise from logging
            try:
                return (f"level=error logger=nitro.log msg={format_value('log record could not be formatted')}"
                    f" log_error={format_value(repr(exc))}")
            except Exception:
                return 'level=error logger=nitro.log msg="log record could not be formatted"'

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        secs = int(record.created)
        millis = min(int((record.created - secs) * 1000), 999)
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{millis:03d}Z"

    def _format(self, record: logging.LogRecord) -> str:
        log_error = None
        try:
            msg = record.getMessage()
        except Exception as exc:  # "%d" with a str, wrong argument count ...
            msg = _to_text(record.msg)
            log_error = f"bad log arguments {_to_text(record.args)!s}: {exc!r}"
        parts = [
            "ts=" + self.formatTime(record),
            "level=" + format_value(record.levelname.lower()),
            "logger=" + format_value(record.name),
            "msg=" + format_value(msg),
        ]
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            for key, value in list(fields.items()):
                parts.append(_format_key(key) + "=" + format_value(value))
        elif fields is not None:
            parts.append("fields=" + format_value(fields))
        if record.exc_info and record.exc_info[0] is not None:
            parts.append("exc=" + format_value(self.formatException(record.exc_info).rstrip()))
        elif record.exc_text:
            parts.append("exc=" + format_value(record.exc_text.rstrip()))
        if record.stack_info:
            parts.append("stack=" + format_value(self.formatStack(record.stack_info).rstrip()))
        if log_error is not None:
            parts.append("log_error=" + format_value(log_error))
        line = " ".join(parts)
        if self.syslog_prefix:
            line = f"<{_priority(record.levelno)}>{line}"
        return line


def _priority(levelno: int) -> int:
    for threshold, priority in _SYSLOG_PRIORITY:
        if levelno >= threshold:
            return priority
    return 7  # debug


def _parse_level(level: str | int) -> int:
    if isinstance(level, bool):
        raise ValueError(f"invalid log level {level!r}")
    if isinstance(level, int):
        return level
    try:
        return LEVELS[str(level).strip().lower()]
    except KeyError:
        raise ValueError(
            f"invalid log level {level!r}: expected one of {', '.join(sorted(set(LEVELS) - {'warn'}))}"
        ) from None


def _is_journal_stream(stream: TextIO) -> bool:
    """True if ``stream`` is the journald stream systemd connected us to."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


_HANDLER_MARK = "_nitro_logfmt_handler"


def setup_logging(level: str | int = "info", stream: TextIO | None = None) -> logging.Handler:
    """Send all logging (the root logger) as logfmt to ``stream`` (default: the
    current ``sys.stderr``) at ``level`` and above.

    ``level`` is a name from :data:`LEVELS` (case-insensitive) or a logging
    int; anything else raises :class:`ValueError`. Calling it again replaces
    the handler it installed before (other handlers are left alone). Returns
    the installed handler.
    """
    levelno = _parse_level(level)
    if stream is None:
        stream = sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LogfmtFormatter(syslog_prefix=_is_journal_stream(stream)))
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _HANDLER_MARK, False):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(levelno)
    return handler


def log_event(logger: logging.Logger, level: str | int, msg: str, /, **fields: Any) -> None:
    """``log_event(log, "info", "frontend connected", device="vol0")``.

    ``msg`` is taken literally (no ``%`` formatting); ``level`` is a name from
    :data:`LEVELS` or a logging int. An unknown level name logs at ERROR with
    the bad name as a field rather than raising.
    """
    try:
        levelno = _parse_level(level)
    except ValueError:
        levelno = logging.ERROR
        fields = {**fields, "bad_level": level}
    if logger.isEnabledFor(levelno):
        # msg goes in as an argument-less record so '%' in it is never interpreted.
        logger.log(levelno, "%s", msg, extra={"fields": fields}, stacklevel=2)
