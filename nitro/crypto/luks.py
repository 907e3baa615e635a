"""LUKS2 headers and keyslots through libcryptsetup (cffi ABI mode).

nitro does not implement LUKS2: libcryptsetup formats, parses and checks the
header, runs the PBKDF and decrypts keyslots; nitro only takes the volume key
(into C memory, see nitro.crypto.keys) and the data segment's geometry, and
the C datapath does the per-sector AES-XTS. This module is the only one that
loads libcryptsetup.

Locking: libcryptsetup's own metadata locking flocks a regular-file image,
which would deadlock against the exclusive flock nitro holds on images it
serves (backends/raw.py), so it is turned off and callers hold nitro's flock
around every header change instead.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import threading
from pathlib import Path
from typing import Any, Final, Self

import cffi

from nitro import _datapath

LUKS2: Final = "LUKS2"
SUPPORTED_CIPHER: Final = ("aes", "xts-plain64")
SUPPORTED_SECTORS: Final = (512, 4096)
SUPPORTED_KEY_BYTES: Final = (32, 64)
PBKDFS: Final = ("argon2id", "argon2i", "pbkdf2")

_CDEF = """
struct crypt_device;
struct crypt_pbkdf_type {
    const char *type; const char *hash; uint32_t time_ms; uint32_t iterations;
    uint32_t max_memory_kb; uint32_t parallel_threads; uint32_t flags;
};
struct crypt_params_luks2 {
    const struct crypt_pbkdf_type *pbkdf; const char *integrity;
    const void *integrity_params; size_t data_alignment;
    const char *data_device; uint32_t sector_size; const char *label;
    const char *subsystem;
};
int crypt_init(struct crypt_device **cd, const char *device);
void crypt_free(struct crypt_device *cd);
void crypt_set_log_callback(struct crypt_device *cd,
    void (*log)(int level, const char *msg, void *usrptr), void *usrptr);
int crypt_metadata_locking(struct crypt_device *cd, int enable);
int crypt_load(struct crypt_device *cd, const char *requested_type, void *params);
const char *crypt_get_type(struct crypt_device *cd);
int crypt_format(struct crypt_device *cd, const char *type, const char *cipher,
    const char *cipher_mode, const char *uuid, const char *volume_key,
    size_t volume_key_size, void *params);
int crypt_set_pbkdf_type(struct crypt_device *cd, const struct crypt_pbkdf_type *pbkdf);
int crypt_keyslot_add_by_volume_key(struct crypt_device *cd, int keyslot,
    const char *volume_key, size_t volume_key_size,
    const char *passphrase, size_t passphrase_size);
int crypt_keyslot_add_by_passphrase(struct crypt_device *cd, int keyslot,
    const char *passphrase, size_t passphrase_size,
    const char *new_passphrase, size_t new_passphrase_size);
int crypt_activate_by_passphrase(struct crypt_device *cd, const char *name,
    int keyslot, const char *passphrase, size_t passphrase_size, uint32_t flags);
int crypt_volume_key_get(struct crypt_device *cd, int keyslot, char *volume_key,
    size_t *volume_key_size, const char *passphrase, size_t passphrase_size);
int crypt_keyslot_destroy(struct crypt_device *cd, int keyslot);
int crypt_keyslot_status(struct crypt_device *cd, int keyslot);
int crypt_keyslot_max(const char *type);
int crypt_keyslot_get_pbkdf(struct crypt_device *cd, int keyslot,
    struct crypt_pbkdf_type *pbkdf);
