"""The fleet's key management against a real etcd (bench/etcd.py): host
indexes claimed by racing hosts, two hosts' FleetNodes (agent + tunnel +
sync, built from their configs as the daemon builds them) that learn each
other's key, index and epoch from etcd and then carry frames both ways,
through manual and scheduled rekeys; and `nitro fleet rekey` against a
real `nitro run`."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from bench.etcd import Etcd
from bench.proc import Nitro, run_cli
from nitro import config
from nitro.fleet import identity, node
from nitro.fleet.etcd import EtcdClient
from tests.integration.test_fleet_etcd import b64, host_a_config, vpc, wait_until

pytestmark = [
    pytest.mark.integration,
    # As in test_fleet_etcd.py: httpx's async generators of a watch closed by trio's GC.
    pytest.mark.filterwarnings(
        r"ignore:Exception ignored in. <async_generator object:pytest.PytestUnraisableExceptionWarning"),
]

FRAME = bytes.fromhex("020000000002020000000001") + b"\x08\x00" + bytes(range(60))


@pytest.fixture
def etcd(tmp_path: Path):
    with Etcd(tmp_path) as server:
        yield server


def etcd_json(etcd: Etcd, key: str) -> dict:
    kv = etcd.call("kv/range", {"key": b64(key)})["kvs"][0]
    return json.loads(base64.b64decode(kv["value"]))


def test_racing_hosts_claim_distinct_indexes(etcd: Etcd):
    hosts = [f"h{i}" for i in range(12)]

    async def claim_all(wanted: int | None) -> dict[str, int]:
        got: dict[str, int] = {}

        async def one(host: str) -> None:
            async with EtcdClient([etcd.url]) as client:
                got[host] = await identity.claim_index(client, host, wanted)

        async with trio.open_nursery() as nursery:
            for h in hosts:
                nursery.start_soon(one, h)  # all read the same free numbers, then race their txns
        return got

    first = trio.run(claim_all, 3)  # every one asks for 3 (as a copied state directory would)
    assert sorted(first.values()) == list(range(1, 13))
    for host, n in first.items():
        owner = etcd.call("kv/range", {"key": b64(f"/nitro/index/{n}")})["kvs"][0]
        assert base64.b64decode(owner["value"]).decode() == host
        assert "lease" not in owner  # kept for good: a restart gets it back
    assert trio.run(claim_all, None) == first  # each gets its own back


def host_config(tmp: Path, etcd: Etcd, host: str, last: int, rekey_interval: int = 3600) -> config.DaemonConfig:
    state = tmp / host
    state.mkdir()
    path = state / "nitro.toml"
    path.write_text(f"""
