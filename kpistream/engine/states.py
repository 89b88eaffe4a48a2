"""Mergeable metric states: one small class per KPI family.

Each state holds sufficient statistics only (counts, sums, a confusion
matrix, a quantile sketch), so that merging the states of any partition of a
stream gives exactly the state of the whole stream.  Every state has

- ``update(cols)`` — fold in a batch of columns (numpy arrays, vectorized);
- ``update_grouped(states, group, cols)`` — classmethod: the same for many
  states at once (one state per group code), one vectorized pass;
- ``merge(other)`` — in place, returns self;
- ``value()`` — ``{kpi name: (value, count, labelled)}`` with the KPI names of
  DESIGN.md; ``labelled`` is None for operational KPIs;
- ``copy()``; and it pickles (Ray pickles it).

``horizon`` says when the state of a window is final: ``"inference"`` states
(traffic, latency, cost) when the watermark passes the window end,
``"label"`` states (quality and feedback) when it passes the window end plus
the label delay.

Update inputs (all numpy arrays of one length):

- inference-side: ``error`` (bool), ``latency`` (float64), ``cost_usd`` and
  ``tokens`` (float64, NaN = absent), ``task`` (int8, see TASK_*);
- join-side, one row per (inference, feedback) pair already filtered to the
  pairs that count: see each class.
"""

from __future__ import annotations

from typing import ClassVar, Mapping, Sequence

import numpy as np

from kpistream.errors import StateError
from kpistream.engine.sketch import QuantileSketch

TASK_NONE, TASK_CLASSIFICATION, TASK_REGRESSION, TASK_RANKING = 0, 1, 2, 3
QUANTILES: tuple[tuple[str, float], ...] = (
    ("latency_p50", 0.5), ("latency_p90", 0.9), ("latency_p99", 0.99), ("latency_p999", 0.999))

Value = tuple[float, int, "int | None"]


def _group_sums(group: np.ndarray, n_groups: int, weights: Sequence[np.ndarray | None]) -> np.ndarray:
    """(n_groups, len(weights)) sums; a None weight counts rows."""
    out = np.empty((n_groups, len(weights)), dtype=np.float64)
    for j, w in enumerate(weights):
        out[:, j] = np.bincount(group, weights=w, minlength=n_groups)
    return out


class MetricState:
    """Base class: the interface every state follows."""

    family: ClassVar[str] = ""
    horizon: ClassVar[str] = "inference"
    __slots__ = ()

    def update(self, cols: Mapping[str, np.ndarray]) -> None:
        n = len(next(iter(cols.values()))) if cols else 0
        type(self).update_grouped([self], np.zeros(n, dtype=np.intp), cols)

    @classmethod
    def update_grouped(cls, states: Sequence["MetricState"], group: np.ndarray,
                       cols: Mapping[str, np.ndarray]) -> None:
        raise NotImplementedError

    def merge(self, other: "MetricState") -> "MetricState":
        raise NotImplementedError

    def value(self) -> dict[str, Value]:
        raise NotImplementedError

    def copy(self) -> "MetricState":
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        raise NotImplementedError

    def _check(self, other: "MetricState") -> None:
        if type(other) is not type(self):
            raise StateError(f"cannot merge {type(other).__name__} into {type(self).__name__}")


class SumsState(MetricState):
    """A fixed vector of sums: the sufficient statistics of ratio-of-sums KPIs."""

    STATS: ClassVar[tuple[str, ...]] = ()
    __slots__ = ("s",)

    def __init__(self) -> None:
        self.s = np.zeros(len(self.STATS), dtype=np.float64)

    @classmethod
    def weights(cls, cols: Mapping[str, np.ndarray]) -> list[np.ndarray | None]:
        raise NotImplementedError

    @classmethod
    def observe_weights(cls, cols: Mapping[str, np.ndarray]) -> list[np.ndarray | None]:
        """Inference-side weights of families that count inferences (see FeedbackState)."""
        raise NotImplementedError

    @classmethod
    def observe_grouped(cls, states, group, cols) -> None:
        sums = _group_sums(group, len(states), cls.observe_weights(cols))
        for st, row in zip(states, sums):
            st.s += row

    @classmethod
    def update_grouped(cls, states, group, cols) -> None:
        if not len(group):
            return
        sums = _group_sums(group, len(states), cls.weights(cols))
        for st, row in zip(states, sums):
            st.s += row

    def merge(self, other):
        self._check(other)
        self.s += other.s
        return self

    def copy(self):
        c = type(self).__new__(type(self))
        c.s = self.s.copy()
        return c

    def __getstate__(self):
        return self.s.tolist()

    def __setstate__(self, state):
        self.s = np.asarray(state, dtype=np.float64)

    def __eq__(self, other):
        return type(other) is type(self) and np.array_equal(self.s, other.s)

    @property
    def nbytes(self) -> int:
        return self.s.nbytes

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(zip(self.STATS, self.s.tolist()))})"


