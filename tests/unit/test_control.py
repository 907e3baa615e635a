"""The control protocol: the sans-IO core, then the trio server and the
blocking client over a real unix socket in a temp directory."""

import json
import os
import socket
import stat
from dataclasses import dataclass, field

import pytest
import trio

from nitro.control import (
    MAX_LINE,
    CommandRefused,
    ControlError,
    decode_features,
    format_status,
    handle_request,
    handle_request_async,
    query,
    serve_control,
)

INF = float("inf")


def blk_stats(dev="vol0", **over):
    faults = {k: 0 for k in ("avail_idx", "desc_index", "desc_addr", "desc_loop", "indirect", "desc_order", "request")}
    stats = {
        "id": dev, "kind": "blk", "socket": f"/run/nitro/{dev}.sock", "connected": True, "broken": None,
        "features": 0x130000044, "protocol_features": 0x8 | 0x200, "readonly": False,
        "capacity_bytes": 1 << 30,
        "queues": [{"index": 0, "enabled": True, "running": True, "kicks": 11, "calls": 10, "chains": 12,
                    "faults": {**faults, "desc_loop": 1}}],
        "ops": {"in": {"requests": 7, "bytes": 28672, "errors": 0}, "out": {"requests": 2, "bytes": 8192, "errors": 1},
                "flush": {"requests": 1, "bytes": 0, "errors": 0}},
        "latency_buckets": [(2.5e-05, 4), (5e-05, 5), (INF, 1)],
        "latency_sum_seconds": 0.0005, "inflight": 0, "protocol_errors": 0, "connections": 1,
    }
    stats.update(over)
    return stats


class FakeDevice:
    def __init__(self, stats):
        self.stats = stats
        self.id = stats.get("id") if isinstance(stats, dict) else "bad"

    def statistics(self):
        if isinstance(self.stats, Exception):
            raise self.stats
        return self.stats


@dataclass
class View:
    devices: list = field(default_factory=list)
    version: str = "9.9.9"
    sections: dict = field(default_factory=dict)

    def status_sections(self):
        return self.sections


def call(line, view=None):
    reply = handle_request(line, view or View())
    assert reply.endswith(b"\n") and reply.count(b"\n") == 1
    return json.loads(reply)


# -- sans-IO core --------------------------------------------------------------

def test_ping():
    assert call(b'{"cmd":"ping"}\n') == {"ok": True, "version": "9.9.9"}
    assert call(b'{"cmd": "ping"}') == {"ok": True, "version": "9.9.9"}  # newline optional


def test_status_is_strict_json():
    view = View([FakeDevice(blk_stats("vol0")), FakeDevice(blk_stats("vol1", connected=False))])
    raw = handle_request(b'{"cmd":"status"}', view)
    assert b"Infinity" not in raw and b"NaN" not in raw
    reply = json.loads(raw)
    assert reply["ok"] is True and reply["version"] == "9.9.9"
    assert [d["id"] for d in reply["devices"]] == ["vol0", "vol1"]
    d = reply["devices"][0]
    assert d["features"] == 0x130000044
    assert d["latency_buckets"] == [[2.5e-05, 4], [5e-05, 5], ["+Inf", 1]]
    assert d["queues"][0]["faults"]["desc_loop"] == 1


def test_status_with_a_failing_device():
    view = View([FakeDevice(RuntimeError("gone")), FakeDevice(blk_stats())])
    reply = call(b'{"cmd":"status"}', view)
    assert reply["ok"] is True
    assert reply["devices"][0] == {"id": "bad", "error": "statistics() failed: RuntimeError: gone"}
    assert reply["devices"][1]["id"] == "vol0"


VPCS = {
    "blue": {"id": "blue", "counters": {"arp_replies": 2, "dhcp_acks": 1, "unknown": 0}, "leases": {},
             "punt_errors": 3,
             "uplink": {"name": "nv0", "state": "down", "error": "HostError: poll failed", "packets_in": 4,
                        "bytes_in": 400, "packets_out": 5, "bytes_out": 500}},
    "red": {"id": "red", "counters": {"arp_replies": 0}, "leases": {}, "punt_errors": 0},
}


