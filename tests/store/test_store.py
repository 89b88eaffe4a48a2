"""The embedded time-series store: exact roll-ups, provisional -> final, retention, queries,
reopening, a reader beside the writer, and the write throughput (printed, not asserted)."""

from __future__ import annotations

import dataclasses
import threading
import time
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pytest

from kpistream.windows.aggregate import ROW_COLUMNS, WindowAggregator, rows_frame
from kpistream.wire.batch import BASE_LABELS
from kpistream.spec.metrics import config_from_dict
from kpistream.synthetic import generate_stream
from kpistream.engine import FAR_FUTURE, Engine, Partial
from kpistream.errors import ConfigError
from kpistream.store.series import (
    Resolution, SeriesStore, default_resolutions, load_series, open_store)
from kpistream.store.resolutions import check_resolutions

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z, the demo stream's start
CFG = config_from_dict({"time": {"lateness": "5s", "label_delay": "60s"},
                        "windows": [{"name": "10s", "type": "tumbling", "size": "10s"},
                                    {"name": "1m", "type": "tumbling", "size": "60s"}],
                        "series": {"segments": ["region"]}})
LABELS = list(BASE_LABELS) + ["region"]
SORT = ["window", "window_start", *LABELS, "metric"]
# the aggregator forgets a pane once no window needs it: max size + pane + label delay
KEEP_MS = 60_000 + CFG.pane_ms + CFG.label_delay_ms


def _engine_run(stream, collect_every=16, snapshot_every=8):
    """The engine and the aggregator over the stream, collecting every few batches.

    Returns the collects ``(partials, watermark)``, the aggregator's final rows
    and, every ``snapshot_every`` collects, its live view (``current_rows``).
    """
    eng, agg = Engine(CFG), WindowAggregator(CFG)
    steps, rows, snaps = [], [], {}

    def drain():
        parts, wm = eng.collect(), eng.emit_watermark
        agg.add(parts, watermark=wm)
        if len(steps) % snapshot_every == snapshot_every - 1:
            snaps[len(steps)] = rows_frame(agg.current_rows(), CFG.segments)
        rows.extend(agg.pop_final_rows())
        steps.append((parts, wm))

    for n, (kind, b) in enumerate(stream.batches(512), 1):
        (eng.ingest_inference if kind == "inference" else eng.ingest_feedback)(b)
        if n % collect_every == 0:
            drain()
    eng.flush()
    drain()
    return steps, rows_frame(rows, CFG.segments), snaps


@pytest.fixture(scope="module")
def run():
    # ~4 minutes of event time at 15 requests/s: 25 panes, 5 minutes, 12 series
    return _engine_run(generate_stream(3600, seed=5, rate_per_s=15))


@pytest.fixture(scope="module")
def filled(run, tmp_path_factory):
    """A store fed like the live publisher: every collect written, then rolled up."""
    steps, _, _ = run
    path = tmp_path_factory.mktemp("store")
    with SeriesStore(path, CFG) as store:
        for i, (parts, wm) in enumerate(steps):
            store.write(parts, wm)
            # final roll-ups every time, the running minute and hour now and then
            store.rollup(wm, provisional=i % 8 == 0)
    return path


def _sorted(df):
    return df.sort_values(SORT, kind="stable").reset_index(drop=True)


def _assert_rows_equal(got, want):
    assert len(got) == len(want) > 0
    got, want = _sorted(got), _sorted(want)
    # keys, counts and flags exactly; ratios to 1e-9 (merge order of float sums)
    exact = [c for c in got.columns if c != "value"]
    pd.testing.assert_frame_equal(got[exact], want[exact])
    np.testing.assert_allclose(got["value"].to_numpy(), want["value"].to_numpy(), rtol=1e-9,
                               atol=0)
    # latency quantiles come from identical merged sketches: identical values
    q = got["metric"].str.startswith("latency_p").to_numpy()
    assert q.any()
    np.testing.assert_array_equal(got["value"].to_numpy()[q], want["value"].to_numpy()[q])


# ----------------------------------------------------------------- roll-ups

