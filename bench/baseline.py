"""The per-event baseline the engine benchmark compares against.

A deliberately ordinary implementation of the engine's work: it consumes wire
records (dicts, as :meth:`kpistream.synthetic.DemoStream.records` yields them) one at
a time, keeps plain dicts for deduplication and the inference / feedback join,
and updates well-kept per-event libraries: River (``metrics.ConfusionMatrix``
shared by ``Accuracy`` / ``Precision`` / ``Recall`` / ``F1``, ``MAE``, ``RMSE``,
``stats.Mean``) and DDSketch (``DDSketch(relative_accuracy=0.01)``) for latency.
No pydantic validation; the per-event parsing (timestamps, prediction shapes,
series keys) is part of the measured cost.

Semantics (the engine implements the same; the benchmark cross-checks them):

* Series = (model, model_version, variant, endpoint, segments).  Windows: tumbling
  ``[s, s + tumbling_ms)`` and sliding ``sliding_ms`` windows every ``step_ms``
  (starts are multiples of the size / step; an event updates its one tumbling
  window and every sliding window that contains it).
* watermark = (largest ts of the accepted events so far) - ``lateness_ms``,
  updated after each event.
* Checks, in order: ``ts > now_ms + max_future_ms`` -> ``future``; an inference
  with ``ts < watermark`` -> ``late``; an event_id already seen -> ``duplicate``;
  a feedback with ``ts < watermark - label_delay_ms`` -> ``late_feedback``.
  Rejected events do not move the watermark.  If ``now_ms`` is None the
  largest accepted ts so far stands in for "now" (no check before the first event).
* Join by request_id, both ways: an inference is kept until
  ``watermark >= end of its tumbling pane + label_delay_ms``; a feedback until
  ``watermark >= its ts + label_delay_ms``.  A feedback applies to every kept
  inference of its request (primary and shadow alike), an inference to every kept
  feedback of its request, in arrival order.  Quality metrics go to the
  *inference's* windows.
* A label counts once per inference (the first); so does a relevance judgment.
  ``label_coverage`` = inferences with a label (classifier / regressor) or a
  relevance judgment (ranker) / requests.  ``ctr`` = inferences with a true click
  / requests (rows only in windows that saw a click event); ``conversion_rate``
  likewise.  Precision / recall / F1 with no denominator are River's 0.0.

The event-id set for deduplication is unbounded, which makes the counters exact
(a bounded table would count very late repeats as something else).
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable

import pandas as pd
from ddsketch import DDSketch
from river import metrics, stats

QUANTILES: tuple[tuple[str, float], ...] = (
    ("latency_p50", 0.5), ("latency_p90", 0.9), ("latency_p99", 0.99), ("latency_p999", 0.999))

_CLS, _REG, _RANK = 1, 2, 3
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _ts_ms(v: Any) -> int:
    """Epoch milliseconds from an int / float or an RFC 3339 string."""
    if type(v) is int:
        return v
    if isinstance(v, str):
        dt = datetime.fromisoformat(v.replace("Z", "+00:00") if v.endswith("Z") else v)
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        delta = dt - _EPOCH
        return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000
    if isinstance(v, float):
        return int(v)
    raise TypeError(f"ts: not a timestamp: {v!r}")


def _label(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return v
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    raise TypeError(f"not a label: {v!r}")


def _window_name(ms: int) -> str:
    if ms % 3_600_000 == 0:
        return f"{ms // 3_600_000}h"
    if ms % 60_000 == 0:
        return f"{ms // 60_000}m"
    if ms % 1000 == 0:
        return f"{ms // 1000}s"
    return f"{ms}ms"


class _Win:
    """The metric state of one (window, series)."""

    __slots__ = ("requests", "errors", "lat", "usd", "tok", "labelled", "clicked", "converted",
                 "click_events", "conv_events", "cm", "acc", "prec", "rec", "f1", "mae", "rmse",
                 "p_at_k", "r_at_k", "ndcg", "mrr", "thumbs", "dwell", "reward")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.lat = DDSketch(relative_accuracy=0.01)
        self.usd = stats.Mean()
        self.tok = stats.Mean()
        self.labelled = 0
        self.clicked = 0
        self.converted = 0
        self.click_events = 0
        self.conv_events = 0
        self.cm = self.mae = self.p_at_k = self.thumbs = self.dwell = self.reward = None

    def init_cls(self, positive: str) -> None:
        cm = self.cm = metrics.ConfusionMatrix()
        self.acc = metrics.Accuracy(cm=cm)
        self.prec = metrics.Precision(cm=cm, pos_val=positive)
        self.rec = metrics.Recall(cm=cm, pos_val=positive)
        self.f1 = metrics.F1(cm=cm, pos_val=positive)

    def init_reg(self) -> None:
        self.mae = metrics.MAE()
        self.rmse = metrics.RMSE()

    def init_rank(self) -> None:
        self.p_at_k, self.r_at_k, self.ndcg, self.mrr = (
            stats.Mean(), stats.Mean(), stats.Mean(), stats.Mean())

    def rows(self) -> list[tuple[str, float, float]]:
        """(metric, value, count) for every metric with data."""
        n = self.requests
        out = [("requests", float(n), n), ("error_rate", self.errors / n, n)]
        lat = self.lat
        if lat.count:
            out.append(("latency_mean", lat.avg, lat.count))
            out.extend((name, lat.get_quantile_value(q), lat.count) for name, q in QUANTILES)
        if self.usd.n:
            out.append(("cost_per_1k", 1000.0 * self.usd.get(), self.usd.n))
        if self.tok.n:
            out.append(("tokens_mean", self.tok.get(), self.tok.n))
        if self.cm is not None and self.cm.total_weight:
            c = self.cm.total_weight
            out += [("accuracy", self.acc.get(), c), ("precision", self.prec.get(), c),
                    ("recall", self.rec.get(), c), ("f1", self.f1.get(), c)]
        if self.mae is not None and self.mae._mean.n:
            c = self.mae._mean.n
            out += [("mae", self.mae.get(), c), ("rmse", self.rmse.get(), c)]
        if self.p_at_k is not None and self.p_at_k.n:
            c = self.p_at_k.n
            out += [("precision_at_k", self.p_at_k.get(), c), ("recall_at_k", self.r_at_k.get(), c),
                    ("ndcg_at_k", self.ndcg.get(), c), ("mrr", self.mrr.get(), c)]
        if self.thumbs is not None:
            out.append(("thumbs_up_rate", self.thumbs.get(), self.thumbs.n))
        if self.click_events:
            out.append(("ctr", self.clicked / n, n))
        if self.conv_events:
            out.append(("conversion_rate", self.converted / n, n))
        if self.dwell is not None:
            out.append(("dwell_mean", self.dwell.get(), self.dwell.n))
        if self.reward is not None:
            out.append(("reward_mean", self.reward.get(), self.reward.n))
        out.append(("label_coverage", self.labelled / n, n))
        return out


class _Pending:
    """A kept inference: what a feedback needs to update its windows."""

    __slots__ = ("kind", "pred", "wins", "labelled", "clicked", "converted")

    def __init__(self, kind: int, pred: Any, wins: list) -> None:
        self.kind = kind
        self.pred = pred
        self.wins = wins
        self.labelled = False
        self.clicked = False
        self.converted = False


@dataclass
class BaselineResult:
    frame: pd.DataFrame
    counters: dict[str, int]
    events: int
    seconds: float

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float("inf")


def _ranking_metrics(ranking: list, rel: dict, k: int) -> tuple[float, float, float, float]:
    """precision@k, recall@k, NDCG@k (linear gains), MRR@k of one ranking."""
    top = ranking[:k]
    hits = 0
    dcg = 0.0
    first = 0
    for i, item in enumerate(top):
        g = rel.get(item, 0.0)
        if g > 0:
            hits += 1
            dcg += g / math.log2(i + 2)
            if not first:
                first = i + 1
    grades = sorted((g for g in rel.values() if g > 0), reverse=True)
    n_rel = len(grades)
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(grades[:k]))
    return (hits / k, hits / n_rel if n_rel else 0.0, dcg / idcg if idcg > 0 else 0.0,
            1.0 / first if first else 0.0)


def run_baseline(events: Iterable[dict], *, tumbling_ms: int = 10_000, sliding_ms: int = 60_000,
                 step_ms: int = 10_000, lateness_ms: int = 5_000, label_delay_ms: int = 60_000,
                 max_future_ms: int = 300_000, now_ms: int | None = None, k: int = 10,
                 positive_label: str = "1") -> BaselineResult:
    """Process wire records one at a time; return the final tidy window rows.

    ``seconds`` is the wall time of the whole call, consuming ``events`` included
    (pass a list to time the processing alone).
    """
    t0 = time.perf_counter()
    positive = str(positive_label)
    tumbling: dict[tuple, _Win] = {}     # (start, series) -> state
    sliding: dict[tuple, _Win] = {}
    seen: set[str] = set()
    pending_inf: dict[str, list[_Pending]] = {}
    pending_fb: dict[str, list[tuple[str, Any]]] = {}
    inf_heap: list = []                  # (expires_at, seq, request_id, entry)
    fb_heap: list = []
    seq = 0
    accepted = late = duplicate = future = late_feedback = 0
    n_events = 0
    max_ts: int | None = None
    wm = -math.inf
    fixed_now = now_ms
    heappush, heappop = heapq.heappush, heapq.heappop

    def apply(p: _Pending, kind: str, value: Any) -> None:
        if kind == "label":
            if p.labelled:
                return
            if p.kind == _CLS:
                try:
                    y = _label(value)
                except TypeError:
                    return
                p.labelled = True
                for w in p.wins:
                    if w.cm is None:
                        w.init_cls(positive)
                    w.cm.update(y, p.pred)
                    w.labelled += 1
            elif p.kind == _REG:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    return
                p.labelled = True
                y = float(value)
                for w in p.wins:
                    if w.mae is None:
                        w.init_reg()
                    w.mae.update(y, p.pred)
                    w.rmse.update(y, p.pred)
                    w.labelled += 1
        elif kind == "relevance":
            if p.labelled or p.kind != _RANK:
                return
            if isinstance(value, dict):
                rel = {str(i): float(g) for i, g in value.items()}
            else:
                rel = {str(i): 1.0 for i in value}
            pk, rk, nd, rr = _ranking_metrics(p.pred, rel, k)
            p.labelled = True
            for w in p.wins:
                if w.p_at_k is None:
                    w.init_rank()
                w.p_at_k.update(pk)
                w.r_at_k.update(rk)
                w.ndcg.update(nd)
                w.mrr.update(rr)
                w.labelled += 1
        elif kind == "thumbs":
            x = 1.0 if value else 0.0
            for w in p.wins:
                if w.thumbs is None:
                    w.thumbs = stats.Mean()
                w.thumbs.update(x)
        elif kind == "click":
            first = bool(value) and not p.clicked
            if first:
                p.clicked = True
            for w in p.wins:
                w.click_events += 1
                if first:
                    w.clicked += 1
        elif kind == "conversion":
            first = bool(value) and not p.converted
            if first:
                p.converted = True
            for w in p.wins:
                w.conv_events += 1
                if first:
                    w.converted += 1
        elif kind == "dwell":
            x = float(value)
            for w in p.wins:
                if w.dwell is None:
                    w.dwell = stats.Mean()
                w.dwell.update(x)
        elif kind == "reward":
            x = float(value)
            for w in p.wins:
                if w.reward is None:
                    w.reward = stats.Mean()
                w.reward.update(x)

    n_slide = 0
    while n_slide * step_ms < sliding_ms:
        n_slide += 1

    for ev in events:
        n_events += 1
        ts = _ts_ms(ev["ts"])
        now = fixed_now if fixed_now is not None else max_ts
        if now is not None and ts > now + max_future_ms:
            future += 1
            continue
        is_inf = ev["type"] == "inference"
        if is_inf and ts < wm:
            late += 1
            continue
        eid = ev["event_id"]
        if eid in seen:
            duplicate += 1
            continue
        seen.add(eid)
        rid = ev["request_id"]
        if is_inf:
            segs = ev.get("segments")
            series = (ev["model"], ev["model_version"], ev["variant"], ev.get("endpoint") or "",
                      tuple(sorted(segs.items())) if segs else ())
            pane = ts - ts % tumbling_ms
            key = (pane, series)
            w = tumbling.get(key)
            if w is None:
                w = tumbling[key] = _Win()
            wins = [w]
            last = ts - ts % step_ms
            for j in range(n_slide):
                s = last - j * step_ms
                if s + sliding_ms <= ts:
                    break
                key = (s, series)
                w = sliding.get(key)
                if w is None:
                    w = sliding[key] = _Win()
                wins.append(w)
            err = ev.get("status") == "error"
            lat = float(ev["latency_ms"])
            cost = ev.get("cost")
            usd = tok = None
            if cost:
                usd = cost.get("usd")
                tok = cost.get("tokens")
            for w in wins:
                w.requests += 1
                if err:
                    w.errors += 1
                w.lat.add(lat)
                if usd is not None:
                    w.usd.update(usd)
                if tok is not None:
                    w.tok.update(tok)
            pred = ev.get("prediction")
            if isinstance(pred, dict):
                if "ranking" in pred:
                    kind, pv = _RANK, [str(i) for i in pred["ranking"]]
                elif "label" in pred:
                    kind, pv = _CLS, _label(pred["label"])
                else:
                    kind, pv = 0, None
            elif isinstance(pred, float):
                kind, pv = _REG, pred
            elif pred is None:
                kind, pv = 0, None
            else:
                kind, pv = _CLS, _label(pred)
            entry = _Pending(kind, pv, wins)
            fbs = pending_fb.get(rid)
            if fbs:
                for fkind, fval in fbs:
                    apply(entry, fkind, fval)
            lst = pending_inf.get(rid)
            if lst is None:
                pending_inf[rid] = [entry]
            else:
                lst.append(entry)
            seq += 1
            heappush(inf_heap, (pane + tumbling_ms + label_delay_ms, seq, rid, entry))
        else:
            if ts < wm - label_delay_ms:
                late_feedback += 1
                continue
            fkind, fval = ev["kind"], ev["value"]
            lst = pending_inf.get(rid)
            if lst:
                for entry in lst:
                    apply(entry, fkind, fval)
            item = (fkind, fval)
            fl = pending_fb.get(rid)
            if fl is None:
                pending_fb[rid] = [item]
            else:
                fl.append(item)
            seq += 1
            heappush(fb_heap, (ts + label_delay_ms, seq, rid, item))
        accepted += 1
        if max_ts is None or ts > max_ts:
            max_ts = ts
            wm = ts - lateness_ms
            while inf_heap and inf_heap[0][0] <= wm:
                _, _, r, entry = heappop(inf_heap)
                lst = pending_inf[r]
                if len(lst) == 1:
                    del pending_inf[r]
                else:
                    lst.remove(entry)
            while fb_heap and fb_heap[0][0] <= wm:
                _, _, r, item = heappop(fb_heap)
                fl = pending_fb[r]
                if len(fl) == 1:
                    del pending_fb[r]
                else:
                    for i, x in enumerate(fl):   # by identity: equal feedback may repeat
                        if x is item:
                            del fl[i]
                            break

    # ---- tidy rows
    seg_keys = sorted({kk for d in (tumbling, sliding) for (_, s) in d for kk, _ in s[4]})
    rows = []
    for name, size, states in ((_window_name(tumbling_ms), tumbling_ms, tumbling),
                               (_window_name(sliding_ms), sliding_ms, sliding)):
        for (start, s), w in sorted(states.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            segs = dict(s[4])
            head = (name, start, start + size, s[0], s[1], s[2], s[3],
                    *(segs.get(kk) for kk in seg_keys))
            for metric, value, count in w.rows():
                rows.append((*head, metric, float(value), int(count)))
    cols = ["window", "window_start", "window_end", "model", "model_version", "variant",
            "endpoint", *seg_keys, "metric", "value", "count"]
    frame = pd.DataFrame(rows, columns=cols)
    frame["window_start"] = frame["window_start"].astype("int64")
    frame["window_end"] = frame["window_end"].astype("int64")
    counters = {"accepted": accepted, "late": late, "duplicate": duplicate, "future": future,
                "late_feedback": late_feedback}
    return BaselineResult(frame=frame, counters=counters, events=n_events,
                          seconds=time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    import argparse
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kpistream.synthetic import generate_stream

    ap = argparse.ArgumentParser(description="per-event baseline on the demo stream")
    ap.add_argument("--requests", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t = time.perf_counter()
    stream = generate_stream(args.requests, seed=args.seed)
    t_gen = time.perf_counter() - t
    t = time.perf_counter()
    records = list(stream.records())
    t_rec = time.perf_counter() - t
    res = run_baseline(records, now_ms=stream.now_ms)
    print(f"stream: {args.requests} requests, {len(stream)} events; generated in {t_gen:.2f} s "
          f"({len(stream) / t_gen:,.0f} events/s), records in {t_rec:.2f} s")
    print(f"baseline: {res.events} events in {res.seconds:.2f} s = {res.events_per_s:,.0f} events/s")
    print(f"counters: {res.counters}; stream counts: {stream.counts}")
    print(f"rows: {len(res.frame)}")


if __name__ == "__main__":
    main()
