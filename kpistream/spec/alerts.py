"""``configs/alerts.yaml``: alert rules (:class:`RulesFile`) and the watcher's detectors,
input drift and webhooks (:class:`AlertsFile`), checked key by key in file order.

The KPI names come in the validation context (:class:`Kpis`), from the module that owns them.
"""

import os
import string
from dataclasses import dataclass
from typing import Annotated, Any, Mapping

from pydantic import Field, model_validator

from kpistream.errors import ConfigError
from kpistream.spec.common import (MISSING, NAME, SiblingError, Spec, check, check_ctx, default,
                                   finite, integer, items, label_map, object_name, parse_duration,
                                   positive_duration, spec_error, sub, text, window_name)

__all__ = ["Kpis", "OPS", "DETECTOR_TYPES", "RulesFile", "RuleModel", "DetectorModel",
           "InputDriftModel", "WebhookModel", "AlertsFile"]

#: Threshold comparisons, in the order error messages list them.
OPS: tuple[str, ...] = ("<", "<=", ">", ">=", "==", "!=")
DETECTOR_TYPES: tuple[str, ...] = ("cusum", "ewma", "page_hinkley", "adwin")


@dataclass(frozen=True)
class Kpis:
    """What the checks need to know about KPIs (the validation context)."""

    names: tuple[str, ...]
    quality: frozenset[str]
    rates: frozenset[str]
    higher_is_better: frozenset[str] = frozenset()


def _kpis(ctx: Any) -> Kpis:
    return ctx["kpis"]


# ------------------------------------------------------------------ conditions
# Each form is a model; the result is the keyword arguments of rules.Condition.

class _ThresholdCond(Spec):
    op: Annotated[Any, check(lambda v, d: _op(v))] = MISSING
    value: Annotated[Any, check(lambda v, d: _required_finite(v))] = MISSING

    def condition(self) -> dict[str, Any]:
        return {"kind": "threshold", "op": self.op, "value": self.value}


def _op(v: Any) -> str:
    v = None if v is MISSING else v
    if not isinstance(v, str) or v not in OPS:
        raise ConfigError("", f"expected one of {', '.join(OPS)}, got {v!r}")
    return v


def _required_finite(v: Any) -> float:
    if v is MISSING:
        raise ConfigError("", "missing")
    return finite(v, "")


def _baseline(v: Any, data: Mapping[str, Any], ctx: Any) -> Any:
    if v is not MISSING:
        base = parse_duration(v, "")
    elif ctx.get("default_baseline") is not None:
        base = ctx["default_baseline"]
    else:
        raise ConfigError("", "missing (a duration like '1h')")
    if base <= 0:
        raise ConfigError("", "must be positive")
    return base


def _ratio(hi: float | None):
    def fn(v: Any, data: Mapping[str, Any]) -> float:
        ratio = finite(v, "", 0.0, hi)
        if ratio <= 0:
            raise ConfigError("", "must be positive")
        return ratio
    return check(fn)


class _DropCond(Spec):
    relative_drop: Annotated[Any, _ratio(1.0)] = MISSING
    baseline: Annotated[Any, check_ctx(_baseline)] = MISSING

    def condition(self) -> dict[str, Any]:
        return {"kind": "relative_drop", "ratio": self.relative_drop, "baseline_ms": self.baseline}


class _RiseCond(Spec):
    relative_rise: Annotated[Any, _ratio(None)] = MISSING
    baseline: Annotated[Any, check_ctx(_baseline)] = MISSING

    def condition(self) -> dict[str, Any]:
        return {"kind": "relative_rise", "ratio": self.relative_rise, "baseline_ms": self.baseline}


def _across(v: Any, data: Mapping[str, Any], ctx: Any) -> str:
    if v is MISSING:
        v = ctx.get("default_across")
    if v is None:
        raise ConfigError("", "missing (the segment label to compare across)")
    v = text(v, "")
    if not NAME.match(v) or v in ("window", "metric"):
        raise ConfigError("", f"not a series label name: {v!r}")
    return v


