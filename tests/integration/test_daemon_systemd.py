"""`nitro run` under a systemd-like supervisor: sd_notify READY once the
sockets listen, WATCHDOG pings from the trio loop, STOPPING on SIGTERM.

PID 1 here is not systemd, so the test plays systemd's part: it binds the
$NOTIFY_SOCKET datagram socket and reads what the daemon sends.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import time
from pathlib import Path

import pytest

from bench.proc import Nitro

pytestmark = pytest.mark.integration


def _messages(sock: socket.socket, until: str, timeout: float) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while until not in got:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(4096).decode()
        except TimeoutError:
            raise AssertionError(f"no {until!r} within {timeout}s; got {got}") from None
        got += data.splitlines()
    return got


@contextlib.contextmanager
def supervised(tmp: Path, **env: str):
    """nitro started the way systemd would: $NOTIFY_SOCKET bound by us."""
    notify = tmp / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sup:
        sup.bind(str(notify))
        n = Nitro(tmp, '[[blk]]\nid = "v"\nsize = "1M"\n', env={"NOTIFY_SOCKET": str(notify), **env})
        try:
            yield sup, n
        finally:
            n.kill()


def test_ready_watchdog_stopping(short_tmp_path):
    with supervised(short_tmp_path, WATCHDOG_USEC="400000") as (sup, n):
        _messages(sup, "READY=1", 20)
        # READY only after every socket listens: a guest may attach now.
        assert (short_tmp_path / "v.sock").exists() and (short_tmp_path / "control.sock").exists()
        pings = _messages(sup, "WATCHDOG=1", 5)
        assert "WATCHDOG=1" in pings
        # Pings keep coming at about half the watchdog period.
        t0 = time.monotonic()
        _messages(sup, "WATCHDOG=1", 2)
        assert time.monotonic() - t0 < 1.0
        n.proc.send_signal(signal.SIGTERM)
        _messages(sup, "STOPPING=1", 20)
        assert n.proc.wait(30) == 0


def test_watchdog_pid_mismatch_sends_no_pings(short_tmp_path):
    # The watchdog is meant for another process (PID 1).
    with supervised(short_tmp_path, WATCHDOG_USEC="200000", WATCHDOG_PID="1") as (sup, n):
        _messages(sup, "READY=1", 20)
        sup.settimeout(1.0)
        with pytest.raises(TimeoutError):
            while True:
                assert "WATCHDOG=1" not in sup.recv(4096).decode()
        assert n.stop() == 0
