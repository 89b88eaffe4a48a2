"""A realistic synthetic event stream, out of order (:func:`generate_stream` ->
:class:`DemoStream`): inference and feedback events of a small serving deployment.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Iterator

import numpy as np
import pandas as pd

from kpistream.wire.batch import (
    KIND_CLICK, KIND_CONVERSION, KIND_DWELL, KIND_LABEL, KIND_RELEVANCE, KIND_REWARD,
    KIND_THUMBS, FEEDBACK_KINDS, FeedbackBatch, InferenceBatch, hash_ids, ranges, series_key)

#: (model, model_version, variant) of the four series, in code order.
SERIES: tuple[tuple[str, str, str], ...] = (
    ("churn", "3", "primary"), ("churn", "4", "shadow"),
    ("recs", "7", "primary"), ("eta", "2", "primary"))
CHURN_PRIMARY, CHURN_SHADOW, RECS, ETA = range(4)
ENDPOINT = "predict"
REGIONS: tuple[str, ...] = ("eu", "us", "apac")
REGION_P = (0.45, 0.35, 0.20)
LABELS: tuple[str, ...] = ("0", "1")   # canonical class labels; code = the JSON int

_LAT_MEDIAN_MS = np.array([20.0, 25.0, 40.0, 8.0])
_LAT_SIGMA = 0.5
_TOKENS_MEAN = np.array([120.0, 150.0, 400.0, 60.0])
_USD_PER_TOKEN = np.array([2e-6, 2.5e-6, 1e-6, 5e-7])
_USD_FIXED = 1e-5

#: feedback drawn per request: (model code of the request, kind, probability)
_FEEDBACK_PLAN: tuple[tuple[int, int, float], ...] = (
    (CHURN_PRIMARY, KIND_LABEL, 0.70),
    (CHURN_PRIMARY, KIND_THUMBS, 0.10),
    (CHURN_PRIMARY, KIND_CLICK, 0.20),
    (CHURN_PRIMARY, KIND_CONVERSION, 0.05),
    (CHURN_PRIMARY, KIND_REWARD, 0.30),
    (CHURN_PRIMARY, KIND_DWELL, 0.10),
    (RECS, KIND_RELEVANCE, 0.60),
    (RECS, KIND_CLICK, 0.25),
    (ETA, KIND_LABEL, 0.80),
)

_INF, _FB = 0, 1
_DAY_MS = 86_400_000


def _id_strings(prefix: str, nums: np.ndarray) -> np.ndarray:
    """``prefix + str(n)`` for each n, as an object array of str (vectorized)."""
    if len(nums) == 0:
        return np.zeros(0, dtype=object)
    return (prefix + pd.Series(nums, copy=False).astype(str)).to_numpy(dtype=object)


def _gather_csr(offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(new offsets, element index) of CSR rows ``rows``."""
    lo = offsets[rows]
    lens = offsets[rows + 1] - lo
    out = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lens, out=out[1:])
    return out, ranges(lo, lens)


