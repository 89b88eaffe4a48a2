"""The KPI catalogue: its derived tables equal the ones the code had before it, its
families name the states that compute each KPI, and the README lists it."""

from __future__ import annotations

from pathlib import Path

import pytest

from kpistream.windows import catalogue as cat

ROOT = Path(__file__).resolve().parents[2]

# The tables as they were written out by hand before the catalogue (the oracle).
_AVG = tuple(f"{m}_{a}" for a in ("macro", "micro", "weighted") for m in ("precision", "recall", "f1"))
OLD_KPI_NAMES = (
    "requests", "error_rate", "latency_mean", "latency_p50", "latency_p90", "latency_p99",
    "latency_p999", "accuracy", "precision", "recall", "f1", "mae", "rmse", "precision_at_k",
    "recall_at_k", "ndcg_at_k", "mrr", "thumbs_up_rate", "ctr", "conversion_rate",
    "dwell_mean", "reward_mean", "cost_per_1k", "tokens_mean", "label_coverage") + _AVG
OLD_QUALITY = frozenset(("accuracy", "precision", "recall", "f1", "mae", "rmse", "precision_at_k",
                         "recall_at_k", "ndcg_at_k", "mrr") + _AVG)
OLD_RATE = frozenset(("error_rate", "accuracy", "thumbs_up_rate", "ctr", "conversion_rate",
                      "label_coverage"))
OLD_QUANTILES = frozenset(("latency_p50", "latency_p90", "latency_p99", "latency_p999"))
OLD_HIGHER = frozenset(
    ("accuracy", "precision", "recall", "f1", "precision_at_k", "recall_at_k", "ndcg_at_k",
     "mrr", "thumbs_up_rate", "ctr", "conversion_rate", "dwell_mean", "reward_mean",
     "label_coverage") + _AVG)
OLD_PROM = {
    "requests": ("kpistream_window_requests", 1.0),
    "error_rate": ("kpistream_error_ratio", 1.0),
    "latency_mean": ("kpistream_latency_mean_seconds", 1e-3),
    "latency_p50": ("kpistream_latency_p50_seconds", 1e-3),
    "latency_p90": ("kpistream_latency_p90_seconds", 1e-3),
    "latency_p99": ("kpistream_latency_p99_seconds", 1e-3),
    "latency_p999": ("kpistream_latency_p999_seconds", 1e-3),
    "accuracy": ("kpistream_accuracy_ratio", 1.0),
    "precision": ("kpistream_precision_ratio", 1.0),
    "recall": ("kpistream_recall_ratio", 1.0),
    "f1": ("kpistream_f1_ratio", 1.0),
    "mae": ("kpistream_mae", 1.0),
    "rmse": ("kpistream_rmse", 1.0),
    "precision_at_k": ("kpistream_precision_at_k_ratio", 1.0),
    "recall_at_k": ("kpistream_recall_at_k_ratio", 1.0),
    "ndcg_at_k": ("kpistream_ndcg_at_k_ratio", 1.0),
    "mrr": ("kpistream_mrr_ratio", 1.0),
    "thumbs_up_rate": ("kpistream_thumbs_up_ratio", 1.0),
    "ctr": ("kpistream_ctr_ratio", 1.0),
    "conversion_rate": ("kpistream_conversion_ratio", 1.0),
    "dwell_mean": ("kpistream_dwell_mean_seconds", 1.0),
    "reward_mean": ("kpistream_reward_mean", 1.0),
    "cost_per_1k": ("kpistream_cost_per_1k_usd", 1.0),
    "tokens_mean": ("kpistream_tokens_mean", 1.0),
    "label_coverage": ("kpistream_label_coverage_ratio", 1.0),
    **{k: (f"kpistream_{k}_ratio", 1.0) for k in _AVG},
}


def test_derived_tables_equal_the_old_hand_written_ones():
    assert cat.KPI_NAMES == OLD_KPI_NAMES
    assert cat.QUALITY_KPIS == OLD_QUALITY
    assert cat.RATE_KPIS == OLD_RATE
    assert cat.QUANTILE_KPIS == OLD_QUANTILES
    assert cat.HIGHER_IS_BETTER == OLD_HIGHER
    assert list(cat.PROM_METRICS.items()) == list(OLD_PROM.items())


def test_old_names_stay_importable_and_are_the_catalogue():
    from kpistream.alerts import rules, watcher
    from kpistream.alerts.rules import KPI_NAMES, PROM_METRICS, QUALITY_KPIS, RATE_KPIS

    assert KPI_NAMES is cat.KPI_NAMES and PROM_METRICS is cat.PROM_METRICS
    assert QUALITY_KPIS is cat.QUALITY_KPIS and RATE_KPIS is cat.RATE_KPIS
    assert rules._QUANTILES is cat.QUANTILE_KPIS
    assert watcher.HIGHER_IS_BETTER is cat.HIGHER_IS_BETTER


def test_entries_are_consistent():
    names = [k.name for k in cat.CATALOGUE]
    assert len(set(names)) == len(names)
    proms = [k.prom for k in cat.CATALOGUE]
    assert len(set(proms)) == len(proms)
    for k in cat.CATALOGUE:
        assert k.prom.startswith("kpistream_") and not k.prom.endswith("_total")
        assert k.help and k.unit
        assert (k.scale == 1e-3) == (k.unit == "ms")   # gauges are in base units (seconds)
        assert not (k.quality and k.family in ("traffic", "latency", "cost", "feedback"))
        assert k.kind in ("quality", "feedback", "operational")
        assert cat.kpi(k.name) is k
    with pytest.raises(KeyError, match="unknown KPI 'acc'"):
        cat.kpi("acc")


def test_family_is_the_state_that_computes_the_kpi():
    """Every KPI a state's ``value()`` yields is catalogued under that state's family
    (checked on the fixed scenario, where every family computes every KPI it can)."""
    from publisher_scenario import METRICS, _events, T0
    from actors.shard import Shard
    from kpistream.clock import ManualClock
    import numpy as np

    clock = ManualClock(T0)
    shard = Shard(0, METRICS, clock=clock, processing_time_watermark=False)
    rng = np.random.default_rng(3)
    shard.ingest_rows([e for i in range(200) for e in _events(i, T0 + 40 * i, rng)])
    seen: dict[str, set] = {}
    for p in shard.flush()[0]:
        for metric in p.state.value():
            seen.setdefault(metric, set()).add(p.family)
    for name, fams in seen.items():
        if name in cat.BY_NAME:
            assert fams == {cat.BY_NAME[name].family}, name
    assert set(cat.KPI_NAMES) <= set(seen)          # the scenario covers every KPI


def test_readme_kpi_list_is_the_catalogue():
    readme = (ROOT / "README.md").read_text()
    begin, end = "<!-- kpi-catalogue:begin -->\n", "<!-- kpi-catalogue:end -->"
    assert begin in readme and end in readme
    listed = readme.split(begin, 1)[1].split(end, 1)[0]
    assert listed == cat.markdown_table(), (
        "README's KPI list differs from kpistream/windows/catalogue.py: paste "
        "kpistream.windows.catalogue.markdown_table() between the markers")