def _alpha(v: Any, data: Mapping[str, Any]) -> Any:
    if v is MISSING:
        return None
    alpha = finite(v, "", 0.0, 1.0)
    if not 0 < alpha < 1:
        raise ConfigError("", "must be in (0, 1)")
    return alpha


class _DisparityCond(Spec):
    disparity: Annotated[Any, check(lambda v, d: finite(v, "", 0.0))] = MISSING
    across: Annotated[Any, check_ctx(_across)] = MISSING
    alpha: Annotated[Any, check(_alpha)] = MISSING

    def condition(self) -> dict[str, Any]:
        return {"kind": "disparity", "value": self.disparity, "across": self.across,
                "alpha": self.alpha}


class _DetectorCond(Spec):
    detector: Annotated[Any, check(lambda v, d: text(None if v is MISSING else v, ""))] = MISSING

    def condition(self) -> dict[str, Any]:
        return {"kind": "detector", "detector": self.detector}


def _condition(d: Any, ctx: Any) -> dict[str, Any]:
    """One condition (``{op, value}``, ``{relative_drop | relative_rise, baseline}``,
    ``{disparity, across, alpha}`` or ``{detector}``); the form is chosen by its keys."""
    if not isinstance(d, Mapping):
        raise ConfigError("", "expected a mapping: {op, value}, {relative_drop, baseline}, "
                              "{relative_rise, baseline}, {disparity, across} or {detector}")
    for key, model in (("disparity", _DisparityCond), ("detector", _DetectorCond),
                       ("relative_drop", _DropCond), ("relative_rise", _RiseCond)):
        if key in d:
            return sub(model, d, "", ctx).condition()
    return sub(_ThresholdCond, d, "", ctx).condition()


# ------------------------------------------------------------------ rules
def _rule_name(v: Any, data: Mapping[str, Any]) -> str:
    if v is MISSING:
        raise ConfigError("", "missing")
    v = text(v, "")
    if not NAME.match(v):
        raise ConfigError("", f"must match [A-Za-z_][A-Za-z0-9_]*, got {v!r}")
    return v


def _rule_condition(v: Any, data: Mapping[str, Any], ctx: Any) -> Any:
    if v is MISSING:
        raise ConfigError("", "missing")
    return _condition(v, ctx)


def _needed(v: Any, data: Mapping[str, Any]) -> bool:
    """Whether a metric / window is checked: always but for detector rules that omit it."""
    return data["condition"]["kind"] != "detector" or v is not MISSING


def _metric(v: Any, data: Mapping[str, Any], ctx: Any) -> Any:
    if "condition" not in data:
        return MISSING
    if not _needed(v, data):
        return None
    if v is MISSING:
        raise ConfigError("", "missing")
    kpis = _kpis(ctx).names
    if v not in kpis:
        raise ConfigError("", f"unknown KPI {v!r} (known: {', '.join(kpis)})")
    return v


def _window(v: Any, data: Mapping[str, Any]) -> Any:
    if "condition" not in data:
        return MISSING
    if not _needed(v, data):
        return None
    if v is MISSING:
        raise ConfigError("", "missing (a window name such as '10s' or '1m')")
    return text(str(v) if isinstance(v, int) and not isinstance(v, bool) else v, "")