@pytest.mark.slow
def test_rollup_equals_the_aggregators_windows(run, filled):
    """10 s panes rolled up to 1 m give exactly the engine's 1 m tumbling windows."""
    _, want, _ = run
    with open_store(filled) as store:
        got_1m = store.query(resolution="1m")
        got_10s = store.query()
        assert not got_1m["provisional"].any() and not got_10s["provisional"].any()
        _assert_rows_equal(got_1m, want[want["window"] == "1m"].reset_index(drop=True))
        _assert_rows_equal(got_10s, want[want["window"] == "10s"].reset_index(drop=True))
        # the hour is the merge of the minutes: counts add up exactly
        h = store.query("requests", resolution="1h")
        assert (h["window_start"] == pd.Timestamp(T0, unit="ms", tz="UTC")).all()
        by = ["model", "variant", "region"]
        m = got_1m[got_1m["metric"] == "requests"].groupby(by)["count"].sum()
        pd.testing.assert_series_equal(h.set_index(by)["count"].sort_index(), m.sort_index(),
                                       check_names=False)
        # and its quantiles are those of the merged sketch, not an average
        states = store.states(resolution="10s", family="latency", model="churn",
                              variant="primary", region="eu")
        merged = states[0].state
        for s in states[1:]:
            merged.merge(s.state)
        p99 = store.query("latency_p99", resolution="1h", model="churn", variant="primary",
                          region="eu")
        assert p99["value"].tolist() == [merged.value()["latency_p99"][0]]


@pytest.mark.slow
def test_running_buckets_match_the_live_view(run, tmp_path):
    """Mid-stream, base and provisional 1 m rows equal the aggregator's current rows, flags too."""
    steps, _, snaps = run
    assert snaps
    with SeriesStore(tmp_path, CFG) as store:
        checked = 0
        for i, (parts, wm) in enumerate(steps):
            store.write(parts, wm)
            store.rollup(wm)
            if i not in snaps:
                continue
            live = snaps[i]
            # windows whose panes the aggregator still holds entirely
            lo = pd.Timestamp(wm - KEEP_MS + 1, unit="ms", tz="UTC")
            for res in ("10s", "1m"):
                want = live[(live["window"] == res) & (live["window_start"] >= lo)]
                got = store.query(resolution=res, start=lo)
                _assert_rows_equal(got, want.reset_index(drop=True))
                checked += 1
            assert store.query(resolution="1m")["provisional"].any()
        assert checked >= 4


@pytest.mark.slow
def test_rollup_is_idempotent(run, filled, tmp_path):
    steps, _, _ = run
    with SeriesStore(filled, CFG) as store:
        before = store.query(resolution="1m")
        assert store.rollup(FAR_FUTURE) == 0
        pd.testing.assert_frame_equal(store.query(resolution="1m"), before)
    # a store that only rolls up at the end (no provisional roll-ups) agrees
    with SeriesStore(tmp_path, CFG) as store:
        for parts, wm in steps:
            store.write(parts, wm)
        assert len(store.query(resolution="1m")) == 0
        store.rollup(steps[-1][1], provisional=False)
        pd.testing.assert_frame_equal(store.query(resolution="1m"), before)
        with pytest.raises(ValueError, match="1d"):
            store.rollup(0, provisional=["1d"])


def _requests(store, resolution, start, end):
    q = store.query("requests", resolution=resolution, start=start, end=end)
    return q.groupby(LABELS)["count"].sum().sort_index()


