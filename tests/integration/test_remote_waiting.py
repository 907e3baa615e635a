"""A remote volume whose server is down when the daemon starts: the daemon
serves its other devices, the remote one waits without a socket and is
retried in the background, and it serves once the server comes up. A
storage outage at boot must not take every tenant's disks and NICs down.
Real nbdkit, real daemon, vublk as the front-end."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
import time

import pytest

from bench.nbd import NbdKit
from bench.proc import ChildError, free_port
from tests.integration.test_nbd_volume import verify
from tests.integration.test_qos import metric

pytestmark = pytest.mark.integration

MiB = 1 << 20


def config(port: int, *, remote: bool = True) -> str:
    text = '[[blk]]\nid = "local"\nsize = "16M"\n'
    if remote:
        text += f'[[blk]]\nid = "r0"\nsource = "nbd://127.0.0.1:{port}/"\n'
    return text


def wait_until(what: str, predicate, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.2)


def test_a_remote_volume_waits_for_its_server_and_others_serve(nitro, vublk, short_tmp_path):
    port = free_port()
    n = nitro(config(port))
    remote_sock = short_tmp_path / "r0.sock"
    # The local device serves at once; the remote one has no socket yet.
    verify(vublk, short_tmp_path / "local.sock", "--size", "4m")
    assert not remote_sock.exists()
    status = n.status()
    assert "r0  blk  WAITING for its remote source" in status, status
    assert "Connection refused" in status
    assert 'nitro_blk_source_waiting{device="r0"} 1.0' in n.metrics()

    with NbdKit(short_tmp_path, ["memory", "32M"], port=port):
        # Retries back off from 1 s; the fourth comes about 15 s after start.
        wait_until("r0 listens", remote_sock.exists, timeout=45)
        res = verify(vublk, remote_sock, "--size", "8m", "--bs", "16k")
        assert res["capacity_bytes"] == 32 * MiB
        assert "WAITING" not in n.status()
        assert 'nitro_blk_source_waiting{device="r0"}' not in n.metrics()
    assert n.stop() == 0


def test_a_reload_removes_a_waiting_device(nitro, vublk, short_tmp_path):
    port = free_port()
    n = nitro(config(port))
    assert "r0  blk  WAITING" in n.status()
    n.write_config(config(port, remote=False))
    assert n.reload().returncode == 0
    assert "WAITING" not in n.status()
    with NbdKit(short_tmp_path, ["memory", "32M"], port=port):
        time.sleep(4)  # past the next retries the removed device would have made
        assert not (short_tmp_path / "r0.sock").exists()
    verify(vublk, short_tmp_path / "local.sock", "--size", "1m")
    # Put back while the server is still down: it waits again, as at start-up.
    n.write_config(config(port))
    assert n.reload().returncode == 0
    assert "r0  blk  WAITING" in n.status()
    assert n.stop() == 0  # nothing to drain for it; a clean stop


def test_a_server_that_refuses_us_still_stops_startup(nitro, short_tmp_path):
    """Unreachable is retried; a server that answers but cannot serve the
    volume as configured is a configuration to fix, and fails start-up."""
    with NbdKit(short_tmp_path, ["memory", "1000"]) as server:  # not whole sectors
        with pytest.raises(ChildError) as e:
            nitro(f'[[blk]]\nid = "r0"\nsource = "{server.url()}"\n')
        assert "not a positive multiple of 512" in str(e.value)


class SilentServer:
    """A TCP port whose connections the kernel accepts and nothing ever
    answers: an NBD server that hangs (stopped, or its host gone without a
    reset) as a client sees it."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)

    def close(self) -> None:
        self.sock.close()


