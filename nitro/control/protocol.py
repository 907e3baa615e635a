"""The control protocol, sans-IO: request and reply lines, no socket.

JSON lines over a unix stream socket (``$RUNTIME_DIRECTORY/control.sock``,
mode 0600). The client writes one JSON object per line, the daemon answers
each with one JSON object per line, in order::

    -> {"cmd": "ping"}
    <- {"ok": true, "version": "0.1.0"}
    -> {"cmd": "status"}
    <- {"ok": true, "version": "0.1.0", "devices": [<statistics()>, ...], <sections>}
    -> {"cmd": "reload"}
    <- {"ok": true, "config": FILE, "added": [ids], "removed": [ids], "unchanged": [ids],
        "needs_restart": [{"kind", "id", "reason"}], "refused": [...]}
    <- {"ok": false, "error": "config FILE: blk[1].size: ..."}
    -> {"cmd": "volume_qos", "device": "vol0", "iops": 2000, "throughput": "100M"}
    <- {"ok": true, "device": "vol0", "qos": {"iops": 2000, "throughput": 100000000,
        "burst_iops": 0, "burst_seconds": 0}}
    -> {"cmd": "fleet-rekey"}
    <- {"ok": true, "host": "a", "old_epoch": 1800000000, "epoch": 1800000001, "reason": "manual",
        "published": true}
    -> {"cmd": "nope"}
    <- {"ok": false, "error": "unknown command 'nope' (known: fleet-rekey, ping, reload, status, volume_qos)"}

A request line is at most :data:`MAX_LINE` bytes; a longer one gets an error
reply and the connection is closed. Replies are strict JSON: infinities in
``statistics()`` (the last latency bucket bound) are written as the strings
``"+Inf"``/``"-Inf"``/``"NaN"``, tuples as lists.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = [
    "COMMANDS",
    "MAX_LINE",
    "MAX_REPLY",
    "CommandRefused",
    "ControlError",
    "ReplyError",
    "RequestError",
    "encode_reply",
    "encode_request",
    "error_reply",
    "parse_reply",
    "parse_request",
]

#: Every command the protocol knows; commands.py implements exactly these.
COMMANDS = frozenset({"ping", "status", "reload", "volume_qos", "fleet-rekey"})

#: Longest accepted request line in bytes, newline excluded.
MAX_LINE = 64 * 1024

#: Longest reply a client accepts: a status with many devices is far bigger
#: than a request, but must still be bounded.
MAX_REPLY = 64 * 1024 * 1024


class ControlError(Exception):
    """The control socket cannot be used. Raised by the client when the
    daemon cannot be reached or does not answer with a JSON object (daemon
    not running, socket missing, permission denied, timeout), and by the
    server when the socket path is in use by a running daemon or is not a
    socket. The message names the socket path; print it and exit non-zero."""


class RequestError(ValueError):
    """A request line that is not a request (not UTF-8, too long, not JSON,
    not an object, no or an unknown ``cmd``): the peer's mistake. Its text is
    the error reply's ``error``; the server answers it and reads on."""


class ReplyError(ValueError):
    """A reply line that is not a JSON object (the daemon's mistake, or not
    a nitro at the other end). The client wraps it in a ControlError."""


class CommandRefused(Exception):
    """Raised by the daemon's side of a command (``DaemonView.reload``,
    ``DaemonView.set_qos``) when
    it refuses or fails without changing anything; the message becomes the
    ``error`` of the reply as is."""


# -- requests ------------------------------------------------------------------

def encode_request(request: dict) -> bytes:
    """One request object -> its line."""
    return json.dumps(request).encode() + b"\n"


def parse_request(line: bytes) -> tuple[str, dict]:
    """One request line (with or without its newline) -> (cmd, request).
    Raises :class:`RequestError`."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"request is not UTF-8: {exc}") from None
    if len(line.rstrip(b"\r\n")) > MAX_LINE:
        raise RequestError(f"request line longer than {MAX_LINE} bytes")
    try:
        request = json.loads(text)
    except ValueError as exc:
        raise RequestError(f"request is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise RequestError('request must be a JSON object like {"cmd": "status"}')
    cmd = request.get("cmd")
    if not isinstance(cmd, str):
        raise RequestError('request has no "cmd" string')
    if cmd not in COMMANDS:
        raise RequestError(f"unknown command {cmd!r} (known: {', '.join(sorted(COMMANDS))})")
    return cmd, request


# -- replies -------------------------------------------------------------------

def _json_safe(value: Any) -> Any:
    """statistics() -> strictly valid JSON (no Infinity/NaN tokens)."""
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


def encode_reply(reply: dict) -> bytes:
    """One reply object -> its line (strict JSON, newline-terminated)."""
    return json.dumps(_json_safe(reply), allow_nan=False, separators=(",", ":")).encode() + b"\n"


def error_reply(message: str) -> bytes:
    """The ``{"ok": false, "error": message}`` line."""
    return encode_reply({"ok": False, "error": message})


def parse_reply(line: bytes) -> dict:
    """One reply line -> the reply object (``ok`` may be false: the caller
    decides). Raises :class:`ReplyError`."""
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise ReplyError(str(exc)) from None
    if not isinstance(obj, dict):
        raise ReplyError("not a JSON object")
    return obj
