"""Shadow / canary decisions: promote, roll back, halt or wait, from anytime-valid tests.

:class:`CanaryPolicy` (read from ``configs/canary.yaml`` by :func:`load_policy`; keys: README,
"Configuration") turns an experiment's paired summary into a :class:`Decision`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from kpistream.decide import sequential as seq
from kpistream.errors import ConfigError
from kpistream.spec.canary import (DEFAULT_MAX_DURATION_MS, DEFAULT_MIN_DURATION_MS, METRIC_NAMES,
                                   MODES, ROLES, PolicyFile)
from kpistream.spec.common import format_duration, parse, read_yaml

__all__ = [
    "METRIC_NAMES",
    "ACTIONS",
    "VERDICTS",
    "MetricRule",
    "CanaryPolicy",
    "MetricVerdict",
    "Decision",
    "load_policy",
    "policy_from_dict",
    "policy_from_spec",
]

# +1: higher is better; -1: lower is better
_SIGN = {"accuracy": 1, "reward": 1, "error_rate": -1, "latency": -1, "abs_error": -1}
_NEEDS_LABELS = {"accuracy", "abs_error"}
_STATS_KEY = {"latency": "log_latency", "abs_error": "abs_error", "reward": "reward"}
ACTIONS: tuple[str, ...] = ("wait", "promote", "rollback", "halt", "inconclusive")
VERDICTS: tuple[str, ...] = ("undecided", "non_inferior", "better", "harmful", "not_applicable")
_A = {a: i for i, a in enumerate(ACTIONS)}
_V = {v: i for i, v in enumerate(VERDICTS)}


@dataclass(frozen=True, slots=True)
class MetricRule:
    """One compared metric: promote needs ``lower > -margin``, rollback fires on ``upper < -harm``."""

    name: str
    margin: float
    harm: float = 0.0
    role: str = "quality"

    @property
    def sign(self) -> int:
        """+1 when higher is better (accuracy, reward), -1 otherwise."""
        return _SIGN[self.name]

    @property
    def direction(self) -> str:
        return "higher_is_better" if self.sign > 0 else "lower_is_better"

    def applies(self, mode: str) -> bool:
        """Reward is only observed for the answer the user saw: canary mode only."""
        return not (self.name == "reward" and mode == "shadow")


_DEFAULT_METRICS = (
    MetricRule("accuracy", 0.01, 0.0, "quality"),
    MetricRule("error_rate", 0.005, 0.0, "guardrail"),
    MetricRule("latency", 0.05, 0.10, "guardrail"),
)


@dataclass(frozen=True, slots=True)
class CanaryPolicy:
    """The decision policy (every field's meaning: README, "Configuration", ``configs/canary.yaml``).

    A challenger model runs beside the primary, either in **shadow** mode (both
    score every request, only the primary's answer is served: comparisons are
    paired, per request) or in **canary** mode (each request is served by one
    arm, a share ``expected_share`` of them by the challenger: two independent
    samples).  :meth:`decide` reads the cumulative *paired summary* of the
    experiment (shape below) and returns a :class:`Decision`.  It keeps no
    state and may be called after every batch, as often as one likes: every
    bound is a confidence sequence (:mod:`kpistream.decide.sequential`), valid
    under continuous monitoring.

    Actions, in order of precedence:

    1. ``rollback``: some metric is confidently worse than the primary beyond its
       harm threshold -- the upper end of its oriented interval is below
       ``-harm`` (the whole interval on the bad side).  Checked from the first
       request; no minimum sample or duration.
    2. ``halt``: sample-ratio mismatch -- the anytime-valid p-value of the
       challenger's share of requests against ``expected_share`` is below
       ``srm.alpha``.  The assignment is broken, so no comparison is trusted.
    3. ``promote``: every applicable metric is non-inferior -- the lower end of
       its oriented interval is above ``-margin`` -- and at least
       ``min_samples`` samples and ``min_duration`` have passed.
    4. ``inconclusive``: ``max_duration`` reached without any of the above; the
       primary stays.
    5. ``wait``.

    Orientation: every difference is challenger - primary, multiplied by +1 for
    metrics where higher is better (accuracy, reward) and by -1 where lower is
    better (error_rate, latency, abs_error).  In that oriented scale positive
    means "the challenger is better", a margin of 0.01 on accuracy means "at most
    1 point worse", and for latency (natural log of milliseconds) 0.05 means "at
    most ~5 % slower" (a log-ratio).

    Error rates (how alpha is split), with ``K`` applicable metrics (reward does
    not apply in shadow mode):

    * each metric's **lower** bound (promote side) is a one-sided confidence
      sequence at ``alpha / 2``.  A false promotion needs some metric that is
      truly worse than its margin to pass, i.e. *that* metric's lower bound to
      exclude its true value at some time: probability ``<= alpha / 2``
      (intersection-union: promotion needs every metric to pass, so no split
      across metrics is needed);
    * each metric's **upper** bound (rollback side) is at ``alpha / (2 K)``.  A
      false rollback needs some metric that is not worse than its harm threshold
      to have its upper bound exclude its true value: probability
      ``<= K * alpha / (2 K) = alpha / 2`` (Bonferroni);
    * so ``P(a wrong promotion or a wrong rollback, ever) <= alpha``, however
      often ``decide`` is called.  The SRM check has its own level ``srm.alpha``.

    Exact vs asymptotic: accuracy and error_rate are exact at every sample
    size -- in shadow mode a betting confidence sequence on the paired 0/1
    differences (only the discordant pairs ``n10`` / ``n01`` move it), in canary
    mode a betting confidence sequence on the inverse-propensity terms of the
    wrong answers / errors, which needs the challenger's assignment probability
    (``expected_share``; without one they fall back to the asymptotic bounds).
    Canary-mode accuracy counts labelled requests, so it assumes a request's
    label arrives independently of the arm that served it.  Latency, abs_error
    and reward use the asymptotic (normal-mixture) confidence sequence of
    Waudby-Smith et al.: valid as the sample grows, infinite until ``min_n``
    observations (per arm in canary mode); see
    :func:`kpistream.decide.sequential.asymptotic_cs` for its measured
    small-sample coverage (skewed data need ``min_n`` in the hundreds).

    Input: the paired summary (cumulative; ``d`` = challenger - primary)::

        {"arms": {"primary":    {"requests", "errors", "labelled", "correct",
                                 "log_latency": [n, sum, sumsq], "reward": [...], "abs_error": [...]},
                  "challenger": {... same keys ...}},
         "paired": {"requests", "labelled",
                    "correct": {"n11", "n10", "n01", "n00"},   # first digit: primary correct
                    "error":   {"n11", "n10", "n01", "n00"},   # status == error, same layout
                    "log_latency": [n, sum_d, sumsq_d], "abs_error": [n, sum_d, sumsq_d]}}

    Missing keys count as zero.  Leaves may be numpy arrays (all of one shape):
    :meth:`evaluate` then decides for every element at once (the simulation in
    ``bench/canary_sim.py`` runs thousands of experiments that way);
    :meth:`decide` is the same computation on one summary plus the explanation.
    """

    alpha: float = 0.05
    metrics: tuple[MetricRule, ...] = _DEFAULT_METRICS
    min_samples: int = 1000
    min_duration_ms: int = DEFAULT_MIN_DURATION_MS
    max_duration_ms: int = DEFAULT_MAX_DURATION_MS
    srm_alpha: float = 0.001
    srm_expected_share: float | None = None
    srm_concentration: float = 100.0
    mode: str = "shadow"
    target_samples: int | None = None
    min_n: int = 100

    # -- alpha split -------------------------------------------------------
    def applicable(self, mode: str | None = None) -> tuple[MetricRule, ...]:
        mode = _check_mode(self.mode if mode is None else mode)
        return tuple(m for m in self.metrics if m.applies(mode))

    def alpha_promote(self, mode: str | None = None) -> float:
        """Level of each metric's lower bound: ``alpha / 2`` (intersection-union, no split)."""
        return self.alpha / 2.0

    def alpha_rollback(self, mode: str | None = None) -> float:
        """Level of each metric's upper bound: ``alpha / (2 K)``, K = applicable metrics."""
        return self.alpha / (2.0 * max(1, len(self.applicable(mode))))

    # -- vectorized core ---------------------------------------------------
    def evaluate(self, summary: Mapping[str, Any], elapsed_s: Any, mode: str | None = None,
                 expected_share: float | None = None, *, bounds: bool = True) -> dict[str, Any]:
        """Decisions for a summary whose leaves may be numpy arrays (elementwise).

        Returns plain arrays: ``action`` (indices into :data:`ACTIONS`),
        ``samples``, ``elapsed_s``, ``srm_p`` / ``observed_share`` (nan when not
        checked), ``expected_share`` and per metric name a dict with
        ``estimate``, ``lower``, ``upper`` (oriented), ``n``, ``verdict``
        (indices into :data:`VERDICTS`), ``passes`` and ``harmful`` (bools).
        With ``bounds=False`` the exact (betting) metrics skip the bisection
        that places their bounds (``lower``/``upper`` are nan) -- the verdicts
        and the action are identical, they come from the e-values at
        ``-margin`` and ``-harm``.
        """
        mode = _check_mode(self.mode if mode is None else mode)
        rules = self.applicable(mode)
        a_lo, a_hi = self.alpha_promote(mode), self.alpha_rollback(mode)
        elapsed = np.asarray(elapsed_s, dtype=float)
        share = expected_share if expected_share is not None else self.srm_expected_share
        if share is not None and (isinstance(share, bool) or not isinstance(share, (int, float))
                                  or not 0.0 < float(share) < 1.0):
            raise ConfigError("expected_share", f"must be in (0, 1), got {share!r}")
        out: dict[str, Any] = {"metrics": {}}
        passes_all: Any = np.asarray(len(rules) > 0)
        harm_any: Any = np.asarray(False)
        for rule in self.metrics:
            if rule in rules:
                r = self._metric(rule, summary, mode, share, a_lo, a_hi, bounds)
                passes_all = passes_all & r["passes"]
                harm_any = harm_any | r["harmful"]
                verdict = np.where(r["harmful"], _V["harmful"],
                                   np.where(r["passes"] & (r["better"]), _V["better"],
                                            np.where(r["passes"], _V["non_inferior"],
                                                     _V["undecided"])))
                r["verdict"] = verdict
                del r["better"]
            else:
                nan = np.asarray(np.nan)
                r = {"estimate": nan, "lower": nan, "upper": nan, "n": np.asarray(0.0),
                     "passes": np.asarray(False), "harmful": np.asarray(False),
                     "verdict": np.asarray(_V["not_applicable"])}
            out["metrics"][rule.name] = r
        samples = self._samples(summary, mode)
        x = _leaf(summary, "arms", "challenger", "requests")
        n = x + _leaf(summary, "arms", "primary", "requests")
        with np.errstate(divide="ignore", invalid="ignore"):
            observed = np.where(n > 0, x / n, np.nan)
        if share is None:
            srm_p = np.full(np.shape(n), np.nan)
            halt = np.zeros(np.shape(n), dtype=bool)
        else:
            srm_p = seq.srm_p_value(x, n, float(share), self.srm_concentration)
            halt = srm_p < self.srm_alpha
        enough = (samples >= self.min_samples) & (elapsed * 1000.0 >= self.min_duration_ms)
        over = elapsed * 1000.0 >= self.max_duration_ms
        action = np.where(harm_any, _A["rollback"],
                          np.where(halt, _A["halt"],
                                   np.where(passes_all & enough, _A["promote"],
                                            np.where(over, _A["inconclusive"], _A["wait"]))))
        out.update(action=action, samples=samples, elapsed_s=elapsed, srm_p=srm_p,
                   observed_share=observed, expected_share=share, mode=mode,
                   requests=n, alpha_lower=a_lo, alpha_upper=a_hi)
        return out

    def _samples(self, summary: Mapping[str, Any], mode: str) -> np.ndarray:
        labels = any(r.name in _NEEDS_LABELS for r in self.applicable(mode))
        key = "labelled" if labels else "requests"
        if mode == "shadow":
            return _leaf(summary, "paired", key)
        return np.minimum(_leaf(summary, "arms", "primary", key),
                          _leaf(summary, "arms", "challenger", key))

    def _target(self, mode: str) -> float:
        t = self.target_samples if self.target_samples is not None else self.min_samples
        t = max(float(t), float(self.min_n), 10.0)
        return 2.0 * t if mode == "canary" else t

    def _metric(self, rule: MetricRule, s: Mapping[str, Any], mode: str, share: float | None,
                a_lo: float, a_hi: float, bounds: bool) -> dict[str, Any]:
        name, sign = rule.name, rule.sign
        lo_null, hi_null = -rule.margin, -rule.harm
        target = self._target(mode)
        if name in ("accuracy", "error_rate"):
            if mode == "shadow":
                t = _leaf_table(s, "paired", "correct" if name == "accuracy" else "error")
                n = t["n11"] + t["n10"] + t["n01"] + t["n00"]
                # oriented d = sign * (challenger - primary); n10 is -1 before orientation
                minus, plus = (t["n10"], t["n01"]) if sign > 0 else (t["n01"], t["n10"])
                args: tuple[Any, ...] = (minus, plus, n)
                logev, cs = seq.paired_binary_log_evalue, seq.paired_binary_cs
                with np.errstate(divide="ignore", invalid="ignore"):
                    point = np.where(n > 0, (plus - minus) / np.where(n > 0, n, 1.0), np.nan)
            else:
                # oriented difference = bad rate of the primary - bad rate of the challenger,
                # "bad" = a wrong answer (accuracy) or an error (error_rate): the rare event
                if name == "accuracy":
                    n_p, n_c = _leaf(s, "arms", "primary", "labelled"), _leaf(s, "arms", "challenger", "labelled")
                    bad_p = n_p - _leaf(s, "arms", "primary", "correct")
                    bad_c = n_c - _leaf(s, "arms", "challenger", "correct")
                else:
                    n_p, n_c = _leaf(s, "arms", "primary", "requests"), _leaf(s, "arms", "challenger", "requests")
                    bad_p = _leaf(s, "arms", "primary", "errors")
                    bad_c = _leaf(s, "arms", "challenger", "errors")
                n = n_p + n_c
                if share is None:   # no assignment probability: asymptotic two-sample bounds
                    est, lower, upper = seq.binary_two_sample_cs(
                        bad_p, n_p, bad_c, n_c, a_lo, a_hi, target_n=target, min_n=self.min_n)
                    return {"estimate": est, "lower": lower, "upper": upper, "n": n,
                            "passes": lower > lo_null, "harmful": upper < hi_null,
                            "better": lower > 0}
                s1 = 1.0 - float(share)          # arm 1 = the primary
                args = (bad_p, n_p, bad_c, n_c, s1)
                logev, cs = seq.randomized_binary_log_evalue, seq.randomized_binary_cs
                with np.errstate(divide="ignore", invalid="ignore"):
                    point = np.where(n > 0, (bad_p / s1 - bad_c / (1.0 - s1)) / np.where(n > 0, n, 1.0),
                                     np.nan)
            passes = logev(*args, lo_null, "greater") >= math.log(1.0 / a_lo)
            harmful = logev(*args, hi_null, "less") >= math.log(1.0 / a_hi)
            better = logev(*args, 0.0, "greater") >= math.log(1.0 / a_lo)
            if bounds:
                est, lower, upper = cs(*args, a_lo, a_hi)
            else:
                est, lower, upper = point, np.full(np.shape(point), np.nan), np.full(np.shape(point), np.nan)
            return {"estimate": est, "lower": lower, "upper": upper, "n": n,
                    "passes": passes, "harmful": harmful, "better": better}
        if mode == "shadow":
            cnt, tot, sq = _leaf_triple(s, "paired", _STATS_KEY[name])
            est, lower, upper = seq.asymptotic_cs(cnt, sign * tot, sq, a_lo, a_hi,
                                                  target_n=target, min_n=self.min_n)
            n = cnt
        else:
            c, p = ("challenger", "primary") if sign > 0 else ("primary", "challenger")
            n1, s1_, q1 = _leaf_triple(s, "arms", c, _STATS_KEY[name])
            n0, s0, q0 = _leaf_triple(s, "arms", p, _STATS_KEY[name])
            est, lower, upper = seq.two_sample_cs(n1, s1_, q1, n0, s0, q0, a_lo, a_hi,
                                                  target_n=target, min_n=self.min_n)
            n = n1 + n0
        return {"estimate": est, "lower": lower, "upper": upper, "n": n,
                "passes": lower > lo_null, "harmful": upper < hi_null, "better": lower > 0}

    # -- one decision, explained -------------------------------------------
    def decide(self, summary: Mapping[str, Any], elapsed_s: float, mode: str | None = None,
               expected_share: float | None = None) -> Decision:
        """The decision for one cumulative paired summary, ``elapsed_s`` seconds into the experiment.

        ``mode`` defaults to the policy's; ``expected_share`` (the
        challenger's share of requests) overrides ``srm.expected_share``.
        """
        ev = self.evaluate(summary, float(elapsed_s), mode, expected_share, bounds=True)
        mode = ev["mode"]
        verdicts = []
        for rule in self.metrics:
            r = ev["metrics"][rule.name]
            sign = rule.sign
            est, lo, hi = _f(r["estimate"]), _f(r["lower"]), _f(r["upper"])
            verdicts.append(MetricVerdict(
                metric=rule.name, role=rule.role, direction=rule.direction,
                estimate=est, lower=lo, upper=hi, margin=rule.margin, harm=rule.harm,
                n=int(np.asarray(r["n"]).item()), verdict=VERDICTS[int(np.asarray(r["verdict"]).item())],
                **_raw(sign, est, lo, hi)))
        action = ACTIONS[int(np.asarray(ev["action"]).item())]
        counts = _counts(summary, mode, int(np.asarray(ev["samples"]).item()))
        share = ev["expected_share"]
        srm = {"p_value": _f(ev["srm_p"]), "observed_share": _f(ev["observed_share"]),
               "expected_share": None if share is None else float(share),
               "alpha": self.srm_alpha, "checked": share is not None}
        alpha = {"overall": self.alpha, "promote_side": ev["alpha_lower"],
                 "rollback_side": ev["alpha_upper"], "srm": self.srm_alpha}
        reason = self._reason(action, tuple(verdicts), counts, srm, float(elapsed_s), mode)
        return Decision(action=action, reason=reason, mode=mode, elapsed_s=float(elapsed_s),
                        metrics=tuple(verdicts), counts=counts, srm=srm, alpha=alpha)

    def _reason(self, action: str, vs: tuple[MetricVerdict, ...], counts: Mapping[str, int],
                srm: Mapping[str, Any], elapsed_s: float, mode: str) -> str:
        unit = _unit(self, mode)
        have = f"{counts['samples']:,} {unit} and {_dur(elapsed_s)}"
        if action == "rollback":
            bad = [v for v in vs if v.verdict == "harmful"]
            parts = "; ".join(f"{v.metric} {_fmt(v.estimate)} (upper bound {_fmt(v.upper)} < "
                              f"-harm = {-v.harm + 0.0:g})" for v in bad)
            return (f"Roll back: the challenger is confidently worse than the primary beyond the "
                    f"harm threshold on {parts}, after {have}.")
        if action == "halt":
            return (f"Halt: sample-ratio mismatch, the challenger got "
                    f"{srm['observed_share']:.2%} of requests instead of "
                    f"{srm['expected_share']:.2%} (anytime-valid p = {srm['p_value']:.2g} < "
                    f"{self.srm_alpha:g}), so no comparison can be trusted.")
        if action == "promote":
            parts = ", ".join(f"{v.metric} lower bound {_fmt(v.lower)} > -margin = {-v.margin + 0.0:g}"
                              for v in vs if v.verdict in ("non_inferior", "better"))
            return (f"Promote: every metric is within its non-inferiority margin ({parts}) "
                    f"after {have}.")
        pending = [v for v in vs if v.verdict == "undecided"]
        pend = ", ".join(f"{v.metric} in [{_fmt(v.lower)}, {_fmt(v.upper)}], -margin = "
                         f"{-v.margin + 0.0:g}" for v in pending) or "none"
        if action == "inconclusive":
            return (f"Inconclusive: the maximum duration {format_duration(self.max_duration_ms)} "
                    f"was reached after {have} without a decision (still undecided: {pend}); "
                    f"the primary stays.")
        needs = []
        if not [r for r in self.metrics if r.applies(mode)]:
            needs.append(f"no configured metric applies in {mode} mode")
        if pending:
            needs.append(f"undecided: {pend}")
        if counts["samples"] < self.min_samples:
            needs.append(f"{self.min_samples:,} {unit} (have {counts['samples']:,})")
        if elapsed_s * 1000.0 < self.min_duration_ms:
            needs.append(f"{format_duration(self.min_duration_ms)} (have {_dur(elapsed_s)})")
        srm_note = "" if srm["checked"] else " (sample ratio not checked: no expected share)"
        return f"Wait: {'; '.join(needs) or 'no decision yet'}{srm_note}."


@dataclass(frozen=True, slots=True)
class MetricVerdict:
    """One metric in a :class:`Decision`.

    ``estimate``, ``lower``, ``upper`` are the oriented difference (positive =
    challenger better; ``None`` for an infinite bound or no data); the
    ``raw_*`` fields are challenger - primary in the metric's own units.
    ``verdict``: ``harmful`` (upper < -harm), ``better`` (lower > 0 and
    > -margin), ``non_inferior`` (lower > -margin), ``undecided`` or
    ``not_applicable`` (reward in shadow mode).
    """

    metric: str
    role: str
    direction: str
    estimate: float | None
    lower: float | None
    upper: float | None
    margin: float
    harm: float
    n: int
    verdict: str
    raw_estimate: float | None = None
    raw_lower: float | None = None
    raw_upper: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "role": self.role, "direction": self.direction,
                "estimate": self.estimate, "lower": self.lower, "upper": self.upper,
                "margin": self.margin, "harm": self.harm, "n": self.n, "verdict": self.verdict,
                "raw": {"estimate": self.raw_estimate, "lower": self.raw_lower,
                        "upper": self.raw_upper}}


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do now, and why.

    ``action`` is one of :data:`ACTIONS`; ``reason`` one readable sentence;
    ``metrics`` one :class:`MetricVerdict` per configured metric; ``counts``
    the request / label counts (``samples`` is what ``min_samples`` is
    compared with); ``srm`` ``{p_value, observed_share, expected_share,
    alpha, checked}``; ``alpha`` the levels actually used per side.
    """

    action: str
    reason: str
    mode: str
    elapsed_s: float
    metrics: tuple[MetricVerdict, ...]
    counts: Mapping[str, int] = field(default_factory=dict)
    srm: Mapping[str, Any] = field(default_factory=dict)
    alpha: Mapping[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able (infinite or missing numbers are ``None``)."""
        return {"action": self.action, "reason": self.reason, "mode": self.mode,
                "elapsed_s": self.elapsed_s, "metrics": [m.as_dict() for m in self.metrics],
                "counts": dict(self.counts), "srm": dict(self.srm), "alpha": dict(self.alpha)}


