"""Child processes of the benches and the tests: the one place that knows how
to run nitro (and any other backend) as a child, wait for it, and stop it.

- ``nitro_argv``/``run_cli``: the nitro CLI of this checkout under the
  current interpreter (no install needed).
- ``Child``: a process whose output goes to a log file; ``wait_for`` a path
  it creates, ``stop`` with SIGTERM (SIGKILL after a timeout), its CPU time.
- ``Nitro``: ``nitro run`` on a config, its control socket, runtime and
  state in one directory; ready once the control socket exists (the daemon
  makes it after every device socket listens); ``metrics``/``status``.

The tests import this module (tests may import bench/, never the other way
round), as they do bench/testpmd.py.
"""

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
from typing import Self

REPO = Path(__file__).resolve().parent.parent


def nitro_argv(*args: str | Path) -> list[str]:
    """argv of the nitro CLI with `args`; run it with cwd=REPO."""
    return [sys.executable, "-m", "nitro", *map(str, args)]


def run_cli(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a one-shot nitro command; its output is captured as text."""
    return subprocess.run(nitro_argv(*args), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, check=False)


class ChildError(RuntimeError):
    """A child exited, or did not get ready, when it should have; the
    message ends with the tail of its log."""


def tail(text: str, lines: int = 15) -> str:
    """The last `lines` lines of a child's output, for an error message."""
    return "\n".join(text.strip().splitlines()[-lines:])


class Child:
    """A started child process, stdout and stderr in `log`."""

    def __init__(self, argv: Sequence[str], log: Path, *, env: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.log = log
        self._logf = open(log, "wb")  # noqa: SIM115 - lives as long as the process
        # A session of its own: a signal meant for the test runner's group
        # (a terminal's ^C) is not also delivered to the child.
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._logf,
                                     stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                     env={**os.environ, **(env or {})})

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def running(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        """Everything the child printed so far."""
        if not self._logf.closed:
            self._logf.flush()
        return self.log.read_text(errors="replace")

    def wait_for(self, path: Path, timeout: float) -> None:
        """Return once `path` exists; ChildError if the child exits first or
        `timeout` seconds pass (the child is left running: stop it)."""
        deadline = time.monotonic() + timeout
        while not path.exists():
            if self.proc.poll() is not None:
                raise ChildError(f"{self.argv[0]} exited with {self.proc.returncode} before "
                                 f"creating {path}:\n{tail(self.output())}")
            if time.monotonic() > deadline:
                raise ChildError(f"{self.argv[0]} did not create {path} within {timeout:.0f} s:\n"
                                 f"{tail(self.output())}")
            time.sleep(0.02)

    def cpu_seconds(self) -> float | None:
        """user+system CPU time of the process (all its threads), or None
        once it is gone."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                stat = f.read()
        except OSError:
            return None
        fields = stat[stat.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; SIGKILL if it has not exited after `timeout`
        seconds. Returns the exit status (negative: the signal)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._logf.close()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL if still running (a crash, or teardown), and close the log."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._logf.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Nitro(Child):
    """`nitro run` on `config` (TOML text) with runtime and state in `tmp`.

    The metrics endpoint listens on a free loopback port (``metrics=False``:
    off). `prefix` goes before the command (e.g. taskset). Returns once the
    control socket exists; ChildError (nothing left running) otherwise.
    """

    def __init__(self, tmp: Path, config: str, *, env: dict[str, str] | None = None,
                 prefix: Sequence[str] = (), metrics: bool = True, timeout: float = 20) -> None:
        self.tmp = tmp
        self.port = free_port() if metrics else None
        self._metrics_toml = f'[metrics]\nlisten = "{f"127.0.0.1:{self.port}" if metrics else ""}"\n'
        self.cfg = tmp / "nitro.toml"
        self.write_config(config)
        self.control = tmp / "control.sock"
        # A SIGKILLed predecessor leaves its control socket behind: waiting
        # for the path must wait for this daemon's.
        self.control.unlink(missing_ok=True)
        super().__init__([*prefix, *nitro_argv("run", "--config", self.cfg, "--runtime-dir", tmp,
                                               "--state-dir", tmp)],
                         tmp / "nitro.log", env=env)
        try:
            self.wait_for(self.control, timeout)
        except BaseException:
            self.kill()  # no child left running, no log left open
            raise

    def write_config(self, config: str) -> None:
        """Replace the config file's devices (the metrics section stays), as
        an operator does before a reload."""
        self.cfg.write_text(self._metrics_toml + config)

    def reload(self) -> subprocess.CompletedProcess[str]:
        """`nitro reload`: the daemon re-reads its config file."""
        return run_cli("reload", "--control", self.control, timeout=120)

    def metrics(self) -> str:
        assert self.port is not None, "started with metrics=False"
        return urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5).read().decode()

    def _status(self, *flags: str) -> str:
        r = run_cli("status", *flags, "--control", self.control, timeout=30)
        if r.returncode != 0:
            raise ChildError(f"nitro status exited {r.returncode}: {r.stderr.strip()}")
        return r.stdout

    def status(self) -> str:
        """`nitro status` as printed for humans."""
        return self._status()

    def status_json(self) -> str:
        """`nitro status --json`: the reply's JSON text."""
        return self._status("--json")

    def halt(self, sig: str) -> None:
        """End the daemon for a restart test: "KILL" (SIGKILL, a crash) or
        "TERM" (graceful, which must exit 0)."""
        if sig == "KILL":
            self.kill()
        else:
            assert self.stop() == 0, self.output()
