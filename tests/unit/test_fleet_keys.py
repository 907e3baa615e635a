"""The fleet key schedule (nitro/fleet/keys.py, docs/fleet.md "Key schedule").

The oracle is the documented derivation written out here a second time with
the `cryptography` package (X25519 and HKDF-SHA256), independently of the C
code nitro derives keys with.
"""

from __future__ import annotations

import ctypes
import os
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from nitro import _datapath as dp
from nitro.crypto.keys import KeyMaterialError
from nitro.fleet import keys


def documented_keymat(own: X25519PrivateKey, other_public: bytes, sender: str, receiver: str,
                      epoch: int) -> bytes:
    """docs/fleet.md, "Key schedule", as an outside implementation reads it."""
    shared = own.exchange(X25519PublicKey.from_public_bytes(other_public))
    info = f"nitro fleet esp aes-256-gcm v1 sender={sender} receiver={receiver} epoch={epoch}"
    return HKDF(SHA256(), 36, salt=b"nitro fleet esp v1", info=info.encode()).derive(shared)


def secret_bytes(s: dp.Secret) -> bytes:
    """What C holds (test only: nitro itself never reads a secret back)."""
    return ctypes.string_at(s.address, len(s))


@pytest.fixture
def host_a(tmp_path):
    path = tmp_path / "a.key"
    public = keys.generate_private_key(path)
    secret = keys.load_private_key(path)
    yield secret, public, path
    secret.close()


def test_generated_key_file_is_private_and_raw(host_a):
    secret, public, path = host_a
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.stat().st_size == 32
    # The public key nitro computes in C is the one cryptography computes.
    theirs = X25519PrivateKey.from_private_bytes(path.read_bytes()).public_key().public_bytes_raw()
    assert keys.public_key(secret) == public == theirs


def test_generate_refuses_to_overwrite(host_a):
    with pytest.raises(keys.FleetKeyError, match="cannot create"):
        keys.generate_private_key(host_a[2])


def test_load_refuses_readable_or_wrong_size(tmp_path):
    loose = tmp_path / "loose.key"
    keys.generate_private_key(loose)
    os.chmod(loose, 0o644)
    with pytest.raises(KeyMaterialError, match="group/others"):
        keys.load_private_key(loose)
    short = tmp_path / "short.key"
    short.write_bytes(os.urandom(31))
    os.chmod(short, 0o600)
    with pytest.raises(KeyMaterialError, match="31 bytes"):
        keys.load_private_key(short)


@pytest.mark.parametrize("epoch", [0, 1, 255, 256, 2**32 + 5])
def test_both_ends_derive_the_documented_keymat(host_a, epoch):
    secret_a, public_a, path_a = host_a
    b = X25519PrivateKey.generate()
    public_b = b.public_key().public_bytes_raw()
    a = X25519PrivateKey.from_private_bytes(path_a.read_bytes())
    for sender, receiver in (("host-a", "b.example"), ("b.example", "host-a")):
        want = documented_keymat(b, public_a, sender, receiver, epoch)
        assert want == documented_keymat(a, public_b, sender, receiver, epoch)
        with keys.derive(secret_a, public_b, sender, receiver, epoch) as got:
            assert secret_bytes(got) == want


def test_directions_and_epochs_have_their_own_keys(host_a):
    secret_a = host_a[0]
    public_b = X25519PrivateKey.generate().public_key().public_bytes_raw()
    seen = set()
    for sender, receiver in (("a", "b"), ("b", "a")):
        for epoch in (0, 1, 256):
            with keys.derive(secret_a, public_b, sender, receiver, epoch) as km:
                seen.add(secret_bytes(km))
    assert len(seen) == 6


def test_low_order_peer_key_is_refused(host_a):
    # RFC 7748 6.1: the all-zero point makes the shared secret all zeros.
    with pytest.raises(keys.FleetKeyError, match="unusable"):
        keys.derive(host_a[0], bytes(32), "a", "b", 0)


def test_info_and_spi_layout():
    assert keys.sa_info("a", "b-1.x_y", 7) == b"nitro fleet esp aes-256-gcm v1 sender=a receiver=b-1.x_y epoch=7"
    assert keys.spi(1, 0) == 0x100
    assert keys.spi(0xABCDEF, 0x1_02) == 0xABCDEF02
    assert keys.spi_sender(0xABCDEF02) == (0xABCDEF, 2)
    for bad in ("", "a b", "a=b", "-a", "x" * 64):
        with pytest.raises(keys.FleetKeyError):
            keys.sa_info(bad, "b", 0)
    with pytest.raises(keys.FleetKeyError):
        keys.sa_info("a", "a", 0)
    for index in (0, 2**24):
        with pytest.raises(keys.FleetKeyError):
            keys.spi(index, 0)
