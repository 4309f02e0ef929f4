from __future__ import annotations

import pandas as pd
import pytest

from layerlab.errors import LayerlabError
from layerlab.store import Store, atomic_write, job_key


def test_job_key_is_stable_and_sensitive():
    a = job_key("timm:resnet18", "criticality", {"trials": 3, "layers": ["a", "b"]})
    assert a == job_key("timm:resnet18", "criticality", {"layers": ["a", "b"], "trials": 3})
    assert a != job_key("timm:resnet18", "criticality", {"trials": 4, "layers": ["a", "b"]})
    assert a != job_key("timm:resnet34", "criticality", {"trials": 3, "layers": ["a", "b"]})
    assert len(a) == 16


def test_write_read_meta_and_query(tmp_path):
    s = Store(tmp_path)
    s.write("crit-x", "k1", pd.DataFrame({"model": ["a", "a"], "v": [1.0, 2.0]}), {"config": {"t": 1}})
    s.write("crit-x", "k2", pd.DataFrame({"model": ["b"], "v": [5.0]}))
    assert s.analyses() == ["crit-x"] and s.has("crit-x", "k1") and not s.has("crit-x", "k3")
    assert sorted(s.read("crit-x")["v"]) == [1.0, 2.0, 5.0]
    assert s.shard_meta(s.shard("crit-x", "k1"))["config"] == {"t": 1}
    assert "torch" in s.shard_meta(s.shard("crit-x", "k1"))["versions"]
    q = s.query("SELECT model, sum(v) AS s FROM crit_x GROUP BY model ORDER BY model")
    assert q["s"].tolist() == [3.0, 5.0]
    with pytest.raises(LayerlabError, match="query failed.*tables here: crit_x$"):  # the name SQL accepts
        s.query("SELECT * FROM nope")


def test_atomic_write_leaves_nothing_on_crash(tmp_path):
    target = tmp_path / "x" / "shard.parquet"
    atomic_write(target, lambda f: f.write(b"old"))

    def crash(f):
        f.write(b"half")
        raise KeyboardInterrupt  # as if killed mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert target.read_bytes() == b"old"  # the finished file is intact
    assert [p.name for p in target.parent.iterdir()] == ["shard.parquet"]  # no temp left