int crypt_dump_json(struct crypt_device *cd, const char **json, uint32_t flags);
const char *crypt_get_uuid(struct crypt_device *cd);
uint64_t crypt_get_data_offset(struct crypt_device *cd);
"""
_ANY_SLOT: Final = -1
_SLOT_ACTIVE: Final = (2, 3)  # CRYPT_SLOT_ACTIVE, CRYPT_SLOT_ACTIVE_LAST
_PBKDF_NO_BENCHMARK: Final = 1 << 1
_LOG_ERROR: Final = 1
_MAGIC: Final = b"LUKS\xba\xbe"  # the primary header's first bytes

ffi = cffi.FFI()
ffi.cdef(_CDEF)
_lib: Any = None
_lib_lock = threading.Lock()
_messages: list[str] = []  # libcryptsetup's error lines for the current call


class LuksError(Exception):
    """A LUKS2 operation failed. The message names the volume and what to
    do; it never contains key material."""


class NotLuksError(LuksError):
    """No LUKS header: libcryptsetup cannot load one and the file does not
    start with the LUKS magic (a file that does is a damaged volume, and
    loading it raises a plain LuksError)."""


class WrongKeyError(LuksError):
    """No keyslot opens with the given key file or passphrase."""


class UnsupportedVolumeError(LuksError):
    """A valid LUKS volume nitro cannot serve (cipher, sector size, LUKS1,
    integrity, detached header, more than one segment)."""


@dataclasses.dataclass(frozen=True)
class Keyslot:
    slot: int
    pbkdf: str


@dataclasses.dataclass(frozen=True)
class LuksInfo:
    """What the header says; no key material."""
    uuid: str
    cipher: str               # e.g. "aes-xts-plain64"
    key_bits: int
    sector_size: int
    data_offset: int          # bytes
    data_size: int | None     # bytes; None: to the end of the file ("dynamic")
    iv_tweak: int
    keyslots: tuple[Keyslot, ...]


@dataclasses.dataclass(frozen=True)
class Pbkdf:
    """Keyslot protection. Defaults follow cryptsetup: argon2id, 2 s.
    ``iterations`` forces the cost (no benchmark), as cryptsetup's
    --pbkdf-force-iterations; ``memory_kb`` caps argon2's memory."""
    kind: str = "argon2id"
    time_ms: int = 2000
    iterations: int | None = None
    memory_kb: int | None = None


def _load_lib() -> Any:
    global _lib
    with _lib_lock:
        if _lib is None:
            try:
                lib = ffi.dlopen("libcryptsetup.so.12")
            except OSError as e:
                raise LuksError(f"cannot load libcryptsetup.so.12 "
                                f"(apt-get install libcryptsetup12): {e}") from None
            lib.crypt_set_log_callback(ffi.NULL, _log_callback, ffi.NULL)
            lib.crypt_metadata_locking(ffi.NULL, 0)
            _lib = lib
    return _lib


@ffi.callback("void(int, const char *, void *)")
def _log_callback(level: int, msg: Any, _usr: Any) -> None:
    # Keep libcryptsetup quiet on stderr; its errors become our messages.
    if level == _LOG_ERROR and msg != ffi.NULL:
        _messages.append(ffi.string(msg).decode(errors="replace").strip())


def _why(rc: int) -> str:
    detail = "; ".join(m for m in _messages if m)
    return detail or errno.errorcode.get(-rc, f"error {rc}")


class _Device:
    """A crypt_device handle on one image; ``with`` frees it. Messages
    name the volume `name` (default: the path; a remote volume's metadata
    is a local copy named by its source)."""

    def __init__(self, path: Path, name: str | None = None) -> None:
        self.path = path
        self.name = name or str(path)
        self.lib = _load_lib()
        _messages.clear()
        pp = ffi.new("struct crypt_device **")
        rc = self.lib.crypt_init(pp, str(path).encode())
        if rc < 0:
            raise LuksError(f"{self.name}: cannot open: {_why(rc)}")
        self.cd = pp[0]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.lib.crypt_free(self.cd)

    def check(self, rc: int, what: str) -> int:
        if rc < 0:
            raise LuksError(f"{self.name}: {what}: {_why(rc)}")
        return rc

    def check_key(self, rc: int, what: str, whose: str = "this") -> int:
        """check() for calls that try a passphrase: none opening any keyslot
        (EPERM, or ENOENT when no keyslot is left) is a WrongKeyError."""
        if rc in (-errno.EPERM, -errno.ENOENT):
            raise WrongKeyError(f"{self.name}: no keyslot opens with {whose} key or passphrase")
        return self.check(rc, what)

    def load(self) -> None:
        rc = self.lib.crypt_load(self.cd, ffi.NULL, ffi.NULL)
        if rc < 0:
            damaged = _starts_with_magic(self.path)
            raise (LuksError if damaged else NotLuksError)(
                f"{self.name}: not a LUKS volume, or its header is corrupt or truncated "
                f"({_why(rc)})")
        kind = ffi.string(self.lib.crypt_get_type(self.cd)).decode()
        if kind != LUKS2:
            raise UnsupportedVolumeError(f"{self.name}: {kind} volume; nitro serves LUKS2 only "
                                         "(cryptsetup convert --type luks2)")


def _starts_with_magic(path: Path) -> bool:
    """Does the file begin as a LUKS header does ("LUKS\\xba\\xbe")?"""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return os.pread(fd, len(_MAGIC), 0) == _MAGIC
    except OSError:
        return False
    finally:
        os.close(fd)


