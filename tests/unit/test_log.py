import io
import logging
import os
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nitro.log import LogfmtFormatter, format_value, log_event, setup_logging

TS = r"ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


@pytest.fixture
def capture():
    """setup_logging on a StringIO; restores the root logger afterwards."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    handler = setup_logging("debug", stream=stream)
    yield stream
    root.removeHandler(handler)
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def lines(stream):
    return stream.getvalue().splitlines()


@pytest.mark.parametrize(
    "value, expected",
    [
        ("vol0", "vol0"),
        ("/run/nitro/vol0.sock", "/run/nitro/vol0.sock"),
        ("frontend connected", '"frontend connected"'),
        ("a=b", '"a=b"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("back\\slash", '"back\\\\slash"'),
        ("two\nlines", '"two\\nlines"'),
        ("tab\there", '"tab\\there"'),
        ("bell\x07", '"bell\\x07"'),
        ("", '""'),
        (None, '""'),
        (True, "true"),
        (False, "false"),
        (42, "42"),
        (0x130000044, "5100273732"),
        (1.5, "1.5"),
        (b"raw bytes", '"raw bytes"'),
        ("dévice", "dévice"),
    ],
)
def test_format_value(value, expected):
    assert format_value(value) == expected


def test_format_value_survives_broken_str():
    class Bad:
        def __str__(self):
            raise RuntimeError("no str")

        def __repr__(self):
            raise RuntimeError("no repr")

    class ReprOnly:
        def __str__(self):
            raise RuntimeError("no str")

        def __repr__(self):
            return "<ReprOnly>"

    assert format_value(Bad()) == '"<unprintable Bad>"'
    assert format_value(ReprOnly()) == "<ReprOnly>"


def unquote(token):
    """Inverse of format_value, as a logfmt reader would do it."""
    if not token.startswith('"'):
        return token
    body, out, i = token[1:-1], [], 0
    simple = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\"}
    while i < len(body):
        if body[i] != "\\":
            out.append(body[i])
            i += 1
        elif body[i + 1] == "x":
            out.append(chr(int(body[i + 2 : i + 4], 16)))
            i += 4
        else:
            out.append(simple[body[i + 1]])
            i += 2
    return "".join(out)


@given(st.text())
def test_format_value_is_one_token_and_round_trips(text):
    out = format_value(text)
    assert "\n" not in out and "\r" not in out
    if " " in text or "=" in text or '"' in text or not text:
        assert out.startswith('"') and out.endswith('"')
    assert unquote(out) == text


def test_record_layout(capture):
    log = logging.getLogger("nitro.vhost")
    log.info("frontend connected", extra={"fields": {"device": "vol0", "queues": 2, "peer": "qemu pid 7"}})
    (line,) = lines(capture)
    assert re.fullmatch(
        TS + r' level=info logger=nitro.vhost msg="frontend connected" device=vol0 queues=2 peer="qemu pid 7"', line
    ), line


def test_log_event_helper(capture):
    log = logging.getLogger("nitro.blk")
    log_event(log, "warning", "image 100% full", device="vol0", path="/var/lib/nitro/a b.img")
    log_event(log, logging.DEBUG, "dbg")
    (first, second) = lines(capture)
    assert 'level=warning logger=nitro.blk msg="image 100% full" device=vol0 path="/var/lib/nitro/a b.img"' in first
    assert second.endswith("level=debug logger=nitro.blk msg=dbg")


def test_log_event_bad_level_does_not_raise(capture):
    log_event(logging.getLogger("nitro"), "loud", "x")
    (line,) = lines(capture)
    assert "level=error" in line and "bad_level=loud" in line


def test_reserved_field_names_are_renamed(capture):
    logging.getLogger("nitro").info("m", extra={"fields": {"msg": "other", "level": 1, "bad key": 2}})
    (line,) = lines(capture)
    assert line.endswith("msg=m field_msg=other field_level=1 bad_key=2")


def test_exception_is_one_line(capture):
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        logging.getLogger("nitro").exception("failed", extra={"fields": {"device": "vol0"}})
    (line,) = lines(capture)
    assert "msg=failed device=vol0 exc=\"Traceback" in line
    assert "ValueError: boom\\nsecond line" in line


def test_bad_format_arguments_never_raise():
    # Formatted directly: pytest's own log capture would raise on these records.
    fmt = LogfmtFormatter()
    first = fmt.format(logging.LogRecord("nitro", logging.INFO, __file__, 1, "%d requests", ("many",), None))
    second = fmt.format(logging.LogRecord("nitro", logging.INFO, __file__, 1, "%s and %s", ("one",), None))
    assert 'msg="%d requests"' in first and "log_error=" in first
    assert 'msg="%s and %s"' in second and "log_error=" in second


def test_non_mapping_fields(capture):
    logging.getLogger("nitro").info("m", extra={"fields": ["not", "a", "dict"]})
    (line,) = lines(capture)
    assert "fields=\"['not', 'a', 'dict']\"" in line


def test_level_filtering_and_reconfigure():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        first, second = io.StringIO(), io.StringIO()
        setup_logging("warning", stream=first)
        h = setup_logging("WARN", stream=second)  # replaces the first handler
        logging.getLogger("nitro").info("hidden")
        logging.getLogger("nitro").error("shown")
        assert first.getvalue() == ""
        assert "msg=shown" in second.getvalue() and "hidden" not in second.getvalue()
        assert sum(isinstance(x.formatter, LogfmtFormatter) for x in root.handlers) == 1
        root.removeHandler(h)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_bad_level_name():
    with pytest.raises(ValueError, match="invalid log level 'verbose'"):
        setup_logging("verbose", stream=io.StringIO())


def test_journal_priority_prefix(tmp_path, monkeypatch):
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    with open(tmp_path / "journal", "w+") as f:
        st = os.fstat(f.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        try:
            h = setup_logging("info", stream=f)
            logging.getLogger("nitro").error("disk gone")
            logging.getLogger("nitro").info("fine")
            root.removeHandler(h)
        finally:
            root.handlers[:] = saved[0]
            root.setLevel(saved[1])
        f.seek(0)
        err, info = f.read().splitlines()
    assert err.startswith("<3>ts=") and info.startswith("<6>ts=")


def test_formatter_never_raises_on_hostile_record():
    record = logging.LogRecord("nitro", logging.INFO, __file__, 1, "m", None, None)
    record.fields = {object(): object()}
    record.levelname = None  # a broken record
    out = LogfmtFormatter().format(record)
    assert "log record could not be formatted" in out
