"""Build the test guest: the host's Debian kernel plus a busybox initramfs.

`build_initramfs(cache_dir)` returns a `GuestImage` (kernel, initrd). The
initramfs holds busybox-static with its applet links, the kernel modules a
test needs (virtio-pci/blk/net, fw_cfg, ext4 for ext2, vfat; optionally
dm-crypt) in dependency order, optionally fio and cryptsetup with their
shared libraries, and `init.sh` as /init.

The archive is written by Python (cpio "newc", gzip'd), so device nodes need
no root, and it is cached in `cache_dir` under a hash of every input (kernel
version, module files, options, binaries, init script, this file): a repeat
run with the same inputs returns at once.
"""

from __future__ import annotations

import dataclasses
import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "BASE_MODULES",
    "CRYPT_MODULES",
    "GuestBuildError",
    "GuestImage",
    "build_initramfs",
    "find_kernel",
]

HERE = Path(__file__).resolve().parent
INIT_SCRIPT = HERE / "init.sh"
BUSYBOX = Path("/usr/bin/busybox")
FIO = Path("/usr/bin/fio")
CRYPTSETUP = Path("/usr/sbin/cryptsetup")

# Top-level modules; dependencies are added by `resolve_modules`.
BASE_MODULES = (
    "virtio_pci",
    "virtio_blk",
    "virtio_net",  # pulls failover, net_failover
    "qemu_fw_cfg",
    "crc32c_generic",  # ext4/jbd2 ask the crypto API for "crc32c" at mount
    "ext4",  # also serves ext2, which busybox mke2fs writes
    "vfat",
    "nls_cp437",  # vfat's default codepage (CONFIG_FAT_DEFAULT_CODEPAGE=437)
    "nls_ascii",  # vfat's default iocharset here: without it mount says EINVAL
    "nls_iso8859_1",
    "nls_utf8",
)
# dm-crypt with aes-xts-plain64: xts needs ecb (without it the table load fails
# with "reload ioctl ... No such file"); af_alg/algif_skcipher let cryptsetup
# check ciphers in the kernel. AES itself is built in (CONFIG_CRYPTO_AES=y).
CRYPT_MODULES = ("dm_mod", "dm_crypt", "ecb", "xts", "algif_skcipher", "algif_hash")

# libicudata is 31 MB of ICU tables that fio reaches only through
# libxml2 -> libicuuc and never uses; ship a stub that defines its one symbol.
ICUDATA_STUB_SOURCE = "const char {symbol}[16] __attribute__((aligned(16))) = {{0}};\n"

BUILD_FORMAT = 1  # bump to invalidate every cached image

# busybox udhcpc runs this on each lease event ($1: deconfig|bound|renew|nak).
# It configures the interface and records the lease in /tmp/dhcp-$interface
# so test scripts can print what the server handed out.
UDHCPC_SCRIPT = b"""#!/bin/sh
case "$1" in
deconfig)
    ip addr flush dev "$interface"
    ip link set "$interface" up
    ;;
bound|renew)
    ifconfig "$interface" "$ip" netmask "$subnet" up
    [ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
    if [ -n "$router" ]; then
        while route del default gw 0.0.0.0 dev "$interface" 2>/dev/null; do :; done
        for r in $router; do route add default gw "$r" dev "$interface"; break; done
    fi
    : > /etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
    echo "event=$1 ip=$ip subnet=$subnet router=$router mtu=$mtu dns=$dns lease=$lease serverid=$serverid" > "/tmp/dhcp-$interface"
    echo "DHCP-$1 $interface ip=$ip subnet=$subnet router=$router mtu=$mtu dns=$dns lease=$lease"
    ;;
nak)
    echo "DHCP-nak $interface $message"
    ;;
esac
exit 0
"""


class GuestBuildError(RuntimeError):
    """The guest image cannot be built on this host.

    Raised when the kernel, its modules, busybox-static, or a requested tool
    (fio, cryptsetup) is missing. The message names the Debian package to
    install; tests must fail on it, not skip.
    """


