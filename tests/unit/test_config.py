"""Config parsing: every bad input names the file, the key and the reason."""

import os
from pathlib import Path

import pytest

from nitro import config


def load_text(tmp_path: Path, text: str) -> config.DaemonConfig:
    f = tmp_path / "nitro.toml"
    f.write_text(text)
    return config.load(f, runtime_dir=tmp_path / "run", state_dir=tmp_path / "state")


def test_embedded_default_serves_one_sparse_volume(tmp_path):
    cfg = config.load(None, runtime_dir=tmp_path / "run", state_dir=tmp_path / "state")
    assert cfg.metrics_listen == "127.0.0.1:9180"
    (blk,) = cfg.blk
    assert blk.size == 1 << 30
    assert blk.socket == tmp_path / "run" / "vol0.sock"
    assert blk.image == tmp_path / "state" / "vol0.img"
    assert cfg.control_socket == tmp_path / "run" / "control.sock"


def test_full_blk_table(tmp_path):
    cfg = load_text(tmp_path, """
[daemon]
log_level = "debug"
[metrics]
listen = ""
[[blk]]
id = "a"
socket = "/abs/a.sock"
image = "a.raw"
size = "512M"
readonly = true
queues = 4
queue_size = 128
serial = "SER-A"
[[blk]]
id = "b"
""")
    a, b = cfg.blk
    assert (a.socket, a.image, a.size, a.readonly, a.queues, a.queue_size, a.serial) == (
        Path("/abs/a.sock"), tmp_path / "state/a.raw", 512 << 20, True, 4, 128, "SER-A")
    assert b.size is None and b.socket.name == "b.sock" and b.serial == "b"
    assert cfg.metrics_listen == "" and cfg.log_level == "debug"


@pytest.mark.parametrize("text, key, reason", [
    ("[[blk]]\nid='a'\nsize='1X'", "blk[0].size", "expected a size"),
    ("[[blk]]\nid='a'\nsize=1000", "blk[0].size", "multiple of 512"),
    ("[[blk]]\nid='a'\nqueues=0", "blk[0].queues", "1..16"),
    ("[[blk]]\nid='a'\nqueue_size=100", "blk[0].queue_size", "power of two"),
    ("[[blk]]\nid='a b'", "blk[0].id", "must match"),
    ("[[blk]]\nsocket='x'", "blk[0].id", "required"),
    ("[[blk]]\nid='a'\ncolour='red'", "blk[0].colour", "unknown key"),
    ("[[blk]]\nid='a'\n[[blk]]\nid='a'", "blk[1].id", "duplicate"),
    ("[[blk]]\nid='a'\nreadonly='yes'", "blk[0].readonly", "true or false"),
    ("[daemon]\nlog_level='loud'", "daemon.log_level", "expected debug"),
    ("[[blk]]\nid='a'\nserial='x'\nsize=", "-", "invalid TOML"),
    ("bogus = 1", "bogus", "unknown key"),
    ("[daemon]\nworkers=0", "daemon.workers", "1..64"),
    ("[daemon]\nworkers=65", "daemon.workers", "1..64"),
    ("[daemon]\ncpus='0-'", "daemon.cpus", "CPU list"),
    ("[daemon]\ncpus='3-1'", "daemon.cpus", "CPU list"),
    ("[daemon]\ncpus='0,0'", "daemon.cpus", "CPU list"),
    ("[daemon]\ncpus='4095'", "daemon.cpus", "not available to nitro"),
    ("[daemon]\npoll_us=1001", "daemon.poll_us", "adaptive"),
    ("[daemon]\npoll_us='fast'", "daemon.poll_us", "adaptive"),
])
def test_bad_config_names_file_key_reason(tmp_path, text, key, reason):
    with pytest.raises(config.ConfigError) as ei:
        load_text(tmp_path, text)
    e = ei.value
    assert e.file == str(tmp_path / "nitro.toml") and e.key == key and reason in e.reason
    assert str(e).startswith(f"{tmp_path / 'nitro.toml'}: {key}: ")


def test_missing_file(tmp_path):
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load(tmp_path / "nope.toml")


