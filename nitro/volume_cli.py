"""`nitro volume ...`: create and manage volumes (image files) offline.

Encrypted volumes are LUKS2 (docs/encryption.md): `create --encrypt`,
`info`, `add-key`, `remove-key`, `erase`. Commands that change a header
take the image's exclusive flock, the one a serving daemon holds, so they
refuse while the volume is attached. Nothing here prints key material.

Every action also takes a remote volume (an NBD export or an RBD image,
named as a [[blk]] `source`; docs/volumes.md "Encrypted remote volumes"):
`create --encrypt` formats one, so the server only ever holds ciphertext,
and the key actions change a copy of its metadata and write back what
changed (backends/luks.py change_remote). An RBD image is opened with its
exclusive lock, so they refuse while a daemon has it attached.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from nitro import config

T = TypeVar("T")

# Exit statuses of every `nitro` command (nitro/cli.py uses these too).
EXIT_USAGE = 2
EXIT_FAILURE = 1


class CliError(Exception):
    """A failure reported as one line; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


def add_parser(sub):
    """The `volume` command and its offline actions; returns its
    subparsers (cli.py adds `qos`, which talks to the daemon)."""
    vol = sub.add_parser("volume", help="create and manage volumes")
    vsub = vol.add_subparsers(metavar="ACTION")

    create = vsub.add_parser("create", help="create a volume (sparse raw, or LUKS2 with --encrypt)")
    create.add_argument("path", help="an image file, or with --encrypt a remote source: "
                                     "nbd://HOST[:PORT]/EXPORT, nbds://..., rbd:POOL/IMAGE")
    create.add_argument("--size", help="guest-visible size, e.g. 10G (an image file's)")
    create.add_argument("--encrypt", action="store_true", help="LUKS2, aes-xts-plain64")
    _key_args(create, required=False)
    create.add_argument("--key-size", type=int, choices=[256, 512], default=512,
                        help="XTS volume key bits (default 512: AES-256-XTS)")
    create.add_argument("--sector-size", type=int, choices=[512, 4096], default=512,
                        help="encryption sector = the guest's logical block size (default 512)")
    _pbkdf_args(create)
    _remote_args(create)
    create.set_defaults(func=cmd_create)

    info = vsub.add_parser("info", help="describe a volume (no key material)")
    _volume_arg(info)
    _remote_args(info)
    info.set_defaults(func=cmd_info)

    add = vsub.add_parser("add-key", help="add a keyslot to an encrypted volume")
    _volume_arg(add)
    _key_args(add, required=True)
    new = add.add_mutually_exclusive_group(required=True)
    new.add_argument("--new-key-file", type=Path)
    new.add_argument("--new-passphrase-file", type=Path)
    _pbkdf_args(add)
    _remote_args(add)
    add.set_defaults(func=cmd_add_key)

    rm = vsub.add_parser("remove-key", help="remove the keyslot a key opens (not the last)")
    _volume_arg(rm)
    _key_args(rm, required=True)
    _remote_args(rm)
    rm.set_defaults(func=cmd_remove_key)

    erase = vsub.add_parser("erase", help="crypto-erase: destroy every keyslot (irreversible)")
    _volume_arg(erase)
    erase.add_argument("--yes", action="store_true", help="confirm: the data becomes unrecoverable")
    _remote_args(erase)
    erase.set_defaults(func=cmd_erase)
    return vsub


def _volume_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="an image file, or a remote source: nbd://HOST[:PORT]/EXPORT, "
                                "nbds://..., rbd:POOL/IMAGE")


def _remote_args(p: argparse.ArgumentParser) -> None:
    remote = p.add_argument_group("remote sources (the [[blk]] keys of the same names)")
    for key in _REMOTE_OPTIONS:
        remote.add_argument("--" + key.replace("_", "-"), dest=key, metavar="VALUE")


def _key_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--key-file", type=Path, help="used byte for byte (cryptsetup --key-file)")
    g.add_argument("--passphrase-file", type=Path, help="one trailing newline dropped")


