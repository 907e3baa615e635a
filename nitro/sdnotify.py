"""systemd service notifications (sd_notify(3)) over ``$NOTIFY_SOCKET``.

The protocol: one AF_UNIX datagram per notification, newline-separated
``KEY=VALUE`` assignments, sent to the path in ``$NOTIFY_SOCKET`` (``@name``
means the abstract namespace). The unit uses ``Type=notify`` and
``NotifyAccess=main``, so only this process may send.

Sends are non-blocking and never raise: a daemon must not stall or die because
the service manager is slow or gone. The first failure is logged at WARNING,
later ones at DEBUG (a watchdog ping every 15 s must not flood the journal).

Watchdog (``WatchdogSec=`` in the unit): systemd sets ``$WATCHDOG_USEC`` (and
``$WATCHDOG_PID``); :func:`watchdog_loop` pings at half that period from a
trio task, so a wedged trio loop stops the pings and systemd kills and
restarts the service.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

import trio

__all__ = ["Notifier", "watchdog_loop"]

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify messages; every method is a no-op when
    ``$NOTIFY_SOCKET`` is unset (not started by systemd, or ``Type=simple``).

    ``environ`` defaults to :data:`os.environ` and is read once, here.
    Methods return True if the datagram was handed to the kernel.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._warned = False
        self._sock: socket.socket | None = None
        self._address: str = ""
        self._watchdog_usec = env.get("WATCHDOG_USEC")
        self._watchdog_pid = env.get("WATCHDOG_PID")
        self.socket_path = env.get("NOTIFY_SOCKET") or None
        if self.socket_path is None:
            return
        if self.socket_path.startswith("@"):
            # Abstract namespace: a leading NUL byte instead of '@'.
            self._address = "\0" + self.socket_path[1:]
        elif self.socket_path.startswith("/"):
            self._address = self.socket_path
        else:
            # vsock:CID:PORT (systemd >= 253) and relative paths are not supported.
            log.warning("unsupported NOTIFY_SOCKET %r; systemd notifications disabled", self.socket_path)
            return
        try:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        except OSError as exc:
            log.warning("cannot create sd_notify socket: %s; systemd notifications disabled", exc)

    @classmethod
    def from_environment(cls) -> Notifier:
        """``Notifier()`` reading :data:`os.environ` (spelled out for callers)."""
        return cls(os.environ)

    @property
    def enabled(self) -> bool:
        """True when notifications go somewhere."""
        return self._sock is not None

    def notify(self, message: str) -> bool:
        """Send raw ``KEY=VALUE`` lines; the building block of the methods below."""
        if self._sock is None:
            return False
        try:
            self._sock.sendto(message.encode("utf-8", "replace"), self._address)
        except OSError as exc:  # EAGAIN (queue full), ECONNREFUSED, ENOENT, EPERM ...
            if self._warned:
                log.debug("sd_notify %r to %s failed: %s", message, self.socket_path, exc)
            else:
                self._warned = True
                log.warning("sd_notify %r to %s failed: %s (further failures logged at debug)",
                            message, self.socket_path, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: startup finished, sockets are listening."""
        return self.notify("READY=1" + _status_line(status))

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: shutdown (drain) has begun."""
        return self.notify("STOPPING=1" + _status_line(status))

    def status(self, text: str) -> bool:
        """``STATUS=text``: one line shown by ``systemctl status``."""
        return self.notify(_status_line(text).lstrip("\n"))

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the keep-alive ping."""
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """``EXTEND_TIMEOUT_USEC``: ask for ``seconds`` more before the start/stop
        timeout fires (e.g. a long drain). Must be repeated within the period."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half of ``WatchdogSec=``), or None
        when the watchdog is off: no socket, ``$WATCHDOG_USEC`` unset, not a
        positive integer, or ``$WATCHDOG_PID`` set to another process."""
        if self._sock is None or not self._watchdog_usec:
            return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        if usec <= 0:
            return None
        if self._watchdog_pid:
            try:
                pid = int(self._watchdog_pid)
            except ValueError:
                return None
            if pid != os.getpid():
                return None
        return usec / 2 / 1_000_000

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Notifier socket={self.socket_path!r} enabled={self.enabled}>"


def _status_line(text: str | None) -> str:
    if text is None:
        return ""
    # One assignment per line in the protocol: a newline would start a new one.
    return "\nSTATUS=" + " ".join(str(text).splitlines())


async def watchdog_loop(notifier: Notifier) -> None:
    """Ping the watchdog forever at :meth:`Notifier.watchdog_interval`; returns
    at once when the watchdog is off. Run it in the daemon's nursery: it runs on
    the trio thread on purpose, so a blocked event loop misses the pings."""
    interval = notifier.watchdog_interval()
    if interval is None:
        return
    log.debug("systemd watchdog enabled, pinging every %.3fs", interval)
    while True:
        notifier.watchdog()
        await trio.sleep(interval)
