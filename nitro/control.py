"""The local control socket and the ``nitro status`` client.

Protocol: JSON lines over a unix stream socket (``$RUNTIME_DIRECTORY/
control.sock``, mode 0600). The client writes one JSON object per line, the
daemon answers each with one JSON object per line, in order::

    -> {"cmd": "ping"}
    <- {"ok": true, "version": "0.1.0"}
    -> {"cmd": "status"}
    <- {"ok": true, "version": "0.1.0", "devices": [<statistics()>, ...], <sections>}
    -> {"cmd": "reload"}
    <- {"ok": true, "config": FILE, "added": [ids], "removed": [ids], "unchanged": [ids],
        "needs_restart": [{"kind", "id", "reason"}], "refused": [...]}
    <- {"ok": false, "error": "config FILE: blk[1].size: ..."}
    -> {"cmd": "nope"}
    <- {"ok": false, "error": "unknown command 'nope' (known: ping, reload, status)"}

A request line is at most :data:`MAX_LINE` bytes; a longer one gets an error
reply and the connection is closed. Replies are strict JSON: infinities in
``statistics()`` (the last latency bucket bound) are written as the strings
``"+Inf"``/``"-Inf"``/``"NaN"``, tuples as lists.

Layers: :func:`handle_request` is the sans-IO core (bytes in, bytes out);
``reload`` changes the daemon and awaits it, so the transport answers it
(:func:`handle_request_async`); :func:`serve_control` is the trio transport; :func:`query` is a blocking
client for the CLI; :func:`format_status` renders a status reply for humans.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import math
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import trio

from nitro.devices import base as _base
from nitro.devices.blk import config as _blk
from nitro.devices.net import config as _net
from nitro.vhost.protocol import VHOST_USER_F_PROTOCOL_FEATURES, ProtocolFeature

__all__ = [
    "MAX_LINE",
    "ControlError",
    "CommandRefused",
    "DaemonView",
    "handle_request",
    "handle_request_async",
    "serve_control",
    "query",
    "format_status",
    "decode_features",
]

log = logging.getLogger(__name__)

#: Longest accepted request line in bytes, newline excluded.
MAX_LINE = 64 * 1024

# Longest reply the client accepts (a status with many devices is far bigger
# than a request, but must still be bounded).
_MAX_REPLY = 64 * 1024 * 1024


class ControlError(Exception):
    """Raised by :func:`query` when the daemon cannot be reached or answers
    with something that is not a JSON object (daemon not running, socket
    missing, permission denied, timeout). The message names the socket path;
    print it and exit non-zero. Also raised by :func:`serve_control` when the
    socket path is in use by a running daemon or is not a socket."""


class CommandRefused(Exception):
    """Raised by the daemon's side of a command (``DaemonView.reload``) when
    it refuses or fails without changing anything; the message becomes the
    ``error`` of the reply as is."""


class DaemonView(Protocol):
    """What the control socket needs from the daemon."""

    devices: Sequence[Any]  # objects with statistics() -> dict
    version: str

    async def reload(self) -> dict:
        """Re-read the config file and apply it; the reply body. Raises
        :class:`CommandRefused` when nothing was changed."""
        ...

    def status_sections(self) -> Mapping[str, Callable[[], Any]]:
        """Top-level parts of a status reply beyond ``devices`` (the daemon:
        ``"vpcs"`` when it has a network fabric), each produced by calling
        its function; one that raises becomes ``{"error": ...}``."""
        ...


# --------------------------------------------------------------------------
# sans-IO core


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


def _encode(reply: dict) -> bytes:
    return json.dumps(_json_safe(reply), allow_nan=False, separators=(",", ":")).encode() + b"\n"


def _error(message: str) -> bytes:
    return _encode({"ok": False, "error": message})


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


async def _cmd_reload(view: DaemonView, request: dict) -> dict:
    try:
        return {"ok": True, **await view.reload()}
    except CommandRefused as exc:
        return {"ok": False, "error": str(exc)}


_COMMANDS: dict[str, Callable[[DaemonView, dict], dict]] = {
    "ping": _cmd_ping,
    "status": _cmd_status,
}
# Commands that await the daemon: answered by handle_request_async only.
_ASYNC_COMMANDS: dict[str, Callable[[DaemonView, dict], Awaitable[dict]]] = {
    "reload": _cmd_reload,
}


def _parse(line: bytes) -> tuple[dict, str] | bytes:
    """A request line -> (request, cmd), or the error reply."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _error(f"request is not UTF-8: {exc}")
    if len(line.rstrip(b"\r\n")) > MAX_LINE:
        return _error(f"request line longer than {MAX_LINE} bytes")
    try:
        request = json.loads(text)
    except ValueError as exc:
        return _error(f"request is not valid JSON: {exc}")
    if not isinstance(request, dict):
        return _error('request must be a JSON object like {"cmd": "status"}')
    cmd = request.get("cmd")
    if not isinstance(cmd, str):
        return _error('request has no "cmd" string')
    if cmd not in _COMMANDS and cmd not in _ASYNC_COMMANDS:
        return _error(f"unknown command {cmd!r} (known: {', '.join(sorted([*_COMMANDS, *_ASYNC_COMMANDS]))})")
    return request, cmd


