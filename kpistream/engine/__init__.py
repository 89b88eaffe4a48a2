"""The streaming engine: one shard's join, dedup, pairing, panes and KPI states.

:class:`Engine` is the entry point; the KPI state families, the quantile
sketch and the compiled hash kernels live beside it.
"""
from kpistream.engine.engine import FAR_FUTURE, OTHER, Engine, IngestReport, Partial

__all__ = ["Engine", "Partial", "IngestReport", "FAR_FUTURE", "OTHER"]
