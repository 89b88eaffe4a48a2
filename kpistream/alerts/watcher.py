"""The watcher: alert rules, per-series drift detectors and input-drift tests, together.

:func:`load_alerts` reads the whole of ``configs/alerts.yaml`` (keys: README, "Configuration");
:class:`Watcher`, owned by the publisher, holds the :class:`~kpistream.alerts.rules.AlertEngine`,
the :class:`DetectorBank` and the :class:`InputDriftBank`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from kpistream.alerts.rules import (AlertEngine, AlertRule, Notification, QUALITY_KPIS, KPI_NAMES, RATE_KPIS,
                     rules_from_spec)
from kpistream.clock import Clock
from kpistream.spec.alerts import AlertsFile, Kpis
from kpistream.spec.common import parse, read_yaml
from kpistream.spec.metrics import EngineConfig
from kpistream.windows.catalogue import HIGHER_IS_BETTER
from kpistream.alerts.detectors import (Adwin, Cusum, Ewma, PageHinkley, PsiTest, TwoSidedCusum,
                                        detector_from_dict, detector_to_dict, feature_drift)
from kpistream.errors import ConfigError

__all__ = ["DetectorSpec", "InputDriftSpec", "WebhookSpec", "AlertsConfig", "load_alerts",
           "alerts_from_dict", "DetectorBank", "InputDriftBank", "Watcher", "HIGHER_IS_BETTER"]

_DAY = 86_400_000


# ------------------------------------------------------------------ specs
@dataclass(frozen=True, slots=True)
class DetectorSpec:
    name: str
    type: str
    metric: str
    window: str
    match: tuple[tuple[str, str], ...] = ()
    direction: str = "up"
    shift: float | None = None
    false_alarm_every_ms: int = 30 * _DAY
    target: float | None = None
    sigma: float | None = None
    warmup: int = 30
    guard: float = 2.0
    min_count: int = 30
    lam: float = 0.2
    delta: float = 0.002
    threshold: float = 50.0
    hold_ms: int = 120_000


@dataclass(frozen=True, slots=True)
class InputDriftSpec:
    name: str
    window: str
    match: tuple[tuple[str, str], ...] = ()
    group_by: tuple[str, ...] = ("model", "model_version", "variant")
    reference_ms: int = 120_000
    max_reference: int = 4096
    alpha: float = 0.01
    min_effect: float = 0.1
    psi_bins: int = 10
    psi_floor: float = 0.1
    min_samples: int = 50
    hold_ms: int = 60_000
    features: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class WebhookSpec:
    url: str
    states: tuple[str, ...] = ("firing", "resolved")
    timeout_s: float = 5.0
    retries: int = 6
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class AlertsConfig:
    rules: tuple[AlertRule, ...] = ()
    detectors: tuple[DetectorSpec, ...] = ()
    input_drift: tuple[InputDriftSpec, ...] = ()
    webhooks: tuple[WebhookSpec, ...] = ()
    log: bool = True


def alerts_from_dict(raw: Any) -> AlertsConfig:
    """Every section of an alerts file (a parsed mapping) -> :class:`AlertsConfig`."""
    kpis = Kpis(KPI_NAMES, QUALITY_KPIS, RATE_KPIS, HIGHER_IS_BETTER)
    f = parse(AlertsFile, raw, context={"kpis": kpis})
    return AlertsConfig(rules_from_spec(f.rules),
                        tuple(DetectorSpec(**m.spec_kwargs()) for m in f.detectors),
                        tuple(InputDriftSpec(**m.spec_kwargs()) for m in f.input_drift),
                        tuple(WebhookSpec(**m.spec_kwargs()) for m in f.notifications.webhooks),
                        f.notifications.log)


def load_alerts(source: str | Path | Mapping[str, Any] | None) -> AlertsConfig:
    """An alerts file (path or parsed mapping); ``None`` -> no rules at all."""
    if source is None:
        return AlertsConfig()
    if isinstance(source, (str, Path)):
        return alerts_from_dict(read_yaml(source))
    return alerts_from_dict(source)


def check_windows(cfg: AlertsConfig, engine: EngineConfig) -> None:
    """Every window named by the alerts config exists; detectors need tumbling windows."""
    windows = {w.name: w for w in engine.windows}
    for i, r in enumerate(cfg.rules):
        if r.window is not None and r.window not in windows:
            raise ConfigError(f"rules[{i}].window", f"no window named {r.window!r} in the metrics "
                                                    f"config (known: {', '.join(windows)})")
    for kind, specs in (("detectors", cfg.detectors), ("input_drift", cfg.input_drift)):
        for i, s in enumerate(specs):
            w = windows.get(s.window)
            if w is None:
                raise ConfigError(f"{kind}[{i}].window", f"no window named {s.window!r} "
                                                        f"(known: {', '.join(windows)})")
            if not w.is_time:
                raise ConfigError(f"{kind}[{i}].window", "must be a time window")
            if kind == "detectors" and w.step != w.size:
                raise ConfigError(f"{kind}[{i}].window",
                                  f"{s.window!r} is sliding: detector samples must not overlap "
                                  f"(use a tumbling window)")


# ------------------------------------------------------------------ detectors
def _series(row: Mapping[str, Any]) -> dict[str, str]:
    from kpistream.alerts.rules import ROW_FIELDS

    return {k: str(v) for k, v in row.items() if k not in ROW_FIELDS and v is not None}


def _pairs(x: Iterable) -> tuple:
    return tuple((str(k), str(v)) for k, v in x)


def _array_to_dict(a: np.ndarray) -> dict[str, Any]:
    """A sample as data: numbers as floats, categories as strings (or null)."""
    if a.dtype.kind in "iufb":
        return {"kind": "f8", "values": a.astype(float).tolist()}
    return {"kind": "object", "values": [None if x is None else str(x) for x in a.tolist()]}


def _array_from_dict(d: Mapping[str, Any]) -> np.ndarray:
    return np.asarray(d["values"], dtype=float if d["kind"] == "f8" else object)


def _bank_to_dict(specs: Sequence[Any], states: Mapping[str, Mapping[tuple, Any]],
                  encode: Callable[[dict, Any], None]) -> dict[str, Any]:
    """A bank's states per spec (with the spec's repr, so that a changed spec starts over):
    each state's dataclass fields, ``encode(fields, state)`` replacing those that are not
    plain data."""
    out = {}
    for spec in specs:
        items = []
        for key, st in states[spec.name].items():
            d = {f.name: getattr(st, f.name) for f in fields(st)}
            encode(d, st)
            items.append({"key": [list(kv) for kv in key], "state": d})
        out[spec.name] = {"spec": repr(spec), "items": items}
    return out


def _bank_restore(specs: Sequence[Any], states: dict[str, dict[tuple, Any]],
                  data: Mapping[str, Any], decode: Callable[[dict], Any]) -> int:
    """:func:`_bank_to_dict`'s data back into ``states`` for unchanged specs; the count."""
    n = 0
    for spec in specs:
        d = data.get(spec.name)
        if d is None or d.get("spec") != repr(spec):
            continue
        for item in d["items"]:
            states[spec.name][_pairs(item["key"])] = decode(dict(item["state"]))
            n += 1
    return n


