"""The raw event archive: round trip, rotation by size and by age, atomic files, the shard hook."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from actors.archive import (EventArchive, feedback_batch_from_table, inference_batch_from_table,
                            read_archive)
from kpistream.wire.batch import (FeedbackBatch, InferenceBatch, concat_feedback, concat_inference,
                             series_labels)
from kpistream.clock import ManualClock
from kpistream.synthetic import generate_stream

T0 = 1_767_225_600_000   # 2026-01-01T00:00:00Z


def _inference(n: int, start: int = 0, ts: int = T0, features: bool = True) -> InferenceBatch:
    recs = []
    for i in range(start, start + n):
        recs.append({"event_id": f"e{i}", "request_id": f"r{i}", "ts": ts + i, "model": "m",
                     "model_version": "1", "variant": "primary" if i % 3 else "shadow",
                     "endpoint": "predict", "latency_ms": 1.0 + i, "status": "ok",
                     "pred_label": str(i % 2), "pred_score": 0.25, "pred_value": None,
                     "ranking": None, "segments": {"region": "eu"}, "cost_usd": None,
                     "tokens": None,
                     "features": {"a": float(i), "b": "x"} if features and i % 2 else None})
    return InferenceBatch.from_records(recs)


def _feedback(n: int, start: int = 0, ts: int = T0) -> FeedbackBatch:
    return FeedbackBatch.from_records([
        {"event_id": f"f{i}", "request_id": f"r{i}", "ts": ts + i, "kind": "label",
         "label": str(i % 2), "value": None, "relevance": None} for i in range(start, start + n)])


def _rows(kind, b) -> list[tuple]:
    """Comparable rows of a batch (series and labels decoded; NaN made None)."""
    def f(x):
        return None if isinstance(x, float) and np.isnan(x) else x

    out = []
    for i in range(len(b)):
        if kind == "inference":
            lab = b.labels[b.pred_label[i]] if b.pred_label[i] >= 0 else None
            rank = b.rank_items[b.rank_offsets[i]:b.rank_offsets[i + 1]].tolist()
            out.append((int(b.event_id[i]), int(b.request_id[i]), int(b.ts[i]),
                        tuple(sorted(series_labels(b.series_keys[b.series[i]]).items())),
                        float(b.latency_ms[i]), bool(b.error[i]), lab, f(float(b.pred_score[i])),
                        f(float(b.pred_value[i])), tuple(rank), f(float(b.cost_usd[i])),
                        f(float(b.tokens[i])),
                        None if b.features is None else repr(b.features[i])))
        else:
            lab = b.labels[b.label[i]] if b.label[i] >= 0 else None
            lo, hi = b.rel_offsets[i], b.rel_offsets[i + 1]
            out.append((int(b.event_id[i]), int(b.request_id[i]), int(b.ts[i]), int(b.kind[i]),
                        lab, f(float(b.value[i])), tuple(b.rel_items[lo:hi].tolist()),
                        tuple(b.rel_grades[lo:hi].tolist())))
    return out


def test_round_trip_demo_stream(tmp_path):
    """Every row of a mixed stream (every metric family) comes back exactly, in order."""
    stream = generate_stream(3000, seed=3)
    arch = EventArchive(tmp_path, 0, max_rows=1000, clock=ManualClock(T0))
    sent = {"inference": [], "feedback": []}
    for kind, b in stream.batches(500):
        arch.append(kind, b)
        sent[kind].append(b)
    arch.append("inference", _inference(50))       # with features
    sent["inference"].append(_inference(50))
    bare = InferenceBatch.from_records([         # no segments, no label, regression, ranking
        {"event_id": "b1", "request_id": "rb1", "ts": T0, "model": "m", "model_version": "1",
         "variant": "primary", "latency_ms": 1.0, "status": "error", "pred_value": 2.5},
        {"event_id": "b2", "request_id": "rb2", "ts": T0, "model": "m", "model_version": "1",
         "variant": "primary", "latency_ms": 1.0, "status": "ok", "ranking": ["x", "y"],
         "segments": {"region": "us"}}])
    arch.append("inference", bare)
    sent["inference"].append(bare)
    arch.flush()
    st = arch.stats()
    n_in = sum(len(b) for v in sent.values() for b in v)
    assert st["rows_in"] == st["rows"] == n_in and st["buffered"] == 0 and st["errors"] == 0
    for kind, concat, back in (("inference", concat_inference, inference_batch_from_table),
                               ("feedback", concat_feedback, feedback_batch_from_table)):
        table = read_archive(tmp_path, kind)
        assert table.num_rows == sum(len(b) for b in sent[kind])
        got = back(table)
        want = concat(sent[kind])
        # the archive partitions by UTC day, then orders by arrival: same as sent
        assert _rows(kind, got) == _rows(kind, want)
    feats = read_archive(tmp_path, "inference", columns=["features"]).column("features")
    assert feats.null_count == feats.length() - 25


def test_rotation_by_size(tmp_path):
    clock = ManualClock(T0)
    arch = EventArchive(tmp_path, 2, max_rows=100, max_age_s=3600, clock=clock)
    arch.append("inference", _inference(60))
    assert arch.maybe_flush() == 0                 # not full, not old
    arch.append("inference", _inference(60, start=60))
    assert arch.maybe_flush() == 2                 # 120 rows: files of at most 100 rows
    files = arch.files("inference")
    assert [pq.read_metadata(f).num_rows for f in files] == [100, 20]
    assert [f.name for f in files] == ["shard-2-00000000.parquet", "shard-2-00000001.parquet"]
    assert files[0].parent.name == "date=2026-01-01"
    # the ingest path bounds memory by itself when nobody collects: 2 x max_rows
    for k in range(5):
        arch.append("feedback", _feedback(50, start=50 * k))
    assert arch.stats()["buffered"] < 200 and arch.stats()["files"] == 4
    arch.flush()
    assert arch.stats()["rows"] == 120 + 250 and arch.stats()["dropped"] == 0
    # a new writer for the same shard continues the numbers, never overwrites
    again = EventArchive(tmp_path, 2, max_rows=100, clock=clock)
    again.append("inference", _inference(5))
    again.flush()
    assert again.files("inference")[-1].name == "shard-2-00000005.parquet"


def test_an_archive_at_a_filesystem_uri_round_trips_and_continues_its_numbers(tmp_path):
    """A URI root goes through its pyarrow filesystem (what s3:// and gs:// use; file://
    here, with no cloud reachable): files by day and shard, numbers continued by a new
    writer, read back row for row by read_archive."""
    uri = (tmp_path / "arch").as_uri()
    assert uri.startswith("file://")
    clock = ManualClock(T0)
    arch = EventArchive(uri, 3, max_rows=100, clock=clock)
    arch.append("inference", _inference(150))
    arch.append("feedback", _feedback(40))
    arch.flush()
    assert arch.stats()["errors"] == 0, arch.stats()
    files = arch.files("inference")
    assert [f.rsplit("/", 1)[-1] for f in files] == ["shard-3-00000000.parquet",
                                                     "shard-3-00000001.parquet"]
    assert all("/inference/date=2026-01-01/" in f for f in files)
    again = EventArchive(uri, 3, max_rows=100, clock=clock)
    again.append("inference", _inference(5, start=150))
    again.flush()
    assert again.files("inference")[-1].endswith("shard-3-00000003.parquet")
    got = inference_batch_from_table(read_archive(uri, "inference"))
    assert _rows("inference", got) == _rows("inference", concat_inference(
        [_inference(150), _inference(5, start=150)]))
    assert read_archive(uri, "feedback").num_rows == 40
    assert read_archive(str(tmp_path / "arch"), "feedback").num_rows == 40   # same files


def test_the_shard_log_refuses_an_object_store_and_says_why():
    from pydantic import ValidationError

    from app.sidecar import SidecarArgs

    with pytest.raises(ValidationError, match="(?s)log_dir.*filesystem path.*fsync"):
        SidecarArgs(log_dir="s3://bucket/kpistream/log")
    assert SidecarArgs(archive_dir="s3://bucket/kpistream/archive").archive_dir.startswith("s3")


def test_rotation_by_age_and_day(tmp_path):
    clock = ManualClock(T0 + 86_400_000 - 1000)
    arch = EventArchive(tmp_path, 0, max_rows=10_000, max_age_s=30, clock=clock)
    arch.append("inference", _inference(10, ts=T0 + 86_400_000 - 5))   # spans midnight
    arch.append("feedback", _feedback(3, ts=T0))
    clock.advance(29_999)
    assert arch.maybe_flush() == 0
    clock.advance(1)
    assert arch.maybe_flush() == 3
    days = sorted(p.parent.name for p in arch.files("inference"))
    assert days == ["date=2026-01-01", "date=2026-01-02"]
    assert [p.parent.name for p in arch.files("feedback")] == ["date=2026-01-01"]
    assert arch.maybe_flush() == 0 and arch.stats()["buffered"] == 0
    assert sum(pq.read_metadata(p).num_rows for p in arch.files()) == 13


def test_atomic_files_only_and_errors_never_raise(tmp_path, monkeypatch):
    clock = ManualClock(T0)
    arch = EventArchive(tmp_path, 1, max_rows=50, max_age_s=1, clock=clock, retry_s=5)
    arch.append("inference", _inference(20))
    import pyarrow.parquet as pqm

    real = pqm.write_table

    def broken(table, where, **kw):   # a partial file, then a crash mid-write
        with open(where, "wb") as fh:
            fh.write(b"PAR1 partial")
        raise OSError("disk full")

    monkeypatch.setattr(pqm, "write_table", broken)
    clock.advance(2000)
    assert arch.maybe_flush() == 0                     # counted, not raised
    st = arch.stats()
    assert st["errors"] == 1 and "disk full" in st["last_error"] and st["buffered"] == 20
    # nothing half-written is visible, not even under a temporary name
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    monkeypatch.setattr(pqm, "write_table", real)
    assert arch.maybe_flush() == 0                     # waits retry_s before trying again
    clock.advance(5000)
    assert arch.maybe_flush() == 1
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert [p.name for p in files] == ["shard-1-00000000.parquet"]
    assert pq.read_table(files[0]).num_rows == 20
    # a disk that keeps failing: memory stays bounded (2 x max_rows), drops counted
    monkeypatch.setattr(pqm, "write_table", broken)
    for k in range(10):
        arch.append("feedback", _feedback(30, start=30 * k))
    st = arch.stats()
    assert st["buffered"] <= 100 and st["dropped"] == 300 - st["buffered"]
    assert st["rows_in"] == 320


def test_shard_archives_accepted_batches(tmp_path):
    from actors.shard import Shard

    clock = ManualClock(T0 + 1000)
    cfg = {"time": {"lateness": "5s", "label_delay": "60s", "max_future": "5m"},
           "windows": [{"name": "10s", "type": "tumbling", "size": "10s"}]}
    shard = Shard(0, cfg, clock=clock, archive_dir=str(tmp_path / "archive"),
                  archive_options={"max_age_s": 10, "background": False})
    shard.ingest([("inference", _inference(40)), ("feedback", _feedback(40))])
    shard.ingest([("inference", _inference(40))])      # a re-delivery: nothing accepted
    shard.collect()
    assert shard.stats()["archive"]["files"] == 0      # young: stays in memory
    clock.advance(10_000)
    _, _, st = shard.collect()
    assert st["archive"]["files"] == 2 and st["archive"]["rows"] == 80
    assert read_archive(tmp_path / "archive", "inference").num_rows == 40
    # no archive: no files, nothing in stats
    plain = Shard(1, cfg, clock=clock)
    plain.ingest_inference(_inference(5))
    assert "archive" not in plain.collect()[2]
    assert os.listdir(tmp_path) == ["archive"]


def test_background_writer(tmp_path):
    """In background mode maybe_flush only hands over; the files appear from the writer thread."""
    import time

    clock = ManualClock(T0)
    arch = EventArchive(tmp_path, 0, max_rows=100, clock=clock, background=True)
    arch.append("inference", _inference(150))
    assert arch.maybe_flush() == 0
    deadline = time.monotonic() + 30
    while arch.stats()["files"] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert arch.stats()["files"] == 2 and arch.stats()["rows"] == 150
    arch.append("feedback", _feedback(7))
    assert arch.flush() == 1                     # flush() writes before it returns
    assert read_archive(tmp_path, "feedback").num_rows == 7
