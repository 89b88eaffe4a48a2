"""The publisher (:class:`Publisher`): a thin actor around the Ray-free publish step."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from kpistream.alerts.watcher import AlertsConfig, Watcher, load_alerts
from kpistream.clock import Clock, SystemClock
from kpistream.engine import Partial
from kpistream.spec.metrics import EngineConfig, config_from_dict
from kpistream.store.series import SeriesStore
from kpistream.windows.catalogue import PROM_KPIS  # noqa: F401  (what /metrics exports, by KPI)
from kpistream.windows.exposition import (Family, alert_families, kpi_families,
                                          pipeline_families)
from kpistream.windows.publish import PublishStep

from actors.notify import Notifier
from actors.ticker import Ticker

Pull = Callable[[], Sequence[tuple[list[Partial], int, dict]]]


class Publisher:
    """The publisher actor.

    A plain class (no Ray import): :mod:`actors.remote` makes it a Ray actor and
    gives it a ``pull`` function that collects from every shard in one round
    trip; tests give it plain shards.  Each :meth:`Publisher.tick` pulls
    ``(partials, watermark, stats)`` from every shard and runs one
    :meth:`kpistream.windows.publish.PublishStep.run` under the lock (merge ->
    store -> snapshot -> watch); the watcher's transitions go to the notifier
    (log, webhooks, the pollable log that later actions subscribe to).  The
    actor adds the ticker, the lock, the queries Ray callers make and the
    Prometheus rendering of ``/metrics`` (families from
    :mod:`kpistream.windows.exposition`).
    """

    #: the store's checkpoint of the watcher and the notifier
    CHECKPOINT = "publisher"

    def __init__(self, config: EngineConfig | Mapping[str, Any] | None, store_path: str | Path,
                 pull: Pull | None = None, clock: Clock | None = None,
                 retention_every_s: float = 60.0, snapshot_ttl_s: float = 900.0,
                 n_sources: int | None = None,
                 alerts: AlertsConfig | str | Path | Mapping[str, Any] | None = None,
                 checkpoint_every_s: float = 5.0) -> None:
        if isinstance(config, Mapping):
            config = config_from_dict(config)
        self.cfg = config or EngineConfig()
        self.clock = clock or SystemClock()
        self.pull = pull
        self._watch(load_alerts(alerts))
        store = SeriesStore(store_path, self.cfg)
        self.restored = self._restore(store)
        # nothing is final until every shard has reported its watermark; a restart goes
        # on from the checkpoint: the windows final after it are emitted (and watched) again
        self.step = PublishStep(self.cfg, store, self.watcher, self.clock, sources=n_sources,
                                snapshot_ttl_ms=int(snapshot_ttl_s * 1000),
                                retention_every_ms=int(retention_every_s * 1000),
                                resume_watermark=self._checkpoint_wm)
        self.checkpoint_every_ms = int(checkpoint_every_s * 1000)
        self.checkpoint_bytes = 0
        self._checkpoint_ms = self.clock.now_ms()
        self._checkpoint_seq = self.notifier.seq
        self.tick_s = 0.0
        self._lock = threading.Lock()
        self._ticker = Ticker(self.tick, "kpistream-publisher", on_error=self._tick_failed)

    # the step's state, under the names callers used before
    agg = property(lambda self: self.step.agg)
    store = property(lambda self: self.step.store)
    snapshot = property(lambda self: self.step.snapshot)

    @property
    def acked_watermark(self) -> int:
        """What the shards may forget (final partials, log records): the windows final at
        it are stored and their rows were seen by a saved checkpoint of the watcher."""
        return int(min(self.step.agg.emitted_watermark, self._checkpoint_wm))
    shard_stats = property(lambda self: self.step.shard_stats)
    errors = property(lambda self: self.step.errors)
    ticks = property(lambda self: self.step.ticks)
    last_tick_ms = property(lambda self: self.step.last_tick_ms)
    watch_s = property(lambda self: self.step.watch_s)
    last_error = property(lambda self: self.step.last_error)

    # ------------------------------------------------------------------ loop
    def tick(self, results: Sequence[tuple[list[Partial], int, dict]] | None = None) -> int:
        """One round: pull (or take ``results``), merge, store, refresh. Returns partials seen."""
        t0 = time.perf_counter()
        if results is None:
            results = self.pull() if self.pull is not None else []
        with self._lock:
            n = self.step.run(results)
            now = self.clock.now_ms()
            # a transition is saved at once, so a restart neither repeats nor forgets it
            if self.notifier.seq != self._checkpoint_seq \
                    or now - self._checkpoint_ms >= self.checkpoint_every_ms:
                self._checkpoint(now)
        self.tick_s += time.perf_counter() - t0
        return n

    # ------------------------------------------------------------ checkpoint
    def _watch(self, alerts: AlertsConfig) -> None:
        """A fresh watcher and notifier (the watcher's transitions go to the notifier)."""
        self.watcher = Watcher(alerts, self.clock, self.cfg)
        self.notifier = Notifier(alerts.webhooks, alerts.log)
        self.watcher.subscribe(self.notifier)

    def _checkpoint(self, now: int) -> None:
        """Save the watcher and the notifier in the store, with the watermark they cover."""
        wm = int(self.step.agg.emitted_watermark)
        data = {"watcher": self.watcher.to_dict(), "notifier": self.notifier.to_dict()}
        self.checkpoint_bytes = self.step.store.save_checkpoint(self.CHECKPOINT, data, wm, now)
        self._checkpoint_wm = wm
        self._checkpoint_ms = now
        self._checkpoint_seq = int(data["notifier"]["seq"])

    def _restore(self, store: SeriesStore) -> dict[str, Any]:
        """Load the checkpoint (a restart): the watcher and the notifier go on from it."""
        self._checkpoint_wm = store.watermark if store.watermark is not None \
            else int(np.iinfo(np.int64).min)
        got = store.load_checkpoint(self.CHECKPOINT)
        if got is None:
            return {}
        data, wm = got
        try:
            restored = self.watcher.restore(data["watcher"])
            restored["notifications_resent"] = self.notifier.restore(data["notifier"])
        except (KeyError, TypeError, ValueError) as e:
            # not restorable (another version): start afresh, from the store's watermark
            self.notifier.close()
            self._watch(self.watcher.config)
            return {"error": f"checkpoint not restored: {type(e).__name__}: {e}"}
        self._checkpoint_wm = wm
        restored["watermark"] = wm
        return restored

    def start(self, interval_s: float = 0.25) -> bool:
        """Tick in a background thread every ``interval_s`` (idempotent)."""
        return self._ticker.start(interval_s)

    def stop(self) -> None:
        self._ticker.stop()
        with self._lock:
            try:
                self._checkpoint(self.clock.now_ms())
            except Exception as e:   # a closed store: the last periodic checkpoint stands
                self._tick_failed(e)

    def _tick_failed(self, e: Exception) -> None:
        """Keep publishing; the error is counted and visible (/v1/health)."""
        self.step.errors[type(e).__name__] += 1
        self.step.last_error = repr(e)

    # --------------------------------------------------------------- queries
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
        """The comparison of ``challenger`` (at ``version``) with ``primary`` since
        ``since_ms``: :meth:`kpistream.windows.paired_summary.PairedSummaries.summary`
        at the current watermark (what the canary policy reads)."""
        with self._lock:
            wm = self.step.agg.watermark
        return self.step.paired_summary(model, challenger, version, since_ms, primary,
                                        primary_version, watermark=wm)

    def notifications(self, since: int = 0, limit: int = 1000) -> list[dict]:
        """Alert transitions after sequence number ``since`` (the hook later actions poll)."""
        return self.notifier.since(since, limit)

    def transitions(self, since: int = 0, epoch: str | None = None) -> dict:
        """``{"epoch", "last_seq", "items"}``: the hook later actions poll (a new epoch
        means a new log, after a publisher restart)."""
        return self.notifier.log(since, epoch)

    def series(self, metric=None, start=None, end=None, resolution=None, limit=None, offset=0,
               **labels) -> list[dict]:
        """Tidy rows from the store as JSON-able dicts (the ``/v1/series`` body)."""
        return self.step.series(metric, start=start, end=end, resolution=resolution,
                                limit=limit, offset=offset, **labels)

    def counters(self) -> dict:
        """Pipeline counters summed over shards."""
        return self.step.counters()

    def pid(self) -> int:
        """This process's id (fault-injection tests kill it)."""
        import os

        return os.getpid()

    def health(self) -> dict:
        return {"status": "ok" if not self.errors else "degraded", "ticks": self.ticks,
                "watermark": self.agg.watermark, "shards": len(self.shard_stats),
                "last_tick_ms": self.last_tick_ms, "errors": dict(self.errors),
                "store": str(self.store.file),
                "checkpoint": {"watermark": self._checkpoint_wm, "saved_ms": self._checkpoint_ms,
                               "bytes": self.checkpoint_bytes, "restored": self.restored},
                # each shard's log, snapshots and last recovery (what it loaded and replayed)
                "shard_logs": {str(k): st["log"] for k, st in self.shard_stats.items()
                               if st.get("log")}}

    def metric_families(self) -> list[Family]:
        """What ``/metrics`` shows, as plain families: KPI gauges, pipeline counters,
        alert and detector states."""
        step = self.step
        names = step.label_names()
        out = kpi_families(step.snapshot, names)
        out += pipeline_families(step.counters(), step.shard_stats, step.ticks)
        with self._lock:
            w = self.watcher
            active = w.alerts.active()
            now = self.clock.now_ms()
            dets = [*w.detectors.status(now), *w.inputs.status(now)]
            detections = dict(w.detections)
            nstats = self.notifier.stats()
            rules = list({r.name: r for r in w.config.rules})
        return out + alert_families(active, rules, nstats, detections, dets, names)

    def metrics_text(self) -> str:
        """Prometheus text exposition of the snapshot and the pipeline counters."""
        from prometheus_client import CollectorRegistry, generate_latest

        reg = CollectorRegistry()
        reg.register(_Collector(self))
        return generate_latest(reg).decode()


class _Collector:
    """prometheus_client custom collector over a publisher's metric families."""

    def __init__(self, pub: Publisher) -> None:
        self.pub = pub

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        kinds = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily}
        for f in self.pub.metric_families():
            m = kinds[f.kind](f.name, f.help, labels=list(f.labels))
            for lv, v in f.samples:
                m.add_metric(lv, v)
            yield m