@pytest.mark.slow
def test_a_final_pane_is_never_rewritten(run, tmp_path):
    """A final pane written again with another state (a restarted source's partial view of
    it) is refused: the pane, its minute and the running hour keep their values."""
    steps, _, _ = run
    # stop once the first minute is settled, with the hour still open
    half = next(i for i, (_, wm) in enumerate(steps) if wm > T0 + 150_000) + 1
    with SeriesStore(tmp_path, CFG) as store:
        for parts, wm in steps[:half]:
            store.write(parts, wm)
            store.rollup(wm)
        assert store._rollup.settled["1h"][T0][0] >= T0 + 60_000   # its merge is cached
        assert store.query(resolution="1h")["provisional"].any()
        before = {res: _requests(store, res, T0, T0 + 1) for res in ("10s", "1m", "1h")}
        old = store.states(T0, T0 + CFG.pane_ms, family="traffic")
        doubled = [Partial("time", s.start, s.series, "traffic", s.state.copy().merge(s.state),
                           True, s.start, s.start + CFG.pane_ms) for s in old]
        assert store.write(doubled, wm) == 0
        store.rollup(wm, provisional="1h")
        for res in ("10s", "1m", "1h"):
            pd.testing.assert_series_equal(_requests(store, res, T0, T0 + 1), before[res])
        assert store.watermark == wm


# -------------------------------------------------------- provisional / final

def _pane_history(steps, family="classification"):
    """Successive partials of one pane, series and family: provisional ones, then the final."""
    hist: dict = {}
    for parts, _ in steps:
        for p in parts:
            if p.space == "time" and p.family == family:
                hist.setdefault((p.key, p.series), []).append(p)
    for seq in hist.values():
        prov = [p for p in seq if not p.final]
        if len(prov) >= 2 and seq[-1].final and all(
                p.state.value() != seq[-1].state.value() for p in prov):
            return prov, seq[-1]
    raise AssertionError("no pane with two provisional states before its final one")


def _values(store, p: Partial):
    lab = dict(zip(BASE_LABELS, p.series[:4]), **dict(p.series[4]))
    df = store.query(start=p.key, end=p.key + 1, **lab)
    df = df[df["metric"].isin(list(p.state.value()))]
    return {m: (v, c, pr) for m, v, c, pr in zip(df["metric"], df["value"], df["count"],
                                                 df["provisional"])}


def _expect(p: Partial, provisional: bool):
    return {m: (v, c, provisional) for m, (v, c, _) in p.state.value().items()}


def test_provisional_then_final(run, tmp_path):
    steps, _, _ = run
    (p1, p2, *_), fin = _pane_history(steps)
    with SeriesStore(tmp_path, CFG) as store:
        assert store.write([p1]) > 0
        assert _values(store, p1) == _expect(p1, True)
        store.write([p2])                                 # a later provisional replaces
        assert _values(store, p2) == _expect(p2, True)
        store.write([fin])                                # the final replaces
        assert _values(store, fin) == _expect(fin, False)
        assert store.write([p1]) == 0                     # a provisional never replaces a final
        assert store.write([fin, p2]) == 0                # nor a final one: final never changes
        assert _values(store, fin) == _expect(fin, False)
        [st] = store.states(p1.key, p1.key + 1, family=p1.family, model=p1.series[0],
                            variant=p1.series[2], region=dict(p1.series[4])["region"])
        assert st.state == fin.state
        # count-window partials are not the store's business
        cw = dataclasses.replace(fin, space="1k")
        assert store.write([cw]) == 0
        bad = dataclasses.replace(fin, end_ms=fin.start_ms + 60_000)
        with pytest.raises(ValueError, match="base resolution"):
            store.write([bad])


def test_watermark_makes_rows_final(run, tmp_path):
    """Operational rows are final once the watermark passes the pane end, quality rows
    once it passes the end plus the label delay; stored rows flip without a new state."""
    steps, _, _ = run
    (p1, *_), _ = _pane_history(steps)
    traffic = next(p for parts, _ in steps for p in parts
                   if p.family == "traffic" and p.key == p1.key and p.series == p1.series)
    end = p1.key + CFG.pane_ms
    with SeriesStore(tmp_path, CFG) as store:
        store.write([p1, dataclasses.replace(traffic, final=False)], watermark=end - 1)
        q = store.query(start=p1.key, end=end)
        assert q["provisional"].all()
        store.write([], watermark=end)
        q = store.query(start=p1.key, end=end)
        op = q["metric"].isin(["requests", "error_rate"])
        assert not q.loc[op, "provisional"].any() and q.loc[~op, "provisional"].all()
        store.write([], watermark=end + CFG.label_delay_ms)
        assert not store.query(start=p1.key, end=end)["provisional"].any()
        store.write([p1], watermark=end - 1)            # an older provisional: ignored
        assert not store.query(start=p1.key, end=end)["provisional"].any()


