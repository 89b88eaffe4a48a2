"""The publisher: merges the shards' partial states, stores them, exposes them.

A plain class (no Ray import): :mod:`actors.remote` makes it a Ray actor and
gives it a ``pull`` function that collects from every shard in one round
trip; tests give it plain shards.  Each :meth:`Publisher.tick`:

1. pulls ``(partials, watermark, stats)`` from every shard;
2. merges them per window (:class:`kpistream.windows.aggregate.WindowAggregator`,
   one source per shard, the watermark is the slowest shard's);
3. writes the panes to the time-series store (provisional ones too, so the
   query API shows the running value of open windows), rolls them up into
   coarser resolutions and applies retention;
4. refreshes the snapshot that ``/metrics`` serves: the latest window of
   every KPI and series, and the pipeline's own counters;
5. feeds the watcher (:class:`kpistream.alerts.watcher.Watcher`): alert rules see the
   rows of every window touched (provisional and final), drift detectors the
   final ones, input-drift tests each closed window's sampled features; the
   transitions go to the notifier (log, webhooks, the pollable log that
   later actions subscribe to).
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from kpistream.windows.aggregate import WindowAggregator
from kpistream.alerts.rules import PROM_METRICS
from kpistream.wire.batch import BASE_LABELS
from kpistream.clock import Clock, SystemClock
from kpistream.spec.metrics import EngineConfig, config_from_dict
from kpistream.engine import Partial
from kpistream.store.series import SeriesStore
from kpistream.alerts.watcher import AlertsConfig, Watcher, load_alerts

from actors.notify import Notifier
from actors.ticker import Ticker

Pull = Callable[[], Sequence[tuple[list[Partial], int, dict]]]

_HELP = {
    "requests": "Requests in the window", "error_rate": "Share of requests that failed",
    "latency_mean": "Mean request latency",
    "latency_p50": "Median latency (relative error <= 1%)",
    "latency_p90": "90th percentile latency (relative error <= 1%)",
    "latency_p99": "99th percentile latency (relative error <= 1%)",
    "latency_p999": "99.9th percentile latency (relative error <= 1%)",
    "accuracy": "Accuracy of labelled requests", "precision": "Precision of the positive label",
    "recall": "Recall of the positive label", "f1": "F1 of the positive label",
    "mae": "Mean absolute error (units of the target)",
    "rmse": "Root mean squared error (units of the target)",
    "precision_at_k": "Precision at K", "recall_at_k": "Recall at K", "ndcg_at_k": "NDCG at K",
    "mrr": "Mean reciprocal rank at K", "thumbs_up_rate": "Share of thumbs-up feedback",
    "ctr": "Clicked requests per request", "conversion_rate": "Converted requests per request",
    "dwell_mean": "Mean dwell time", "reward_mean": "Mean reward",
    "cost_per_1k": "Cost per 1000 requests", "tokens_mean": "Mean tokens per request",
    "label_coverage": "Share of requests with a label",
}
#: KPI name -> (Prometheus metric name, help, scale to base units); the names and
#: scales are the engine's one table (kpistream.alerts.rules.PROM_METRICS), which the
#: exported alerting rules use too.
PROM_KPIS: dict[str, tuple[str, str, float]] = {
    k: (name, _HELP.get(k) or f"{k.replace('_', ' ')} (averaged over classes)", scale)
    for k, (name, scale) in PROM_METRICS.items()}


class Publisher:
    def __init__(self, config: EngineConfig | Mapping[str, Any] | None, store_path: str | Path,
                 pull: Pull | None = None, clock: Clock | None = None,
                 retention_every_s: float = 60.0, snapshot_ttl_s: float = 900.0,
                 n_sources: int | None = None,
                 alerts: AlertsConfig | str | Path | Mapping[str, Any] | None = None) -> None:
        if isinstance(config, Mapping):
            config = config_from_dict(config)
        self.cfg = config or EngineConfig()
        self.clock = clock or SystemClock()
        self.pull = pull
        # nothing is final until every shard has reported its watermark
        self.agg = WindowAggregator(self.cfg, sources=n_sources)
        self.store = SeriesStore(store_path, self.cfg)
        self.snapshot: dict[tuple, tuple[float, int, Any, bool, int, int]] = {}
        self.snapshot_ttl_ms = int(snapshot_ttl_s * 1000)
        self.shard_stats: dict[int, dict] = {}
        self.ticks = 0
        self.tick_s = 0.0
        self.last_tick_ms = 0
        self._retention_every_ms = int(retention_every_s * 1000)
        self._last_retention = 0
        self._last_running = 0
        self._running_every_ms = 2000
        self._lock = threading.Lock()
        self._ticker = Ticker(self.tick, "kpistream-publisher", on_error=self._tick_failed)
        self.errors: Counter = Counter()
        self.watcher = Watcher(load_alerts(alerts), self.clock, self.cfg)
        self.notifier = Notifier(self.watcher.config.webhooks, self.watcher.config.log)
        self.watcher.subscribe(self.notifier)
        self.watch_s = 0.0
        self._paired_cache: dict[tuple, tuple] = {}

    # ------------------------------------------------------------------ loop
    def tick(self, results: Sequence[tuple[list[Partial], int, dict]] | None = None) -> int:
        """One round: pull (or take ``results``), merge, store, refresh. Returns partials seen."""
        t0 = time.perf_counter()
        if results is None:
            results = self.pull() if self.pull is not None else []
        n = 0
        with self._lock:
            for i, (parts, wm, stats) in enumerate(results):
                src = stats.get("shard", i)
                self.agg.add(parts, source=src, watermark=wm)
                self.shard_stats[src] = stats
                n += len(parts)
            wm = self.agg.watermark
            # the store keeps one state per pane: the latest state of every shard
            # for each pane touched now, merged (a shard that saw nothing new in
            # a pane still contributes what it sent before)
            touched = {(p.key, p.series, p.family): p for parts, _, _ in results for p in parts
                       if p.space == "time"}
            self.store.write(self._merged(touched, wm), watermark=wm)
            now = self.clock.now_ms()
            # final roll-ups every round; the running minute / hour less often
            running = now - self._last_running >= self._running_every_ms
            self.store.rollup(wm, provisional=running)
            if running:
                self._last_running = now
            if now - self._last_retention >= self._retention_every_ms:
                self.store.apply_retention(now)
                self._last_retention = now
            features = self._final_features()
            final_rows = self.agg.pop_final_rows()  # forgets panes no window needs any more
            current = self.agg.current_rows({k[0] for k in touched})
            self._refresh_snapshot(final_rows, current, now)
            self._watch(final_rows, current, features)
            self.ticks += 1
            self.last_tick_ms = now
        self.tick_s += time.perf_counter() - t0
        return n

    def _merged(self, touched: Mapping[tuple, Partial], wm: int) -> list[Partial]:
        out = []
        for key, p in touched.items():
            states = list(self.agg.panes.get(key, {}).values()) or [p.state]
            st = states[0].copy()
            for other in states[1:]:
                st.merge(other)
            final = wm >= p.end_ms + self.agg._horizon(p.family)
            out.append(Partial("time", p.key, p.series, p.family, st, final, p.start_ms, p.end_ms))
        return out

    def start(self, interval_s: float = 0.25) -> bool:
        """Tick in a background thread every ``interval_s`` (idempotent)."""
        return self._ticker.start(interval_s)

    def stop(self) -> None:
        self._ticker.stop()

    def _tick_failed(self, e: Exception) -> None:
        """Keep publishing; the error is counted and visible (/v1/health)."""
        self.errors[type(e).__name__] += 1
        self.last_error = repr(e)

    # --------------------------------------------------------------- queries
    def _final_features(self) -> list[tuple]:
        """The sampled inputs of the windows input-drift tests watch, as they become final."""
        wins = self.watcher.feature_windows
        if not wins or "features" not in self.cfg.families:
            return []
        try:
            sizes = {w.name: w.size for w in self.cfg.windows if w.is_time}
            return [(w, start, start + sizes[w], series, st.sample())
                    for (w, start, series), st in self.agg.final_states("features", wins).items()]
        except Exception as e:  # counted, never stops the tick
            self.errors[f"features:{type(e).__name__}"] += 1
            self.last_error = repr(e)
            return []

    def _watch(self, final_rows: list[dict], current: list[dict],
               features: Sequence[tuple] = ()) -> None:
        """Alert rules, detectors and input drift on this tick's rows; never stops the tick."""
        from kpistream.wire.batch import series_labels

        t0 = time.perf_counter()
        try:
            for w, start, end, series, sample in features:
                self.watcher.observe_features(w, start, end, series_labels(series), sample, True)
            self.watcher.observe([*final_rows, *current])
            self.watcher.evaluate()
        except Exception as e:  # a bad rule or detector must not stop publishing
            self.errors[f"watch:{type(e).__name__}"] += 1
            self.last_error = repr(e)
        self.watch_s += time.perf_counter() - t0

    def alerts(self) -> dict:
        """Pending and firing alerts with evidence, detector and input-drift states (GET /v1/alerts)."""
        with self._lock:
            st = self.watcher.status()
            st["notifications"] = self.notifier.stats()
            st["rules"] = [r.name for r in self.watcher.config.rules]
            return st

    def paired_summary(self, model: str, challenger: str, version: str | None = None,
                       since_ms: int = 0, primary: str = "primary",
                       primary_version: str | None = None) -> dict:
        """The comparison of ``challenger`` (at ``version``) with ``primary`` since ``since_ms``.

        Merges the stored ``paired`` pane states of the model's primary series
        (at ``primary_version`` if given) and of the challenger's series
        (every segment and endpoint) with a pane start at or after ``since_ms``
        (a run's first partial pane is left out) -- the *paired summary* that
        :meth:`kpistream.decide.policy.CanaryPolicy.decide` reads, plus
        ``"window": {"start", "end", "panes", "final_until"}``.  Panes
        final for the paired family (watermark past their end plus the label
        delay) are merged once and cached; only open panes are re-read.
        """
        from kpistream.wire.batch import series_labels
        from kpistream.engine.paired import PairedState

        key = (model, challenger, version, primary, primary_version, int(since_ms))
        with self._lock:
            wm = self.agg.watermark
        horizon = self.agg._horizon("paired") if "paired" in self.cfg.families else 0
        acc, until, panes = self._paired_cache.get(key, (PairedState(), int(since_ms), 0))
        states = self.store.states(start=until, family="paired", model=model)
        by_start: dict[int, PairedState] = {}
        for st in states:
            lab = series_labels(st.series)
            v = lab.get("variant")
            ver = lab.get("model_version")
            if (v == primary and (primary_version is None or ver == primary_version)) or (
                    v == challenger and (version is None or ver == version)):
                cur = by_start.get(st.start)
                if cur is None:
                    by_start[st.start] = st.state
                else:
                    cur.merge(st.state)
        acc = acc.copy()
        open_acc = PairedState()
        new_until, frozen = until, True
        for start in sorted(by_start):
            final = wm >= start + self.cfg.pane_ms + horizon
            frozen = frozen and final
            if frozen:
                acc.merge(by_start[start])
                new_until = start + self.cfg.pane_ms
                panes += 1
            else:
                open_acc.merge(by_start[start])
        while len(self._paired_cache) > 64:
            try:
                self._paired_cache.pop(next(iter(self._paired_cache)), None)
            except (StopIteration, RuntimeError):   # emptied or changed by another call
                break
        self._paired_cache[key] = (acc, new_until, panes)
        total = acc.copy()
        total.merge(open_acc)
        out = total.summary()
        out["window"] = {"start": int(since_ms), "final_until": new_until,
                         "panes": panes + sum(1 for s in by_start if s >= new_until),
                         "watermark": wm}
        return out

    def notifications(self, since: int = 0, limit: int = 1000) -> list[dict]:
        """Alert transitions after sequence number ``since`` (the hook later actions poll)."""
        return self.notifier.since(since, limit)

    def transitions(self, since: int = 0, epoch: str | None = None) -> dict:
        """``{"epoch", "last_seq", "items"}``: the hook later actions poll (a new epoch
        means a new log, after a publisher restart)."""
        return self.notifier.log(since, epoch)

    def _refresh_snapshot(self, final_rows: list[dict], current: list[dict], now: int) -> None:
        """The latest window of every (window spec, series, KPI), kept after its panes go.

        A series that has not reported for ``snapshot_ttl_ms`` (processing
        time) leaves ``/metrics``, so label sets stay bounded.
        """
        latest = self.snapshot
        names = self._label_names()
        for r in (*final_rows, *current):
            key = (r["window"], tuple((k, r[k]) for k in names), r["metric"])
            cur = latest.get(key)
            if cur is None or r["window_start"] >= cur[4]:
                latest[key] = (r["value"], r["count"], r["labelled"], r["provisional"],
                               r["window_start"], now)
        for key in [k for k, v in latest.items() if now - v[5] > self.snapshot_ttl_ms]:
            del latest[key]

    def _label_names(self) -> tuple[str, ...]:
        return (*BASE_LABELS, *self.cfg.segments)

    def series(self, metric=None, start=None, end=None, resolution=None,
               **labels) -> list[dict]:
        """Tidy rows from the store as JSON-able dicts (the ``/v1/series`` body)."""
        df = self.store.query(metric, start=start, end=end, resolution=resolution, **labels)
        out = []
        for rec in df.to_dict(orient="records"):
            rec["window_start"] = rec["window_start"].isoformat()
            rec["window_end"] = rec["window_end"].isoformat()
            lab = rec.get("labelled")
            rec["labelled"] = None if lab is None or (isinstance(lab, float) and math.isnan(lab)) \
                or str(lab) == "<NA>" else int(lab)
            out.append(rec)
        return out

    def counters(self) -> dict:
        """Pipeline counters summed over shards."""
        total: Counter = Counter()
        rejected: Counter = Counter()
        for st in self.shard_stats.values():
            total.update(st.get("counters", {}))
            rejected.update(st.get("rejected", {}))
        emitters: dict[tuple[str, str], Counter] = {}
        for st in self.shard_stats.values():
            for e in st.get("emitters", {}).values():
                key = (str(e.get("model", "")), str(e.get("variant", "")))
                emitters.setdefault(key, Counter()).update(
                    {k: e.get(k, 0) for k in ("dropped", "flushed_rows", "send_errors",
                                              "lost_rows", "buffered")})
        return {"counters": dict(total), "rejected": dict(rejected),
                "emitters": {k: dict(v) for k, v in emitters.items()}}

    def health(self) -> dict:
        return {"status": "ok" if not self.errors else "degraded", "ticks": self.ticks,
                "watermark": self.agg.watermark, "shards": len(self.shard_stats),
                "last_tick_ms": self.last_tick_ms, "errors": dict(self.errors),
                "store": str(self.store.file)}

    def metrics_text(self) -> str:
        """Prometheus text exposition of the snapshot and the pipeline counters."""
        from prometheus_client import CollectorRegistry, generate_latest

        reg = CollectorRegistry()
        reg.register(_Collector(self))
        return generate_latest(reg).decode()