def test_encryption_table(tmp_path):
    cfg = load_text(tmp_path, '[[blk]]\nid="e"\nencryption = { key_file = "/etc/nitro/e.key" }\n')
    assert cfg.blk[0].encryption == config.EncryptionConfig(key_file=Path("/etc/nitro/e.key"))
    for bad, why in [('{ key_file = "a", passphrase_file = "b" }', "exactly one"),
                     ('{ }', "exactly one"), ('"k"', "expected a table"),
                     ('{ cipher = "x" }', "unknown key")]:
        with pytest.raises(config.ConfigError, match=why):
            load_text(tmp_path, f'[[blk]]\nid="e"\nencryption = {bad}\n')


def test_engine_settings(tmp_path):
    cfg = load_text(tmp_path, "[daemon]\nworkers = 3\ncpus = '0'\npoll_us = 50\n")
    assert (cfg.engine.workers, cfg.engine.cpus, cfg.engine.poll_us) == (3, (0,), 50)
    assert cfg.engine.worker_cpus() == [0, 0, 0]
    assert config.parse_cpu_list("0-2,5") == (0, 1, 2, 5)
    default = load_text(tmp_path, "")
    assert default.engine.poll_us is None and default.engine.cpus is None
    assert default.engine.workers == len(os.sched_getaffinity(0))
    assert load_text(tmp_path, "[daemon]\ncpus = '0'\n").engine.workers == 1


def test_hostile_tenant_limits_default_to_seccomp_on_and_no_memory_cap(tmp_path):
    e = load_text(tmp_path, "").engine
    assert e.seccomp is True and e.max_guest_memory is None
    e = load_text(tmp_path, '[daemon]\nseccomp = false\nmax_guest_memory = "64G"\n').engine
    assert e.seccomp is False and e.max_guest_memory == 64 << 30


@pytest.mark.parametrize("line,key", [
    ('seccomp = "yes"', "daemon.seccomp"),
    ('max_guest_memory = "lots"', "daemon.max_guest_memory"),
    ("max_guest_memory = 0", "daemon.max_guest_memory"),
])
def test_hostile_tenant_limits_are_checked(tmp_path, line, key):
    with pytest.raises(config.ConfigError) as e:
        load_text(tmp_path, f"[daemon]\n{line}\n")
    assert e.value.key == key


def test_qos_table(tmp_path):
    cfg = load_text(tmp_path, """
[[blk]]
id = "a"
qos = { iops = 2000, throughput = "100M", burst_iops = 3000, burst_seconds = 60 }
[[blk]]
id = "b"
[blk.qos]
iops = 500
""")
    a, b = cfg.blk
    assert a.qos == config.QosConfig(iops=2000, throughput=100_000_000, burst_iops=3000, burst_seconds=60)
    assert b.qos == config.QosConfig(iops=500)
    assert load_text(tmp_path, "[[blk]]\nid = 'c'\n").blk[0].qos == config.QosConfig()  # unlimited


@pytest.mark.parametrize("qos, key, reason", [
    ("{ iops = -1 }", "iops", "0..1000000000000"),
    ("{ throughput = '1X' }", "throughput", "such as 125000"),
    ("{ iops = 10, burst_iops = 10, burst_seconds = 1 }", "burst_iops", "above iops"),
    ("{ burst_iops = 10, burst_seconds = 1 }", "burst_iops", "needs a baseline"),
    ("{ iops = 10, burst_iops = 20 }", "burst_seconds", "go together"),
    ("{ iops = 10, burst_seconds = 20 }", "burst_iops", "go together"),
    ("{ iops = 10, burst_iops = 20, burst_seconds = 1000001 }", "burst_seconds", "0..1000000"),
    ("{ latency = 1 }", "latency", "unknown key"),
    ("5", "", "expected a table"),
])
def test_bad_qos(tmp_path, qos, key, reason):
    with pytest.raises(config.ConfigError) as ei:
        load_text(tmp_path, f"[[blk]]\nid = 'a'\nqos = {qos}\n")
    assert ei.value.key == "blk[0].qos" + (f".{key}" if key else "") and reason in ei.value.reason


def test_parse_qos_changes_only_the_keys_given():
    base = config.QosConfig(iops=100, burst_iops=200, burst_seconds=5)
    assert config.parse_qos({"throughput": "1M"}, base, "cli") == config.QosConfig(
        iops=100, throughput=1_000_000, burst_iops=200, burst_seconds=5)
    with pytest.raises(config.ConfigError, match="above iops"):
        config.parse_qos({"iops": 300}, base, "cli")
