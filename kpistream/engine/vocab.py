"""The engine's vocabularies: series ids, paired roles, interned labels, per-series classes."""

from __future__ import annotations

from collections import Counter

import numpy as np

from kpistream.engine.paired import ROLE_CHALLENGER, ROLE_NONE, ROLE_PRIMARY
from kpistream.engine.states import (
    TASK_CLASSIFICATION, TASK_NONE, TASK_RANKING, TASK_REGRESSION,
)
from kpistream.spec.metrics import EngineConfig
from kpistream.wire.batch import BASE_LABELS, InferenceBatch, SeriesKey

OTHER = "__other__"


class Vocab:
    """Series and labels of the batches mapped to engine codes.

    Series are projected to the configured segments and capped at
    ``max_series`` (the rest become the ``__other__`` series).  Each series
    has a paired role (primary / challenger / none) and a model code.  Label
    strings are interned globally; class vocabularies are per series, capped
    at ``max_classes``.
    """

    MAX_INTERNED = 1_000_000

    def __init__(self, cfg: EngineConfig, counters: Counter) -> None:
        self.cfg = cfg
        self.counters = counters
        self.series_keys: list[SeriesKey] = []
        self._series_index: dict[SeriesKey, int] = {}
        self._raw_series_cache: dict[SeriesKey, int] = {}
        self.labels: list[str] = []                 # interned label strings (global codes)
        self._label_index: dict[str, int] = {}
        self.classes: list[list[str]] = []          # per series: its class vocabulary
        # per series: paired role (primary / challenger / none) and model code
        self.role = np.zeros(0, dtype=np.int8)
        self.model = np.zeros(0, dtype=np.int32)
        self._model_index: dict[str, int] = {}
        self.model_has_ch = np.zeros(0, dtype=bool)   # per model: a challenger series exists
        self.pairable = np.zeros(0, dtype=bool)       # per series: its model has one
        self._local_table = np.full((0, 0), -1, dtype=np.int32)
        self._overflowed: set[tuple[int, int]] = set()

    # ------------------------------------------------------------------ series
    def project(self, raw: SeriesKey) -> SeriesKey:
        segs = dict(raw[4])
        return (raw[0], raw[1], raw[2], raw[3],
                tuple((s, segs.get(s, "")) for s in self.cfg.segments))

    def series_map(self, keys: list[SeriesKey], used: np.ndarray) -> np.ndarray:
        """Engine series ids of the batch vocabulary entries ``used`` (others: -1).

        Only series of accepted rows are registered, so rejected or late rows
        never use up ``max_series``.
        """
        out = np.full(len(keys), -1, dtype=np.int32)
        cache = self._raw_series_cache
        for i in np.flatnonzero(used).tolist():
            raw = keys[i]
            sid = cache.get(raw)
            if sid is None:
                proj = self.project(raw)
                sid = self._series_index.get(proj)
                if sid is None:
                    if len(self.series_keys) >= self.cfg.max_series:
                        proj = (OTHER, OTHER, OTHER, OTHER,
                                tuple((s, OTHER) for s in self.cfg.segments))
                    sid = self._series_index.get(proj)
                    if sid is None:
                        sid = self._new_series(proj)
                if len(cache) > 100_000:
                    cache.clear()
                cache[raw] = sid
            out[i] = sid
        return out

    def batch_series(self, batch: InferenceBatch, rows: np.ndarray) -> np.ndarray:
        """:meth:`series_map` of the batch vocabulary entries that rows ``rows`` use."""
        used = np.zeros(len(batch.series_keys), dtype=bool)
        used[batch.series[rows]] = True
        return self.series_map(batch.series_keys, used)

    def _new_series(self, proj: SeriesKey) -> int:
        sid = len(self.series_keys)
        self.series_keys.append(proj)
        self._series_index[proj] = sid
        self.classes.append([])
        model = proj[0]
        m = self._model_index.setdefault(model, len(self._model_index))
        if m >= len(self.model_has_ch):
            self.model_has_ch = np.append(self.model_has_ch, False)
        if model == OTHER and proj[2] == OTHER:
            role = ROLE_NONE
        elif proj[2] == self.cfg.primary_variant:
            role = ROLE_PRIMARY
        else:
            role = ROLE_CHALLENGER
            self.model_has_ch[m] = True
        self.role = np.append(self.role, np.int8(role))
        self.model = np.append(self.model, np.int32(m))
        self.pairable = (self.role >= 0) & self.model_has_ch[self.model]
        return sid

    def series_labels(self, sid: int) -> dict[str, str]:
        k = self.series_keys[sid]
        d = dict(zip(BASE_LABELS, k[:4]))
        d.update(k[4])
        return d

    # ------------------------------------------------------------------ labels
    def label_map(self, labels: list[str]) -> np.ndarray:
        """Global codes of a batch's label vocabulary (index -1 maps to -1).

        The global table only interns strings; class vocabularies are per
        series (:meth:`local_codes`), so one model's labels (or a regression
        model's integer truths) never crowd out another's.
        """
        out = np.empty(len(labels) + 1, dtype=np.int32)
        out[-1] = -1
        for i, lab in enumerate(labels):
            c = self._label_index.get(lab)
            if c is None:
                if len(self.labels) >= self.MAX_INTERNED:
                    lab = OTHER
                    c = self._label_index.get(lab)
                if c is None:
                    c = len(self.labels)
                    self.labels.append(lab)
                    self._label_index[lab] = c
            out[i] = c
        return out

    def local_codes(self, sids: np.ndarray, g: np.ndarray) -> np.ndarray:
        """Per-series class codes of global label codes ``g`` (>= 0) for series ``sids``.

        Each series has its own vocabulary, capped at ``max_classes``; labels
        beyond the cap become ``__other__`` (counted per event).
        """
        S, G = len(self.series_keys), len(self.labels)
        lt = self._local_table
        if lt.shape[0] < S or lt.shape[1] < G:
            grown = np.full((max(S, 2 * lt.shape[0]), max(G, 2 * lt.shape[1])), -1, dtype=np.int32)
            grown[: lt.shape[0], : lt.shape[1]] = lt
            self._local_table = lt = grown
        loc = lt[sids, g]
        miss = loc < 0
        if miss.any():
            W = lt.shape[1]
            for pair in np.unique(sids[miss].astype(np.int64) * W + g[miss]).tolist():
                sid, gc = divmod(pair, W)
                labs = self.classes[sid]
                lab = self.labels[gc]
                if len(labs) >= self.cfg.max_classes - 1 and lab != OTHER:
                    if OTHER not in labs:
                        labs.append(OTHER)
                    lt[sid, gc] = labs.index(OTHER)
                    self._overflowed.add((sid, gc))
                else:
                    lt[sid, gc] = len(labs)
                    labs.append(lab)
            loc = lt[sids, g]
        if self._overflowed:
            W = lt.shape[1]
            over = np.isin(sids.astype(np.int64) * W + g,
                           [s_ * W + g_ for s_, g_ in self._overflowed])
            if over.any():
                self.counters["label_overflow"] += int(over.sum())
        return loc

    # --------------------------------------------------------------- batches
    def inference_codes(self, b: InferenceBatch, smap: np.ndarray):
        """An accepted inference batch's series ids, tasks and class predictions.

        ``smap``: :meth:`series_map` of the batch vocabulary.  Class
        predictions are in their series' own vocabulary (-1: none).
        """
        series = smap[b.series]
        n_other = len(self.series_keys) and self.series_keys[-1][0] == OTHER
        if n_other:
            self.counters["series_overflow"] += int((series == len(self.series_keys) - 1).sum())
        gpred = self.label_map(b.labels)[b.pred_label]
        # task of each inference
        rank_len = np.diff(b.rank_offsets)
        task = np.full(len(b), TASK_NONE, dtype=np.int8)
        task[np.isfinite(b.pred_value)] = TASK_REGRESSION
        task[gpred >= 0] = TASK_CLASSIFICATION
        task[rank_len > 0] = TASK_RANKING
        # class predictions in their series' own vocabulary
        pred = np.full(len(b), -1, dtype=np.int32)
        is_cls = task == TASK_CLASSIFICATION
        if is_cls.any():
            pred[is_cls] = self.local_codes(series[is_cls], gpred[is_cls])
        return series, task, pred
