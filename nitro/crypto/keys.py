"""Key files and passphrase files, read straight into C-owned memory.

Both are used as a LUKS2 keyslot passphrase, as cryptsetup does:
- a key file (``key_file``, ``--key-file``) byte for byte, like
  ``cryptsetup --key-file``; so ``cryptsetup open --key-file K`` opens what
  ``nitro volume create --key-file K`` made, and the other way round;
- a passphrase file (``passphrase_file``) minus one trailing newline, so a
  passphrase written with ``echo`` is the one typed at a prompt.

A file others can read or write is refused: whoever can read it can decrypt
the volume, and whoever can write it can lock the owner out.
"""

from __future__ import annotations

import ctypes
import os
import stat
from pathlib import Path

from nitro import _datapath


class KeyMaterialError(Exception):
    """A key or passphrase file is unusable (missing, empty, too large,
    group/world permissions). Nothing was unlocked; fix the file."""


def read_key(*, key_file: Path | None, passphrase_file: Path | None) -> _datapath.Secret:
    """The one of the two that is given (config and CLI allow exactly one):
    a key file byte for byte, or a passphrase file minus its newline."""
    if key_file is not None:
        return read_secret(key_file, passphrase=False)
    if passphrase_file is not None:
        return read_secret(passphrase_file, passphrase=True)
    raise KeyMaterialError("no key file or passphrase file given")


def read_secret(path: Path, *, passphrase: bool) -> _datapath.Secret:
    """The contents of a key file (or passphrase file) as a Secret."""
    what = "passphrase file" if passphrase else "key file"
    try:
        # O_NONBLOCK: a FIFO (or a device) must not hang startup before
        # _check_private refuses it. Reads of a regular file never block.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise KeyMaterialError(f"{what} {path}: cannot open: {e.strerror}") from None
    try:
        _check_private(fd, path, what)
        secret = _datapath.Secret(_datapath.SECRET_MAX)
        try:
            secret.read_fd(fd, strip_newline=passphrase)
        except _datapath.FrontendError:
            secret.close()
            raise KeyMaterialError(
                f"{what} {path}: empty or larger than {_datapath.SECRET_MAX} bytes") from None
        except _datapath.HostError as e:
            secret.close()
            raise KeyMaterialError(f"{what} {path}: cannot read: {e.strerror}") from None
        return secret
    finally:
        os.close(fd)


def _check_private(fd: int, path: Path, what: str) -> None:
    st = os.fstat(fd)  # the file we read, not whatever the name points to later
    if not stat.S_ISREG(st.st_mode):
        raise KeyMaterialError(f"{what} {path}: not a regular file")
    if st.st_mode & 0o077:
        raise KeyMaterialError(
            f"{what} {path}: mode {stat.S_IMODE(st.st_mode):04o} gives group/others access; "
            f"run chmod 600 {path}")


_PR_SET_DUMPABLE = 4


def harden_process() -> bool:
    """Make this process non-dumpable once it holds a volume key: no core
    dumps, and other processes of the same user can no longer ptrace it or
    read /proc/<pid>/mem (root still can). True when it took effect."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
