"""The fleet's control plane against a real etcd (Debian's /usr/bin/etcd,
started by PID on free loopback ports in a temporary data directory and
stopped by PID): `nitro vpc`, two FleetAgents seeing each other, lease
expiry, etcd stopped and restarted, a host cut off from etcd while the
fleet changes (with and without compaction), and the daemon's status and
metrics."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from bench.etcd import Etcd
from bench.proc import ChildError, Nitro, run_cli
from nitro.fleet.agent import FleetAgent
from nitro.fleet.etcd import Backoff
from nitro.fleet.schema import InterfaceRecord

pytestmark = [
    pytest.mark.integration,
    # httpx's and httpcore's body and response streams are layers of async
    # generators (ByteStream, PoolByteStream, _receive_response_body, ...);
    # a watch given up (compaction, a cut connection) leaves the inner ones
    # unfinished, and trio closes each when it is garbage-collected
    # (trio/_core/_asyncgens.py) with a ResourceWarning, off by default
    # outside tests. nitro's own code has no async generator.
    pytest.mark.filterwarnings(
        r"ignore:Exception ignored in. <async_generator object:pytest.PytestUnraisableExceptionWarning"),
]

VISIBLE_WITHIN = 1.0  # seconds: the "reachable from host A within a second"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture
def etcd(tmp_path: Path):
    with Etcd(tmp_path) as server:
        yield server


def vpc(etcd: Etcd, *args: str):
    return run_cli("vpc", *args, "--etcd", etcd.url, timeout=30)


def iface(host: str, last: int, vpc_name: str = "blue") -> InterfaceRecord:
    return InterfaceRecord(vpc_name, ipaddress.IPv4Address(f"10.1.0.{last}"), f"52:54:00:00:00:{last:02x}", host)


def agent(url: str, host: str, last: int, seen: list, **kw) -> FleetAgent:
    return FleetAgent(endpoints=[url], host=host, underlay=ipaddress.IPv4Address(f"192.0.2.{last}"),
                      public_key=os.urandom(32), index=last, epoch=1000 + last, interfaces=[iface(host, last)],
                      on_change=lambda changes, state: seen.extend(changes),
                      backoff=Backoff(initial=0.05, maximum=0.5), **kw)


async def wait_until(what: str, predicate: Callable[[], bool], timeout: float) -> float:
    """Seconds it took; fails the test after ``timeout``."""
    start = trio.current_time()
    while not predicate():
        if trio.current_time() - start > timeout:
            pytest.fail(f"not within {timeout} s: {what}")
        await trio.sleep(0.01)
    return trio.current_time() - start


def test_vpc_cli_create_list_delete(etcd: Etcd):
    r = vpc(etcd, "create", "blue", "--cidr", "10.1.0.0/24", "--vni", "100", "--mtu", "1450", "--dns", "10.1.0.2")
    assert r.returncode == 0, r.stderr
    assert "created VPC blue: 10.1.0.0/24 vni 100 mtu 1450 gateway 10.1.0.1 dns 10.1.0.2" in r.stdout
    dup = vpc(etcd, "create", "blue", "--cidr", "10.2.0.0/24", "--vni", "200")
    assert dup.returncode == 1 and "VPC blue already exists" in dup.stderr
    dup_vni = vpc(etcd, "create", "red", "--cidr", "10.2.0.0/24", "--vni", "100")
    assert dup_vni.returncode == 1 and "VNI 100 is already used by VPC blue" in dup_vni.stderr
    bad = vpc(etcd, "create", "red", "--cidr", "10.2.0.1/24", "--vni", "200")
    assert bad.returncode == 2 and "host bits set" in bad.stderr
    assert vpc(etcd, "create", "red", "--cidr", "10.2.0.0/24", "--vni", "200").returncode == 0

    listed = json.loads(vpc(etcd, "list", "--json").stdout)
    assert [(v["name"], v["cidr"], v["vni"], v["mtu"], v["dns"]) for v in listed] == [
        ("blue", "10.1.0.0/24", 100, 1450, ["10.1.0.2"]), ("red", "10.2.0.0/24", 200, 1500, [])]
    assert "blue" in vpc(etcd, "list").stdout

    # An interface in blue (as an agent would put it): delete is refused, in the txn.
    key = iface("a", 5).key.decode()
    etcd.call("kv/put", {"key": b64(key), "value": b64(iface("a", 5).encode().decode())})
    refused = vpc(etcd, "delete", "blue")
    assert refused.returncode == 1 and "VPC blue still has 1 interface (10.1.0.5); detach them first" in refused.stderr
    etcd.call("kv/deleterange", {"key": b64(key)})
    assert vpc(etcd, "delete", "blue").returncode == 0
    # Its VNI is free again; the name too.
    assert vpc(etcd, "create", "blue2", "--cidr", "10.1.0.0/24", "--vni", "100").returncode == 0
    assert [v["name"] for v in json.loads(vpc(etcd, "list", "--json").stdout)] == ["blue2", "red"]
    missing = vpc(etcd, "delete", "nope")
    assert missing.returncode == 1 and "no VPC nope" in missing.stderr

    etcd.stop()
    down = run_cli("vpc", "list", "--etcd", etcd.url, "--timeout", "1", timeout=30)
    assert down.returncode == 1 and "etcd unreachable" in down.stderr and "Traceback" not in down.stderr


def test_two_agents_see_each_other_within_a_second(etcd: Etcd):
    assert vpc(etcd, "create", "blue", "--cidr", "10.1.0.0/24", "--vni", "100").returncode == 0
    seen_a: list = []
    seen_b: list = []

    async def main():
        a, b = agent(etcd.url, "a", 1, seen_a), agent(etcd.url, "b", 2, seen_b)
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            with trio.fail_after(5):
                await a.wait_up()
            await nursery.start(b.run)  # after a is watching: a learns of b by its watch
            took = await wait_until("a sees b's host and interface",
                                    lambda: ("blue", iface("b", 2).ip) in a.state.remotes, VISIBLE_WITHIN)
            await wait_until("b sees a's interface", lambda: ("blue", iface("a", 1).ip) in b.state.remotes,
                             VISIBLE_WITHIN)
            remote = a.state.remotes[("blue", iface("b", 2).ip)]
            assert (remote.vni, remote.mac, remote.host, str(remote.underlay)) == (100, "52:54:00:00:00:02", "b",
                                                                                   "192.0.2.2")
            assert remote.public_key == b.record.public_key
            assert (a.state.peers["b"].index, a.state.peers["b"].epoch) == (2, 1002)
            assert (b.state.peers["a"].index, b.state.peers["a"].epoch) == (1, 1001)
            assert set(a.state.peers) == {"b"} and set(b.state.peers) == {"a"}
            assert [(c.view, c.kind) for c in seen_a] == [("vpcs", "add"), ("peers", "add"), ("remotes", "add")]
            # b stops cleanly: its lease is revoked, a sees it go at once.
            b_gone = trio.current_time()
            nursery.cancel_scope.cancel()
        return took, b_gone

    took, _ = trio.run(main)
    assert took < VISIBLE_WITHIN
    hosts = etcd.call("kv/range", {"key": b64("/nitro/hosts/"), "range_end": b64("/nitro/hosts0")})
    assert "kvs" not in hosts  # both revoked their leases on the way out


def test_a_dead_hosts_entries_expire_with_its_lease(etcd: Etcd):
    assert vpc(etcd, "create", "blue", "--cidr", "10.1.0.0/24", "--vni", "100").returncode == 0
    seen: list = []

    async def main():
        a = agent(etcd.url, "a", 1, seen)
        b = agent(etcd.url, "b", 2, [], lease_ttl=2)
        b.revoke_on_exit = False  # dies: nobody revokes, nobody renews
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            async with trio.open_nursery() as b_nursery:
                b_nursery.start_soon(b.run)
                await wait_until("a sees b", lambda: "b" in a.state.peers, 5)
                b_nursery.cancel_scope.cancel()
            died = trio.current_time()
            await wait_until("b's host and interface expire", lambda: not a.state.peers and not a.state.remotes,
                             b.lease_ttl + 3)
            gone_after = trio.current_time() - died
            nursery.cancel_scope.cancel()
        return gone_after

    gone_after = trio.run(main)
    assert 0.5 < gone_after < 2 + 3  # the lease's TTL, not at once (b did not revoke)
    assert [(c.view, c.kind) for c in seen[-2:]] == [("remotes", "remove"), ("peers", "remove")]


def test_etcd_stopped_keeps_the_state_and_the_agent_reconnects(etcd: Etcd):
    assert vpc(etcd, "create", "blue", "--cidr", "10.1.0.0/24", "--vni", "100").returncode == 0

    async def main():
        a = agent(etcd.url, "a", 1, [], lease_ttl=10)
        b = agent(etcd.url, "b", 2, [], lease_ttl=10)
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            await nursery.start(b.run)
            await wait_until("a sees b", lambda: ("blue", iface("b", 2).ip) in a.state.remotes, 5)
            await a.wait_up()
            before = dict(a.state.remotes), a.state.revision
            await trio.to_thread.run_sync(etcd.stop)
            await wait_until("a notices", lambda: a.etcd_state == "down", 10)
            await trio.sleep(3)
            # The last known state is kept; the lag says how old it is.
            assert (dict(a.state.remotes), a.state.revision) == before
            assert a.watch_lag_seconds() >= 2.5 and a.statistics()["etcd"] == "down"
            assert "etcd unreachable" in a.last_error
            await trio.to_thread.run_sync(etcd.start)
            await wait_until("a reconnects", lambda: a.etcd_state == "up", 10)
            assert a.watch_lag_seconds() == 0 and a.disconnects == 1
            # The watch works again: a change now reaches a.
            c = agent(etcd.url, "c", 3, [])
            await nursery.start(c.run)
            await wait_until("a sees c", lambda: ("blue", iface("c", 3).ip) in a.state.remotes, 5)
            assert ("blue", iface("b", 2).ip) in a.state.remotes  # b's lease outlived the outage
            nursery.cancel_scope.cancel()

    trio.run(main)


class Proxy:
    """A TCP relay between an agent and etcd that the test can cut: the
    host loses etcd while etcd itself (and the rest of the fleet) goes on."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.cut = False
        self._scopes: set[trio.CancelScope] = set()

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._relay, listeners)

    def set_cut(self, cut: bool) -> None:
        self.cut = cut
        if cut:
            for scope in self._scopes:
                scope.cancel()

    async def _relay(self, client: trio.SocketStream) -> None:
        async with client:
            if self.cut:
                return
            try:
                upstream = await trio.open_tcp_stream("127.0.0.1", self.upstream)
            except OSError:
                return
            with trio.CancelScope() as scope:
                self._scopes.add(scope)
                async with upstream, trio.open_nursery() as nursery:
                    nursery.start_soon(_pipe, client, upstream, nursery.cancel_scope)
                    nursery.start_soon(_pipe, upstream, client, nursery.cancel_scope)
            self._scopes.discard(scope)