def _clear(v: Any, data: Mapping[str, Any], ctx: Any) -> Any:
    """The clear condition (MISSING: the negated condition)."""
    if v is MISSING or "condition" not in data:
        return MISSING
    cond = data["condition"]
    if cond["kind"] == "detector":
        raise ConfigError("", "detector rules clear when the detector stops firing")
    clear = _condition(v, {**ctx, "default_baseline": cond.get("baseline_ms"),
                           "default_across": cond.get("across")})
    kinds = (clear["kind"], cond["kind"])
    same = (kinds[0] == kinds[1] if "disparity" in kinds
            else (kinds[0] == "threshold") == (kinds[1] == "threshold"))
    if clear["kind"] == "detector" or not same:
        raise ConfigError("", f"must be of the same form as the condition ({cond['kind']})")
    if clear["kind"] == "disparity":
        if clear["across"] != cond["across"]:
            raise ConfigError("across", "must equal the condition's")
        if clear["value"] > cond["value"]:
            raise ConfigError("disparity", "must not exceed the condition's bound (hysteresis)")
    elif clear["kind"] != "threshold" and clear["baseline_ms"] != cond["baseline_ms"]:
        raise ConfigError("baseline", "must equal the condition's baseline")
    return clear


def _coverage(v: Any, data: Mapping[str, Any], ctx: Any) -> Any:
    if v is MISSING or "metric" not in data:
        return None
    quality = _kpis(ctx).quality
    if data["metric"] not in quality:
        raise ConfigError("", f"only for quality metrics ({', '.join(sorted(quality))})")
    return finite(v, "", 0.0, 1.0)


def _group_by(v: Any, data: Mapping[str, Any], ctx: Any) -> Any:
    if "condition" not in data or "metric" not in data:
        return MISSING
    cond, metric, rates = data["condition"], data["metric"], _kpis(ctx).rates
    # (the significance check of a disparity comes here, after severity, as it always did)
    if cond["kind"] == "disparity" and cond["alpha"] is not None and metric not in rates:
        raise SiblingError("condition.alpha",
                          f"significance needs a rate KPI ({', '.join(sorted(rates))})")
    if v is MISSING:
        return None
    if not isinstance(v, list) or not all(isinstance(x, str) and NAME.match(x) for x in v):
        raise ConfigError("", "expected a list of label names")
    if any(x in ("window", "metric") for x in v) or len(set(v)) != len(v):
        raise ConfigError("", "labels must be distinct series labels")
    if cond["kind"] == "disparity" and cond["across"] in v:
        raise ConfigError("", f"must not hold the disparity label {cond['across']!r}")
    return tuple(v)


def _annotations(v: Any, data: Mapping[str, Any]) -> Any:
    out = label_map(None if v is MISSING else v, "", names=False)
    for k, tmpl in out:
        try:
            list(string.Formatter().parse(tmpl))
        except ValueError as e:
            raise ConfigError(k, f"bad template: {e}") from None
    return out


class RuleModel(Spec):
    """One entry of ``rules``; the keys are checked in this order."""

    name: Annotated[Any, check(_rule_name)] = MISSING
    condition: Annotated[Any, check_ctx(_rule_condition)] = MISSING
    metric: Annotated[Any, check_ctx(_metric)] = MISSING
    window: Annotated[Any, check(_window)] = MISSING
    clear: Annotated[Any, check_ctx(_clear)] = MISSING
    for_: Annotated[Any, default(0, parse_duration)] = Field(MISSING, alias="for")
    min_count: Annotated[Any, default(30, integer, lo=0)] = MISSING
    min_label_coverage: Annotated[Any, check_ctx(_coverage)] = MISSING
    severity: Annotated[Any, default("warning", text)] = MISSING
    group_by: Annotated[Any, check_ctx(_group_by)] = MISSING
    annotations: Annotated[Any, check(_annotations)] = MISSING
    stale_after: Annotated[Any, default("5m", positive_duration)] = MISSING
    match: Annotated[Any, default(None, label_map)] = MISSING
    labels: Annotated[Any, default(None, label_map)] = MISSING


def _rules(v: Any, data: Mapping[str, Any], ctx: Any) -> Any:
    if v is MISSING:
        v = []
    if not isinstance(v, list):
        raise ConfigError("", "expected a list of rules")
    rules = items(RuleModel, v, ctx)
    seen: dict[str, int] = {}
    for i, r in enumerate(rules):
        if r.name in seen:
            raise ConfigError(f"[{i}].name", f"duplicate rule name {r.name!r} "
                                             f"(also rules[{seen[r.name]}])")
        seen[r.name] = i
    return rules