def _pbkdf_args(p: argparse.ArgumentParser) -> None:
    from nitro.crypto.luks import PBKDFS

    p.add_argument("--pbkdf", choices=PBKDFS, default=PBKDFS[0])
    p.add_argument("--iter-time", type=int, default=2000, metavar="MS",
                   help="PBKDF time cost to benchmark for (default 2000 ms)")
    p.add_argument("--pbkdf-force-iterations", type=int, metavar="N",
                   help="fixed iterations instead of benchmarking (tests)")
    p.add_argument("--pbkdf-memory", type=int, metavar="KB", help="argon2 memory cost cap")


def _fail(msg: str, code: int) -> int:
    print(f"nitro: error: {msg}", file=sys.stderr)
    return code


def _run(fn, args: argparse.Namespace) -> int:
    """Run one command; every expected failure is one line and an exit code."""
    from nitro.crypto import keys, luks
    from nitro.devices.blk.backends.raw import VolumeError

    try:
        return fn(args)
    except CliError as e:
        return _fail(str(e), e.code)
    except (VolumeError, luks.LuksError, keys.KeyMaterialError) as e:
        return _fail(str(e), EXIT_FAILURE)


# ---- create ------------------------------------------------------------------

_REMOTE_PREFIXES = ("nbd://", "nbds://", "rbd:")
_REMOTE_OPTIONS = ("tls_psk_file", "tls_username", "tls_certificates",
                   "ceph_conf", "user", "keyring")

def cmd_create(args: argparse.Namespace) -> int:
    return _run(_create, args)


def _create(args: argparse.Namespace) -> int:
    from nitro.devices.blk.backends.raw import create_sparse

    src = _remote_source(args)
    if src is not None:
        return _create_remote(args, src)
    if args.size is None:
        raise CliError("--size is required for an image file", EXIT_USAGE)
    try:
        size = config.parse_size(args.size, "<command line>", "--size")
    except config.ConfigError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    args.path = Path(args.path)
    if args.path.exists():
        raise CliError(f"{args.path}: already exists; refusing to overwrite")
    if not args.encrypt:
        if args.key_file or args.passphrase_file:
            raise CliError("--key-file/--passphrase-file need --encrypt", EXIT_USAGE)
        create_sparse(args.path, size)
        print(f"created {args.path} ({size} bytes, sparse raw)")
        return 0
    if not (args.key_file or args.passphrase_file):
        raise CliError("--encrypt needs --key-file or --passphrase-file", EXIT_USAGE)
    if size % args.sector_size:
        raise CliError(f"--size must be a multiple of --sector-size {args.sector_size}", EXIT_USAGE)
    info = _create_encrypted(args, size)
    print(f"created {args.path} ({size} bytes of data, {_describe(info)})")
    return 0


def _describe(info) -> str:
    return (f"LUKS2 {info.cipher}, {info.key_bits}-bit key, {info.sector_size}-byte sectors, "
            f"data at {info.data_offset}, keyslot {info.keyslots[0].slot}: {info.keyslots[0].pbkdf}")


def _remote_source(args: argparse.Namespace):
    """The NbdSource or RbdSource `path` names with the remote options;
    None for an image file (`args.path` is then a Path)."""
    if not args.path.lower().startswith(_REMOTE_PREFIXES):
        given = [k for k in _REMOTE_OPTIONS if getattr(args, k) is not None]
        if given:
            raise CliError(f"--{given[0].replace('_', '-')} needs a remote source", EXIT_USAGE)
        args.path = Path(args.path)
        return None
    values = {"source": args.path, **{k: getattr(args, k) for k in _REMOTE_OPTIONS
                                      if getattr(args, k) is not None}}
    try:
        return config.parse_remote_source(values, "<command line>", Path.cwd())
    except config.ConfigError as e:
        raise CliError(str(e), EXIT_USAGE) from None


# How long a command waits for a remote volume to open (librbd waits for
# an OSD that is away without bound; Ctrl-C works meanwhile too).
_OPEN_TIMEOUT = 30.0