def test_status_sections():
    def broken():
        raise RuntimeError("fabric gone")

    view = View([FakeDevice(blk_stats())],
                sections={"vpcs": lambda: VPCS, "extra": broken, "devices": lambda: "not allowed"})
    reply = call(b'{"cmd":"status"}', view)
    assert reply["vpcs"] == VPCS
    assert reply["extra"] == {"error": "statistics() failed: RuntimeError: fabric gone"}
    assert reply["devices"][0]["id"] == "vol0"  # a section never replaces the core fields
    assert "vpcs" not in call(b'{"cmd":"status"}', View())


def test_format_vpcs_shows_uplink_state_and_punt_errors():
    reply = call(b'{"cmd":"status"}', View(sections={"vpcs": lambda: VPCS}))
    text = format_status(reply)
    assert "vpc blue: arp_replies=2 dhcp_acks=1 punt_errors=3" in text
    assert "uplink nv0: DOWN (HostError: poll failed); in 4 pkts 400 B, out 5 pkts 500 B" in text
    assert "vpc red: no control traffic yet" in text
    up = {**VPCS["blue"]["uplink"], "state": "up"}
    del up["error"]
    text = format_status({"ok": True, "devices": [], "vpcs": {"blue": {**VPCS["blue"], "uplink": up}}})
    assert "uplink nv0: up; in 4 pkts" in text