# ---------------------------------------------------------------------------
# operational families (inference side)

class TrafficState(SumsState):
    """requests and error_rate. cols: ``error`` (bool)."""

    family = "traffic"
    STATS = ("requests", "errors")
    __slots__ = ()

    @classmethod
    def weights(cls, cols):
        return [None, cols["error"].astype(np.float64)]

    def value(self):
        n, e = self.s
        if not n:
            return {}
        return {"requests": (float(n), int(n), None), "error_rate": (float(e / n), int(n), None)}


class CostState(SumsState):
    """cost_per_1k (USD per 1000 inferences reporting cost) and tokens_mean.

    cols: ``cost_usd``, ``tokens`` (NaN where a request reported none).
    """

    family = "cost"
    STATS = ("usd_n", "usd_sum", "tokens_n", "tokens_sum")
    __slots__ = ()

    @classmethod
    def weights(cls, cols):
        usd, tok = cols["cost_usd"], cols["tokens"]
        has_u, has_t = ~np.isnan(usd), ~np.isnan(tok)
        return [has_u.astype(np.float64), np.where(has_u, usd, 0.0),
                has_t.astype(np.float64), np.where(has_t, tok, 0.0)]

    def value(self):
        un, us, tn, ts = self.s
        out = {}
        if un:
            out["cost_per_1k"] = (1000.0 * us / un, int(un), None)
        if tn:
            out["tokens_mean"] = (ts / tn, int(tn), None)
        return out


class LatencyState(MetricState):
    """latency_mean and latency quantiles from a relative-error sketch.

    cols: ``latency`` (ms, finite, >= 0).  The quantiles carry the sketch's
    guarantee: within ``relative_accuracy`` (1%) of the exact lower quantile.
    """

    family = "latency"
    __slots__ = ("sketch", "total")

    def __init__(self, relative_accuracy: float = 0.01) -> None:
        self.sketch = QuantileSketch(relative_accuracy)
        self.total = 0.0

    @classmethod
    def update_grouped(cls, states, group, cols) -> None:
        if not len(group):
            return
        lat = cols["latency"]
        QuantileSketch.update_grouped([s.sketch for s in states], group, lat)
        sums = np.bincount(group, weights=lat, minlength=len(states))
        for st, v in zip(states, sums):
            st.total += float(v)

    def merge(self, other):
        self._check(other)
        self.sketch.merge(other.sketch)
        self.total += other.total
        return self

    def copy(self):
        c = LatencyState.__new__(LatencyState)
        c.sketch = self.sketch.copy()
        c.total = self.total
        return c

    def __getstate__(self):
        return (self.sketch, self.total)

    def __setstate__(self, state):
        self.sketch, self.total = state

    def __eq__(self, other):
        return type(other) is LatencyState and self.sketch == other.sketch and self.total == other.total

    @property
    def nbytes(self) -> int:
        return self.sketch.nbytes + 8

    def value(self):
        n = int(self.sketch.count)
        if not n:
            return {}
        out = {"latency_mean": (self.total / n, n, None)}
        qs = self.sketch.quantiles([q for _, q in QUANTILES])
        for (name, _), v in zip(QUANTILES, qs):
            out[name] = (float(v), n, None)
        return out


# ---------------------------------------------------------------------------
# quality families (join side; attributed to the inference's window)