@dataclass
class _DetState:
    series: dict[str, str]
    warm: list[tuple[float, int]] = field(default_factory=list)
    det: Any = None
    target: float | None = None
    sigma: float | None = None
    arl0: float | None = None
    windows: int = 0
    skipped: int = 0
    signals: int = 0
    last_signal_end: int | None = None
    last_end: int | None = None
    last_value: float | None = None
    last_count: int | None = None
    signal_value: float | None = None
    error: str | None = None
    seen_at: int | None = None      # clock time of the latest window (for pruning)


class DetectorBank:
    """Change detectors per (detector spec, series), fed final window rows."""

    def __init__(self, specs: Sequence[DetectorSpec], engine: EngineConfig | None = None) -> None:
        self.specs = tuple(specs)
        self._window_ms = {}
        if engine is not None:
            self._window_ms = {w.name: w.size for w in engine.windows if w.is_time}
        self.states: dict[str, dict[tuple, _DetState]] = {s.name: {} for s in self.specs}

    def _arl0(self, spec: DetectorSpec, row: Mapping[str, Any]) -> float:
        size = self._window_ms.get(spec.window) or (int(row["window_end"]) - int(row["window_start"]))
        return max(2.0, spec.false_alarm_every_ms / max(size, 1))

    @staticmethod
    def _count(spec: DetectorSpec, row: Mapping[str, Any]) -> int:
        if spec.metric in QUALITY_KPIS and row.get("labelled") is not None:
            return int(row["labelled"])
        return int(row.get("count") or 0)

    def _build(self, spec: DetectorSpec, st: _DetState, arl0: float) -> None:
        from scipy import stats as _stats

        vals = np.array([v for v, _ in st.warm], dtype=float)
        cnts = np.array([c for _, c in st.warm], dtype=float)
        w = len(vals)
        rate = spec.metric in RATE_KPIS
        # which way the guard band moves a learned target: away from the side watched, so
        # that the estimate's own error does not read as a persistent change
        away = {"down": -1.0, "up": 1.0}.get(spec.direction, 0.0)
        sigma = None
        if rate:
            n = float(cnts.sum())
            p = float((vals * cnts).sum() / n) if spec.target is None else spec.target
            if spec.target is None:
                p += away * spec.guard * math.sqrt(max(p * (1 - p), 1e-12) / n)
            # keep a rate strictly inside (0, 1): half a success and half a failure
            target = min(max(p, 0.5 / (n + 1)), 1 - 0.5 / (n + 1))
        else:
            if spec.sigma is not None:
                sigma = spec.sigma
            else:
                # upper 95 % confidence bound of the spread of the warm-up windows
                sd = float(vals.std(ddof=1))
                sigma = sd * math.sqrt((w - 1) / float(_stats.chi2.ppf(0.05, w - 1)))
                sigma = max(sigma, 1e-9)
            if spec.target is not None:
                target = spec.target
            else:
                target = float(vals.mean()) + away * spec.guard * sigma / math.sqrt(w)
        st.target, st.arl0, st.sigma = target, arl0, sigma
        if spec.type == "cusum":
            shift = spec.shift
            if rate:
                lo, hi = target - shift, target + shift
                if spec.direction == "down" and lo <= 0 or spec.direction == "up" and hi >= 1:
                    shift = (target if spec.direction == "down" else 1 - target) * 0.5
            if spec.direction == "both":
                st.det = TwoSidedCusum(target, shift, arl0, sigma)
            else:
                st.det = Cusum(target, shift, arl0, sigma, side=spec.direction)
        elif spec.type == "ewma":
            # Ewma watches the up side (or both): a "down" KPI is watched through its
            # failure share (rates) or its negation (other KPIs)
            side = "both" if spec.direction == "both" else "up"
            down = spec.direction == "down"
            t = (1 - target if down else target) if rate else (-target if down else target)
            st.det = Ewma(t, sigma, spec.lam, arl0, side=side)
        elif spec.type == "page_hinkley":
            mode = {"up": "up", "down": "down", "both": "both"}[spec.direction]
            st.det = PageHinkley(delta=spec.delta if spec.delta < 1 else 0.005,
                                 threshold=spec.threshold, mode=mode, min_instances=1)
        else:
            st.det = Adwin(delta=spec.delta)

    def _feed(self, spec: DetectorSpec, st: _DetState, value: float, count: int) -> bool:
        rate = spec.metric in RATE_KPIS
        det = st.det
        if spec.type == "cusum":
            return det.update(value * count, trials=count) if rate else det.update(value)
        if spec.type == "ewma":
            if rate:
                if spec.direction == "down":  # watch the failure share going up
                    return det.update((1 - value) * count, trials=count)
                return det.update(value * count, trials=count)
            return det.update(-value if spec.direction == "down" else value)
        return det.update(value)

    def observe(self, rows: Iterable[Mapping[str, Any]],
                now_ms: int | None = None) -> list[tuple[DetectorSpec, _DetState, bool]]:
        """Feed final rows (provisional ones are ignored), in window order; returns the
        touched (spec, state, signal), thin windows included (their verdict still ages)."""
        out = []
        final = sorted((r for r in rows if not r.get("provisional")),
                       key=lambda r: int(r["window_end"]))
        for row in final:
            for spec in self.specs:
                if row.get("metric") != spec.metric or str(row.get("window")) != spec.window:
                    continue
                series = _series(row)
                if any(series.get(k) != v for k, v in spec.match):
                    continue
                key = tuple(sorted(series.items()))
                st = self.states[spec.name].get(key)
                if st is None:
                    st = self.states[spec.name][key] = _DetState(series)
                end = int(row["window_end"])
                if st.last_end is not None and end <= st.last_end:
                    st.skipped += int(end < st.last_end)   # late: counted, not fed
                    continue  # each window once, in order
                value, count = float(row["value"]), self._count(spec, row)
                st.last_end = end
                st.seen_at = now_ms
                if not math.isfinite(value) or count < spec.min_count:
                    st.skipped += 1
                    if st.det is not None:
                        out.append((spec, st, False))
                    continue
                st.last_value, st.last_count = value, count
                if st.det is None:
                    st.warm.append((value, count))
                    known = spec.target is not None and (spec.sigma is not None
                                                         or spec.metric in RATE_KPIS)
                    if len(st.warm) >= spec.warmup or known:
                        try:
                            self._build(spec, st, self._arl0(spec, row))
                        except ConfigError as e:  # e.g. a constant warm-up: keep learning
                            st.error = f"{e}"
                            st.warm = st.warm[-spec.warmup:]
                            continue
                        st.error = None
                    continue
                st.windows += 1
                signal = bool(self._feed(spec, st, value, count))
                if signal:
                    st.signals += 1
                    st.last_signal_end = end
                    st.signal_value = value
                out.append((spec, st, signal))
        return out

    @staticmethod
    def verdict(spec: DetectorSpec, st: _DetState) -> bool:
        return (st.last_signal_end is not None and st.last_end is not None
                and st.last_end - st.last_signal_end < spec.hold_ms)

    def prune(self, now_ms: int, idle_ms: int = 3_600_000) -> int:
        """Forget series without a window for ``idle_ms`` (retired versions, gone segments)."""
        n = 0
        for states in self.states.values():
            for k in [k for k, st in states.items()
                      if st.seen_at is not None and now_ms - st.seen_at > idle_ms]:
                del states[k]
                n += 1
        return n

    def to_dict(self) -> dict[str, Any]:
        """Every series' detector, warm-up and counts as JSON-able data, per spec (with
        the spec, so that a changed spec starts over)."""
        def enc(d: dict, st: _DetState) -> None:
            d["warm"] = [list(w) for w in st.warm]
            d["det"] = None if st.det is None else detector_to_dict(st.det)
        return _bank_to_dict(self.specs, self.states, enc)

    def restore(self, data: Mapping[str, Any]) -> int:
        """Take back :meth:`to_dict`'s data for specs that are unchanged; returns the
        series restored."""
        def dec(st: dict) -> _DetState:
            st["warm"] = [(float(v), int(c)) for v, c in st["warm"]]
            st["det"] = None if st["det"] is None else detector_from_dict(st["det"])
            return _DetState(**st)
        return _bank_restore(self.specs, self.states, data, dec)

    def evidence(self, spec: DetectorSpec, st: _DetState,
                 now_ms: int | None = None) -> dict[str, Any]:
        det_state = st.det.state if st.det is not None else None
        # a series that stopped reporting (a retired version) is not "in drift" any more
        idle = (now_ms is not None and st.seen_at is not None
                and now_ms - st.seen_at > spec.hold_ms)
        return {"detector": spec.name, "type": spec.type, "metric": spec.metric,
                "window": spec.window, "series": dict(st.series), "direction": spec.direction,
                "target": st.target, "sigma": st.sigma, "shift": spec.shift, "arl0_windows": st.arl0,
                "false_alarm_every_ms": spec.false_alarm_every_ms,
                "warming_up": st.det is None, "warmup_windows": len(st.warm),
                "windows": st.windows, "skipped_windows": st.skipped, "signals": st.signals,
                "last_signal_window_end": st.last_signal_end, "value_at_signal": st.signal_value,
                "last_value": st.last_value, "last_count": st.last_count,
                "drift": self.verdict(spec, st) and not idle, "idle": bool(idle),
                "state": det_state, "error": st.error}

    def status(self, now_ms: int | None = None) -> list[dict[str, Any]]:
        return [self.evidence(spec, st, now_ms) for spec in self.specs
                for st in self.states[spec.name].values()]


