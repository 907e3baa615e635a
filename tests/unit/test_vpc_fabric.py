"""NetFabric (the C switch + VPC responders + uplink threads) and the
daemon's use of it, without guests: punted frames come from a fake punt
queue, uplink failures from a patched Switch."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import threading
from collections import deque
from pathlib import Path

import pytest
import trio
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import ARP, Ether

from nitro import _datapath
from nitro.config import UplinkConfig, from_dict
from nitro.daemon import Daemon, StartupError
from nitro.devices.net.fabric import FabricError, NetFabric
from nitro.devices.net.uplink import Tap
from nitro.vpc import packets as pk

WEB, DB = "52:54:00:00:00:0a", "52:54:00:00:00:0b"


def config(tmp: Path = Path("/nonexistent"), *, queue_size: int = 256, uplink: dict | None = None):
    vpc = {"id": "blue", "cidr": "10.0.0.0/24", "gateway": "10.0.0.1"}
    if uplink:
        vpc["uplink"] = uplink
    return from_dict({"vpc": [vpc, {"id": "red", "cidr": "10.0.0.0/24", "gateway": "10.0.0.1"}],
                      "net": [{"id": "web", "vpc": "blue", "mac": WEB, "ip": "10.0.0.10", "queue_size": queue_size},
                              {"id": "db", "vpc": "blue", "mac": DB, "ip": "10.0.0.11"}]},
                     "t.toml", runtime_dir=tmp, state_dir=tmp)


class FakePunts:
    """Stands in for the switch's punt queue and inject (same method names)."""

    def __init__(self) -> None:
        self.punt_fd, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.frames: deque[tuple[int, bytes]] = deque()
        self.injected: list[tuple[int, bytes]] = []
        self.fail_inject_port: int | None = None
        self.drained = False  # punt_pop found the queue empty: every frame punted is answered
        self._changed = trio.Event()

    def punt(self, port: int, frame: bytes) -> None:
        self.drained = False
        self.frames.append((port, frame))
        os.write(self._w, b"x")

    def punt_pop(self):
        if self.frames:
            return self.frames.popleft()
        try:
            os.read(self.punt_fd, 4096)
        except BlockingIOError:
            pass
        self.drained = True
        self._changed.set()
        return None

    def punt_pop_batch(self, limit: int) -> list[tuple[int, bytes]]:
        got = []
        while len(got) < limit and (frame := self.punt_pop()) is not None:
            got.append(frame)
        return got

    def inject(self, port: int, frame: bytes) -> bool:
        if port == self.fail_inject_port:
            raise _datapath.FrontendError(-1, "nitro_switch_inject: invalid argument")
        self.injected.append((port, frame))
        return True

    async def wait_drained(self) -> None:
        with trio.fail_after(5):
            while not self.drained:
                self._changed = trio.Event()
                await self._changed.wait()

    def close(self) -> None:
        os.close(self.punt_fd)
        os.close(self._w)


def arp_request(target: str, mac=WEB, ip="10.0.0.10") -> bytes:
    return bytes(Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=mac, psrc=ip, pdst=target))


def discover(mac=WEB) -> bytes:
    return bytes(Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / IP(src="0.0.0.0", dst="255.255.255.255")
                 / UDP(sport=68, dport=67) / BOOTP(chaddr=pk.mac_bytes(mac) + bytes(10), xid=7)
                 / DHCP(options=[("message-type", "discover"), "end"]))


@pytest.fixture
def fabric():
    f = NetFabric(config())
    yield f
    f.close()
    for d in f.devices:
        d.close()


def test_net_devices_implement_the_backend_contract(fabric):
    from nitro.devices.base import VirtioBackend

    assert fabric.devices and all(isinstance(d, VirtioBackend) for d in fabric.devices)