# ----------------------------------------------------------------- retention

@pytest.mark.slow
def test_retention_per_resolution(run, tmp_path):
    steps, _, _ = run
    res = [Resolution("10s", 10_000, 120_000), Resolution("1m", 60_000, 4_200_000),
           Resolution("1h", 3_600_000, None)]
    with SeriesStore(tmp_path, CFG, res) as store:
        for parts, wm in steps:
            store.write(parts, wm)
        store.rollup(FAR_FUTURE)
        before = store.info()["resolutions"]
        assert before["10s"]["first"] == T0 and before["1m"]["first"] == T0

        def starts(r):
            return sorted({s.start for s in store.states(resolution=r)})

        last10 = starts("10s")[-1]
        now = last10 + 10_000 + 120_000 - 1   # the last pane just within its retention
        n = store.apply_retention(now)
        assert n > 0
        assert starts("10s") == [last10]
        assert starts("1m")[0] == T0 and starts("1h") == [T0]
        assert store.query(resolution="10s")["window_start"].min() == pd.Timestamp(
            last10, unit="ms", tz="UTC")
        assert store.apply_retention(now) == 0
        # later: the minutes go too, the hours are kept forever
        last1m = starts("1m")[-1]
        store.apply_retention(last1m + 60_000 + 4_200_000 + 1)
        assert starts("10s") == [] and starts("1m") == [] and starts("1h") == [T0]
        assert len(store.query(resolution="1h")) == before["1h"]["rows"]
        assert store.info()["series"] == 12       # the hours still use them
    # with every resolution bounded, series nobody has seen for longer are forgotten too
    with SeriesStore(tmp_path / "bounded", CFG, res[:2]) as store:
        store.write([p for parts, _ in steps for p in parts])
        assert store.info()["series"] == 12
        full = store.nbytes()
        assert store.apply_retention(FAR_FUTURE // 2) > 0
        assert store.info()["series"] == 0 and store.query().empty
        with store.snapshot():
            pass
        store._db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert store.nbytes() < full / 2                # freed pages went back to the disk
        store.write(steps[0][0])                  # and come back with new ids
        assert store.info()["series"] > 0 and not store.query().empty


def test_resolutions_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"resolutions\[1\]\.step_ms"):
        SeriesStore(tmp_path, CFG, [Resolution("10s", 10_000), Resolution("25s", 25_000)])
    with pytest.raises(ConfigError, match=r"resolutions\[0\]\.step_ms"):
        check_resolutions([Resolution("1m", 60_000)], CFG)
    with pytest.raises(ConfigError, match=r"resolutions\[0\]\.retention_ms"):
        check_resolutions([Resolution("10s", 10_000, 60_000), Resolution("1m", 60_000)], CFG)
    assert [(r.name, r.step_ms) for r in default_resolutions(CFG)] == [
        ("10s", 10_000), ("1m", 60_000), ("1h", 3_600_000)]
    assert Resolution.of("1m", "7d") == Resolution("1m", 60_000, 7 * 86_400_000)


# -------------------------------------------------------------------- queries

