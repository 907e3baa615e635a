"""The fleet VPCs a host keeps in its state directory, so that it can start
(serve its own devices, switch locally) while etcd is unreachable."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from bench.proc import free_port
from nitro.config import from_dict
from nitro.fleet.node import VPC_COPY_FILE, FleetStartupError, load_vpc_copy, resolve_vpcs, save_vpc_copy
from nitro.fleet.schema import VpcRecord

BLUE = VpcRecord("blue", ipaddress.IPv4Network("10.1.0.0/24"), 100, ipaddress.IPv4Address("10.1.0.1"), 1450,
                 (ipaddress.IPv4Address("10.1.0.2"),))
NET = {"id": "n1", "vpc": "blue", "mac": "52:54:00:00:01:05", "ip": "10.1.0.5"}


def unreachable_config(state: Path):
    """A host whose one etcd endpoint refuses connections."""
    fleet = {"etcd": [f"http://127.0.0.1:{free_port()}"], "host": "host-a", "underlay": "192.0.2.1"}
    return from_dict({"fleet": fleet, "net": [NET]}, "t.toml", runtime_dir=state, state_dir=state)


def test_the_copy_round_trips_and_a_bad_one_is_empty(tmp_path):
    path = tmp_path / VPC_COPY_FILE
    assert load_vpc_copy(path) == {}
    save_vpc_copy(path, [BLUE])
    assert load_vpc_copy(path) == {"blue": BLUE}
    assert path.stat().st_mode & 0o777 == 0o600
    path.write_text('{"blue": {"name": "red"}}')
    assert load_vpc_copy(path) == {}
    path.write_text("[1, 2")
    assert load_vpc_copy(path) == {}


def test_etcd_away_uses_the_copy(tmp_path):
    save_vpc_copy(tmp_path / VPC_COPY_FILE, [BLUE])
    cfg = resolve_vpcs(unreachable_config(tmp_path))
    (vpc,) = [v for v in cfg.vpc if v.id == "blue"]
    assert (vpc.vni, vpc.cidr, vpc.mtu) == (100, BLUE.cidr, 1450)


def test_etcd_away_and_no_copy_is_a_clear_startup_error(tmp_path):
    with pytest.raises(FleetStartupError, match=r"cannot read the fleet VPCs blue from etcd: .*; the state "
                                                r"directory has no copy of blue \(a host's first start"):
        resolve_vpcs(unreachable_config(tmp_path))
