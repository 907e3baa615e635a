"""The control socket's trio transport: the daemon's side.

Listens on a unix socket (mode 0600), serves any number of clients
concurrently, splits what each sends into lines and answers every line with
:func:`~nitro.control.commands.handle_request_async`, in order. The wire
format is in :mod:`nitro.control.protocol`.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import socket
import stat

import trio

from nitro.control.commands import DaemonView, handle_request_async
from nitro.control.protocol import MAX_LINE, ControlError, error_reply

__all__ = ["serve_control"]

log = logging.getLogger("nitro.control")


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
                    await stream.send_all(error_reply(f"request line longer than {MAX_LINE} bytes"))
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