@dataclasses.dataclass(frozen=True)
class GuestImage:
    """A bootable guest: pass both files to QEMU's -kernel and -initrd."""

    kernel: Path
    initrd: Path
    kernel_version: str = ""
    modules: tuple[str, ...] = ()  # module names in load order
    fio: bool = False
    cryptsetup: bool = False


# --- kernel and modules -----------------------------------------------------


def _version_key(version: str) -> list[tuple[int, str]]:
    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"[.-]", version)]


def find_kernel(version: str | None = None) -> tuple[Path, str]:
    """Return (vmlinuz path, version) of an installed kernel with modules.

    Prefers `version`, then the running kernel's, then the newest
    /boot/vmlinuz-* that has /lib/modules/<version>. The running kernel is
    usually not a Debian one (containers, CI VMs), which is why this looks
    at /boot at all.
    """
    candidates = {}
    for vmlinuz in Path("/boot").glob("vmlinuz-*"):
        ver = vmlinuz.name.removeprefix("vmlinuz-")
        if (Path("/lib/modules") / ver / "modules.dep").exists() or (
            Path("/lib/modules") / ver / "kernel"
        ).is_dir():
            candidates[ver] = vmlinuz
    if version is not None:
        if version not in candidates:
            raise GuestBuildError(
                f"kernel {version!r} not found as /boot/vmlinuz-{version} with"
                f" /lib/modules/{version}; have {sorted(candidates)}"
            )
        return candidates[version], version
    if not candidates:
        raise GuestBuildError(
            "no /boot/vmlinuz-* with matching /lib/modules/<version>:"
            " apt-get install linux-image-amd64"
        )
    running = os.uname().release
    if running in candidates:
        return candidates[running], running
    newest = max(candidates, key=_version_key)
    return candidates[newest], newest