class ClassificationState(MetricState):
    """accuracy, precision / recall / f1 (positive label; macro, micro, weighted).

    A confusion matrix over a label vocabulary (rows: true, columns:
    predicted).  ``labels`` is the vocabulary of the series (owned by the
    engine, append-only, shared by its states so that pickling keeps the
    sharing); :meth:`detach` gives a copy owning a trimmed vocabulary, to
    leave the engine.  Merging aligns different vocabularies by label.

    cols: ``true`` and ``pred`` (int codes into labels).
    """

    family = "classification"
    horizon = "label"
    __slots__ = ("conf", "labels", "positive")

    def __init__(self, labels: list[str] | None = None, positive: str | None = None) -> None:
        self.labels = labels if labels is not None else []
        self.conf = np.zeros((0, 0), dtype=np.int64)
        self.positive = positive

    def _grow(self, c: int) -> None:
        k = self.conf.shape[0]
        if c > k:
            m = np.zeros((c, c), dtype=np.int64)
            m[:k, :k] = self.conf
            self.conf = m

    @classmethod
    def update_grouped(cls, states, group, cols) -> None:
        if not len(group):
            return
        t, p = cols["true"].astype(np.int64), cols["pred"].astype(np.int64)
        c = int(max(t.max(), p.max())) + 1
        flat = np.bincount((group * c + t) * c + p, minlength=len(states) * c * c)
        flat = flat.reshape(len(states), c, c)
        for st, m in zip(states, flat):
            used = np.flatnonzero(m.any(axis=0) | m.any(axis=1))
            k = int(used[-1]) + 1 if len(used) else 0
            st._grow(k)
            st.conf[:k, :k] += m[:k, :k]

    def detach(self) -> "ClassificationState":
        """A copy that owns a trimmed copy of its vocabulary (to leave the engine)."""
        c = self.copy()
        c.labels = list(self.labels[: c.conf.shape[0]])
        return c

    def merge(self, other):
        self._check(other)
        k = other.conf.shape[0]
        if other.labels is self.labels or other.labels[:k] == self.labels[:k]:
            self._grow(k)
            if len(self.labels) < k:
                self.labels = list(self.labels) + list(other.labels[len(self.labels):k])
            self.conf[:k, :k] += other.conf
            return self
        # different vocabularies: align by label string
        index = {lab: i for i, lab in enumerate(self.labels)}
        self.labels = list(self.labels)
        for lab in other.labels[:k]:
            if lab not in index:
                index[lab] = len(self.labels)
                self.labels.append(lab)
        m = np.array([index[lab] for lab in other.labels[:k]], dtype=np.int64)
        self._grow(len(self.labels))
        np.add.at(self.conf, (m[:, None], m[None, :]), other.conf)
        return self

    def copy(self):
        c = ClassificationState.__new__(ClassificationState)
        c.conf, c.labels, c.positive = self.conf.copy(), self.labels, self.positive
        return c

    def __getstate__(self):
        # the vocabulary list itself: inside one pickled engine its states keep
        # sharing their series' list (a trimmed copy would go stale)
        return (self.conf, self.labels, self.positive)

    def __setstate__(self, state):
        self.conf, self.labels, self.positive = state

    def __eq__(self, other):
        return type(other) is ClassificationState and _label_table(self) == _label_table(other)

    @property
    def nbytes(self) -> int:
        return self.conf.nbytes + 16

    def value(self):
        n = int(self.conf.sum())
        out: dict[str, Value] = {}
        if not n:
            return out
        m = self.conf
        k = m.shape[0]
        tp = np.diag(m).astype(np.float64)
        support = m.sum(axis=1).astype(np.float64)   # true counts
        predicted = m.sum(axis=0).astype(np.float64)
        out["accuracy"] = (float(tp.sum() / n), n, n)
        present = (support > 0) | (predicted > 0)
        labels = self.labels[:k]
        pos = self.positive
        # decided from this window's own matrix, so that it never depends on
        # other windows, other models or how the stream was sharded
        i = labels.index(pos) if pos is not None and pos in labels else -1
        has_pos = i >= 0 and bool(present[i])
        if has_pos:
            # zero_division=0, as scikit-learn's precision_recall_fscore_support
            p = tp[i] / predicted[i] if predicted[i] else 0.0
            r = tp[i] / support[i] if support[i] else 0.0
            f = 2 * p * r / (p + r) if (p + r) else 0.0
            out["precision"] = (float(p), n, n)
            out["recall"] = (float(r), n, n)
            out["f1"] = (float(f), n, n)
        if int(present.sum()) > 2 or not has_pos:
            with np.errstate(invalid="ignore", divide="ignore"):
                prec = np.where(predicted > 0, tp / np.where(predicted > 0, predicted, 1), 0.0)
                rec = np.where(support > 0, tp / np.where(support > 0, support, 1), 0.0)
                f1 = np.where(prec + rec > 0, 2 * prec * rec / np.where(prec + rec > 0, prec + rec, 1), 0.0)
            w = support[present] / support[present].sum()
            for name, arr in (("precision", prec), ("recall", rec), ("f1", f1)):
                out[f"{name}_macro"] = (float(arr[present].mean()), n, n)
                out[f"{name}_weighted"] = (float((arr[present] * w).sum()), n, n)
            micro = tp.sum() / n  # single-label multiclass: micro P = R = F1 = accuracy
            for name in ("precision", "recall", "f1"):
                out[f"{name}_micro"] = (float(micro), n, n)
        return out


