"""The streaming engine: one shard's join, dedup, pairing, panes and KPI states.

:class:`Engine` (engine.py) runs the data path; each step is a module beside
it (validate, watermark, vocab, join, pairing, panes), as are the KPI state
families (states, paired, features; by name in families), the quantile
sketch and the compiled hash kernels.
"""
from kpistream.engine.engine import FAR_FUTURE, OTHER, Engine, IngestReport, Partial

__all__ = ["Engine", "Partial", "IngestReport", "FAR_FUTURE", "OTHER"]
