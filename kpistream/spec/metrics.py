"""Metric definitions: ``configs/metrics.yaml`` read into frozen specs (:class:`MetricsFile` ->
:class:`EngineConfig`).  Every key with its default: README, "Configuration".
"""

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Mapping

from pydantic import Field

from kpistream.errors import ConfigError
from kpistream.spec.common import (MISSING, Spec, check, format_duration, integer, items,
                                   non_empty, optional, parse, parse_duration, read_yaml,
                                   validated)

__all__ = ["FAMILIES", "WindowSpec", "EngineConfig", "load_config", "config_from_dict",
           "read_yaml", "parse_duration", "format_duration"]

FAMILIES: tuple[str, ...] = (
    "traffic", "latency", "classification", "regression", "ranking", "feedback", "cost",
    "paired", "features")


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


# ------------------------------------------------------------------ the file's spec
Duration = Annotated[Any, optional(parse_duration)]


def _window_type(v: Any, data: Mapping[str, Any]) -> str:
    kind = None if v is MISSING else v
    if kind not in ("tumbling", "sliding", "count"):
        raise ConfigError("", f"must be tumbling, sliding or count, got {kind!r}")
    return kind


def _window_size(v: Any, data: Mapping[str, Any]) -> Any:
    if not validated(data, "type"):
        return MISSING
    if v is MISSING:
        raise ConfigError("", "missing")
    if data["type"] == "count":
        return integer(v, "")
    size = parse_duration(v, "")
    if size <= 0:
        raise ConfigError("", "must be positive")
    return size


def _window_step(v: Any, data: Mapping[str, Any]) -> Any:
    if not validated(data, "type", "size"):
        return MISSING
    kind, size = data["type"], data["size"]
    if kind == "count":
        if v is not MISSING and v != size:
            raise ConfigError("", "count windows are tumbling: omit step")
        return size
    if kind == "sliding":
        if v is MISSING:
            raise ConfigError("", "missing (sliding windows need a step)")
        step = parse_duration(v, "")
        if step <= 0 or step > size or size % step:
            raise ConfigError("", f"must be positive and divide size ({size} ms), got {step} ms")
        return step
    if v is not MISSING:
        raise ConfigError("", "tumbling windows take no step")
    return size


def _window_name(v: Any, data: Mapping[str, Any]) -> Any:
    if not validated(data, "type", "size", "step"):
        return MISSING
    kind, size = data["type"], data["size"]
    name = (None if v is MISSING else v) or (str(size) if kind == "count"
                                               else format_duration(size))
    if not isinstance(name, str):
        raise ConfigError("", "must be a string")
    return name


class WindowModel(Spec):
    """One entry of ``windows``; its checks run in this order (type, size, step, name)."""

    type: Annotated[Any, check(_window_type)] = MISSING
    size: Annotated[Any, check(_window_size)] = MISSING
    step: Annotated[Any, check(_window_step)] = MISSING
    name: Annotated[Any, check(_window_name)] = MISSING

    def spec(self) -> WindowSpec:
        return WindowSpec(self.name, self.type, self.size, self.step)


def _version(what: str):
    def fn(v: Any, data: Mapping[str, Any]) -> int:
        if v is MISSING:
            return 1
        if v != 1:
            raise ConfigError("", f"unsupported {what} {v!r} (expected 1)")
        return 1
    return check(fn)


def _windows(v: Any, data: Mapping[str, Any]) -> Any:
    if v is MISSING:
        return v
    non_empty(v, "", "expected a non-empty list of windows")
    windows = tuple(w.spec() for w in items(WindowModel, v))
    names = [w.name for w in windows]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError("", f"duplicate window name(s): {', '.join(sorted(dup))}")
    return windows


def _segments(v: Any, data: Mapping[str, Any]) -> Any:
    if v is MISSING:
        return v
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise ConfigError("", "expected a list of segment key names")
    from kpistream.wire.batch import BASE_LABELS

    bad = [x for x in v if x in BASE_LABELS or x in ("metric", "window")]
    if bad:
        raise ConfigError("", f"{bad[0]!r} clashes with a built-in label")
    return tuple(v)


def _families(v: Any, data: Mapping[str, Any]) -> Any:
    if v is MISSING:
        return v
    non_empty(v, "", "expected a non-empty list")
    for i, f in enumerate(v):
        if f not in FAMILIES:
            raise ConfigError(f"[{i}]", f"unknown family {f!r} (known: {', '.join(FAMILIES)})")
    return tuple(dict.fromkeys(v))