def _label_table(s: ClassificationState) -> dict:
    k = s.conf.shape[0]
    nz = np.argwhere(s.conf > 0)
    return {(s.labels[i], s.labels[j]): int(s.conf[i, j]) for i, j in nz if i < k and j < k}


class RegressionState(SumsState):
    """mae and rmse. cols: ``pred``, ``true`` (float64)."""

    family = "regression"
    horizon = "label"
    STATS = ("n", "abs_sum", "sq_sum")
    __slots__ = ()

    @classmethod
    def weights(cls, cols):
        err = cols["pred"] - cols["true"]
        return [None, np.abs(err), err * err]

    def value(self):
        n, a, q = self.s
        out: dict[str, Value] = {}
        if n:
            out["mae"] = (a / n, int(n), int(n))
            out["rmse"] = (float(np.sqrt(q / n)), int(n), int(n))
        return out


class RankingState(SumsState):
    """precision_at_k, recall_at_k, ndcg_at_k, mrr (MRR@K).

    cols: per labelled ranking ``p_at_k``, ``r_at_k`` (NaN where the request
    has no relevant item: excluded from recall), ``ndcg``, ``rr``.
    """

    family = "ranking"
    horizon = "label"
    STATS = ("n", "p_sum", "r_n", "r_sum", "ndcg_sum", "rr_sum")
    __slots__ = ()

    @classmethod
    def weights(cls, cols):
        r = cols["r_at_k"]
        has_r = ~np.isnan(r)
        return [None, cols["p_at_k"], has_r.astype(np.float64),
                np.where(has_r, r, 0.0), cols["ndcg"], cols["rr"]]

    def value(self):
        n, p, rn, r, g, rr = self.s
        out: dict[str, Value] = {}
        if n:
            out["precision_at_k"] = (p / n, int(n), int(n))
            out["ndcg_at_k"] = (g / n, int(n), int(n))
            out["mrr"] = (rr / n, int(n), int(n))
        if rn:
            out["recall_at_k"] = (r / rn, int(rn), int(rn))
        return out


class FeedbackState(SumsState):
    """label_coverage, thumbs_up_rate, ctr, conversion_rate, dwell_mean, reward_mean.

    ``observe_grouped`` counts inferences (``n_inf``, the denominator of ctr
    and conversion_rate) and those with a prediction that can be labelled
    (``n_task``, the denominator of label_coverage; cols ``has_task``).
    Join-side cols: ``kind`` (KIND_* codes), ``value`` (float64), already
    reduced to the pairs that count: the first label (or relevance list) per
    inference, the first true click / conversion per inference, every
    thumbs, dwell and reward event.
    """

    family = "feedback"
    horizon = "label"
    STATS = ("n_inf", "n_task", "labelled", "thumbs_n", "thumbs_up", "clicks", "conversions",
             "dwell_n", "dwell_sum", "reward_n", "reward_sum")
    __slots__ = ()

    @classmethod
    def observe_weights(cls, cols):
        n = len(cols["has_task"])
        z = np.zeros(n)
        return [None, cols["has_task"].astype(np.float64)] + [z] * (len(cls.STATS) - 2)

    @classmethod
    def weights(cls, cols):
        from kpistream.wire.batch import (KIND_CLICK, KIND_CONVERSION, KIND_DWELL, KIND_LABEL, KIND_RELEVANCE,
                            KIND_REWARD, KIND_THUMBS)

        k, v = cols["kind"], cols["value"]
        th, dw, rw = k == KIND_THUMBS, k == KIND_DWELL, k == KIND_REWARD
        f = np.float64
        z = np.zeros(len(k))
        return [z, z, ((k == KIND_LABEL) | (k == KIND_RELEVANCE)).astype(f),
                th.astype(f), np.where(th, v, 0.0), (k == KIND_CLICK).astype(f),
                (k == KIND_CONVERSION).astype(f), dw.astype(f), np.where(dw, v, 0.0),
                rw.astype(f), np.where(rw, v, 0.0)]

    def value(self):
        n_inf, n_task, lab, tn, tu, cl, cv, dn, ds, rn, rs = self.s
        out: dict[str, Value] = {}
        if n_task:
            out["label_coverage"] = (lab / n_task, int(n_task), int(lab))
        if tn:
            out["thumbs_up_rate"] = (tu / tn, int(tn), int(tn))
        # a window without any click (conversion) has no row: the engine cannot
        # tell "no clicks" from "clicks not tracked for this model"
        if n_inf and cl:
            out["ctr"] = (cl / n_inf, int(n_inf), int(cl))
        if n_inf and cv:
            out["conversion_rate"] = (cv / n_inf, int(n_inf), int(cv))
        if dn:
            out["dwell_mean"] = (ds / dn, int(dn), int(dn))
        if rn:
            out["reward_mean"] = (rs / rn, int(rn), int(rn))
        return out


