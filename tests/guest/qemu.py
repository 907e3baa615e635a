"""Boot the test guest under QEMU (TCG) and collect its serial console.

`run_guest(image, script, ...)` boots, runs `script` (sh) in the guest and
returns a `GuestResult` once the guest powers off or `timeout` passes; it
never hangs. `GuestProcess` is the same boot, started in the background, for
tests that act while the guest runs (restart a backend, wait for a marker
the script prints): `output()`, `wait_for()`, `wait()`, `kill()`, and
trio-friendly `wait_for_async()` / `wait_async()`.

Devices are attached in this order, which is also the guest's naming order
(PCI slot order = probe order): every `blk_sockets` entry (vda, vdb, ...),
then `plain_disks` (the next vdX), then every `net_sockets` entry (eth0, ...).
Each vhost-user chardev uses `reconnect=1`, so QEMU survives a backend
restart and reconnects within a second.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from .build import GuestImage

__all__ = [
    "EXIT_MARKER",
    "START_MARKER",
    "GuestError",
    "GuestProcess",
    "GuestResult",
    "GuestTimeout",
    "mac_address",
    "qemu_command",
    "run_guest",
]

QEMU = "qemu-system-x86_64"
QBOOT = Path("/usr/share/qemu/qboot.rom")
KERNEL_CMDLINE = "console=ttyS0 panic=-1 quiet"
START_MARKER = "NITRO-GUEST-START"
EXIT_MARKER = "NITRO-GUEST-EXIT="
_EXIT_RE = re.compile(rf"^{EXIT_MARKER}(\d+)\s*$", re.M)
_POLL_S = 0.05


class GuestError(RuntimeError):
    """QEMU cannot be started (not installed, bad arguments): fail the test."""


class GuestTimeout(TimeoutError):
    """`wait_for` did not see its pattern in time; `.output` has the console."""

    def __init__(self, message: str, output: str) -> None:
        super().__init__(message)
        self.output = output


@dataclasses.dataclass(frozen=True)
class GuestResult:
    """What one boot produced.

    returncode: the script's exit status, None if the guest never reported it
        (timeout, crash, kernel panic).
    output: the whole serial console (kernel messages and the script's output).
    qemu_exit: QEMU's exit status (negative: killed by that signal, e.g. -9
        after a timeout).
    timed_out: QEMU was killed (timeout, or `GuestProcess.kill()`) before the
        guest powered off.
    duration: seconds from QEMU's start to its exit.
    qemu_stderr: QEMU's own stdout+stderr (vhost-user errors land here).
    """

    returncode: int | None
    output: str
    qemu_exit: int
    timed_out: bool = False
    duration: float = 0.0
    qemu_stderr: str = ""

    @property
    def script_output(self) -> str:
        """The console between the start and exit markers (the script's part)."""
        _, sep, rest = self.output.partition(START_MARKER + "\n")
        if not sep:
            return ""
        return rest.rsplit(EXIT_MARKER, 1)[0]

    def describe(self) -> str:
        """A multi-line summary for assertion messages."""
        return (
            f"returncode={self.returncode} qemu_exit={self.qemu_exit}"
            f" timed_out={self.timed_out} duration={self.duration:.1f}s\n"
            f"--- serial console ---\n{self.output}\n"
            f"--- qemu stderr ---\n{self.qemu_stderr}"
        )


def mac_address(index: int) -> str:
    """The MAC the harness gives the guest NIC number `index` (eth<index>)."""
    return f"52:54:00:12:34:{0x56 + index:02x}"


def qemu_command(
    image: GuestImage,
    script_file: Path,
    console_file: Path,
    *,
    blk_sockets: Sequence[str | os.PathLike] = (),
    blk_num_queues: int = 1,
    plain_disks: Sequence[str | os.PathLike] = (),
    net_sockets: Sequence[str | os.PathLike] = (),
    net_queues: int = 1,
    mem_mb: int = 256,
    cpus: int = 1,
    extra_args: Sequence[str] = (),
    cmdline: str = KERNEL_CMDLINE,
    net_macs: Sequence[str] = (),
    packed: bool = False,
) -> list[str]:
    """The QEMU argv for one boot (exposed so tests and docs can show it).
    ``packed``: the vhost-user devices offer packed virtqueues (the guest
    driver then uses them: virtio 1.2 section 2.8)."""
    ring = ",packed=on" if packed else ""
    argv = [
        QEMU,
        "-accel", "tcg",  # KVM does not work on these hosts (field notes)
        "-M", "pc",
        "-nodefaults",
        "-no-user-config",
        "-bios", str(QBOOT),
        "-nographic",
        "-no-reboot",
        "-smp", str(cpus),
        "-m", f"{mem_mb}M",
        # vhost-user backends map guest RAM: it must be a shared memfd.
        "-object", f"memory-backend-memfd,id=mem,size={mem_mb}M,share=on",
        "-machine", "memory-backend=mem",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-append", cmdline,
        "-chardev", f"file,id=console,path={console_file}",
        "-serial", "chardev:console",
        "-fw_cfg", f"name=opt/nitro.script,file={script_file}",
    ]  # fmt: skip
    for i, sock in enumerate(blk_sockets):
        argv += [
            "-chardev", f"socket,id=blk{i},path={sock},reconnect=1",
            "-device", f"vhost-user-blk-pci,chardev=blk{i},num-queues={blk_num_queues}{ring}",
        ]  # fmt: skip
    for i, disk in enumerate(plain_disks):
        argv += ["-drive", f"file={disk},format=raw,if=virtio,id=plain{i}"]
    for i, sock in enumerate(net_sockets):
        argv += [
            "-chardev", f"socket,id=net{i}c,path={sock},reconnect=1",
            "-netdev", f"vhost-user,id=net{i},chardev=net{i}c,queues={net_queues}",
            # vectors=0: QEMU 7.2 TCG segfaults with vhost-user-net + MSI-X.
            "-device",
            f"virtio-net-pci,netdev=net{i},mq=on,vectors=0{ring},"
            f"mac={net_macs[i] if i < len(net_macs) else mac_address(i)}",
        ]  # fmt: skip
    argv += list(extra_args)
    return argv


class GuestProcess:
    """One QEMU guest running in the background.

    Use as a context manager (the guest is killed on exit) or call `kill()`.
    Every wait takes a timeout; none can hang.
    """

    def __init__(
        self,
        image: GuestImage,
        script: str,
        *,
        blk_sockets: Sequence[str | os.PathLike] = (),
        blk_num_queues: int = 1,
        plain_disks: Sequence[str | os.PathLike] = (),
        plain_disk: str | os.PathLike | None = None,
        net_sockets: Sequence[str | os.PathLike] = (),
        net_queues: int = 1,
        mem_mb: int = 256,
        cpus: int = 1,
        extra_args: Sequence[str] = (),
        cmdline: str = KERNEL_CMDLINE,
        net_macs: Sequence[str] = (),
        packed: bool = False,
    ) -> None:
        if shutil.which(QEMU) is None:
            raise GuestError(f"{QEMU} not found: apt-get install qemu-system-x86")
        for path, what in ((QBOOT, "qboot (qemu-system-data)"), (image.kernel, "kernel"), (image.initrd, "initrd")):
            if not Path(path).exists():
                raise GuestError(f"{what} missing: {path}")
        disks = list(plain_disks) + ([plain_disk] if plain_disk is not None else [])
        self._dir = Path(tempfile.mkdtemp(prefix="nitro-guest-"))
        self.script_file = self._dir / "nitro.script"
        self.script_file.write_text(script)
        self.console_file = self._dir / "console.log"
        self.console_file.touch()
        self._stderr_file = self._dir / "qemu.stderr"
        self.argv = qemu_command(
            image,
            self.script_file,
            self.console_file,
            blk_sockets=blk_sockets,
            blk_num_queues=blk_num_queues,
            plain_disks=disks,
            net_sockets=net_sockets,
            net_queues=net_queues,
            mem_mb=mem_mb,
            cpus=cpus,
            extra_args=extra_args,
            cmdline=cmdline,
            net_macs=net_macs,
            packed=packed,
        )
        self._proc: subprocess.Popen | None = None
        self._started = 0.0
        self._result: GuestResult | None = None

    # --- lifecycle ---

    def start(self) -> GuestProcess:
        with open(self._stderr_file, "wb") as err:
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in pytest must not reach QEMU first
            )
        self._started = time.monotonic()
        return self

    def __enter__(self) -> GuestProcess:
        if self._proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    @property
    def pid(self) -> int:
        assert self._proc is not None, "not started"
        return self._proc.pid

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def kill(self) -> GuestResult:
        """Stop QEMU now (SIGKILL) if still running; return the result so far."""
        if self._result is not None:
            return self._result
        timed_out = False
        if self._proc is not None and self._proc.poll() is None:
            timed_out = True
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._proc.wait()
        return self._finish(timed_out=timed_out)

    def _finish(self, timed_out: bool) -> GuestResult:
        output = self.output()
        codes = _EXIT_RE.findall(output)
        stderr = self._stderr_file.read_text(errors="replace") if self._stderr_file.exists() else ""
        self._result = GuestResult(
            returncode=int(codes[-1]) if codes else None,
            output=output,
            qemu_exit=self._proc.returncode if self._proc is not None else -1,
            timed_out=timed_out,
            duration=time.monotonic() - self._started,
            qemu_stderr=stderr,
        )
        shutil.rmtree(self._dir, ignore_errors=True)
        return self._result

    # --- reading ---

    def output(self) -> str:
        """The serial console so far (\\r\\n normalised to \\n)."""
        if self._result is not None:
            return self._result.output
        try:
            data = self.console_file.read_bytes()
        except FileNotFoundError:
            return ""
        return data.decode(errors="replace").replace("\r\n", "\n")

    def _remaining(self, deadline: float) -> float:
        return deadline - time.monotonic()

    def _check(self, pattern: re.Pattern[str], start: int) -> re.Match[str] | None:
        return pattern.search(self.output(), start)

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float, *, start: int = 0) -> re.Match[str]:
        """Block until the console matches `pattern` (a regex; re.M) at or after `start`.

        Raises GuestTimeout after `timeout` seconds, or at once if QEMU exits
        without printing it. The guest keeps running either way.
        """
        regex = re.compile(pattern, re.M) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            alive = self.running()
            m = self._check(regex, start)
            if m:
                return m
            if not alive:
                raise GuestTimeout(f"QEMU exited before {regex.pattern!r} appeared", self.output())
            if self._remaining(deadline) <= 0:
                raise GuestTimeout(f"{regex.pattern!r} not seen in {timeout}s", self.output())
            time.sleep(_POLL_S)

    def wait(self, timeout: float) -> GuestResult:
        """Wait for the guest to power off; after `timeout` s kill it. Never raises on timeout."""
        assert self._proc is not None, "not started"
        if self._result is not None:
            return self._result
        try:
            self._proc.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            return self.kill()
        return self._finish(timed_out=False)

    # --- trio variants: poll without blocking the event loop ---

    async def wait_for_async(
        self, pattern: str | re.Pattern[str], timeout: float, *, start: int = 0
    ) -> re.Match[str]:
        """`wait_for` for trio code (e.g. a test that also runs the daemon)."""
        import trio

        regex = re.compile(pattern, re.M) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            alive = self.running()
            m = self._check(regex, start)
            if m:
                return m
            if not alive:
                raise GuestTimeout(f"QEMU exited before {regex.pattern!r} appeared", self.output())
            if self._remaining(deadline) <= 0:
                raise GuestTimeout(f"{regex.pattern!r} not seen in {timeout}s", self.output())
            await trio.sleep(_POLL_S)

    async def wait_async(self, timeout: float) -> GuestResult:
        """`wait` for trio code."""
        import trio

        assert self._proc is not None, "not started"
        deadline = time.monotonic() + timeout
        while self._proc.poll() is None:
            if self._remaining(deadline) <= 0:
                return self.kill()
            await trio.sleep(_POLL_S)
        if self._result is not None:
            return self._result
        return self._finish(timed_out=False)


