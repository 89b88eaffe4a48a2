"""Metric definitions: ``configs/metrics.yaml`` read into frozen specs.

Every key is checked: an unknown key, a wrong type or an impossible value
raises :class:`~kpistream.errors.ConfigError` naming the dotted key path and
the reason.  Durations are written ``500ms``, ``10s``, ``5m``, ``1h``, ``1d``
or as integer milliseconds; time inside the engine is integer epoch
milliseconds everywhere (no float drift).

The file (all keys optional; shown with the defaults)::

    version: 1
    time:
      lateness: 5s          # watermark = max event time seen - lateness
      label_delay: 60s      # quality windows wait this long for feedback (join TTL)
      max_future: 5m        # events further ahead of the clock are rejected
    windows:                # event-time windows, half-open [start, end)
      - {name: 10s, type: tumbling, size: 10s}
      - {name: 1m, type: sliding, size: 60s, step: 10s}
      # - {name: 1k, type: count, size: 1000}   # every 1000 inferences of a series
    series:
      segments: []          # segment keys that become series labels
      max_series: 1000      # distinct series; the rest go to "__other__" (counted)
    join:
      max_pending: 1000000  # inferences kept for feedback (their event ids dedup them)
      max_feedback: 1000000 # feedback kept for inferences that arrive later (and dedup)
      max_paired: 1000000   # challenger inferences kept for pairing with the primary
    metrics:
      families: [traffic, latency, classification, regression, ranking, feedback, cost,
                 paired, features]
      classification: {positive_label: "1", max_classes: 64}
      ranking: {k: 10}
      latency: {relative_accuracy: 0.01}
      paired: {primary_variant: primary}   # every other variant of a model is a challenger
      features: {sample_size: 256, max_features: 64}  # bottom-k input sample per series, pane
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from kpistream.errors import ConfigError

FAMILIES: tuple[str, ...] = (
    "traffic", "latency", "classification", "regression", "ranking", "feedback", "cost",
    "paired", "features")

_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_DUR = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d)\s*$")


def parse_duration(value: Any, path: str) -> int:
    """Milliseconds from ``"10s"``-style strings or integer milliseconds."""
    if isinstance(value, bool):
        raise ConfigError(path, f"expected a duration like '10s', got {value!r}")
    if isinstance(value, int):
        ms = value
    elif isinstance(value, str) and (m := _DUR.match(value)):
        ms = int(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ConfigError(path, f"expected a duration like '500ms', '10s', '5m', '1h' or "
                                f"integer milliseconds, got {value!r}")
    if ms < 0:
        raise ConfigError(path, "must not be negative")
    return ms


def format_duration(ms: int) -> str:
    for unit in ("d", "h", "m", "s"):
        if ms and ms % _UNITS[unit] == 0:
            return f"{ms // _UNITS[unit]}{unit}"
    return f"{ms}ms"


@dataclass(frozen=True, slots=True)
class WindowSpec:
    """One window definition. ``size``/``step`` are ms for time windows, events for count."""

    name: str
    kind: str  # "tumbling" | "sliding" | "count"
    size: int
    step: int

    @property
    def is_time(self) -> bool:
        return self.kind != "count"


@dataclass(frozen=True, slots=True)
class EngineConfig:
    windows: tuple[WindowSpec, ...] = (
        WindowSpec("10s", "tumbling", 10_000, 10_000),
        WindowSpec("1m", "sliding", 60_000, 10_000),
    )
    lateness_ms: int = 5_000
    label_delay_ms: int = 60_000
    max_future_ms: int = 300_000
    segments: tuple[str, ...] = ()
    max_series: int = 1000
    max_pending: int = 1_000_000
    max_feedback: int = 1_000_000
    families: tuple[str, ...] = FAMILIES
    positive_label: str | None = "1"
    max_classes: int = 64
    k: int = 10
    relative_accuracy: float = 0.01
    primary_variant: str = "primary"
    max_paired: int = 1_000_000
    feature_sample_size: int = 256
    max_features: int = 64
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def pane_ms(self) -> int:
        """Pane length: the gcd of every time window's size and step.

        State is kept per pane; a sliding window is the merge of its panes, so
        a 60 s window hopping by 10 s costs no more state than the 10 s one.
        """
        g = 0
        for w in self.windows:
            if w.is_time:
                g = math.gcd(g, math.gcd(w.size, w.step))
        return g or 10_000

    @property
    def count_windows(self) -> tuple[WindowSpec, ...]:
        return tuple(w for w in self.windows if not w.is_time)

    def window(self, name: str) -> WindowSpec:
        for w in self.windows:
            if w.name == name:
                return w
        raise KeyError(name)


def _check_keys(d: Any, allowed: set[str], path: str) -> Mapping[str, Any]:
    if d is None:
        return {}
    if not isinstance(d, Mapping):
        raise ConfigError(path or "<root>", f"expected a mapping, got {type(d).__name__}")
    for k in d:
        if k not in allowed:
            raise ConfigError(f"{path}.{k}" if path else str(k),
                              f"unknown key (allowed: {', '.join(sorted(allowed))})")
    return d


def _int(v: Any, path: str, lo: int = 1, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(path, f"expected an integer, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        raise ConfigError(path, f"must be in [{lo}, {hi if hi is not None else 'inf'}], got {v}")
    return v


def _window(d: Any, path: str) -> WindowSpec:
    d = _check_keys(d, {"name", "type", "size", "step"}, path)
    kind = d.get("type")
    if kind not in ("tumbling", "sliding", "count"):
        raise ConfigError(f"{path}.type", f"must be tumbling, sliding or count, got {kind!r}")
    if "size" not in d:
        raise ConfigError(f"{path}.size", "missing")
    if kind == "count":
        size = _int(d["size"], f"{path}.size")
        if "step" in d and d["step"] != size:
            raise ConfigError(f"{path}.step", "count windows are tumbling: omit step")
        step = size
    else:
        size = parse_duration(d["size"], f"{path}.size")
        if size <= 0:
            raise ConfigError(f"{path}.size", "must be positive")
        if kind == "sliding":
            if "step" not in d:
                raise ConfigError(f"{path}.step", "missing (sliding windows need a step)")
            step = parse_duration(d["step"], f"{path}.step")
            if step <= 0 or step > size or size % step:
                raise ConfigError(f"{path}.step", f"must be positive and divide size ({size} ms), "
                                                  f"got {step} ms")
        else:
            if "step" in d:
                raise ConfigError(f"{path}.step", "tumbling windows take no step")
            step = size
    name = d.get("name") or (str(size) if kind == "count" else format_duration(size))
    if not isinstance(name, str):
        raise ConfigError(f"{path}.name", "must be a string")
    return WindowSpec(name, kind, size, step)


def load_config(source: str | Path | Mapping[str, Any] | None = None) -> EngineConfig:
    """An :class:`EngineConfig` from a YAML path, a mapping, or None (the defaults)."""
    if source is None:
        return EngineConfig()
    if isinstance(source, (str, Path)):
        return config_from_dict(read_yaml(source))
    return config_from_dict(source)


def read_yaml(path: str | Path) -> Any:
    """A YAML file's content ({} when empty); a missing or broken file is a ConfigError."""
    import yaml

    p = Path(path)
    try:
        return yaml.safe_load(p.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(str(p), "file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(str(p), f"not valid YAML: {e}") from None


def config_from_dict(raw: Mapping[str, Any]) -> EngineConfig:
    d = _check_keys(raw, {"version", "time", "windows", "series", "join", "metrics"}, "")
    if d.get("version", 1) != 1:
        raise ConfigError("version", f"unsupported config version {d.get('version')!r} (expected 1)")
    kw: dict[str, Any] = {}
    t = _check_keys(d.get("time"), {"lateness", "label_delay", "max_future"}, "time")
    for key, attr in (("lateness", "lateness_ms"), ("label_delay", "label_delay_ms"),
                      ("max_future", "max_future_ms")):
        if key in t:
            kw[attr] = parse_duration(t[key], f"time.{key}")
    if "windows" in d:
        ws = d["windows"]
        if not isinstance(ws, list) or not ws:
            raise ConfigError("windows", "expected a non-empty list of windows")
        windows = tuple(_window(w, f"windows[{i}]") for i, w in enumerate(ws))
        names = [w.name for w in windows]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError("windows", f"duplicate window name(s): {', '.join(sorted(dup))}")
        kw["windows"] = windows
    s = _check_keys(d.get("series"), {"segments", "max_series"}, "series")
    if "segments" in s:
        segs = s["segments"]
        if not isinstance(segs, list) or not all(isinstance(x, str) and x for x in segs):
            raise ConfigError("series.segments", "expected a list of segment key names")
        from kpistream.wire.batch import BASE_LABELS

        bad = [x for x in segs if x in BASE_LABELS or x in ("metric", "window")]
        if bad:
            raise ConfigError("series.segments", f"{bad[0]!r} clashes with a built-in label")
        kw["segments"] = tuple(segs)
    if "max_series" in s:
        kw["max_series"] = _int(s["max_series"], "series.max_series")
    j = _check_keys(d.get("join"), {"max_pending", "max_feedback", "max_paired"}, "join")
    for key in ("max_pending", "max_feedback", "max_paired"):
        if key in j:
            kw[key] = _int(j[key], f"join.{key}", lo=16)
    m = _check_keys(d.get("metrics"), {"families", "classification", "ranking", "latency",
                                       "paired", "features"}, "metrics")
    if "families" in m:
        fam = m["families"]
        if not isinstance(fam, list) or not fam:
            raise ConfigError("metrics.families", "expected a non-empty list")
        for i, f in enumerate(fam):
            if f not in FAMILIES:
                raise ConfigError(f"metrics.families[{i}]",
                                  f"unknown family {f!r} (known: {', '.join(FAMILIES)})")
        kw["families"] = tuple(dict.fromkeys(fam))
    c = _check_keys(m.get("classification"), {"positive_label", "max_classes"},
                    "metrics.classification")
    if "positive_label" in c:
        from kpistream.wire.batch import canonical_label

        pl = c["positive_label"]
        try:
            kw["positive_label"] = None if pl is None else canonical_label(pl)
        except TypeError:
            raise ConfigError("metrics.classification.positive_label",
                              f"expected a label (string, integer or boolean), got {pl!r}") from None
    if "max_classes" in c:
        kw["max_classes"] = _int(c["max_classes"], "metrics.classification.max_classes", 2, 4096)
    r = _check_keys(m.get("ranking"), {"k"}, "metrics.ranking")
    if "k" in r:
        kw["k"] = _int(r["k"], "metrics.ranking.k", 1, 1000)
    lat = _check_keys(m.get("latency"), {"relative_accuracy"}, "metrics.latency")
    if "relative_accuracy" in lat:
        a = lat["relative_accuracy"]
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0001 <= a <= 0.2:
            raise ConfigError("metrics.latency.relative_accuracy",
                              f"expected a number in [0.0001, 0.2], got {a!r}")
        kw["relative_accuracy"] = float(a)
    pr = _check_keys(m.get("paired"), {"primary_variant"}, "metrics.paired")
    if "primary_variant" in pr:
        pv = pr["primary_variant"]
        if not isinstance(pv, str) or not pv:
            raise ConfigError("metrics.paired.primary_variant",
                              f"expected a variant name (a non-empty string), got {pv!r}")
        kw["primary_variant"] = pv
    fe = _check_keys(m.get("features"), {"sample_size", "max_features"}, "metrics.features")
    if "sample_size" in fe:
        kw["feature_sample_size"] = _int(fe["sample_size"], "metrics.features.sample_size", 1, 65536)
    if "max_features" in fe:
        kw["max_features"] = _int(fe["max_features"], "metrics.features.max_features", 1, 256)
    return EngineConfig(**kw)