# --------------------------------------------------------------------------
# summary access
# --------------------------------------------------------------------------

def _leaf(d: Mapping[str, Any], *path: str) -> np.ndarray:
    cur: Any = d
    for k in path:
        if not isinstance(cur, Mapping) or k not in cur or cur[k] is None:
            return np.asarray(0.0)
        cur = cur[k]
    return np.asarray(cur, dtype=float)


def _leaf_table(d: Mapping[str, Any], *path: str) -> dict[str, np.ndarray]:
    return {k: _leaf(d, *path, k) for k in ("n11", "n10", "n01", "n00")}


def _leaf_triple(d: Mapping[str, Any], *path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cur: Any = d
    for k in path:
        if not isinstance(cur, Mapping) or k not in cur or cur[k] is None:
            z = np.asarray(0.0)
            return z, z, z
        cur = cur[k]
    if len(cur) != 3:
        raise ValueError(f"{'.'.join(path)}: expected [n, sum, sumsq], got {cur!r}")
    return tuple(np.asarray(cur[i], dtype=float) for i in range(3))  # type: ignore[return-value]


def _counts(s: Mapping[str, Any], mode: str, samples: int) -> dict[str, int]:
    def i(*p: str) -> int:
        return int(np.asarray(_leaf(s, *p)).item())

    return {"samples": samples,
            "paired_requests": i("paired", "requests"), "paired_labelled": i("paired", "labelled"),
            "primary_requests": i("arms", "primary", "requests"),
            "challenger_requests": i("arms", "challenger", "requests"),
            "primary_labelled": i("arms", "primary", "labelled"),
            "challenger_labelled": i("arms", "challenger", "labelled")}


def _f(x: Any) -> float | None:
    v = float(np.asarray(x).item())
    return v if math.isfinite(v) else None


def _raw(sign: int, est: float | None, lo: float | None, hi: float | None) -> dict[str, Any]:
    """Oriented (estimate, lower, upper) back to challenger - primary in the metric's units."""
    if sign < 0:
        est, lo, hi = (None if est is None else -est), (None if hi is None else -hi), \
            (None if lo is None else -lo)
    return {"raw_estimate": est, "raw_lower": lo, "raw_upper": hi}


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x + 0.0:+.4g}"


