"""Panes: mergeable states per (pane, series, family), count-window sequences, and collect.

A time pane is the gcd of the time windows' sizes and steps, so tumbling and
sliding windows are merges of panes (:mod:`kpistream.windows.aggregate`);
count windows have panes of their own, keyed by (series, window index).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import numpy as np

from kpistream.engine.families import FAMILY_CLASSES
from kpistream.engine.features import FeatureSampleState
from kpistream.engine.states import (
    TASK_NONE, ClassificationState, LatencyState, MetricState, SumsState, SumsTable, sums_for,
)
from kpistream.engine.watermark import I64_MIN
from kpistream.spec.metrics import EngineConfig
from kpistream.wire.batch import InferenceBatch, SeriesKey

TIME = "time"


@dataclass(frozen=True, slots=True)
class Partial:
    """The cumulative state of one family for one pane and series.

    ``space`` is ``"time"`` (``key`` = pane start, ms) or a count window's
    name (``key`` = window index within the series).  ``start_ms`` and
    ``end_ms`` bound the pane (time) or its events (count, end exclusive).
    """

    space: str
    key: int
    series: SeriesKey
    family: str
    state: MetricState
    final: bool
    start_ms: int
    end_ms: int


class Pane:
    __slots__ = ("states", "tables", "dirty", "start", "end", "n", "min_ts", "max_ts", "op_final",
                 "q_final")

    def __init__(self, start: int, end: int) -> None:
        self.states: dict[tuple[str, int], MetricState] = {}   # object states (latency, classes)
        self.tables: dict[str, object] = {}                     # sums families, all series
        self.dirty: set[tuple[str, int]] = set()
        self.start, self.end = start, end
        self.n = 0          # inferences (count windows)
        self.min_ts = np.iinfo(np.int64).max
        self.max_ts = I64_MIN
        self.op_final = False
        self.q_final = False


class Panes:
    """Every open pane of every space (time, each count window) and their states.

    Operational states (traffic, latency, cost) of a pane are final when the
    watermark passes its end; quality states when it passes its end plus the
    label delay.  ``vocab`` (:class:`~kpistream.engine.vocab.Vocab`) gives the
    number of series and each series' class vocabulary.
    """

    def __init__(self, cfg: EngineConfig, families: tuple[str, ...], vocab) -> None:
        self.cfg = cfg
        self.pane_ms = cfg.pane_ms
        self.families = families
        self.vocab = vocab
        self._features_on = "features" in families
        self._op_families = [f for f in families if FAMILY_CLASSES[f].horizon == "inference"
                             and f != "features"]
        # space -> key -> pane ; count windows key their panes by (series, index)
        self.panes: dict[str, dict] = {TIME: {}}
        self._cw_seq: dict[str, dict[int, int]] = {}
        for w in cfg.count_windows:
            self.panes[w.name] = {}
            self._cw_seq[w.name] = {}

    # ----------------------------------------------------------------- states
    def _new_state(self, family: str, sid: int) -> MetricState:
        if family == "latency":
            return LatencyState(self.cfg.relative_accuracy)
        if family == "classification":
            return ClassificationState(self.vocab.classes[sid], self.cfg.positive_label)
        if family == "features":
            return FeatureSampleState(self.cfg.feature_sample_size, self.cfg.max_features)
        return FAMILY_CLASSES[family]()

    def _time_pane(self, start: int) -> Pane:
        panes = self.panes[TIME]
        p = panes.get(start)
        if p is None:
            p = panes[start] = Pane(start, start + self.pane_ms)
        return p

    def groups(self, space: str, keys: np.ndarray, series: np.ndarray):
        """Compact group ids for (pane key, series) pairs and their panes."""
        if space == TIME:
            pk = keys // self.pane_ms
            lo = int(pk.min())
            span = int(pk.max()) - lo + 1
        else:
            lo = int(keys.min())
            span = int(keys.max()) - lo + 1
            pk = keys
        nser = len(self.vocab.series_keys)
        dense = (pk - lo) * nser + series
        if span * nser <= 4 * len(keys) + 4096:
            counts = np.bincount(dense, minlength=span * nser)
            present = np.flatnonzero(counts)
            remap = np.empty(span * nser, dtype=np.intp)
            remap[present] = np.arange(len(present))
            gid = remap[dense]
        else:
            present, gid = np.unique(dense, return_inverse=True)
        pkeys = present // nser + lo
        sids = (present % nser).astype(np.int64)
        if space == TIME:
            panes = [self._time_pane(int(k) * self.pane_ms) for k in pkeys]
        else:
            w = self.cfg.window(space)
            d = self.panes[space]
            panes = []
            for k, s in zip(pkeys.tolist(), sids.tolist()):
                p = d.get((s, k))
                if p is None:
                    p = d[(s, k)] = Pane(k * w.size, (k + 1) * w.size)
                panes.append(p)
        return gid, panes, sids

    def states(self, family: str, panes: list[Pane], sids: np.ndarray) -> list[MetricState]:
        out = []
        for p, s in zip(panes, sids.tolist()):
            key = (family, s)
            st = p.states.get(key)
            if st is None:
                st = p.states[key] = self._new_state(family, s)
            p.dirty.add(key)
            out.append(st)
        return out

    def update(self, space: str, family: str, panes: list[Pane], sids: np.ndarray,
               gid: np.ndarray, cols, observe: bool = False) -> None:
        """Fold rows (group ``gid`` -> (pane, series)) into a family's states.

        ``observe``: the inference-side update of a family that counts
        inferences (rate and coverage denominators).  Time panes keep sums
        families as one table over all series; count panes, latency and
        classification keep one object per series.
        """
        cls = FAMILY_CLASSES[family]
        if not len(gid):
            return
        if space == TIME and issubclass(cls, SumsState):
            sums = sums_for(cls, gid, len(panes), cols, observe)
            by_pane: dict[int, tuple[Pane, list[int]]] = {}
            for i, p in enumerate(panes):
                by_pane.setdefault(id(p), (p, []))[1].append(i)
            for p, idx in by_pane.values():
                t = p.tables.get(family)
                if t is None:
                    t = p.tables[family] = SumsTable(cls, len(self.vocab.series_keys))
                t.add(sids[idx], sums[idx])
            return
        states = self.states(family, panes, sids)
        if observe:
            cls.observe_grouped(states, gid, cols)
        else:
            cls.update_grouped(states, gid, cols)

    def spaces(self, ts: np.ndarray, cw_keys: Mapping[str, np.ndarray]
               ) -> Iterator[tuple[str, np.ndarray]]:
        """(space, keys) for every space: time panes (``ts``: pane starts), then each count window."""
        yield TIME, ts
        for w in self.cfg.count_windows:
            yield w.name, cw_keys[w.name]

    # -------------------------------------------------------------- inferences
    def count_keys(self, series: np.ndarray) -> dict[str, np.ndarray]:
        """Per count window: the window index of each inference (sequence numbers per series,
        in arrival order)."""
        cw_keys = {}
        for w in self.cfg.count_windows:
            seq_state = self._cw_seq[w.name]
            order = np.argsort(series, kind="stable")
            ss = series[order]
            starts = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]])
            rank = np.arange(len(ss)) - np.repeat(starts, np.diff(np.r_[starts, len(ss)]))
            base = np.array([seq_state.get(int(s), 0) for s in ss[starts]], dtype=np.int64)
            seq = np.empty(len(ss), dtype=np.int64)
            seq[order] = np.repeat(base, np.diff(np.r_[starts, len(ss)])) + rank
            for s, last in zip(ss[starts].tolist(), (base + np.diff(np.r_[starts, len(ss)])).tolist()):
                seq_state[s] = last
            cw_keys[w.name] = seq // w.size
        return cw_keys

    def add_inferences(self, b: InferenceBatch, series: np.ndarray, task: np.ndarray,
                       pane_start: np.ndarray, cw_keys: Mapping[str, np.ndarray],
                       arms: Callable | None = None) -> None:
        """Operational and denominator updates of accepted inferences, per space.

        ``arms(gid, panes, sids)``: the paired family's arm sums, on time panes.
        """
        cols = {"error": b.error, "latency": b.latency_ms, "cost_usd": b.cost_usd,
                "tokens": b.tokens, "has_task": task != TASK_NONE}
        feat_rows = None
        if self._features_on and b.features is not None:
            has = np.fromiter((f is not None for f in b.features), dtype=bool, count=len(b))
            feat_rows = np.flatnonzero(has) if has.any() else None
        ts = b.ts
        for space, keys in self.spaces(pane_start, cw_keys):
            gid, panes, sids = self.groups(space, keys, series)
            for f in self._op_families:
                self.update(space, f, panes, sids, gid, cols)
            if arms is not None and space == TIME:
                arms(gid, panes, sids)
            if feat_rows is not None:
                fgid, fpanes, fsids = self.groups(space, keys[feat_rows], series[feat_rows])
                FeatureSampleState.update_grouped(
                    self.states("features", fpanes, fsids), fgid,
                    {"hash": b.event_id[feat_rows], "features": [b.features[i] for i in feat_rows]})
            if space != TIME:
                cnt = np.bincount(gid, minlength=len(panes))
                mx = np.full(len(panes), I64_MIN, dtype=np.int64)
                np.maximum.at(mx, gid, ts)
                mn = np.full(len(panes), np.iinfo(np.int64).max, dtype=np.int64)
                np.minimum.at(mn, gid, ts)
                for p, k_, m_, n_ in zip(panes, cnt.tolist(), mx.tolist(), mn.tolist()):
                    p.n += k_
                    p.max_ts = max(p.max_ts, m_)
                    p.min_ts = min(p.min_ts, n_)
            # rate and label-coverage denominators
            if "feedback" in self.families:
                self.update(space, "feedback", panes, sids, gid, cols, observe=True)

    # ----------------------------------------------------------------- collect
    def collect(self, wm: int, flushed: bool) -> list[Partial]:
        """Cumulative partials of the panes touched since the last call; final ones are dropped."""
        delay = self.cfg.label_delay_ms
        out: list[Partial] = []
        series_keys = self.vocab.series_keys
        for space, panes in self.panes.items():
            is_time = space == TIME
            size = None if is_time else self.cfg.window(space).size
            for pkey, p in list(panes.items()):
                if is_time:
                    op_final = wm >= p.end
                    q_final = wm >= p.end + delay
                    key, sid_fixed = pkey, None
                    start, end = p.start, p.end
                else:
                    complete = p.n >= size or flushed
                    op_final = complete
                    last_pane_end = p.max_ts - p.max_ts % self.pane_ms + self.pane_ms
                    q_final = complete and (flushed or wm >= last_pane_end + delay)
                    sid_fixed, key = pkey
                    start, end = p.min_ts, p.max_ts + 1
                newly_final = (op_final and not p.op_final) or (q_final and not p.q_final)
                if not p.dirty and not newly_final and not any(t.dirty for t in p.tables.values()):
                    continue
                for (family, sid), st in list(p.states.items()):
                    fin = op_final if FAMILY_CLASSES[family].horizon == "inference" else q_final
                    if (family, sid) not in p.dirty and not fin:
                        continue
                    detached = st.detach() if isinstance(st, ClassificationState) else st.copy()
                    out.append(Partial(space, int(key), series_keys[sid], family, detached,
                                       bool(fin), int(start), int(end)))
                    if fin:
                        del p.states[(family, sid)]
                for family, t in list(p.tables.items()):
                    fin = op_final if FAMILY_CLASSES[family].horizon == "inference" else q_final
                    for sid in t.sids(dirty_only=not fin):
                        out.append(Partial(space, int(key), series_keys[sid], family,
                                           t.state(sid), bool(fin), int(start), int(end)))
                    t.clean()
                    if fin:
                        del p.tables[family]
                p.dirty.clear()
                p.op_final, p.q_final = op_final, q_final
                if not p.states and not p.tables and q_final:
                    del panes[pkey]
        return out

    def held(self) -> list[Partial]:
        """Cumulative partials of every state held now (none final, nothing marked):
        what a consumer that lost its copies (a restarted publisher) needs again."""
        out: list[Partial] = []
        series_keys = self.vocab.series_keys
        for space, panes in self.panes.items():
            is_time = space == TIME
            for pkey, p in panes.items():
                key = pkey if is_time else pkey[1]
                start, end = (p.start, p.end) if is_time else (p.min_ts, p.max_ts + 1)
                for (family, sid), st in p.states.items():
                    st = st.detach() if isinstance(st, ClassificationState) else st.copy()
                    out.append(Partial(space, int(key), series_keys[sid], family, st, False,
                                       int(start), int(end)))
                for family, t in p.tables.items():
                    for sid in t.sids():
                        out.append(Partial(space, int(key), series_keys[sid], family,
                                           t.state(sid), False, int(start), int(end)))
        return out

    # ---------------------------------------------------------------- reports
    def open_count(self) -> int:
        return sum(len(p) for p in self.panes.values())

    def state_nbytes(self, deep: bool = False) -> int:
        """Bytes of metric state held: the arrays' data, or (``deep``) with object overhead."""
        from kpistream.engine.states import deep_size

        size = deep_size if deep else (lambda st: st.nbytes)
        return sum(size(st) for panes in self.panes.values() for p in panes.values()
                   for st in (*p.states.values(), *p.tables.values()))

    def active_series(self) -> int:
        s = set()
        for panes in self.panes.values():
            for p in panes.values():
                s.update(sid for _, sid in p.states)
                for t in p.tables.values():
                    s.update(t.sids())
        return len(s)
