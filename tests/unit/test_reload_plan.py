"""reload.plan(): running config + new config -> add / remove / unchanged /
needs restart / refused, by device id. Pure: no daemon, no files."""

from __future__ import annotations

from pathlib import Path

from nitro import reload
from nitro.config import DaemonConfig, from_dict

VPC = {"id": "blue", "cidr": "10.0.0.0/24", "gateway": "10.0.0.1"}
NET = {"id": "n1", "vpc": "blue", "mac": "52:54:00:aa:00:01", "ip": "10.0.0.10"}


def cfg(*blks: dict, source: str = "t.toml", **top) -> DaemonConfig:
    return from_dict({"blk": list(blks), **top}, source, runtime_dir=Path("/r"), state_dir=Path("/s"))


def ids(configs) -> list[str]:
    return [c.id for c in configs]


def test_same_config_changes_nothing():
    old = cfg({"id": "a", "size": "1M"}, {"id": "b", "size": "1M"})
    p = reload.plan(old, cfg({"id": "a", "size": "1M"}, {"id": "b", "size": "1M"}))
    assert p.empty and p.unchanged == ("a", "b")
    assert not p.needs_restart and not p.refused
    assert p.running == old


def test_new_id_is_added_and_missing_id_removed():
    old = cfg({"id": "a", "size": "1M"}, {"id": "b", "size": "1M"})
    p = reload.plan(old, cfg({"id": "a", "size": "1M"}, {"id": "c", "size": "2M"}))
    assert ids(p.add) == ["c"] and p.add[0].socket == Path("/r/c.sock") and p.add[0].size == 2 << 20
    assert ids(p.remove) == ["b"]
    assert p.unchanged == ("a",)
    assert ids(p.running.blk) == ["a", "c"]


def test_changed_device_needs_restart_and_keeps_running_as_it_was():
    old = cfg({"id": "a", "size": "1M"}, {"id": "b", "size": "1M"})
    p = reload.plan(old, cfg({"id": "a", "size": "2M", "readonly": True}, {"id": "b", "size": "1M"}))
    assert p.empty and p.unchanged == ("b",)
    (c,) = p.needs_restart
    assert (c.kind, c.id) == ("blk", "a")
    assert "size" in c.reason and "readonly" in c.reason
    assert p.running.blk == old.blk  # the old settings still run
    # ... so the next reload against the running config reports it again
    assert ids(reload.plan(p.running, cfg({"id": "a", "size": "2M", "readonly": True},
                                          {"id": "b", "size": "1M"})).needs_restart) == ["a"]


def test_daemon_wide_settings_need_restart():
    old = cfg({"id": "a", "size": "1M"})
    new = cfg({"id": "a", "size": "1M"}, metrics={"listen": "127.0.0.1:1"},
              daemon={"control_socket": "other.sock", "log_level": "debug"})
    p = reload.plan(old, new)
    assert p.empty and p.unchanged == ("a",)
    assert sorted(c.id for c in p.needs_restart) == ["daemon.control_socket", "daemon.log_level", "metrics.listen"]
    assert all(c.kind == "daemon" for c in p.needs_restart)
    assert p.running.metrics_listen == old.metrics_listen
    assert p.running.control_socket == old.control_socket


def test_engine_settings_need_restart():
    old = cfg({"id": "a", "size": "1M"})
    new = cfg({"id": "a", "size": "1M"}, daemon={"workers": 1, "poll_us": 20})
    p = reload.plan(old, new)
    assert [c.id for c in p.needs_restart] == ["daemon.workers/cpus/poll_us/seccomp/max_guest_memory"]
    assert p.running.engine == old.engine


def test_net_and_vpc_changes_need_restart():
    old = cfg(vpc=[VPC], net=[NET])
    new = cfg({"id": "a", "size": "1M"}, vpc=[VPC, VPC | {"id": "red", "cidr": "10.1.0.0/24", "gateway": "10.1.0.1"}],
              net=[NET | {"pps": 10}, NET | {"id": "n2", "mac": "52:54:00:aa:00:02", "ip": "10.0.0.11"}])
    p = reload.plan(old, new)
    assert ids(p.add) == ["a"]  # blk still applies
    got = {(c.kind, c.id): c.reason for c in p.needs_restart}
    assert set(got) == {("vpc", "red"), ("net", "n1"), ("net", "n2")}
    assert got[("net", "n1")].startswith("changed (pps)")
    assert got[("net", "n2")].startswith("added")
    assert p.running.net == old.net and p.running.vpc == old.vpc