def test_query_filters_and_dtypes(filled):
    with open_store(filled) as store:
        allrows = store.query()
        # the frame is what rows_frame makes: same columns, same dtypes
        assert list(allrows.columns) == list(ROW_COLUMNS) + LABELS
        ref = rows_frame([{"window": "10s", "window_start": T0, "window_end": T0 + 10_000,
                           "metric": "requests", "value": 1.0, "count": 1, "labelled": None,
                           "provisional": False, "model": "m", "model_version": "1",
                           "variant": "primary", "endpoint": "predict", "region": "eu"}],
                         CFG.segments)
        pd.testing.assert_series_equal(allrows.dtypes, ref.dtypes)
        assert str(allrows["window_start"].dtype).endswith("UTC]")
        assert allrows["labelled"].dtype == "Int64"
        assert set(allrows["window"]) == {"10s"}

        m = store.query(["accuracy", "latency_p99"])
        assert set(m["metric"]) == {"accuracy", "latency_p99"}
        assert len(m) == allrows["metric"].isin(["accuracy", "latency_p99"]).sum()
        assert m.loc[m["metric"] == "latency_p99", "labelled"].isna().all()
        assert (m.loc[m["metric"] == "accuracy", "labelled"] > 0).all()

        sel = store.query("requests", model="churn", variant="shadow", region="eu")
        assert len(sel) > 0 and set(zip(sel["model"], sel["variant"], sel["region"])) == {
            ("churn", "shadow", "eu")}
        two = store.query("requests", model="churn", region=["eu", "us"])
        assert set(two["region"]) == {"eu", "us"} and set(two["variant"]) == {"primary", "shadow"}
        assert len(store.query("requests", model="nope")) == 0

        # time range: half-open on window_start, in any of the accepted forms
        a, b = T0 + 60_000, T0 + 120_000
        want = allrows[(allrows["window_start"] >= pd.Timestamp(a, unit="ms", tz="UTC"))
                       & (allrows["window_start"] < pd.Timestamp(b, unit="ms", tz="UTC"))]
        assert len(want) > 0
        for s, e in [(a, b), ("2026-01-01T00:01:00Z", "2026-01-01T00:02:00Z"),
                     ("2026-01-01 00:01:00", "2026-01-01 00:02:00"),
                     (datetime(2026, 1, 1, 0, 1, tzinfo=timezone.utc), pd.Timestamp(b, unit="ms")),
                     (pd.Timestamp("2026-01-01T01:01:00+01:00"), str(b))]:
            got = store.query(start=s, end=e)
            pd.testing.assert_frame_equal(got, want.reset_index(drop=True))
        assert store.query(start=b, end=b).empty
        only_start = store.query("requests", start="2026-01-01T00:03:00Z")
        assert only_start["window_start"].min() == pd.Timestamp("2026-01-01T00:03:00Z")

        one_m = store.query("requests", resolution="1m")
        assert set(one_m["window"]) == {"1m"}
        assert ((one_m["window_end"] - one_m["window_start"]) == pd.Timedelta("1min")).all()

        with pytest.raises(ValueError, match="colour"):
            store.query("requests", colour="red", model="churn")
        with pytest.raises(ValueError, match="unknown resolution"):
            store.query(resolution="1d")
        with pytest.raises(ValueError, match="start"):
            store.query(start="not a time")
        empty = store.query("no_such_metric")
        assert empty.empty and list(empty.columns) == list(ROW_COLUMNS) + LABELS


# --------------------------------------------------------------------- reopen

def test_reopen_sees_data_and_config(filled, tmp_path):
    with SeriesStore(filled, CFG) as store:
        want = store.query(resolution="1m")
    with SeriesStore(filled) as again:                  # no config: read from the store
        assert again.config == CFG
        assert [r.name for r in again.resolutions] == ["10s", "1m", "1h"]
        pd.testing.assert_frame_equal(again.query(resolution="1m"), want)
    df = load_series(filled, resolution="1m")
    pd.testing.assert_frame_equal(df, want)
    acc = load_series(filled, "accuracy", resolution="1m", model="churn")
    pd.testing.assert_frame_equal(
        acc, want[(want["metric"] == "accuracy") & (want["model"] == "churn")].reset_index(drop=True))
    other = dataclasses.replace(CFG, segments=("country",))
    with pytest.raises(ConfigError, match="segments"):
        SeriesStore(filled, other)
    with pytest.raises(ConfigError, match="resolutions"):
        SeriesStore(filled, CFG, [Resolution("10s", 10_000), Resolution("5m", 300_000)])
    with pytest.raises(FileNotFoundError):
        open_store(tmp_path / "nothing-here")
    ro = open_store(filled, readonly=True)
    with pytest.raises(PermissionError):
        ro.write([])
    ro.close()