# ------------------------------------------------------------------ input drift
@dataclass
class _RefState:
    group: dict[str, str]
    start: int | None = None
    ref: dict[str, list] = field(default_factory=dict)
    ref_rows: int = 0
    frozen: dict[str, np.ndarray] | None = None
    source: str = "window"
    tests: int = 0
    signals: int = 0
    last_end: int | None = None
    last_signal_end: int | None = None
    last: dict[str, Any] | None = None
    seen_at: int | None = None


def _concat(parts: list) -> np.ndarray:
    arrs = [np.asarray(p) for p in parts if len(p)]
    if not arrs:
        return np.array([], dtype=float)
    if all(a.dtype.kind in "iuf" for a in arrs):
        return np.concatenate([a.astype(float) for a in arrs])
    return np.concatenate([a.astype(object) for a in arrs])


def _clean(a: np.ndarray) -> np.ndarray:
    """Drop missing values: NaN for numbers, None for categories."""
    if a.dtype.kind in "iuf":
        return a[np.isfinite(a)]
    return np.array([x for x in a if x is not None and not (isinstance(x, float) and math.isnan(x))],
                    dtype=object)


class InputDriftBank:
    """Reference sample per group, and a drift test per closed window sample."""

    def __init__(self, specs: Sequence[InputDriftSpec]) -> None:
        self.specs = tuple(specs)
        self.states: dict[str, dict[tuple, _RefState]] = {s.name: {} for s in self.specs}
        # (spec, group key, window start) -> list of samples of member series
        self._pending: dict[tuple[str, tuple, int], list] = {}

    def set_reference(self, name: str, group: Mapping[str, str], sample: Mapping[str, Any],
                      source: str = "given") -> None:
        """A fixed reference (e.g. logged with the model in MLflow) for one group."""
        spec = next((s for s in self.specs if s.name == name), None)
        if spec is None:
            raise KeyError(f"no input_drift named {name!r}")
        key = tuple((k, str(group.get(k, ""))) for k in spec.group_by)
        st = self.states[name].setdefault(key, _RefState(dict(key)))
        st.frozen = {f: _clean(np.asarray(v)) for f, v in sample.items()}
        st.ref_rows = max((len(v) for v in st.frozen.values()), default=0)
        st.source = source

    def observe(self, window: str, start: int, end: int, series: Mapping[str, str],
                sample: Mapping[str, np.ndarray], final: bool) -> list[tuple[InputDriftSpec, _RefState]]:
        """One series' sample of one closed window (``final``); tests run per group."""
        if not final:
            return []
        out = []
        for spec in self.specs:
            if spec.window != window or any(series.get(k) != v for k, v in spec.match):
                continue
            key = tuple((k, str(series.get(k, ""))) for k in spec.group_by)
            st = self.states[spec.name].get(key)
            if st is None:
                st = self.states[spec.name][key] = _RefState(dict(key))
            if st.last_end is not None and end <= st.last_end:
                continue
            feats = {f: v for f, v in sample.items()
                     if spec.features is None or f in spec.features}
            if st.frozen is None:
                if st.start is None:
                    st.start = start
                if end <= st.start + spec.reference_ms:
                    for f, v in feats.items():
                        st.ref.setdefault(f, []).append(np.asarray(v))
                    st.ref_rows += max((len(v) for v in feats.values()), default=0)
                    continue
                st.frozen = {}
                rng = np.random.default_rng(0)
                for f, parts in st.ref.items():
                    a = _clean(_concat(parts))
                    if len(a) > spec.max_reference:
                        a = a[rng.choice(len(a), spec.max_reference, replace=False)]
                    st.frozen[f] = a
                st.ref = {}
            self._pending.setdefault((spec.name, key, start), []).append((end, feats))
            out.append((spec, st))
        return out

    def run(self) -> list[tuple[InputDriftSpec, _RefState, bool]]:
        """Test every window collected by :meth:`observe` (call once all its series are in)."""
        res = []
        for (name, key, start), parts in sorted(self._pending.items(), key=lambda kv: kv[0][2]):
            spec = next(s for s in self.specs if s.name == name)
            st = self.states[name][key]
            end = max(e for e, _ in parts)
            cur = {}
            for f in {f for _, feats in parts for f in feats}:
                cur[f] = _clean(_concat([feats[f] for _, feats in parts if f in feats]))
            fired = self._test(spec, st, cur, start, end)
            res.append((spec, st, fired))
        self._pending.clear()
        return res

    @staticmethod
    def _test(spec: InputDriftSpec, st: _RefState, cur: Mapping[str, np.ndarray],
              start: int, end: int) -> bool:
        ref = st.frozen or {}
        tests = feature_drift(ref, cur, spec.alpha, min_effect=spec.min_effect,
                              min_samples=spec.min_samples)
        feats, drifted = [], []
        for f, t in sorted(tests.items()):
            item = {"feature": f, "kind": t.kind, "test": t.test, "statistic": t.statistic,
                    "p_value": t.p_value, "p_adjusted": t.p_adjusted, "effect": t.effect,
                    "n_ref": t.n_ref, "n_cur": t.n_cur}
            drift = t.drift
            if t.kind == "numeric" and t.n_ref >= 2 and t.n_cur >= 1:
                r = PsiTest(ref[f], bins=spec.psi_bins, alpha=spec.alpha, floor=spec.psi_floor,
                            min_samples=spec.min_samples).test(cur[f])
                item.update(psi=r.psi, psi_threshold=r.threshold)
                drift = drift and r.psi > r.threshold
            item["drift"] = bool(drift)
            feats.append(item)
            if drift:
                drifted.append(f)
        st.tests += 1
        st.last_end = end
        if drifted:
            st.signals += 1
            st.last_signal_end = end
        st.last = {"window_start": start, "window_end": end, "drifted": drifted,
                   "features": feats}
        return bool(drifted)

    def prune(self, now_ms: int, idle_ms: int = 3_600_000) -> int:
        """Forget groups without a window for ``idle_ms``, fixed references excepted."""
        n = 0
        for states in self.states.values():
            for k in [k for k, st in states.items() if st.source == "window"
                      and st.seen_at is not None and now_ms - st.seen_at > idle_ms]:
                del states[k]
                n += 1
        return n

    def to_dict(self) -> dict[str, Any]:
        """Every group's reference (or what it gathered so far) and test counts, per spec.

        Call it between rounds (after :meth:`run`): samples waiting for their test
        are not kept."""
        def enc(d: dict, st: _RefState) -> None:
            d["ref"] = {f: _array_to_dict(_concat(parts)) for f, parts in st.ref.items()}
            d["frozen"] = None if st.frozen is None else {
                f: _array_to_dict(a) for f, a in st.frozen.items()}
        return _bank_to_dict(self.specs, self.states, enc)

    def restore(self, data: Mapping[str, Any]) -> int:
        """Take back :meth:`to_dict`'s data for specs that are unchanged; returns the
        groups restored."""
        def dec(st: dict) -> _RefState:
            st["ref"] = {f: [_array_from_dict(a)] for f, a in st["ref"].items()}
            if st["frozen"] is not None:
                st["frozen"] = {f: _array_from_dict(a) for f, a in st["frozen"].items()}
            return _RefState(**st)
        return _bank_restore(self.specs, self.states, data, dec)

    @staticmethod
    def verdict(spec: InputDriftSpec, st: _RefState) -> bool:
        return (st.last_signal_end is not None and st.last_end is not None
                and st.last_end - st.last_signal_end < spec.hold_ms)

    def evidence(self, spec: InputDriftSpec, st: _RefState,
                 now_ms: int | None = None) -> dict[str, Any]:
        idle = (now_ms is not None and st.seen_at is not None
                and now_ms - st.seen_at > spec.hold_ms)
        return {"detector": spec.name, "type": "input_drift", "window": spec.window,
                "group": dict(st.group), "reference_source": st.source,
                "reference_rows": st.ref_rows, "reference_ready": st.frozen is not None,
                "tests": st.tests, "signals": st.signals,
                "last_signal_window_end": st.last_signal_end,
                "drift": self.verdict(spec, st) and not idle, "idle": bool(idle),
                "alpha": spec.alpha, "min_effect": spec.min_effect, "last": st.last}

    def status(self, now_ms: int | None = None) -> list[dict[str, Any]]:
        return [self.evidence(spec, st, now_ms) for spec in self.specs
                for st in self.states[spec.name].values()]


