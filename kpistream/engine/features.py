"""Family ``features``: a uniform, mergeable sample of the sampled inputs, for input-drift tests.

Inference events may carry ``features`` (``{name: number | str | bool | null}``).
Per series and pane, :class:`FeatureSampleState` keeps a *bottom-k sample*:
the ``k`` featured rows with the smallest hash of their event id (the
engine's 64-bit keyed hash, uniform and independent of arrival order,
batching and sharding).  Merging two states is the union of their rows, then
the ``k`` smallest hashes again, so

- merging the states of any partition of a stream gives exactly the state
  of the whole stream (the same rows, the same values);
- the sample is a uniform sample without replacement of the featured rows
  (every set of ``k`` rows is equally likely), whatever the partition.

Rows with the same hash are the same event (the engine deduplicates events
before; a repeat is kept once, the first seen).

Values: numbers (and booleans, as 1.0 / 0.0) become float64 columns with NaN
where a row lacks the feature; strings become object columns with None where
missing (a feature with strings and numbers is an object column holding
both).  A row with more than ``max_features`` features keeps the
``max_features`` first names in sorted order (such rows are counted in
``n_capped``), so what a row contributes never depends on other rows.
Other value types are ignored.

Tidy rows (:meth:`FeatureSampleState.value`): ``features_seen`` (featured
inferences in the pane) and ``features_sampled`` (rows in the sample), both
with ``count`` = featured inferences.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from kpistream.engine.states import MetricState, Value

_EMPTY_H = np.zeros(0, dtype=np.uint64)


def _cell(v: Any) -> float | str | None:
    if v is None:
        return None
    if isinstance(v, str):
        return v
    if isinstance(v, (bool, int, float, np.integer, np.floating, np.bool_)):
        x = float(v)
        return None if math.isnan(x) else x
    return None


def _column(cells: list) -> np.ndarray:
    """float64 (NaN missing) if every present cell is a number, else object (None missing)."""
    if all(c is None or isinstance(c, float) for c in cells):
        return np.array([np.nan if c is None else c for c in cells], dtype=np.float64)
    out = np.empty(len(cells), dtype=object)
    out[:] = cells
    return out


def _as_object(col: np.ndarray) -> np.ndarray:
    if col.dtype == object:
        return col
    out = np.empty(len(col), dtype=object)
    out[:] = [None if math.isnan(x) else x for x in col.tolist()]
    return out


def _missing(n: int, obj: bool) -> np.ndarray:
    if obj:
        return np.full(n, None, dtype=object)
    return np.full(n, np.nan, dtype=np.float64)


def _normalize(names: list[str], values: list[np.ndarray]) -> tuple[list[str], list[np.ndarray]]:
    """Drop columns without a value; object columns holding numbers only become float64."""
    out_n, out_v = [], []
    for name, col in zip(names, values):
        if col.dtype == object:
            present = [c for c in col.tolist() if c is not None]
            if not present:
                continue
            if all(isinstance(c, float) for c in present):
                col = np.array([np.nan if c is None else c for c in col.tolist()], dtype=np.float64)
        elif not len(col) or np.isnan(col).all():
            continue
        out_n.append(name)
        out_v.append(col)
    return out_n, out_v


class FeatureSampleState(MetricState):
    """Bottom-k sample (by event-id hash) of featured inferences of one series and pane.

    cols for :meth:`update` / :meth:`update_grouped`: ``hash`` (uint64 event
    id hashes) and ``features`` (a sequence of dict-or-None, one per row).
    """

    family = "features"
    horizon = "inference"
    __slots__ = ("k", "max_features", "n_seen", "n_capped", "hashes", "names", "values")

    def __init__(self, k: int = 256, max_features: int = 64) -> None:
        if k < 1 or max_features < 1:
            raise ValueError("k and max_features must be >= 1")
        self.k = int(k)
        self.max_features = int(max_features)
        self.n_seen = 0          # featured rows seen
        self.n_capped = 0        # of which had more than max_features features
        self.hashes = _EMPTY_H   # sorted ascending, distinct, at most k
        self.names: list[str] = []            # sorted
        self.values: list[np.ndarray] = []    # one column per name, aligned with hashes

    # -- update ----------------------------------------------------------------
    def update(self, cols: Mapping[str, Any]) -> None:
        n = len(cols["hash"])
        type(self).update_grouped([self], np.zeros(n, dtype=np.intp), cols)

    @classmethod
    def update_grouped(cls, states: Sequence["FeatureSampleState"], group: np.ndarray,
                       cols: Mapping[str, Any]) -> None:
        feats = cols.get("features")
        if feats is None or not len(group):
            return
        h = np.asarray(cols["hash"], dtype=np.uint64)
        lens = np.fromiter((-1 if f is None else len(f) for f in feats), dtype=np.int64,
                           count=len(feats))
        rows = np.flatnonzero(lens >= 0)
        if not len(rows):
            return
        g = np.asarray(group, dtype=np.int64)[rows]
        hr = h[rows]
        order = np.lexsort((hr, g))             # by group, then hash; stable: first seen first
        gs, hs, rs = g[order], hr[order], rows[order]
        bounds = np.flatnonzero(np.r_[True, gs[1:] != gs[:-1], True])
        for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            st = states[int(gs[lo])]
            st.n_seen += hi - lo
            st.n_capped += int((lens[rs[lo:hi]] > st.max_features).sum())
            seg_h = hs[lo:hi]
            first = np.r_[True, seg_h[1:] != seg_h[:-1]]
            seg_h, seg_r = seg_h[first][: st.k], rs[lo:hi][first][: st.k]
            if len(st.hashes) >= st.k:          # only rows below the current k-th hash can enter
                keep = seg_h < st.hashes[-1]
                seg_h, seg_r = seg_h[keep], seg_r[keep]
            if len(seg_h):
                st._absorb(seg_h, [feats[i] for i in seg_r.tolist()])

    def _absorb(self, hashes: np.ndarray, dicts: list) -> None:
        names: set[str] = set()
        rows = []
        for d in dicts:
            if len(d) > self.max_features:
                d = {k: d[k] for k in sorted(d)[: self.max_features]}
            r = {k: c for k, v in d.items() if (c := _cell(v)) is not None}
            names.update(r)
            rows.append(r)
        nn = sorted(names)
        other = FeatureSampleState.__new__(FeatureSampleState)
        other.k, other.max_features, other.n_seen, other.n_capped = self.k, self.max_features, 0, 0
        other.hashes = hashes
        other.names = nn
        other.values = [_column([r.get(k) for r in rows]) for k in nn]
        self._combine(other)

    # -- merge -------------------------------------------------------------------
    def _combine(self, other: "FeatureSampleState") -> None:
        """Rows of both, the k smallest distinct hashes kept (self's row on a tie)."""
        k = min(self.k, other.k)
        ha, hb = self.hashes, other.hashes
        na, nb = len(ha), len(hb)
        allh = np.concatenate([ha, hb])
        order = np.argsort(allh, kind="stable")
        sh = allh[order]
        first = np.r_[True, sh[1:] != sh[:-1]] if len(sh) else np.zeros(0, dtype=bool)
        sel = order[first][:k]
        ia = dict(zip(self.names, self.values))
        ib = dict(zip(other.names, other.values))
        names = sorted(set(ia) | set(ib))
        values = []
        for name in names:
            a, b = ia.get(name), ib.get(name)
            obj = (a is not None and a.dtype == object) or (b is not None and b.dtype == object)
            a = _missing(na, obj) if a is None else (_as_object(a) if obj else a)
            b = _missing(nb, obj) if b is None else (_as_object(b) if obj else b)
            values.append(np.concatenate([a, b])[sel])
        self.k = k
        self.hashes = allh[sel]
        self.names, self.values = _normalize(names, values)

    def merge(self, other):
        self._check(other)
        self.n_seen += other.n_seen
        self.n_capped += other.n_capped
        self._combine(other)
        return self

    def copy(self):
        c = FeatureSampleState.__new__(FeatureSampleState)
        c.k, c.max_features, c.n_seen, c.n_capped = self.k, self.max_features, self.n_seen, self.n_capped
        c.hashes = self.hashes.copy()
        c.names = list(self.names)
        c.values = [v.copy() for v in self.values]
        return c

    # -- reading -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.hashes)

    def sample(self) -> dict[str, np.ndarray]:
        """``{feature: column}`` of the sampled rows (rows in hash order, same for every column)."""
        return {n: v.copy() for n, v in zip(self.names, self.values)}

    def value(self) -> dict[str, Value]:
        if not self.n_seen:
            return {}
        n = int(self.n_seen)
        return {"features_seen": (float(n), n, None),
                "features_sampled": (float(len(self.hashes)), n, None)}

    @property
    def nbytes(self) -> int:
        return self.hashes.nbytes + sum(v.nbytes for v in self.values)

    def __getstate__(self):
        return (self.k, self.max_features, self.n_seen, self.n_capped, self.hashes,
                self.names, self.values)

    def __setstate__(self, state):
        (self.k, self.max_features, self.n_seen, self.n_capped, self.hashes,
         self.names, self.values) = state

    def __eq__(self, other):
        if type(other) is not FeatureSampleState:
            return False
        if (self.k, self.n_seen, self.n_capped, self.names) != (
                other.k, other.n_seen, other.n_capped, other.names):
            return False
        if not np.array_equal(self.hashes, other.hashes):
            return False
        for a, b in zip(self.values, other.values):
            if a.dtype != b.dtype:
                return False
            if a.dtype == object:
                if a.tolist() != b.tolist():
                    return False
            elif not np.array_equal(a, b, equal_nan=True):
                return False
        return True

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"FeatureSampleState(k={self.k}, seen={self.n_seen}, sampled={len(self.hashes)}, "
                f"features={self.names})")


__all__ = ["FeatureSampleState"]
