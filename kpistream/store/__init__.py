"""The time-series store of window states, with roll-ups and retention (:mod:`.series`)."""
from kpistream.store.series import SeriesStore, load_series, open_store

__all__ = ["SeriesStore", "load_series", "open_store"]
