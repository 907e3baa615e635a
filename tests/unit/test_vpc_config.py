"""[[vpc]] / [[net]] parsing: typed values and ConfigError(file, key, reason)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from nitro.config import ConfigError, from_dict

VPC = {"id": "blue", "cidr": "10.0.0.0/24", "gateway": "10.0.0.1"}
NET = {"id": "n1", "vpc": "blue", "mac": "52:54:00:AA:00:01", "ip": "10.0.0.10"}


def load(vpcs, nets):
    return from_dict({"vpc": vpcs, "net": nets}, "t.toml", runtime_dir=Path("/r"), state_dir=Path("/s"))


def test_defaults_and_types():
    cfg = load([VPC | {"dns": "10.0.0.53", "uplink": {"name": "nv0", "address": "10.0.0.254/24"}}],
               [NET | {"queues": 2, "pps": 1000, "bw_in_bytes_per_sec": "10M"}])
    v, n = cfg.vpc[0], cfg.net[0]
    assert v.mtu == 1500 and v.lease_seconds == 3600 and v.dns == (ipaddress.IPv4Address("10.0.0.53"),)
    assert v.uplink.name == "nv0" and str(v.uplink.address) == "10.0.0.254/24"
    assert n.socket == Path("/r/n1.sock") and n.mac == "52:54:00:aa:00:01" and n.queues == 2
    assert n.pps == 1000 and n.bw_in_bytes_per_sec == 10_000_000 and n.bw_out_bytes_per_sec == 0


@pytest.mark.parametrize("vpc, net, key", [
    (VPC | {"cidr": "10.0.0.1/24"}, NET, "vpc[0].cidr"),
    (VPC | {"gateway": "10.1.0.1"}, NET, "vpc[0].gateway"),
    (VPC | {"mtu": 100}, NET, "vpc[0].mtu"),
    (VPC | {"bogus": 1}, NET, "vpc[0].bogus"),
    (VPC | {"uplink": {"name": "x" * 16, "address": "10.0.0.254/24"}}, NET, "vpc[0].uplink.name"),
    (VPC | {"uplink": {"name": "u", "address": "10.0.1.254/24"}}, NET, "vpc[0].uplink.address"),
    (VPC, NET | {"vpc": "red"}, "net[0].vpc"),
    (VPC, NET | {"ip": "10.0.1.10"}, "net[0].ip"),
    (VPC, NET | {"ip": "10.0.0.1"}, "net[0].ip"),
    (VPC, NET | {"mac": "01:00:5e:00:00:01"}, "net[0].mac"),
    (VPC, NET | {"mac": "zz"}, "net[0].mac"),
    (VPC, NET | {"queue_size": 300}, "net[0].queue_size"),
    (VPC, NET | {"pps": -1}, "net[0].pps"),
])
def test_errors_name_the_key(vpc, net, key):
    with pytest.raises(ConfigError) as e:
        load([vpc], [net])
    assert e.value.key == key and e.value.file == "t.toml"


def test_duplicates():
    with pytest.raises(ConfigError, match="duplicate mac"):
        load([VPC], [NET, NET | {"id": "n2", "ip": "10.0.0.11"}])
    with pytest.raises(ConfigError, match="duplicate ip"):
        load([VPC], [NET, NET | {"id": "n2", "mac": "52:54:00:aa:00:02"}])
    with pytest.raises(ConfigError, match="duplicate id"):
        load([VPC, VPC], [])


def test_limits_are_config_errors_not_startup_crashes():
    vpcs = [VPC | {"id": f"v{i}"} for i in range(65)]
    with pytest.raises(ConfigError) as e:
        load(vpcs, [])
    assert e.value.key == "vpc" and "at most 64" in e.value.reason
    many_dns = [f"10.0.0.{i}" for i in range(2, 66)]
    with pytest.raises(ConfigError) as e:
        load([VPC | {"dns": many_dns}], [])
    assert e.value.key == "vpc[0].dns"
    with pytest.raises(ConfigError) as e:
        load([VPC], [NET | {"pps": 2**64}])
    assert e.value.key == "net[0].pps"
    with pytest.raises(ConfigError, match="duplicate socket"):
        from_dict({"vpc": [VPC], "net": [NET | {"socket": "x.sock"}],
                   "blk": [{"id": "b", "socket": "x.sock"}]}, "t.toml",
                  runtime_dir=Path("/r"), state_dir=Path("/s"))


def test_net_rings_are_at_least_what_qemu_accepts():
    with pytest.raises(ConfigError) as e:
        load([VPC], [NET | {"queue_size": 128}])
    assert e.value.key == "net[0].queue_size" and "256..1024" in e.value.reason