@pytest.mark.parametrize(
    "line, error",
    [
        (b"", "not valid JSON"),
        (b"status", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"status"', "must be a JSON object"),
        (b"{}", 'no "cmd"'),
        (b'{"cmd": 5}', 'no "cmd"'),
        (b'{"cmd": "reboot"}', "unknown command 'reboot' (known: ping, reload, status)"),
        (b'{"cmd": "' + b"x" * MAX_LINE + b'"}', "longer than 65536 bytes"),
    ],
)
def test_bad_requests(line, error):
    reply = call(line)
    assert reply["ok"] is False
    assert error in reply["error"]


def test_handler_failure_is_an_error_reply():
    class Exploding:
        @property
        def devices(self):
            raise RuntimeError("daemon state gone")

        version = "1"

    reply = call(b'{"cmd":"status"}', Exploding())
    assert reply == {"ok": False, "error": "command 'status' failed: RuntimeError: daemon state gone"}


# -- human output --------------------------------------------------------------

def test_decode_features():
    assert decode_features(0x130000044, "blk") == [
        "SEG_MAX", "BLK_SIZE", "RING_INDIRECT_DESC", "RING_EVENT_IDX", "VERSION_1"]
    assert decode_features((1 << 5) | (1 << 9) | (1 << 14) | (1 << 45), "blk") == ["RO", "FLUSH", "WRITE_ZEROES", "bit45"]
    assert decode_features(1 << 5, "net") == ["MAC"]
    assert decode_features(1 << 5, None) == ["bit5"]
    assert decode_features(0, "blk") == []


def test_feature_names_come_from_the_device_modules():
    from nitro.devices.blk import config as blkcfg
    from nitro.devices.net import config as netcfg

    assert decode_features(netcfg.device_features(), "net") == [
        "CSUM", "GUEST_CSUM", "MTU", "MAC", "GUEST_TSO4", "GUEST_TSO6", "HOST_TSO4", "HOST_TSO6",
        "MRG_RXBUF", "STATUS", "CTRL_VQ", "MQ",
        "RING_INDIRECT_DESC", "RING_EVENT_IDX", "VERSION_1"]
    assert decode_features(1 << netcfg.VIRTIO_NET_F_HOST_TSO4, "net") == ["HOST_TSO4"]
    assert decode_features(1 << blkcfg.VIRTIO_BLK_F_DISCARD | 1 << 11, "blk") == ["CONFIG_WCE", "DISCARD"]
    assert decode_features(1 << 30 | 1 << 34) == ["PROTOCOL_FEATURES", "RING_PACKED"]


def test_protocol_feature_names():
    from nitro.vhost.protocol import ProtocolFeature

    pf = int(ProtocolFeature.MQ | ProtocolFeature.CONFIGURE_MEM_SLOTS) | 1 << 40
    text = format_status({"ok": True, "devices": [blk_stats(protocol_features=pf)]})
    assert f"protocol:    {pf:#x} MQ CONFIGURE_MEM_SLOTS bit40" in text


def test_format_status():
    reply = json.loads(handle_request(b'{"cmd":"status"}', View([
        FakeDevice(blk_stats("vol0")),
        FakeDevice(blk_stats("vol1", connected=False, broken="desc_loop", readonly=True,
                             features=(1 << 32) | (1 << 5) | (1 << 9) | (1 << 11) | (1 << 12) | (1 << 13) | (1 << 14)
                             | (1 << 1) | (1 << 10))),
        FakeDevice(ValueError("nope")),
    ])))
    text = format_status(reply)
    print(text)
    assert text.splitlines()[0] == "nitro 9.9.9: 3 devices"
    assert "vol0  (blk)  /run/nitro/vol0.sock" in text
    assert "0x130000044 SEG_MAX BLK_SIZE RING_INDIRECT_DESC RING_EVENT_IDX VERSION_1" in text
    for name in ("SIZE_MAX", "RO", "FLUSH", "TOPOLOGY", "CONFIG_WCE", "MQ", "DISCARD", "WRITE_ZEROES"):
        assert f" {name}" in text
    assert "0x208 REPLY_ACK CONFIG" in text  # protocol features
    assert "state:       connected" in text
    assert "BROKEN (desc_loop)" in text
    assert "read-only" in text and "1.0 GiB" in text
    assert "mean 50.0 us over 10 requests" in text
    assert "desc_loop=1" in text
    # per-queue and per-op tables
    assert any(line.split()[:7] == ["0", "yes", "yes", "11", "10", "12", "desc_loop=1"] for line in text.splitlines())
    assert any(line.split() == ["out", "2", "8192", "1"] for line in text.splitlines())
    assert "bad: statistics() failed: ValueError: nope" in text


def test_format_status_error_and_empty():
    assert format_status({"ok": False, "error": "unknown command 'x'"}) == "error: unknown command 'x'"
    assert format_status({"ok": True, "version": "1", "devices": []}) == "nitro 1: 0 devices"
    # Unexpected field types do not crash the CLI.
    assert "cannot display" in format_status({"ok": True, "version": "1", "devices": [{"id": "x", "features": "?"}]})


# -- trio server + blocking client over a real socket ---------------------------

def run_server(path, view, client):
    """Run serve_control in trio, call client(path) in a thread, return its result."""
    async def main():
        async with trio.open_nursery() as nursery:
            started = await nursery.start(serve_control, path, view)
            assert started == os.fspath(path)
            with trio.fail_after(20):
                result = await trio.to_thread.run_sync(client, path)
            nursery.cancel_scope.cancel()
        return result

    return trio.run(main)


def test_end_to_end(tmp_path):
    path = str(tmp_path / "control.sock")
    view = View([FakeDevice(blk_stats("vol0"))])

    def client(p):
        mode = stat.S_IMODE(os.stat(p).st_mode)
        return mode, query(p, {"cmd": "ping"}), query(p, {"cmd": "status"}), query(p, {"cmd": "nope"})

    mode, ping, status, nope = run_server(path, view, client)
    assert mode == 0o600
    assert ping == {"ok": True, "version": "9.9.9"}
    assert status["devices"][0]["id"] == "vol0"
    assert "VERSION_1" in format_status(status)
    assert nope["ok"] is False
    assert not os.path.exists(path)  # removed on shutdown


def test_many_clients_and_pipelined_lines(tmp_path):
    path = str(tmp_path / "control.sock")
    view = View([FakeDevice(blk_stats("vol0"))])

    def client(p):
        socks = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(8)]
        try:
            for s in socks:  # all connected at once: served concurrently
                s.settimeout(10)
                s.connect(p)
            for s in socks:
                s.sendall(b'{"cmd":"ping"}\n\n{"cmd":"status"}\n{"cmd"')  # split line
            for s in socks:
                s.sendall(b':"ping"}\n')
            replies = []
            for s in socks:
                f = s.makefile("rb")
                replies.append([json.loads(f.readline()) for _ in range(3)])
                f.close()
            return replies
        finally:
            for s in socks:
                s.close()

    for ping, status, ping2 in run_server(path, view, client):
        assert ping["ok"] and ping2["ok"] and status["devices"][0]["id"] == "vol0"