@contextlib.contextmanager
def _remote(src, *, readonly: bool = False):
    """The remote volume, connected (an RBD image with its exclusive lock
    unless `readonly`), closed on exit; CliError if it does not open
    within _OPEN_TIMEOUT."""
    from nitro.devices.blk import open_remote
    from nitro.devices.blk.opening import Opening

    opening = Opening(lambda: open_remote(src, readonly=readonly), str(src))
    volume = opening.wait(_OPEN_TIMEOUT)
    if volume is None:
        opening.leave()
        raise CliError(f"{src}: no answer within {_OPEN_TIMEOUT:.0f} s (is the storage up?)")
    try:
        yield volume
    finally:
        volume.close()


def _create_remote(args: argparse.Namespace, src) -> int:
    """LUKS2 on an existing NBD export or RBD image (its size is its own)."""
    from nitro.devices.blk.backends.luks import format_remote

    if not args.encrypt:
        raise CliError(f"{args.path}: a remote volume is created on its server (nbdkit, "
                       "qemu-nbd, `rbd create`); `nitro volume create --encrypt` formats one",
                       EXIT_USAGE)
    if args.size is not None:
        raise CliError("--size is an image file's: a remote volume's size is its own", EXIT_USAGE)
    if not (args.key_file or args.passphrase_file):
        raise CliError("--encrypt needs --key-file or --passphrase-file", EXIT_USAGE)
    # An RBD image's exclusive lock: not while attached.
    with _read_key(args.key_file, args.passphrase_file) as secret, _remote(src) as volume:
        info = format_remote(volume, secret, key_bits=args.key_size,
                             sector_size=args.sector_size, pbkdf=_pbkdf(args))
        data = volume.size - info.data_offset
    print(f"formatted {src} ({data} bytes of data, {_describe(info)})")
    return 0


# libcryptsetup's default LUKS2 data offset: the header and keyslot areas.
_HEADER_ROOM = 16 << 20


