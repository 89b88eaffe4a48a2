"""Alert rules on the KPI windows: the ``rules`` of ``configs/alerts.yaml`` as
:class:`AlertRule` s, evaluated by :class:`AlertEngine`, exported by :func:`to_prometheus_rules`.

Keys and semantics: README, "Configuration" and "Alerts and drift".
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from kpistream.clock import Clock
from kpistream.windows import catalogue as _catalogue
from kpistream.errors import ConfigError
from kpistream.spec.alerts import Kpis, RuleModel, RulesFile
from kpistream.spec.common import MISSING, NAME, format_duration, parse, parse_duration, read_yaml

__all__ = [
    "KPI_NAMES", "QUALITY_KPIS", "PROM_METRICS", "Condition", "AlertRule", "Notification",
    "AlertEngine", "load_rules", "rules_from_dict", "to_prometheus_rules",
]

# The KPI tables come from the catalogue (kpistream.windows.catalogue); these
# names stay importable from here.
KPI_NAMES = _catalogue.KPI_NAMES
#: KPIs computed on labelled requests (``labelled`` is set on their rows).
QUALITY_KPIS = _catalogue.QUALITY_KPIS
#: KPI name -> (exported Prometheus gauge, scale from the KPI's unit to the gauge's).
PROM_METRICS = _catalogue.PROM_METRICS
#: KPIs that are shares of events (Bernoulli rates): binomial tests apply.
RATE_KPIS = _catalogue.RATE_KPIS
_QUANTILES = _catalogue.QUANTILE_KPIS
_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b}
_NEGATE = {"<": ">=", "<=": ">", ">": "<=", ">=": "<", "==": "!=", "!=": "=="}
_BASE_ORDER = {k: i for i, k in enumerate(("model", "model_version", "variant", "endpoint"))}
_NAME = NAME
#: Columns of a tidy row that are not series labels.
ROW_FIELDS = frozenset(("window", "window_start", "window_end", "metric", "value", "count",
                        "labelled", "provisional", "label_coverage"))


# ------------------------------------------------------------------ specs
@dataclass(frozen=True, slots=True)
class Condition:
    """``kind``: threshold (op, value), relative_drop / relative_rise (ratio, baseline_ms),
    detector, disparity (value = bound, across, alpha)."""

    kind: str
    op: str | None = None
    value: float | None = None
    ratio: float | None = None
    baseline_ms: int | None = None
    detector: str | None = None
    across: str | None = None
    alpha: float | None = None

    def describe(self) -> str:
        if self.kind == "threshold":
            return f"{self.op} {self.value:g}"
        if self.kind == "relative_drop":
            return f"< (1 - {self.ratio:g}) x mean of preceding {format_duration(self.baseline_ms)}"
        if self.kind == "relative_rise":
            return f"> (1 + {self.ratio:g}) x mean of preceding {format_duration(self.baseline_ms)}"
        if self.kind == "disparity":
            sig = f", significant at {self.alpha:g}" if self.alpha is not None else ""
            return f"max - min across {self.across} > {self.value:g}{sig}"
        return f"detector {self.detector} fired"

    def as_dict(self) -> dict:
        if self.kind == "threshold":
            return {"op": self.op, "value": self.value}
        if self.kind == "detector":
            return {"detector": self.detector}
        if self.kind == "disparity":
            d = {"disparity": self.value, "across": self.across}
            return d if self.alpha is None else {**d, "alpha": self.alpha}
        return {self.kind: self.ratio, "baseline": format_duration(self.baseline_ms)}


@dataclass(frozen=True, slots=True)
class AlertRule:
    name: str
    metric: str | None
    window: str | None
    condition: Condition
    clear: Condition
    match: tuple[tuple[str, str], ...] = ()
    for_ms: int = 0
    min_count: int = 30
    min_label_coverage: float | None = None
    severity: str = "warning"
    labels: tuple[tuple[str, str], ...] = ()
    annotations: tuple[tuple[str, str], ...] = ()
    group_by: tuple[str, ...] | None = None
    stale_after_ms: int = 300_000

    @property
    def is_detector(self) -> bool:
        return self.condition.kind == "detector"


def _negated(c: Condition) -> Condition:
    if c.kind == "threshold":
        return Condition("threshold", op=_NEGATE[c.op], value=c.value)
    return c  # relative/disparity/detector: "not (condition)" is evaluated by the engine


def _rule(m: RuleModel) -> AlertRule:
    cond = Condition(**m.condition)
    return AlertRule(
        name=m.name, metric=m.metric, window=m.window, condition=cond,
        clear=_negated(cond) if m.clear is MISSING else Condition(**m.clear),
        stale_after_ms=m.stale_after, match=m.match, for_ms=m.for_, min_count=m.min_count,
        min_label_coverage=m.min_label_coverage, severity=m.severity, labels=m.labels,
        annotations=m.annotations, group_by=m.group_by)


def rules_from_spec(models: Iterable[RuleModel]) -> tuple[AlertRule, ...]:
    """The :class:`AlertRule` of each validated rule (:mod:`kpistream.spec.alerts`)."""
    return tuple(_rule(m) for m in models)


def _kpis() -> Kpis:
    """The KPI names the rule checks know (the spec's validation context)."""
    return Kpis(KPI_NAMES, QUALITY_KPIS, RATE_KPIS)


def rules_from_dict(raw: Any) -> tuple[AlertRule, ...]:
    """The rules of an alerts file (a parsed mapping); errors name the key path."""
    # the other sections of an alerts file are kpistream.alerts.watcher's (validated there)
    return rules_from_spec(parse(RulesFile, raw, context={"kpis": _kpis()}).rules)


def load_rules(source: str | Path | Mapping[str, Any]) -> tuple[AlertRule, ...]:
    """Rules from a YAML path or an already parsed mapping."""
    if isinstance(source, (str, Path)):
        return rules_from_dict(read_yaml(source))
    return rules_from_dict(source)


# ------------------------------------------------------------------ engine
@dataclass(frozen=True)
class Notification:
    """One state transition of one alert instance."""

    rule: str
    state: str          # pending | firing | resolved | inactive (a pending alert that stopped)
    previous: str
    series: dict[str, str]
    since: int          # epoch ms when this state was entered (the clock's time)
    severity: str
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple:
        return (self.rule, tuple(sorted(self.series.items())), self.state, self.since)

    def as_dict(self) -> dict:
        return {"rule": self.rule, "state": self.state, "previous": self.previous,
                "series": dict(self.series), "since": self.since, "severity": self.severity,
                "labels": dict(self.labels), "annotations": dict(self.annotations),
                "evidence": self.evidence}


class _SafeFormat(dict):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def _ms(v: Any) -> int:
    if isinstance(v, bool):
        raise TypeError("time must not be a boolean")
    if isinstance(v, (int, float)):
        return int(v)
    if hasattr(v, "timestamp"):  # datetime / pandas Timestamp
        return int(round(v.timestamp() * 1000))
    raise TypeError(f"expected epoch milliseconds, got {v!r}")


@dataclass
class _Instance:
    series: dict[str, str]
    state: str = "inactive"
    since: int | None = None       # entry time of the current state
    active_at: int | None = None   # when the condition first held (pending start)
    evidence: dict[str, Any] = field(default_factory=dict)
    # window_start -> {series key: row}
    windows: dict[int, dict[tuple, dict]] = field(default_factory=dict)
    verdict: tuple[bool, Any, int] | None = None  # detector: (fired, evidence, at)
    last_seen: int | None = None   # clock time of the latest rows or verdict


class AlertEngine:
    """Evaluates alert rules over tidy window rows and detector verdicts.

    The clock is passed in (with :class:`~kpistream.clock.ManualClock` every
    transition is exact); the states: README, "Alerts and drift".
    """

    def __init__(self, rules: Iterable[AlertRule] | str | Path | Mapping[str, Any],
                 clock: Clock) -> None:
        if isinstance(rules, (str, Path, Mapping)):
            rules = load_rules(rules)
        self.rules: tuple[AlertRule, ...] = tuple(rules)
        self._by_name = {r.name: r for r in self.rules}
        self.clock = clock
        self._inst: dict[str, dict[tuple, _Instance]] = {r.name: {} for r in self.rules}
        self._coverage: dict[tuple, float] = {}
        self._sent: dict[tuple, None] = {}   # recent notification keys (bounded, ordered)
        self._subs: list[Callable[[Notification], Any]] = []
        self.callback_errors: list[tuple[Notification, BaseException]] = []

    # ---------------------------------------------------------- inputs
    def subscribe(self, callback: Callable[[Notification], Any]) -> Callable[[], None]:
        """Call ``callback(notification)`` for every transition; returns an unsubscribe function."""
        self._subs.append(callback)
        return lambda: self._subs.remove(callback) if callback in self._subs else None

    @staticmethod
    def _series(row: Mapping[str, Any]) -> dict[str, str]:
        return {k: str(v) for k, v in row.items() if k not in ROW_FIELDS and v is not None}

    @staticmethod
    def _instance_key(rule: AlertRule, series: Mapping[str, str]) -> tuple:
        if rule.group_by is None:  # base labels first, then segments by name
            if rule.condition.kind == "disparity":
                series = {k: v for k, v in series.items() if k != rule.condition.across}
            return tuple(sorted(series.items(),
                                key=lambda kv: (_BASE_ORDER.get(kv[0], len(_BASE_ORDER)), kv[0])))
        return tuple((k, series.get(k, "")) for k in rule.group_by)

    def observe(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Take tidy window rows (any metrics; those no rule uses are ignored)."""
        touched: set[tuple[str, tuple]] = set()
        for row in rows:
            metric = row.get("metric")
            series = self._series(row)
            skey = tuple(sorted(series.items()))
            start = _ms(row["window_start"])
            if metric == "label_coverage":
                self._coverage[(row.get("window"), start, skey)] = float(row["value"])
            for rule in self.rules:
                if rule.is_detector or rule.metric != metric or rule.window != str(row.get("window")):
                    continue
                if any(series.get(k) != v for k, v in rule.match):
                    continue
                ikey = self._instance_key(rule, series)
                inst = self._inst[rule.name].get(ikey)
                if inst is None:
                    inst = self._inst[rule.name][ikey] = _Instance(dict(ikey))
                r = dict(row)
                r["window_start"], r["window_end"] = start, _ms(row["window_end"])
                inst.windows.setdefault(start, {})[skey] = r
                inst.last_seen = self.clock.now_ms()
                touched.add((rule.name, ikey))
        for name, ikey in touched:  # keep what the rule can still need
            rule, inst = self._by_name[name], self._inst[name][ikey]
            latest = max(inst.windows)
            if rule.condition.kind in ("relative_drop", "relative_rise"):
                size = max(r["window_end"] - r["window_start"] for r in inst.windows[latest].values())
                horizon = latest - rule.condition.baseline_ms - size
                for s in [s for s in inst.windows if s < horizon]:
                    del inst.windows[s]
            else:
                for s in [s for s in inst.windows if s != latest]:
                    del inst.windows[s]
        if len(self._coverage) > 100_000:
            for k in sorted(self._coverage, key=lambda k: k[1])[:50_000]:
                del self._coverage[k]

    def observe_detector(self, rule_name: str, series_labels: Mapping[str, Any], fired: bool,
                         evidence: Any = None) -> None:
        """Feed the latest verdict of a detector for one series of a detector rule."""
        rule = self._by_name.get(rule_name)
        if rule is None or not rule.is_detector:
            raise KeyError(f"no detector rule named {rule_name!r}")
        series = {k: str(v) for k, v in series_labels.items()}
        if any(series.get(k) != v for k, v in rule.match):
            return
        ikey = self._instance_key(rule, series)
        inst = self._inst[rule.name].get(ikey)
        if inst is None:
            inst = self._inst[rule.name][ikey] = _Instance(dict(ikey))
        inst.verdict = (bool(fired), evidence, self.clock.now_ms())
        inst.last_seen = inst.verdict[2]

    # ---------------------------------------------------------- evaluation
    def _combine(self, rule: AlertRule, rows: dict[tuple, dict]) -> dict[str, Any]:
        members = [rows[k] for k in sorted(rows)]
        counts = [int(r.get("count") or 0) for r in members]
        values = [float(r["value"]) for r in members]
        total = sum(counts)
        if len(members) == 1:
            value = values[0]
        elif rule.metric == "requests":
            value = float(sum(values))
        elif rule.metric in _QUANTILES:
            value = max(values)
        else:
            value = (sum(v * c for v, c in zip(values, counts)) / total) if total else math.nan
        labelled = [r.get("labelled") for r in members]
        lab = None if any(x is None for x in labelled) else sum(int(x) for x in labelled)
        cov = None
        if rule.metric in QUALITY_KPIS:
            covs = []
            for r in members:
                c = r.get("label_coverage")
                if c is None:
                    c = self._coverage.get((r.get("window"), r["window_start"],
                                            tuple(sorted(self._series(r).items()))))
                covs.append(c)
            if all(c is not None for c in covs):
                if len(covs) == 1:
                    cov = float(covs[0])
                elif lab is not None:
                    tasks = sum((int(x) / c) if c else 0 for x, c in zip(labelled, covs))
                    cov = (lab / tasks) if tasks else 0.0
        first = members[0]
        return {"value": value, "count": total, "labelled": lab, "label_coverage": cov,
                "window": first.get("window"), "window_start": first["window_start"],
                "window_end": first["window_end"],
                "provisional": any(bool(r.get("provisional")) for r in members),
                "members": [{"series": self._series(r), "value": float(r["value"]),
                             "count": int(r.get("count") or 0), "labelled": r.get("labelled")}
                            for r in members] if len(members) > 1 else None}

    @staticmethod
    def _holds(c: Condition, value: float, baseline: float | None, negate: bool) -> bool:
        """Threshold: ``value op c.value``; relative: the drop/rise (``negate``: its absence)."""
        if c.kind == "threshold":
            return _OPS[c.op](value, c.value)
        if c.kind == "disparity":
            return value <= c.value if negate else value > c.value
        bound = baseline * (1 - c.ratio) if c.kind == "relative_drop" else baseline * (1 + c.ratio)
        hit = value < bound if c.kind == "relative_drop" else value > bound
        return (not hit) if negate else hit

    def _assess(self, rule: AlertRule, inst: _Instance) -> dict[str, Any] | None:
        """The evidence of the latest data, with ``cond``, ``clear`` and ``thin``."""
        if rule.is_detector:
            if inst.verdict is None:
                return None
            fired, ev, at = inst.verdict
            return {"detector": rule.condition.detector, "fired": fired, "verdict_at": at,
                    "detector_evidence": ev, "cond": fired, "clear": not fired, "thin": None}
        if not inst.windows:
            return None
        latest = max(inst.windows)
        if rule.condition.kind == "disparity":
            return self._assess_disparity(rule, inst.windows[latest])
        snap = self._combine(rule, inst.windows[latest])
        thin = []
        if not math.isfinite(snap["value"]):
            thin.append("value is not a number")
        if snap["count"] < rule.min_count:
            thin.append(f"count {snap['count']} < min_count {rule.min_count}")
        if rule.min_label_coverage is not None:
            cov = snap["label_coverage"]
            if cov is None:
                thin.append("label coverage unknown")
            elif cov < rule.min_label_coverage:
                thin.append(f"label coverage {cov:.4g} < min_label_coverage "
                            f"{rule.min_label_coverage:g}")
        baseline = None
        if rule.condition.kind in ("relative_drop", "relative_rise"):
            lo = latest - rule.condition.baseline_ms
            vals = []
            for s, rows in sorted(inst.windows.items()):
                if s == latest:
                    continue
                b = self._combine(rule, rows)
                if s >= lo and b["window_end"] <= latest and math.isfinite(b["value"]):
                    vals.append((s, b["value"], b["count"]))
            bcount = sum(c for _, _, c in vals)
            if bcount:
                baseline = sum(v * c for _, v, c in vals) / bcount
            snap["baseline"] = {"mean": baseline, "count": bcount, "windows": len(vals),
                                "start": lo, "end": latest}
            if baseline is None or bcount < max(rule.min_count, 1):
                thin.append(f"baseline has {bcount} events in {len(vals)} windows "
                            f"(< min_count {max(rule.min_count, 1)})")
        snap["thin"] = "; ".join(thin) or None
        if snap["thin"]:
            snap["cond"] = snap["clear"] = False
        else:
            snap["cond"] = self._holds(rule.condition, snap["value"], baseline, False)
            snap["clear"] = self._holds(rule.clear, snap["value"], baseline, negate=True)
        return snap

    def _assess_disparity(self, rule: AlertRule, rows: dict[tuple, dict]) -> dict[str, Any]:
        """Largest minus smallest member value among members with enough data."""
        c = rule.condition
        members, skipped = [], []
        for skey in sorted(rows):
            r = rows[skey]
            series = self._series(r)
            n = int(r.get("count") or 0)
            lab = r.get("labelled")
            cov = None
            if rule.metric in QUALITY_KPIS:
                cov = r.get("label_coverage")
                if cov is None:
                    cov = self._coverage.get((r.get("window"), r["window_start"], skey))
            m = {"segment": series.get(c.across, ""), "series": series,
                 "value": float(r["value"]), "count": n,
                 "labelled": None if lab is None else int(lab), "label_coverage": cov}
            why = None
            if not math.isfinite(m["value"]):
                why = "value is not a number"
            elif n < rule.min_count:
                why = f"count {n} < min_count {rule.min_count}"
            elif rule.min_label_coverage is not None and (cov is None
                                                          or cov < rule.min_label_coverage):
                why = "label coverage unknown" if cov is None else \
                    f"label coverage {cov:.4g} < {rule.min_label_coverage:g}"
            (skipped if why else members).append({**m, "skipped": why} if why else m)
        first = next(iter(rows.values()))
        snap: dict[str, Any] = {
            "window": first.get("window"), "window_start": first["window_start"],
            "window_end": first["window_end"],
            "provisional": any(bool(r.get("provisional")) for r in rows.values()),
            "segments": members, "skipped_segments": skipped or None,
            "count": sum(m["count"] for m in members),
            "labelled": None, "label_coverage": None}
        if len(members) < 2:
            snap.update(value=math.nan, thin=f"{len(members)} segment(s) of {c.across} with "
                                             f"enough data (need 2)", cond=False, clear=False)
            return snap
        hi = max(members, key=lambda m: m["value"])
        lo = min(members, key=lambda m: m["value"])
        gap = hi["value"] - lo["value"]
        snap.update(value=gap, highest=hi["segment"], lowest=lo["segment"], thin=None)
        significant = True
        if c.alpha is not None:
            # two-proportion z-test between the extremes, Bonferroni over member pairs
            n1 = hi["labelled"] if rule.metric in QUALITY_KPIS and hi["labelled"] else hi["count"]
            n2 = lo["labelled"] if rule.metric in QUALITY_KPIS and lo["labelled"] else lo["count"]
            pooled = (hi["value"] * n1 + lo["value"] * n2) / (n1 + n2)
            se = math.sqrt(max(pooled * (1 - pooled), 0.0) * (1 / n1 + 1 / n2))
            pairs = len(members) * (len(members) - 1) // 2
            # is the gap beyond the bound?  z = (gap - bound) / se, two-sided (the pair
            # of extremes, and so the sign, came from the data)
            excess = gap - c.value
            z = excess / se if se > 0 else (math.inf if excess > 0 else -math.inf)
            p = min(1.0, math.erfc(z / math.sqrt(2))) if math.isfinite(z) else \
                (0.0 if z > 0 else 1.0)
            significant = p * pairs <= c.alpha
            snap["test"] = {"z": z, "p_value": p, "pairs": pairs, "p_adjusted": min(1.0, p * pairs),
                            "alpha": c.alpha}
        snap["cond"] = self._holds(c, gap, None, False) and significant
        snap["clear"] = self._holds(rule.clear, gap, None, negate=True)
        return snap

    def _evidence(self, rule: AlertRule, inst: _Instance, snap: dict[str, Any]) -> dict[str, Any]:
        ev = {"rule": rule.name, "metric": rule.metric, "series": dict(inst.series),
              "condition": rule.condition.as_dict(), "clear": rule.clear.as_dict(),
              "threshold": rule.condition.describe(), "clear_threshold": rule.clear.describe(),
              "for_ms": rule.for_ms, "min_count": rule.min_count,
              "min_label_coverage": rule.min_label_coverage,
              "state": inst.state, "since": inst.since, "active_at": inst.active_at,
              "evaluated_at": self.clock.now_ms()}
        ev.update({k: v for k, v in snap.items() if k not in ("cond", "clear")})
        ev["condition_holds"], ev["clear_holds"] = snap["cond"], snap["clear"]
        return ev

    def _render(self, rule: AlertRule, inst: _Instance, ev: dict[str, Any]) -> dict[str, str]:
        series_txt = ",".join(f"{k}={v}" for k, v in inst.series.items())
        ctx = _SafeFormat(inst.series)
        base = ev.get("baseline") or {}
        ctx.update(rule=rule.name, metric=rule.metric or "", window=ev.get("window") or "",
                   value=ev.get("value", math.nan) if ev.get("value") is not None else math.nan,
                   count=ev.get("count", 0), labelled=ev.get("labelled"), series=series_txt,
                   threshold=rule.condition.describe(), severity=rule.severity,
                   baseline=base.get("mean") if base.get("mean") is not None else math.nan,
                   state=inst.state, since=inst.since)
        out = {}
        for k, text in rule.annotations:
            try:
                out[k] = string.Formatter().vformat(text, (), ctx)
            except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                out[k] = text
        return out

    def evaluate(self) -> list[Notification]:
        """Advance every alert instance; return (and publish) the transitions."""
        now = self.clock.now_ms()
        out: list[Notification] = []
        for rule in self.rules:
            for ikey in sorted(self._inst[rule.name]):
                inst = self._inst[rule.name][ikey]
                snap = self._assess(rule, inst)
                if snap is None:
                    continue
                if inst.state == "inactive" and inst.last_seen is not None \
                        and now - inst.last_seen > max(rule.stale_after_ms, 3_600_000):
                    del self._inst[rule.name][ikey]   # forget series gone for an hour
                    continue
                prev = inst.state
                new = prev
                if inst.last_seen is not None and now - inst.last_seen > rule.stale_after_ms:
                    # the series went away (a retired model version, a region with no
                    # traffic): its alert ends instead of firing forever on its last value,
                    # and old data starts nothing
                    if prev == "inactive":
                        continue
                    new = "resolved" if prev == "firing" else "inactive"
                    snap = {**snap, "stale": f"no data for {format_duration(now - inst.last_seen)}"
                                             f" (> stale_after "
                                             f"{format_duration(rule.stale_after_ms)})"}
                elif snap["thin"]:
                    pass  # thin data: keep the state as it is
                elif prev == "inactive":
                    if snap["cond"]:
                        inst.active_at = now
                        new = "firing" if rule.for_ms == 0 else "pending"
                elif prev == "pending":
                    if not snap["cond"]:
                        new = "inactive"
                    elif now - inst.active_at >= rule.for_ms:
                        new = "firing"
                elif prev == "firing":
                    if snap["clear"]:
                        new = "resolved"
                if new != prev:
                    inst.state, inst.since = new, now
                ev = self._evidence(rule, inst, snap)
                if snap["thin"] and inst.evidence and not inst.evidence.get("thin") \
                        and new == prev:
                    # thin data changes nothing: the evidence stays that of the last window
                    # with enough data (a new window's first few events must not read as the
                    # alert's value); the thin window is noted beside it
                    ev = {**inst.evidence, "state": inst.state, "evaluated_at": ev["evaluated_at"],
                          "latest_thin": {k: snap.get(k) for k in ("window_start", "value",
                                                                   "count", "thin")}}
                inst.evidence = ev
                if new != prev:
                    n = Notification(rule.name, new, prev, dict(inst.series), now, rule.severity,
                                     dict(rule.labels), self._render(rule, inst, ev), ev)
                    if n.key not in self._sent:
                        self._sent[n.key] = None
                        if len(self._sent) > 10_000:
                            del self._sent[next(iter(self._sent))]
                        out.append(n)
                if new in ("resolved", "inactive"):
                    inst.state, inst.active_at = "inactive", None
        for n in out:
            for cb in list(self._subs):
                try:
                    cb(n)
                except Exception as e:  # a failing hook must not stop the others
                    self.callback_errors.append((n, e))
        return out

    # ---------------------------------------------------------- checkpoint
    def to_dict(self) -> dict[str, Any]:
        """Every instance, the label coverage seen and the keys of the notifications sent,
        as JSON-able data (:meth:`restore` takes it back)."""
        inst = {name: [{"key": [list(kv) for kv in ikey], "series": i.series, "state": i.state,
                        "since": i.since, "active_at": i.active_at, "evidence": i.evidence,
                        "windows": [[start, [[[list(kv) for kv in skey], row]
                                             for skey, row in rows.items()]]
                                    for start, rows in i.windows.items()],
                        "verdict": None if i.verdict is None else list(i.verdict),
                        "last_seen": i.last_seen}
                       for ikey, i in by_key.items()]
                for name, by_key in self._inst.items()}
        return {"instances": inst,
                "coverage": [[w, start, [list(kv) for kv in skey], v]
                             for (w, start, skey), v in self._coverage.items()],
                "sent": [[rule, [list(kv) for kv in series], state, since]
                         for rule, series, state, since in self._sent]}

    def restore(self, data: Mapping[str, Any]) -> int:
        """Take back :meth:`to_dict`'s data; instances of rules no longer configured are
        left out.  Returns the instances restored."""
        def pairs(x: Any) -> tuple:
            return tuple((str(k), str(v)) for k, v in x)

        n = 0
        for name, items in data.get("instances", {}).items():
            if name not in self._inst:
                continue
            for d in items:
                v = d.get("verdict")
                self._inst[name][pairs(d["key"])] = _Instance(
                    dict(d["series"]), d["state"], d["since"], d["active_at"], dict(d["evidence"]),
                    {int(start): {pairs(skey): row for skey, row in rows}
                     for start, rows in d["windows"]},
                    None if v is None else (bool(v[0]), v[1], int(v[2])), d["last_seen"])
                n += 1
        self._coverage = {(w, int(start), pairs(skey)): float(v)
                          for w, start, skey, v in data.get("coverage", [])}
        self._sent = {(rule, pairs(series), state, since): None
                      for rule, series, state, since in data.get("sent", [])}
        return n

    def active(self) -> list[dict[str, Any]]:
        """Pending and firing instances with their latest evidence (for GET /v1/alerts)."""
        out = []
        for rule in self.rules:
            for ikey in sorted(self._inst[rule.name]):
                inst = self._inst[rule.name][ikey]
                if inst.state in ("pending", "firing"):
                    out.append({"rule": rule.name, "state": inst.state,
                                "series": dict(inst.series), "since": inst.since,
                                "active_at": inst.active_at, "severity": rule.severity,
                                "labels": dict(rule.labels),
                                "annotations": self._render(rule, inst, inst.evidence),
                                "evidence": inst.evidence})
        return out


# ------------------------------------------------------------------ Prometheus
def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


_ENGINE_FIELDS = frozenset(("count", "labelled", "baseline", "threshold", "rule", "metric",
                            "severity", "state", "since"))


def _promql_template(text: str, rule: AlertRule) -> str:
    """Translate an engine annotation template into a Prometheus (Go) template.

    ``{count}`` / ``{labelled}`` and ``{baseline}`` become queries of the alert's own
    series (its labels, the rule's window and match) at evaluation time; ``{state}`` and
    ``{since}`` exist only in the in-process engine and read ``(kpistream only)``.
    """
    fixed = {"rule": rule.name, "metric": rule.metric or "", "threshold": rule.condition.describe(),
             "severity": rule.severity}
    scaled = rule.metric is not None and PROM_METRICS[rule.metric][1] != 1.0
    out: list[str] = []
    needs_sel = False
    for lit, fname, spec, conv in string.Formatter().parse(text):
        out.append(lit.replace("{{", "{ {").replace("}}", "} }"))
        if fname is None:
            continue
        if fname == "value":
            out.append("{{ $value | humanizeDuration }}" if scaled else "{{ $value }}")
        elif fname == "series":
            out.append("{{ $labels }}")
        elif fname in fixed:
            out.append(fixed[fname])
        elif fname in ("count", "labelled") and rule.metric is not None:
            needs_sel = True
            quality = rule.metric in QUALITY_KPIS or fname == "labelled"
            q = ('sum(kpistream_window_requests{%s} * kpistream_label_coverage_ratio{%s})'
                 if quality else 'sum(kpistream_window_requests{%s})')
            args = "$s $s" if quality else "$s"
            out.append('{{ with query (printf "%s" %s) }}{{ . | first | value | printf "%%.0f" }}'
                       '{{ end }}' % (q.replace('"', '\\"'), args))
        elif fname == "baseline" and rule.metric is not None \
                and rule.condition.kind in ("relative_drop", "relative_rise"):
            needs_sel = True
            gauge = PROM_METRICS[rule.metric][0]
            q = (f"avg(avg_over_time({gauge}{{%s}}[{format_duration(rule.condition.baseline_ms)}]"
                 f" offset {format_duration(_window_ms(rule.window))}))")
            fmt = "humanizeDuration" if scaled else 'printf "%.4g"'
            out.append('{{ with query (printf "%s" $s) }}{{ . | first | value | %s }}{{ end }}'
                       % (q, fmt))
        elif _NAME.match(fname or "") and fname not in _ENGINE_FIELDS:
            out.append("{{ $labels.%s }}" % fname)
        else:
            out.append("(kpistream only)")
    if needs_sel:   # the alert's series as a selector: its labels, the rule's window and match
        skip = {"__name__", "alertname", "severity", *dict(rule.labels)}
        base = ",".join([f"window={_q(rule.window)}"] + [f"{k}={_q(v)}" for k, v in rule.match])
        cond = " ".join(f'(eq $k "{k}")' for k in sorted(skip))
        out.insert(0, '{{ $s := "%s" }}{{ range $k, $v := $labels }}{{ if not (or %s) }}'
                      '{{ $s = printf "%%s,%%s=%%q" $s $k $v }}{{ end }}{{ end }}'
                   % (base.replace('"', '\\"'), cond))
    return "".join(out)


def _fmt(x: float) -> str:
    return repr(float(x)) if not float(x).is_integer() else str(int(x)) if abs(x) < 1e15 else repr(x)


def _selector(name: str, rule: AlertRule) -> str:
    sel = [f"window={_q(rule.window)}"] + [f"{k}={_q(v)}" for k, v in rule.match]
    return f"{name}{{{','.join(sel)}}}"


def _window_ms(window: str) -> int:
    try:
        return parse_duration(window, "window") or 60_000
    except ConfigError:
        return 60_000


def _expr(rule: AlertRule) -> str:
    gauge, scale = PROM_METRICS[rule.metric]
    val = _selector(gauge, rule)
    req = _selector("kpistream_window_requests", rule)
    cov = _selector("kpistream_label_coverage_ratio", rule)
    quality = rule.metric in QUALITY_KPIS
    # events behind the value: requests, or (approximately) labelled requests for quality KPIs
    cnt = f"({req} * {cov})" if quality else req
    c = rule.condition
    if c.kind == "disparity":
        # members with enough data, then max - min per instance (the series without `across`)
        keep = [f"({cnt} >= {rule.min_count})"]
        if rule.min_label_coverage is not None:
            keep.append(f"({cov} >= {_fmt(rule.min_label_coverage)})")
        ok = f"({val} and {' and '.join(keep)})"
        dby = (f" by ({', '.join(rule.group_by)})" if rule.group_by is not None
               else f" without ({c.across})")
        gap = f"(max{dby} {ok} - min{dby} {ok})"
        return f"({gap} > {_fmt(c.value * scale)}) and (count{dby} {ok} >= 2)"
    by = f" by ({', '.join(rule.group_by)})" if rule.group_by is not None else ""
    if rule.group_by is not None:
        if rule.metric == "requests":
            val = f"sum{by} ({val})"
        elif rule.metric in _QUANTILES:
            val = f"max{by} ({val})"
        else:
            val = f"(sum{by} ({val} * {cnt}) / sum{by} ({cnt}))"
        cnt = f"sum{by} ({cnt})"
        cov = f"(sum{by} ({req} * {cov}) / sum{by} ({req}))"
    c = rule.condition
    if c.kind == "threshold":
        expr = f"{val} {c.op} {_fmt(c.value * scale)}"
    else:
        rng = format_duration(c.baseline_ms)
        off = format_duration(_window_ms(rule.window))
        base = _selector(gauge, rule)
        base = f"avg_over_time({base}[{rng}] offset {off})"
        if rule.group_by is not None:
            base = f"avg{by} ({base})"
        factor = (1 - c.ratio) if c.kind == "relative_drop" else (1 + c.ratio)
        op = "<" if c.kind == "relative_drop" else ">"
        expr = f"{val} {op} {_fmt(factor)} * {base}"
    parts = [f"({expr})"]
    if rule.min_count > 0:
        parts.append(f"({cnt} >= {rule.min_count})")
    if rule.min_label_coverage is not None:
        parts.append(f"({cov} >= {_fmt(rule.min_label_coverage)})")
    return " and ".join(parts)


def to_prometheus_rules(rules: Iterable[AlertRule], group: str = "kpistream") -> str:
    """The rules as a Prometheus alerting-rules file (``promtool check rules`` clean).

    Detector rules are skipped (their verdicts exist only in-process), and
    hysteresis (``clear``) is not expressible in Prometheus: it is noted in a
    comment; Prometheus resolves when the condition stops holding.
    """
    lines = ["# Generated by kpistream.alerts.to_prometheus_rules; do not edit by hand.",
             "groups:", f"  - name: {_q(group)}", "    rules:"]
    n, head = 0, len(lines) - 1
    for rule in rules:
        if rule.is_detector:
            lines.append(f"      # rule {rule.name} skipped: detector {rule.condition.detector!r} "
                         f"verdicts are computed in-process")
            continue
        n += 1
        gauge, scale = PROM_METRICS[rule.metric]
        if rule.clear != _negated(rule.condition):
            lines.append(f"      # {rule.name}: clear ({rule.clear.describe()}) is enforced by "
                         f"the in-process engine only")
        if rule.condition.kind == "disparity" and rule.condition.alpha is not None:
            lines.append(f"      # {rule.name}: the significance test (alpha "
                         f"{rule.condition.alpha:g}) is enforced by the in-process engine only")
        if scale != 1.0:
            lines.append(f"      # {rule.metric} thresholds converted to {gauge} base units "
                         f"(x{scale:g})")
        lines.append(f"      - alert: {rule.name}")
        lines.append(f"        expr: {_q(_expr(rule))}")
        if rule.for_ms:
            lines.append(f"        for: {format_duration(rule.for_ms)}")
        labels = {"severity": rule.severity, **dict(rule.labels)}
        lines.append("        labels:")
        for k, v in labels.items():
            lines.append(f"          {k}: {_q(v)}")
        ann = {"kpistream_rule": rule.name, "condition": rule.condition.describe(),
               **{k: _promql_template(v, rule) for k, v in rule.annotations}}
        lines.append("        annotations:")
        for k, v in ann.items():
            lines.append(f"          {k}: {_q(v)}")
    if n == 0:
        lines[head] = "    rules: []"
    return "\n".join(lines) + "\n"
