"""The sidecar as users meet it: Ray Serve over HTTP, shard and publisher actors, the store,
/metrics linted by promtool and scraped by a real Prometheus server."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kpistream.windows.aggregate import rows_frame
from kpistream.spec.metrics import load_config
from kpistream.synthetic import generate_stream
from kpistream.replay import iter_runs, replay_batches
from kpistream.wire.batch import FeedbackBatch, InferenceBatch
from kpistream.wire.schema import validate_rows

from conftest import deploy_sidecar, free_port, remove_sidecar, wait_healthy

pytestmark = [pytest.mark.ray, pytest.mark.prometheus]
ROOT = Path(__file__).resolve().parents[2]


def _get(url: str, timeout: float = 10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        body = r.read()
        return json.loads(body) if r.headers.get_content_type() == "application/json" else body.decode()


def _post(url: str, rows: list, ndjson: bool = True) -> dict:
    data = ("\n".join(json.dumps(r) for r in rows) if ndjson else json.dumps(rows)).encode()
    req = urllib.request.Request(url, data=data, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _samples(text: str) -> dict[tuple, float]:
    """/metrics as {(sample name, frozenset of labels): value}, read by prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _wait_for(fn, what: str, timeout_s: float = 20.0):
    deadline = time.time() + timeout_s
    while True:
        got = fn()
        if got:
            return got
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def sidecar(serve_port, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    deploy_sidecar("kpistream-test", store)
    base = f"http://127.0.0.1:{serve_port}"
    wait_healthy(base, timeout_s=60)
    yield base, store
    remove_sidecar("kpistream-test")


@pytest.fixture(scope="module")
def posted(sidecar):
    """A demo stream posted over HTTP in arrival order; all windows final afterwards."""
    base, _ = sidecar
    now = int(time.time() * 1000)
    # an hour ago: once the shards are idle, every window (label deadlines included) is past
    stream = generate_stream(1500, seed=5, rate_per_s=100.0, start_ms=now - 3_600_000, late_rate=0.0)
    recs = list(stream.records())
    replies = []
    for i in range(0, len(recs), 700):
        replies.append(_post(base + "/v1/events", recs[i:i + 700], ndjson=bool(i % 2)))
    # idle for longer than the lateness: the shards close every window
    cfg = load_config(ROOT / "configs/metrics.yaml")
    time.sleep(cfg.lateness_ms / 1000 + 1.5)
    return stream, recs, replies, cfg


def _replay(recs, cfg):
    """The same events through `kpistream replay`'s engine (one process, no Ray)."""
    res = validate_rows(recs, now_ms=int(time.time() * 1000) + 10_000, max_future_ms=cfg.max_future_ms)
    batches = [(k, (InferenceBatch if k == "inference" else FeedbackBatch).from_records(r))
               for k, r in iter_runs(res)]
    rows, _ = replay_batches(batches, cfg)
    df = rows_frame(rows, cfg.segments)
    return df[df["window"] == "10s"].reset_index(drop=True)


def test_ingest_replies_account_for_every_row(posted):
    stream, recs, replies, _ = posted
    assert sum(r["received"] for r in replies) == len(recs)
    rejected = [x for r in replies for x in r["rejected"]]
    assert {(x["field"], x["reason"]) for x in rejected} <= {("ts", "future")}
    assert len(rejected) >= stream.n_future  # a bad-clock event's re-deliveries too
    assert 0 < sum(r["duplicates"] for r in replies) <= stream.n_duplicates
    assert sum(r["late"] for r in replies) == 0
    assert sum(r["accepted"] for r in replies) + len(rejected) + sum(
        r["duplicates"] for r in replies) + sum(r["late"] for r in replies) == len(recs)


def test_series_equal_replay(sidecar, posted):
    base, _ = sidecar
    _, recs, _, cfg = posted
    want = _replay(recs, cfg)
    deadline = time.time() + 20
    while True:
        got = pd.DataFrame(_get(base + "/v1/series?resolution=10s"))
        if len(got) and not got["provisional"].any() and len(got) >= len(want) or time.time() > deadline:
            break
        time.sleep(0.5)
    got["window_start"] = pd.to_datetime(got["window_start"], utc=True)
    key = ["window_start", "model", "model_version", "variant", "endpoint", "region", "metric"]
    m = want.merge(got, on=key, suffixes=("_r", "_s"), how="outer", indicator=True)
    assert (m["_merge"] == "both").all(), m[m["_merge"] != "both"][key + ["_merge"]].head()
    assert np.allclose(m["value_r"], m["value_s"], rtol=1e-9, atol=1e-12)
    assert (m["count_r"] == m["count_s"]).all()
    assert not m["provisional_s"].any()
    # the 1-minute roll-up merges states: its request counts add up exactly
    one = pd.DataFrame(_get(base + "/v1/series?resolution=1m&metric=requests&model=churn"))
    ten = want[(want["metric"] == "requests") & (want["model"] == "churn")]
    assert one["value"].sum() == ten["value"].sum()


def test_series_filters_and_errors(sidecar, posted):
    base, _ = sidecar
    rows = _get(base + "/v1/series?metric=accuracy,f1&model=churn&variant=shadow&region=eu")
    assert rows and {r["metric"] for r in rows} == {"accuracy", "f1"}
    assert {(r["model"], r["variant"], r["region"]) for r in rows} == {("churn", "shadow", "eu")}
    for bad, words in (("colour=blue", ["colour"]),
                       ("metric=acuracy", ["metric", "'acuracy'", "accuracy"]),
                       ("limit=0", ["limit"]), ("offset=-1", ["offset"]),
                       ("resolution=7s", ["7s"])):
        with pytest.raises(urllib.error.HTTPError) as e:
            _get(base + "/v1/series?" + bad)
        detail = json.loads(e.value.read())["detail"]
        assert e.value.code == 400 and all(w in detail for w in words), (bad, detail)
    # repeated filters combine, like repeated metrics
    both = _get(base + "/v1/series?metric=requests&resolution=1m&region=eu&region=us")
    one = _get(base + "/v1/series?metric=requests&resolution=1m&region=eu,us")
    assert both == one and {r["region"] for r in both} == {"eu", "us"}


def test_series_time_bounds_are_never_ignored(sidecar, posted):
    """``start`` with its ``+`` sent unencoded (a space on arrival) is the same bound as
    the encoded one; a time without a timezone or that is not a time is a 400."""
    base, _ = sidecar
    rows = _get(base + "/v1/series?metric=requests&resolution=10s&model=churn")
    starts = sorted({r["window_start"] for r in rows})
    mid = pd.Timestamp(starts[len(starts) // 2]).tz_convert("Europe/Berlin")  # +01:00
    iso = mid.isoformat()
    assert "+01:00" in iso
    want = [r for r in rows if pd.Timestamp(r["window_start"]) >= mid]
    q = "/v1/series?metric=requests&resolution=10s&model=churn&start="
    assert 0 < len(want) < len(rows)
    assert _get(base + q + urllib.parse.quote(iso)) == want           # %2B
    assert _get(base + q + iso) == want                               # '+' -> ' '
    assert _get(base + q + str(int(mid.timestamp() * 1000))) == want  # epoch ms
    for bad in (iso[:19], "yesterday", iso[:10]):
        with pytest.raises(urllib.error.HTTPError) as e:
            _get(base + q + urllib.parse.quote(bad))
        detail = json.loads(e.value.read())["detail"]
        assert e.value.code == 400 and detail.startswith("start:"), detail


def test_series_pages(sidecar, posted):
    base, _ = sidecar
    q = base + "/v1/series?resolution=10s&model=churn"
    every = _get(q + "&limit=100000")
    got, url = [], q + "&limit=50"
    while url:
        with urllib.request.urlopen(url, timeout=10) as r:
            got += json.loads(r.read())
            link = r.headers.get("Link")
        url = link[1:link.index(">")] if link else None
    assert len(every) > 200 and got == every


def test_bad_rows_get_field_and_reason_and_the_rest_is_kept(sidecar):
    """Every refused row gets its field and reason in the reply and reaches the counters
    on /metrics (kpistream_rejected_total, kpistream_events_total{outcome="received"})."""
    base, _ = sidecar

    def counters():
        smp = _samples(_get(base + "/metrics"))
        rej = {dict(k)["field"] + ":" + dict(k)["reason"]: v for (n, k), v in smp.items()
               if n == "kpistream_rejected_total"}
        rec = {dict(k)["type"]: v for (n, k), v in smp.items()
               if n == "kpistream_events_total" and dict(k)["outcome"] == "received"}
        return rej, rec

    rej0, rec0 = counters()
    now = int(time.time() * 1000)
    good = {"type": "inference", "event_id": "ok-1", "request_id": "q-ok-1", "ts": now,
            "model": "m", "model_version": "1", "variant": "primary", "latency_ms": 3.0,
            "status": "ok", "prediction": 1}
    rows = [good, {**good, "event_id": "bad-1", "latency_ms": -3},
            {**good, "event_id": "bad-2", "ts": now + 86_400_000}, "not an object",
            {**good, "event_id": "bad-3", "latency": 3}]
    rep = _post(base + "/v1/events", rows, ndjson=False)
    assert rep["accepted"] == 1
    assert [(r["index"], r["field"], r["reason"]) for r in rep["rejected"]] == [
        (1, "latency_ms", "negative"), (2, "ts", "future"), (3, "", "not_an_object"),
        (4, "latency", "unknown_field")]
    # NDJSON with a broken line, and feedback without its request id
    body = (json.dumps({**good, "event_id": "ok-2"}) + "\n{\"type\": \"inference\", oops\n"
            + json.dumps({"type": "feedback", "event_id": "f-1", "ts": now, "kind": "label",
                          "value": 1}))
    req = urllib.request.Request(base + "/v1/events", data=body.encode(), method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        rep2 = json.loads(r.read())
    assert [(r["field"], r["reason"]) for r in rep2["rejected"]] == [
        ("", "bad_json"), ("request_id", "missing")]
    want_rej = {"latency_ms:negative": 1, "ts:future": 1, "row:not_an_object": 1,
                "latency:unknown_field": 1, "row:bad_json": 1, "request_id:missing": 1}
    want_rec = {"inference": 5, "feedback": 1, "unknown": 2}

    def arrived():
        rej, rec = counters()
        d_rej = {k: rej.get(k, 0) - rej0.get(k, 0) for k in set(rej) | set(rej0)}
        d_rec = {k: rec.get(k, 0) - rec0.get(k, 0) for k in set(rec) | set(rec0)}
        seen[:] = [{k: v for k, v in d_rej.items() if v}, {k: v for k, v in d_rec.items() if v}]
        return seen == [want_rej, want_rec] or None
    seen: list = []
    try:
        _wait_for(arrived, "the rejections on /metrics")
    except AssertionError:
        raise AssertionError(f"/metrics counted {seen}, expected {[want_rej, want_rec]}")
    big = urllib.request.Request(base + "/v1/events", data=b"x" * (9 << 20), method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(big, timeout=30)
    assert e.value.code == 413


def test_metrics_pass_promtool(sidecar, posted):
    base, _ = sidecar
    text = _get(base + "/metrics")
    assert "kpistream_accuracy_ratio{" in text and "kpistream_events_total{" in text
    assert 'kpistream_latency_p99_seconds{' in text
    assert 'kpistream_archive_rows_total{shard="0"}' in text     # the raw event archive
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (.ci/run installs the prometheus package)")
    p = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_prometheus_scrapes_the_same_accuracy(sidecar, posted, tmp_path):
    prom = shutil.which("prometheus")
    if prom is None:
        pytest.skip("prometheus not installed (.ci/run installs it)")
    base, _ = sidecar
    port = free_port()
    target = base.removeprefix("http://")
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: kpistream\n    static_configs: [{{targets: ['{target}']}}]\n")
    proc = subprocess.Popen([prom, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        q = 'kpistream_accuracy_ratio{model="churn",variant="primary",region="eu",window="10s"}'
        url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
        deadline = time.time() + 60
        result = []
        while time.time() < deadline:
            try:
                result = _get(url)["data"]["result"]
                if result:
                    break
            except Exception:
                pass
            time.sleep(1)
        assert result, "Prometheus never scraped kpistream_accuracy_ratio"
        prom_value = float(result[0]["value"][1])
        # the same window from the query API: the latest 10 s window of that series
        rows = _get(base + "/v1/series?metric=accuracy&resolution=10s&model=churn&variant=primary&region=eu")
        latest = max(rows, key=lambda r: r["window_start"])
        assert prom_value == pytest.approx(latest["value"], rel=1e-12)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_misspelled_app_args_fail_the_deployment_with_their_name():
    from pydantic import ValidationError

    from app.sidecar import build_app

    for typo in ({"shard": 4}, {"store_pth": "x"}):
        with pytest.raises(ValidationError) as e:
            build_app(typo)
        assert next(iter(typo)) in str(e.value) and "Extra inputs" in str(e.value)


def test_alerts_and_canary_routes_without_experiments(sidecar):
    base, _ = sidecar
    body = _get(base + "/v1/alerts?since=0")
    assert {"alerts", "detectors", "input_drift", "notifications", "rules",
            "transitions"} <= set(body)
    assert "DemoAccuracyLow" in body["rules"]          # the shipped configs/alerts.yaml
    with pytest.raises(urllib.error.HTTPError) as e:
        _get(base + "/v1/alerts?state=sleeping")
    assert e.value.code == 400 and b"state" in e.value.read()
    assert _get(base + "/v1/canary")["experiments"] == []
    req = urllib.request.Request(base + "/v1/canary/approve", method="POST",
                                 data=json.dumps({"decision_id": "x", "by": "me"}).encode())
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 404 and b"no experiments configured" in e.value.read()


def test_metrics_show_the_latest_closed_window_equal_to_replay(sidecar, posted):
    """Every gauge on /metrics is the latest window the watermark has closed, with the
    value `kpistream replay` gives for that window: a sliding 1m gauge covers its whole
    minute (it used to show the window opened on the newest pane, equal to the 10 s one).

    The stream runs ahead of the clock (max_future is 5 minutes), so the watermark stays
    at its last event minus the lateness however long the scrape takes."""
    from kpistream.wire.batch import BASE_LABELS
    from kpistream.windows.exposition import kpi_families

    base, _ = sidecar
    cfg = posted[3]
    now = int(time.time() * 1000)
    x = now - now % 10_000
    stream = generate_stream(1500, seed=7, rate_per_s=10.0, start_ms=x - 29_500, late_rate=0.0)
    recs = list(stream.records())
    for i in range(0, len(recs), 1000):
        rep = _post(base + "/v1/events", recs[i:i + 1000])
        assert not rep["rejected"], rep["rejected"][:3]
    last = max(r["ts"] for r in recs if r["type"] == "inference")
    assert last > now + 100_000
    res = validate_rows(recs, now_ms=now + 10_000, max_future_ms=cfg.max_future_ms)
    batches = [(k, (InferenceBatch if k == "inference" else FeedbackBatch).from_records(r))
               for k, r in iter_runs(res)]
    rows, _ = replay_batches(batches, cfg)
    names = (*BASE_LABELS, *cfg.segments)

    def expected(wm: int) -> dict:
        """The replayed windows a gauge shows at watermark ``wm``: per window spec, series
        and KPI, the latest one that has ended."""
        snap: dict = {}
        for r in rows:
            if r["window_end"] > wm:
                continue
            key = (r["window"], tuple((k, r[k]) for k in names), r["metric"])
            if key not in snap or r["window_start"] > snap[key][4]:
                snap[key] = (r["value"], r["count"], r["labelled"], r["provisional"],
                             r["window_start"], 0)
        return {(f.name, frozenset(zip(f.labels, lab))): v
                for f in kpi_families(snap, names) for lab, v in f.samples}

    def matches():
        smp = _samples(_get(base + "/metrics"))
        wms = [v for (n, _), v in smp.items() if n == "kpistream_watermark_seconds"]
        if len(wms) != 2 or min(wms) * 1000 < last - cfg.lateness_ms - 1_000:
            return None
        want = expected(int(round(min(wms) * 1000)))
        got = {k: smp.get(k) for k in want}
        bad = [k for k, v in want.items() if got[k] is None or not (
            v == pytest.approx(got[k], rel=1e-9, abs=1e-12) or (v != v and got[k] != got[k]))]
        return (want, smp) if not bad else None

    want, smp = _wait_for(matches, "the gauges of the latest closed windows", 30)
    assert len(want) > 200
    # the 1m gauge covers six panes: more requests than the 10 s gauge of the same series
    reqs = {(dict(k)["window"], k - {("window", dict(k)["window"])}): v
            for (n, k), v in want.items() if n == "kpistream_window_requests"}
    pairs = [(reqs[("1m", lab)], v) for (w, lab), v in reqs.items()
             if w == "10s" and ("1m", lab) in reqs]
    assert pairs and all(m > t for m, t in pairs if t >= 5)
    assert sum(m for m, _ in pairs) > 4 * sum(t for _, t in pairs)