def deep_size(obj) -> int:
    """Bytes a state really holds in memory: its data plus the Python objects around it."""
    import sys

    seen: set[int] = set()

    def size(o) -> int:
        if id(o) in seen or isinstance(o, type):  # classes are shared, not state
            return 0
        seen.add(id(o))
        if isinstance(o, np.ndarray):
            return sys.getsizeof(o)  # header + data for arrays owning their data
        n = sys.getsizeof(o)
        if isinstance(o, (list, tuple)) and not (o and isinstance(o[0], str)):
            n += sum(size(x) for x in o)
        slots = [a for c in type(o).__mro__ for a in getattr(c, "__slots__", ())]
        for a in slots:
            if a != "labels" and hasattr(o, a):  # the label vocabulary is shared
                n += size(getattr(o, a))
        if hasattr(o, "__dict__"):
            n += sum(size(v) for v in vars(o).values())
        return n

    return size(obj)


class SeriesFlags:
    """Per-series flags of a pane's family table: live (has data) and dirty (changed since
    the last collect).  The shared part of :class:`SumsTable` and the paired table."""

    __slots__ = ("flags",)
    _LIVE, _DIRTY = 1, 2

    def sids(self, dirty_only: bool = False) -> list[int]:
        return np.flatnonzero(self.flags & (self._DIRTY if dirty_only else self._LIVE)).tolist()

    @property
    def dirty(self) -> bool:
        return bool((self.flags & self._DIRTY).any())

    def clean(self) -> None:
        self.flags &= self._LIVE


class SumsTable(SeriesFlags):
    """The states of one sums family for every series of one pane, as one array.

    Row ``sid`` is the ``s`` vector of series ``sid``'s state: one array per
    pane and family instead of one object per series keeps the engine's
    memory per series at a few dozen bytes and updates every series of a
    batch with one vectorized add.  :meth:`state` hands out a detached
    :class:`SumsState` (the unit that travels and merges).
    """

    __slots__ = ("cls", "arr")

    def __init__(self, cls: type[SumsState], n_series: int) -> None:
        self.cls = cls
        self.arr = np.zeros((max(n_series, 4), len(cls.STATS)), dtype=np.float64)
        self.flags = np.zeros(len(self.arr), dtype=np.uint8)

    def _fit(self, sids: np.ndarray) -> None:
        need = int(sids.max()) + 1
        if need > len(self.arr):
            n = max(need, 2 * len(self.arr))
            self.arr = _grow_rows(self.arr, n)
            self.flags = _grow_rows(self.flags, n)

    def add(self, sids: np.ndarray, sums: np.ndarray) -> None:
        """Add ``sums[i]`` to series ``sids[i]`` (distinct sids)."""
        self._fit(sids)
        self.arr[sids] += sums
        self.flags[sids] = self._LIVE | self._DIRTY

    def state(self, sid: int) -> SumsState:
        st = self.cls.__new__(self.cls)
        st.s = self.arr[sid].copy()
        return st

    @property
    def nbytes(self) -> int:
        return self.arr.nbytes + self.flags.nbytes


def _grow_rows(a: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros((n, *a.shape[1:]), dtype=a.dtype)
    out[: len(a)] = a
    return out


def sums_for(cls: type[SumsState], gid: np.ndarray, n_groups: int, cols, observe: bool) -> np.ndarray:
    """(n_groups, n_stats) sums of a batch for a sums family (``observe``: inference side)."""
    return _group_sums(gid, n_groups, cls.observe_weights(cols) if observe else cls.weights(cols))
