"""Debian's etcd (/usr/bin/etcd) as a child process: one member, its data in
a directory of its own, client and peer URLs on free loopback ports. Used by
the fleet's tests (and anything that needs a throw-away etcd).

``stop()`` ends it by its PID (SIGTERM); ``start()`` again on the same data
directory and ports brings the same cluster back (leases keep their
remaining TTL, as after any etcd restart).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Self

from bench.proc import Child, ChildError, free_port, tail

ETCD = "/usr/bin/etcd"


class Etcd:
    def __init__(self, tmp: Path, *, name: str = "etcd") -> None:
        self.dir = tmp / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.client_port = free_port()
        self.peer_port = free_port()
        self.url = f"http://127.0.0.1:{self.client_port}"
        self.child: Child | None = None
        self.starts = 0

    def argv(self) -> list[str]:
        peer = f"http://127.0.0.1:{self.peer_port}"
        return [ETCD, "--name", self.name, "--data-dir", str(self.dir / "data"),
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"{self.name}={peer}", "--log-level", "warn"]

    def start(self, timeout: float = 20) -> Self:
        self.starts += 1
        self.child = Child(self.argv(), self.dir / f"etcd-{self.starts}.log")
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if not self.child.running():
                raise ChildError(f"etcd exited with {self.child.proc.returncode}:\n{tail(self.child.output())}")
            if time.monotonic() > deadline:
                self.child.kill()
                raise ChildError(f"etcd not healthy within {timeout:.0f} s:\n{tail(self.child.output())}")
            time.sleep(0.05)
        return self

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1) as r:
                return json.loads(r.read()).get("health") == "true"
        except (OSError, ValueError):
            return False

    @property
    def pid(self) -> int:
        assert self.child is not None, "not started"
        return self.child.proc.pid

    def stop(self) -> None:
        """SIGTERM to its PID, wait (SIGKILL after 10 s)."""
        if self.child is not None:
            self.child.stop(timeout=10)
            self.child = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def call(self, path: str, body: dict) -> dict:
        """One gateway request from the test's side (plain urllib, no nitro code)."""
        req = urllib.request.Request(f"{self.url}/v3/{path}", data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())
