"""Shared pytest fixtures.

Guest fixtures (used by tests/system):
  guest_cache_dir      where initramfs images are cached ($NITRO_GUEST_CACHE
                       or <repo>/build/guest)
  build_guest_image    factory: build_guest_image(fio=False, cryptsetup=False)
  guest_image          busybox + virtio/fw_cfg/ext4/vfat modules
  guest_image_fio      ... + fio
  guest_image_crypt    ... + cryptsetup and dm-crypt modules
  short_tmp_path       a short temporary directory for unix sockets
  qemu_storage_daemon  factory: start qemu-storage-daemon serving an image
                       over vhost-user-blk; stopped at teardown
  start_guest          factory: start_guest(image, script, **run_guest options)
                       -> a started GuestProcess, killed at teardown

Frontends:
  vublk                path of tools/bin/vublk (built with `make -C tools`)

Nothing here skips: a missing QEMU, kernel or busybox makes the test fail
with a message naming the package to install.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.proc import Child, Nitro
from tests.guest.build import GuestImage, build_initramfs
from tests.guest.qemu import GuestProcess

REPO = Path(__file__).resolve().parent.parent
QSD = "qemu-storage-daemon"
VUBLK = REPO / "tools" / "bin" / "vublk"


@pytest.fixture(scope="session")
def guest_cache_dir() -> Path:
    return Path(os.environ.get("NITRO_GUEST_CACHE", REPO / "build" / "guest"))


@pytest.fixture(scope="session")
def build_guest_image(guest_cache_dir: Path) -> Callable[..., GuestImage]:
    """Factory: build_guest_image(fio=False, cryptsetup=False) -> GuestImage (cached)."""
    built: dict[tuple[bool, bool], GuestImage] = {}

    def build(*, fio: bool = False, cryptsetup: bool = False) -> GuestImage:
        key = (fio, cryptsetup)
        if key not in built:
            built[key] = build_initramfs(guest_cache_dir, fio=fio, cryptsetup=cryptsetup)
        return built[key]

    return build


@pytest.fixture(scope="session")
def guest_image(build_guest_image: Callable[..., GuestImage]) -> GuestImage:
    return build_guest_image()


@pytest.fixture(scope="session")
def guest_image_fio(build_guest_image: Callable[..., GuestImage]) -> GuestImage:
    return build_guest_image(fio=True)


@pytest.fixture(scope="session")
def guest_image_crypt(build_guest_image: Callable[..., GuestImage]) -> GuestImage:
    return build_guest_image(cryptsetup=True)


@pytest.fixture
def short_tmp_path() -> Iterator[Path]:
    """A temporary directory with a short path: unix socket paths max out at 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="nitro-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class StorageDaemon(Child):
    """qemu-storage-daemon exporting one raw image as vhost-user-blk at
    `socket`; returns once the socket exists. Stop it with stop() (SIGTERM:
    a clean exit flushes the image)."""

    def __init__(self, image: Path, socket: Path, *, num_queues: int = 1, writable: bool = True,
                 startup_timeout: float = 10.0) -> None:
        if shutil.which(QSD) is None:
            raise RuntimeError(f"{QSD} not found: apt-get install qemu-system-x86 (or qemu-utils)")
        self.image, self.socket = image, socket
        self.num_queues, self.writable = num_queues, writable
        socket.unlink(missing_ok=True)
        argv = [
            QSD,
            "--blockdev", f"driver=file,node-name=file0,filename={image}",
            "--blockdev", "driver=raw,node-name=disk0,file=file0",
            "--export",
            "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
            f"addr.path={socket},writable={'on' if writable else 'off'},num-queues={num_queues}",
        ]  # fmt: skip
        super().__init__(argv, socket.with_name(socket.name + ".log"))
        try:
            self.wait_for(socket, startup_timeout)
        except BaseException:
            self.stop()
            raise


@pytest.fixture
def qemu_storage_daemon(short_tmp_path: Path) -> Iterator[Callable[..., StorageDaemon]]:
    """Factory: qemu_storage_daemon(image, num_queues=1, writable=True, socket=None) -> StorageDaemon.

    The reference vhost-user-blk backend. The socket defaults to a fresh path
    in `short_tmp_path`; every daemon started is stopped at teardown.
    """
    daemons: list[StorageDaemon] = []

    def start(
        image: Path | str,
        *,
        num_queues: int = 1,
        writable: bool = True,
        socket: Path | str | None = None,
    ) -> StorageDaemon:
        sock = Path(socket) if socket is not None else short_tmp_path / f"qsd{len(daemons)}.sock"
        daemon = StorageDaemon(Path(image), sock, num_queues=num_queues, writable=writable)
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        daemon.stop()


@pytest.fixture
def start_guest() -> Iterator[Callable[..., GuestProcess]]:
    """Factory: start_guest(image, script, **options) -> a started GuestProcess.

    Options are run_guest's (blk_sockets, net_sockets, plain_disk, cpus, ...)
    except timeout: bound each wait instead. Guests still running at teardown
    are killed, so a failing test leaves no QEMU behind.
    """
    guests: list[GuestProcess] = []

    def start(image: GuestImage, script: str, **options) -> GuestProcess:
        guest = GuestProcess(image, script, **options)
        guests.append(guest)
        return guest.start()

    yield start
    for guest in guests:
        guest.kill()


@pytest.fixture(scope="session")
def vublk() -> Path:
    """tools/bin/vublk, the userspace vhost-user-blk frontend, built if needed."""
    if shutil.which("cc") is None:
        pytest.fail("no C compiler (cc) on PATH: apt-get install gcc")
    r = subprocess.run(["make", "-C", str(REPO / "tools")], capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 0, f"make -C tools failed:\n{r.stdout}\n{r.stderr}"
    assert VUBLK.is_file() and os.access(VUBLK, os.X_OK), f"{VUBLK} was not built"
    return VUBLK


@pytest.fixture
def nitro(short_tmp_path: Path) -> Iterator[Callable[[str], Nitro]]:
    """Factory: nitro(config_toml) -> a running `nitro run` whose runtime and
    state directories are short_tmp_path; killed at teardown if still up."""
    started: list[Nitro] = []

    def start(config: str) -> Nitro:
        n = Nitro(short_tmp_path, config)
        started.append(n)
        return n

    yield start
    for n in started:
        n.kill()
