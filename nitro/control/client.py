"""A blocking control client, for the CLI (``nitro status``, ``nitro
reload``): one request, one reply, no event loop."""

from __future__ import annotations

import os
import socket

from nitro.control.protocol import MAX_REPLY, ControlError, ReplyError, encode_request, parse_reply

__all__ = ["ControlError", "query"]


def query(path: str | os.PathLike, cmd: dict, timeout: float = 5) -> dict:
    """Send one request, return the reply object (``ok`` may be false: the
    caller decides). Raises :class:`ControlError` when the daemon cannot be
    reached or does not answer with a JSON object within ``timeout`` seconds."""
    path = os.fspath(path)
    request = encode_request(cmd)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ControlError(f"cannot reach nitro at {path}: {exc.strerror} (is the daemon running?)") from exc
        except OSError as exc:
            raise ControlError(f"cannot reach nitro at {path}: {exc.strerror or exc}") from exc
        try:
            sock.sendall(request)
            reply = _receive_line(sock, path)
        except TimeoutError as exc:
            raise ControlError(f"nitro at {path} did not answer within {timeout:g}s") from exc
        except OSError as exc:
            raise ControlError(f"lost connection to nitro at {path}: {exc.strerror or exc}") from exc
    finally:
        sock.close()
    try:
        return parse_reply(reply)
    except ReplyError as exc:
        raise ControlError(f"invalid reply from nitro at {path}: {exc}") from exc


def _receive_line(sock: socket.socket, path: str) -> bytes:
    reply = bytearray()
    while not reply.endswith(b"\n"):
        chunk = sock.recv(1 << 16)
        if not chunk:
            raise ControlError(f"nitro at {path} closed the connection without a complete reply")
        reply += chunk
        if len(reply) > MAX_REPLY:
            raise ControlError(f"reply from nitro at {path} exceeds {MAX_REPLY} bytes")
    return bytes(reply)