def test_a_frame_that_raises_never_stops_the_punt_loop(fabric, caplog):
    fake = FakePunts()
    real_switch, fabric.switch = fabric.switch, fake
    responder = fabric.responders["blue"]
    handle = responder.handle

    def handle_or_explode(port, frame):
        if frame.startswith(b"boom"):
            raise IndexError("responder bug")
        return handle(port, frame)

    responder.handle = handle_or_explode

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fabric.serve_punts)
            for _ in range(3):
                fake.punt(0, b"boom" + bytes(60))
            fake.punt(0, arp_request("10.0.0.11"))
            fake.fail_inject_port = 1
            fake.punt(1, arp_request("10.0.0.10", mac=DB, ip="10.0.0.11"))  # inject raises
            await fake.wait_drained()
            fake.fail_inject_port = None
            fake.punt(1, arp_request("10.0.0.10", mac=DB, ip="10.0.0.11"))
            await fake.wait_drained()
            nursery.cancel_scope.cancel()

    try:
        with caplog.at_level(logging.DEBUG, logger="nitro.net"):
            trio.run(main)
    finally:
        fabric.switch = real_switch
        fake.close()
    assert [port for port, _ in fake.injected] == [0, 1]
    assert Ether(fake.injected[0][1])[ARP].hwsrc == DB  # answered after the failures
    assert fabric.punt_errors == {"blue": 4, "red": 0}
    assert fabric.statistics()["blue"]["punt_errors"] == 4
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    # once per distinct error (type and place), not once per frame
    assert sorted(r.fields["error"] for r in errors) == [
        "FrontendError: nitro_switch_inject: invalid argument", "IndexError: responder bug"]
    assert {r.fields["interface"] for r in errors} == {"web", "db"}


def test_statistics_keys_leases_by_interface_id(fabric):
    fake = FakePunts()
    real_switch, fabric.switch = fabric.switch, fake
    try:
        fabric.answer(0, discover())
    finally:
        fabric.switch = real_switch
        fake.close()
    ((port, offer),) = fake.injected
    assert port == 0 and Ether(offer)[BOOTP].yiaddr == "10.0.0.10"
    stats = fabric.statistics()
    assert list(stats["blue"]["leases"]) == ["web"]
    assert stats["blue"]["leases"]["web"]["state"] == "offered"
    assert 58 <= stats["blue"]["leases"]["web"]["expires_in"] <= 60
    assert stats["red"]["leases"] == {} and "uplink" not in stats["blue"]
    web, db = fabric.devices
    assert web.statistics()["lease"]["state"] == "offered"
    assert "lease" not in db.statistics()
    assert not hasattr(web, "fabric")


def test_device_uses_the_configured_queue_size():
    f = NetFabric(config(queue_size=512))
    assert [d.max_queue_size for d in f.devices] == [512, 256]
    f.close()


def test_close_leaves_the_devices_to_their_owner(fabric):
    closed = []
    for d in fabric.devices:
        d.close = lambda d=d: closed.append(d.cfg.id)
    fabric.close()
    assert closed == []


def test_too_many_interfaces_is_a_startup_error(tmp_path):
    cfg = config(tmp_path)
    base = cfg.net[0]
    nets = tuple(dataclasses.replace(base, id=f"n{i}", mac=f"52:54:00:00:{i >> 8:02x}:{i & 0xFF:02x}",
                                     ip=ipaddress.IPv4Address("10.0.0.0") + 2 + i,
                                     socket=tmp_path / f"n{i}.sock") for i in range(257))
    cfg = dataclasses.replace(cfg, vpc=(dataclasses.replace(cfg.vpc[0], cidr=ipaddress.IPv4Network("10.0.0.0/16")),),
                              net=nets)
    with pytest.raises(FabricError, match=r"^net n256: cannot add it to the switch as port 256: "):
        NetFabric(cfg)
    d = Daemon(cfg)
    with pytest.raises(StartupError, match="net n256") as e:
        d.open_devices()
    assert "\n" not in str(e.value)
    assert d.servers == [] and d.fabric is None


