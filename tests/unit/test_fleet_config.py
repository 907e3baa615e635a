"""[fleet] and fleet VPCs in [[net]]; `nitro vpc create` argument checks;
the fleet's part of `nitro status` and of the metrics."""

from __future__ import annotations

import argparse
import ipaddress
from pathlib import Path

import pytest
from prometheus_client.exposition import generate_latest

from nitro import metrics, reload, status_format
from nitro.config import ConfigError, VpcConfig, from_dict, with_fleet_vpcs
from nitro.fleet.vpc_cli import vpc_from_args
from nitro.volume_cli import CliError

FLEET = {"etcd": ["http://10.0.0.1:2379", "http://10.0.0.2:2379"], "host": "host-a", "underlay": "192.0.2.1"}
NET = {"id": "n1", "vpc": "blue", "mac": "52:54:00:00:01:05", "ip": "10.1.0.5"}
BLUE = VpcConfig("blue", ipaddress.IPv4Network("10.1.0.0/24"), ipaddress.IPv4Address("10.1.0.1"), 1450, vni=100)


def load(doc: dict, state: Path = Path("/s")):
    return from_dict(doc, "t.toml", runtime_dir=Path("/r"), state_dir=state)


def test_no_fleet_is_single_host_as_before():
    cfg = load({})
    assert cfg.fleet is None and cfg.fleet_vpc_names() == []
    with pytest.raises(ConfigError, match=r"net\[0\]\.vpc: no \[\[vpc\]\] with id 'blue'"):
        load({"net": [NET]})


def test_fleet_defaults_and_a_net_in_a_fleet_vpc(tmp_path):
    cfg = load({"fleet": FLEET, "net": [NET]}, state=tmp_path)
    f = cfg.fleet
    assert f.etcd == tuple(FLEET["etcd"]) and f.host == "host-a"
    assert f.underlay == ipaddress.IPv4Address("192.0.2.1")
    assert f.key_file == tmp_path / "fleet.key" and f.encrypt is True and f.lease_ttl == 10
    assert f.rekey_interval == 3600 and f.underlay_mtu == 1500
    tuned = load({"fleet": {**FLEET, "rekey_interval": 60, "underlay_mtu": 9000}}, state=tmp_path).fleet
    assert (tuned.rekey_interval, tuned.underlay_mtu) == (60, 9000)
    assert cfg.vpc == () and cfg.fleet_vpc_names() == ["blue"]
    resolved = with_fleet_vpcs(cfg, [BLUE])
    assert resolved.vpc == (BLUE,) and resolved.net == cfg.net


def test_a_fleet_vpc_checks_the_address_once_known(tmp_path):
    cfg = load({"fleet": FLEET, "net": [NET | {"ip": "10.2.0.5"}]}, state=tmp_path)
    with pytest.raises(ConfigError, match=r"net\[0\]\.ip: 10.2.0.5 is not a free host address of vpc blue"):
        with_fleet_vpcs(cfg, [BLUE])
    with pytest.raises(ConfigError, match="neither a \\[\\[vpc\\]\\] here nor a VPC of the fleet"):
        with_fleet_vpcs(load({"fleet": FLEET, "net": [NET]}, state=tmp_path), [])


def test_a_local_vpc_of_the_same_name_wins(tmp_path):
    local = {"id": "blue", "cidr": "10.1.0.0/24", "gateway": "10.1.0.254"}
    cfg = load({"fleet": FLEET, "vpc": [local], "net": [NET]}, state=tmp_path)
    assert cfg.fleet_vpc_names() == [] and with_fleet_vpcs(cfg, [BLUE]).vpc == cfg.vpc


@pytest.mark.parametrize(("fleet", "key"), [
    ({**FLEET, "etcd": []}, "fleet.etcd"),
    ({**FLEET, "etcd": ["10.0.0.1:2379"]}, "fleet.etcd"),
    ({**FLEET, "etcd": ["http://10.0.0.1:2379/v3"]}, "fleet.etcd"),
    ({k: v for k, v in FLEET.items() if k != "host"}, "fleet.host"),
    ({**FLEET, "host": "a/b"}, "fleet.host"),
    ({**FLEET, "underlay": "0.0.0.0"}, "fleet.underlay"),
    ({**FLEET, "underlay": "host-a"}, "fleet.underlay"),
    ({**FLEET, "key_file": "nodir/fleet.key"}, "fleet.key_file"),
    ({**FLEET, "key_file": "."}, "fleet.key_file"),
    ({**FLEET, "encrypt": "yes"}, "fleet.encrypt"),
    ({**FLEET, "lease_ttl": 1}, "fleet.lease_ttl"),
    ({**FLEET, "rekey_interval": 0}, "fleet.rekey_interval"),
    ({**FLEET, "underlay_mtu": 575}, "fleet.underlay_mtu"),
    ({**FLEET, "bogus": 1}, "fleet.bogus"),
])
def test_bad_fleet_settings(tmp_path, fleet, key):
    with pytest.raises(ConfigError) as e:
        load({"fleet": fleet}, state=tmp_path)
    assert e.value.key == key


