"""[[blk]] source = "rbd:POOL/IMAGE" and its options (nitro/config.py)."""

from pathlib import Path

import pytest

from nitro import config
from tests.unit.test_config import load_text


def test_rbd_source_with_its_options(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, """
[[blk]]
id = "vol0"
source = "rbd:volumes/vm-17"
ceph_conf = "/run/ceph/ceph.conf"
user = "nitro"
keyring = "/run/ceph/client.nitro.keyring"
""")
    (b,) = cfg.blk
    assert b.rbd == config.RbdSource(pool="volumes", image="vm-17", ceph_conf=Path("/run/ceph/ceph.conf"),
                                     user="nitro", keyring=Path("/run/ceph/client.nitro.keyring"))


def test_rbd_source_defaults(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, '[[blk]]\nid = "v"\nsource = "rbd:rbd/img"\n')
    assert cfg.blk[0].rbd == config.RbdSource(pool="rbd", image="img")
    assert cfg.blk[0].io_timeout == 30.0
    assert load_text(tmp_path, '[[blk]]\nid = "v"\n').blk[0].rbd is None


@pytest.mark.parametrize("lines, key, reason", [
    ('source = "rbd:pool"', "source", "rbd:POOL/IMAGE"),
    ('source = "rbd:/img"', "source", "rbd:POOL/IMAGE"),
    ('source = "rbd:a/b/c"', "source", "rbd:POOL/IMAGE"),
    ('source = "file:/x"', "source", "rbd:POOL/IMAGE"),
    ('source = "rbd:p/i"\nsize = "1G"', "size", "its own"),
    ('source = "rbd:p/i"\nimage = "x.img"', "image", "not with source"),
    ('user = "nitro"', "user", "only with source"),
    ('io_timeout = 5', "io_timeout", "only with source"),
    ('source = "rbd:p/i"\nio_timeout = 0', "io_timeout", "expected seconds"),
    ('source = "rbd:p/i"\nio_timeout = "5s"', "io_timeout", "expected seconds"),
    ('source = "rbd:p/i"\nio_timeout = 86401', "io_timeout", "expected seconds"),
])
def test_rbd_source_errors(tmp_path: Path, lines: str, key: str, reason: str) -> None:
    with pytest.raises(config.ConfigError) as e:
        load_text(tmp_path, f'[[blk]]\nid = "v"\n{lines}\n')
    assert e.value.key.endswith(key) and reason in e.value.reason, e.value


@pytest.mark.parametrize("source", ["rbd:p/i", "nbd://127.0.0.1:10809/e", "nbds://h/e"])
def test_encryption_on_a_remote_source(tmp_path: Path, source: str) -> None:
    """A LUKS2 volume on an RBD image or an NBD export (backends/luks.py)."""
    cfg = load_text(tmp_path, f'[[blk]]\nid = "v"\nsource = "{source}"\n'
                              'encryption = { key_file = "vol.key" }\n')
    assert cfg.blk[0].remote is not None
    assert cfg.blk[0].encryption == config.EncryptionConfig(key_file=tmp_path / "state" / "vol.key")


def test_one_rbd_image_per_daemon(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="duplicate source 'rbd:p/i'"):
        load_text(tmp_path, '[[blk]]\nid = "a"\nsource = "rbd:p/i"\n[[blk]]\nid = "b"\nsource = "rbd:p/i"\n')



@pytest.mark.parametrize("value, seconds", [("3", 3.0), ("0.5", 0.5), ("86400", 86400.0)])
def test_io_timeout(tmp_path: Path, value: str, seconds: float) -> None:
    cfg = load_text(tmp_path, f'[[blk]]\nid = "v"\nsource = "rbd:p/i"\nio_timeout = {value}\n')
    assert cfg.blk[0].io_timeout == seconds
