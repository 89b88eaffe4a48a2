"""The time-series store of window states: :class:`SeriesStore` (:mod:`.series`) over
the file (:mod:`.db`), writes (:mod:`.write`), roll-ups and retention (:mod:`.rollup`),
reads (:mod:`.query`), series ids (:mod:`.catalog`) and stored encodings (:mod:`.codec`)."""
from kpistream.store.db import DB_NAME
from kpistream.store.query import StoredState
from kpistream.store.resolutions import Resolution, default_resolutions
from kpistream.store.series import SeriesStore, load_series, open_store

__all__ = ["DB_NAME", "Resolution", "SeriesStore", "StoredState", "default_resolutions",
           "load_series", "open_store"]