def _unique_prefix(cand: np.ndarray, width: int, n_values: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``cand`` (values in ``[0, n_values)``), the first ``width`` distinct
    values in order (-1 padded), and how many distinct values the row has."""
    n, k = cand.shape
    keep = np.empty((n, k), dtype=bool)
    step = max(1, (1 << 24) // max(1, n_values))     # bitmap of at most 16 MB at a time
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        seen = np.zeros((hi - lo, n_values), dtype=bool)
        r = np.arange(hi - lo)
        for j in range(k):                           # a loop over columns, not rows
            v = cand[lo:hi, j]
            keep[lo:hi, j] = ~seen[r, v]
            seen[r, v] = True
    pos = np.cumsum(keep, axis=1) - 1
    out = np.full((n, width), -1, dtype=cand.dtype)
    r, c = np.nonzero(keep & (pos < width))
    out[r, pos[r, c]] = cand[r, c]
    return out, keep.sum(axis=1)


@dataclass(eq=False)
class DemoStream:
    """The events of one synthetic run, in arrival order.

    Counts (each over the events of the stream):

    * ``n_inference`` / ``n_feedback``: records of each type, duplicates included
      (``n_inference + n_feedback == len(stream)``);
    * ``n_duplicates``: extra deliveries of an event already sent (same event_id);
    * ``n_late``: inferences delivered about 3 minutes after their event time;
    * ``n_early``: feedback records (not duplicates) that arrive before their
      request's primary inference (late inferences' feedback not counted);
    * ``n_future``: inferences whose timestamp is a day ahead (bad clock).

    The tables (``inf_*`` one row per distinct inference event, ``fb_*`` per
    feedback event; ``ev_*`` the deliveries in arrival order) are public, so tests
    can compute expected values directly.

    ``now_ms`` is the largest timestamp of the events with a sane clock: the
    "now" to pass to the far-future guard when replaying the stream.
    """

    seed: int
    n_requests: int
    start_ms: int
    # inference table (one row per distinct inference event)
    inf_req: np.ndarray
    inf_ts: np.ndarray
    inf_series: np.ndarray      # int8, index into SERIES
    inf_region: np.ndarray      # int8, index into REGIONS
    inf_latency: np.ndarray
    inf_error: np.ndarray
    inf_label: np.ndarray       # int8 -1 / 0 / 1
    inf_score: np.ndarray       # float, NaN if none
    inf_value: np.ndarray       # float, NaN if none
    rank_offsets: np.ndarray    # int64 CSR over inference rows
    rank_items: np.ndarray      # int32 item numbers
    inf_usd: np.ndarray
    inf_tokens: np.ndarray      # int64
    inf_late: np.ndarray        # bool: delivered ~3 minutes late
    inf_future: np.ndarray      # bool: timestamp a day ahead (bad clock)
    # feedback table
    fb_req: np.ndarray
    fb_ts: np.ndarray
    fb_kind: np.ndarray         # int8 KIND_*
    fb_label: np.ndarray        # int8 -1 / 0 / 1 (class label, JSON int on the wire)
    fb_value: np.ndarray        # float, NaN if none
    rel_offsets: np.ndarray
    rel_items: np.ndarray       # int32 item numbers
    rel_grades: np.ndarray      # int8 1..3
    # events in arrival order
    ev_type: np.ndarray         # int8 0 inference / 1 feedback
    ev_row: np.ndarray          # int64 row in the table of its type
    ev_arrival: np.ndarray      # float64 arrival time (ms)
    ev_dup: np.ndarray          # bool: a repeated delivery
    n_items: int
    n_inference: int = 0
    n_feedback: int = 0
    n_duplicates: int = 0
    n_late: int = 0
    n_early: int = 0
    n_future: int = 0
    now_ms: int = 0
    _cols: dict | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ basics

    def __len__(self) -> int:
        return len(self.ev_type)

    @property
    def item_names(self) -> list[str]:
        return [f"item{k}" for k in range(self.n_items)]

    @property
    def series_keys(self) -> list:
        """The series vocabulary of :meth:`batches`: code = 3 * series + region."""
        return [series_key(m, v, var, ENDPOINT, {"region": reg})
                for (m, v, var) in SERIES for reg in REGIONS]

    @property
    def counts(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in (
            "n_inference", "n_feedback", "n_duplicates", "n_late", "n_early", "n_future")}

    # ------------------------------------------------------------------ wire records

    def records(self, chunk: int = 32768) -> Iterator[dict]:
        """Wire-format dicts (JSON-serializable), in arrival order."""
        items = self.item_names
        n = len(self)
        for lo in range(0, n, chunk):
            types = self.ev_type[lo:lo + chunk]
            rows = self.ev_row[lo:lo + chunk]
            inf = iter(self._inference_records(rows[types == _INF], items))
            fb = iter(self._feedback_records(rows[types == _FB], items))
            for t in types.tolist():
                yield next(inf) if t == _INF else next(fb)

    def _inference_records(self, rows: np.ndarray, items: list[str]) -> list[dict]:
        if len(rows) == 0:
            return []
        req = self.inf_req[rows].tolist()
        ts = self.inf_ts[rows].tolist()
        ser = self.inf_series[rows].tolist()
        reg = self.inf_region[rows].tolist()
        lat = self.inf_latency[rows].tolist()
        err = self.inf_error[rows].tolist()
        lab = self.inf_label[rows].tolist()
        score = self.inf_score[rows].tolist()
        val = self.inf_value[rows].tolist()
        usd = self.inf_usd[rows].tolist()
        tok = self.inf_tokens[rows].tolist()
        lo = self.rank_offsets[rows].tolist()
        hi = self.rank_offsets[rows + 1].tolist()
        ritems = self.rank_items
        out = []
        append = out.append
        for i, r in enumerate(rows.tolist()):
            s = ser[i]
            model, version, variant = SERIES[s]
            if s <= CHURN_SHADOW:
                pred = {"label": lab[i], "score": score[i]}
            elif s == RECS:
                pred = {"ranking": [items[k] for k in ritems[lo[i]:hi[i]].tolist()]}
            else:
                pred = val[i]
            append({"type": "inference", "event_id": f"e{r}", "request_id": f"r{req[i]}",
                    "ts": ts[i], "model": model, "model_version": version, "variant": variant,
                    "endpoint": ENDPOINT, "latency_ms": lat[i],
                    "status": "error" if err[i] else "ok", "prediction": pred,
                    "segments": {"region": REGIONS[reg[i]]},
                    "cost": {"usd": usd[i], "tokens": tok[i]}})
        return out

    def _feedback_records(self, rows: np.ndarray, items: list[str]) -> list[dict]:
        if len(rows) == 0:
            return []
        base = len(self.inf_ts)
        req = self.fb_req[rows].tolist()
        ts = self.fb_ts[rows].tolist()
        kind = self.fb_kind[rows].tolist()
        lab = self.fb_label[rows].tolist()
        val = self.fb_value[rows].tolist()
        lo = self.rel_offsets[rows].tolist()
        hi = self.rel_offsets[rows + 1].tolist()
        ritems, rgrades = self.rel_items, self.rel_grades
        out = []
        append = out.append
        for i, r in enumerate(rows.tolist()):
            k = kind[i]
            if k == KIND_LABEL:
                value = lab[i] if lab[i] >= 0 else val[i]
            elif k == KIND_RELEVANCE:
                value = dict(zip([items[j] for j in ritems[lo[i]:hi[i]].tolist()],
                                 rgrades[lo[i]:hi[i]].tolist()))
            elif k in (KIND_THUMBS, KIND_CLICK, KIND_CONVERSION):
                value = val[i] > 0.5
            else:
                value = val[i]
            append({"type": "feedback", "event_id": f"e{base + r}", "request_id": f"r{req[i]}",
                    "ts": ts[i], "kind": FEEDBACK_KINDS[k], "value": value})
        return out

    def to_ndjson(self, path) -> int:
        """Write :meth:`records` as NDJSON lines; returns the number of lines."""
        dumps = json.JSONEncoder(separators=(",", ":")).encode
        n = 0
        with open(path, "w", encoding="utf-8") as f:
            buf = []
            for rec in self.records():
                buf.append(dumps(rec))
                n += 1
                if len(buf) >= 8192:
                    f.write("\n".join(buf) + "\n")
                    buf.clear()
            if buf:
                f.write("\n".join(buf) + "\n")
        return n

    # ------------------------------------------------------------------ columnar batches

    def _columns(self) -> dict:
        """Arrival-ordered columns of all inference and all feedback records (cached)."""
        if self._cols is not None:
            return self._cols
        n_inf_rows = len(self.inf_ts)
        req_hash = hash_ids(_id_strings("r", np.arange(self.n_requests)))
        item_hash = hash_ids(np.asarray(self.item_names, dtype=object))
        is_inf = self.ev_type == _INF
        ir = self.ev_row[is_inf]
        fr = self.ev_row[~is_inf]
        # hash each distinct event id once, then gather
        inf_eid = hash_ids(_id_strings("e", np.arange(n_inf_rows)))
        fb_eid = hash_ids(_id_strings("e", np.arange(n_inf_rows, n_inf_rows + len(self.fb_ts))))
        r_off, r_idx = _gather_csr(self.rank_offsets, ir)
        f_off, f_idx = _gather_csr(self.rel_offsets, fr)
        inf = dict(
            ts=self.inf_ts[ir], event_id=inf_eid[ir], request_id=req_hash[self.inf_req[ir]],
            series=(self.inf_series[ir].astype(np.int32) * len(REGIONS)
                    + self.inf_region[ir].astype(np.int32)),
            latency_ms=self.inf_latency[ir], error=self.inf_error[ir],
            pred_label=self.inf_label[ir].astype(np.int32), pred_score=self.inf_score[ir],
            pred_value=self.inf_value[ir], cost_usd=self.inf_usd[ir],
            tokens=self.inf_tokens[ir].astype(np.float64),
            rank_offsets=r_off, rank_items=item_hash[self.rank_items[r_idx]])
        fb = dict(
            ts=self.fb_ts[fr], event_id=fb_eid[fr], request_id=req_hash[self.fb_req[fr]],
            kind=self.fb_kind[fr].astype(np.int8), label=self.fb_label[fr].astype(np.int32),
            value=self.fb_value[fr], rel_offsets=f_off,
            rel_items=item_hash[self.rel_items[f_idx]],
            rel_grades=self.rel_grades[f_idx].astype(np.float64))
        for arr in (*inf.values(), *fb.values()):
            arr.flags.writeable = False     # batches are views of these: keep them intact
        self._cols = {"inference": inf, "feedback": fb, "series_keys": self.series_keys}
        return self._cols

    def _inf_slice(self, a: int, b: int) -> InferenceBatch:
        c = self._columns()
        d = c["inference"]
        off = d["rank_offsets"]
        o0, o1 = off[a], off[b]
        return InferenceBatch(
            ts=d["ts"][a:b], event_id=d["event_id"][a:b], request_id=d["request_id"][a:b],
            series=d["series"][a:b], latency_ms=d["latency_ms"][a:b], error=d["error"][a:b],
            pred_label=d["pred_label"][a:b], pred_score=d["pred_score"][a:b],
            pred_value=d["pred_value"][a:b], cost_usd=d["cost_usd"][a:b],
            tokens=d["tokens"][a:b], rank_offsets=off[a:b + 1] - o0,
            rank_items=d["rank_items"][o0:o1], series_keys=list(c["series_keys"]),
            labels=list(LABELS))

    def _fb_slice(self, a: int, b: int) -> FeedbackBatch:
        d = self._columns()["feedback"]
        off = d["rel_offsets"]
        o0, o1 = off[a], off[b]
        return FeedbackBatch(
            ts=d["ts"][a:b], event_id=d["event_id"][a:b], request_id=d["request_id"][a:b],
            kind=d["kind"][a:b], label=d["label"][a:b], value=d["value"][a:b],
            rel_offsets=off[a:b + 1] - o0, rel_items=d["rel_items"][o0:o1],
            rel_grades=d["rel_grades"][o0:o1], labels=list(LABELS))

    def batches(self, batch_size: int = 65536, *, exact_order: bool = True
                ) -> Iterator[tuple[str, InferenceBatch | FeedbackBatch]]:
        """``("inference", InferenceBatch)`` / ``("feedback", FeedbackBatch)`` in arrival order.

        With ``exact_order`` (the default) each maximal run of one event type is cut
        into batches of at most ``batch_size`` rows, so concatenating the batches
        replays the exact interleaving of :meth:`records` (runs are short in a mixed
        stream, so many batches are small).  With ``exact_order=False`` the arrival
        sequence is cut into blocks of ``batch_size`` events and each block yields its
        inference rows, then its feedback rows (order kept within each type): fewer,
        larger batches, reordered only within a block.

        Vocabularies: ``series_keys`` is :attr:`series_keys` (all 12 series, in every
        batch); ``labels`` is ``["0", "1"]``.  The columns are read-only views of
        arrays the stream caches (the CSR offsets excepted).  Feedback values:
        a class label is in ``label``; a regression label, reward, dwell and
        thumbs / click / conversion (1.0 / 0.0) are in ``value``; relevance grades in
        the CSR columns.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self._columns()
        types = self.ev_type
        n = len(types)
        if n == 0:
            return
        is_inf = types == _INF
        # position of each event within its type's arrival-ordered columns
        inf_before = np.concatenate([[0], np.cumsum(is_inf)])
        if not exact_order:
            for lo in range(0, n, batch_size):
                hi = min(n, lo + batch_size)
                ia, ib = int(inf_before[lo]), int(inf_before[hi])
                fa, fb = lo - ia, hi - ib
                if ib > ia:
                    yield "inference", self._inf_slice(ia, ib)
                if fb > fa:
                    yield "feedback", self._fb_slice(fa, fb)
            return
        change = np.flatnonzero(types[1:] != types[:-1]) + 1
        starts = np.concatenate([[0], change])
        ends = np.concatenate([change, [n]])
        run_inf = is_inf[starts]
        # start of each run within its type's columns
        a_run = np.where(run_inf, inf_before[starts], starts - inf_before[starts])
        for a, ln, t in zip(a_run.tolist(), (ends - starts).tolist(), run_inf.tolist()):
            make, name = (self._inf_slice, "inference") if t else (self._fb_slice, "feedback")
            for lo in range(a, a + ln, batch_size):
                yield name, make(lo, min(a + ln, lo + batch_size))


