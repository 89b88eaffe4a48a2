"""``configs/canary.yaml``: the decision policy's keys (:class:`PolicyFile`) and the canary
controller's (:class:`CanaryFile`: experiments, retraining, actions), checked in file order."""

import math
from typing import Annotated, Any, Mapping

from pydantic import Field, model_validator

from kpistream.errors import ConfigError
from kpistream.spec.common import (MISSING, SiblingError, Spec, check, default, format_duration,
                                   integer, items, non_empty, optional, parse_duration,
                                   positive_duration, spec_error, sub, text)

__all__ = ["METRIC_NAMES", "ROLES", "MODES", "DEFAULT_MIN_DURATION_MS", "DEFAULT_MAX_DURATION_MS",
           "MetricModel", "PolicyFile", "ExperimentModel", "RetrainSection", "ActionsSection",
           "CanaryFile", "bounded"]

#: Compared metrics, in the policy's order (higher is better: accuracy, reward).
METRIC_NAMES: tuple[str, ...] = ("accuracy", "reward", "error_rate", "latency", "abs_error")
ROLES: tuple[str, ...] = ("quality", "guardrail")
MODES: tuple[str, ...] = ("shadow", "canary")
DEFAULT_MIN_DURATION_MS = 30 * 60_000
DEFAULT_MAX_DURATION_MS = 24 * 3_600_000


