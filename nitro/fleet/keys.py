"""Fleet keys: each host's X25519 key pair and the per-pair SA keys.

The key schedule, exactly (docs/fleet.md "Key schedule"); an outside
implementation that follows it interoperates:

- Each host has an X25519 key pair (RFC 7748). The private key is a file of
  exactly 32 raw bytes, mode 0600 (or a systemd credential); the public key
  (32 raw bytes) is published in etcd. Host ids match :data:`HOST_ID`.
- For the frames sender S sends to receiver R in key epoch E (a
  non-negative integer the fleet agrees on) the SA's key material is
  ``HKDF-SHA256(IKM = X25519(own private key, other's public key),
  salt = HKDF_SALT, info = sa_info(S, R, E))`` (RFC 5869), 36 bytes: the
  AES-256-GCM key then the 4-byte salt of the nonce (RFC 4106 8.1). Both
  ends compute the same bytes (X25519 is symmetric); each direction and
  epoch has its own key.
- The SPI is ``sender's host index << 8 | (E mod 256)``. The host index is
  the sender's fleet-unique number in 1..2^24-1 (etcd holds it with the
  host's record), so a receiver never sees two peers with one SPI, and
  the epochs it keeps at once (E-1, E, E+1) differ in the low byte.

Key material lives in C (:class:`nitro._datapath.Secret`): the private key
is read from its file into locked memory and the derivation runs in C, so
Python never holds either. Only :func:`generate_private_key` sees a private
key in Python, once, to write the file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from nitro import _datapath
from nitro.crypto.keys import KeyMaterialError, read_secret

#: A host id: letters, digits, ".", "_", "-"; no spaces, so :func:`sa_info`
#: is unambiguous.
HOST_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
HKDF_SALT: Final = b"nitro fleet esp v1"
MAX_HOST_INDEX: Final = 2**24 - 1
KEY_LEN: Final = _datapath.X25519_LEN


class FleetKeyError(Exception):
    """A host id, host index, epoch or key is unusable: fix the
    configuration or the file named in the message."""


def check_host_id(host: str) -> str:
    if not HOST_ID.fullmatch(host):
        raise FleetKeyError(f"host id {host!r} must match {HOST_ID.pattern}")
    return host


def sa_info(sender: str, receiver: str, epoch: int) -> bytes:
    """HKDF's info for the SA from sender to receiver in epoch, e.g.
    ``b"nitro fleet esp aes-256-gcm v1 sender=a receiver=b epoch=7"``."""
    check_host_id(sender)
    check_host_id(receiver)
    if sender == receiver:
        raise FleetKeyError(f"host {sender} has no SA with itself")
    if epoch < 0:
        raise FleetKeyError(f"epoch {epoch} is negative")
    return f"nitro fleet esp aes-256-gcm v1 sender={sender} receiver={receiver} epoch={epoch}".encode()


def spi(sender_index: int, epoch: int) -> int:
    """The SPI of the sender's SAs in epoch (to every receiver)."""
    if not 1 <= sender_index <= MAX_HOST_INDEX:
        raise FleetKeyError(f"host index {sender_index} is outside 1..{MAX_HOST_INDEX}")
    return sender_index << 8 | epoch & 0xFF


def spi_sender(value: int) -> tuple[int, int]:
    """(sender's host index, epoch mod 256) of an SPI."""
    return value >> 8, value & 0xFF


def generate_private_key(path: Path) -> bytes:
    """Create a new private key file (mode 0600, refuses to overwrite);
    returns the public key."""
    key = X25519PrivateKey.generate()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise FleetKeyError(f"private key {path}: cannot create: {e.strerror}") from None
    try:
        os.write(fd, key.private_bytes_raw())
        os.fsync(fd)
    finally:
        os.close(fd)
    return key.public_key().public_bytes_raw()


def load_private_key(path: Path) -> _datapath.Secret:
    """The private key file as a C-held Secret; FleetKeyError (or
    KeyMaterialError for permissions) when it is not 32 private bytes."""
    secret = read_secret(path, passphrase=False)
    if len(secret) != KEY_LEN:
        n = len(secret)
        secret.close()
        raise KeyMaterialError(f"private key {path}: {n} bytes, an X25519 key is {KEY_LEN}")
    return secret


def public_key(private_key: _datapath.Secret) -> bytes:
    return _datapath.x25519_public_key(private_key)


def derive(private_key: _datapath.Secret, peer_public: bytes, sender: str, receiver: str,
           epoch: int) -> _datapath.Secret:
    """The 36-byte key material of the SA from sender to receiver in epoch,
    in C. One of sender/receiver is this host, the other the peer."""
    info = sa_info(sender, receiver, epoch)
    try:
        return _datapath.derive_keymat(private_key, peer_public, HKDF_SALT, info)
    except (ValueError, _datapath.FrontendError):
        raise FleetKeyError(f"the public key of the SA {sender} -> {receiver} is unusable") from None