def generate_stream(
    n_requests: int,
    *,
    seed: int = 0,
    rate_per_s: float = 2000.0,
    start_ms: int = 1_767_225_600_000,
    mix: tuple[float, float, float] = (0.5, 0.3, 0.2),
    accuracy_primary: float = 0.85,
    accuracy_shadow: float = 0.87,
    positive_rate: float = 0.3,
    error_rate: float = 0.02,
    transport_ms: float = 50.0,
    duplicate_rate: float = 0.005,
    duplicate_within_ms: float = 3000.0,
    late_rate: float = 0.001,
    late_by_ms: int = 180_000,
    early_rate: float = 0.01,
    future_rate: float = 0.0001,
    feedback_delay_ms: tuple[int, int] = (1000, 30_000),
    n_items: int = 500,
) -> DemoStream:
    """Draw ``n_requests`` requests and their inference and feedback events.

    ``mix`` splits requests between churn (scored by the primary and the shadow),
    recs and eta.  The disorder rates are fractions of events: ``duplicate_rate``
    of all events, ``late_rate`` and ``future_rate`` of inferences, ``early_rate``
    of feedback.  Deterministic for a given ``seed``.

    Drawn with vectorized numpy code: the traffic of one
    small serving deployment (millions of events in a few seconds):

    * ``("churn", "3", "primary")``: a binary classifier (labels ``0`` / ``1`` on the
      wire, ``"0"`` / ``"1"`` canonical) with a score, about 85 % accurate;
    * ``("churn", "4", "shadow")``: a shadow that scores the *same* requests (same
      ``request_id``, its own ``event_id``) 5-50 ms after the primary, about 87 %
      accurate, its errors correlated with the primary's;
    * ``("recs", "7", "primary")``: a ranker, ``{"ranking": [10-20 item ids]}`` from a
      catalogue of 500 items with a mild popularity skew;
    * ``("eta", "2", "primary")``: a regressor (prediction a JSON float).

    Every inference has endpoint ``"predict"``, a ``region`` segment (eu / us /
    apac), a lognormal latency, a status (``"error"`` for about 2 %, still with a
    prediction) and a cost ``{"usd", "tokens"}``.  Feedback follows 1-30 s after the
    inference (event time), with the request's id and its own event id.

    Events are emitted in *arrival* order (event time plus a transport delay), with
    the kinds of disorder a live system sees: ordinary jitter, duplicates,
    late inferences, feedback arriving before its inference, and a few bad clocks.

    :class:`DemoStream` gives the same events as wire dicts (:meth:`DemoStream.records`,
    :meth:`DemoStream.to_ndjson`) or as columnar batches (:meth:`DemoStream.batches`).
    No Ray here.
    """
    if n_requests < 0:
        raise ValueError("n_requests must be >= 0")
    rng = np.random.default_rng(seed)
    n = int(n_requests)

    # --- requests: Poisson arrivals in event time, model, region
    gaps = rng.exponential(1000.0 / rate_per_s, n)
    req_ts = start_ms + np.floor(np.cumsum(gaps)).astype(np.int64)
    p = np.asarray(mix, dtype=np.float64)
    model = rng.choice(3, size=n, p=p / p.sum()).astype(np.int8)   # 0 churn, 1 recs, 2 eta
    region = rng.choice(len(REGIONS), size=n, p=REGION_P).astype(np.int8)
    churn = np.flatnonzero(model == 0)
    recs = np.flatnonzero(model == 1)
    eta = np.flatnonzero(model == 2)
    nc, nr, ne = len(churn), len(recs), len(eta)

    # --- inference rows: one primary per request (row = request number), one shadow per churn request
    n_inf = n + nc
    inf_req = np.concatenate([np.arange(n, dtype=np.int64), churn])
    inf_series = np.empty(n_inf, dtype=np.int8)
    inf_series[:n] = np.array([CHURN_PRIMARY, RECS, ETA], dtype=np.int8)[model]
    inf_series[n:] = CHURN_SHADOW
    inf_region = region[inf_req]
    true_ts = req_ts[inf_req].copy()
    true_ts[n:] += rng.integers(5, 51, nc)          # the shadow answers 5-50 ms later

    inf_label = np.full(n_inf, -1, dtype=np.int8)
    inf_score = np.full(n_inf, np.nan)
    inf_value = np.full(n_inf, np.nan)

    # churn: latent-score classifiers with correlated errors
    y = (rng.random(nc) < positive_rate).astype(np.int8)
    sign = 2.0 * y - 1.0
    e1 = rng.standard_normal(nc)
    e2 = 0.6 * e1 + 0.8 * rng.standard_normal(nc)
    z1 = sign * NormalDist().inv_cdf(accuracy_primary) + e1
    z2 = sign * NormalDist().inv_cdf(accuracy_shadow) + e2
    pred1 = (z1 > 0).astype(np.int8)
    pred2 = (z2 > 0).astype(np.int8)
    inf_label[churn] = pred1
    inf_label[n:] = pred2
    inf_score[churn] = np.round(1.0 / (1.0 + np.exp(-1.5 * z1)), 4)
    inf_score[n:] = np.round(1.0 / (1.0 + np.exp(-1.5 * z2)), 4)
    correct1 = pred1 == y

    # recs: rankings of 10-20 distinct items (popularity-skewed), plus a pool of
    # further distinct items for relevance judgments outside the ranking
    pop = 1.0 / np.arange(1, n_items + 1) ** 0.7
    # popularity as a lookup table (fast draws); popular items are not item0, item1, ...
    table = np.repeat(rng.permutation(n_items).astype(np.int32),
                      np.maximum(1, np.round(pop / pop.sum() * 65536).astype(np.int64)))
    width = 28
    uniq = np.zeros((nr, width), dtype=np.int32)
    todo = np.arange(nr)
    for _attempt in range(50):
        if len(todo) == 0:
            break
        cand = table[rng.integers(0, len(table), (len(todo), 40))]
        u, cnt = _unique_prefix(cand, width, n_items)
        ok = cnt >= width
        uniq[todo[ok]] = u[ok]
        todo = todo[~ok]                             # redraw the rare rows short of items
    if len(todo):  # pragma: no cover - only with a tiny catalogue
        raise RuntimeError(f"could not draw {width} distinct items from {n_items}")
    rlen = rng.integers(10, 21, nr)
    rank_lens = np.zeros(n_inf, dtype=np.int64)
    rank_lens[recs] = rlen
    rank_offsets = np.zeros(n_inf + 1, dtype=np.int64)
    np.cumsum(rank_lens, out=rank_offsets[1:])
    col = np.arange(width)
    rank_items = uniq[col[None, :] < rlen[:, None]]  # row-major: rows in recs order = row order

    # eta: regression
    y_eta = np.round(rng.lognormal(math.log(25.0), 0.5, ne), 2)
    pred_eta = np.round(np.maximum(0.5, y_eta * np.exp(rng.normal(0.0, 0.12, ne))
                                   + rng.normal(0.0, 1.0, ne)), 2)
    inf_value[eta] = pred_eta

    # operational fields
    inf_latency = np.round(_LAT_MEDIAN_MS[inf_series] * np.exp(rng.normal(0.0, _LAT_SIGMA, n_inf)), 3)
    inf_error = rng.random(n_inf) < error_rate
    inf_tokens = rng.poisson(_TOKENS_MEAN[inf_series]).astype(np.int64)
    inf_usd = np.round(inf_tokens * _USD_PER_TOKEN[inf_series] + _USD_FIXED, 8)

    # --- feedback
    by_model = {CHURN_PRIMARY: churn, RECS: recs, ETA: eta}
    pos_in = np.full(n, -1, dtype=np.int64)      # position of a request among its model's requests
    for idx in by_model.values():
        pos_in[idx] = np.arange(len(idx))
    f_req, f_kind, f_label, f_value, f_rel_len, f_rel_items, f_rel_grades = [], [], [], [], [], [], []
    for m, kind, prob in _FEEDBACK_PLAN:
        idx = by_model[m]
        sel = idx[rng.random(len(idx)) < prob]
        k = len(sel)
        pc = pos_in[sel]
        label = np.full(k, -1, dtype=np.int8)
        value = np.full(k, np.nan)
        rel_len = np.zeros(k, dtype=np.int64)
        if kind == KIND_LABEL:
            if m == CHURN_PRIMARY:
                label = y[pc].astype(np.int8)
            else:
                value = y_eta[pc]
        elif kind == KIND_THUMBS:
            value = (rng.random(k) < np.where(correct1[pc], 0.8, 0.3)).astype(np.float64)
        elif kind in (KIND_CLICK, KIND_CONVERSION):
            value = np.ones(k)
        elif kind == KIND_REWARD:
            value = np.round(rng.normal(0.3 + 0.5 * correct1[pc], 0.2), 4)
        elif kind == KIND_DWELL:
            value = np.round(rng.exponential(40.0, k), 1)
        elif kind == KIND_RELEVANCE:
            rel_len, items, grades = _relevance(rng, uniq[pc], rlen[pc])
            f_rel_items.append(items)
            f_rel_grades.append(grades)
        f_req.append(sel)
        f_kind.append(np.full(k, kind, dtype=np.int8))
        f_label.append(label)
        f_value.append(value)
        f_rel_len.append(rel_len)
    fb_req = np.concatenate(f_req).astype(np.int64)
    n_fb = len(fb_req)
    fb_kind = np.concatenate(f_kind)
    fb_label = np.concatenate(f_label)
    fb_value = np.concatenate(f_value)
    rel_offsets = np.zeros(n_fb + 1, dtype=np.int64)
    np.cumsum(np.concatenate(f_rel_len), out=rel_offsets[1:])
    rel_items = np.concatenate(f_rel_items) if f_rel_items else np.zeros(0, np.int32)
    rel_grades = np.concatenate(f_rel_grades) if f_rel_grades else np.zeros(0, np.int8)
    d0, d1 = feedback_delay_ms
    fb_delay = rng.integers(d0, d1 + 1, n_fb)
    fb_ts = req_ts[fb_req] + fb_delay

    # --- delivery: transport delay, late, bad clocks, early feedback, duplicates
    inf_arr = true_ts + rng.exponential(transport_ms, n_inf)
    fb_arr = fb_ts + rng.exponential(transport_ms, n_fb)
    u = rng.random(n_inf)
    late = u < late_rate
    future = (u >= late_rate) & (u < late_rate + future_rate)
    inf_arr[late] = true_ts[late] + late_by_ms + rng.exponential(transport_ms, int(late.sum()))
    inf_ts = true_ts.copy()
    inf_ts[future] += _DAY_MS

    odd_req = np.zeros(n, dtype=bool)               # requests with a late or bad-clock inference
    odd_req[inf_req[late | future]] = True
    # early feedback: picked among feedback that comes soon (<= 2 s after the first
    # possible delay), so that its delayed inference still arrives within the
    # allowed lateness; the request's inferences then arrive just after it
    cand = np.flatnonzero((fb_delay <= d0 + 2000) & ~odd_req[fb_req])
    p_sel = min(1.0, early_rate * n_fb / max(1, len(cand)))
    chosen = cand[rng.random(len(cand)) < p_sel]
    need = np.full(n, -np.inf)
    np.maximum.at(need, fb_req[chosen], fb_arr[chosen])
    target = need[inf_req]
    hit = np.isfinite(target)
    inf_arr[hit] = np.maximum(inf_arr[hit], target[hit] + rng.uniform(1.0, 200.0, int(hit.sum())))
    late_req = np.zeros(n, dtype=bool)
    late_req[inf_req[late]] = True
    n_early = int(np.count_nonzero((fb_arr < inf_arr[:n][fb_req]) & ~late_req[fb_req]))

    n_ev = n_inf + n_fb
    types = np.concatenate([np.zeros(n_inf, np.int8), np.ones(n_fb, np.int8)])
    rows = np.concatenate([np.arange(n_inf, dtype=np.int64), np.arange(n_fb, dtype=np.int64)])
    arrival = np.concatenate([inf_arr, fb_arr])
    dup = np.flatnonzero(rng.random(n_ev) < duplicate_rate)
    types = np.concatenate([types, types[dup]])
    rows = np.concatenate([rows, rows[dup]])
    arrival = np.concatenate([arrival, arrival[dup] + rng.uniform(0.0, duplicate_within_ms, len(dup))])
    is_dup = np.concatenate([np.zeros(n_ev, bool), np.ones(len(dup), bool)])
    order = np.argsort(arrival, kind="stable")
    types, rows, arrival, is_dup = types[order], rows[order], arrival[order], is_dup[order]

    sane = [inf_ts[~future].max()] if (~future).any() else []
    if n_fb:
        sane.append(fb_ts.max())
    n_inference = int(np.count_nonzero(types == _INF))
    return DemoStream(
        seed=seed, n_requests=n, start_ms=int(start_ms),
        inf_req=inf_req, inf_ts=inf_ts, inf_series=inf_series, inf_region=inf_region,
        inf_latency=inf_latency, inf_error=inf_error, inf_label=inf_label, inf_score=inf_score,
        inf_value=inf_value, rank_offsets=rank_offsets, rank_items=rank_items,
        inf_usd=inf_usd, inf_tokens=inf_tokens, inf_late=late, inf_future=future,
        fb_req=fb_req, fb_ts=fb_ts, fb_kind=fb_kind, fb_label=fb_label, fb_value=fb_value,
        rel_offsets=rel_offsets, rel_items=rel_items, rel_grades=rel_grades,
        ev_type=types, ev_row=rows, ev_arrival=arrival, ev_dup=is_dup, n_items=n_items,
        n_inference=n_inference, n_feedback=len(types) - n_inference,
        n_duplicates=len(dup), n_late=int(late.sum()), n_early=n_early,
        n_future=int(future.sum()), now_ms=int(max(sane)) if sane else int(start_ms),
    )


