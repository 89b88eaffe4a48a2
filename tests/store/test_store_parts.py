"""The store's parts on their own: the codec, the file and its transactions, the series
catalogue, the roll-up cache and time parsing (each against the behaviour it replaced)."""

from __future__ import annotations

import json
import pickle
import sqlite3
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pytest

from kpistream.engine import FAR_FUTURE, Engine
from kpistream.errors import ConfigError
from kpistream.spec.metrics import config_from_dict
from kpistream.store.catalog import SeriesCatalog
from kpistream.store.codec import (
    MOVED_MODULES,
    config_from_json, config_to_json, decode_state, encode_state, key_from_json, key_to_json,
    labels_to_json, resolutions_from_json, resolutions_to_json)
from kpistream.store.db import DB_NAME, I64_MAX, I64_MIN, StoreDB, clamp, db_file, store_files
from kpistream.store.query import to_ms
from kpistream.store.resolutions import Resolution, default_resolutions
from kpistream.store.rollup import SettledCache
from kpistream.store.write import StateWriter
from kpistream.synthetic import generate_stream
from kpistream.wire.batch import BASE_LABELS, series_labels

CFG = config_from_dict({"time": {"lateness": "5s", "label_delay": "60s"},
                        "windows": [{"name": "10s", "type": "tumbling", "size": "10s"}],
                        "series": {"segments": ["region"]}})
KEY = ("churn", "3", "shadow", "predict", (("region", "eu"),))


@pytest.fixture(scope="module")
def partials():
    eng = Engine(CFG)
    for kind, b in generate_stream(300, seed=1, rate_per_s=20.0).batches(128):
        (eng.ingest_inference if kind == "inference" else eng.ingest_feedback)(b)
    eng.flush()
    parts = [p for p in eng.collect() if p.space == "time"]
    assert {p.family for p in parts} >= {"traffic", "latency", "classification"}
    return parts


# ------------------------------------------------------------------- codec

def test_states_are_stored_as_protocol_5_pickles(partials):
    for p in partials:
        blob = encode_state(p.state)
        assert blob == pickle.dumps(p.state, 5)                  # the format stores hold
        back = decode_state(blob)
        assert back is not p.state and type(back) is type(p.state)
        assert json.dumps(back.value()) == json.dumps(p.state.value())
        assert encode_state(back) == blob


def test_states_pickled_before_the_layout_move_still_load(partials):
    """Stores written before 0.2 name the state classes by their old modules."""
    moved = 0
    for p in partials:
        blob = pickle.dumps(p.state, 0)       # protocol 0 names classes as text lines
        old = blob
        for was, now in MOVED_MODULES.items():
            old = old.replace(f"c{now}\n".encode(), f"c{was}\n".encode())
        moved += old != blob
        back = decode_state(old)
        assert type(back) is type(p.state)
        assert json.dumps(back.value()) == json.dumps(p.state.value())
    assert moved == len(partials)
    with pytest.raises(ModuleNotFoundError):
        pickle.loads(old)                     # what a plain unpickler would do


def test_keys_labels_config_and_resolutions_as_json():
    kj = key_to_json(KEY)
    assert kj == '["churn","3","shadow","predict",[["region","eu"]]]'
    assert key_from_json(kj) == KEY
    assert key_from_json(key_to_json(KEY[:4] + ((),))) == KEY[:4] + ((),)
    assert json.loads(labels_to_json(series_labels(KEY))) == {
        "model": "churn", "model_version": "3", "variant": "shadow", "endpoint": "predict",
        "region": "eu"}
    assert config_from_json(config_to_json(CFG)) == CFG
    d = json.loads(config_to_json(CFG))
    d["from_a_newer_version"] = 1                                # unknown keys are ignored
    assert config_from_json(json.dumps(d)) == CFG
    res = default_resolutions(CFG)
    assert resolutions_from_json(resolutions_to_json(res)) == res
    assert json.loads(resolutions_to_json(res))[0] == {
        "name": "10s", "step_ms": 10_000, "retention_ms": 86_400_000}


# -------------------------------------------------------------- the file

def test_where_the_file_is(tmp_path):
    assert db_file(tmp_path) == tmp_path / DB_NAME
    assert db_file(tmp_path / "x.sqlite") == tmp_path / "x.sqlite"
    assert db_file(tmp_path / "x.db") == tmp_path / "x.db"
    (tmp_path / "plain").write_bytes(b"")
    assert db_file(tmp_path / "plain") == tmp_path / "plain"   # an existing file, any name
    f = tmp_path / DB_NAME
    assert store_files(f) == [f, tmp_path / f"{DB_NAME}-wal", tmp_path / f"{DB_NAME}-shm"]
    assert clamp(2**70) == I64_MAX and clamp(-2**70) == I64_MIN and clamp(5.9) == 5


