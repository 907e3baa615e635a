"""Run the real daemon as a subprocess for integration and system tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nitro:
    def __init__(self, tmp: Path, config: str, env: dict[str, str] | None = None,
                 wrapper: Sequence[str] = ()) -> None:
        """`wrapper` prefixes the command line (e.g. strace); then self.proc
        is the wrapper, not the daemon."""
        self.tmp = tmp
        self.port = free_port()
        self.cfg = tmp / "nitro.toml"
        self.cfg.write_text(f'[metrics]\nlisten = "127.0.0.1:{self.port}"\n' + config)
        self.log = open(tmp / "nitro.log", "w+")
        # A SIGKILLed predecessor leaves its control socket behind: waiting
        # for the path must wait for this daemon's.
        (tmp / "control.sock").unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [*wrapper, sys.executable, "-m", "nitro", "run", "--config", str(self.cfg),
             "--runtime-dir", str(tmp), "--state-dir", str(tmp)],
            cwd=REPO, stderr=self.log, env={**os.environ, **(env or {})})
        try:
            deadline = time.monotonic() + 20
            while not (tmp / "control.sock").exists():
                assert self.proc.poll() is None, self.stderr()
                assert time.monotonic() < deadline, "nitro did not start: " + self.stderr()
                time.sleep(0.05)
        except BaseException:
            self.kill()  # no child left running, no log left open
            raise

    def stderr(self) -> str:
        self.log.flush()
        return (self.tmp / "nitro.log").read_text()

    def metrics(self) -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5).read().decode()

    def _status(self, *flags: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "nitro", "status", *flags, "--control", str(self.tmp / "control.sock")],
            cwd=REPO, capture_output=True, text=True, check=True).stdout

    def status(self) -> str:
        """`nitro status` as printed for humans."""
        return self._status()

    def status_json(self) -> str:
        """`nitro status --json`: the reply's JSON text."""
        return self._status("--json")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def halt(self, sig: str) -> None:
        """End the daemon for a restart test: "KILL" (SIGKILL, a crash) or
        "TERM" (graceful, which must exit 0)."""
        if sig == "KILL":
            self.proc.kill()
            self.proc.wait()
        else:
            assert self.stop() == 0, self.stderr()
        self.log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

