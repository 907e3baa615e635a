"""`source = "nbd://..."` and its keys: parsing and config errors (sans-IO:
nothing is contacted)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nitro import config
from nitro.devices.blk.backends.nbd import DEFAULT_PORT, parse_source


@pytest.mark.parametrize(("url", "host", "port", "export", "tls", "uri"), [
    ("nbd://10.0.0.5:10810/vol0", "10.0.0.5", 10810, "vol0", False, "nbd://10.0.0.5:10810/vol0"),
    ("nbd://storage", "storage", DEFAULT_PORT, "", False, "nbd://storage:10809/"),
    ("nbds://[fd00::1]/a%20b", "fd00::1", DEFAULT_PORT, "a b", True, "nbds://[fd00::1]:10809/a%20b"),
])
def test_parse(url, host, port, export, tls, uri):
    src = parse_source(url)
    assert (src.host, src.port, src.export, src.tls, src.uri) == (host, port, export, tls, uri)


@pytest.mark.parametrize(("url", "kw", "words"), [
    ("rbd:pool/img", {}, "expected nbd://"),
    ("nbd://h/x?tls-psk-file=/etc/shadow", {}, "no query"),
    ("nbd://user@h/x", {}, "tls_username"),
    ("nbd:///x", {}, "no host"),
    ("nbd://h:0/x", {}, "bad port"),
    ("nbd://h:99999/x", {}, "bad port"),
    ("nbd://h/x", {"tls_psk_file": Path("/k")}, "need an nbds://"),
    ("nbds://h/x", {"tls_psk_file": Path("/k"), "tls_certificates": Path("/c")}, "one of"),
])
def test_parse_errors(url, kw, words):
    with pytest.raises(ValueError, match=words):
        parse_source(url, **kw)


def load(tmp_path: Path, blk: str) -> config.DaemonConfig:
    f = tmp_path / "n.toml"
    f.write_text(f'[daemon]\nruntime_dir = "{tmp_path}"\nstate_dir = "{tmp_path}"\n[[blk]]\nid = "v"\n{blk}')
    return config.load(f)


def test_config_remote_volume(tmp_path):
    cfg = load(tmp_path, 'source = "nbds://s:1/e"\ntls_psk_file = "k.psk"\ntls_username = "u"\n'
                         'io_timeout = 2.5\n').blk[0]
    assert cfg.nbd.uri == "nbds://s:1/e" and cfg.nbd.tls_username == "u"
    assert cfg.nbd.tls_psk_file == tmp_path / "k.psk"  # relative to the state dir
    assert cfg.io_timeout == 2.5 and cfg.rbd is None and cfg.remote is cfg.nbd
    assert load(tmp_path, 'source = "nbd://s/e"\n').blk[0].io_timeout == 30.0


def test_io_timeout_for_either_remote_kind(tmp_path):
    cfg = load(tmp_path, 'source = "rbd:p/i"\nio_timeout = 5\n').blk[0]
    assert (cfg.io_timeout, cfg.nbd, str(cfg.remote)) == (5.0, None, "rbd:p/i")
    assert load(tmp_path, '').blk[0].remote is None


@pytest.mark.parametrize(("blk", "key", "words"), [
    ('source = "nbd://s/e"\nsize = "1G"\n', "size", "export is the volume"),
    ('source = "nbd://s/e"\nimage = "x.img"\n', "image", "export is the volume"),
    ('io_timeout = 3\n', "io_timeout", "only with source"),
    ('source = "nbd://s/e"\nio_timeout = 0\n', "io_timeout", "seconds"),
    ('source = "nbd://s/e"\nio_timeout = true\n', "io_timeout", "seconds"),
    ('source = "http://s/e"\n', "source", "expected nbd://"),
    ('source = "nbd://s/e"\ntls_psk_file = "k"\n', "tls_psk_file", "only with source = \"nbds://"),
    ('source = "nbds://s/e"\nceph_conf = "c"\n', "ceph_conf", "only with source = \"rbd:"),
    ('source = "rbd:p/i"\ntls_username = "u"\n', "tls_username", "only with source = \"nbds://"),
])
def test_config_errors(tmp_path, blk, key, words):
    with pytest.raises(config.ConfigError, match=words) as e:
        load(tmp_path, blk)
    assert e.value.key.endswith(key)


def test_two_devices_on_one_export_refused(tmp_path):
    f = tmp_path / "n.toml"
    f.write_text(f'[daemon]\nruntime_dir = "{tmp_path}"\nstate_dir = "{tmp_path}"\n'
                 '[[blk]]\nid = "a"\nsource = "nbd://s/e"\n[[blk]]\nid = "b"\nsource = "nbd://s:10809/e"\n')
    with pytest.raises(config.ConfigError, match="duplicate source"):
        config.load(f)