[fleet]
etcd = ["{etcd.url}"]
host = "{host}"
underlay = "192.0.2.{last}"
lease_ttl = 4
rekey_interval = {rekey_interval}
[[net]]
id = "n{last}"
vpc = "blue"
mac = "52:54:00:00:01:{last:02x}"
ip = "10.1.0.{last + 10}"
""")
    return node.resolve_vpcs(config.load(path, runtime_dir=state, state_dir=state))


def sample(metrics: str, name: str) -> float:
    """The value of one sample of the Prometheus text."""
    return float(metrics.split(f"\n{name} ", 1)[1].split()[0])


def send(src: node.FleetNode, dst: str, n: int = 1) -> list:
    slot = src.tunnel.slot(dst)
    assert slot is not None, f"{dst} is no peer of {src.agent.record.id}"
    return src.tunnel.tunnel.encap(slot, 100, [FRAME] * n)


def receive(dst: node.FleetNode, packets: list) -> list:
    return [p if isinstance(p, str) else p.frame == FRAME for p in dst.tunnel.tunnel.decap(packets)]


def test_two_hosts_learn_keys_from_etcd_and_rekey_without_loss(etcd: Etcd, tmp_path: Path):
    assert vpc(etcd, "create", "blue", "--cidr", "10.1.0.0/24", "--vni", "100").returncode == 0
    a = node.open_node(host_config(tmp_path, etcd, "a", 1))
    b = node.open_node(host_config(tmp_path, etcd, "b", 2, rekey_interval=2))
    assert {a.agent.record.index, b.agent.record.index} == {1, 2}
    assert a.epoch >= int(time.time()) - 5  # start_epoch: at least the Unix time

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            await nursery.start(b.run)
            await wait_until("each has the other's SAs", lambda: a.tunnel.slot("b") is not None
                             and b.tunnel.slot("a") is not None and a.agent.record_published
                             and b.agent.record_published, 5)
            peer = a.agent.state.peers["b"]
            assert (peer.index, peer.epoch, peer.public_key) == (b.agent.record.index, b.epoch,
                                                                 b.agent.record.public_key)
            assert receive(b, send(a, "b")) == [True] and receive(a, send(b, "a")) == [True]

            # `nitro fleet rekey` on a: packets sealed before, and under the
            # new epoch before b heard of it, all arrive.
            before = send(a, "b", 2)
            old = a.epoch
            result = await a.rekey_and_publish("manual")
            assert result == {"host": "a", "old_epoch": old, "epoch": old + 1, "reason": "manual", "published": True}
            early = send(a, "b")
            assert etcd_json(etcd, "/nitro/hosts/a")["epoch"] == old + 1
            assert json.loads((tmp_path / "a" / identity.STATE_FILE).read_text())["epoch"] == old + 1
            took = await wait_until("b learns a's epoch", lambda: b.sync.peer_epochs.get("a") == old + 1, 1.0)
            assert receive(b, before + early + send(a, "b")) == [True] * 4
            # b rekeys by its schedule (every 2 s); a follows, traffic goes on.
            b_epoch = b.epoch
            await wait_until("b's scheduled rekey reaches a",
                             lambda: a.sync.peer_epochs.get("b", 0) > b_epoch, 6)
            assert b.rekeys >= 1 and b.last_rekey_reason == "schedule"
            assert receive(a, send(b, "a")) == [True]
            assert a.tunnel.tunnel.stats()["drops"] == b.tunnel.tunnel.stats()["drops"] == {
                k: 0 for k in a.tunnel.tunnel.stats()["drops"]}
            nursery.cancel_scope.cancel()
        return took

    try:
        assert trio.run(main) < 1.0
    finally:
        a.close()
        b.close()


def test_nitro_fleet_rekey_moves_the_epoch_in_etcd_and_status(etcd: Etcd, short_tmp_path: Path):
    assert vpc(etcd, "create", "blue", "--cidr", "10.1.0.0/24", "--vni", "100").returncode == 0
    # Another host, as etcd shows it (a real X25519 public key, index 9).
    peer_key = X25519PrivateKey.generate().public_key().public_bytes_raw()
    peer = {"version": 1, "id": "host-b", "underlay": "192.0.2.2", "index": 9, "epoch": 5,
            "public_key": base64.b64encode(peer_key).decode()}
    etcd.call("kv/put", {"key": b64("/nitro/hosts/host-b"), "value": b64(json.dumps(peer))})
    cfg = host_a_config(etcd)
    nitro = Nitro(short_tmp_path, cfg)
    try:
        deadline = time.monotonic() + 10
        while "sa host-b" not in (text := nitro.status()) or "(published" not in text:
            assert time.monotonic() < deadline, text
            time.sleep(0.1)
        epoch = etcd_json(etcd, "/nitro/hosts/host-a")["epoch"]
        assert f"index 1, epoch {epoch} (published" in text
        assert f"sa host-b: index 9, publishes epoch 5; out epoch {epoch} " in text
        assert "in epoch 5 " in text

        r = run_cli("fleet", "rekey", "--control", nitro.control, timeout=30)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"host host-a: epoch {epoch} -> {epoch + 1} (published in etcd)"
        assert etcd_json(etcd, "/nitro/hosts/host-a")["epoch"] == epoch + 1
        text = nitro.status()
        assert f"index 1, epoch {epoch + 1} (published" in text and "1 rekeys, last: manual" in text
        assert f"out epoch {epoch + 1} " in text
        m = nitro.metrics()
        assert 'nitro_fleet_rekeys_total{host="host-a"} 1.0' in m
        assert sample(m, 'nitro_fleet_sa_epoch{direction="out",host="host-a",peer="host-b"}') == epoch + 1
        assert sample(m, 'nitro_fleet_sa_epoch{direction="in",host="host-a",peer="host-b"}') == 5
        assert 0 <= sample(m, 'nitro_fleet_sa_age_seconds{direction="out",host="host-a",peer="host-b"}') < 10

        # A restart keeps the index and never returns to a used epoch.
        assert nitro.stop() == 0, nitro.output()
        nitro = Nitro(short_tmp_path, cfg)
        deadline = time.monotonic() + 10
        while "(published" not in (text := nitro.status()):
            assert time.monotonic() < deadline, text
            time.sleep(0.1)
        again = etcd_json(etcd, "/nitro/hosts/host-a")
        assert again["index"] == 1 and again["epoch"] > epoch + 1
    finally:
        nitro.kill()


def test_nitro_fleet_rekey_refusals(etcd: Etcd, short_tmp_path: Path):
    cfg = f"""
[fleet]
etcd = ["{etcd.url}"]
host = "host-a"
underlay = "192.0.2.1"
encrypt = false
"""
    nitro = Nitro(short_tmp_path, cfg)
    try:
        r = run_cli("fleet", "rekey", "--control", nitro.control, timeout=30)
        assert r.returncode == 1 and "rekey refused: encryption is off" in r.stderr
    finally:
        assert nitro.stop() == 0, nitro.output()
    plain = Nitro(short_tmp_path, "[daemon]\nworkers = 1\n")
    try:
        r = run_cli("fleet", "rekey", "--control", plain.control, timeout=30)
        assert r.returncode == 1 and "rekey refused: this daemon has no [fleet]" in r.stderr
    finally:
        assert plain.stop() == 0, plain.output()