def _secret_arg(s: _datapath.Secret) -> tuple[Any, int]:
    return ffi.cast("const char *", s.address), len(s)


def _pbkdf_struct(p: Pbkdf) -> Any:
    if p.kind not in PBKDFS:
        raise LuksError(f"unknown PBKDF {p.kind!r} (expected one of {', '.join(PBKDFS)})")
    keep = {"type": ffi.new("char[]", p.kind.encode()), "hash": ffi.new("char[]", b"sha256")}
    t = ffi.new("struct crypt_pbkdf_type *", {
        "type": keep["type"], "hash": keep["hash"], "time_ms": p.time_ms,
        "iterations": p.iterations or 0,
        "max_memory_kb": 0 if p.kind == "pbkdf2" else (p.memory_kb or 1048576),
        "parallel_threads": 0 if p.kind == "pbkdf2" else 4,
        "flags": _PBKDF_NO_BENCHMARK if p.iterations else 0,
    })
    return t, keep


# ---- reading -----------------------------------------------------------------

def read_info(path: Path, *, name: str | None = None) -> LuksInfo:
    """Load and describe the header; LuksError if it is not LUKS2.
    `name`: what messages call the volume (default: the path)."""
    with _Device(path, name) as dev:
        dev.load()
        return _info(dev)


def _info(dev: _Device) -> LuksInfo:
    out = ffi.new("const char **")
    dev.check(dev.lib.crypt_dump_json(dev.cd, out, 0), "reading the header")
    meta = json.loads(ffi.string(out[0]).decode())
    segs = meta.get("segments", {})
    if len(segs) != 1 or "0" not in segs or segs["0"].get("type") != "crypt":
        raise UnsupportedVolumeError(
            f"{dev.name}: {len(segs)} segments (reencryption in progress?); nitro serves one crypt segment")
    seg = segs["0"]
    if seg.get("integrity"):
        raise UnsupportedVolumeError(f"{dev.name}: dm-integrity volumes are not supported")
    slots = []
    for k, ks in sorted(meta.get("keyslots", {}).items(), key=lambda kv: int(kv[0])):
        slots.append(Keyslot(int(k), ks.get("kdf", {}).get("type", "?")))
    size = seg.get("size", "dynamic")
    # Every keyslot holds the volume key, so its key_size is the key's.
    key_bits = max((int(ks.get("key_size", 0)) * 8 for ks in meta.get("keyslots", {}).values()),
                   default=0)
    return LuksInfo(
        uuid=ffi.string(dev.lib.crypt_get_uuid(dev.cd)).decode(),
        cipher=seg.get("encryption", "?"),
        key_bits=key_bits,
        sector_size=int(seg.get("sector_size", 512)),
        data_offset=int(seg["offset"]),
        data_size=None if size == "dynamic" else int(size),
        iv_tweak=int(seg.get("iv_tweak", "0")),
        keyslots=tuple(slots))


def check_servable(path: Path | str, info: LuksInfo) -> None:
    """UnsupportedVolumeError unless the C datapath can serve this segment.
    From the header alone: callers check before running a keyslot's PBKDF."""
    if info.cipher != "-".join(SUPPORTED_CIPHER):
        raise UnsupportedVolumeError(f"{path}: cipher {info.cipher} is not supported "
                                     "(nitro serves aes-xts-plain64)")
    if info.sector_size not in SUPPORTED_SECTORS:
        raise UnsupportedVolumeError(f"{path}: encryption sector size {info.sector_size} "
                                     "is not supported (512 or 4096)")
    # key_bits is 0 with no keyslot left: then nothing unlocks it anyway.
    if info.key_bits and info.key_bits // 8 not in SUPPORTED_KEY_BYTES:
        raise UnsupportedVolumeError(f"{path}: {info.key_bits}-bit XTS key is not supported "
                                     "(256 or 512)")


def unlock(path: Path, passphrase: _datapath.Secret, *,
           name: str | None = None) -> tuple[LuksInfo, _datapath.Secret]:
    """The header and the volume key (a Secret the caller must close).
    UnsupportedVolumeError, before any PBKDF runs, when the header names a
    cipher, sector size or key size nitro cannot serve; WrongKeyError when
    no keyslot opens with this passphrase. Messages name `name` (default
    the path)."""
    with _Device(path, name) as dev:
        dev.load()
        info = _info(dev)
        check_servable(dev.name, info)
        vk = _datapath.Secret(64)
        try:
            size = ffi.new("size_t *", vk.capacity)
            pw, pwlen = _secret_arg(passphrase)
            dev.check_key(dev.lib.crypt_volume_key_get(
                dev.cd, _ANY_SLOT, ffi.cast("char *", vk.address), size, pw, pwlen), "unlocking")
            vk.set_len(int(size[0]))
        except BaseException:
            vk.close()
            raise
        return info, vk