def bounded(v: Any, path: str, lo: float, hi: float, *, lo_open: bool = False,
            hi_open: bool = False) -> float:
    """A finite number in [lo, hi], either end optionally open."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(path, f"expected a number, got {v!r}")
    if v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
        raise ConfigError(path, f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}"
                                f"{')' if hi_open else ']'}, got {v!r}")
    return float(v)


def _one_of(choices: tuple[str, ...], fallback: Any = MISSING):
    def fn(v: Any, data: Mapping[str, Any]) -> Any:
        if v is MISSING:
            v = fallback
        if v not in choices:
            raise ConfigError("", f"must be one of {', '.join(choices)}, got {v!r}")
        return v
    return check(fn)


# ------------------------------------------------------------------ the policy
def _margin(v: Any, data: Mapping[str, Any]) -> float:
    if v is MISSING:
        raise ConfigError("", "missing (the non-inferiority margin, oriented units)")
    return bounded(v, "", 0.0, math.inf)


class MetricModel(Spec):
    """One entry of ``metrics``."""

    name: Annotated[Any, _one_of(METRIC_NAMES, None)] = MISSING
    margin: Annotated[Any, check(_margin)] = MISSING
    harm: Annotated[Any, default(0.0, bounded, 0.0, math.inf)] = MISSING
    role: Annotated[Any, _one_of(ROLES, "quality")] = MISSING


def _version(v: Any, data: Mapping[str, Any]) -> int:
    if v is not MISSING and v != 1:
        raise ConfigError("", f"unsupported version {v!r} (expected 1)")
    return 1


def _mode(v: Any, data: Mapping[str, Any]) -> Any:
    if v is not MISSING and v not in MODES:
        raise ConfigError("", f"must be one of {', '.join(MODES)}, got {v!r}")
    return v


def _max_duration(v: Any, data: Mapping[str, Any]) -> Any:
    if v is not MISSING:
        v = parse_duration(v, "")
        if v <= 0:
            raise ConfigError("", "must be positive")
    if "min_duration" in data:   # (it did not fail)
        mn = data["min_duration"]
        mn = DEFAULT_MIN_DURATION_MS if mn is MISSING else mn
        mx = DEFAULT_MAX_DURATION_MS if v is MISSING else v
        if mn > mx:
            raise SiblingError("min_duration",
                              f"must not exceed max_duration ({format_duration(mx)})")
    return v


def _metrics(v: Any, data: Mapping[str, Any]) -> Any:
    if v is MISSING:
        return v
    non_empty(v, "", "expected a non-empty list of metrics")
    rules = items(MetricModel, v)
    seen: set[str] = set()
    for i, r in enumerate(rules):
        if r.name in seen:
            raise ConfigError(f"[{i}].name", f"duplicate metric {r.name!r}")
        seen.add(r.name)
    return rules


class SrmSection(Spec):
    alpha: Annotated[Any, optional(bounded, 0.0, 0.5, lo_open=True)] = MISSING
    expected_share: Annotated[Any, check(
        lambda v, d: v if v is MISSING or v is None
        else bounded(v, "", 0.0, 1.0, lo_open=True, hi_open=True))] = MISSING
    concentration: Annotated[Any, optional(bounded, 0.0, math.inf, lo_open=True)] = MISSING


class PolicyFile(Spec):
    """The decision policy's keys of ``configs/canary.yaml`` (the controller's sections are
    :class:`CanaryFile`'s)."""

    other_keys = frozenset(("experiments", "retrain", "actions"))

    version: Annotated[Any, check(_version)] = MISSING
    alpha: Annotated[Any, optional(bounded, 0.0, 0.5, lo_open=True)] = MISSING
    mode: Annotated[Any, check(_mode)] = MISSING
    min_samples: Annotated[Any, optional(integer, lo=0)] = MISSING
    min_duration: Annotated[Any, optional(parse_duration)] = MISSING
    max_duration: Annotated[Any, check(_max_duration)] = MISSING
    target_samples: Annotated[Any, check(
        lambda v, d: v if v is MISSING or v is None else integer(v, "", lo=1))] = MISSING
    min_n: Annotated[Any, optional(integer, lo=2)] = MISSING
    srm: SrmSection = Field(default_factory=dict)
    metrics: Annotated[Any, check(_metrics)] = MISSING

    def policy_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``CanaryPolicy`` for the keys given (metrics as models)."""
        kw = self.given()
        kw.pop("version", None)
        for k in ("min_duration", "max_duration"):
            if k in kw:
                kw[f"{k}_ms"] = kw.pop(k)
        if kw.get("target_samples", 0) is None:
            del kw["target_samples"]
        kw.pop("srm", None)
        srm = self.srm.given()
        if srm.get("expected_share", 0) is None:
            del srm["expected_share"]
        kw.update({f"srm_{k}": v for k, v in srm.items()})
        return kw


# ------------------------------------------------------------------ the controller
def _required(v: Any, data: Mapping[str, Any]) -> Any:
    if v is MISSING:
        raise ConfigError("", "missing")
    return v


def _steps(v: Any, data: Mapping[str, Any]) -> Any:
    if "mode" not in data:
        return MISSING
    mode = data["mode"]
    if v is MISSING:
        v = [1.0] if mode == "shadow" else [0.05, 0.25, 0.5, 1.0]
    non_empty(v, "", "expected a non-empty list of weights")
    out: list[float] = []
    for i, w in enumerate(v):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w <= 1:
            raise ConfigError(f"[{i}]", f"expected a weight in (0, 1], got {w!r}")
        if out and w <= out[-1]:
            raise ConfigError(f"[{i}]", "weights must increase")
        out.append(float(w))
    if mode == "canary" and out[0] >= 1.0:
        raise ConfigError("", "a canary needs a first weight below 1 (at 1 no request is "
                              "left to the primary)")
    return tuple(out)


def _challenger(v: Any, data: Mapping[str, Any]) -> Any:
    if "mode" not in data or "primary_variant" not in data:
        return MISSING
    if v is MISSING:
        v = "shadow" if data["mode"] == "shadow" else "canary"
    v = text(v, "")
    if v == data["primary_variant"]:
        raise ConfigError("", "must differ from primary_variant")
    return v


class ExperimentModel(Spec):
    """One entry of ``experiments``.  The values of ``name``, ``model``, ``registered_model``
    and ``settle`` are checked last (as they always were), after the others."""

    name: Annotated[Any, check(_required)] = MISSING
    model: Annotated[Any, check(_required)] = MISSING
    mode: Annotated[Any, check(lambda v, d: _exp_mode("shadow" if v is MISSING else v))] = MISSING
    steps: Annotated[Any, check(_steps)] = MISSING
    primary_variant: Annotated[Any, default("primary", text)] = MISSING
    challenger_variant: Annotated[Any, check(_challenger)] = MISSING
    interval: Annotated[Any, default("5s", positive_duration)] = MISSING
    registered_model: Any = MISSING
    settle: Any = MISSING

    @model_validator(mode="after")
    def _last(self) -> "ExperimentModel":
        try:
            checked = {"name": text(self.name, "name"), "model": text(self.model, "model"),
                       "registered_model": text(self.model if self.registered_model is MISSING
                                                else self.registered_model, "registered_model"),
                       "settle": parse_duration("5s" if self.settle is MISSING else self.settle,
                                                "settle")}
        except ConfigError as e:
            raise spec_error(e) from None
        self.__dict__.update(checked)
        return self

    def spec_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``ExperimentSpec``."""
        return dict(name=self.name, model=self.model, registered_model=self.registered_model,
                    primary_variant=self.primary_variant,
                    challenger_variant=self.challenger_variant, mode=self.mode,
                    steps=self.steps, settle_ms=self.settle, interval_ms=self.interval)