# ------------------------------------------------------------------ watcher
class Watcher:
    """Alert rules + detectors + input drift over what the publisher publishes.

    The publisher feeds it what it publishes: tidy window rows (provisional and
    final) and, per closed window, the sampled inputs (``features`` family).
    """

    def __init__(self, config: AlertsConfig | str | Path | Mapping[str, Any] | None,
                 clock: Clock, engine: EngineConfig | None = None) -> None:
        if not isinstance(config, AlertsConfig):
            config = load_alerts(config)
        if engine is not None:
            check_windows(config, engine)
        self.config = config
        self.clock = clock
        self.alerts = AlertEngine(config.rules, clock)
        self.detectors = DetectorBank(config.detectors, engine)
        self.inputs = InputDriftBank(config.input_drift)
        self._det_rules: dict[str, list[str]] = {}
        for r in config.rules:
            if r.is_detector:
                self._det_rules.setdefault(r.condition.detector, []).append(r.name)
        self._pruned_at = clock.now_ms()
        self.detections: dict[str, int] = {s.name: 0 for s in (*config.detectors,
                                                                *config.input_drift)}

    @property
    def feature_windows(self) -> set[str]:
        return {s.window for s in self.config.input_drift}

    def subscribe(self, callback) -> Any:
        return self.alerts.subscribe(callback)

    def observe(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Tidy rows (provisional and final): rules see all, detectors the final ones."""
        self.alerts.observe(rows)
        now = self.clock.now_ms()
        for spec, st, signal in self.detectors.observe(rows, now):
            self.detections[spec.name] += int(signal)
            for rule in self._det_rules.get(spec.name, ()):
                self.alerts.observe_detector(rule, st.series, self.detectors.verdict(spec, st),
                                             self.detectors.evidence(spec, st))

    def observe_features(self, window: str, start: int, end: int, series: Mapping[str, str],
                         sample: Mapping[str, np.ndarray], final: bool = True) -> None:
        for _, st in self.inputs.observe(window, start, end, series, sample, final):
            st.seen_at = self.clock.now_ms()

    def evaluate(self) -> list[Notification]:
        now = self.clock.now_ms()
        if now - self._pruned_at > 60_000:
            self._pruned_at = now
            self.detectors.prune(now)
            self.inputs.prune(now)
        for spec, st, fired in self.inputs.run():
            self.detections[spec.name] += int(fired)
            for rule in self._det_rules.get(spec.name, ()):
                self.alerts.observe_detector(rule, st.group, self.inputs.verdict(spec, st),
                                             self.inputs.evidence(spec, st))
        return self.alerts.evaluate()

    def status(self) -> dict[str, Any]:
        now = self.clock.now_ms()
        return {"alerts": self.alerts.active(), "detectors": self.detectors.status(now),
                "input_drift": self.inputs.status(now)}

    #: the version of :meth:`to_dict`'s layout; another version is not restored
    STATE_VERSION = 1

    def to_dict(self) -> dict[str, Any]:
        """Everything the watcher learned (alert instances, detectors, input-drift
        references, counts) as JSON-able data: no code, no pickles."""
        return {"version": self.STATE_VERSION, "alerts": self.alerts.to_dict(),
                "detectors": self.detectors.to_dict(), "input_drift": self.inputs.to_dict(),
                "detections": dict(self.detections), "pruned_at": self._pruned_at}

    def restore(self, data: Mapping[str, Any]) -> dict[str, int]:
        """Take back :meth:`to_dict`'s data (a restarted publisher); parts whose rule or
        spec changed since start over.  Returns what was restored, by part."""
        if data.get("version") != self.STATE_VERSION:
            raise ValueError(f"watcher state version {data.get('version')!r} is not "
                             f"{self.STATE_VERSION}")
        for name, n in data.get("detections", {}).items():
            if name in self.detections:
                self.detections[name] = int(n)
        self._pruned_at = int(data.get("pruned_at", self._pruned_at))
        return {"alerts": self.alerts.restore(data.get("alerts", {})),
                "detectors": self.detectors.restore(data.get("detectors", {})),
                "input_drift": self.inputs.restore(data.get("input_drift", {}))}