def handle_request(line: bytes, daemon_view: DaemonView) -> bytes:
    """One request line (with or without its newline) -> one reply line
    (newline-terminated). Never raises: every failure is an
    ``{"ok": false, "error": ...}`` reply. Commands that await the daemon
    (``reload``) are answered only by :func:`handle_request_async`."""
    parsed = _parse(line)
    if isinstance(parsed, bytes):
        return parsed
    return _answer(daemon_view, *parsed)


def _answer(view: DaemonView, request: dict, cmd: str) -> bytes:
    """Run a parsed synchronous command."""
    handler = _COMMANDS.get(cmd)
    if handler is None:
        return _error(f"command {cmd!r} needs the daemon's event loop (handle_request_async)")
    try:
        return _encode(handler(view, request))
    except Exception as exc:
        return _failed(cmd, exc)


def _failed(cmd: str, exc: Exception) -> bytes:
    log.exception("control: command %s failed", cmd)
    return _error(f"command {cmd!r} failed: {type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------
# trio transport


def _probe_stale(path: str) -> None:
    """Make sure ``path`` is free to take: absent, or a socket nobody listens
    on (left by a crashed nitro; RuntimeDirectoryPreserve keeps it). A live
    socket or a non-socket file raises ControlError; we never delete those."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"control socket path {path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return  # stale
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ControlError(f"cannot check control socket {path}: {exc}") from exc
        return
    finally:
        probe.close()
    raise ControlError(f"control socket {path} is in use: is another nitro running?")


async def _bind(path: str) -> trio.socket.SocketType:
    _probe_stale(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Bind under a temporary name, chmod, then rename over `path`: the
        # socket is never reachable with the umask's mode, and a stale socket
        # is replaced atomically.
        tmp = os.path.join(os.path.dirname(path) or ".", f".ctl-{os.getpid()}")
        if len(os.fsencode(tmp)) < 108:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            await sock.bind(tmp)
            try:
                os.chmod(tmp, 0o600)
                os.rename(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
        else:  # the temp name does not fit in sun_path; accept a short window
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            await sock.bind(path)
            os.chmod(path, 0o600)
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise ControlError(f"cannot listen on control socket {path}: {exc}") from exc
    except BaseException:
        sock.close()
        raise
    return sock


async def handle_request_async(line: bytes, daemon_view: DaemonView) -> bytes:
    """:func:`handle_request`, plus the commands that await the daemon."""
    parsed = _parse(line)
    if isinstance(parsed, bytes):
        return parsed
    request, cmd = parsed
    handler = _ASYNC_COMMANDS.get(cmd)
    if handler is None:
        return _answer(daemon_view, request, cmd)
    try:
        return _encode(await handler(daemon_view, request))
    except Exception as exc:
        return _failed(cmd, exc)


async def _serve_client(stream: trio.SocketStream, view: DaemonView) -> None:
    buffer = bytearray()
    try:
        async with stream:
            while True:
                data = await stream.receive_some(MAX_LINE + 1)
                if not data:
                    return
                buffer += data
                while (end := buffer.find(b"\n")) >= 0:
                    line = bytes(buffer[:end])
                    del buffer[: end + 1]
                    if line.strip():
                        await stream.send_all(await handle_request_async(line, view))
                if len(buffer) > MAX_LINE:
                    await stream.send_all(_error(f"request line longer than {MAX_LINE} bytes"))
                    await _drain_and_close(stream)
                    return
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away


async def _drain_and_close(stream: trio.SocketStream) -> None:
    """Send EOF, then discard what the client is still sending (briefly):
    closing with unread data would make the kernel reset the connection and
    the client would lose the error reply."""
    await stream.send_eof()
    with trio.move_on_after(1.0):
        while await stream.receive_some(MAX_LINE):
            pass


async def serve_control(
    path: str | os.PathLike, daemon_view: DaemonView, *, task_status=trio.TASK_STATUS_IGNORED
) -> None:
    """Serve the control protocol on a unix socket at ``path`` until cancelled.

    Replaces a stale socket (nobody listening), refuses a live one or a
    non-socket file (:class:`ControlError`), makes the socket 0600, and
    serves any number of clients concurrently. ``task_status.started(path)``
    once it accepts connections. On exit the socket file is removed.
    """
    path = os.fspath(path)
    sock = await _bind(path)
    st = os.stat(path)
    listener = trio.SocketListener(sock)
    try:
        async with trio.open_nursery() as nursery:
            handler = functools.partial(_serve_client, view=daemon_view)
            await nursery.start(functools.partial(trio.serve_listeners, handler, [listener], handler_nursery=nursery))
            log.info("control socket listening", extra={"fields": {"path": path}})
            task_status.started(path)
    finally:
        # Synchronous on purpose: we may be running cancelled here, and an
        # await would raise Cancelled before the socket file is removed.
        sock.close()
        try:
            now = os.lstat(path)
            if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):  # still ours, not a successor's
                os.unlink(path)
        except OSError:
            pass


# --------------------------------------------------------------------------
# blocking client


def query(path: str | os.PathLike, cmd: dict, timeout: float = 5) -> dict:
    """Send one request, return the reply object (``ok`` may be false: the
    caller decides). Raises :class:`ControlError` when the daemon cannot be
    reached or does not answer with a JSON object within ``timeout`` seconds."""
    path = os.fspath(path)
    request = json.dumps(cmd).encode() + b"\n"
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
            reply = bytearray()
            while not reply.endswith(b"\n"):
                chunk = sock.recv(1 << 16)
                if not chunk:
                    raise ControlError(f"nitro at {path} closed the connection without a complete reply")
                reply += chunk
                if len(reply) > _MAX_REPLY:
                    raise ControlError(f"reply from nitro at {path} exceeds {_MAX_REPLY} bytes")
        except TimeoutError as exc:
            raise ControlError(f"nitro at {path} did not answer within {timeout:g}s") from exc
        except OSError as exc:
            raise ControlError(f"lost connection to nitro at {path}: {exc.strerror or exc}") from exc
    finally:
        sock.close()
    try:
        obj = json.loads(reply)
    except ValueError as exc:
        raise ControlError(f"invalid reply from nitro at {path}: {exc}") from exc
    if not isinstance(obj, dict):
        raise ControlError(f"invalid reply from nitro at {path}: not a JSON object")
    return obj


# --------------------------------------------------------------------------
# human output

def _bit_names(module: Any, prefix: str, rename: Callable[[str], str] = lambda name: name) -> dict[int, str]:
    """{bit: name} from a module's ``<prefix><NAME> = bit`` constants."""
    return {value: rename(name[len(prefix):]) for name, value in vars(module).items()
            if name.startswith(prefix) and isinstance(value, int)}


# Spec names of bits nitro never offers and whose module does not define
# them (yet): shown by name when a frontend acks or a status carries them.
_UNUSED_COMMON = {  # virtio 1.2 section 6 "Reserved Feature Bits"
    24: "NOTIFY_ON_EMPTY", 27: "ANY_LAYOUT", 33: "ACCESS_PLATFORM", 34: "RING_PACKED", 35: "IN_ORDER",
    36: "ORDER_PLATFORM", 37: "SR_IOV", 38: "NOTIFICATION_DATA", 39: "NOTIF_CONFIG_DATA", 40: "RING_RESET",
}
_UNUSED_BLK = {4: "GEOMETRY", 11: "CONFIG_WCE", 15: "LIFETIME", 16: "SECURE_ERASE"}  # virtio 1.2 5.2.3

# Transport/ring bits (VIRTIO_F_*, VIRTIO_RING_F_* as RING_*) and the
# vhost-user bit 30 (VHOST_USER_F_PROTOCOL_FEATURES).
_COMMON_FEATURES = {
    **_UNUSED_COMMON,
    **_bit_names(_base, "VIRTIO_F_"),
    **_bit_names(_base, "VIRTIO_RING_F_", lambda name: "RING_" + name),
    VHOST_USER_F_PROTOCOL_FEATURES: "PROTOCOL_FEATURES",
}
_DEVICE_FEATURES = {
    "blk": {**_UNUSED_BLK, **_bit_names(_blk, "VIRTIO_BLK_F_")},
    "net": _bit_names(_net, "VIRTIO_NET_F_"),
}


def _protocol_feature_name(bit: int) -> str | None:
    """vhost-user.rst "Protocol features", minus VHOST_USER_PROTOCOL_F_."""
    return ProtocolFeature(1 << bit).name


def decode_features(bits: int, kind: str | None = None) -> list[str]:
    """Names of the set virtio feature bits, lowest bit first; device-specific
    names for ``kind`` ("blk", "net"), ``bitN`` for bits without a name."""
    table = {**_DEVICE_FEATURES.get(kind or "", {}), **_COMMON_FEATURES}
    return _decode(bits, table.get)


def _decode(bits: int, name_of: Callable[[int], str | None]) -> list[str]:
    names = []
    bit = 0
    while bits >> bit:
        if (bits >> bit) & 1:
            names.append(name_of(bit) or f"bit{bit}")
        bit += 1
    return names


def _yn(value: Any) -> str:
    return "yes" if value else "no"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "    ") -> list[str]:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        first, *rest = r
        lines.append(indent + "  ".join([first.ljust(widths[0])] + [c.rjust(w) for c, w in zip(rest, widths[1:])]))
    return lines


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _format_device(d: dict) -> list[str]:
    if "error" in d:
        return [f"{d.get('id', '?')}: {d['error']}"]
    kind = d.get("kind", "?")
    lines = [f"{d.get('id', '?')}  ({kind})  {d.get('socket', '')}"]
    if d.get("broken"):
        state = f"BROKEN ({d['broken']})"
    else:
        state = "connected" if d.get("connected") else "waiting for frontend"
    lines.append(f"  state:       {state}; connections {d.get('connections', 0)}, "
                 f"protocol errors {d.get('protocol_errors', 0)}")
    features = int(d.get("features", 0) or 0)
    lines.append(f"  features:    {features:#x} {' '.join(decode_features(features, kind))}".rstrip())
    pfeatures = int(d.get("protocol_features", 0) or 0)
    lines.append(f"  protocol:    {pfeatures:#x} {' '.join(_decode(pfeatures, _protocol_feature_name))}".rstrip())
    if "capacity_bytes" in d:
        mode = "read-only" if d.get("readonly") else "read-write"
        lines.append(f"  capacity:    {d['capacity_bytes']} bytes ({_human_bytes(d['capacity_bytes'])}), {mode}")
    if "inflight" in d:
        resubmitted = d.get("resubmitted")
        extra = f" (resubmitted after restarts: {resubmitted})" if resubmitted else ""
        lines.append(f"  inflight:    {d['inflight']}{extra}")
    buckets = d.get("latency_buckets") or []
    count = sum(n for _, n in buckets)
    if count:
        mean_us = float(d.get("latency_sum_seconds", 0.0)) / count * 1e6
        lines.append(f"  latency:     mean {mean_us:.1f} us over {count} requests")
    queues = d.get("queues") or []
    if queues:
        lines.append("  queues:")
        rows = []
        for q in queues:
            faults = q.get("faults") or {}
            nonzero = ",".join(f"{k}={v}" for k, v in faults.items() if v) or "0"
            rows.append([q.get("index", "?"), _yn(q.get("enabled")), _yn(q.get("running")),
                         q.get("kicks", 0), q.get("calls", 0), q.get("chains", 0), nonzero])
        lines += _table(["queue", "enabled", "running", "kicks", "calls", "chains", "faults"], rows)
    net = d.get("net")
    if isinstance(net, dict):
        lines += _format_net(d, net)
    ops = d.get("ops") or {}
    if ops:
        lines.append("  ops:")
        rows = [[op, c.get("requests", 0), c.get("bytes", 0), c.get("errors", 0)] for op, c in ops.items()]
        lines += _table(["op", "requests", "bytes", "errors"], rows)
    return lines


