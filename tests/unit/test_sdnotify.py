"""sd_notify against a real AF_UNIX datagram socket the test binds (PID 1 is
not systemd on the CI machines, so the test plays the service manager)."""

import logging
import os
import socket
import uuid

import pytest
import trio
import trio.lowlevel

from nitro.sdnotify import Notifier, watchdog_loop


@pytest.fixture
def manager(tmp_path):
    """A bound datagram socket standing in for systemd; yields (sock, path)."""
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


def recv(sock):
    return sock.recv(4096).decode()


def test_messages_reach_the_socket(manager):
    sock, path = manager
    with Notifier({"NOTIFY_SOCKET": path}) as n:
        assert n.enabled
        assert n.ready()
        assert recv(sock) == "READY=1"
        assert n.status("serving 2 devices")
        assert recv(sock) == "STATUS=serving 2 devices"
        assert n.watchdog()
        assert recv(sock) == "WATCHDOG=1"
        assert n.stopping(status="draining\n3 requests")
        assert recv(sock) == "STOPPING=1\nSTATUS=draining 3 requests"
        assert n.ready(status="up")
        assert recv(sock) == "READY=1\nSTATUS=up"
        assert n.extend_timeout(2.5)
        assert recv(sock) == "EXTEND_TIMEOUT_USEC=2500000"


def test_abstract_namespace():
    name = f"nitro-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind("\0" + name)
        sock.settimeout(5)
        with Notifier({"NOTIFY_SOCKET": "@" + name}) as n:
            assert n.ready()
            assert recv(sock) == "READY=1"
            assert n.watchdog()
            assert recv(sock) == "WATCHDOG=1"
    finally:
        sock.close()


def test_unset_is_a_noop():
    n = Notifier({})
    assert not n.enabled
    assert n.ready() is False
    assert n.watchdog() is False
    assert n.watchdog_interval() is None
    n.close()


def test_reads_os_environ_by_default(manager, monkeypatch):
    sock, path = manager
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    with Notifier() as n:
        n.stopping()
        assert recv(sock) == "STOPPING=1"
    with Notifier.from_environment() as n:
        n.ready()
        assert recv(sock) == "READY=1"


def test_unsupported_address_is_disabled(caplog):
    with caplog.at_level(logging.WARNING, logger="nitro.sdnotify"):
        n = Notifier({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not n.enabled and not n.ready()
    assert "unsupported NOTIFY_SOCKET" in caplog.text


def test_send_errors_are_logged_once_and_never_raise(tmp_path, caplog):
    # The manager went away: ENOENT on every send.
    with Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")}) as n, caplog.at_level(logging.DEBUG, "nitro.sdnotify"):
        assert n.ready() is False
        assert n.watchdog() is False
        assert n.watchdog() is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "READY=1" in warnings[0].getMessage()


def test_full_queue_does_not_block(manager):
    sock, path = manager
    with Notifier({"NOTIFY_SOCKET": path}) as n:
        # Nobody reads: the receive queue fills, sends fail with EAGAIN instead of blocking.
        results = [n.notify("STATUS=" + "x" * 1000) for _ in range(5000)]
    assert results[0] is True and results[-1] is False


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "<self>"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "<other>"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "nope"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "thirty"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(manager, env, expected):
    _, path = manager
    env = dict(env)
    if env.get("WATCHDOG_PID") == "<self>":
        env["WATCHDOG_PID"] = str(os.getpid())
    elif env.get("WATCHDOG_PID") == "<other>":
        env["WATCHDOG_PID"] = str(os.getpid() + 1)
    with Notifier({"NOTIFY_SOCKET": path, **env}) as n:
        assert n.watchdog_interval() == expected


def test_watchdog_without_socket_is_off():
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval() is None


def test_watchdog_loop_pings_periodically(manager):
    sock, path = manager
    sock.setblocking(False)
    with Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "40000", "WATCHDOG_PID": str(os.getpid())}) as n:
        assert n.watchdog_interval() == 0.02

        async def main():
            with trio.move_on_after(0.25):
                await watchdog_loop(n)

        trio.run(main)
    pings = []
    while True:
        try:
            pings.append(sock.recv(64))
        except BlockingIOError:
            break
    assert set(pings) == {b"WATCHDOG=1"}
    assert 3 <= len(pings) <= 14  # 0.25 s / 0.02 s ~ 13; slack for a slow machine


def test_watchdog_loop_stops_when_trio_is_wedged(manager):
    """A blocked trio thread sends no pings: that is what makes systemd's
    watchdog useful."""
    import time

    sock, path = manager
    sock.setblocking(False)
    with Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000"}) as n:

        async def main():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watchdog_loop, n)
                await trio.lowlevel.checkpoint()
                time.sleep(0.3)  # wedge the loop
                nursery.cancel_scope.cancel()

        trio.run(main)
    count = 0
    while True:
        try:
            sock.recv(64)
            count += 1
        except BlockingIOError:
            break
    assert count <= 2


def test_watchdog_loop_returns_when_off():
    async def main():
        with trio.fail_after(1):
            await watchdog_loop(Notifier({}))

    trio.run(main)