def test_a_changed_fleet_needs_a_restart(tmp_path):
    old = load({"fleet": FLEET}, state=tmp_path)
    new = load({"fleet": {**FLEET, "underlay": "192.0.2.9"}}, state=tmp_path)
    plan = reload.plan(old, new)
    assert [c.id for c in plan.needs_restart] == ["fleet"]
    assert reload.plan(old, old).needs_restart == ()


def _args(**kw) -> argparse.Namespace:
    base = {"name": "blue", "cidr": "10.1.0.0/24", "vni": 100, "mtu": 1500, "dns": [], "gateway": None}
    return argparse.Namespace(**(base | kw))


def test_vpc_create_arguments():
    v = vpc_from_args(_args(dns=["10.1.0.2,10.1.0.3"]))
    assert v.gateway == ipaddress.IPv4Address("10.1.0.1") and len(v.dns) == 2
    assert vpc_from_args(_args(gateway="10.1.0.254")).gateway == ipaddress.IPv4Address("10.1.0.254")


@pytest.mark.parametrize(("kw", "message"), [
    ({"cidr": "10.1.0.1/24"}, "host bits"),
    ({"cidr": "10.1.0.0/31"}, "no room for hosts"),
    ({"cidr": "blue"}, "not an IPv4 network"),
    ({"vni": 0}, "vni"),
    ({"vni": 1 << 24}, "vni"),
    ({"mtu": 100}, "mtu"),
    ({"name": "-x"}, "VPC name"),
    ({"gateway": "10.2.0.1"}, "gateway"),
    ({"dns": ["nope"]}, "nope"),
])
def test_vpc_create_refuses_bad_arguments(kw, message):
    with pytest.raises(CliError, match=message) as e:
        vpc_from_args(_args(**kw))
    assert e.value.code == 2


FLEET_STATS = {"host": "host-a", "underlay": "192.0.2.1", "etcd": "down", "endpoint": "http://10.0.0.1:2379",
               "endpoints": ["http://10.0.0.1:2379"], "watch_lag_seconds": 4.25, "lease": "1f",
               "disconnects": 1, "reloads": 1, "callback_errors": 0, "conflicts": {"/nitro/interfaces/blue/10.1.0.5":
                                                                                     "host-b"},
               "last_error": "etcd unreachable: ConnectError", "revision": 42, "hosts": 2, "peers": 1,
               "vpcs": 1, "interfaces": 3, "remotes": 2, "invalid_records": 0, "last_invalid": ""}


def test_status_shows_etcd_state_and_lag():
    text = status_format.format_status({"ok": True, "version": "x", "devices": [], "fleet": FLEET_STATS})
    assert "fleet: host host-a (underlay 192.0.2.1), etcd DOWN for 4.2 s, keeping the last known state" in text
    assert "revision 42, lag 4.2 s, disconnects 1" in text
    assert "1 peer hosts, 1 VPCs, 3 interfaces (2 remote)" in text
    assert "/nitro/interfaces/blue/10.1.0.5 is held by host host-b" in text
    up = status_format.format_status({"ok": True, "devices": [], "fleet": {**FLEET_STATS, "etcd": "up",
                                                                            "watch_lag_seconds": 0.0}})
    assert "etcd up via http://10.0.0.1:2379" in up


def test_fleet_metrics():
    registry = metrics.make_registry(lambda: [], process_metrics=False, get_fleet=lambda: FLEET_STATS)
    text = generate_latest(registry).decode()
    assert 'nitro_fleet_etcd_up{host="host-a"} 0.0' in text
    assert 'nitro_fleet_watch_lag_seconds{host="host-a"} 4.25' in text
    assert 'nitro_fleet_revision{host="host-a"} 42.0' in text
    assert 'nitro_fleet_remote_interfaces{host="host-a"} 2.0' in text
    assert 'nitro_fleet_etcd_disconnects_total{host="host-a"} 1.0' in text
    sa = {"spi": 0x105, "epoch": 9, "seq": 3, "packets": 3, "age_ns": 2_500_000_000, "rekey": 0}
    keyed = {**FLEET_STATS, "rekeys": 2, "sas": [{"peer": "host-b", "index": 2, "peer_epoch": 7,
                                                  "inbound_epochs": [6, 7, 8], "out": sa, "in": None}]}
    text = generate_latest(metrics.make_registry(lambda: [], process_metrics=False,
                                                 get_fleet=lambda: keyed)).decode()
    assert 'nitro_fleet_rekeys_total{host="host-a"} 2.0' in text
    assert 'nitro_fleet_sa_epoch{direction="out",host="host-a",peer="host-b"} 9.0' in text
    assert 'nitro_fleet_sa_age_seconds{direction="out",host="host-a",peer="host-b"} 2.5' in text
    assert 'direction="in"' not in text  # no inbound SA of its epoch: no sample, not a 0
    none = generate_latest(metrics.make_registry(lambda: [], process_metrics=False,
                                                 get_fleet=lambda: None)).decode()
    assert 'nitro_fleet_etcd_up{' not in none
