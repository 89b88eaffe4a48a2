"""What the fault tests and benchmarks check, in one place: send over HTTP until
acknowledged, read the stored 10 s windows, compare them with `kpistream replay` of the
acknowledged events, and watch that no window once final changes.

Used by ``tests/e2e/test_faults.py``, ``tests/e2e/multinode_driver.py`` and
``bench/chaos.py`` (which puts this directory on its path).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pandas as pd

from kpistream.replay import iter_runs, replay_batches
from kpistream.wire.batch import FeedbackBatch, InferenceBatch
from kpistream.wire.schema import validate_rows
from kpistream.windows.aggregate import rows_frame

#: the columns that name one stored window of one KPI (configs/metrics.yaml's segment: region)
KEY = ["window_start", "model", "model_version", "variant", "endpoint", "region", "metric"]


def post(url: str, rows: list, timeout: float = 60.0) -> dict:
    """POST ``rows`` as NDJSON; the JSON answer."""
    req = urllib.request.Request(url, data="\n".join(json.dumps(r) for r in rows).encode(),
                                 method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def post_until_acked(url: str, rows: list, tries: int = 600) -> int:
    """Send ``rows`` until the sidecar acknowledges them all (what a sender does: at least
    once); returns the retries it took."""
    for attempt in range(tries):
        try:
            rep = post(url, rows)
        except (urllib.error.URLError, TimeoutError, ConnectionError):
            time.sleep(0.2)
            continue
        assert rep["received"] == len(rows), rep
        return attempt
    raise AssertionError(f"{len(rows)} rows never acknowledged after {tries} tries")


def series(base: str) -> pd.DataFrame:
    """Every stored 10 s row (``GET /v1/series``, page by page)."""
    out, offset = [], 0
    while True:
        with urllib.request.urlopen(f"{base}/v1/series?resolution=10s&limit=100000"
                                    f"&offset={offset}", timeout=60) as r:
            page = json.loads(r.read())
        out += page
        if len(page) < 100_000:
            return pd.DataFrame(out)
        offset += len(page)


def final_series(base: str, timeout_s: float = 60.0) -> pd.DataFrame:
    """The stored 10 s rows once every window is final (the shards idle: the watermark moves
    to the clock); on a timeout, the error says which windows stayed open and the health."""
    deadline = time.time() + timeout_s
    while True:
        got = series(base)
        if len(got) and not got["provisional"].any():
            return got
        if time.time() > deadline:
            with urllib.request.urlopen(base + "/v1/health", timeout=30) as r:
                health = r.read().decode()
            prov = got[got["provisional"]] if len(got) else got
            raise AssertionError(
                f"windows never became final: {len(prov)} provisional rows, "
                f"{prov['window_start'].min() if len(prov) else '-'} to "
                f"{prov['window_start'].max() if len(prov) else '-'}; health {health}")
        time.sleep(1)


def compare_with_replay(got: pd.DataFrame, recs: list, cfg) -> dict:
    """Stored 10 s windows against `kpistream replay` of ``recs``: windows compared, missing,
    extra, values unequal, counts lost and doubled."""
    res = validate_rows(recs, now_ms=int(time.time() * 1000), max_future_ms=cfg.max_future_ms)
    batches = [(k, (InferenceBatch if k == "inference" else FeedbackBatch).from_records(r))
               for k, r in iter_runs(res)]
    rows, _ = replay_batches(batches, cfg)
    want = rows_frame(rows, cfg.segments)
    want = want[want["window"] == "10s"]
    got = got.assign(window_start=pd.to_datetime(got["window_start"], utc=True))
    m = want.merge(got, on=KEY, suffixes=("_r", "_s"), how="outer", indicator=True)
    both = m[m["_merge"] == "both"]
    vals = both["value_r"].notna() | both["value_s"].notna()
    unequal = ~((both["value_r"] - both["value_s"]).abs()[vals]
                <= 1e-9 * both["value_r"].abs()[vals] + 1e-12)
    return {"compared": len(m), "missing": int((m["_merge"] == "left_only").sum()),
            "extra": int((m["_merge"] == "right_only").sum()), "unequal": int(unequal.sum()),
            "lost": int((both["count_r"] - both["count_s"]).clip(lower=0).sum()),
            "doubled": int((both["count_s"] - both["count_r"]).clip(lower=0).sum()),
            "examples": m[m["_merge"] != "both"][KEY + ["_merge"]].head().to_dict("records"),
            "unequal_examples": both[vals][unequal][KEY + ["count_r", "count_s", "value_r",
                                                          "value_s"]].head().to_dict("records"),
            "unequal_span": [str(both[vals][unequal]["window_start"].min()),
                             str(both[vals][unequal]["window_start"].max())]}


def assert_equals_replay(got: pd.DataFrame, recs: list, cfg) -> int:
    """Every stored 10 s window equals replay of ``recs``; returns how many were compared."""
    rep = compare_with_replay(got, recs, cfg)
    bad = {k: v for k, v in rep.items() if k in ("missing", "extra", "unequal", "lost",
                                                  "doubled") and v}
    assert not bad, (bad, rep["examples"], rep["unequal_examples"], rep["unequal_span"])
    return rep["compared"]


def final_values(df: pd.DataFrame) -> dict:
    """``{window key: (value, count)}`` of the final rows of ``df``."""
    return {tuple(getattr(r, c) for c in KEY): (r.value, r.count)
            for r in df[~df["provisional"]].itertuples(index=False)} if len(df) else {}


def changed(before: dict, after: dict) -> list:
    """Keys whose final value or count differs (NaN equals NaN; a key gone counts)."""
    out = []
    for k, v in before.items():
        w = after.get(k)
        if w is None or (w != v and not (v[0] != v[0] and w[0] != w[0] and v[1] == w[1])):
            out.append((k, v, w))
    return out


class FinalWatcher:
    """Reads the stored windows every ``every_s`` in a thread; records each final value
    when first seen and every later change of it (there must be none)."""

    def __init__(self, base: str, every_s: float = 1.0) -> None:
        self.base, self.every_s = base, every_s
        self.finals: dict = {}
        self.rewritten: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                now = final_values(series(self.base))
            except Exception:
                self._stop.wait(self.every_s)
                continue
            seen = {k: v for k, v in now.items() if k in self.finals}
            self.rewritten += changed({k: self.finals[k] for k in seen}, seen)
            for k, v in now.items():
                self.finals.setdefault(k, v)
            self._stop.wait(self.every_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)