def _dur(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _unit(p: CanaryPolicy, mode: str) -> str:
    labels = any(r.name in _NEEDS_LABELS for r in p.applicable(mode))
    if mode == "shadow":
        return "labelled pairs" if labels else "paired requests"
    return "labelled requests per arm" if labels else "requests per arm"


def _check_mode(mode: Any) -> str:
    if mode not in MODES:
        raise ConfigError("mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


# --------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------

def policy_from_spec(spec: PolicyFile) -> CanaryPolicy:
    """The :class:`CanaryPolicy` of a validated policy spec (the keys given, the rest defaults)."""
    kw = spec.policy_kwargs()
    if "metrics" in kw:
        kw["metrics"] = tuple(MetricRule(m.name, m.margin, m.harm, m.role) for m in kw["metrics"])
    return CanaryPolicy(**kw)


def policy_from_dict(raw: Mapping[str, Any]) -> CanaryPolicy:
    """A :class:`CanaryPolicy` from a mapping (the YAML's content); errors name the key path."""
    # experiments, retrain and actions are the controller's (actors/canary.py validates them)
    return policy_from_spec(parse(PolicyFile, raw))


def load_policy(source: str | Path | Mapping[str, Any] | None = None) -> CanaryPolicy:
    """A :class:`CanaryPolicy` from a YAML path, a mapping, or None (the defaults)."""
    if source is None:
        return CanaryPolicy()
    if isinstance(source, (str, Path)):
        return policy_from_dict(read_yaml(source))
    return policy_from_dict(source)
