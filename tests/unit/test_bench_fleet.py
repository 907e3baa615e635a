"""bench/fleet.py's configs are ones nitro accepts, and say what the bench
claims: one worker pinned to nitro's CPU, the fleet's encrypt setting,
room on the underlay for a 1518-byte frame's outer packet."""

from __future__ import annotations

import tomllib
from pathlib import Path

from bench import fleet
from nitro import config


def load(tmp_path: Path, text: str) -> config.DaemonConfig:
    return config.from_dict(tomllib.loads(text), "bench", runtime_dir=tmp_path, state_dir=tmp_path)


def test_same_host_config(tmp_path: Path) -> None:
    cfg = load(tmp_path, fleet.SAME_HOST_CONFIG)
    assert cfg.engine.workers == 1 and cfg.engine.cpus == (fleet.NITRO_CPU,)
    assert cfg.fleet is None and [v.mtu for v in cfg.vpc] == [fleet.VPC_MTU]
    assert [(n.id, n.mac, str(n.ip)) for n in cfg.net] == [fleet.SRC, fleet.DST]


def test_host_configs(tmp_path: Path) -> None:
    for encrypt in (False, True):
        cfg = load(tmp_path, fleet.host_config("http://192.0.2.254:2379", 2, fleet.DST, encrypt))
        assert cfg.fleet is not None and cfg.fleet.encrypt is encrypt and cfg.fleet.host == "h2"
        assert str(cfg.fleet.underlay) == "192.0.2.2" and cfg.engine.workers == 1
        assert cfg.fleet_vpc_names() == [fleet.VPC]
        # ESP's 73 bytes around the 1514-byte frame must fit the underlay.
        assert fleet.FRAME - 4 + 73 <= cfg.fleet.underlay_mtu