def _create_encrypted(args: argparse.Namespace, size: int):
    from nitro.crypto import luks

    with _read_key(args.key_file, args.passphrase_file) as secret:
        args.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(args.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise CliError(f"{args.path}: cannot create: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, _HEADER_ROOM + size)  # sparse; room for the header first
            info = luks.format_volume(args.path, secret, key_bits=args.key_size,
                                      sector_size=args.sector_size, pbkdf=_pbkdf(args))
            os.ftruncate(fd, info.data_offset + size)
            os.fsync(fd)
            return info
        except BaseException:
            os.unlink(args.path)  # a half-made volume is worse than none
            raise
        finally:
            os.close(fd)


def _pbkdf(args: argparse.Namespace):
    from nitro.crypto import luks

    return luks.Pbkdf(kind=args.pbkdf, time_ms=args.iter_time,
                      iterations=args.pbkdf_force_iterations, memory_kb=args.pbkdf_memory)


def _read_key(key_file: Path | None, passphrase_file: Path | None):
    from nitro.crypto import keys

    return keys.read_key(key_file=key_file, passphrase_file=passphrase_file)


# ---- locking -------------------------------------------------------------------

@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold the image's exclusive flock (RawImage's): a serving daemon holds it too."""
    from nitro.devices.blk.backends.raw import RawImage, VolumeError, VolumeLockedError

    try:
        image = RawImage.locked(path, readonly=False)
    except VolumeLockedError:
        raise CliError(f"{path}: attached to a running nitro (the image is locked); "
                       "stop that device first") from None
    except VolumeError as e:
        raise CliError(str(e)) from None
    try:
        yield
    finally:
        image.close()


def _attached(path: Path) -> str:
    """yes (another process holds the lock), no, or why we cannot tell."""
    from nitro.devices.blk.backends.raw import RawImage, VolumeError, VolumeLockedError

    try:
        RawImage.locked(path, readonly=False).close()
    except VolumeLockedError:
        return "yes"
    except VolumeError as e:
        return f"unknown ({e})"
    return "no"


# ---- info, keys, erase -----------------------------------------------------------

def cmd_info(args: argparse.Namespace) -> int:
    return _run(_info, args)


def _info(args: argparse.Namespace) -> int:
    from nitro.crypto import luks

    src = _remote_source(args)
    if src is not None:
        return _remote_info(src)
    if not args.path.exists():
        raise CliError(f"{args.path}: no such volume")
    file_size = args.path.stat().st_size
    attached = _attached(args.path)
    try:
        info = luks.read_info(args.path)
    except luks.NotLuksError:
        print(f"{args.path}: raw, {file_size} bytes, attached: {attached}")
        return 0
    _print_info(args.path, info, file_size, f"\n  attached:    {attached}")
    return 0


def _remote_info(src) -> int:
    """A remote volume's header, read without its lock (RBD read-only): an
    attached volume can be described too."""
    from nitro.crypto import luks
    from nitro.devices.blk.backends.luks import remote_info

    with _remote(src, readonly=True) as volume:
        try:
            info = remote_info(volume)
        except luks.NotLuksError:
            print(f"{src}: raw, {volume.size} bytes")
            return 0
        _print_info(src, info, volume.size, "")
    return 0


def _print_info(name, info, total: int, tail: str) -> None:
    data = info.data_size if info.data_size is not None else total - info.data_offset
    slots = ", ".join(f"{k.slot} ({k.pbkdf})" for k in info.keyslots) or "none (erased)"
    print(f"{name}: LUKS2\n"
          f"  uuid:        {info.uuid}\n"
          f"  cipher:      {info.cipher}, {info.key_bits}-bit key\n"
          f"  sector size: {info.sector_size}\n"
          f"  data:        {data} bytes at offset {info.data_offset}\n"
          f"  keyslots:    {slots}{tail}")


def cmd_add_key(args: argparse.Namespace) -> int:
    return _run(_add_key, args)


def _add_key(args: argparse.Namespace) -> int:
    from nitro.crypto import luks

    with (_header_change(args) as change,
          _read_key(args.key_file, args.passphrase_file) as old,
          _read_key(args.new_key_file, args.new_passphrase_file) as new):
        slot = change(lambda path, name: luks.add_key(path, old, new, _pbkdf(args), name=name))
    print(f"{args.path}: added keyslot {slot}")
    return 0


@contextlib.contextmanager
def _header_change(args: argparse.Namespace) -> Iterator[Callable[[Callable[[Path, str], T]], T]]:
    """How to run a header change on the volume `args.path` names: on an
    image file, in place under its exclusive flock; on a remote volume,
    on a copy of its metadata written back after (an RBD image under its
    exclusive lock: refused while a daemon has it attached)."""
    from nitro.devices.blk.backends.luks import change_remote

    src = _remote_source(args)
    if src is None:
        with _exclusive(args.path):
            yield lambda fn: fn(args.path, str(args.path))
        return
    with _remote(src) as volume:
        yield lambda fn: change_remote(volume, fn)


def cmd_remove_key(args: argparse.Namespace) -> int:
    return _run(_remove_key, args)


def _remove_key(args: argparse.Namespace) -> int:
    from nitro.crypto import luks

    with _header_change(args) as change, _read_key(args.key_file, args.passphrase_file) as key:
        slot = change(lambda path, name: luks.remove_key(path, key, name=name))
    print(f"{args.path}: removed keyslot {slot}")
    return 0


def cmd_erase(args: argparse.Namespace) -> int:
    return _run(_erase, args)


def _erase(args: argparse.Namespace) -> int:
    from nitro.crypto import luks

    if not args.yes:
        raise CliError(f"{args.path}: erase destroys every keyslot and the data with them; "
                       "pass --yes to confirm", EXIT_USAGE)
    with _header_change(args) as change:
        slots = change(lambda path, name: luks.destroy_all_keyslots(path, name=name))
    print(f"{args.path}: destroyed keyslots {', '.join(map(str, slots)) or '(none left)'}; "
          "the data can no longer be decrypted")
    return 0
