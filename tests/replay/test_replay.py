"""`kpistream replay` as users run it: files in, tidy windows out, same as the columnar path."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from kpistream.windows.aggregate import rows_frame
from kpistream.spec.metrics import load_config
from kpistream.synthetic import generate_stream
from kpistream.replay import replay_batches, replay_file, write_events_parquet

CONFIG = "configs/metrics.yaml"


@pytest.fixture(scope="module")
def stream():
    return generate_stream(4000, seed=11)


@pytest.fixture(scope="module")
def expected(stream):
    """The columnar path (what the live shards run), in exact arrival order."""
    cfg = load_config(CONFIG)
    rows, eng = replay_batches(stream.batches(4096, exact_order=True), cfg)
    return rows_frame(rows, cfg.segments), eng


def _compare(got: pd.DataFrame, want: pd.DataFrame) -> None:
    assert len(got) == len(want) > 0
    pd.testing.assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True),
                                  check_exact=False, rtol=1e-12)


@pytest.mark.parametrize("fmt", ["ndjson", "json", "parquet", "ndjson.gz"])
def test_replay_file_formats_equal_the_columnar_path(tmp_path, stream, expected, fmt):
    recs = list(stream.records())
    path = tmp_path / f"events.{fmt}"
    if fmt == "ndjson":
        stream.to_ndjson(path)
    elif fmt == "ndjson.gz":
        import gzip
        with gzip.open(path, "wt") as fh:
            for r in recs:
                fh.write(json.dumps(r) + "\n")
    elif fmt == "json":
        path.write_text(json.dumps(recs))
    else:
        write_events_parquet(recs, path)
    df, summary = replay_file(path, load_config(CONFIG), batch_rows=3000)
    want, eng = expected
    _compare(df, want)
    assert summary.events == len(stream)
    assert summary.engine["counters"] == dict(eng.counters)
    assert summary.rejected[("ts", "future")] == stream.n_future


@pytest.mark.slow
def test_replay_cli_writes_csv_and_parquet_and_reports(tmp_path, stream, expected):
    src = tmp_path / "events.ndjson"
    stream.to_ndjson(src)
    # a broken line and a bad row in the middle do not sink the file
    lines = src.read_text().splitlines()
    lines.insert(10, "{not json")
    bad = json.loads(lines[20])
    bad["latency_ms"] = -5 if bad["type"] == "inference" else bad.get("latency_ms")
    lines.insert(20, json.dumps({**json.loads(lines[21]), "event_id": "bad-1", "ts": "yesterday"}))
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "w.parquet"
    p = subprocess.run([sys.executable, "-m", "kpistream.cli", "replay", str(src), "-c", CONFIG,
                        "-o", str(out)], capture_output=True, text=True, check=True)
    assert "rejected 2" in p.stderr and "bad_json" in p.stderr and "ts: bad_value" in p.stderr
    df = pd.read_parquet(out)
    want, _ = expected
    assert set(df.columns) >= {"window", "window_start", "window_end", "metric", "value", "count",
                               "labelled", "provisional", "model", "model_version", "variant",
                               "endpoint", "region"}
    assert len(df) == len(want)
    assert not df["provisional"].any()
    csv = tmp_path / "w.csv"
    subprocess.run([sys.executable, "-m", "kpistream.cli", "replay", str(src), "-c", CONFIG, "-o",
                    str(csv), "-q"], check=True)
    assert len(pd.read_csv(csv)) == len(want)


def test_replay_values_are_sane(expected):
    df, eng = expected
    acc = df[(df["metric"] == "accuracy") & (df["variant"] == "primary") & (df["window"] == "1m")]
    assert 0.8 < acc["value"].median() < 0.9  # the demo's primary is ~85 % accurate
    assert set(df["metric"]) >= {"requests", "error_rate", "latency_p99", "accuracy", "f1", "mae",
                                 "rmse", "ndcg_at_k", "precision_at_k", "recall_at_k", "mrr",
                                 "ctr", "conversion_rate", "thumbs_up_rate", "dwell_mean",
                                 "reward_mean", "cost_per_1k", "tokens_mean", "label_coverage"}
    cov = df[(df["metric"] == "label_coverage") & (df["model"] == "churn")]
    assert cov["labelled"].notna().all() and ((cov["value"] > 0.5) & (cov["value"] <= 1)).all()


@pytest.mark.slow
def test_missing_file_and_bad_config_are_clear_errors(tmp_path):
    p = subprocess.run([sys.executable, "-m", "kpistream.cli", "replay", str(tmp_path / "nope.ndjson")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "no such file" in p.stderr
    cfg = tmp_path / "m.yaml"
    cfg.write_text("windows:\n  - {type: tumbling, size: 10 seconds}\n")
    p = subprocess.run([sys.executable, "-m", "kpistream.cli", "replay", "x.ndjson", "-c", str(cfg)],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "windows[0].size" in p.stderr


@pytest.mark.slow
def test_bad_output_name_is_refused_before_the_replay(tmp_path, stream):
    src = tmp_path / "events.ndjson"
    stream.to_ndjson(src)
    p = subprocess.run([sys.executable, "-m", "kpistream.cli", "replay", str(src), "-o",
                        str(tmp_path / "out.txt")], capture_output=True, text=True)
    assert p.returncode == 2 and "out.txt: output must end in .csv" in p.stderr
    assert "replay:" not in p.stderr and "windows:" not in p.stderr     # nothing replayed
    assert not (tmp_path / "out.txt").exists()
    p = subprocess.run([sys.executable, "-m", "kpistream.cli", "replay", str(tmp_path / "nope.ndjson"),
                        "-o", str(tmp_path / "out.txt")], capture_output=True, text=True)
    assert p.returncode == 2 and "output must end in" in p.stderr      # checked first


@pytest.mark.slow
def test_a_closed_pipe_ends_quietly(tmp_path, stream):
    """``kpistream replay events | head -1``: no BrokenPipeError traceback."""
    src = tmp_path / "events.ndjson"
    stream.to_ndjson(src)
    cmd = f"{sys.executable} -m kpistream.cli replay -q {src} | head -1"
    p = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True)
    assert p.stdout.startswith("window,") and p.stdout.count("\n") == 1
    assert "Traceback" not in p.stderr and "BrokenPipeError" not in p.stderr, p.stderr
    assert p.returncode in (0, 1)


@pytest.mark.slow
def test_demo_command_runs(tmp_path):
    p = subprocess.run([sys.executable, "-m", "kpistream.cli", "demo", "--requests", "3000",
                        "--out-dir", str(tmp_path)], capture_output=True, text=True, check=True)
    assert "last whole 1m window" in p.stdout and "every region merged" in p.stdout
    df = pd.read_csv(tmp_path / "demo-windows.csv", keep_default_na=False, na_values=[""])
    assert np.isfinite(df["value"]).all()
    # the table shows totals: requests of the * rows are the sums over regions
    req = df[df["metric"] == "requests"]
    keys = ["window", "window_start", "model", "model_version", "variant"]
    tot = req[req["region"] == "*"].set_index(keys)["value"]
    per = req[req["region"] != "*"].groupby(keys)["value"].sum()
    assert len(tot) > 10 and (tot == per.loc[tot.index]).all()
    churn = next(line for line in p.stdout.splitlines() if line.startswith("churn"))
    assert ".6667" not in churn and ".3333" not in churn     # no averages over regions


def test_totals_equal_a_replay_without_segments(stream):
    """Rows with every segment merged (``*``) are the windows of the same events replayed
    with no segments configured: merged states, exact for every KPI (quantiles too)."""
    import dataclasses

    cfg = load_config(CONFIG)
    rows, _ = replay_batches(stream.batches(512), cfg, totals=True)
    got = [r for r in rows if r.get("region") == "*"]
    want, _ = replay_batches(stream.batches(512), dataclasses.replace(cfg, segments=()))
    key = lambda r: (r["window"], r["window_start"], r["model"], r["model_version"],  # noqa: E731
                     r["variant"], r["endpoint"], r["metric"])
    got_by, want_by = {key(r): r for r in got}, {key(r): r for r in want}
    assert len(got_by) == len(got) and got_by.keys() == want_by.keys() and len(got) > 300
    for k, w in want_by.items():
        g = got_by[k]
        assert (g["count"], g["labelled"], g["provisional"]) == (
            w["count"], w["labelled"], w["provisional"]), k
        assert g["value"] == pytest.approx(w["value"], rel=1e-12, nan_ok=True), k
    # and the per-region rows are unchanged by asking for totals
    plain, _ = replay_batches(stream.batches(512), cfg)
    assert [r for r in rows if r.get("region") != "*"] == plain
