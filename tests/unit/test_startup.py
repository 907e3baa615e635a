"""What `nitro run` does before it serves: create the directories the config
names, and describe the config (--print-capabilities, --check)."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import trio

from nitro import cli
from nitro.config import from_dict
from nitro.daemon import StartupError, close_devices, make_directories
from nitro.devices import blk
from nitro.devices.blk.backends.raw import VolumeError
from nitro.devices.blk.opening import Opening

VPC = {"id": "blue", "cidr": "10.0.0.0/24", "gateway": "10.0.0.1"}
NET = {"id": "eth0", "vpc": "blue", "mac": "52:54:00:00:00:01", "ip": "10.0.0.5"}
NET_TOML = ('[[vpc]]\nid = "blue"\ncidr = "10.0.0.0/24"\ngateway = "10.0.0.1"\n'
            '[[net]]\nid = "eth0"\nvpc = "blue"\nmac = "52:54:00:00:00:01"\nip = "10.0.0.5"\n')


def test_directories_are_created_wherever_the_config_puts_them(tmp_path):
    c = from_dict({"daemon": {"runtime_dir": str(tmp_path / "run/nitro"), "state_dir": str(tmp_path / "lib/nitro"),
                              "control_socket": str(tmp_path / "ctl/control.sock")},
                   "blk": [{"id": "a", "socket": str(tmp_path / "vm/a/a.sock")}]}, "t.toml")
    make_directories(c)
    for d in ("run/nitro", "lib/nitro", "ctl", "vm/a"):
        assert (tmp_path / d).is_dir(), d
    assert (tmp_path / "lib/nitro").stat().st_mode & 0o777 == 0o750 & ~_umask()
    make_directories(c)  # existing directories are fine


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_directory_that_cannot_be_created_is_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("")
    c = from_dict({"daemon": {"runtime_dir": str(tmp_path / "file/run")}}, "t.toml", state_dir=tmp_path)
    with pytest.raises(StartupError, match=f"cannot create the runtime directory {tmp_path}/file/run: "
                                           "Not a directory"):
        make_directories(c)


@pytest.mark.parametrize("doc, expected", [
    ({"blk": [{"id": "a"}]}, {"type": "block", "features": []}),
    ({"vpc": [VPC], "net": [NET]}, {"type": "net"}),
    ({"vpc": [VPC], "net": [NET], "blk": [{"id": "a"}, {"id": "b"}]},
     [{"type": "block", "features": []}, {"type": "net"}]),
    ({}, []),
], ids=["blk", "net", "both", "none"])
def test_capabilities_describe_what_the_config_serves(tmp_path, doc, expected):
    assert cli.capabilities(from_dict(doc, "t.toml", runtime_dir=tmp_path, state_dir=tmp_path)) == expected


def test_print_capabilities_reads_the_config_and_opens_nothing(tmp_path, capsys):
    f = tmp_path / "nitro.toml"
    f.write_text(NET_TOML + f'[daemon]\nruntime_dir = "{tmp_path}/run"\n')
    assert cli.main(["run", "--config", str(f), "--print-capabilities"]) == 0
    assert json.loads(capsys.readouterr().out) == {"type": "net"}
    assert not (tmp_path / "run").exists()
    assert cli.main(["--print-capabilities"]) == 0  # the embedded default: one blk volume
    assert json.loads(capsys.readouterr().out) == {"type": "block", "features": []}


def test_check_counts_every_kind_of_device(tmp_path, capsys):
    f = tmp_path / "nitro.toml"
    f.write_text(NET_TOML + '[[blk]]\nid = "a"\n')
    assert cli.main(["run", "--check", "--config", str(f)]) == 0
    assert capsys.readouterr().out == f"{f}: ok (1 blk, 1 net devices, 1 VPCs)\n"


class _Device:
    """close() returns only once every device is in close() at once."""

    def __init__(self, meet: threading.Barrier, fail: bool = False) -> None:
        self.meet, self.fail, self.closed = meet, fail, False

    def close(self) -> None:
        self.meet.wait(timeout=10)  # BrokenBarrierError if closed one by one
        self.closed = True
        if self.fail:
            raise OSError("close failed")


def test_devices_are_closed_side_by_side():
    meet = threading.Barrier(3)
    devices = [_Device(meet), _Device(meet, fail=True), _Device(meet)]
    with pytest.raises(OSError, match="close failed"):
        close_devices(devices)
    assert all(d.closed for d in devices)  # the error did not stop the others


class _Volume:
    def __init__(self) -> None:
        self.closed = threading.Event()

    def close(self) -> None:
        self.closed.set()


def _slow_open(monkeypatch, release: threading.Event, opened: list, error: Exception | None = None):
    def open_device(cfg):
        release.wait(timeout=10)
        if error is not None:
            raise error
        v = _Volume()
        opened.append(v)
        return v
    monkeypatch.setattr(blk, "open_device", open_device)


def _blk_cfg(tmp_path):
    return from_dict({"daemon": {"runtime_dir": str(tmp_path / "r"), "state_dir": str(tmp_path / "s")},
                      "blk": [{"id": "r0", "source": "nbd://127.0.0.1:1/"}]}, "t").blk[0]


def _until_opened(opened: list) -> _Volume:
    deadline = time.monotonic() + 10
    while not opened:
        assert time.monotonic() < deadline, "the open never finished"
        time.sleep(0.01)
    return opened[0]


def test_an_open_outliving_its_budget_goes_on_and_can_be_taken_over(tmp_path, monkeypatch):
    release, opened = threading.Event(), []
    _slow_open(monkeypatch, release, opened)
    opening = Opening.device(_blk_cfg(tmp_path))
    assert opening.wait(0.2) is None  # the start-up's budget ran out; the open goes on
    release.set()
    # The background retry takes the same open over: no second open to race
    # it for the image's lock, and the volume is not closed under it.
    assert trio.run(opening.wait_async) is _until_opened(opened)
    assert len(opened) == 1 and not opened[0].closed.is_set()


def test_a_volume_opening_after_its_caller_left_is_closed(tmp_path, monkeypatch):
    release, opened = threading.Event(), []
    _slow_open(monkeypatch, release, opened)
    opening = Opening.device(_blk_cfg(tmp_path))
    assert opening.wait(0.1) is None
    opening.leave()  # a stop, say
    release.set()
    assert _until_opened(opened).closed.wait(10), "a volume opened after its caller left leaked"


def test_a_cancelled_wait_leaves_and_wakes_nobody_up_for_ever(tmp_path, monkeypatch):
    release, opened = threading.Event(), []
    _slow_open(monkeypatch, release, opened)
    before = threading.active_count()

    async def main():
        with trio.move_on_after(0.2):  # a stop, or a reload removing the device
            await Opening.device(_blk_cfg(tmp_path)).wait_async()
        release.set()

    trio.run(main)
    assert _until_opened(opened).closed.wait(10)
    # The thread that waited for the open ended with it (it was woken).
    deadline = time.monotonic() + 10
    while threading.active_count() > before:
        assert time.monotonic() < deadline, [t.name for t in threading.enumerate()]
        time.sleep(0.05)


def test_an_open_that_ends_in_time_is_handed_over_or_raises(tmp_path, monkeypatch):
    release, opened = threading.Event(), []
    release.set()
    _slow_open(monkeypatch, release, opened)
    assert Opening.device(_blk_cfg(tmp_path)).wait(10) is opened[0]
    assert trio.run(Opening.device(_blk_cfg(tmp_path)).wait_async, 10) is opened[1]
    assert not opened[0].closed.is_set() and not opened[1].closed.is_set()
    _slow_open(monkeypatch, release, opened, error=VolumeError("refused"))
    with pytest.raises(VolumeError, match="refused"):
        Opening.device(_blk_cfg(tmp_path)).wait(10)