def _positive_label(v: Any, data: Mapping[str, Any]) -> Any:
    if v is MISSING or v is None:
        return v
    from kpistream.wire.batch import canonical_label

    try:
        return canonical_label(v)
    except TypeError:
        raise ConfigError("", f"expected a label (string, integer or boolean), got {v!r}") from None


def _relative_accuracy(v: Any, data: Mapping[str, Any]) -> Any:
    if v is MISSING:
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0001 <= v <= 0.2:
        raise ConfigError("", f"expected a number in [0.0001, 0.2], got {v!r}")
    return float(v)


def _variant(v: Any, data: Mapping[str, Any]) -> Any:
    if v is not MISSING and (not isinstance(v, str) or not v):
        raise ConfigError("", f"expected a variant name (a non-empty string), got {v!r}")
    return v


class TimeSection(Spec):
    lateness: Duration = MISSING
    label_delay: Duration = MISSING
    max_future: Duration = MISSING


class SeriesSection(Spec):
    segments: Annotated[Any, check(_segments)] = MISSING
    max_series: Annotated[Any, optional(integer)] = MISSING


class JoinSection(Spec):
    max_pending: Annotated[Any, optional(integer, lo=16)] = MISSING
    max_feedback: Annotated[Any, optional(integer, lo=16)] = MISSING
    max_paired: Annotated[Any, optional(integer, lo=16)] = MISSING


class ClassificationSection(Spec):
    positive_label: Annotated[Any, check(_positive_label)] = MISSING
    max_classes: Annotated[Any, optional(integer, 2, 4096)] = MISSING


class RankingSection(Spec):
    k: Annotated[Any, optional(integer, 1, 1000)] = MISSING


class LatencySection(Spec):
    relative_accuracy: Annotated[Any, check(_relative_accuracy)] = MISSING


class PairedSection(Spec):
    primary_variant: Annotated[Any, check(_variant)] = MISSING


class FeaturesSection(Spec):
    sample_size: Annotated[Any, optional(integer, 1, 65536)] = MISSING
    max_features: Annotated[Any, optional(integer, 1, 256)] = MISSING


class MetricsSection(Spec):
    families: Annotated[Any, check(_families)] = MISSING
    classification: ClassificationSection = Field(default_factory=dict)
    ranking: RankingSection = Field(default_factory=dict)
    latency: LatencySection = Field(default_factory=dict)
    paired: PairedSection = Field(default_factory=dict)
    features: FeaturesSection = Field(default_factory=dict)


class MetricsFile(Spec):
    """``configs/metrics.yaml``; checked in this order, each section's keys first."""

    version: Annotated[Any, _version("config version")] = MISSING
    time: TimeSection = Field(default_factory=dict)
    windows: Annotated[Any, check(_windows)] = MISSING
    series: SeriesSection = Field(default_factory=dict)
    join: JoinSection = Field(default_factory=dict)
    metrics: MetricsSection = Field(default_factory=dict)

    def config(self) -> EngineConfig:
        """The :class:`EngineConfig`: the keys given, the rest its defaults."""
        t, s, m = self.time.given(), self.series.given(), self.metrics
        kw: dict[str, Any] = {f"{k}_ms": v for k, v in t.items()}
        if self.windows is not MISSING:
            kw["windows"] = self.windows
        kw.update(s)
        kw.update(self.join.given())
        if m.families is not MISSING:
            kw["families"] = m.families
        kw.update(m.classification.given())
        kw.update(m.ranking.given())
        kw.update(m.latency.given())
        kw.update(m.paired.given())
        kw.update({("feature_sample_size" if k == "sample_size" else k): v
                   for k, v in m.features.given().items()})
        return EngineConfig(**kw)


def load_config(source: str | Path | Mapping[str, Any] | None = None) -> EngineConfig:
    """An :class:`EngineConfig` from a YAML path, a mapping, or None (the defaults)."""
    if source is None:
        return EngineConfig()
    if isinstance(source, (str, Path)):
        return config_from_dict(read_yaml(source))
    return config_from_dict(source)


def config_from_dict(raw: Mapping[str, Any]) -> EngineConfig:
    """An :class:`EngineConfig` from a mapping (the YAML's content); errors name the key path."""
    return parse(MetricsFile, raw).config()
