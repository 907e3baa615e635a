"""dpdk-testpmd as a non-interactive child process: the DPDK frontends and
reference backend of bench/net.py and tests/integration/test_net_dpdk.py.

``--stats-period`` matters beyond the numbers: without it testpmd waits for
"Press enter to exit" on stdin and, with stdin at EOF, stops forwarding
right after its first burst (which once looked like a stalled switch). It
runs until SIGINT, then prints its forward statistics and exits.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

TESTPMD = "dpdk-testpmd"
# No hugepages, no PCI probing: memory is a memfd (field notes).
EAL = ["--no-huge", "-m", "1024", "--no-pci"]


def start(prefix: str, lcores: str, vdevs: list[str], args: list[str], log: Path,
          *, mbufs: int = 16384) -> subprocess.Popen:
    """testpmd with `vdevs`, forwarding at once, its output (line-buffered) in `log`."""
    argv = ["stdbuf", "-oL", TESTPMD, *EAL, "--lcores", lcores, "--file-prefix", prefix]
    for v in vdevs:
        argv += ["--vdev", v]
    argv += ["--", "--auto-start", "--stats-period", "1", f"--total-num-mbufs={mbufs}", *args]
    with open(log, "w") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def interrupt(proc: subprocess.Popen, timeout: float = 15) -> bool:
    """SIGINT (testpmd prints its statistics and exits); killed after
    `timeout`. True if it exited on SIGINT."""
    if proc.poll() is not None:
        return True
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False
