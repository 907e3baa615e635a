"""What each control command does with the daemon; sans-IO, a request line
in and a reply line out.

:func:`handle_request` answers the commands that only read the daemon
(``ping``, ``status``). ``reload``, ``volume_qos`` and ``fleet-rekey`` change
the daemon and await it, so they are answered by :func:`handle_request_async`,
which the trio server calls for every line. Neither raises: every failure is an ``{"ok": false, "error": ...}``
reply.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from nitro.config import QOS_KEYS
from nitro.control.protocol import (
    COMMANDS,
    CommandRefused,
    RequestError,
    encode_reply,
    error_reply,
    parse_request,
)

__all__ = ["DaemonView", "handle_request", "handle_request_async"]

log = logging.getLogger("nitro.control")


class DaemonView(Protocol):
    """What the control socket needs from the daemon."""

    devices: Sequence[Any]  # objects with statistics() -> dict
    version: str

    async def reload(self) -> dict:
        """Re-read the config file and apply it; the reply body. Raises
        :class:`~nitro.control.protocol.CommandRefused` when nothing was
        changed."""
        ...

    async def set_qos(self, device_id: str, values: dict) -> dict:
        """Change some QoS limits of a running volume (``values``: some of
        config.QOS_KEYS); the reply body. Raises CommandRefused when
        nothing was changed."""
        ...

    async def fleet_rekey(self) -> dict:
        """Move this host to its next fleet key epoch; the reply body.
        Raises CommandRefused when it did not (no [fleet], encryption
        off, the current epoch not in etcd yet)."""
        ...

    def status_sections(self) -> Mapping[str, Callable[[], Any]]:
        """Top-level parts of a status reply beyond ``devices`` (the daemon:
        ``"vpcs"`` when it has a network fabric), each produced by calling
        its function; one that raises becomes ``{"error": ...}``."""
        ...


def _cmd_ping(view: DaemonView, request: dict) -> dict:
    return {"ok": True, "version": view.version}


def _cmd_status(view: DaemonView, request: dict) -> dict:
    devices = []
    for index, device in enumerate(list(view.devices)):
        try:
            stats = device.statistics()
            if not isinstance(stats, dict):
                raise TypeError(f"statistics() returned {type(stats).__name__}, not dict")
            devices.append(stats)
        except Exception as exc:
            name = str(getattr(device, "id", None) or f"#{index}")
            log.warning("control: statistics() of device %s failed", name, exc_info=True,
                        extra={"fields": {"device": name}})
            # One bad device must not hide the others from `nitro status`.
            devices.append({"id": name, "error": f"statistics() failed: {type(exc).__name__}: {exc}"})
    reply: dict[str, Any] = {"ok": True, "version": view.version, "devices": devices}
    for name, produce in view.status_sections().items():
        if name in reply:
            continue  # never let a section replace the core fields
        try:
            reply[name] = produce()
        except Exception as exc:
            log.warning("control: status section %s failed", name, exc_info=True,
                        extra={"fields": {"section": name}})
            reply[name] = {"error": f"statistics() failed: {type(exc).__name__}: {exc}"}
    return reply


async def _refusable(change: Awaitable[dict]) -> dict:
    """A command that changes the daemon: its body, or its refusal as a plain error reply."""
    try:
        return {"ok": True, **await change}
    except CommandRefused as exc:
        return {"ok": False, "error": str(exc)}


async def _cmd_volume_qos(view: DaemonView, request: dict) -> dict:
    device = request.get("device")
    if not isinstance(device, str):
        return {"ok": False, "error": 'volume_qos needs a "device" string'}
    unknown = sorted(set(request) - {"cmd", "device", *QOS_KEYS})
    if unknown:
        return {"ok": False, "error": f"volume_qos: unknown keys {unknown} (allowed: {', '.join(QOS_KEYS)})"}
    return await _refusable(view.set_qos(device, {k: request[k] for k in QOS_KEYS if k in request}))


async def _cmd_reload(view: DaemonView, request: dict) -> dict:
    return await _refusable(view.reload())


async def _cmd_fleet_rekey(view: DaemonView, request: dict) -> dict:
    return await _refusable(view.fleet_rekey())


_COMMANDS: dict[str, Callable[[DaemonView, dict], dict]] = {
    "ping": _cmd_ping,
    "status": _cmd_status,
}
# Commands that await the daemon: answered by handle_request_async only.
_ASYNC_COMMANDS: dict[str, Callable[[DaemonView, dict], Awaitable[dict]]] = {
    "reload": _cmd_reload,
    "volume_qos": _cmd_volume_qos,
    "fleet-rekey": _cmd_fleet_rekey,
}
# Every command of the protocol has exactly one implementation (checked at
# import, not with assert: that would vanish under python -O).
if _COMMANDS.keys() | _ASYNC_COMMANDS.keys() != COMMANDS or _COMMANDS.keys() & _ASYNC_COMMANDS.keys():
    raise AssertionError(f"control commands implemented {sorted([*_COMMANDS, *_ASYNC_COMMANDS])} "
                         f"are not the protocol's {sorted(COMMANDS)}")


def handle_request(line: bytes, daemon_view: DaemonView) -> bytes:
    """One request line (with or without its newline) -> one reply line
    (newline-terminated). Commands that await the daemon (``reload``) are
    answered only by :func:`handle_request_async`."""
    try:
        cmd, request = parse_request(line)
    except RequestError as exc:
        return error_reply(str(exc))
    return _answer(daemon_view, request, cmd)


async def handle_request_async(line: bytes, daemon_view: DaemonView) -> bytes:
    """:func:`handle_request`, plus the commands that await the daemon."""
    try:
        cmd, request = parse_request(line)
    except RequestError as exc:
        return error_reply(str(exc))
    handler = _ASYNC_COMMANDS.get(cmd)
    if handler is None:
        return _answer(daemon_view, request, cmd)
    try:
        return encode_reply(await handler(daemon_view, request))
    except Exception as exc:
        return _failed(cmd, exc)


def _answer(view: DaemonView, request: dict, cmd: str) -> bytes:
    """Run a parsed synchronous command."""
    handler = _COMMANDS.get(cmd)
    if handler is None:
        return error_reply(f"command {cmd!r} needs the daemon's event loop (handle_request_async)")
    try:
        return encode_reply(handler(view, request))
    except Exception as exc:
        return _failed(cmd, exc)


def _failed(cmd: str, exc: Exception) -> bytes:
    log.exception("control: command %s failed", cmd)
    return error_reply(f"command {cmd!r} failed: {type(exc).__name__}: {exc}")
