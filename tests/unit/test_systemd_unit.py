"""systemd/nitro.service checked offline with `systemd-analyze`.

PID 1 is not systemd on the CI machines, so the unit cannot be started; it is
verified instead. Needs the Debian package `systemd` (it provides
/usr/bin/systemd-analyze and works without systemd running as PID 1):
`apt-get install -y systemd`. Without it these tests FAIL, they do not skip.

`systemd-analyze verify` rejects a unit whose ExecStart binary does not
exist, and /usr/local/bin/nitro is not installed in the test environment, so
the test copies the unit to a temp directory and points ExecStart at a stub
executable called `nitro` there, keeping the arguments. Everything else is
verified as shipped.
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "nitro.service"
SHIPPED_BINARY = "/usr/local/bin/nitro"

# Exposure score from `systemd-analyze security --offline=yes`, in tenths
# (21 == "2.1 OK" when written, docs/operations.md). Fails if hardening is
# removed.
MAX_EXPOSURE = 25


def systemd_analyze():
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze not found: install the Debian package 'systemd' (apt-get install -y systemd)")
    return path


def directives(text):
    """[(key, value)] of the unit, in order (unit files allow repeated keys)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.append((key.strip(), value.strip()))
    return out


def unit_copy_for_verify(tmp_path, text=None):
    text = UNIT.read_text() if text is None else text
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    stub = bindir / "nitro"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    assert f"ExecStart={SHIPPED_BINARY} " in text
    unit = tmp_path / "nitro.service"
    unit.write_text(text.replace(f"ExecStart={SHIPPED_BINARY} ", f"ExecStart={stub} "))
    return unit


def verify(unit):
    proc = subprocess.run(
        [systemd_analyze(), "verify", "--man=no", str(unit)],
        capture_output=True, text=True, timeout=60,
    )
    output = proc.stdout + proc.stderr
    # verify exits 0 on unknown keys and unparsable values (it only warns),
    # so any line about our file is a failure too.
    complaints = [line for line in output.splitlines() if unit.name in line or str(unit) in line]
    return proc.returncode, complaints, output


def test_unit_verifies(tmp_path):
    rc, complaints, output = verify(unit_copy_for_verify(tmp_path))
    assert rc == 0 and not complaints, output


def test_verify_catches_mistakes(tmp_path):
    """The check above is only worth something if it sees a bad unit."""
    text = UNIT.read_text().replace("Restart=on-failure", "Restart=sometimes\nBogusKey=1")
    rc, complaints, output = verify(unit_copy_for_verify(tmp_path, text))
    assert any("BogusKey" in c for c in complaints), output
    assert any("sometimes" in c for c in complaints), output


def test_security_exposure(tmp_path):
    unit = unit_copy_for_verify(tmp_path)
    proc = subprocess.run(
        [systemd_analyze(), "security", "--offline=yes", f"--threshold={MAX_EXPOSURE}", "--no-pager", str(unit)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Overall exposure level" in proc.stdout


def syscall_groups() -> dict[str, list[str]]:
    """{"@group": [syscall or @group, ...]} as this systemd defines them."""
    proc = subprocess.run([systemd_analyze(), "syscall-filter", "--no-pager"],
                          capture_output=True, text=True, timeout=60, check=True)
    groups: dict[str, list[str]] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.startswith("    ") and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def allowed_syscalls(unit_text: str) -> set[str]:
    """The system calls the unit's SystemCallFilter= lines allow: the allow
    lists joined, then the ~deny lists taken out (systemd's own rule)."""
    groups = syscall_groups()

    def expand(names):
        out = set()
        for name in names:
            out |= expand(groups[name]) if name.startswith("@") else {name}
        return out

    allowed, denied = set(), set()
    for key, value in directives(unit_text):
        if key == "SystemCallFilter":
            deny = value.startswith("~")
            (denied if deny else allowed).update(expand(value.lstrip("~").split()))
    return allowed - denied


def test_syscall_filter_allows_what_nitro_needs():
    """What the daemon's jobs need (the strace run in
    tests/integration/test_daemon_systemd.py checks what it actually calls)."""
    allowed = allowed_syscalls(UNIT.read_text())
    needs = {
        "guest memory and notifications": {"mmap", "munmap", "eventfd2", "recvmsg", "sendmsg", "epoll_wait", "ppoll"},
        "volume I/O": {"preadv", "pwritev", "preadv2", "pwritev2", "fdatasync", "fallocate", "openat"},
        "keys in locked memory": {"mlock", "munlock", "madvise"},
        "io_uring backends": {"io_uring_setup", "io_uring_enter", "io_uring_register"},
        "pinned workers": {"sched_setaffinity", "sched_getaffinity"},
        "TAP and netlink": {"ioctl", "socket", "bind", "sendto", "recvfrom"},
        "threads": {"clone3", "futex", "set_robust_list", "rseq"},
        "engine workers' own seccomp filters": {"seccomp", "prctl"},
        "the adaptive poll window (was a worker preempted?)": {"getrusage"},
    }
    for what, calls in needs.items():
        assert calls <= allowed, f"{what}: {calls - allowed} not allowed"
    # ... and it does filter.
    assert {"mount", "setuid", "capset", "init_module", "reboot", "ptrace", "settimeofday"}.isdisjoint(allowed)
    assert dict(directives(UNIT.read_text()))["SystemCallErrorNumber"] == "EPERM"


def test_required_settings():
    d = dict(directives(UNIT.read_text()))
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecStart": f"{SHIPPED_BINARY} run --config /etc/nitro/nitro.toml",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "WatchdogSec": "30s",
        "Restart": "on-failure",
        "RestartSec": "1s",
        "RuntimeDirectory": "nitro",
        "RuntimeDirectoryPreserve": "yes",
        "StateDirectory": "nitro",
        "KillSignal": "SIGTERM",
        "TimeoutStopSec": "45s",
        "LimitMEMLOCK": "infinity",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "LockPersonality": "yes",
        "RestrictRealtime": "yes",
        "SystemCallArchitectures": "native",
        "MemoryDenyWriteExecute": "yes",
    }
    for key, value in expected.items():
        assert d.get(key) == value, key
    assert set(d["ReadWritePaths"].split()) == {"/var/lib/nitro", "/run/nitro"}
    assert set(d["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    assert set(d["CapabilityBoundingSet"].split()) == {"CAP_NET_ADMIN", "CAP_IPC_LOCK"}
    # Nothing that would stop guest memfds from being mapped or TAPs created.
    assert "PrivateDevices" not in d and "PrivateNetwork" not in d
    assert re.search(r"^DeviceAllow=/dev/net/tun rw$", UNIT.read_text(), re.M)
