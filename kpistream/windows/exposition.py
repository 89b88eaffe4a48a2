"""What ``/metrics`` shows, as plain data: metric families built from the KPI
catalogue, the pipeline counters and the watcher's state (no prometheus_client
here; the publisher actor turns each :class:`Family` into a Prometheus one)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from kpistream.windows.catalogue import PROM_KPIS

#: (exported counter, key in the shards' summed counters, help); no labels.
PIPELINE_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("kpistream_join_evictions", "pending_evicted",
     "Inferences evicted from the join table for capacity"),
    ("kpistream_feedback_evictions", "feedback_evicted",
     "Feedback evicted from the join table for capacity"),
    ("kpistream_series_overflow", "series_overflow", "Events folded into the __other__ series"),
    ("kpistream_feedback_unmatched", "feedback_unmatched", "Feedback that never met its inference"),
    ("kpistream_inference_unlabelled", "inference_expired_unlabelled",
     "Inferences whose label deadline passed without a label"),
    ("kpistream_join_pairs", "join_pairs", "Inference-feedback pairs joined"),
    ("kpistream_feedback_type_mismatch", "feedback_type_mismatch",
     "Feedback of the wrong kind for its model"),
    ("kpistream_final_rewrites_refused", "final_refused",
     "Partials for panes whose windows were already final, refused by the publisher"))
#: (exported counter, key in an emitter's report, help); labels model, variant.
EMITTER_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("kpistream_emitter_dropped", "dropped", "Events dropped by monitored replicas (buffer full)"),
    ("kpistream_emitter_events", "flushed_rows", "Events flushed by monitored replicas"),
    ("kpistream_emitter_send_errors", "send_errors", "Failed sends from monitored replicas"),
    ("kpistream_emitter_lost", "lost_rows", "Events lost in failed sends"))
#: (key in a shard's archive stats, help); counters ``kpistream_archive_<key>`` by shard.
ARCHIVE_COUNTERS: tuple[tuple[str, str], ...] = (
    ("rows", "Raw events written to the Parquet archive"),
    ("files", "Parquet files written to the archive"),
    ("errors", "Failed archive writes"),
    ("dropped", "Events the archive dropped (buffer full)"))


@dataclass(slots=True)
class Family:
    """One metric family: ``kind`` is ``gauge`` or ``counter`` (name without ``_total``)."""

    name: str
    kind: str
    help: str
    labels: Sequence[str] = ()
    samples: list[tuple[list[str], float]] = field(default_factory=list)

    def add(self, label_values: Sequence[str], value: float) -> None:
        self.samples.append((list(label_values), value))


def kpi_families(snapshot: Mapping[tuple, tuple], label_names: Sequence[str]) -> list[Family]:
    """One gauge per catalogue KPI present in ``snapshot`` (see :class:`PublishStep`),
    labels ``window`` + the series labels, values scaled to base units."""
    names = ["window", *label_names]
    fams: dict[str, Family] = {}
    for (window, labels, metric), (value, *_rest) in sorted(
            snapshot.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1])):
        spec = PROM_KPIS.get(metric)
        if spec is None:
            continue
        name, help_, scale = spec
        fam = fams.get(name)
        if fam is None:
            fam = fams[name] = Family(name, "gauge", help_, names)
        fam.add([window, *(v for _, v in labels)], value * scale)
    return list(fams.values())


def pipeline_families(counters: Mapping[str, Any], shard_stats: Mapping[Any, dict],
                      ticks: int) -> list[Family]:
    """The pipeline's own counters: events, rejections, joins, emitters, watermarks,
    the archive and the publisher's rounds (``counters``: :meth:`PublishStep.counters`)."""
    out = []
    cnt = counters["counters"]
    ev = Family("kpistream_events", "counter", "Events by type and outcome", ["type", "outcome"])
    for typ in ("inference", "feedback"):
        ev.add([typ, "received"], cnt.get(f"{typ}_in", 0))
        ev.add([typ, "accepted"], cnt.get(f"{typ}_accepted", 0))
        ev.add([typ, "late"], cnt.get(f"late_{typ}", 0))
        ev.add([typ, "duplicate"], cnt.get(f"duplicate_{typ}", 0))
    # rows rejected before their type was known (not JSON, not an object, no usable type)
    ev.add(["unknown", "received"], cnt.get("unknown_in", 0))
    out.append(ev)
    rej = Family("kpistream_rejected", "counter", "Rejected rows by field and reason",
                 ["field", "reason"])
    for key, n in sorted(counters["rejected"].items()):
        fld, _, reason = key.rpartition(":")
        rej.add([fld[:64] or "row", reason], n)
    out.append(rej)
    for name, key, help_ in PIPELINE_COUNTERS:
        m = Family(name, "counter", help_)
        m.add([], cnt.get(key, 0))
        out.append(m)
    em = counters["emitters"]
    for name, key, help_ in EMITTER_COUNTERS:
        m = Family(name, "counter", help_, ["model", "variant"])
        for (model, variant), v in sorted(em.items()):
            m.add([model, variant], v.get(key, 0))
        out.append(m)
    b = Family("kpistream_emitter_buffered", "gauge", "Events waiting in replica buffers",
               ["model", "variant"])
    for (model, variant), v in sorted(em.items()):
        b.add([model, variant], v.get("buffered", 0))
    out.append(b)
    wm = Family("kpistream_watermark_seconds", "gauge", "Event-time watermark per shard",
                ["shard"])
    pend = Family("kpistream_join_pending", "gauge", "Inferences waiting for feedback", ["shard"])
    for sid, st in sorted(shard_stats.items()):
        if st.get("watermark", -(2**62)) > 0:
            wm.add([str(sid)], st["watermark"] / 1000.0)
        pend.add([str(sid)], st.get("pending", 0))
    out += [wm, pend]
    arch = {k: Family(f"kpistream_archive_{k}", "counter", help_, ["shard"])
            for k, help_ in ARCHIVE_COUNTERS}
    for sid, st in sorted(shard_stats.items()):
        a = st.get("archive")
        if a:
            for k, fam in arch.items():
                fam.add([str(sid)], a.get(k, 0))
    out += arch.values()
    t = Family("kpistream_publisher_ticks", "gauge", "Publisher rounds so far")
    t.add([], ticks)
    out.append(t)
    return out