def _alerts_version(v: Any, data: Mapping[str, Any]) -> int:
    if v is not MISSING and v != 1:
        raise ConfigError("", f"unsupported alerts version {v!r} (expected 1)")
    return 1


class RulesFile(Spec):
    """The ``rules`` of an alerts file (its other sections are :class:`AlertsFile`'s).
    Parse with ``context={"kpis": Kpis(...)}``."""

    other_keys = frozenset(("detectors", "input_drift", "notifications"))

    version: Annotated[Any, check(_alerts_version)] = MISSING
    rules: Annotated[Any, check_ctx(_rules)] = MISSING


# ------------------------------------------------------------------ detectors
def _det_type(v: Any, data: Mapping[str, Any]) -> str:
    if v not in DETECTOR_TYPES:
        raise ConfigError("", f"expected one of {', '.join(DETECTOR_TYPES)}, got {v!r}")
    return v


def _det_metric(v: Any, data: Mapping[str, Any], ctx: Any) -> str:
    if v not in _kpis(ctx).names:
        raise ConfigError("", f"unknown KPI {v!r}")
    return v


def _direction(v: Any, data: Mapping[str, Any], ctx: Any) -> Any:
    if "metric" not in data:
        return MISSING
    if v is MISSING:
        v = "down" if data["metric"] in _kpis(ctx).higher_is_better else "up"
    if v not in ("up", "down", "both"):
        raise ConfigError("", f"expected up, down or both, got {v!r}")
    return v


def _shift(v: Any, data: Mapping[str, Any]) -> Any:
    if data.get("type") not in ("cusum", "ewma"):
        return None
    if data["type"] == "cusum" or v is not MISSING:
        if v is MISSING:
            raise ConfigError("", "missing (the size of change to detect, in the KPI's units)")
        shift = finite(v, "", 0.0)
        if shift <= 0:
            raise ConfigError("", "must be > 0")
        return shift
    return None


def _optional_num(lo: float | None = None, positive: bool = False):
    def fn(v: Any, data: Mapping[str, Any]) -> Any:
        if v is MISSING or v is None:
            return None
        x = finite(v, "", lo)
        if positive and x <= 0:
            raise ConfigError("", "must be > 0")
        return x
    return check(fn)


def _lam(v: Any, data: Mapping[str, Any]) -> float:
    lam = finite(0.2 if v is MISSING else v, "", 0.0, 1.0)
    if lam <= 0:
        raise ConfigError("", "must be in (0, 1]")
    return lam