# ---------------------------------------------------------------- concurrency

@pytest.mark.slow
def test_reader_queries_while_writer_writes(run, tmp_path):
    steps, _, _ = run
    writer = SeriesStore(tmp_path, CFG, timeout=5.0)
    writer.write(steps[0][0], steps[0][1])
    reader = SeriesStore(tmp_path, readonly=True, timeout=5.0)
    # a reader holding a snapshot does not block the writer
    with reader.snapshot():
        n0 = len(reader.query())
        t = time.perf_counter()
        writer.write(steps[1][0], steps[1][1])
        assert time.perf_counter() - t < 2.0
        assert len(reader.query()) == n0                 # still its snapshot
    assert len(reader.query()) > n0                      # and then the new rows
    # many queries while the writer publishes every collect
    errors: list[BaseException] = []

    def publish():
        try:
            for parts, wm in steps[2:100]:
                writer.write(parts, wm)
                writer.rollup(wm, provisional=["1m"])
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            errors.append(e)

    th = threading.Thread(target=publish)
    th.start()
    sizes = []
    while th.is_alive():
        sizes.append(len(reader.query("requests")))
        reader.query(resolution="1m", model="churn")
        time.sleep(0.005)
    th.join()
    assert not errors, errors
    assert len(sizes) > 1 and sizes == sorted(sizes)      # never a torn or shrinking view
    for parts, wm in steps[100:]:
        writer.write(parts, wm)
    writer.rollup(FAR_FUTURE)
    assert len(reader.query("requests")) == len(writer.query("requests")) > sizes[0]
    with open_store(tmp_path) as other:                 # a new object sees it all too
        pd.testing.assert_frame_equal(other.query(resolution="1m"),
                                      reader.query(resolution="1m"))
    reader.close()
    writer.close()


# -------------------------------------------------------------- throughput

@pytest.mark.slow
def test_write_throughput(run, tmp_path):
    """Figures only; no timing asserts.  10,000 distinct pane states (the run's final
    states, repeated at later pane starts), in one call and in calls of 1,000."""
    steps, _, _ = run
    finals = [p for ps, _ in steps for p in ps if p.space == "time" and p.final]
    span = max(p.key for p in finals) + CFG.pane_ms - T0
    parts = [dataclasses.replace(p, key=p.key + k * span, start_ms=p.start_ms + k * span,
                                 end_ms=p.end_ms + k * span)
             for k in range(10_000 // len(finals) + 1) for p in finals][:10_000]
    assert len({(p.key, p.series, p.family) for p in parts}) == 10_000
    with SeriesStore(tmp_path / "one", CFG) as store:
        t = time.perf_counter()
        rows = store.write([dataclasses.replace(p, final=False) for p in parts])
        dt = time.perf_counter() - t
        size = store.nbytes()
        t = time.perf_counter()
        provisional = [dataclasses.replace(p, final=False) for p in parts]
        again = store.write(provisional)                 # replacing every (provisional) state
        dt_again = time.perf_counter() - t
        t = time.perf_counter()
        df = store.query()
        dt_q = time.perf_counter() - t
    with SeriesStore(tmp_path / "batches", CFG) as store:
        t = time.perf_counter()
        rows_b = sum(store.write(parts[i:i + 1000]) for i in range(0, len(parts), 1000))
        dt_b = time.perf_counter() - t
    print(f"\nstore write: 10,000 partials = {rows:,} rows in one call {dt * 1e3:.0f} ms "
          f"({len(parts) / dt:,.0f} partials/s, {rows / dt:,.0f} rows/s); replacing them "
          f"{len(parts) / dt_again:,.0f} partials/s; in calls of 1,000 "
          f"{len(parts) / dt_b:,.0f} partials/s, {rows_b / dt_b:,.0f} rows/s; "
          f"{size / 1024:,.0f} KiB on disk ({size / rows:,.0f} B/row incl. states); "
          f"query of all {len(df):,} rows {dt_q * 1e3:.0f} ms")
    assert rows == rows_b == again == len(df) > 10_000
