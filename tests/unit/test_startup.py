"""What `nitro run` does before it serves: create the directories the config
names, and describe the config (--print-capabilities, --check)."""

from __future__ import annotations

import json
import os
import threading

import pytest

from nitro import cli
from nitro.config import from_dict
from nitro.daemon import StartupError, close_devices, make_directories

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
