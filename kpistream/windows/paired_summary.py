"""The paired summary of a challenger against the primary, merged from stored panes.

What the canary policy reads (:meth:`kpistream.decide.policy.CanaryPolicy.decide`):
the ``paired`` pane states of a model's primary and challenger series since a
start, merged; panes already final are merged once and cached.
"""

from __future__ import annotations

from typing import Any

from kpistream.engine.paired import PairedState
from kpistream.wire.batch import series_labels


class PairedSummaries:
    """Paired summaries over a store (:class:`kpistream.store.series.SeriesStore`),
    with the merge of final panes cached per query (at most ``cache_size`` queries)."""

    def __init__(self, store: Any, pane_ms: int, cache_size: int = 64) -> None:
        self.store = store
        self.pane_ms = pane_ms
        self.cache_size = cache_size
        self._cache: dict[tuple, tuple] = {}

    def summary(self, watermark: int, horizon: int, model: str, challenger: str,
                version: str | None = None, since_ms: int = 0, primary: str = "primary",
                primary_version: str | None = None) -> dict:
        """The comparison of ``challenger`` (at ``version``) with ``primary`` since ``since_ms``.

        Merges the stored ``paired`` pane states of the model's primary series
        (at ``primary_version`` if given) and of the challenger's series
        (every segment and endpoint) with a pane start at or after ``since_ms``
        (a run's first partial pane is left out), plus ``"window": {"start",
        "end", "panes", "final_until"}``.  A pane is final once ``watermark`` is
        past its end plus ``horizon`` (the paired family's label delay); final
        panes are merged once and cached, only open panes are re-read.
        """
        wm = watermark
        key = (model, challenger, version, primary, primary_version, int(since_ms))
        acc, until, panes = self._cache.get(key, (PairedState(), int(since_ms), 0))
        states = self.store.states(start=until, family="paired", model=model)
        by_start: dict[int, PairedState] = {}
        for st in states:
            lab = series_labels(st.series)
            v = lab.get("variant")
            ver = lab.get("model_version")
            if (v == primary and (primary_version is None or ver == primary_version)) or (
                    v == challenger and (version is None or ver == version)):
                cur = by_start.get(st.start)
                if cur is None:
                    by_start[st.start] = st.state
                else:
                    cur.merge(st.state)
        acc = acc.copy()
        open_acc = PairedState()
        new_until, frozen = until, True
        for start in sorted(by_start):
            final = wm >= start + self.pane_ms + horizon
            frozen = frozen and final
            if frozen:
                acc.merge(by_start[start])
                new_until = start + self.pane_ms
                panes += 1
            else:
                open_acc.merge(by_start[start])
        while len(self._cache) > self.cache_size:
            try:
                self._cache.pop(next(iter(self._cache)), None)
            except (StopIteration, RuntimeError):   # emptied or changed by another call
                break
        self._cache[key] = (acc, new_until, panes)
        total = acc.copy()
        total.merge(open_acc)
        out = total.summary()
        out["window"] = {"start": int(since_ms), "final_until": new_until,
                         "panes": panes + sum(1 for s in by_start if s >= new_until),
                         "watermark": wm}
        return out