class DetectorModel(Spec):
    """One entry of ``detectors``; the keys are checked in this order."""

    required = ("name", "type", "metric", "window")

    name: Annotated[Any, check(lambda v, d: object_name(v, ""))] = MISSING
    type: Annotated[Any, check(_det_type)] = MISSING
    metric: Annotated[Any, check_ctx(_det_metric)] = MISSING
    direction: Annotated[Any, check_ctx(_direction)] = MISSING
    shift: Annotated[Any, check(_shift)] = MISSING
    false_alarm_every: Annotated[Any, default("30d", positive_duration)] = MISSING
    target: Annotated[Any, _optional_num()] = MISSING
    sigma: Annotated[Any, _optional_num(0.0, positive=True)] = MISSING
    lam: Annotated[Any, check(_lam)] = MISSING
    delta: Annotated[Any, default(0.002, finite, 0.0)] = MISSING
    window: Annotated[Any, check(lambda v, d: window_name(v, ""))] = MISSING
    match: Annotated[Any, default(None, label_map)] = MISSING
    warmup: Annotated[Any, default(30, integer, lo=2)] = MISSING
    guard: Annotated[Any, default(2.0, finite, 0.0, 10.0)] = MISSING
    min_count: Annotated[Any, default(30, integer, lo=1)] = MISSING
    threshold: Annotated[Any, default(50.0, finite, 0.0)] = MISSING
    hold: Annotated[Any, default("2m", parse_duration)] = MISSING

    def spec_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``DetectorSpec``."""
        return dict(name=self.name, type=self.type, metric=self.metric, window=self.window,
                    match=self.match, direction=self.direction, shift=self.shift,
                    false_alarm_every_ms=self.false_alarm_every, target=self.target,
                    sigma=self.sigma, warmup=self.warmup, guard=self.guard,
                    min_count=self.min_count, lam=self.lam,
                    delta=self.delta if self.delta > 0 else 0.002, threshold=self.threshold,
                    hold_ms=self.hold)


# ------------------------------------------------------------------ input drift
def _drift_group_by(v: Any, data: Mapping[str, Any]) -> tuple[str, ...]:
    v = ["model", "model_version", "variant"] if v is MISSING else v
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ConfigError("", "expected a list of label names")
    return tuple(v)


def _drift_alpha(v: Any, data: Mapping[str, Any]) -> float:
    alpha = finite(0.01 if v is MISSING else v, "", 0.0, 1.0)
    if not 0 < alpha < 1:
        raise ConfigError("", "must be in (0, 1)")
    return alpha


def _features(v: Any, data: Mapping[str, Any]) -> Any:
    if v is MISSING or v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(f, str) for f in v):
        raise ConfigError("", "expected a list of feature names")
    return tuple(v)


class PsiSection(Spec):
    bins: Annotated[Any, default(10, integer, lo=2)] = MISSING
    floor: Annotated[Any, default(0.1, finite, 0.0)] = MISSING


class InputDriftModel(Spec):
    """One entry of ``input_drift``; the keys are checked in this order (``psi`` with its
    values: they used to be checked after ``min_effect``)."""

    required = ("name", "window")

    group_by: Annotated[Any, check(_drift_group_by)] = MISSING
    psi: Annotated[Any, check(lambda v, d: sub(PsiSection, None if v is MISSING else v or {}))] = \
        MISSING
    alpha: Annotated[Any, check(_drift_alpha)] = MISSING
    features: Annotated[Any, check(_features)] = MISSING
    reference: Annotated[Any, default("2m", positive_duration)] = MISSING
    name: Annotated[Any, check(lambda v, d: object_name(v, ""))] = MISSING
    window: Annotated[Any, check(lambda v, d: window_name(v, ""))] = MISSING
    match: Annotated[Any, default(None, label_map)] = MISSING
    max_reference: Annotated[Any, default(4096, integer, lo=10)] = MISSING
    min_effect: Annotated[Any, default(0.1, finite, 0.0, 1.0)] = MISSING
    min_samples: Annotated[Any, default(50, integer, lo=2)] = MISSING
    hold: Annotated[Any, default("1m", parse_duration)] = MISSING

    def spec_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``InputDriftSpec``."""
        return dict(name=self.name, window=self.window, match=self.match,
                    group_by=self.group_by, reference_ms=self.reference,
                    max_reference=self.max_reference, alpha=self.alpha,
                    min_effect=self.min_effect, psi_bins=self.psi.bins,
                    psi_floor=self.psi.floor, min_samples=self.min_samples, hold_ms=self.hold,
                    features=self.features)


# ------------------------------------------------------------------ webhooks
def _url(v: Any, data: Mapping[str, Any]) -> str:
    if not isinstance(v, str) or not v:
        raise ConfigError("", "missing (an http:// or https:// URL)")
    url = os.path.expandvars(v)
    if not url.startswith(("http://", "https://")):
        raise ConfigError("", f"expected an http(s) URL, got {url!r}")
    return url


_STATES = ("pending", "firing", "resolved", "inactive")


def _states(v: Any, data: Mapping[str, Any]) -> tuple[str, ...]:
    v = ["firing", "resolved"] if v is MISSING else v
    if not isinstance(v, list) or not v or any(s not in _STATES for s in v):
        raise ConfigError("", f"expected a list of {', '.join(_STATES)}")
    return tuple(v)