def test_a_server_that_never_answers_neither_holds_the_start_nor_the_stop(nitro, vublk,
                                                                          short_tmp_path):
    """At start-up the handshake gives up after io_timeout and the device
    waits (before, the start waited for ever, past systemd's start
    timeout); a retry in the background that waits on the silent server
    (io_timeout 300 s here) does not hold a stop either."""
    port = free_port()
    silent = SilentServer(port)
    try:
        t0 = time.monotonic()
        n = nitro(config(port) + "io_timeout = 2\n")  # returns once the daemon is READY
        assert time.monotonic() - t0 < 15
        verify(vublk, short_tmp_path / "local.sock", "--size", "1m")
        assert "no answer within 2 s; hung up" in n.status(), n.status()
        assert n.stop() == 0, n.output()
    finally:
        silent.close()

    port = free_port()
    n = nitro(config(port) + "io_timeout = 300\n")  # refused at start: waiting at once
    silent = SilentServer(port)
    try:
        # The first retry (1 s after the start) connects, and waits on the
        # handshake; the status keeps the last error until an attempt ends.
        time.sleep(3)
        assert "Connection refused" in n.status()
        t0 = time.monotonic()
        assert n.stop(timeout=60) == 0, n.output()
        took = time.monotonic() - t0
        assert took < 10, f"the stop took {took:.1f} s"
    finally:
        silent.close()


def test_a_server_that_hangs_up_at_once_makes_the_device_wait(nitro, vublk, short_tmp_path):
    """A port that accepts and closes at once (a proxy in front of an NBD
    server that is down, a server shutting down): the device waits like
    one whose server refuses the connection; before, libnbd gave no errno
    and the start failed, every other device with it."""
    port = free_port()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(64)
    stop = threading.Event()

    def hang_up() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            conn.close()

    t = threading.Thread(target=hang_up, daemon=True)
    t.start()
    try:
        n = nitro(config(port))
        verify(vublk, short_tmp_path / "local.sock", "--size", "1m")
        status = n.status()
        assert "r0  blk  WAITING for its remote source" in status, status
        assert n.stop() == 0, n.output()
    finally:
        stop.set()
        t.join()
        sock.close()


class CuttingProxy:
    """A TCP proxy in front of an NBD server that lets the handshake through
    and cuts each connection once its client sent more than `cut` bytes: a
    middlebox or a server that fails at every request. Stopped by close()."""

    def __init__(self, target: int, cut: int = 4096) -> None:
        self.target, self.cut = target, cut
        self.accepted = 0
        self.conns: list[socket.socket] = []  # closed by close()
        self.pumps: list[threading.Thread] = []
        self.port = free_port()
        self.sock = socket.create_server(("127.0.0.1", self.port))
        self.sock.settimeout(0.2)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            server = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [client, server]
            for args in ((client, server, True), (server, client, False)):
                self.pumps.append(threading.Thread(target=self._pump, args=args, daemon=True))
                self.pumps[-1].start()

    def _pump(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                sent += len(data)
                if counted and sent > self.cut:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        for s in self.conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for t in self.pumps:
            t.join()
        for s in self.conns:
            s.close()
        self.sock.close()


def test_connections_that_die_at_their_first_request_are_remade_with_backoff(
        nitro, vublk, short_tmp_path):
    """Every connection survives its handshake and dies at the first write:
    the request waits and is sent again on each new connection until its
    io_timeout, but the reconnects back off (a dozen in 4 s, where
    reconnecting at once made hundreds a second)."""
    with NbdKit(short_tmp_path, ["memory", "32M"]) as server:
        proxy = CuttingProxy(server.port)
        try:
            n = nitro(f'[[blk]]\nid = "r0"\nsource = "nbd://127.0.0.1:{proxy.port}/"\n'
                      "io_timeout = 4\n")
            r = subprocess.run([str(vublk), "--socket", str(short_tmp_path / "r0.sock"),
                                "--rw", "write", "--bs", "64k", "--ios", "1", "--iodepth", "1",
                                "--timeout", "20"], capture_output=True, text=True, timeout=60,
                               check=False)
            res = json.loads(r.stdout) if r.stdout.strip() else None
            assert res is not None and res["errors"] == 1, (r.returncode, r.stdout, r.stderr)
            connects = metric(n, "nitro_blk_remote_connects_total", device="r0")
            assert 3 <= connects <= 15, connects
            assert proxy.accepted <= 16
            assert "NBD connection lost right after connecting; retrying with backoff" in n.output()
            assert n.stop() == 0
        finally:
            proxy.close()
