"""Live reload of the real daemon (`nitro reload`, SIGHUP): a [[blk]] device
added to the file starts serving, a removed one goes away, and the device
that did not change is not touched: its frontend (vublk, doing I/O the whole
time) never reconnects and never sees an error. A bad file changes nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from bench.proc import Nitro, run_cli

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]

VOL0 = '[[blk]]\nid = "vol0"\nsize = "64M"\n'
VOL1 = '[[blk]]\nid = "vol1"\nsize = "16M"\n'




def devices(n: Nitro) -> dict[str, dict]:
    return {d["id"]: d for d in json.loads(n.status_json())["devices"]}


def wait_until(what: str, predicate, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def start_io(vublk: Path, sock: Path, seconds: int) -> subprocess.Popen:
    """vublk writing 4 KiB blocks at random for `seconds` seconds."""
    return subprocess.Popen([str(vublk), "--socket", str(sock), "--rw", "randwrite", "--bs", "4096",
                             "--iodepth", "8", "--size", "16m", "--runtime", str(seconds)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_io(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, f"vublk failed ({proc.returncode}): {err}"
    return json.loads(out.strip().splitlines()[-1])


def writes(n: Nitro, device: str) -> int:
    return devices(n)[device]["ops"]["out"]["requests"]


def test_add_and_remove_a_device_while_another_serves(nitro, short_tmp_path, vublk):
    n = nitro(VOL0)
    # Long enough to outlast both reloads on a loaded machine (8 s did not).
    io = start_io(vublk, short_tmp_path / "vol0.sock", seconds=25)
    try:
        wait_until("vol0 connected and writing", lambda: writes(n, "vol0") > 0)

        n.write_config(VOL0 + VOL1)
        r = n.reload()
        assert r.returncode == 0, r.stderr
        assert "added: vol1" in r.stdout and "unchanged: vol0" in r.stdout, r.stdout
        # The new device serves: a full write/flush/read-back on it.
        v = subprocess.run([str(vublk), "--socket", str(short_tmp_path / "vol1.sock"), "--rw", "verify",
                            "--size", "4m", "--seed", "7"], capture_output=True, text=True, timeout=60, check=False)
        assert v.returncode == 0, v.stderr
        res = json.loads(v.stdout)
        assert res["mismatches"] == 0 and res["errors"] == 0 and res["verified_bytes"] == 4 << 20
        devs = devices(n)
        assert set(devs) == {"vol0", "vol1"}
        assert devs["vol0"]["connections"] == 1 and devs["vol0"]["connected"]
        assert 'nitro_blk_capacity_bytes{device="vol1"}' in n.metrics()
        # vol0's I/O went on through the reload.
        before = writes(n, "vol0")
        wait_until("vol0 writes after the reload", lambda: writes(n, "vol0") > before)

        # Remove vol1 while a frontend is connected to it: it sees a disconnect.
        io1 = start_io(vublk, short_tmp_path / "vol1.sock", seconds=30)
        try:
            wait_until("vol1 connected", lambda: devices(n)["vol1"]["connections"] == 2)
            n.write_config(VOL0)
            r = n.reload()
            assert r.returncode == 0, r.stderr
            assert "removed: vol1" in r.stdout, r.stdout
            io1.communicate(timeout=15)  # it ends well before its 30 s: the backend went away
            assert io1.returncode != 0
        finally:
            io1.kill()
            io1.wait()
        assert not (short_tmp_path / "vol1.sock").exists()
        assert set(devices(n)) == {"vol0"}
        assert "nitro_blk_capacity_bytes{device=\"vol1\"}" not in n.metrics()
        assert "vol1" not in n.status()

        assert io.poll() is None, "vol0's frontend finished before the second reload: test proves less"
        res0 = finish_io(io)
        assert res0["errors"] == 0 and res0["len_mismatch"] == 0 and res0["ios"] > 0
        assert devices(n)["vol0"]["connections"] == 1, "vol0's frontend was reconnected"
        assert n.stop() == 0, n.output()
    finally:
        io.kill()
        io.wait()
    log = n.output()
    assert 'msg="reload: device added" device=vol1' in log
    assert 'msg="reload: device removed" device=vol1' in log


def test_bad_config_changes_nothing(nitro, short_tmp_path, vublk):
    n = nitro(VOL0)
    before = devices(n)

    n.write_config(VOL0 + VOL1 + '[[blk]]\nid = "vol2"\nqueue_size = 100\n')
    r = n.reload()
    assert r.returncode != 0
    assert f"config {n.cfg}: blk[2].queue_size: must be a power of two" in r.stderr, r.stderr
    assert r.stdout == ""

    # Valid file, but a new volume cannot be opened: the other addition is not made either.
    n.write_config(VOL0 + VOL1 + '[[blk]]\nid = "vol2"\n')  # no size and no image
    r = n.reload()
    assert r.returncode != 0
    assert "device vol2" in r.stderr, r.stderr

    n.write_config("garbage = [")
    assert n.reload().returncode != 0

    assert not (short_tmp_path / "vol1.sock").exists() and not (short_tmp_path / "vol2.sock").exists()
    assert devices(n).keys() == before.keys()
    # The running config is still the old one: vol0 serves.
    v = subprocess.run([str(vublk), "--socket", str(short_tmp_path / "vol0.sock"), "--rw", "verify",
                        "--size", "1m"], capture_output=True, text=True, timeout=60, check=False)
    assert v.returncode == 0, v.stderr
    assert 'msg="reload refused"' in n.output()


def test_changed_device_and_daemon_settings_need_restart(nitro, short_tmp_path):
    n = nitro(VOL0)
    n.cfg.write_text('[metrics]\nlisten = ""\n[[blk]]\nid = "vol0"\nsize = "128M"\n')
    r = n.reload()
    assert r.returncode == 0, r.stderr
    assert "needs restart: blk vol0: settings changed (size)" in r.stdout, r.stdout
    assert "needs restart: daemon metrics.listen" in r.stdout, r.stdout
    assert "nothing applied" in r.stdout
    assert devices(n)["vol0"]["capacity_bytes"] == 64 << 20  # untouched
    assert n.metrics()  # still served on the old address


def test_sighup_reloads(nitro, short_tmp_path):
    n = nitro(VOL0)
    n.write_config(VOL0 + VOL1)
    n.proc.send_signal(signal.SIGHUP)
    wait_until("vol1.sock", lambda: (short_tmp_path / "vol1.sock").exists())
    wait_until("vol1 in status", lambda: "vol1" in devices(n))
    n.write_config(VOL0)
    n.proc.send_signal(signal.SIGHUP)
    wait_until("vol1 removed", lambda: "vol1" not in devices(n))
    assert not (short_tmp_path / "vol1.sock").exists()
    assert n.proc.poll() is None
    assert n.stop() == 0, n.output()
    assert n.output().count("msg=reloaded ") == 2


def test_reload_without_a_daemon_fails_clearly(short_tmp_path):
    r = run_cli("reload", "--control", short_tmp_path / "control.sock", timeout=30)
    assert r.returncode == 1
    assert "cannot reach nitro" in r.stderr


def test_embedded_default_has_nothing_to_reload(tmp_path):
    """`nitro run` without --config: a reload is refused, saying why. In
    process (the embedded default listens for metrics on the fixed port
    9180, which other tests on this machine may hold)."""
    import dataclasses

    import trio

    from nitro import cli, config
    from nitro.control.commands import handle_request_async
    from nitro.daemon import Daemon

    args = cli._parser().parse_args(["run", "--runtime-dir", str(tmp_path), "--state-dir", str(tmp_path)])
    assert cli._reloader(args) is None
    cfg = dataclasses.replace(config.load(None, runtime_dir=tmp_path, state_dir=tmp_path), metrics_listen="")
    d = Daemon(cfg, load_config=cli._reloader(args))
    reply = json.loads(trio.run(handle_request_async, b'{"cmd": "reload"}', d))
    assert reply["ok"] is False
    assert "embedded default" in reply["error"] and "--config" in reply["error"]
    assert os.listdir(tmp_path) == []  # nothing opened


def test_reload_during_drain_is_refused(tmp_path):
    """After SIGTERM the daemon drains; a reload then changes nothing (in
    process: the window between the two signals cannot be hit reliably
    from outside)."""
    import trio

    from nitro import config
    from nitro.control.commands import handle_request_async
    from nitro.daemon import Daemon

    f = tmp_path / "nitro.toml"
    f.write_text('[metrics]\nlisten = ""\n')
    cfg = config.load(f, runtime_dir=tmp_path, state_dir=tmp_path)
    d = Daemon(cfg, load_config=lambda: config.load(f, runtime_dir=tmp_path, state_dir=tmp_path))
    d._stopping = True  # what run() sets when the stop signal arrives
    reply = json.loads(trio.run(handle_request_async, b'{"cmd": "reload"}', d))
    assert reply == {"ok": False, "error": "the daemon is stopping"}
