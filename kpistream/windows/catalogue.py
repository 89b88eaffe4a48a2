"""The KPI catalogue: one entry per KPI (family, unit, Prometheus gauge, help, kind).

``/metrics``, the alert-rule checks, the drift detectors and the README's KPI
list all read this table; adding a KPI is one entry here plus its state's
``value()`` in :mod:`kpistream.engine`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from kpistream.engine.paired import PAIRED_METRICS

__all__ = ["Kpi", "CATALOGUE", "BY_NAME", "KPI_NAMES", "QUALITY_KPIS", "RATE_KPIS",
           "QUANTILE_KPIS", "HIGHER_IS_BETTER", "PROM_METRICS", "PROM_KPIS", "kpi",
           "markdown_table"]


@dataclass(frozen=True, slots=True)
class Kpi:
    """One KPI.

    ``family``: the engine state family computing it; ``unit``: of its value
    in tidy rows; ``prom`` / ``scale``: the exported gauge and the factor from
    ``unit`` to the gauge's base unit; ``quality``: computed on labelled
    requests (its rows carry ``labelled``); ``rate``: a share of events
    (binomial tests apply); ``higher_is_better``: the good direction (None:
    neither); ``quantile``: a sketch quantile (combined by max across series).
    """

    name: str
    family: str
    unit: str
    prom: str
    help: str
    scale: float = 1.0
    quality: bool = False
    rate: bool = False
    higher_is_better: bool | None = None
    quantile: bool = False

    @property
    def kind(self) -> str:
        """``quality`` (labelled requests), ``feedback`` (feedback events) or ``operational``."""
        return "quality" if self.quality else (
            "feedback" if self.family == "feedback" else "operational")


def _latency(name: str, help_: str, quantile: bool = True) -> Kpi:
    return Kpi(name, "latency", "ms", f"kpistream_{name}_seconds", help_, scale=1e-3,
               higher_is_better=False, quantile=quantile)


def _ratio(name: str, family: str, prom: str, help_: str, **kw) -> Kpi:
    return Kpi(name, family, "ratio", prom, help_, **kw)


_Q = {"quality": True, "higher_is_better": True}

_BASE: tuple[Kpi, ...] = (
    Kpi("requests", "traffic", "requests", "kpistream_window_requests", "Requests in the window"),
    _ratio("error_rate", "traffic", "kpistream_error_ratio", "Share of requests that failed",
           rate=True, higher_is_better=False),
    _latency("latency_mean", "Mean request latency", quantile=False),
    _latency("latency_p50", "Median latency (relative error <= 1%)"),
    _latency("latency_p90", "90th percentile latency (relative error <= 1%)"),
    _latency("latency_p99", "99th percentile latency (relative error <= 1%)"),
    _latency("latency_p999", "99.9th percentile latency (relative error <= 1%)"),
    _ratio("accuracy", "classification", "kpistream_accuracy_ratio",
           "Accuracy of labelled requests", rate=True, **_Q),
    _ratio("precision", "classification", "kpistream_precision_ratio",
           "Precision of the positive label", **_Q),
    _ratio("recall", "classification", "kpistream_recall_ratio", "Recall of the positive label",
           **_Q),
    _ratio("f1", "classification", "kpistream_f1_ratio", "F1 of the positive label", **_Q),
    Kpi("mae", "regression", "target", "kpistream_mae",
        "Mean absolute error (units of the target)", quality=True, higher_is_better=False),
    Kpi("rmse", "regression", "target", "kpistream_rmse",
        "Root mean squared error (units of the target)", quality=True, higher_is_better=False),
    _ratio("precision_at_k", "ranking", "kpistream_precision_at_k_ratio", "Precision at K", **_Q),
    _ratio("recall_at_k", "ranking", "kpistream_recall_at_k_ratio", "Recall at K", **_Q),
    _ratio("ndcg_at_k", "ranking", "kpistream_ndcg_at_k_ratio", "NDCG at K", **_Q),
    _ratio("mrr", "ranking", "kpistream_mrr_ratio", "Mean reciprocal rank at K", **_Q),
    _ratio("thumbs_up_rate", "feedback", "kpistream_thumbs_up_ratio",
           "Share of thumbs-up feedback", rate=True, higher_is_better=True),
    _ratio("ctr", "feedback", "kpistream_ctr_ratio", "Clicked requests per request", rate=True,
           higher_is_better=True),
    _ratio("conversion_rate", "feedback", "kpistream_conversion_ratio",
           "Converted requests per request", rate=True, higher_is_better=True),
    Kpi("dwell_mean", "feedback", "s", "kpistream_dwell_mean_seconds", "Mean dwell time",
        higher_is_better=True),
    Kpi("reward_mean", "feedback", "reward", "kpistream_reward_mean", "Mean reward",
        higher_is_better=True),
    Kpi("cost_per_1k", "cost", "usd", "kpistream_cost_per_1k_usd", "Cost per 1000 requests",
        higher_is_better=False),
    Kpi("tokens_mean", "cost", "tokens", "kpistream_tokens_mean", "Mean tokens per request"),
    _ratio("label_coverage", "feedback", "kpistream_label_coverage_ratio",
           "Share of requests with a label", rate=True, higher_is_better=True),
)

#: Multiclass averages of precision / recall / F1 (scikit-learn's definitions).
_AVERAGED: tuple[Kpi, ...] = tuple(
    _ratio(f"{m}_{a}", "classification", f"kpistream_{m}_{a}_ratio",
           f"{m} {a} (averaged over classes)", **_Q)
    for a in ("macro", "micro", "weighted") for m in ("precision", "recall", "f1"))

#: Every KPI, in the order of the README's list and of ``KPI_NAMES``.
CATALOGUE: tuple[Kpi, ...] = _BASE + _AVERAGED
BY_NAME: Mapping[str, Kpi] = {k.name: k for k in CATALOGUE}

# ---------------------------------------------------------------- derived views
KPI_NAMES: tuple[str, ...] = tuple(k.name for k in CATALOGUE)
#: Every metric a stored row may carry: the KPIs and the paired (challenger - primary) ones.
STORED_METRICS: tuple[str, ...] = KPI_NAMES + PAIRED_METRICS
#: KPIs computed on labelled requests (``labelled`` is set on their rows).
QUALITY_KPIS: frozenset[str] = frozenset(k.name for k in CATALOGUE if k.quality)
#: KPIs that are shares of events (Bernoulli rates): binomial tests apply.
RATE_KPIS: frozenset[str] = frozenset(k.name for k in CATALOGUE if k.rate)
#: Latency quantiles (from the sketch).
QUANTILE_KPIS: frozenset[str] = frozenset(k.name for k in CATALOGUE if k.quantile)
#: KPIs where a drop is bad (detectors watch the down side by default).
HIGHER_IS_BETTER: frozenset[str] = frozenset(k.name for k in CATALOGUE if k.higher_is_better)
#: KPI name -> (exported Prometheus gauge, scale from the KPI's unit to the gauge's).
PROM_METRICS: dict[str, tuple[str, float]] = {k.name: (k.prom, k.scale) for k in CATALOGUE}
#: KPI name -> (Prometheus gauge, help, scale): what ``/metrics`` exports.
PROM_KPIS: dict[str, tuple[str, str, float]] = {k.name: (k.prom, k.help, k.scale)
                                                for k in CATALOGUE}


def kpi(name: str) -> Kpi:
    """The catalogue entry of ``name`` (KeyError naming the known KPIs otherwise)."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown KPI {name!r} (known: {', '.join(KPI_NAMES)})") from None


def markdown_table() -> str:
    """The README's KPI list: one row per KPI (kept equal to the README by a test)."""
    unit = {"ms": "ms (gauge: s)", "ratio": "ratio", "requests": "requests", "s": "s",
            "target": "target units", "reward": "reward units", "usd": "USD",
            "tokens": "tokens"}
    lines = ["| KPI | family | unit | Prometheus gauge | kind | meaning |",
             "| --- | --- | --- | --- | --- | --- |"]
    for k in CATALOGUE:
        kind = f"{k.kind}, rate" if k.rate else k.kind
        lines.append(f"| `{k.name}` | {k.family} | {unit[k.unit]} | `{k.prom}` | {kind} | "
                     f"{k.help} |")
    return "\n".join(lines) + "\n"