def alert_families(active: Iterable[dict], rules: Iterable[str], notifications: Mapping,
                   detections: Mapping[str, int], detectors: Iterable[dict],
                   label_names: Sequence[str]) -> list[Family]:
    """Alert states, transitions, webhook deliveries and drift detectors.

    ``active``: the alert engine's active instances; ``rules``: rule names;
    ``notifications``: the notifier's stats; ``detections``: signals per
    detector; ``detectors``: detector and input-drift statuses.
    """
    names = list(label_names)
    active = list(active)
    fams = {st: Family(f"kpistream_alerts_{st}", "gauge", f"Alert instances {st} (1 per instance)",
                       ["alertname", "severity", *names]) for st in ("firing", "pending")}
    for a in active:
        fams[a["state"]].add([a["rule"], a["severity"],
                              *(a["series"].get(k, "") for k in names)], 1)
    out = list(fams.values())
    # per rule, always a sample (0 when none): the per-instance gauges above follow
    # Prometheus's ALERTS convention and exist only while an instance is active
    for st in ("firing", "pending"):
        per_rule = Family(f"kpistream_alert_rule_{st}", "gauge",
                          f"{st.capitalize()} instances per alert rule", ["alertname"])
        for name in rules:
            per_rule.add([name], sum(1 for a in active if a["rule"] == name and a["state"] == st))
        out.append(per_rule)
    tr = Family("kpistream_alert_transitions", "counter", "Alert state transitions",
                ["alertname", "state"])
    for key, n in sorted(notifications["notifications"].items()):
        rule, _, state = key.partition("|")
        tr.add([rule, state], n)
    out.append(tr)
    wh = Family("kpistream_webhook_notifications", "counter", "Webhook notifications by outcome",
                ["receiver", "outcome"])
    for i, h in enumerate(notifications["webhooks"]):
        for outcome in ("delivered", "failed", "rejected", "dropped", "retries"):
            wh.add([str(i), outcome], h.get(outcome, 0))
    out.append(wh)
    dt = Family("kpistream_drift_detections", "counter", "Change / input-drift signals per detector",
                ["detector"])
    for name, n in sorted(detections.items()):
        dt.add([name], n)
    out.append(dt)
    da = Family("kpistream_drift_active", "gauge",
                "1 while a detector's verdict is drift, per series or group",
                ["detector", *names])
    for d in detectors:
        labels = d.get("series") or d.get("group") or {}
        da.add([d["detector"], *(labels.get(k, "") for k in names)], 1.0 if d["drift"] else 0.0)
    out.append(da)
    return out
