"""The publish step, Ray-free: merge the shards' partials -> store -> snapshot -> watch.

The publisher actor (:mod:`actors.publisher`) runs one :meth:`PublishStep.run`
per tick under its lock; replay or a test can drive it directly with
``(partials, watermark, stats)`` tuples.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from typing import Any, Protocol, Sequence

import numpy as np

from kpistream.clock import Clock, SystemClock
from kpistream.engine import Partial
from kpistream.spec.metrics import EngineConfig
from kpistream.wire.batch import BASE_LABELS, series_labels
from kpistream.windows.aggregate import WindowAggregator
from kpistream.windows.paired_summary import PairedSummaries

#: What a shard's ``collect`` returns: partials since the last call, its watermark, stats.
Result = tuple[Sequence[Partial], int, dict]


class WatcherLike(Protocol):
    """What the step feeds (:class:`kpistream.alerts.watcher.Watcher`)."""

    feature_windows: Any

    def observe_features(self, window, start, end, labels, sample, final) -> Any: ...
    def observe(self, rows) -> Any: ...
    def evaluate(self) -> Any: ...


class PublishStep:
    """One round of publishing, and the state it keeps between rounds.

    Each :meth:`run`:

    1. merges the partials per window (:class:`WindowAggregator`, one source
       per shard, the watermark is the slowest shard's);
    2. writes the touched panes to the store (provisional ones too, so the
       query API shows the running value of open windows), rolls them up into
       coarser resolutions and applies retention (if there is a store);
    3. refreshes :attr:`snapshot`, what ``/metrics`` serves: the latest *closed*
       window of every KPI and series (its end is behind the watermark, so no
       inference can still join it: the same value ``kpistream replay`` gives for
       that window, provisional while its labels may still arrive); a window in
       progress is never shown, so a sliding ``1m`` gauge covers a whole minute
       and the ``10s`` gauge does not saw-tooth on the pane in progress;
    4. feeds the watcher (if any): alert rules see the same closed windows
       (provisional and final) as the gauges, drift detectors the final ones,
       input-drift tests each final window's sampled features.

    Without a store or a watcher those steps are skipped (replay: feed the
    engine's partials, keep :attr:`final_rows` after each round).

    ``snapshot``: ``{(window, ((label, value), ...), metric): (value, count,
    labelled, provisional, window start, processing time seen)}``.  Not
    thread-safe: the caller serialises calls.
    """

    def __init__(self, config: EngineConfig, store: Any = None, watcher: WatcherLike | None = None,
                 clock: Clock | None = None, sources: int | None = None,
                 snapshot_ttl_ms: int = 900_000, retention_every_ms: int = 60_000,
                 running_every_ms: int = 2_000, resume_watermark: int | None = None) -> None:
        self.cfg = config
        self.clock = clock or SystemClock()
        # nothing is final until every source has reported its watermark
        self.agg = WindowAggregator(config, sources=sources)
        if resume_watermark is None and store is not None:
            resume_watermark = store.watermark
        if resume_watermark is not None:
            # a restart: what is final at it was emitted (stored, and watched) already;
            # windows final after it are emitted again (the store keeps a final state as it is)
            self.agg.resume(resume_watermark)
            if store is not None:
                # the panes a sliding window across the restart still needs, from the store
                self.agg.preload(lambda lo, hi: store.states(start=lo, end=hi))
        self.store = store
        self.watcher = watcher
        self.paired = PairedSummaries(store, config.pane_ms) if store is not None else None
        self.snapshot: dict[tuple, tuple[float, int, Any, bool, int, int]] = {}
        self.snapshot_ttl_ms = snapshot_ttl_ms
        self.shard_stats: dict[Any, dict] = {}
        self.errors: Counter = Counter()
        self.last_error: str | None = None
        self.ticks = 0
        self.last_tick_ms = 0
        self.watch_s = 0.0
        #: the rows of the windows that became final in the last round (replay keeps these)
        self.final_rows: list[dict] = []
        self._retention_every_ms = retention_every_ms
        self._running_every_ms = running_every_ms
        self._last_retention = 0
        self._last_running = 0
        # the watermark of the last round (a restart: the one the watcher last saw)
        self._closed_wm = np.iinfo(np.int64).min if resume_watermark is None \
            else int(resume_watermark)

    # ------------------------------------------------------------------ round
    def run(self, results: Sequence[Result]) -> int:
        """One round over ``results`` (one per source). Returns the partials seen."""
        n = 0
        taken = []
        for i, (parts, wm, stats) in enumerate(results):
            src = stats.get("shard", i)
            taken.append(self.agg.add(parts, source=src, watermark=wm))
            self.shard_stats[src] = stats
            n += len(parts)
        wm = self.agg.watermark
        # the store keeps one state per pane: the latest state of every source
        # for each pane touched now, merged (never a pane already final)
        touched = {(p.key, p.series, p.family): p for parts in taken for p in parts
                   if p.space == "time"}
        if self.store is not None:
            self.store.write(self._merged(touched.values()), watermark=wm)
        now = self.clock.now_ms()
        if self.store is not None:
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
        closed = self.agg.closed_rows({k[0] for k in touched}, self._closed_wm)
        self._closed_wm = wm
        self._refresh_snapshot(final_rows, closed, now)
        self._watch(final_rows, closed, features)
        self.final_rows = final_rows
        self.ticks += 1
        self.last_tick_ms = now
        return n

    def _merged(self, touched) -> list[Partial]:
        """Each touched pane as one partial: every source's latest state, merged."""
        return [Partial("time", p.key, p.series, p.family,
                        self.agg.merged_pane(p.key, p.series, p.family, default=p.state),
                        self.agg.is_final(p.family, p.end_ms), p.start_ms, p.end_ms)
                for p in touched]

    def _error(self, prefix: str, e: Exception) -> None:
        self.errors[f"{prefix}:{type(e).__name__}"] += 1
        self.last_error = repr(e)

    def _final_features(self) -> list[tuple]:
        """The sampled inputs of the windows input-drift tests watch, as they become final."""
        wins = getattr(self.watcher, "feature_windows", None)
        if not wins or "features" not in self.cfg.families:
            return []
        try:
            sizes = {w.name: w.size for w in self.cfg.windows if w.is_time}
            return [(w, start, start + sizes[w], series, st.sample())
                    for (w, start, series), st in self.agg.final_states("features", wins).items()]
        except Exception as e:  # counted, never stops the round
            self._error("features", e)
            return []

    def _watch(self, final_rows: list[dict], closed: list[dict],
               features: Sequence[tuple] = ()) -> None:
        """Alert rules, detectors and input drift on this round's rows; never stops the round."""
        if self.watcher is None:
            return
        t0 = time.perf_counter()
        try:
            for w, start, end, series, sample in features:
                self.watcher.observe_features(w, start, end, series_labels(series), sample, True)
            self.watcher.observe([*final_rows, *closed])
            self.watcher.evaluate()
        except Exception as e:  # a bad rule or detector must not stop publishing
            self._error("watch", e)
        self.watch_s += time.perf_counter() - t0

    def _refresh_snapshot(self, final_rows: list[dict], closed: list[dict], now: int) -> None:
        """The latest closed window of every (window spec, series, KPI), kept after its
        panes go.

        A series that has not reported for ``snapshot_ttl_ms`` (processing
        time) leaves the snapshot, so label sets stay bounded.
        """
        latest = self.snapshot
        names = self.label_names()
        for r in (*final_rows, *closed):
            key = (r["window"], tuple((k, r[k]) for k in names), r["metric"])
            cur = latest.get(key)
            if cur is None or r["window_start"] >= cur[4]:
                latest[key] = (r["value"], r["count"], r["labelled"], r["provisional"],
                               r["window_start"], now)
        for key in [k for k, v in latest.items() if now - v[5] > self.snapshot_ttl_ms]:
            del latest[key]

    # ---------------------------------------------------------------- queries
    def label_names(self) -> tuple[str, ...]:
        return (*BASE_LABELS, *self.cfg.segments)

    def paired_summary(self, model: str, challenger: str, version: str | None = None,
                       since_ms: int = 0, primary: str = "primary",
                       primary_version: str | None = None,
                       watermark: int | None = None) -> dict:
        """:meth:`PairedSummaries.summary` at ``watermark`` (default: the current one)."""
        if self.paired is None:
            raise RuntimeError("paired summaries need a store")
        wm = self.agg.watermark if watermark is None else watermark
        horizon = self.agg.horizon("paired") if "paired" in self.cfg.families else 0
        return self.paired.summary(wm, horizon, model, challenger, version, since_ms, primary,
                                   primary_version)

    def series(self, metric=None, start=None, end=None, resolution=None, limit=None, offset=0,
               **labels) -> list[dict]:
        """Tidy rows from the store as JSON-able dicts (the ``/v1/series`` body); ``limit``
        rows from ``offset`` (in the store's order: window start, labels, metric)."""
        df = self.store.query(metric, start=start, end=end, resolution=resolution, **labels)
        if offset or limit is not None:
            df = df.iloc[offset:None if limit is None else offset + limit]
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
        """Pipeline counters summed over sources, rejections (the engines', the HTTP
        replicas' and the monitored replicas'), and emitter reports by (model, variant)."""
        total: Counter = Counter()
        rejected: Counter = Counter()
        for st in self.shard_stats.values():
            total.update(st.get("counters", {}))
            rejected.update(st.get("rejected", {}))
        emitters: dict[tuple[str, str], Counter] = {}
        for st in self.shard_stats.values():
            for e in st.get("emitters", {}).values():
                # events a monitored replica's normaliser refused never reached a shard
                for reason, n in (e.get("invalid_by_reason") or {}).items():
                    rejected[reason] += n
                    total["inference_in"] += n
                key = (str(e.get("model", "")), str(e.get("variant", "")))
                emitters.setdefault(key, Counter()).update(
                    {k: e.get(k, 0) for k in ("dropped", "flushed_rows", "send_errors",
                                              "lost_rows", "buffered")})
        total["final_refused"] = self.agg.refused_final
        return {"counters": dict(total), "rejected": dict(rejected),
                "emitters": {k: dict(v) for k, v in emitters.items()}}

