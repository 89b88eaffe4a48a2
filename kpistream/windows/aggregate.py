"""Panes to windows to tidy rows (:class:`WindowAggregator`)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd

from kpistream.wire.batch import BASE_LABELS, SeriesKey
from kpistream.spec.metrics import EngineConfig, WindowSpec
from kpistream.engine import Partial
from kpistream.engine.families import final_after_ms
from kpistream.engine.states import MetricState

#: The segment value of a totals row (every value of the segment merged).
ALL = "*"

ROW_COLUMNS = ("window", "window_start", "window_end", "metric", "value", "count", "labelled",
               "provisional")


def _label_cols(series: SeriesKey) -> dict[str, str]:
    d = dict(zip(BASE_LABELS, series[:4]))
    d.update(series[4])
    return d


class WindowAggregator:
    """Merges pane states into the configured windows and their tidy rows.

    :class:`WindowAggregator` receives cumulative partial states
    (:class:`kpistream.engine.Partial`) from one engine or from many shards,
    keeps the latest state per (source, pane, series, family), and builds the
    configured windows by merging pane states: a 10 s tumbling window is one
    pane, a 60 s window hopping by 10 s merges six.  Merging sufficient
    statistics gives exactly what one pass over the window's events would give
    (never an average of percentiles).

    A window of family ``f`` is final once the watermark has passed its end
    (operational families) or its end plus the label delay (quality families);
    until then its rows are ``provisional``.  :meth:`pop_final_rows` returns
    each window once, when it becomes final, and forgets panes that no window
    still needs.  Count windows are single panes and final when their partials
    say so.

    Tidy rows (DESIGN.md): ``window``, ``window_start``, ``window_end`` (UTC),
    ``metric``, ``value``, ``count``, ``labelled``, ``provisional``, and one
    column per series label.
    """

    def __init__(self, config: EngineConfig, sources: int | None = None,
                 totals: bool = False) -> None:
        """``sources``: how many sources (shards) must report a watermark before
        anything is final; unknown sources hold the watermark back.  ``totals``:
        also the windows of every (model, version, variant, endpoint) with its
        segments merged (exact: the states merge), labelled with segment value
        :data:`ALL` for every configured segment."""
        self.cfg = config
        self.pane_ms = config.pane_ms
        self.time_windows = [w for w in config.windows if w.is_time]
        self.count_windows = {w.name: w for w in config.windows if not w.is_time}
        # (pane start, series, family) -> {source: state}
        self.panes: dict[tuple[int, SeriesKey, str], dict] = {}
        # count window: (name, series, index, family) -> {source: (state, final, start, end)}
        self.counts: dict[tuple[str, SeriesKey, int, str], dict] = {}
        self.watermarks: dict[object, int] = {}
        self.expected_sources = sources
        self._emitted_wm = np.iinfo(np.int64).min
        self._max_size = max((w.size for w in self.time_windows), default=self.pane_ms)
        self._all = tuple((seg, ALL) for seg in config.segments) if totals else None
        self.refused_final = 0

    # --------------------------------------------------------------- input
    def add(self, partials: Iterable[Partial], source: object = 0,
            watermark: int | None = None) -> list[Partial]:
        """Take a source's partials; returns those taken.  A time pane whose windows
        were already emitted as final is refused (counted in :attr:`refused_final`): a
        final window never changes (a re-delivery after a restart is identical; a shard
        restarted without its log would be wrong)."""
        taken = []
        for p in partials:
            if p.space == "time":
                if p.end_ms + self.horizon(p.family) <= self._emitted_wm:
                    self.refused_final += 1
                    continue
                self.panes.setdefault((p.key, p.series, p.family), {})[source] = p.state
            else:
                self.counts.setdefault((p.space, p.series, p.key, p.family), {})[source] = (
                    p.state, p.final, p.start_ms, p.end_ms)
            taken.append(p)
        if watermark is not None:
            self.watermarks[source] = max(self.watermarks.get(source, watermark), watermark)
        return taken

    @property
    def watermark(self) -> int:
        """The watermark every source has reached (the minimum)."""
        if not self.watermarks or (self.expected_sources is not None
                                   and len(self.watermarks) < self.expected_sources):
            return np.iinfo(np.int64).min
        return min(self.watermarks.values())

    def resume(self, emitted_watermark: int) -> None:
        """Start as if the windows final at ``emitted_watermark`` had been emitted (a
        restarted publisher: they are in the store); partials for them are refused."""
        self._emitted_wm = max(self._emitted_wm, int(emitted_watermark))

    def preload(self, states: Callable[[int, int], Iterable[Any]]) -> int:
        """After :meth:`resume`: the stored states (``start, series, family, state``) of
        panes final at the emitted watermark that a window not yet final still spans (a
        sliding window across the restart).  The shards forgot those panes once they were
        stored, so they come from the store (``states(start, end)``: pane starts in
        ``[start, end)``), as one source of their own; returns how many were taken."""
        wm = self._emitted_wm
        span = self._max_size + self.pane_ms + self.cfg.label_delay_ms
        if self._max_size <= self.pane_ms or wm <= np.iinfo(np.int64).min + span:
            return 0            # no sliding window, or nothing emitted yet
        n = 0
        for st in states(wm - span, wm):
            h = self.horizon(st.family)
            if st.start + self.pane_ms + h <= self._emitted_wm < st.start + self._max_size + h:
                self.panes[(st.start, st.series, st.family)] = {"store": st.state}
                n += 1
        return n

    @property
    def emitted_watermark(self) -> int:
        """The watermark up to which final windows have been emitted (and, in the
        publisher, stored): what the shards may forget."""
        return self._emitted_wm

    def horizon(self, family: str) -> int:
        """How long after a pane's end its ``family`` state may still change (the
        label delay for quality families, 0 for operational ones)."""
        return final_after_ms(family, self.cfg.label_delay_ms)

    def is_final(self, family: str, end_ms: int) -> bool:
        """Whether a ``family`` pane or window ending at ``end_ms`` is final now."""
        return self.watermark >= end_ms + self.horizon(family)

    def merged_pane(self, pane_start: int, series: SeriesKey, family: str,
                    default: MetricState | None = None) -> MetricState | None:
        """One state for a time pane: the latest state of every source, merged (a
        source that sent nothing new for the pane still counts with what it sent
        before); a copy, so the caller may keep it.  ``default`` if no source has it."""
        states = list(self.panes.get((pane_start, series, family), {}).values())
        if not states:
            return None if default is None else default.copy()
        st = states[0].copy()
        for other in states[1:]:
            st.merge(other)
        return st

    # ------------------------------------------------------------- windows
    @staticmethod
    def _window_starts(w: WindowSpec, pane: int) -> range:
        """Starts of the windows of ``w`` that contain the pane starting at ``pane``."""
        last = pane - pane % w.step
        return range(last - (w.size - w.step), last + 1, w.step)

    def _merged_windows(self, select=None):
        """{(window, start, series, family): merged state} over all stored panes."""
        out: dict[tuple[str, int, SeriesKey, str], MetricState] = {}
        chosen: dict[tuple[str, int, str], bool] = {}   # select() once per window and family
        for (pane, series, family), by_src in self.panes.items():
            for w in self.time_windows:
                for start in self._window_starts(w, pane):
                    key = (w.name, start, series, family)
                    if select is not None:
                        ck = (w.name, start, family)
                        ok = chosen.get(ck)
                        if ok is None:
                            ok = chosen[ck] = bool(select(w, start, family))
                        if not ok:
                            continue
                    keys = (key,) if self._all is None or not series[4] else (
                        key, (w.name, start, (*series[:4], self._all), family))
                    for k in keys:
                        for st in by_src.values():
                            cur = out.get(k)
                            out[k] = st.copy() if cur is None else cur.merge(st)
        return out

    def _rows(self, merged: dict, wm: int, final: bool) -> list[dict]:
        rows = []
        sizes = {w.name: w.size for w in self.time_windows}
        for (wname, start, series, family), st in merged.items():
            end = start + sizes[wname]
            prov = (not final) and wm < end + self.horizon(family)
            labels = _label_cols(series)
            for metric, (value, count, labelled) in st.value().items():
                rows.append({"window": wname, "window_start": start, "window_end": end,
                             "metric": metric, "value": float(value), "count": int(count),
                             "labelled": None if labelled is None else int(labelled),
                             "provisional": bool(prov), **labels})
        return rows

    def _count_rows(self, keys, final_only: bool) -> list[dict]:
        rows = []
        merged: dict = {}
        for key in keys:
            name, series, idx, family = key
            by_src = self.counts[key]
            for src, (st, fin, start, end) in by_src.items():
                # count windows are per source (a shard counts its own events)
                mk = (name, series, idx, family, src)
                merged[mk] = (st, fin, start, end)
        for (name, series, idx, family, src), (st, fin, start, end) in merged.items():
            if final_only and not fin:
                continue
            labels = _label_cols(series)
            for metric, (value, count, labelled) in st.value().items():
                rows.append({"window": name, "window_start": start, "window_end": end,
                             "metric": metric, "value": float(value), "count": int(count),
                             "labelled": None if labelled is None else int(labelled),
                             "provisional": not fin, **labels})
        return rows

    # -------------------------------------------------------------- output
    def current_rows(self, touched_panes: Iterable[int] | None = None) -> list[dict]:
        """Windows held now, final or provisional (the live query view).

        With ``touched_panes`` (pane starts), only the windows containing one
        of them: what changed since the last look, without re-merging the rest.
        """
        wm = self.watermark
        select = None
        if touched_panes is not None:
            wanted = {(w.name, start) for p in set(touched_panes) for w in self.time_windows
                      for start in self._window_starts(w, p)}
            select = lambda w, start, family: (w.name, start) in wanted  # noqa: E731
        return self._rows(self._merged_windows(select), wm, final=False) + self._count_rows(
            list(self.counts), final_only=False)

    def closed_rows(self, touched_panes: Iterable[int], since_wm: int) -> list[dict]:
        """Rows of the *closed* time windows: the watermark has passed their end, so no
        inference can join them any more (quality values stay provisional until the label
        deadline).  Those containing a touched pane, and those closed since ``since_wm``.

        This is what a gauge and an alert rule see (:class:`~kpistream.windows.publish.
        PublishStep`): a sliding window is shown whole, never the window that has just
        opened on the pane in progress.  Count windows: every one held (as
        :meth:`current_rows`).
        """
        wm = self.watermark
        wanted = {(w.name, start) for p in set(touched_panes) for w in self.time_windows
                  for start in self._window_starts(w, p)}

        def select(w: WindowSpec, start: int, family: str) -> bool:
            end = start + w.size
            return end <= wm and (end > since_wm or (w.name, start) in wanted)

        return self._rows(self._merged_windows(select), wm, final=False) + self._count_rows(
            list(self.counts), final_only=False)

    def final_states(self, family: str, windows: Iterable[str] | None = None) -> dict:
        """``{(window, start, series): merged state}`` of the ``family`` windows that the
        next :meth:`pop_final_rows` emits as final (call it first; nothing changes here)."""
        wm, lo = self.watermark, self._emitted_wm
        names = None if windows is None else set(windows)

        def select(w: WindowSpec, start: int, fam: str) -> bool:
            return fam == family and (names is None or w.name in names) \
                and lo < start + w.size + self.horizon(fam) <= wm

        return {(k[0], k[1], k[2]): st for k, st in self._merged_windows(select).items()}

    def pop_final_rows(self) -> list[dict]:
        """Rows of windows that became final since the last call; forget what is done."""
        wm = self.watermark
        lo = self._emitted_wm

        def newly_final(w: WindowSpec, start: int, family: str) -> bool:
            t = start + w.size + self.horizon(family)
            return lo < t <= wm

        rows = self._rows(self._merged_windows(newly_final), wm, final=True)
        # count windows: emit and drop the final ones
        done = [k for k, by in self.counts.items() if all(v[1] for v in by.values())]
        rows += self._count_rows(done, final_only=True)
        for k in done:
            del self.counts[k]
        # panes no window still needs
        keep_after = self._max_size + self.pane_ms + self.cfg.label_delay_ms
        if wm > np.iinfo(np.int64).min + keep_after:
            for key in [k for k in self.panes if k[0] + keep_after <= wm]:
                del self.panes[key]
        # never back: a source that reports late must not re-emit final windows
        self._emitted_wm = max(self._emitted_wm, wm)
        return rows


def rows_frame(rows: list[dict], segments: Iterable[str] = ()) -> pd.DataFrame:
    """Tidy rows as a DataFrame with UTC timestamps and a stable column order."""
    label_cols = list(BASE_LABELS) + [s for s in segments]
    cols = list(ROW_COLUMNS) + label_cols
    df = pd.DataFrame(rows, columns=cols)
    for c in ("window_start", "window_end"):
        df[c] = pd.to_datetime(df[c].astype("int64"), unit="ms", utc=True)
    df["labelled"] = df["labelled"].astype("Int64")
    df["count"] = df["count"].astype("int64")
    df["value"] = df["value"].astype("float64")
    df["provisional"] = df["provisional"].astype(bool)
    return df.sort_values(["window", "window_start", *label_cols, "metric"],
                          kind="stable").reset_index(drop=True)
