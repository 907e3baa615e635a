"""nitro over NBD against qemu-storage-daemon's nbd driver, same export.

    python -m bench.nbd --runtime 10 --rounds 2

Both back-ends serve one nbdkit export (memory plugin, on loopback) as
vhost-user-blk, driven by tools/bin/vublk: nitro with `source = "nbd://..."`
(libnbd on its engine worker), qemu-storage-daemon with `--blockdev
driver=nbd` and a vhost-user-blk export. Per workload they alternate A, B,
A, B (--rounds): compare the ratio of medians, never one-off figures.
The region the workloads use is written once first, so reads move data
(an unwritten memory export answers with holes, docs/volumes.md).
Prints a table and writes build/bench/nbd-<timestamp>.json.

Also the launchers of NBD servers for the tests (tests/integration/
test_nbd_volume.py): nbdkit (any plugin, optionally --tls=require with a
PSK file) and qemu-nbd, on free loopback ports, stopped by PID.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.proc import REPO, Child, ChildError, free_port, nitro_argv, tail

VUBLK = REPO / "tools" / "bin" / "vublk"
OUT_DIR = REPO / "build" / "bench"
PSK_USER = "nitro"
WORKLOADS = [("randread", 4096, 32), ("randwrite", 4096, 32), ("read", 128 << 10, 32),
             ("write", 128 << 10, 32)]


def wait_port(child: Child, port: int, timeout: float = 10) -> None:
    """Return once 127.0.0.1:port accepts; ChildError if the child exits."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if not child.running():
                raise ChildError(f"{child.argv[0]} exited:\n{tail(child.output())}") from None
            if time.monotonic() > deadline:
                raise ChildError(f"{child.argv[0]} not listening on {port}:\n"
                                 f"{tail(child.output())}") from None
            time.sleep(0.05)


def write_psk(path: Path, user: str = PSK_USER) -> Path:
    """An nbdkit/libnbd PSK file (`user:hexkey`), mode 0600."""
    path.write_text(f"{user}:{bytes(range(32)).hex()}\n")
    path.chmod(0o600)
    return path


class NbdKit(Child):
    """nbdkit in the foreground on 127.0.0.1:`port` (a free one by default)
    with `plugin` and its arguments; ready once the port accepts.
    `tls_psk`: --tls=require with that PSK file."""

    def __init__(self, tmp: Path, plugin: Sequence[str], *, port: int | None = None,
                 tls_psk: Path | None = None, name: str = "nbdkit") -> None:
        self.port = port or free_port()
        tls = ["--tls=require", f"--tls-psk={tls_psk}"] if tls_psk else []
        super().__init__(["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(self.port), *tls,
                          *plugin], tmp / f"{name}-{time.monotonic_ns()}.log")
        try:
            wait_port(self, self.port)
        except BaseException:
            self.kill()
            raise

    def url(self, export: str = "") -> str:
        return f"nbd://127.0.0.1:{self.port}/{export}"


