"""A remote volume whose server is down when the daemon starts: the daemon
serves its other devices, the remote one waits without a socket and is
retried in the background, and it serves once the server comes up. A
storage outage at boot must not take every tenant's disks and NICs down.
Real nbdkit, real daemon, vublk as the front-end."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from bench.nbd import NbdKit
from bench.proc import ChildError, free_port
from tests.integration.test_nbd_volume import verify

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
