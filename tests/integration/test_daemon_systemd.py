"""`nitro run` under a systemd-like supervisor: sd_notify READY once the
sockets listen, WATCHDOG pings from the trio loop, STOPPING on SIGTERM.

PID 1 here is not systemd, so the test plays systemd's part: it binds the
$NOTIFY_SOCKET datagram socket and reads what the daemon sends.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


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


def test_ready_watchdog_stopping(short_tmp_path):
    notify = short_tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sup:
        sup.bind(str(notify))
        cfg = short_tmp_path / "n.toml"
        cfg.write_text('[metrics]\nlisten = ""\n[[blk]]\nid = "v"\nsize = "1M"\n')
        env = dict(os.environ, NOTIFY_SOCKET=str(notify), WATCHDOG_USEC="400000")
        proc = subprocess.Popen(
            [sys.executable, "-m", "nitro", "run", "--config", str(cfg),
             "--runtime-dir", str(short_tmp_path), "--state-dir", str(short_tmp_path)],
            cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
        try:
            _messages(sup, "READY=1", 20)
            # READY only after every socket listens: a guest may attach now.
            assert (short_tmp_path / "v.sock").exists() and (short_tmp_path / "control.sock").exists()
            pings = _messages(sup, "WATCHDOG=1", 5)
            assert "WATCHDOG=1" in pings
            # Pings keep coming at about half the watchdog period.
            t0 = time.monotonic()
            _messages(sup, "WATCHDOG=1", 2)
            assert time.monotonic() - t0 < 1.0
            proc.send_signal(signal.SIGTERM)
            _messages(sup, "STOPPING=1", 20)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stderr.close()


def test_watchdog_pid_mismatch_sends_no_pings(short_tmp_path):
    notify = short_tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sup:
        sup.bind(str(notify))
        cfg = short_tmp_path / "n.toml"
        cfg.write_text('[metrics]\nlisten = ""\n[[blk]]\nid = "v"\nsize = "1M"\n')
        env = dict(os.environ, NOTIFY_SOCKET=str(notify), WATCHDOG_USEC="200000",
                   WATCHDOG_PID="1")  # the watchdog is meant for another process
        proc = subprocess.Popen(
            [sys.executable, "-m", "nitro", "run", "--config", str(cfg),
             "--runtime-dir", str(short_tmp_path), "--state-dir", str(short_tmp_path)],
            cwd=REPO, env=env, stderr=subprocess.DEVNULL)
        try:
            _messages(sup, "READY=1", 20)
            sup.settimeout(1.0)
            with pytest.raises(TimeoutError):
                while True:
                    assert "WATCHDOG=1" not in sup.recv(4096).decode()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