def test_removed_net_needs_restart():
    p = reload.plan(cfg(vpc=[VPC], net=[NET]), cfg(vpc=[VPC]))
    assert [(c.kind, c.id) for c in p.needs_restart] == [("net", "n1")]
    assert p.needs_restart[0].reason.startswith("removed")


def test_added_device_may_not_take_a_running_devices_socket_or_image():
    # "a" moves its socket (needs restart, keeps the old one); "b" wants a's old socket.
    old = cfg({"id": "a", "size": "1M"})
    new = cfg({"id": "a", "size": "1M", "socket": "a2.sock", "image": "a2.img"},
              {"id": "b", "size": "1M", "socket": "a.sock"},
              {"id": "c", "size": "1M", "socket": "c.sock", "image": "a.img"}, {"id": "d", "size": "1M"})
    p = reload.plan(old, new)
    assert ids(p.add) == ["d"]
    refused = {c.id: c.reason for c in p.refused}
    assert set(refused) == {"b", "c"}
    assert "socket /r/a.sock" in refused["b"] and "running device 'a'" in refused["b"]
    assert "image /s/a.img" in refused["c"]
    assert ids(p.running.blk) == ["a", "d"]


def test_added_device_taking_a_removed_devices_image_waits_for_the_next_reload():
    old = cfg({"id": "a", "size": "1M"})
    new = cfg({"id": "renamed", "size": "1M", "image": "a.img"})
    p = reload.plan(old, new)
    assert ids(p.remove) == ["a"] and not p.add
    (c,) = p.refused
    assert c.id == "renamed" and "removed by this reload" in c.reason and "reload once" in c.reason
    # the next reload, against what then runs, adds it
    assert ids(reload.plan(p.running, new).add) == ["renamed"]


def test_net_socket_is_held():
    old = cfg(vpc=[VPC], net=[NET])
    p = reload.plan(old, cfg({"id": "a", "size": "1M", "socket": "n1.sock"}, vpc=[VPC]))
    assert not p.add and [c.id for c in p.refused] == ["a"]


def test_format_result():
    text = reload.format_result({"ok": True, "config": "t.toml", "added": ["b"], "removed": [],
                                 "unchanged": ["a"], "refused": [],
                                 "needs_restart": [{"kind": "daemon", "id": "metrics.listen", "reason": "r"}]})
    assert text.splitlines() == ["reloaded t.toml", "  added: b", "  unchanged: a",
                                 "  needs restart: daemon metrics.listen: r"]
    assert "nothing applied" in reload.format_result({"ok": True, "config": "t.toml"})


def test_qos_changes_apply_live_and_other_changes_still_need_a_restart():
    old = cfg({"id": "a", "size": "1M"}, {"id": "b", "size": "1M", "qos": {"iops": 100}},
              {"id": "c", "size": "1M"})
    new = cfg({"id": "a", "size": "1M", "qos": {"iops": 2000, "throughput": "1M"}},
              {"id": "b", "size": "2M", "qos": {"iops": 200}}, {"id": "c", "size": "1M"})
    p = reload.plan(old, new)
    assert not p.empty and ids(p.qos) == ["a", "b"]
    assert p.qos[0].qos.iops == 2000 and p.qos[0].qos.throughput == 1_000_000
    assert p.unchanged == ("c",) and not p.add and not p.remove
    (c,) = p.needs_restart  # b's size; its qos applies anyway
    assert c.id == "b" and "size" in c.reason and "qos" not in c.reason
    a, b, _ = p.running.blk
    assert a == new.blk[0]
    assert b.qos.iops == 200 and b.size == 1 << 20
    # Against what runs, only b's size is left.
    again = reload.plan(p.running, new)
    assert again.empty and ids(again.needs_restart) == ["b"]
    assert "qos changed: a" in reload.format_result({"ok": True, "config": "t.toml", "qos": ["a", "b"]})
