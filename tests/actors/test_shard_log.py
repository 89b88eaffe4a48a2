"""The shard log: a shard killed at any point and started again from its log gives exactly the
windows of a shard that never stopped; torn writes, damage and truncation; the publisher
never lets a final window change."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from actors.log import ShardLog
from actors.shard import Shard
from kpistream.clock import ManualClock
from kpistream.errors import InputError
from kpistream.spec.metrics import config_from_dict
from kpistream.synthetic import generate_stream
from kpistream.wire.batch import InferenceBatch
from kpistream.wire.frames import decode_batch, encode_batch
from kpistream.windows.publish import PublishStep

METRICS = {"version": 1, "time": {"lateness": "2s", "label_delay": "20s", "max_future": "5m"},
           "windows": [{"name": "10s", "type": "tumbling", "size": "10s"},
                       {"name": "1m", "type": "sliding", "size": "60s", "step": "10s"}],
           "series": {"segments": ["region"]}}
CFG = config_from_dict(METRICS)


@pytest.fixture(scope="module")
def stream():
    """Interleaved traffic in arrival order: late, duplicate and early-feedback events."""
    s = generate_stream(3000, seed=21, rate_per_s=25.0)
    return list(s.batches(97)), s


def _run(batches, log_dir=None, crash_at=(), clock_step=400, log_options=None):
    """Feed ``batches`` to a shard, collecting every 25 batches into one publish step; at
    each index in ``crash_at`` the shard is dropped (as a SIGKILL would: no close) and a
    new one starts from the log.  Returns the final rows and the step."""
    t0 = int(batches[0][1].ts.min())
    clock = ManualClock(t0)
    mk = lambda: Shard(0, METRICS, clock=clock, log_dir=log_dir,  # noqa: E731
                       log_options=log_options, processing_time_watermark=False)
    shard = mk()
    step = PublishStep(CFG, clock=clock)
    rows = []
    for i, (kind, b) in enumerate(batches):
        if i in crash_at:
            shard = mk()
        (shard.ingest_inference if kind == "inference" else shard.ingest_feedback)(b)
        clock.advance(clock_step)
        if i % 25 == 24:
            step.run([shard.collect(int(step.agg.emitted_watermark))])
            rows += step.final_rows
    step.run([shard.flush()])
    rows += step.final_rows
    return rows, step, shard


def _key(r):
    return (r["window"], r["window_start"], r["model"], r["model_version"], r["variant"],
            r["region"], r["metric"])


def test_frames_round_trip_every_field():
    recs = [{"event_id": f"e{i}", "request_id": f"r{i}", "ts": 1_767_225_600_000 + i,
             "model": "m", "model_version": "1", "variant": "primary", "endpoint": "",
             "latency_ms": 1.5 * i, "status": "error" if i % 5 == 0 else "ok",
             "pred_label": str(i % 3),
             "pred_score": 0.1 * i if i % 2 else None, "pred_value": None,
             "ranking": [f"it{i}", "x"] if i % 4 == 0 else None,
             "segments": {"region": "eu" if i % 2 else "us"},
             "cost_usd": 0.001 if i % 3 == 0 else None, "tokens": 10 if i % 3 == 0 else None,
             "features": {"age": i, "city": "x"} if i % 2 else None} for i in range(50)]
    b = InferenceBatch.from_records(recs)
    d = decode_batch(encode_batch(b))
    for f in dataclasses.fields(b):
        x, y = getattr(b, f.name), getattr(d, f.name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and np.array_equal(x, y, equal_nan=x.dtype.kind == "f")
        else:
            assert x == y, f.name
    with pytest.raises(InputError, match="format version"):
        decode_batch(encode_batch(b).replace(b'"v":1', b'"v":9'))
    with pytest.raises(InputError, match="runs past the end"):
        decode_batch(encode_batch(b)[:-8])


@pytest.mark.parametrize("crashes", [(150,), (7, 1300, 1301, 2555)])
def test_a_shard_killed_anywhere_gives_the_windows_of_one_that_never_stopped(
        tmp_path, stream, crashes):
    batches, _ = stream
    want, _, _ = _run(batches)
    got, step, shard = _run(batches, tmp_path / "log", crash_at=set(crashes))
    assert len(want) > 2000
    assert sorted(map(_key, got)) == sorted(map(_key, want))
    w = {_key(r): r for r in want}
    for r in got:
        o = w[_key(r)]
        assert (r["count"], r["labelled"]) == (o["count"], o["labelled"]), _key(r)
        assert r["value"] == pytest.approx(o["value"], rel=1e-12, nan_ok=True), _key(r)
    assert step.agg.refused_final == 0        # nothing truncated: re-sent states are equal
    st = shard.stats()
    assert st["log"]["recovery"]["records"] > 0 and st["log"]["recovery"]["events"] > 0
    # the counters come back too: one shard's totals, as if it never stopped
    _, _, ref = _run(batches)
    assert st["counters"] == ref.stats()["counters"]


def test_a_retried_batch_after_a_crash_is_not_counted_twice(tmp_path, stream):
    """The sender saw no reply (the shard died after logging): it sends again."""
    batches, _ = stream
    want, _, _ = _run(batches)
    again = batches[:1400] + [batches[1399]] + batches[1400:]
    got, _, shard = _run(again, tmp_path / "log", crash_at={1400})
    assert sorted((_key(r), r["count"]) for r in got) == sorted((_key(r), r["count"]) for r in want)
    assert shard.stats()["counters"]["duplicate_inference"] + \
        shard.stats()["counters"]["duplicate_feedback"] >= len(batches[1399][1].ts)


def test_a_torn_last_record_is_cut_and_damage_elsewhere_is_an_error(tmp_path, stream):
    batches, _ = stream
    log = ShardLog(tmp_path / "a", segment_bytes=20_000)
    for kind, b in batches[:60]:
        log.append(kind, 1, b)
    log.close()
    segs = log.segments()
    assert len(segs) > 2
    with open(segs[-1], "ab") as f:           # a crash in the middle of a write
        f.write(b"KPL1\x01\x01" + b"\x00" * 11)
    again = ShardLog(tmp_path / "a")
    n = sum(1 for _ in again.replay())
    assert n == 60 and again.cut_tail == 17
    assert sum(1 for _ in ShardLog(tmp_path / "a").replay()) == 60     # cut for good
    data = bytearray(segs[0].read_bytes())
    data[40] ^= 0xFF                           # a flipped bit in an early segment
    segs[0].write_bytes(bytes(data))
    with pytest.raises(InputError, match="damaged"):
        list(ShardLog(tmp_path / "a").replay())


@pytest.mark.parametrize("crashes", [(410,), (30, 1299, 1300, 2556)])
def test_a_shard_restarted_from_its_snapshot_and_the_log_after_it_is_exact(
        tmp_path, stream, crashes):
    """Snapshots at every collect (every 25 batches): a restart loads the newest and
    replays only the records after it; the segments the snapshots cover are gone; windows
    and counters are those of a shard that never stopped."""
    batches, _ = stream
    want, _, ref = _run(batches)
    opts = {"segment_bytes": 30_000, "snapshot_every_s": 0}
    got, step, shard = _run(batches, tmp_path / "log", crash_at=set(crashes), log_options=opts)
    assert sorted((_key(r), r["count"], r["labelled"]) for r in got) == \
        sorted((_key(r), r["count"], r["labelled"]) for r in want)
    w = {_key(r): r["value"] for r in want}
    assert all(r["value"] == pytest.approx(w[_key(r)], rel=1e-12, nan_ok=True) for r in got)
    st = shard.stats()
    assert st["counters"] == ref.stats()["counters"]
    rec = st["log"]["recovery"]
    assert rec["snapshot_seq"] > 0 and 0 < rec["records"] <= 30   # the tail after it only
    assert st["log"]["truncated_segments"] > 5 and st["log"]["snapshots"] > 10
    assert len(list((tmp_path / "log").glob("snapshot-*.snap"))) == 2
    assert step.agg.refused_final == 0


def test_a_damaged_snapshot_falls_back_to_the_one_before(tmp_path, stream):
    batches, _ = stream
    want, _, _ = _run(batches[:1000])
    opts = {"segment_bytes": 30_000, "snapshot_every_s": 0}
    _, _, shard = _run(batches[:990], tmp_path / "log", log_options=opts)
    newest = shard.log.snapshots()[0][1]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    t0 = int(batches[0][1].ts.min())
    again = Shard(0, METRICS, clock=ManualClock(t0 + 990 * 400), log_dir=tmp_path / "log",
                  log_options=opts, processing_time_watermark=False)
    rec = again.recovery
    assert "checksum" in rec["snapshots_skipped"][0] and rec["snapshot_seq"] > 0
    assert again.stats()["counters"] == shard.stats()["counters"]
    for _, path in again.log.snapshots():        # both damaged: the shard will not guess
        path.write_bytes(path.read_bytes()[:-9])
    with pytest.raises(InputError, match="no snapshot.*reads back.*is gone"):
        Shard(0, METRICS, clock=ManualClock(t0 + 990 * 400), log_dir=tmp_path / "log",
              log_options=opts, processing_time_watermark=False)


def test_a_snapshot_holds_data_only_and_names_only_kpistream_classes(tmp_path):
    from kpistream.store.dataonly import dumps, loads

    evil = dumps({"x": 1}).replace(b'"$d"', b'"$o"')
    with pytest.raises((ValueError, KeyError)):
        loads(evil)
    import json as _json
    import struct
    import zlib
    def packed(node: dict) -> bytes:
        head = _json.dumps(node).encode()
        table = b"[[0,16]]"
        body = (struct.pack("<4sBI", b"KPS1", 1, len(head)) + head + b"\0" * 16 + table
                + struct.pack("<I", len(table)))
        return body + struct.pack("<I", zlib.crc32(body))

    for cls in ("os:system", "builtins:eval", "subprocess:Popen", "numpy:load"):
        with pytest.raises(ValueError, match="kpistream|numpy scalar"):
            loads(packed({"$id": 0, "$o": cls, "f": {}}))
    with pytest.raises(ValueError, match="holds objects"):     # pointers from raw bytes
        loads(packed({"$id": 0, "$a": 0, "dt": "i8,O", "sh": [1]}))


def test_old_segments_go_and_a_restart_after_that_is_still_exact(tmp_path, stream):
    """Without snapshots, segments go by event time."""
    batches, _ = stream
    want, _, _ = _run(batches)
    opts = {"segment_bytes": 30_000, "snapshot_every_s": -1}
    got, step, shard = _run(batches, tmp_path / "log", crash_at={2500}, log_options=opts)
    st = shard.stats()["log"]
    assert st["truncated_segments"] > 5      # the old part of the stream is gone
    assert sorted((_key(r), r["count"], r["labelled"]) for r in got) == \
        sorted((_key(r), r["count"], r["labelled"]) for r in want)
    # the replay of what is left rebuilds old panes without their oldest events: the
    # restarted shard does not send those the publisher holds as final (nothing refused)
    assert step.agg.refused_final == 0


def test_without_its_log_a_restarted_shard_cannot_rewrite_a_final_window(stream):
    """The old failure: a shard restarted empty sends a partial for a pane already final;
    the publisher refuses it (and counts it), the stored value stays."""
    batches, _ = stream
    t0 = int(batches[0][1].ts.min())
    clock = ManualClock(t0)
    shard = Shard(0, METRICS, clock=clock)
    step = PublishStep(CFG, clock=clock)
    for kind, b in batches[:800]:
        (shard.ingest_inference if kind == "inference" else shard.ingest_feedback)(b)
    step.run([shard.collect()])
    final = {_key(r): r["value"] for r in step.final_rows}
    assert final
    restarted = Shard(0, METRICS, clock=clock)      # no log: starts empty, no watermark
    late = [(k, b) for k, b in batches[:40]]        # old events: panes that are final
    for kind, b in late:
        (restarted.ingest_inference if kind == "inference" else restarted.ingest_feedback)(b)
    step.run([restarted.collect()])
    assert step.agg.refused_final > 0
    assert step.counters()["counters"]["final_refused"] == step.agg.refused_final
    assert not any(_key(r) in final for r in step.final_rows)   # nothing emitted again


def test_a_restarted_publisher_gets_everything_again_and_stores_exact_windows(tmp_path, stream):
    """The publisher dies after pulling a round and before storing it; the new one asks
    each shard for everything (resync): held states and the final partials it had not
    acknowledged.  The stored windows equal those of a run without the crash."""
    from kpistream.store import SeriesStore
    from kpistream.wire.batch import shard_of

    batches, _ = stream
    t0 = int(batches[0][1].ts.min())

    def run(crash_at=()):
        clock = ManualClock(t0)
        shards = [Shard(i, METRICS, clock=clock, processing_time_watermark=False)
                  for i in range(2)]
        store = SeriesStore(tmp_path / f"store-{len(crash_at)}", CFG)
        step = PublishStep(CFG, store=store, clock=clock, sources=2)
        resync = False
        for i, (kind, b) in enumerate(batches):
            part = shard_of(b.request_id, 2)
            for s in range(2):
                rows = np.flatnonzero(part == s)
                if len(rows):
                    sh = shards[s]
                    (sh.ingest_inference if kind == "inference" else sh.ingest_feedback)(
                        b.take(rows))
            clock.advance(400)
            if i % 25 == 24:
                acked = int(step.agg.emitted_watermark)
                results = [sh.collect(acked, resync) for sh in shards]
                resync = False
                if i in crash_at:      # pulled, never stored: the publisher is gone
                    step = PublishStep(CFG, store=store, clock=clock, sources=2)
                    resync = True
                    continue
                step.run(results)
        acked = int(step.agg.emitted_watermark)
        step.run([sh.flush() if not resync else sh.collect(acked, True) for sh in shards])
        step.run([sh.flush() for sh in shards])
        df = store.query(resolution="10s")
        store.close()
        return df

    want = run()
    got = run(crash_at={i for i in range(24, len(batches), 25) if i % 100 == 24})
    assert len(want) > 2000
    key = ["window_start", "model", "model_version", "variant", "endpoint", "region", "metric"]
    m = want.merge(got, on=key, how="outer", suffixes=("_w", "_g"), indicator=True)
    assert (m["_merge"] == "both").all()
    assert (m["count_w"] == m["count_g"]).all() and not m["provisional_g"].any()
    assert np.allclose(m["value_w"], m["value_g"], rtol=1e-12, equal_nan=True)


def test_an_idle_shard_keeps_its_watermark_while_the_publisher_says_a_shard_is_down(stream):
    """A shard idle for the lateness moves its watermark to the clock, unless the publisher
    holds that back (another shard is down: senders are waiting, traffic did not stop)."""
    batches, _ = stream
    t0 = int(batches[0][1].ts.min())
    clock = ManualClock(t0)
    shard = Shard(0, METRICS, clock=clock)
    for kind, b in batches[:50]:
        (shard.ingest_inference if kind == "inference" else shard.ingest_feedback)(b)
    _, wm, _ = shard.collect()
    clock.advance(CFG.lateness_ms * 10)
    assert shard.collect(idle_advance=False)[1] == wm
    assert shard.collect()[1] > wm


def test_a_snapshot_under_another_config_loads_if_only_timing_changed_else_refuses(
        tmp_path, stream):
    from kpistream.errors import ConfigError

    batches, _ = stream
    opts = {"snapshot_every_s": 0}
    _, _, shard = _run(batches[:300], tmp_path / "log", log_options=opts)
    counters = shard.stats()["counters"]
    clock = ManualClock(int(batches[300][1].ts.min()))
    retuned = {**METRICS, "time": {**METRICS["time"], "lateness": "7s"}}
    again = Shard(0, retuned, clock=clock, log_dir=tmp_path / "log", log_options=opts,
                  processing_time_watermark=False)
    assert again.recovery["snapshot_seq"] > 0 and again.stats()["counters"] == counters
    assert again.engine.wm.lateness_ms == 7000
    other = {**METRICS, "windows": METRICS["windows"][:1]}
    with pytest.raises(ConfigError, match="windows.*new store_path"):
        Shard(0, other, clock=clock, log_dir=tmp_path / "log", log_options=opts)