def _seconds(value: str):
    """A duration in seconds (``value`` when not given)."""
    return check(lambda v, d: parse_duration(value if v is MISSING else v, "") / 1000)


class WebhookModel(Spec):
    """One entry of ``notifications.webhooks`` (``${ENV_VARS}`` in the URL and the header
    values are expanded)."""

    url: Annotated[Any, check(_url)] = MISSING
    states: Annotated[Any, check(_states)] = MISSING
    headers: Annotated[Any, default(None, label_map, names=False)] = MISSING
    timeout: Annotated[Any, _seconds("5s")] = MISSING
    retries: Annotated[Any, default(6, integer, lo=0)] = MISSING
    backoff: Annotated[Any, _seconds("1s")] = MISSING
    max_backoff: Annotated[Any, _seconds("1m")] = MISSING

    def spec_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``WebhookSpec``."""
        return dict(url=self.url, states=self.states, timeout_s=self.timeout,
                    retries=self.retries, backoff_s=self.backoff, max_backoff_s=self.max_backoff,
                    headers=tuple((k, os.path.expandvars(v)) for k, v in self.headers))


def _log(v: Any, data: Mapping[str, Any]) -> bool:
    v = True if v is MISSING else v
    if not isinstance(v, bool):
        raise ConfigError("", f"expected true or false, got {v!r}")
    return v


def _webhook_list(v: Any, data: Mapping[str, Any]) -> list:
    v = (None if v is MISSING else v) or []
    if not isinstance(v, list):
        raise ConfigError("", "expected a list")
    return v


class NotificationsSection(Spec):
    """``notifications``: the webhooks' entries are checked after ``log``."""

    webhooks: Annotated[Any, check(_webhook_list)] = MISSING
    log: Annotated[Any, check(_log)] = MISSING

    @model_validator(mode="after")
    def _entries(self) -> "NotificationsSection":
        try:
            self.__dict__["webhooks"] = items(WebhookModel, self.webhooks)
        except ConfigError as e:
            raise spec_error(e, "webhooks") from None
        return self


def _section_list(model: type[Spec]):
    def fn(v: Any, data: Mapping[str, Any], ctx: Any) -> tuple:
        v = (None if v is MISSING else v) or []
        if not isinstance(v, list):
            raise ConfigError("", "expected a list")
        return items(model, v, ctx)
    return check_ctx(fn)


class AlertsFile(RulesFile):
    """The whole of ``configs/alerts.yaml``: the rules, then detectors and input drift (names
    unique across both, every detector rule naming one of them), then notifications.
    Parse with ``context={"kpis": Kpis(...)}``."""

    other_keys = frozenset()

    detectors: Annotated[Any, _section_list(DetectorModel)] = MISSING
    input_drift: Annotated[Any, _section_list(InputDriftModel)] = MISSING
    notifications: Any = MISSING

    @model_validator(mode="after")
    def _cross_checks(self) -> "AlertsFile":
        try:
            names: dict[str, str] = {}
            for kind, specs in (("detectors", self.detectors), ("input_drift", self.input_drift)):
                for i, s in enumerate(specs):
                    if s.name in names:
                        raise ConfigError(f"{kind}[{i}].name", f"duplicate name {s.name!r} "
                                                               f"(also in {names[s.name]})")
                    names[s.name] = kind
            for i, r in enumerate(self.rules):
                det = r.condition["kind"] == "detector" and r.condition["detector"]
                if det and det not in names:
                    raise ConfigError(f"rules[{i}].condition.detector",
                                      f"no detector or input_drift named {det!r} "
                                      f"(known: {', '.join(sorted(names)) or 'none'})")
            n = self.notifications
            self.__dict__["notifications"] = sub(NotificationsSection,
                                                 (None if n is MISSING else n) or {},
                                                 "notifications")
        except ConfigError as e:
            raise spec_error(e) from None
        return self
