"""The KPI families by name: the one table of every mergeable state class.

The engine, the window aggregator and the store look families up here; the
state modules (:mod:`~kpistream.engine.states`, :mod:`~kpistream.engine.paired`,
:mod:`~kpistream.engine.features`) only define classes.
"""
from __future__ import annotations

from kpistream.engine.features import FeatureSampleState
from kpistream.engine.paired import PairedState
from kpistream.engine.states import (
    ClassificationState, CostState, FeedbackState, LatencyState, MetricState, RankingState,
    RegressionState, TrafficState,
)

FAMILY_CLASSES: dict[str, type[MetricState]] = {
    c.family: c for c in (TrafficState, LatencyState, CostState, ClassificationState,
                          RegressionState, RankingState, FeedbackState, PairedState,
                          FeatureSampleState)}


def final_after_ms(family: str, label_delay_ms: int) -> int:
    """How long after a pane's end its ``family`` state may still change: the label
    delay for quality families, 0 for operational ones."""
    return label_delay_ms if FAMILY_CLASSES[family].horizon == "label" else 0
