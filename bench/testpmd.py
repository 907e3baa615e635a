"""dpdk-testpmd as a non-interactive child process: the DPDK frontends and
reference backend of bench/net.py and tests/integration/test_net_dpdk.py.

``--stats-period`` matters beyond the numbers: without it testpmd waits for
"Press enter to exit" on stdin and, with stdin at EOF, stops forwarding
right after its first burst (which once looked like a stalled switch). It
runs until SIGINT, then prints its forward statistics and exits.
"""

from __future__ import annotations

import re
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


def start_loop(prefix: str, cpu: int, a: tuple[Path, str], b: tuple[Path, str], log: Path, *,
               tx_ip: tuple[str, str], frame: int = 64, burst: int = 64, queue_size: int = 256) -> subprocess.Popen:
    """One testpmd on `cpu` owning two virtio-user ports, a and b (socket,
    MAC), bouncing frames between them through the backend: each port
    sends one txonly burst of `frame`-byte frames (CRC included) from its
    MAC to the other's, source and destination IP `tx_ip`, then sends
    back everything it receives with MACs, IPs and ports swapped
    (`5tswap`), so a frame is always legal from the port it leaves."""
    vdevs = [f"net_virtio_user{n},path={sock},mac={mac},queue_size={queue_size}"
             for n, (sock, mac) in enumerate((a, b))]
    return start(prefix, f"0@{cpu},1@{cpu}", vdevs,
                 ["--port-topology=loop", "--forward-mode=5tswap", "--tx-first", f"--burst={burst}",
                  f"--eth-peer=0,{b[1]}", f"--eth-peer=1,{a[1]}", f"--tx-ip={tx_ip[0]},{tx_ip[1]}",
                  f"--txpkts={frame - 4}"], log)


_FORWARD_STATS = re.compile(r"(RX-packets|RX-dropped|TX-packets|TX-dropped):\s+(\d+)")


def forward_stats(text: str, port: int) -> dict[str, int]:
    """RX-packets, RX-dropped, TX-packets, TX-dropped of `port` in the
    last "Forward statistics" testpmd printed (on SIGINT); KeyError if
    there is none."""
    block = text.rsplit(f"Forward statistics for port {port} ", 1)
    if len(block) != 2:
        raise KeyError(f"no forward statistics for port {port}")
    return {k: int(v) for k, v in _FORWARD_STATS.findall(block[1].split("\n\n", 1)[0])}


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