def run_guest(
    image: GuestImage,
    script: str,
    *,
    blk_sockets: Sequence[str | os.PathLike] = (),
    blk_num_queues: int = 1,
    plain_disks: Sequence[str | os.PathLike] = (),
    plain_disk: str | os.PathLike | None = None,
    net_sockets: Sequence[str | os.PathLike] = (),
    net_queues: int = 1,
    mem_mb: int = 256,
    timeout: float = 120,
    extra_args: Sequence[str] = (),
    cpus: int = 1,
    cmdline: str = KERNEL_CMDLINE,
    net_macs: Sequence[str] = (),
    packed: bool = False,
) -> GuestResult:
    """Boot the guest, run `script` with sh, return when it powers off or at `timeout`.

    On timeout QEMU is killed and the result has timed_out=True,
    returncode=None and the console collected so far.
    """
    guest = GuestProcess(
        image,
        script,
        blk_sockets=blk_sockets,
        blk_num_queues=blk_num_queues,
        plain_disks=plain_disks,
        plain_disk=plain_disk,
        net_sockets=net_sockets,
        net_queues=net_queues,
        mem_mb=mem_mb,
        cpus=cpus,
        extra_args=extra_args,
        cmdline=cmdline,
        net_macs=net_macs,
        packed=packed,
    )
    guest.start()
    try:
        return guest.wait(timeout)
    finally:
        guest.kill()