def _modinfo(kernel_version: str, module: str, field: str) -> str:
    try:
        proc = subprocess.run(
            ["modinfo", "-k", kernel_version, "-F", field, module],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        raise GuestBuildError("modinfo not found: apt-get install kmod") from None
    if proc.returncode != 0:
        raise GuestBuildError(
            f"modinfo {module} (kernel {kernel_version}): {proc.stderr.strip()}"
        )
    return proc.stdout


def _module_files(kernel_version: str, module: str) -> list[Path]:
    """Module name or alias -> .ko files (an alias may name several; builtin: none)."""
    out = _modinfo(kernel_version, module, "filename")
    files = []
    for line in out.splitlines():
        line = line.strip()
        if line and not line.startswith("(builtin)"):
            files.append(Path(line))
    return files


def _module_name(path: Path) -> str:
    name = path.name
    for suffix in (".xz", ".gz", ".zst"):
        name = name.removesuffix(suffix)
    return name.removesuffix(".ko").replace("-", "_")


@dataclasses.dataclass(frozen=True)
class _Module:
    name: str
    path: Path
    required: bool  # False: only a soft dependency; may fail to load quietly


def resolve_modules(kernel_version: str, wanted: Iterable[str]) -> list[_Module]:
    """Modules in load order: `modinfo -F depends`, recursively, then each module.

    Soft "pre:" dependencies (e.g. ext4's `crypto-crc32c`) are loaded first as
    optional: an alias may resolve to a module this CPU model cannot run
    (crc32c-intel needs SSE4.2; TCG's default CPU lacks it).
    """
    order: list[_Module] = []
    seen: dict[str, _Module] = {}

    def visit(path: Path, required: bool, stack: tuple[str, ...]) -> None:
        name = _module_name(path)
        if name in seen:
            if required and not seen[name].required:
                idx = order.index(seen[name])
                seen[name] = order[idx] = dataclasses.replace(seen[name], required=True)
            return
        if name in stack:
            raise GuestBuildError(f"module dependency cycle: {' -> '.join(stack + (name,))}")
        stack = stack + (name,)
        softdep = _modinfo(kernel_version, str(path), "softdep")
        for pre in re.findall(r"pre:\s*([^\n]*?)(?=\s+post:|$)", softdep, re.M):
            for alias in pre.split():
                for dep in _module_files(kernel_version, alias):
                    visit(dep, False, stack)
        for dep_name in filter(None, _modinfo(kernel_version, str(path), "depends").strip().split(",")):
            files = _module_files(kernel_version, dep_name)
            if not files:
                continue  # builtin
            visit(files[0], required, stack)
        module = _Module(name, path, required)
        seen[name] = module
        order.append(module)

    for want in wanted:
        files = _module_files(kernel_version, want)
        if not files:
            continue  # built into this kernel
        visit(files[0], True, ())
    return order


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".gz":
        return gzip.decompress(data)
    if path.suffix == ".zst":
        raise GuestBuildError(f"{path}: zstd-compressed modules are not supported")
    return data


# --- userspace binaries ---------------------------------------------------------


def _ldd_libraries(binary: Path) -> list[Path]:
    """Absolute paths (as the loader resolves them) of a binary's shared libraries."""
    proc = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise GuestBuildError(f"ldd {binary}: {proc.stderr.strip() or proc.stdout.strip()}")
    libs = []
    for line in proc.stdout.splitlines():
        line = line.strip()
        if "not found" in line:
            raise GuestBuildError(f"ldd {binary}: {line}")
        m = re.match(r"(?:\S+\s+=>\s+)?(/\S+)\s+\(0x", line)
        if m:
            libs.append(Path(m.group(1)))
    return libs


def _icudata_stub(lib: Path, workdir: Path) -> bytes | None:
    """A tiny stand-in for libicudata (None: keep the real one)."""
    if shutil.which("gcc") is None:
        return None
    nm = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True)
    symbols = [ln.split()[-1] for ln in nm.stdout.splitlines() if ln.split()[-1:] and "icudt" in ln]
    if nm.returncode != 0 or len(symbols) != 1:
        return None
    src = workdir / "icudata_stub.c"
    out = workdir / "icudata_stub.so"
    src.write_text(ICUDATA_STUB_SOURCE.format(symbol=symbols[0]))
    proc = subprocess.run(
        ["gcc", "-shared", "-fPIC", "-O2", f"-Wl,-soname,{lib.name}", "-o", str(out), str(src)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        return None
    return out.read_bytes()


# --- cpio newc writer -------------------------------------------------------------


class _Cpio:
    """A minimal cpio "newc" writer (what the kernel's initramfs unpacker reads)."""

    def __init__(self, out: io.BufferedIOBase) -> None:
        self._out = out
        self._ino = 1
        self._dirs: set[str] = set()
        self._names: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.strip("/")
        if name in self._names:
            return
        self._names.add(name)
        encoded = name.encode() + b"\0"
        fields = (
            self._ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data),
            0, 0, rdev[0], rdev[1], len(encoded), 0,
        )  # fmt: skip
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._out.write(header + encoded + b"\0" * (-(len(header) + len(encoded)) % 4))
        self._out.write(data + b"\0" * (-len(data) % 4))

    def mkdir(self, name: str) -> None:
        name = name.strip("/")
        if not name or name in self._dirs:
            return
        self.mkdir(os.path.dirname(name))
        self._dirs.add(name)
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.mkdir(os.path.dirname(name.strip("/")))
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self.mkdir(os.path.dirname(name.strip("/")))
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self.mkdir(os.path.dirname(name.strip("/")))
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def close(self) -> None:
        self._entry("TRAILER!!!", 0)


# --- the build ---------------------------------------------------------------------


def _file_fingerprint(path: Path) -> str:
    st = path.stat()
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def _require(path: Path, package: str) -> None:
    if not path.exists():
        raise GuestBuildError(f"{path} not found: apt-get install {package}")


def build_initramfs(
    cache_dir: Path,
    *,
    fio: bool = False,
    cryptsetup: bool = False,
    kernel_version: str | None = None,
    extra_modules: Iterable[str] = (),
) -> GuestImage:
    """Build (or reuse from `cache_dir`) the test initramfs; see the module doc.

    Raises GuestBuildError if a needed host file is missing.
    """
    kernel, kver = find_kernel(kernel_version)
    _require(BUSYBOX, "busybox-static")
    _require(INIT_SCRIPT, "(tests/guest/init.sh is part of the repository)")
    if fio:
        _require(FIO, "fio")
    if cryptsetup:
        _require(CRYPTSETUP, "cryptsetup-bin")

    wanted = list(BASE_MODULES) + list(CRYPT_MODULES if cryptsetup else ()) + list(extra_modules)
    modules = resolve_modules(kver, wanted)
    binaries = [p for p, on in ((FIO, fio), (CRYPTSETUP, cryptsetup)) if on]
    libraries: list[Path] = []
    for binary in binaries:
        for lib in _ldd_libraries(binary):
            if lib not in libraries:
                libraries.append(lib)

    key = hashlib.sha256()
    key.update(
        json.dumps(
            {
                "format": BUILD_FORMAT,
                "kernel": kver,
                "modules": [[m.name, _file_fingerprint(m.path), m.required] for m in modules],
                "fio": fio,
                "cryptsetup": cryptsetup,
                "busybox": _file_fingerprint(BUSYBOX),
                "binaries": [_file_fingerprint(p) for p in binaries + libraries],
            },
            sort_keys=True,
        ).encode()
    )
    key.update(INIT_SCRIPT.read_bytes())
    key.update(Path(__file__).read_bytes())
    digest = key.hexdigest()[:16]

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    initrd = cache_dir / f"initrd-{kver}-{digest}.cpio.gz"
    image = GuestImage(
        kernel=kernel,
        initrd=initrd,
        kernel_version=kver,
        modules=tuple(m.name for m in modules),
        fio=fio,
        cryptsetup=cryptsetup,
    )
    if initrd.exists():
        return image
    # Parallel test workers: one builds, the others wait and reuse.
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if initrd.exists():
            return image
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".build-") as tmp:
            tmp_path = Path(tmp)
            partial = tmp_path / initrd.name
            _write_initramfs(partial, kver, modules, binaries, libraries, tmp_path)
            (cache_dir / f"initrd-{kver}-{digest}.json").write_text(
                json.dumps(
                    {
                        "kernel": str(kernel),
                        "modules": [[m.name, str(m.path), m.required] for m in modules],
                        "binaries": [str(p) for p in binaries],
                        "libraries": [str(p) for p in libraries],
                    },
                    indent=1,
                )
            )
            os.replace(partial, initrd)
    return image