def test_uplink_failure_marks_it_down(caplog):
    f = NetFabric(config(uplink={"name": "nv0", "address": "10.0.0.254/24"}))

    class FakeTap:
        name = "nv0"

        def close(self):
            pass

    def uplink_serve(vpc, timeout_ms):
        raise _datapath.HostError(-2, "nitro_switch_uplink_serve", 9)

    f.taps[0] = FakeTap()
    f.switch.uplink_serve = uplink_serve
    with caplog.at_level(logging.ERROR, logger="nitro.net"):
        f.start_uplink_threads()
        for t in list(f._threads.values()):
            t.join(5)
    up = f.statistics()["blue"]["uplink"]
    assert up["name"] == "nv0" and up["state"] == "down" and up["error"].startswith("HostError")
    assert up["packets_in"] == 0
    (record,) = [r for r in caplog.records if r.getMessage() == "uplink down"]
    assert record.fields["vpc"] == "blue" and record.fields["uplink"] == "nv0"
    f.close()


def test_uplink_thread_states():
    f = NetFabric(config())

    class FakeTap:
        name = "nv0"

        def close(self):
            pass

    f.taps[0] = FakeTap()
    started = threading.Event()

    def uplink_serve(vpc, timeout_ms):
        started.set()
        threading.Event().wait(timeout_ms / 1000)
        return 0

    f.switch.uplink_serve = uplink_serve
    f.switch.set_uplink = lambda *a: None
    assert f.statistics()["blue"]["uplink"]["state"] == "stopped"
    f.start_uplink_threads()
    assert started.wait(5)
    assert f.statistics()["blue"]["uplink"]["state"] == "up"
    f.stop()
    assert f.statistics()["blue"]["uplink"]["state"] == "stopped"
    f.close()


class RecordingFabric:
    def __init__(self):
        self.calls = []

    def stop(self):
        self.calls.append(("stop", threading.current_thread() is threading.main_thread()))

    def close(self):
        self.calls.append(("close", None))

    def statistics(self):
        return {"blue": {"counters": {}}}


def test_daemon_stops_uplinks_off_the_trio_thread(tmp_path):
    d = Daemon(config(tmp_path))
    fabric = d.fabric = RecordingFabric()
    assert d.status_sections()["vpcs"]() == {"blue": {"counters": {}}}
    trio.run(d.drain)
    assert fabric.calls == [("stop", False)]  # in a worker thread, not on the trio thread
    d.close()
    assert fabric.calls[-1] == ("close", None) and d.fabric is None
    assert d.status_sections() == {} and d.vpc_statistics() == {}


def test_tap_mac_comes_from_netlink():
    # Needs root (CAP_NET_ADMIN) and /dev/net/tun, as CI and the uplink
    # system tests have: without them this fails (UplinkError), never skips.
    name = f"ntmac{os.getpid() % 100000}"
    tap = Tap(UplinkConfig(name, ipaddress.IPv4Interface("10.99.0.254/24")), 1400)
    try:
        sysfs = Path(f"/sys/class/net/{name}/address").read_text().strip()
        assert tap.mac == pk.mac_bytes(sysfs) and len(tap.mac) == 6
        assert Path(f"/sys/class/net/{name}/mtu").read_text().strip() == "1400"
    finally:
        tap.close()


def test_tap_takes_no_ipv6_configuration_from_guests():
    # Root and /dev/net/tun as above. A guest's router advertisement must not
    # configure or route the host, even if one got past the switch.
    name = f"ntra{os.getpid() % 100000}"
    tap = Tap(UplinkConfig(name, ipaddress.IPv4Interface("10.99.1.254/24")), 1500)
    try:
        conf = Path(f"/proc/sys/net/ipv6/conf/{name}")
        assert {k: (conf / k).read_text().strip() for k in ("accept_ra", "autoconf", "accept_redirects")} == {
            "accept_ra": "0", "autoconf": "0", "accept_redirects": "0"}
        assert (conf / "disable_ipv6").read_text().strip() == "0"  # link-local IPv6 still works
    finally:
        tap.close()
