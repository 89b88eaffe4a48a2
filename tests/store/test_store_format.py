"""The on-disk format stays readable: a store file written by an earlier version of the
store (``data/golden_v1.sqlite``, with what it read back then in ``data/golden_v1.json``)
loads identically, and writing the same input again gives the same tables (stored states
byte for byte; derived float values to 12 digits, as their last bit depends on the numpy
build).

Regenerate both files only when the format changes on purpose (and say so in the
migration note): ``python tests/store/test_store_format.py``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sqlite3
import sys
from pathlib import Path

import pytest

if __name__ == "__main__":                                   # regeneration, from the repo root
    sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]

from conftest import same
from kpistream.demo_store import DEMO_CONFIG
from kpistream.engine import FAR_FUTURE, Engine
from kpistream.store import SeriesStore, open_store
from kpistream.synthetic import generate_stream

DATA = Path(__file__).parent / "data"
GOLDEN_DB = DATA / "golden_v1.sqlite"
GOLDEN_JSON = DATA / "golden_v1.json"
CFG = dataclasses.replace(DEMO_CONFIG, segments=())   # few series: a small file
TABLES = ("meta", "series", "states", "rows", "pending")


def build_golden(path: Path) -> Path:
    """A small live store: panes, final and provisional roll-ups, and pending buckets."""
    engine = Engine(CFG)
    stream = generate_stream(100, seed=5, rate_per_s=1.0)
    with SeriesStore(path, CFG) as store:
        for i, (kind, batch) in enumerate(stream.batches(32), 1):
            (engine.ingest_inference if kind == "inference" else engine.ingest_feedback)(batch)
            if i % 2 == 0:
                wm = engine.emit_watermark
                store.write(engine.collect(), wm)
                store.rollup(wm, provisional=i % 8 == 0)
        store.write(engine.collect(), engine.emit_watermark)    # left pending a roll-up
        return store.file


def _plain(x):
    """JSON-able, with NaN as the string "nan" so that equality is exact."""
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if hasattr(x, "item"):                                  # numpy / pandas scalars
        return _plain(x.item())
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)                                           # timestamps


def read_back(store: SeriesStore) -> dict:
    """What a reader sees: the config, the resolutions, every query row and every state."""
    out: dict = {"config": _plain(dataclasses.asdict(store.config)),
                 "resolutions": [dataclasses.astuple(r) for r in store.resolutions],
                 "info": {k: v for k, v in store.info()["resolutions"].items()},
                 "series": store.info()["series"], "rows": {}, "states": {}}
    for r in store.resolutions:
        df = store.query(resolution=r.name)
        out["rows"][r.name] = _plain(df.astype(object).where(df.notna(), None)
                                     .values.tolist())
        out["states"][r.name] = _plain([[s.start, list(s.series), s.family,
                                         type(s.state).__name__, s.state.value()]
                                        for s in store.states(resolution=r.name)])
    return json.loads(json.dumps(out))


def _tables(file: Path) -> dict[str, list[tuple]]:
    """Every table, ordered; without the meta ``watermark`` row (added in schema 1 since
    the golden file: a restarted publisher resumes from it; checked on its own)."""
    c = sqlite3.connect(file)
    try:
        out = {t: c.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in TABLES}
    finally:
        c.close()
    out["meta"] = [r for r in out["meta"] if r[0] != "watermark"]
    return out


def _copy(tmp_path: Path, name: str) -> Path:
    """A copy of the golden file in its own directory (the checked-in file is never opened
    by SQLite: a WAL file would leave -wal / -shm files beside it)."""
    dst = tmp_path / name / "kpistream.sqlite"
    dst.parent.mkdir()
    shutil.copyfile(GOLDEN_DB, dst)
    return dst.parent


@pytest.fixture()
def golden(tmp_path) -> Path:
    return _copy(tmp_path, "old")


@pytest.fixture()
def golden_tables(tmp_path) -> dict[str, list[tuple]]:
    return _tables(_copy(tmp_path, "pristine") / "kpistream.sqlite")


def test_a_store_written_before_loads_identically(golden, golden_tables):
    want = json.loads(GOLDEN_JSON.read_text())
    with open_store(golden, readonly=True) as store:
        assert same(read_back(store), want)
    with SeriesStore(golden) as store:                     # and a writer opens it as it is
        assert same(read_back(store), want)
    assert same(_tables(golden / "kpistream.sqlite"), golden_tables)


def test_the_same_input_writes_the_same_tables(golden_tables, tmp_path):
    fresh = build_golden(tmp_path / "new")
    assert same(_tables(fresh), golden_tables)          # states byte for byte too
    with open_store(fresh, readonly=True) as store:     # the last watermark written
        assert store.watermark is not None and store.watermark > 1_700_000_000_000
    with open_store(fresh, readonly=True) as store:
        assert same(read_back(store), json.loads(GOLDEN_JSON.read_text()))


def test_a_store_written_before_takes_more_writes(golden, tmp_path):
    """Reopened by a writer, the old file goes on exactly like a store written now."""
    fresh = build_golden(tmp_path / "new")
    for path in (golden, fresh):
        with SeriesStore(path) as store:
            store.rollup(FAR_FUTURE)
    assert same(_tables(golden / "kpistream.sqlite"), _tables(fresh))


if __name__ == "__main__":
    DATA.mkdir(exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        Path(str(GOLDEN_DB) + suffix).unlink(missing_ok=True)
    tmp = DATA / "_build"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.move(str(build_golden(tmp)), GOLDEN_DB)
    shutil.rmtree(tmp)
    with open_store(GOLDEN_DB, readonly=True) as s:
        GOLDEN_JSON.write_text(json.dumps(read_back(s), indent=None, sort_keys=True) + "\n")
    for suffix in ("-wal", "-shm"):                      # left by the read-only open
        Path(str(GOLDEN_DB) + suffix).unlink(missing_ok=True)
    print(GOLDEN_DB, GOLDEN_DB.stat().st_size, "bytes;", GOLDEN_JSON, GOLDEN_JSON.stat().st_size)