class QemuNbd(Child):
    """qemu-nbd serving a raw `image` as export `export` on a free port,
    for `shared` clients at once (-e; qemu-nbd's own default is 1) and
    across disconnects (-t)."""

    def __init__(self, tmp: Path, image: Path, *, export: str = "vol", shared: int = 8) -> None:
        self.port = free_port()
        self.export = export
        super().__init__(["qemu-nbd", "-f", "raw", "-b", "127.0.0.1", "-p", str(self.port),
                          "-x", export, "-t", "-e", str(shared), str(image)], tmp / "qemu-nbd.log")
        try:
            wait_port(self, self.port)
        except BaseException:
            self.kill()
            raise

    def url(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/{self.export}"


# --------------------------------------------------------------------------
# the benchmark


def nitro_cmd(tmp: Path, url: str, sock: Path, poll_us: str = "adaptive") -> list[str]:
    cfg = tmp / "nitro.toml"
    poll = "" if poll_us == "adaptive" else f"poll_us = {int(poll_us)}\n"
    cfg.write_text(f'[daemon]\nruntime_dir = "{tmp}"\nstate_dir = "{tmp}"\nworkers = 1\n{poll}'
                   f'[metrics]\nlisten = ""\n[[blk]]\nid = "{sock.stem}"\n'
                   f'socket = "{sock}"\nsource = "{url}"\nqueue_size = 256\n')
    return nitro_argv("run", "--config", cfg)


def qsd_cmd(port: int, sock: Path) -> list[str]:
    return ["qemu-storage-daemon",
            "--blockdev", f"driver=nbd,node-name=nbd0,server.type=inet,server.host=127.0.0.1,"
                          f"server.port={port}",
            "--export", f"type=vhost-user-blk,id=exp0,node-name=nbd0,addr.type=unix,"
                        f"addr.path={sock},writable=on,num-queues=1"]


def run_one(argv: list[str], tmp: Path, rw: str, bs: int, qd: int, runtime: float,
            *extra: str) -> dict:
    sock = tmp / "b.sock"
    sock.unlink(missing_ok=True)
    with Child(argv, tmp / "backend.log") as backend:
        backend.wait_for(sock, 20)
        time.sleep(0.2)  # bound is not yet listening (qsd binds, then listens)
        r = subprocess.run([str(VUBLK), "--socket", str(sock), "--rw", rw, "--bs", str(bs),
                            "--iodepth", str(qd), "--runtime", str(runtime), "--size", "256m", *extra],
                           capture_output=True, text=True, timeout=runtime + 60, check=False)
        backend.stop()
    if r.returncode != 0:
        raise ChildError(f"vublk {rw} failed ({r.returncode}): {r.stderr.strip()}")
    return json.loads(r.stdout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", type=float, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--poll-us", default="adaptive",
                    help="nitro's [daemon] poll_us: adaptive (default) or a number (0: never busy-poll; "
                         "the NBD server shares the CPUs here)")
    args = ap.parse_args(argv)
    if shutil.which("nbdkit") is None or shutil.which("qemu-storage-daemon") is None:
        print("bench.nbd: needs nbdkit and qemu-storage-daemon (tools/install-deps.sh)")
        return 1
    subprocess.run(["make", "-s", "-C", str(REPO / "tools")], check=True)
    tmp = Path(tempfile.mkdtemp(prefix="nbdbench-", dir="/tmp"))
    results: dict[str, dict[str, list[float]]] = {}
    try:
        with NbdKit(tmp, ["memory", "1G"]) as server:
            # Data, not holes: an unwritten memory export answers reads with
            # hole chunks (no payload), a path of its own; like bench.blk's
            # fully written image, the reads then move real data.
            run_one(qsd_cmd(server.port, tmp / "b.sock"), tmp, "write", 1 << 20, 8, 60, "--ios", "256")
            for rw, bs, qd in WORKLOADS:
                label = f"{rw} {bs // 1024}k QD{qd}"
                per = results.setdefault(label, {"nitro": [], "qsd": []})
                for _ in range(args.rounds):
                    for name, cmd in (("qsd", qsd_cmd(server.port, tmp / "b.sock")),
                                      ("nitro", nitro_cmd(tmp, server.url(), tmp / "b.sock", args.poll_us))):
                        res = run_one(cmd, tmp, rw, bs, qd, args.runtime)
                        per[name].append(res["iops"] if bs == 4096 else res["mbps"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'workload':<22} {'qsd nbd':>12} {'nitro nbd':>12} {'ratio':>7}")
    summary = {}
    for label, per in results.items():
        q, n = statistics.median(per["qsd"]), statistics.median(per["nitro"])
        unit = "IOPS" if " 4k " in label else "MB/s"
        summary[label] = {"qsd": per["qsd"], "nitro": per["nitro"], "ratio": n / q, "unit": unit}
        print(f"{label:<22} {q:>12.1f} {n:>12.1f} {n / q:>7.2f}  ({unit}, median of {args.rounds})")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    (OUT_DIR / f"nbd-{stamp}.json").write_text(json.dumps(
        {"runtime": args.runtime, "rounds": args.rounds, "poll_us": args.poll_us, "results": summary},
        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
