"""The control socket: the sans-IO protocol and commands, then the trio
server and the blocking client over a real unix socket in a temp directory.
Rendering a status for people is tested in test_status_format.py."""

import json
import os
import socket
import stat
from dataclasses import dataclass, field

import pytest
import trio

from nitro.control.client import query
from nitro.control.commands import handle_request, handle_request_async
from nitro.control.protocol import (
    COMMANDS,
    MAX_LINE,
    CommandRefused,
    ControlError,
    ReplyError,
    RequestError,
    encode_reply,
    encode_request,
    parse_reply,
    parse_request,
)
from nitro.control.server import serve_control
from nitro.status_format import format_status
from tests.unit.status_samples import VPCS, blk_stats


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


# -- protocol (sans-IO) ----------------------------------------------------------

def test_request_round_trip():
    assert parse_request(encode_request({"cmd": "status", "x": 1})) == ("status", {"cmd": "status", "x": 1})
    assert parse_request(b'{"cmd": "reload"}') == ("reload", {"cmd": "reload"})  # newline optional
    assert COMMANDS == {"ping", "status", "reload", "volume_qos", "fleet-rekey"}


def test_bad_request_is_a_request_error():
    with pytest.raises(RequestError, match="unknown command 'x'"):
        parse_request(b'{"cmd": "x"}')
    with pytest.raises(RequestError, match="not valid JSON"):
        parse_request(b"{")


def test_reply_round_trip_is_strict_json():
    line = encode_reply({"ok": True, "t": (1, 2), "inf": float("inf"), "nan": float("nan"), "b": b"\xff"})
    assert line.endswith(b"\n") and b"Infinity" not in line and b"NaN\"" in line
    assert parse_reply(line) == {"ok": True, "t": [1, 2], "inf": "+Inf", "nan": "NaN", "b": "\\xff"}
    with pytest.raises(ReplyError, match="not a JSON object"):
        parse_reply(b"[1]\n")
    with pytest.raises(ReplyError):
        parse_reply(b"{\n")


# -- commands (sans-IO) ------------------------------------------------------------

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
        (b'{"cmd": "reboot"}', "unknown command 'reboot' (known: fleet-rekey, ping, reload, status, volume_qos)"),
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


# -- volume_qos: answered by the transport too -------------------------------------


class QosView(View):
    def __init__(self):
        super().__init__()
        self.calls = []

    async def set_qos(self, device_id, values):
        self.calls.append((device_id, values))
        await trio.lowlevel.checkpoint()
        if device_id != "vol0":
            raise CommandRefused(f"no [[blk]] device {device_id!r} (have: vol0)")
        return {"device": device_id, "qos": {"iops": values.get("iops", 0)}}


def test_volume_qos_passes_only_the_limits_given():
    view = QosView()
    reply = call_async(b'{"cmd": "volume_qos", "device": "vol0", "iops": 2000}', view)
    assert reply == {"ok": True, "device": "vol0", "qos": {"iops": 2000}}
    assert view.calls == [("vol0", {"iops": 2000})]


def test_volume_qos_refusals_change_nothing():
    view = QosView()
    assert call_async(b'{"cmd": "volume_qos", "device": "nope", "iops": 1}', view) == {
        "ok": False, "error": "no [[blk]] device 'nope' (have: vol0)"}
    assert "unknown keys ['bogus']" in call_async(
        b'{"cmd": "volume_qos", "device": "vol0", "bogus": 1}', view)["error"]
    assert "needs a \"device\" string" in call_async(b'{"cmd": "volume_qos", "iops": 1}', view)["error"]
    assert view.calls == [("nope", {"iops": 1})]
    assert "event loop" in call(b'{"cmd": "volume_qos", "device": "vol0"}', view)["error"]


class RekeyView(View):
    def __init__(self, outcome):
        super().__init__()
        self.outcome = outcome

    async def fleet_rekey(self):
        await trio.lowlevel.checkpoint()
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


def test_fleet_rekey_reply_and_refusal():
    moved = {"host": "a", "old_epoch": 7, "epoch": 8, "reason": "manual", "published": True}
    assert call_async(b'{"cmd": "fleet-rekey"}', RekeyView(moved)) == {"ok": True, **moved}
    refused = call_async(b'{"cmd": "fleet-rekey"}', RekeyView(CommandRefused("this daemon has no [fleet]")))
    assert refused == {"ok": False, "error": "this daemon has no [fleet]"}
    assert "event loop" in call(b'{"cmd": "fleet-rekey"}', RekeyView(moved))["error"]