async def _pipe(src: trio.SocketStream, dst: trio.SocketStream, done: trio.CancelScope) -> None:
    try:
        async for chunk in src:
            await dst.send_all(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    done.cancel()


@pytest.mark.parametrize("compact", [False, True], ids=["resume-watch", "compacted-reload"])
def test_a_host_cut_off_catches_up_on_what_changed_meanwhile(etcd: Etcd, compact: bool):
    assert vpc(etcd, "create", "blue", "--cidr", "10.1.0.0/24", "--vni", "100").returncode == 0
    client_port = int(etcd.url.rsplit(":", 1)[1])

    async def main():
        proxy = Proxy(client_port)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(proxy.serve)
            a = agent(f"http://127.0.0.1:{port}", "a", 1, [], lease_ttl=10)
            b = agent(etcd.url, "b", 2, [])
            await nursery.start(a.run)
            async with trio.open_nursery() as b_nursery:
                b_nursery.start_soon(b.run)
                await wait_until("a sees b", lambda: "b" in a.state.peers, 5)
                await a.wait_up()
                proxy.set_cut(True)
                await wait_until("a notices", lambda: a.etcd_state == "down", 10)
                b_nursery.cancel_scope.cancel()  # b leaves cleanly (revokes) while a cannot see it
            await wait_until("b revoked", lambda: b.lease == 0, 5)
            assert "b" in a.state.peers  # a still has the last known state
            c = agent(etcd.url, "c", 3, [])
            await nursery.start(c.run)
            await wait_until("c up", lambda: c.etcd_state == "up", 5)
            assert vpc(etcd, "create", "red", "--cidr", "10.2.0.0/24", "--vni", "200").returncode == 0
            if compact:
                rev = int(etcd.call("kv/range", {"key": b64("/")})["header"]["revision"])
                etcd.call("kv/compaction", {"revision": rev, "physical": True})
            reloads = a.reloads
            proxy.set_cut(False)
            await wait_until("a catches up", lambda: (set(a.state.peers) == {"c"}
                                                      and set(a.state.vpcs) == {"blue", "red"}
                                                      and ("blue", iface("c", 3).ip) in a.state.remotes), 10)
            assert a.etcd_state == "up" and a.disconnects == 1
            # Without compaction the watch resumed; with it, a full reload.
            assert a.reloads == reloads + (1 if compact else 0)
            nursery.cancel_scope.cancel()

    trio.run(main)


def host_a_config(etcd: Etcd) -> str:
    """`nitro run` as host-a with one interface in blue. Its underlay address
    must be one of this host's (the daemon opens the underlay sockets on
    it): a loopback one, no traffic crosses hosts here."""
    return f"""
[daemon]
workers = 1
[fleet]
etcd = ["{etcd.url}"]
host = "host-a"
underlay = "127.0.2.1"
lease_ttl = 4
[[net]]
id = "n1"
vpc = "blue"
mac = "52:54:00:00:01:05"
ip = "10.1.0.5"
"""


def test_an_underlay_address_not_on_this_host_stops_the_daemon(etcd: Etcd, short_tmp_path: Path):
    assert vpc(etcd, "create", "blue", "--cidr", "10.1.0.0/24", "--vni", "100").returncode == 0
    config = host_a_config(etcd).replace('underlay = "127.0.2.1"', 'underlay = "203.0.113.77"')
    with pytest.raises(ChildError) as e:
        Nitro(short_tmp_path, config)
    assert ("underlay 203.0.113.77: cannot open its receive socket: Cannot assign requested address "
            "(it must be an address of this host)") in str(e.value)


def test_daemon_status_and_metrics_follow_etcd(etcd: Etcd, short_tmp_path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import x25519

    assert vpc(etcd, "create", "blue", "--cidr", "10.1.0.0/24", "--vni", "100", "--mtu", "1450").returncode == 0
    # No key file yet: nitro creates the host's key pair on its first start.
    config = host_a_config(etcd)
    started = int(time.time())
    nitro = Nitro(short_tmp_path, config)
    try:
        deadline = time.monotonic() + 10
        while "etcd up via" not in (text := nitro.status()):
            assert time.monotonic() < deadline, text
            time.sleep(0.1)
        assert "fleet: host host-a (underlay 127.0.2.1)" in text
        assert "  underlay:    127.0.2.1 up, ring on worker 0; blue vni 100; 0 remote interfaces" in text
        assert "vpc blue" in text and "ip 10.1.0.5" in text  # the switch got the fleet VPC
        assert 'nitro_fleet_etcd_up{host="host-a"} 1.0' in nitro.metrics()
        host = etcd.call("kv/range", {"key": b64("/nitro/hosts/host-a")})["kvs"][0]
        record = json.loads(base64.b64decode(host["value"]))
        key_file = short_tmp_path / "fleet.key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        key = x25519.X25519PrivateKey.from_private_bytes(key_file.read_bytes())
        public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        assert record == {"version": 1, "id": "host-a", "underlay": "127.0.2.1",
                          "public_key": base64.b64encode(public).decode(), "index": 1,
                          "epoch": record["epoch"]}
        assert record["epoch"] >= started  # start_epoch: at least the Unix time
        assert int(host["lease"]) != 0
        published = etcd.call("kv/range", {"key": b64("/nitro/interfaces/blue/10.1.0.5")})["kvs"][0]
        assert json.loads(base64.b64decode(published["value"]))["host"] == "host-a"

        etcd.stop()
        deadline = time.monotonic() + 10
        while "etcd DOWN" not in (text := nitro.status()):
            assert time.monotonic() < deadline, text
            time.sleep(0.1)
        time.sleep(1.5)
        doc = json.loads(nitro.status_json())
        assert doc["fleet"]["etcd"] == "down" and doc["fleet"]["watch_lag_seconds"] >= 1.0
        m = nitro.metrics()
        assert 'nitro_fleet_etcd_up{host="host-a"} 0.0' in m
        lag = float(m.split('nitro_fleet_watch_lag_seconds{host="host-a"} ')[1].split()[0])
        assert lag >= 1.0
        etcd.start()
        deadline = time.monotonic() + 15
        while "etcd up via" not in (text := nitro.status()):
            assert time.monotonic() < deadline, text
            time.sleep(0.1)
        assert json.loads(nitro.status_json())["fleet"]["disconnects"] == 1
        assert nitro.stop() == 0, nitro.output()
        # A clean stop revokes the lease: the host and its interface are gone at once.
        for prefix, end in (("/nitro/hosts/", "/nitro/hosts0"), ("/nitro/interfaces/", "/nitro/interfaces0")):
            assert "kvs" not in etcd.call("kv/range", {"key": b64(prefix), "range_end": b64(end)})
    finally:
        nitro.kill()


def test_a_host_restarts_while_etcd_is_away(etcd: Etcd, short_tmp_path: Path):
    """A host that ran before starts again during an etcd outage: with the
    host index and the VPCs it kept in its state directory, it serves its
    interface (the switch has the VPC), says etcd is down, and registers
    once etcd is back. A host that never ran cannot start so (tested in
    tests/unit/test_fleet_vpc_copy.py and above: no index)."""
    assert vpc(etcd, "create", "blue", "--cidr", "10.1.0.0/24", "--vni", "100", "--mtu", "1450").returncode == 0
    config = host_a_config(etcd)
    first = Nitro(short_tmp_path, config)
    try:
        wait_status(first, "etcd up via")
        assert first.stop() == 0, first.output()
    finally:
        first.kill()
    etcd.stop()
    again = Nitro(short_tmp_path, config, timeout=60)
    try:
        text = wait_status(again, "etcd DOWN")
        assert "vpc blue" in text and "ip 10.1.0.5" in text
        assert (short_tmp_path / "n1.sock").exists()
        assert "starting with the VPCs as this host last read them" in again.output()
        etcd.start()
        wait_status(again, "etcd up via", timeout=20)
        published = etcd.call("kv/range", {"key": b64("/nitro/interfaces/blue/10.1.0.5")})["kvs"][0]
        assert json.loads(base64.b64decode(published["value"]))["host"] == "host-a"
        assert again.stop() == 0, again.output()
    finally:
        again.kill()


def wait_status(n: Nitro, text: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while text not in (status := n.status()):
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    return status