def matching_slot(path: Path, passphrase: _datapath.Secret) -> int:
    """The keyslot this passphrase opens (nothing is activated)."""
    with _Device(path) as dev:
        dev.load()
        return _matching_slot(dev, passphrase)


def _matching_slot(dev: _Device, passphrase: _datapath.Secret) -> int:
    pw, pwlen = _secret_arg(passphrase)
    # A NULL name only checks the passphrase and returns the slot.
    return dev.check_key(
        dev.lib.crypt_activate_by_passphrase(dev.cd, ffi.NULL, _ANY_SLOT, pw, pwlen, 0),
        "checking the passphrase")


# ---- changing (callers hold the image's exclusive flock) -------------------

def format_volume(path: Path, passphrase: _datapath.Secret, *, key_bits: int = 512,
                  sector_size: int = 512, pbkdf: Pbkdf = Pbkdf(),
                  name: str | None = None) -> LuksInfo:
    """Write a LUKS2 header (aes-xts-plain64, a random volume key) on an
    existing file and protect the key with one keyslot."""
    if key_bits // 8 not in SUPPORTED_KEY_BYTES:
        raise LuksError(f"--key-size must be 256 or 512, got {key_bits}")
    if sector_size not in SUPPORTED_SECTORS:
        raise LuksError(f"--sector-size must be 512 or 4096, got {sector_size}")
    with _Device(path, name) as dev:
        pb, _keep = _pbkdf_struct(pbkdf)
        params = ffi.new("struct crypt_params_luks2 *", {"pbkdf": pb, "sector_size": sector_size})
        dev.check(dev.lib.crypt_format(dev.cd, LUKS2.encode(), b"aes", b"xts-plain64", ffi.NULL,
                                       ffi.NULL, key_bits // 8, params), "formatting")
        pw, pwlen = _secret_arg(passphrase)
        dev.check(dev.lib.crypt_keyslot_add_by_volume_key(dev.cd, _ANY_SLOT, ffi.NULL, 0, pw, pwlen),
                  "adding the first keyslot")
        return _info(dev)


def add_key(path: Path, existing: _datapath.Secret, new: _datapath.Secret,
            pbkdf: Pbkdf = Pbkdf(), *, name: str | None = None) -> int:
    """Add a keyslot for `new`, proving access with `existing`; its number."""
    with _Device(path, name) as dev:
        dev.load()
        pb, _keep = _pbkdf_struct(pbkdf)
        dev.check(dev.lib.crypt_set_pbkdf_type(dev.cd, pb), "setting the PBKDF")
        old, oldlen = _secret_arg(existing)
        nw, nwlen = _secret_arg(new)
        return dev.check_key(
            dev.lib.crypt_keyslot_add_by_passphrase(dev.cd, _ANY_SLOT, old, oldlen, nw, nwlen),
            "adding a keyslot", whose="the existing")


def remove_key(path: Path, key: _datapath.Secret, *, name: str | None = None) -> int:
    """Destroy the keyslot `key` opens; refuses to remove the last one
    (that is `erase`). Returns the slot number."""
    with _Device(path, name) as dev:
        dev.load()
        slot = _matching_slot(dev, key)
        if len(_active_slots(dev)) <= 1:
            raise LuksError(f"{dev.name}: keyslot {slot} is the last one; removing it would make the "
                            "volume unreadable (use `nitro volume erase` for that)")
        dev.check(dev.lib.crypt_keyslot_destroy(dev.cd, slot), f"destroying keyslot {slot}")
        return slot


def destroy_all_keyslots(path: Path, *, name: str | None = None) -> list[int]:
    """Crypto-erase: wipe every keyslot, so the volume key (and with it the
    data) is gone for good. Returns the slots destroyed."""
    with _Device(path, name) as dev:
        dev.load()
        slots = _active_slots(dev)
        for slot in slots:
            dev.check(dev.lib.crypt_keyslot_destroy(dev.cd, slot), f"destroying keyslot {slot}")
        return slots


def _active_slots(dev: _Device) -> list[int]:
    n = dev.lib.crypt_keyslot_max(LUKS2.encode())
    return [s for s in range(n) if dev.lib.crypt_keyslot_status(dev.cd, s) in _SLOT_ACTIVE]