def _relevance(rng: np.random.Generator, uniq: np.ndarray, rlen: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Relevance judgments for rankings: (lengths, items, grades) in CSR order.

    ``uniq`` holds, per request, distinct items: the first ``rlen`` are the
    ranking, columns 20.. are items outside it.  Each judgment has 1-8 items,
    each one in the ranking with probability 0.6 (biased to the top positions)
    and graded 1..3.
    """
    k = len(rlen)
    m = rng.integers(1, 9, k)
    m_in = np.minimum(rng.binomial(m, 0.6), rlen)
    # weighted sampling without replacement (Efraimidis-Spirakis) over ranking positions
    w = 1.0 / np.sqrt(np.arange(1, 21))
    keys = rng.random((k, 20)) ** (1.0 / w)
    keys[np.arange(20)[None, :] >= rlen[:, None]] = -1.0
    pos = np.argsort(-keys, axis=1)[:, :8]
    in_items = np.take_along_axis(uniq, pos, axis=1)
    pool = uniq[:, 20:28]
    j = np.arange(8)[None, :]
    pool_idx = np.clip(j - m_in[:, None], 0, 7)
    mat = np.where(j < m_in[:, None], in_items, np.take_along_axis(pool, pool_idx, axis=1))
    mask = j < m[:, None]
    items = mat[mask].astype(np.int32)
    grades = rng.integers(1, 4, len(items)).astype(np.int8)
    return m.astype(np.int64), items, grades


__all__ = ["generate_stream", "DemoStream", "SERIES", "REGIONS", "ENDPOINT", "LABELS"]