def test_overlong_line_closes_connection(tmp_path):
    path = str(tmp_path / "control.sock")

    def client(p):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(p)
            try:
                s.sendall(b"x" * (MAX_LINE + 10))
            except BrokenPipeError:
                pass
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            return data

    data = run_server(path, View(), client)
    reply = json.loads(data)
    assert reply == {"ok": False, "error": f"request line longer than {MAX_LINE} bytes"}


def test_stale_socket_is_replaced(tmp_path):
    path = tmp_path / "control.sock"  # a Path works as well as a str (the daemon passes Paths)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(path))  # bound, never listening: what a crashed daemon leaves behind
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert run_server(path, View(), lambda p: query(p, {"cmd": "ping"}))["ok"] is True


def test_live_socket_is_not_stolen(tmp_path):
    path = str(tmp_path / "control.sock")
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(path)
    live.listen(1)
    try:
        with pytest.raises(ControlError, match="is in use"):
            trio.run(serve_control, path, View())
        assert os.path.exists(path)
    finally:
        live.close()


def test_regular_file_is_not_deleted(tmp_path):
    path = tmp_path / "control.sock"
    path.write_text("precious")
    with pytest.raises(ControlError, match="not a socket"):
        trio.run(serve_control, str(path), View())
    assert path.read_text() == "precious"


def test_query_when_daemon_is_not_running(tmp_path):
    missing = str(tmp_path / "control.sock")
    with pytest.raises(ControlError, match=f"cannot reach nitro at {missing}: No such file or directory"):
        query(missing, {"cmd": "ping"})

    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(missing)
    stale.close()
    with pytest.raises(ControlError, match=f"cannot reach nitro at {missing}: Connection refused"):
        query(missing, {"cmd": "ping"})


def test_query_timeout(tmp_path):
    path = str(tmp_path / "control.sock")
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(path)
    mute.listen(1)  # accepts (in the backlog) but never answers
    try:
        with pytest.raises(ControlError, match="did not answer within 0.2s"):
            query(path, {"cmd": "ping"}, timeout=0.2)
    finally:
        mute.close()


# -- reload: answered by the transport (it awaits the daemon) -------------------


class ReloadView(View):
    def __init__(self, outcome):
        super().__init__()
        self.outcome = outcome
        self.calls = 0

    async def reload(self):
        self.calls += 1
        await trio.lowlevel.checkpoint()
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


def call_async(line, view):
    return json.loads(trio.run(handle_request_async, line, view))


def test_reload_reply_carries_what_was_applied():
    view = ReloadView({"config": "/etc/nitro/nitro.toml", "added": ["b"], "removed": []})
    reply = call_async(b'{"cmd": "reload"}', view)
    assert reply == {"ok": True, "config": "/etc/nitro/nitro.toml", "added": ["b"], "removed": []}
    assert view.calls == 1


def test_reload_refused_is_a_plain_error_reply():
    reply = call_async(b'{"cmd": "reload"}', ReloadView(CommandRefused("config f.toml: blk[0].id: missing")))
    assert reply == {"ok": False, "error": "config f.toml: blk[0].id: missing"}


def test_reload_crash_is_an_error_reply_not_a_dead_connection():
    reply = call_async(b'{"cmd": "reload"}', ReloadView(RuntimeError("boom")))
    assert reply["ok"] is False and "RuntimeError: boom" in reply["error"]


def test_sync_core_does_not_run_reload_and_async_answers_the_rest():
    view = ReloadView({})
    assert "event loop" in call(b'{"cmd": "reload"}', view)["error"]
    assert view.calls == 0
    assert call_async(b'{"cmd": "ping"}', view) == {"ok": True, "version": "9.9.9"}
    assert "unknown command" in call_async(b'{"cmd": "nope"}', view)["error"]