def _write_initramfs(
    dest: Path,
    kver: str,
    modules: list[_Module],
    binaries: list[Path],
    libraries: list[Path],
    workdir: Path,
) -> None:
    # Level 1: the big fio image compresses almost as well, builds 3x faster.
    with open(dest, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as gz:
        cpio = _Cpio(gz)
        for d in ("dev", "proc", "sys", "tmp", "run", "mnt", "root", "etc", "bin", "sbin", "usr/bin", "usr/sbin"):
            cpio.mkdir(d)
        # The kernel opens /dev/console for /init before devtmpfs is mounted.
        cpio.chardev("dev/console", 5, 1)
        cpio.chardev("dev/null", 1, 3, 0o666)
        cpio.symlink("etc/mtab", "/proc/mounts")
        cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        cpio.file("etc/group", b"root:x:0:\n")

        cpio.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
        applets = subprocess.run([str(BUSYBOX), "--list-full"], capture_output=True, text=True, check=True)
        for applet in applets.stdout.split():
            if applet.strip("/") != "bin/busybox":
                cpio.symlink(applet, "/bin/busybox")

        cpio.file("init", INIT_SCRIPT.read_bytes(), 0o755)
        cpio.file("usr/share/udhcpc/default.script", UDHCPC_SCRIPT, 0o755)
        lines = []
        for m in modules:
            inside = f"lib/modules/{kver}/{m.path.name.split('.ko')[0]}.ko"
            cpio.file(inside, _read_module(m.path))
            lines.append(f"{'req' if m.required else 'opt'} /{inside}\n")
        cpio.file("etc/nitro/modules", "".join(lines).encode())

        for binary in binaries:
            cpio.file(str(binary), binary.read_bytes(), 0o755)
        for lib in libraries:
            data = None
            if lib.name.startswith("libicudata."):
                data = _icudata_stub(lib, workdir)
            if data is None:
                data = lib.read_bytes()  # follows the soname symlink
            cpio.file(str(lib), data, 0o755)
        cpio.close()