class _Collector:
    """prometheus_client custom collector over a publisher's snapshot."""

    def __init__(self, pub: Publisher) -> None:
        self.pub = pub

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        pub = self.pub
        names = ["window", *pub._label_names()]
        fams: dict[str, GaugeMetricFamily] = {}
        for (window, labels, metric), (value, count, labelled, prov, start, _) in sorted(
                pub.snapshot.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1])):
            lv = [window, *(v for _, v in labels)]
            spec = PROM_KPIS.get(metric)
            if spec is None:
                continue
            name, help_, scale = spec
            fam = fams.get(name)
            if fam is None:
                fam = fams[name] = GaugeMetricFamily(name, help_, labels=names)
            fam.add_metric(lv, value * scale)
        yield from fams.values()
        c = pub.counters()
        cnt = c["counters"]
        ev = CounterMetricFamily("kpistream_events", "Events by type and outcome",
                                 labels=["type", "outcome"])
        for typ in ("inference", "feedback"):
            ev.add_metric([typ, "received"], cnt.get(f"{typ}_in", 0))
            ev.add_metric([typ, "accepted"], cnt.get(f"{typ}_accepted", 0))
            ev.add_metric([typ, "late"], cnt.get(f"late_{typ}", 0))
            ev.add_metric([typ, "duplicate"], cnt.get(f"duplicate_{typ}", 0))
        yield ev
        rej = CounterMetricFamily("kpistream_rejected", "Rejected rows by field and reason",
                                  labels=["field", "reason"])
        for key, n in sorted(c["rejected"].items()):
            field, _, reason = key.rpartition(":")
            rej.add_metric([field[:64] or "row", reason], n)
        yield rej
        for name, key, help_ in (
                ("kpistream_join_evictions", "pending_evicted", "Inferences evicted from the join table for capacity"),
                ("kpistream_feedback_evictions", "feedback_evicted", "Feedback evicted from the join table for capacity"),
                ("kpistream_series_overflow", "series_overflow", "Events folded into the __other__ series"),
                ("kpistream_feedback_unmatched", "feedback_unmatched", "Feedback that never met its inference"),
                ("kpistream_inference_unlabelled", "inference_expired_unlabelled", "Inferences whose label deadline passed without a label"),
                ("kpistream_join_pairs", "join_pairs", "Inference-feedback pairs joined"),
                ("kpistream_feedback_type_mismatch", "feedback_type_mismatch", "Feedback of the wrong kind for its model")):
            m = CounterMetricFamily(name, help_)
            m.add_metric([], cnt.get(key, 0))
            yield m
        em = c["emitters"]
        for name, key, help_ in (
                ("kpistream_emitter_dropped", "dropped", "Events dropped by monitored replicas (buffer full)"),
                ("kpistream_emitter_events", "flushed_rows", "Events flushed by monitored replicas"),
                ("kpistream_emitter_send_errors", "send_errors", "Failed sends from monitored replicas"),
                ("kpistream_emitter_lost", "lost_rows", "Events lost in failed sends")):
            m = CounterMetricFamily(name, help_, labels=["model", "variant"])
            for (model, variant), v in sorted(em.items()):
                m.add_metric([model, variant], v.get(key, 0))
            yield m
        b = GaugeMetricFamily("kpistream_emitter_buffered", "Events waiting in replica buffers",
                              labels=["model", "variant"])
        for (model, variant), v in sorted(em.items()):
            b.add_metric([model, variant], v.get("buffered", 0))
        yield b
        wm = GaugeMetricFamily("kpistream_watermark_seconds", "Event-time watermark per shard",
                               labels=["shard"])
        pend = GaugeMetricFamily("kpistream_join_pending", "Inferences waiting for feedback",
                                 labels=["shard"])
        for sid, st in sorted(pub.shard_stats.items()):
            if st.get("watermark", -(2**62)) > 0:
                wm.add_metric([str(sid)], st["watermark"] / 1000.0)
            pend.add_metric([str(sid)], st.get("pending", 0))
        yield wm
        yield pend
        arch = {k: CounterMetricFamily(f"kpistream_archive_{k}", help_, labels=["shard"])
                for k, help_ in (("rows", "Raw events written to the Parquet archive"),
                                 ("files", "Parquet files written to the archive"),
                                 ("errors", "Failed archive writes"),
                                 ("dropped", "Events the archive dropped (buffer full)"))}
        for sid, st in sorted(pub.shard_stats.items()):
            a = st.get("archive")
            if a:
                for k, fam in arch.items():
                    fam.add_metric([str(sid)], a.get(k, 0))
        yield from arch.values()
        t = GaugeMetricFamily("kpistream_publisher_ticks", "Publisher rounds so far")
        t.add_metric([], pub.ticks)
        yield t
        yield from self._alerts()

    def _alerts(self):
        """Alert states, transitions, webhook deliveries and drift detectors."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        pub = self.pub
        with pub._lock:
            w = pub.watcher
            active = w.alerts.active()
            now = pub.clock.now_ms()
            dets = [*w.detectors.status(now), *w.inputs.status(now)]
            detections = dict(w.detections)
            nstats = pub.notifier.stats()
            rules = {r.name: r for r in w.config.rules}
        names = list(pub._label_names())
        fams = {st: GaugeMetricFamily(
            f"kpistream_alerts_{st}", f"Alert instances {st} (1 per instance)",
            labels=["alertname", "severity", *names]) for st in ("firing", "pending")}
        for a in active:
            fams[a["state"]].add_metric([a["rule"], a["severity"],
                                         *(a["series"].get(k, "") for k in names)], 1)
        yield from fams.values()
        per_rule = GaugeMetricFamily("kpistream_alert_rule_firing",
                                     "Firing instances per alert rule", labels=["alertname"])
        for name in rules:
            per_rule.add_metric([name], sum(1 for a in active
                                            if a["rule"] == name and a["state"] == "firing"))
        yield per_rule
        tr = CounterMetricFamily("kpistream_alert_transitions", "Alert state transitions",
                                 labels=["alertname", "state"])
        for key, n in sorted(nstats["notifications"].items()):
            rule, _, state = key.partition("|")
            tr.add_metric([rule, state], n)
        yield tr
        wh = CounterMetricFamily("kpistream_webhook_notifications",
                                 "Webhook notifications by outcome", labels=["receiver", "outcome"])
        for i, h in enumerate(nstats["webhooks"]):
            for outcome in ("delivered", "failed", "rejected", "dropped", "retries"):
                wh.add_metric([str(i), outcome], h.get(outcome, 0))
        yield wh
        dt = CounterMetricFamily("kpistream_drift_detections",
                                 "Change / input-drift signals per detector", labels=["detector"])
        for name, n in sorted(detections.items()):
            dt.add_metric([name], n)
        yield dt
        da = GaugeMetricFamily("kpistream_drift_active",
                               "1 while a detector's verdict is drift, per series or group",
                               labels=["detector", *names])
        for d in dets:
            labels = d.get("series") or d.get("group") or {}
            da.add_metric([d["detector"], *(labels.get(k, "") for k in names)],
                          1.0 if d["drift"] else 0.0)
        yield da