def _exp_mode(v: Any) -> str:
    if v not in MODES:
        raise ConfigError("", f"expected shadow or canary, got {v!r}")
    return v


def _experiments(v: Any, data: Mapping[str, Any]) -> Any:
    if not v:
        return ()
    if not isinstance(v, list):
        raise ConfigError("", "expected a list")
    out = items(ExperimentModel, v)
    names = [e.name for e in out]
    for i, n in enumerate(names):
        if names.index(n) != i:
            raise ConfigError(f"[{i}].name", f"duplicate experiment {n!r}")
    return out


def _on_alerts(v: Any, data: Mapping[str, Any]) -> Any:
    v = (None if v is MISSING else v) or []
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ConfigError("", "expected a list of alert rule names")
    return tuple(v)


def _every_labelled(v: Any, data: Mapping[str, Any]) -> Any:
    v = None if v is MISSING else v
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
        raise ConfigError("", f"expected a positive integer, got {v!r}")
    return v


class RetrainSection(Spec):
    on_alerts: Annotated[Any, check(_on_alerts)] = MISSING
    every_labelled: Annotated[Any, check(_every_labelled)] = MISSING
    model: Any = MISSING


def _retrain(v: Any, data: Mapping[str, Any]) -> Any:
    r = sub(RetrainSection, None if v is MISSING else v)
    if "experiments" not in data:
        return MISSING
    exps = data["experiments"]
    model = (None if r.model is MISSING else r.model) or (exps[0].registered_model
                                                          if exps else None)
    if (r.on_alerts or r.every_labelled) and not model:
        raise ConfigError("model", "missing (no experiment names a registered model)")
    return {"on_alerts": r.on_alerts, "every_labelled": r.every_labelled, "model": model}


def _actions_mode(v: Any, data: Mapping[str, Any]) -> Any:
    v = "auto" if v is MISSING else v
    if v not in ("auto", "dry_run", "approval"):
        raise ConfigError("", f"expected auto, dry_run or approval, got {v!r}")
    return v


class ActionsSection(Spec):
    mode: Annotated[Any, check(_actions_mode)] = MISSING
    cooldown: Annotated[Any, default("10m", parse_duration)] = MISSING
    retrain_cooldown: Annotated[Any, default("1h", parse_duration)] = MISSING


class CanaryFile(PolicyFile):
    """The whole of ``configs/canary.yaml``: the policy's keys, then the controller's."""

    other_keys = frozenset()

    experiments: Annotated[Any, check(_experiments)] = MISSING
    retrain: Annotated[Any, check(_retrain)] = MISSING
    actions: ActionsSection = Field(default_factory=dict)

    def policy_kwargs(self) -> dict[str, Any]:
        kw = super().policy_kwargs()
        for k in ("experiments", "retrain", "actions"):
            kw.pop(k, None)
        return kw