def _format_net(d: dict, net: dict) -> list[str]:
    lines = [f"  interface:   mac {d.get('mac', '?')}  ip {d.get('ip', '?')}  vpc {d.get('vpc', '?')}"]
    lease = d.get("lease")
    if lease:
        lines.append(f"  lease:       {lease.get('state')} (expires in {lease.get('expires_in')} s)")
    lines += _table(["direction", "packets", "bytes"],
                    [["in", net.get("packets_in", 0), net.get("bytes_in", 0)],
                     ["out", net.get("packets_out", 0), net.get("bytes_out", 0)]])
    drops = net.get("drops") or {}
    lines.append("  drops:       " + (" ".join(f"{k}={v}" for k, v in drops.items()) or "0"))
    lines.append(f"  allowance:   bw_in_allowance_exceeded={net.get('bw_in_allowance_exceeded', 0)} "
                 f"bw_out_allowance_exceeded={net.get('bw_out_allowance_exceeded', 0)} "
                 f"pps_allowance_exceeded={net.get('pps_allowance_exceeded', 0)}")
    return lines


def _format_vpcs(vpcs: dict) -> list[str]:
    lines = []
    for vpc_id, v in vpcs.items():
        if not isinstance(v, dict) or "counters" not in v:
            lines.append(f"vpc {vpc_id}: {v}")
            continue
        counters = {**v["counters"], "punt_errors": v.get("punt_errors", 0)}
        c = " ".join(f"{k}={n}" for k, n in counters.items() if n)
        lines.append(f"vpc {vpc_id}: {c or 'no control traffic yet'}")
        up = v.get("uplink")
        if up:
            state = up.get("state", "up")
            if up.get("error"):
                state = f"{state.upper()} ({up['error']})"
            lines.append(f"  uplink {up.get('name')}: {state}; in {up.get('packets_in', 0)} pkts "
                         f"{up.get('bytes_in', 0)} B, out {up.get('packets_out', 0)} pkts "
                         f"{up.get('bytes_out', 0)} B")
    return lines


def format_status(reply: dict) -> str:
    """A ``status`` reply -> the human-readable text of ``nitro status``:
    one block per device (id, kind, socket, state, features as hex and by
    name, capacity, per-queue counters, per-op counters)."""
    if not reply.get("ok"):
        return f"error: {reply.get('error', 'unknown error')}"
    devices = reply.get("devices") or []
    lines = [f"nitro {reply.get('version', '?')}: {len(devices)} device{'s' if len(devices) != 1 else ''}"]
    for d in devices:
        lines.append("")
        try:
            lines += _format_device(d)
        except Exception as exc:  # a field of an unexpected type: show the rest
            lines.append(f"{d.get('id', '?') if isinstance(d, dict) else '?'}: cannot display: {exc}")
    vpcs = reply.get("vpcs")
    if isinstance(vpcs, dict) and vpcs:
        lines.append("")
        try:
            lines += _format_vpcs(vpcs)
        except Exception as exc:
            lines.append(f"vpcs: cannot display: {exc}")
    return "\n".join(lines)