def test_transactions_and_their_hooks(tmp_path):
    db = StoreDB(tmp_path, CFG)
    stale, rolled = [], []
    db.on_stale.append(lambda: stale.append(1))
    db.on_rollback.append(lambda: rolled.append(1))
    with db.transaction() as c:
        c.execute("INSERT INTO pending(res, start) VALUES ('1m', 0)")
    assert stale == [] and rolled == []
    with pytest.raises(RuntimeError), db.transaction() as c:
        c.execute("INSERT INTO pending(res, start) VALUES ('1m', 60000)")
        raise RuntimeError("boom")
    assert rolled == [1]
    assert db.conn.execute("SELECT start FROM pending").fetchall() == [(0,)]   # rolled back
    with sqlite3.connect(db.file) as other:                     # another writer commits
        other.execute("DELETE FROM pending")
    with db.transaction():
        pass
    assert stale == [1]
    assert db.nbytes() == sum(p.stat().st_size for p in store_files(db.file) if p.exists())
    db.close()
    db.close()                                                  # twice is fine
    ro = StoreDB(tmp_path, readonly=True)
    assert ro.config == CFG and ro.resolutions == default_resolutions(CFG)
    with pytest.raises(PermissionError), ro.transaction():
        pass
    with ro.snapshot():
        assert ro.conn.execute("SELECT COUNT(*) FROM pending").fetchone() == (0,)
    assert ro.resolution() is ro.base and ro.resolution("1h").step_ms == 3_600_000
    with pytest.raises(ValueError, match="unknown resolution"):
        ro.resolution("1d")
    ro.close()
    with pytest.raises(FileNotFoundError):
        StoreDB(tmp_path / "none", readonly=True)
    with pytest.raises(ConfigError, match="pane_ms"):
        StoreDB(tmp_path, config_from_dict({"windows": [{"name": "5s", "type": "tumbling",
                                                           "size": "5s"}],
                                            "series": {"segments": ["region"]}}))


# -------------------------------------------------------- series catalogue

def test_series_ids_and_label_matching(tmp_path):
    db = StoreDB(tmp_path, CFG)
    cat = SeriesCatalog(db.conn, list(BASE_LABELS) + ["region"])
    us = KEY[:4] + ((("region", "us"),),)
    with db.transaction():
        a, b = cat.id_for(KEY, 10), cat.id_for(us, 20)
        assert cat.id_for(KEY, 30) == a != b
    assert cat.info(a) == (KEY, series_labels(KEY)) and cat.info(999) is None
    assert cat.match({"region": "eu"}) == [a]
    assert cat.match({"model": "churn", "region": ["eu", "us"]}) == sorted([a, b])
    assert cat.match({"variant": "primary"}) == []
    with pytest.raises(ValueError, match="unknown label"):
        cat.match({"colour": "red"})
    reader = SeriesCatalog(db.conn, cat.label_cols)             # another object reads the table
    assert reader.info(b) == (us, series_labels(us))
    cat.forget()
    with db.transaction():
        assert cat.id_for(KEY, 40) == a                          # the same id from the table
    assert db.conn.execute("SELECT last_ms FROM series WHERE id = ?", (a,)).fetchone() == (10,)
    db.close()


# ------------------------------------------------------------------ writes

def test_horizons_follow_the_family(tmp_path, partials):
    db = StoreDB(tmp_path, CFG)
    w = StateWriter(db, SeriesCatalog(db.conn, list(BASE_LABELS) + ["region"]))
    assert w.horizon("traffic") == 0 and w.horizon("classification") == CFG.label_delay_ms
    with pytest.raises(ValueError, match="unknown metric family"):
        w.horizon("nope")
    heard = []
    w = StateWriter(db, SeriesCatalog(db.conn, list(BASE_LABELS) + ["region"]),
                    on_put=lambda res, starts: heard.append((res.name, starts)))
    assert w.write(partials, FAR_FUTURE) > 0
    assert heard == [("10s", {p.key for p in partials})]
    db.close()


def test_settled_cache_drops_only_what_a_rewrite_touches():
    res = (Resolution("10s", 10_000), Resolution("1m", 60_000), Resolution("1h", 3_600_000))
    cache = SettledCache(res)
    cache["1m"][0] = (30_000, {})
    cache["1m"][60_000] = (90_000, {})
    cache["1h"][0] = (120_000, {})
    cache.invalidate(res[0], {30_000})                  # at the mark: not yet merged
    assert set(cache["1m"]) == {0, 60_000}
    cache.invalidate(res[0], {90_000, 10_000})              # 90 s: at the other mark
    assert set(cache["1m"]) == {60_000} and set(cache["1h"]) == {0}
    cache.invalidate(res[1], {60_000})
    assert cache["1h"] == {}
    cache.invalidate(res[2], {0})                       # the top level has no cache above
    cache.clear()
    assert cache["1m"] == {}


# -------------------------------------------------------------------- time

@pytest.mark.parametrize("x, want", [
    (None, None), (1_767_225_600_000, 1_767_225_600_000), (np.int64(5), 5), (5.9, 5),
    (np.float32(7.0), 7), (" 42 ", 42), ("-3", -3),
    ("2026-01-01T00:00:00Z", 1_767_225_600_000), ("2026-01-01 01:00", 1_767_229_200_000),
    (datetime(2026, 1, 1, tzinfo=timezone.utc), 1_767_225_600_000),
    (datetime(2026, 1, 1), 1_767_225_600_000),
    (pd.Timestamp("2026-01-01T01:00:00+01:00"), 1_767_225_600_000),
    (np.datetime64("2026-01-01T00:00:00"), 1_767_225_600_000),
])
def test_times_in_every_accepted_form(x, want):
    assert to_ms(x, "start") == want


@pytest.mark.parametrize("x", [True, "not a time", "NaT", [1]])
def test_what_is_not_a_time(x):
    with pytest.raises(ValueError, match="start"):
        to_ms(x, "start")
