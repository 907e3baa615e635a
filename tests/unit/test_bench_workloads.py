"""`--workloads` of bench.blk, bench.crypto and bench.rbd: one parser."""

from __future__ import annotations

import pytest

from bench import crypto, rbd
from bench.blk import WORKLOADS, pick_workloads


def names(spec: str, known=WORKLOADS) -> list[str]:
    return [w.name for w in pick_workloads(spec, known)]


def test_named_workloads_in_the_order_given():
    assert names(" read-128k,randread-4k ") == ["read-128k", "randread-4k"]


def test_naming_none_means_all():
    assert names("") == [w.name for w in WORKLOADS]
    assert names(" , ") == [w.name for w in WORKLOADS]


def test_an_unknown_name_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="unknown workload nope; known: randread-4k"):
        pick_workloads("randread-4k,nope", WORKLOADS)


@pytest.mark.parametrize("main", [crypto.main, rbd.main])
def test_benches_refuse_an_unknown_workload_before_running(main, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--workloads", "nope"])
    assert e.value.code == 2
    assert "unknown workload nope" in capsys.readouterr().err
