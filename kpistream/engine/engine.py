"""The streaming engine: validate, window, join, aggregate — vectorized, Ray-free.

One :class:`Engine` is what a shard runs (and what ``kpistream replay`` runs
alone).  It takes columnar batches (:mod:`kpistream.wire.batch`) and keeps:

- a **watermark**: the largest accepted event time minus the allowed
  lateness.  It is computed per event inside a batch (a running maximum), so a
  batch gives exactly what one-event-at-a-time processing gives;
- **deduplication** by ``event_id``: the join tables keep each event's id
  with its entry, as long as a re-delivery would not be late anyway;
- the **join** of inferences and feedback by ``request_id``, symmetric and in
  either order: inferences wait for feedback until their window's label
  deadline (window end + label delay), feedback waits for inferences (early
  feedback, a shadow's late prediction) for the label delay; both bounded;
- the **pairing** of a challenger's inference with the primary's for the
  same request and model (family ``paired``, :mod:`kpistream.engine.paired`):
  challenger inferences wait in a bounded table for the primary's (and
  find earlier ones in the join table), until the label deadline;
- a **bottom-k sample** of the sampled inputs (family ``features``,
  :mod:`kpistream.engine.features`), per pane and series, when events carry them;
- **panes**: mergeable metric states per (pane, series, family); a pane is
  the gcd of the time windows' sizes and steps, so tumbling and sliding
  windows are merges of panes computed by :mod:`kpistream.windows.aggregate`; count
  windows have panes of their own.

Quality and feedback metrics are attributed to the inference's pane.  A
pane's operational states (traffic, latency, cost) are final when the
watermark passes its end; its quality states when it passes its end plus
the label delay.  :meth:`Engine.collect` hands out cumulative, detached
partial states of every pane touched since the last call, marking final ones
(and forgetting them).

Order of checks per event: invalid (rejected, with field and reason) →
far future → late → duplicate.  Nothing is dropped silently: every outcome
is a counter, late and rejected events are kept (bounded) for output.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from kpistream.wire.batch import (
    BASE_LABELS, KIND_CLICK, KIND_CONVERSION, KIND_DWELL, KIND_LABEL, KIND_RELEVANCE,
    KIND_REWARD, KIND_THUMBS, FeedbackBatch, InferenceBatch, SeriesKey, _ranges,
)
from kpistream.clock import Clock
from kpistream.spec.metrics import EngineConfig
from kpistream.errors import Rejection
from kpistream.engine.kernels import apply_once, future_mask
from kpistream.engine.features import FeatureSampleState
from kpistream.engine.keytable import KeyTable
from kpistream.engine.paired import (
    ARM_INFERENCE_COLS, ARM_LABEL_COLS, PAIR_INFERENCE_COLS, PAIR_LABEL_COLS, ROLE_CHALLENGER,
    ROLE_NONE, ROLE_PRIMARY, PairedTable, arm_feedback_sums, arm_inference_sums,
    best_per_query, pair_form_kernel, pair_inference_sums, pair_label_sums_masked,
    record_labels_kernel, rows_of_slots, take_ready,
)
from kpistream.engine.states import (
    FAMILY_CLASSES, SumsState, SumsTable, sums_for, TASK_CLASSIFICATION, TASK_NONE, TASK_RANKING, TASK_REGRESSION,
    ClassificationState, FeedbackState, LatencyState, MetricState, RankingState,
    RegressionState,
)

OTHER = "__other__"
_I64_MIN = np.iinfo(np.int64).min
FAR_FUTURE = 1 << 62  # "end of input": later than any event, with room for arithmetic
_TIME = "time"

# bits of the per-inference "seen" mask: feedback kinds that count once per inference
_ONCE_BITS = {KIND_LABEL: 1, KIND_CLICK: 2, KIND_CONVERSION: 4, KIND_RELEVANCE: 8}
# ... and two more bits of it for the paired family: the inference's status was
# "error"; its first label made it correct (classification)
_ERR_BIT, _CORRECT_BIT = 16, 32
# flags of a pairing record
_R_CERR, _R_CLAB, _R_HASP, _R_PLAB, _R_DONE = 1, 2, 4, 8, 16


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


@dataclass
class IngestReport:
    accepted: int = 0
    rejections: list[Rejection] = field(default_factory=list)
    late: int = 0
    duplicates: int = 0
    matched_pairs: int = 0

    def as_dict(self) -> dict:
        return {"accepted": self.accepted, "late": self.late, "duplicates": self.duplicates,
                "matched_pairs": self.matched_pairs,
                "rejected": [r.as_dict() for r in self.rejections]}


class _Pane:
    __slots__ = ("states", "tables", "dirty", "start", "end", "n", "min_ts", "max_ts", "op_final",
                 "q_final")

    def __init__(self, start: int, end: int) -> None:
        self.states: dict[tuple[str, int], MetricState] = {}   # object states (latency, classes)
        self.tables: dict[str, SumsTable] = {}                  # sums families, all series
        self.dirty: set[tuple[str, int]] = set()
        self.start, self.end = start, end
        self.n = 0          # inferences (count windows)
        self.min_ts = np.iinfo(np.int64).max
        self.max_ts = _I64_MIN
        self.op_final = False
        self.q_final = False


class Engine:
    """One shard's worth of windowed, joined, mergeable KPI state."""

    def __init__(self, config: EngineConfig | None = None, clock: Clock | None = None,
                 max_kept_events: int = 10_000, stream_seed_ms: int | None = None) -> None:
        self.cfg = cfg = config or EngineConfig()
        self.clock = clock
        self.pane_ms = cfg.pane_ms
        self.families = tuple(f for f in FAMILY_CLASSES if f in cfg.families)
        # families with update paths of their own: paired (time panes only) and features
        self._paired_on = "paired" in self.families
        self._features_on = "features" in self.families
        self._op_families = [f for f in self.families if FAMILY_CLASSES[f].horizon == "inference"
                             and f != "features"]
        self._q_families = [f for f in self.families if FAMILY_CLASSES[f].horizon == "label"]
        # time
        self.max_ts = _I64_MIN          # largest accepted event time
        self._stream_now: int | None = stream_seed_ms
        # vocabularies
        self.series_keys: list[SeriesKey] = []
        self._series_index: dict[SeriesKey, int] = {}
        self._raw_series_cache: dict[SeriesKey, int] = {}
        self.labels: list[str] = []                 # interned label strings (global codes)
        self._label_index: dict[str, int] = {}
        self._series_labels: list[list[str]] = []  # per series: its class vocabulary
        # per series: paired role (primary / challenger / none) and model code
        self._series_role = np.zeros(0, dtype=np.int8)
        self._series_model = np.zeros(0, dtype=np.int32)
        self._model_index: dict[str, int] = {}
        self._model_has_ch = np.zeros(0, dtype=bool)   # per model: a challenger series exists
        self._series_pairable = np.zeros(0, dtype=bool)  # per series: its model has one
        self._local_table = np.full((0, 0), -1, dtype=np.int32)
        self._overflowed: set[tuple[int, int]] = set()
        # join / dedup tables
        k = cfg.k
        cw = {f"cw_{w.name}": np.int64 for w in cfg.count_windows}
        # paired: what a challenger arriving later needs of the primary's
        # inference: its latency; its status and the outcome of its first label
        # are bits of "seen", and a regression's absolute error replaces its
        # prediction once labelled (nothing reads the prediction after that)
        pc = {"lat": np.float64} if self._paired_on else {}
        self.pending = KeyTable(cfg.max_pending, {
            "ts": np.int64, "series": np.int32, "task": np.int8, "pred": np.int32,
            "pred_value": np.float64, "seen": np.uint8, "labelled": np.bool_, **cw, **pc},
            arenas={"rank": {"items": np.uint64}})
        # challenger inferences by request id (ident: their event id), each with
        # its primary partner once found (pident, pts); expiry: the label
        # deadline of the challenger's pane while waiting, of the primary's pane
        # once paired; c_out / p_out: first-label outcomes (1/0 correct, or the
        # absolute error); flags: _R_* bits
        self.pair_tab = KeyTable(cfg.max_paired, {
            "csid": np.int32, "ctask": np.int8, "ptask": np.int8, "flags": np.uint8,
            "clat": np.float64, "c_out": np.float64, "p_out": np.float64, "pident": np.uint64,
            "pts": np.int64}, initial=1024) if self._paired_on else None
        self._pair_waiting = 0   # challenger entries without a primary yet
        self.fb_store = KeyTable(cfg.max_feedback, {
            "ts": np.int64, "kind": np.int8, "label": np.int32, "value": np.float64,
            "matched": np.bool_, "seq": np.int64},
            arenas={"rel": {"items": np.uint64, "grades": np.float64}})
        self._k = k
        self._fb_seq = 0
        # panes: space -> key -> pane ; count windows key their panes by (series, index)
        self.panes: dict[str, dict] = {_TIME: {}}
        self._cw_seq: dict[str, dict[int, int]] = {}
        for w in cfg.count_windows:
            self.panes[w.name] = {}
            self._cw_seq[w.name] = {}
        # accounting
        self.counters: Counter = Counter()
        self.late_by_series: Counter = Counter()
        self.rejected: Counter = Counter()            # (field, reason) -> n
        self.late_events: deque = deque(maxlen=max_kept_events)
        self.rejected_events: deque = deque(maxlen=max_kept_events)

    # ------------------------------------------------------------------ time
    @property
    def watermark(self) -> int:
        if self.max_ts == _I64_MIN:
            return _I64_MIN
        return self.max_ts - self.cfg.lateness_ms

    def _future_mask(self, ts: np.ndarray, invalid: np.ndarray) -> np.ndarray:
        """Events more than ``max_future`` ahead of the clock.

        With a clock (live): its time.  Without (replay): stream time, the
        largest accepted event time, event by event; it starts from
        ``stream_seed_ms`` (replay passes the median of the input's first
        chunk) or else the first batch's median, so that one bad first event
        cannot become the reference.
        """
        F = self.cfg.max_future_ms
        if self.clock is not None:
            return (ts > self.clock.now_ms() + F) & ~invalid
        if self._stream_now is None:
            ok = ts[~invalid]
            self._stream_now = int(np.median(ok)) if len(ok) else None
            if self._stream_now is None:
                return np.zeros(len(ts), dtype=bool)
        out = np.zeros(len(ts), dtype=bool)
        ref = max(self._stream_now, self.max_ts)
        self._stream_now = int(future_mask(ts, invalid, ref, F, out))
        return out

    def _reject(self, kind: str, batch, rep: IngestReport, invalid: np.ndarray,
                checks: list) -> np.ndarray:
        """Rows failing a check, or too far in the future, become counted rejections.

        ``checks``: ``(mask, field, reason, message)`` in order of precedence;
        reason and message are strings or functions of the row index.
        Returns the mask of the rows that go on.
        """
        ts = batch.ts
        fut = self._future_mask(ts, invalid)
        bad = invalid | fut
        if bad.any():
            for i in np.flatnonzero(bad).tolist():
                for mask, field, reason, message in checks:
                    if mask[i]:
                        r = Rejection(i, field, reason(i) if callable(reason) else reason,
                                      message(i) if callable(message) else message)
                        break
                else:
                    r = Rejection(i, "ts", "future", f"ts {int(ts[i])} is more than "
                                  f"{self.cfg.max_future_ms} ms ahead of the clock")
                rep.rejections.append(r)
                self.rejected[(r.field, r.reason)] += 1
            self.rejected_events.append((kind, batch.take(bad), rep.rejections))
        return ~bad

    def _watermark_before(self, ts: np.ndarray, ok: np.ndarray, prior: int | None = None,
                          include_self: bool = False) -> np.ndarray:
        """Per event: the watermark just before it (or just after, ``include_self``).

        Only accepted events (``ok``) move it; ``prior`` is the largest event
        time before the batch (default: the engine's).
        """
        prior = self.max_ts if prior is None else prior
        acc = np.where(ok, ts, _I64_MIN)
        run = np.maximum.accumulate(acc) if len(acc) else acc
        prev = np.empty_like(ts)
        if include_self:
            np.maximum(run, prior, out=prev)
        elif len(ts):
            prev[0] = prior
            np.maximum(run[:-1], prior, out=prev[1:])
        wm = prev - self.cfg.lateness_ms
        wm[prev == _I64_MIN] = _I64_MIN
        return wm

    # ------------------------------------------------------------ vocabularies
    def _project(self, raw: SeriesKey) -> SeriesKey:
        segs = dict(raw[4])
        return (raw[0], raw[1], raw[2], raw[3],
                tuple((s, segs.get(s, "")) for s in self.cfg.segments))

    def _series_map(self, keys: list[SeriesKey], used: np.ndarray) -> np.ndarray:
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
                proj = self._project(raw)
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

    def _new_series(self, proj: SeriesKey) -> int:
        sid = len(self.series_keys)
        self.series_keys.append(proj)
        self._series_index[proj] = sid
        self._series_labels.append([])
        model = proj[0]
        m = self._model_index.setdefault(model, len(self._model_index))
        if m >= len(self._model_has_ch):
            self._model_has_ch = np.append(self._model_has_ch, False)
        if model == OTHER and proj[2] == OTHER:
            role = ROLE_NONE
        elif proj[2] == self.cfg.primary_variant:
            role = ROLE_PRIMARY
        else:
            role = ROLE_CHALLENGER
            self._model_has_ch[m] = True
        self._series_role = np.append(self._series_role, np.int8(role))
        self._series_model = np.append(self._series_model, np.int32(m))
        self._series_pairable = (self._series_role >= 0) & self._model_has_ch[self._series_model]
        return sid

    def _label_map(self, labels: list[str]) -> np.ndarray:
        """Global codes of a batch's label vocabulary (index -1 maps to -1).

        The global table only interns strings; class vocabularies are per
        series (:meth:`_local_codes`), so one model's labels (or a regression
        model's integer truths) never crowd out another's.
        """
        out = np.empty(len(labels) + 1, dtype=np.int32)
        out[-1] = -1
        for i, lab in enumerate(labels):
            c = self._label_index.get(lab)
            if c is None:
                if len(self.labels) >= self._MAX_INTERNED:
                    lab = OTHER
                    c = self._label_index.get(lab)
                if c is None:
                    c = len(self.labels)
                    self.labels.append(lab)
                    self._label_index[lab] = c
            out[i] = c
        return out

    _MAX_INTERNED = 1_000_000

    def _local_codes(self, sids: np.ndarray, g: np.ndarray) -> np.ndarray:
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
                labs = self._series_labels[sid]
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

    def series_labels(self, sid: int) -> dict[str, str]:
        k = self.series_keys[sid]
        d = dict(zip(BASE_LABELS, k[:4]))
        d.update(k[4])
        return d

    # ----------------------------------------------------------------- panes
    def _new_state(self, family: str, sid: int) -> MetricState:
        if family == "latency":
            return LatencyState(self.cfg.relative_accuracy)
        if family == "classification":
            return ClassificationState(self._series_labels[sid], self.cfg.positive_label)
        if family == "features":
            return FeatureSampleState(self.cfg.feature_sample_size, self.cfg.max_features)
        return FAMILY_CLASSES[family]()

    def _time_pane(self, start: int) -> _Pane:
        panes = self.panes[_TIME]
        p = panes.get(start)
        if p is None:
            p = panes[start] = _Pane(start, start + self.pane_ms)
        return p

    def _groups(self, space: str, keys: np.ndarray, series: np.ndarray):
        """Compact group ids for (pane key, series) pairs and their panes."""
        if space == _TIME:
            pk = keys // self.pane_ms
            lo = int(pk.min())
            span = int(pk.max()) - lo + 1
        else:
            lo = int(keys.min())
            span = int(keys.max()) - lo + 1
            pk = keys
        nser = len(self.series_keys)
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
        if space == _TIME:
            panes = [self._time_pane(int(k) * self.pane_ms) for k in pkeys]
        else:
            w = self.cfg.window(space)
            d = self.panes[space]
            panes = []
            for k, s in zip(pkeys.tolist(), sids.tolist()):
                p = d.get((s, k))
                if p is None:
                    p = d[(s, k)] = _Pane(k * w.size, (k + 1) * w.size)
                panes.append(p)
        return gid, panes, sids

    def _states(self, family: str, panes: list[_Pane], sids: np.ndarray) -> list[MetricState]:
        out = []
        for p, s in zip(panes, sids.tolist()):
            key = (family, s)
            st = p.states.get(key)
            if st is None:
                st = p.states[key] = self._new_state(family, s)
            p.dirty.add(key)
            out.append(st)
        return out

    def _update(self, space: str, family: str, panes: list[_Pane], sids: np.ndarray,
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
        if space == _TIME and issubclass(cls, SumsState):
            sums = sums_for(cls, gid, len(panes), cols, observe)
            by_pane: dict[int, tuple[_Pane, list[int]]] = {}
            for i, p in enumerate(panes):
                by_pane.setdefault(id(p), (p, []))[1].append(i)
            for p, idx in by_pane.values():
                t = p.tables.get(family)
                if t is None:
                    t = p.tables[family] = SumsTable(cls, len(self.series_keys))
                t.add(sids[idx], sums[idx])
            return
        states = self._states(family, panes, sids)
        if observe:
            cls.observe_grouped(states, gid, cols)
        else:
            cls.update_grouped(states, gid, cols)

    def _spaces(self, pend_slots: np.ndarray | None = None, ts: np.ndarray | None = None,
                cw_cols: dict | None = None):
        """(space, keys) for every space: time panes, then each count window."""
        yield _TIME, ts
        for w in self.cfg.count_windows:
            if pend_slots is not None:
                yield w.name, self.pending.col[f"cw_{w.name}"][pend_slots]
            else:
                yield w.name, cw_cols[w.name]

    # ------------------------------------------------------------- inference
    def ingest_inference(self, batch: InferenceBatch) -> IngestReport:
        rep = IngestReport()
        n = len(batch)
        if n == 0:
            return rep
        c = self.counters
        c["inference_in"] += n
        ts = batch.ts
        # 1. validity (columns from trusted builders still get checked)
        lat = batch.latency_ms
        bad_lat = ~np.isfinite(lat) | (lat < 0)
        bad_cost = (batch.cost_usd < 0) | np.isinf(batch.cost_usd)
        bad_tok = (batch.tokens < 0) | np.isinf(batch.tokens)
        bad_val = np.isinf(batch.pred_value) | np.isinf(batch.pred_score)
        invalid = bad_lat | bad_cost | bad_tok | bad_val
        ok = self._reject("inference", batch, rep, invalid, [
            (bad_lat, "latency_ms", lambda i: "negative" if lat[i] < 0 else "not_finite",
             lambda i: f"latency_ms must be a finite number >= 0, got {lat[i]}"),
            (bad_cost, "cost.usd", "negative", "cost.usd must be finite and >= 0"),
            (bad_tok, "cost.tokens", "negative", "cost.tokens must be >= 0"),
            (bad_val, "prediction", "not_finite", "prediction must be finite")])
        # 2. late: before the watermark as it stood when the event arrived
        wm = self._watermark_before(ts, ok)
        late = ok & (ts < wm)
        ok &= ~late
        # 3. duplicates: the inference table remembers each request's event ids
        # for as long as a re-delivery would not be late
        slots_all = self._insert_dedup(
            self.pending, batch, ok, rep, "duplicate_inference", "pending_evicted",
            lambda t: t - t % self.pane_ms + self.pane_ms + self.cfg.label_delay_ms)
        if late.any():
            rep.late = int(late.sum())
            c["late_inference"] += rep.late
            codes, counts = np.unique(batch.series[late], return_counts=True)
            for code, m in zip(codes.tolist(), counts.tolist()):
                self.late_by_series[self._project(batch.series_keys[code])] += int(m)
            self.late_events.append(("inference", batch.take(late)))
        idx = np.flatnonzero(ok)
        rep.accepted = len(idx)
        c["inference_accepted"] += len(idx)
        if not len(idx):
            return rep
        used = np.zeros(len(batch.series_keys), dtype=bool)
        used[batch.series[idx]] = True
        smap = self._series_map(batch.series_keys, used)
        if len(idx) == n:
            b, slots = batch, slots_all
        else:
            b, slots = batch.take(idx), slots_all[idx]
        series = smap[b.series]
        prior_max = self.max_ts
        self.max_ts = max(self.max_ts, int(b.ts.max()))
        n_other = len(self.series_keys) and self.series_keys[-1][0] == OTHER
        if n_other:
            c["series_overflow"] += int((series == len(self.series_keys) - 1).sum())
        gpred = self._label_map(b.labels)[b.pred_label]
        ts = b.ts
        pane_start = ts - ts % self.pane_ms
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
            pred[is_cls] = self._local_codes(series[is_cls], gpred[is_cls])
        # count windows: sequence numbers per series, in arrival order
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
        # 4. operational and denominator updates, per space
        cols = {"error": b.error, "latency": b.latency_ms, "cost_usd": b.cost_usd,
                "tokens": b.tokens, "has_task": task != TASK_NONE}
        feat_rows = None
        if self._features_on and b.features is not None:
            has = np.fromiter((f is not None for f in b.features), dtype=bool, count=len(b))
            feat_rows = np.flatnonzero(has) if has.any() else None
        for space, keys in self._spaces(ts=pane_start, cw_cols=cw_keys):
            gid, panes, sids = self._groups(space, keys, series)
            for f in self._op_families:
                self._update(space, f, panes, sids, gid, cols)
            if self._paired_on and space == _TIME:
                sums = arm_inference_sums(gid, len(panes), b.error, b.latency_ms)
                self._paired_add(panes, sids, sums, ARM_INFERENCE_COLS, arms=True)
            if feat_rows is not None:
                fgid, fpanes, fsids = self._groups(space, keys[feat_rows], series[feat_rows])
                FeatureSampleState.update_grouped(
                    self._states("features", fpanes, fsids), fgid,
                    {"hash": b.event_id[feat_rows], "features": [b.features[i] for i in feat_rows]})
            if space != _TIME:
                cnt = np.bincount(gid, minlength=len(panes))
                mx = np.full(len(panes), _I64_MIN, dtype=np.int64)
                np.maximum.at(mx, gid, ts)
                mn = np.full(len(panes), np.iinfo(np.int64).max, dtype=np.int64)
                np.minimum.at(mn, gid, ts)
                for p, k_, m_, n_ in zip(panes, cnt.tolist(), mx.tolist(), mn.tolist()):
                    p.n += k_
                    p.max_ts = max(p.max_ts, m_)
                    p.min_ts = min(p.min_ts, n_)
            # rate and label-coverage denominators
            if "feedback" in self.families:
                self._update(space, "feedback", panes, sids, gid, cols, observe=True)
        # 5. the rest of the inference's entry, kept for feedback until the
        # pane's label deadline
        kept = slots >= 0
        if not kept.all():
            c["join_chain_overflow"] += int((~kept).sum())
        s_ = slots[kept]
        colp = self.pending.col
        colp["ts"][s_] = ts[kept]
        colp["series"][s_] = series[kept]
        colp["task"][s_] = task[kept]
        colp["pred"][s_] = pred[kept]
        colp["pred_value"][s_] = b.pred_value[kept]
        colp["seen"][s_] = 0
        colp["labelled"][s_] = False
        if self._paired_on:
            colp["lat"][s_] = b.latency_ms[kept]
            colp["seen"][s_] = np.where(b.error[kept], _ERR_BIT, 0)
        for w in self.cfg.count_windows:
            colp[f"cw_{w.name}"][s_] = cw_keys[w.name][kept]
        rk = kept & (task == TASK_RANKING)
        if rk.any():
            # keep the top K items only
            offs = b.rank_offsets
            lo = offs[:-1]
            topk = np.minimum(rank_len, self._k)
            toffs = np.zeros(len(b) + 1, dtype=np.int64)
            np.cumsum(topk, out=toffs[1:])
            items = b.rank_items[_ranges(lo, topk)]
            rows = np.flatnonzero(rk)
            self.pending.arena_put("rank", slots[rows], toffs, {"items": items}, rows)
        # 5b. challenger inferences meet the primary's of the same request
        if self._paired_on and self._model_has_ch.any():
            self._pair_inferences(b, kept, s_, series[kept], prior_max)
        # 6. feedback that came first, as one-event-at-a-time processing sees
        # it: the watermark just after each inference, and in arrival order
        if len(self.fb_store):
            qi, fs = self.fb_store.lookup_multi(b.request_id[kept])
            if len(qi):
                wm_after = self._watermark_before(ts[kept], np.ones(len(s_), dtype=bool),
                                                  prior=prior_max, include_self=True)
                st = self.fb_store.col
                live = st["expiry"][fs] > wm_after[qi]
                qi, fs = qi[live], fs[live]
                order = np.lexsort((st["seq"][fs], qi))
                qi, fs = qi[order], fs[order]
            if len(qi):
                ps = s_[qi]
                st["matched"][fs] = True
                rel = self.fb_store.arena["rel"]
                roffs = np.zeros(len(fs) + 1, dtype=np.int64)
                ln = st["rel_len"][fs].astype(np.int64)
                np.cumsum(ln, out=roffs[1:])
                sel = _ranges(st["rel_off"][fs], ln)
                ids = ((b.request_id[kept][qi], b.event_id[kept][qi]) if self._paired_on
                       else None)
                rep.matched_pairs += self._apply_pairs(
                    ps, st["kind"][fs], st["label"][fs], st["value"][fs],
                    roffs, rel["items"][sel], rel["grades"][sel], wm_after[qi], ids)
        self.pending.enforce_capacity()
        self._count_evicted(self.pending, "pending_evicted")
        return rep

    # -------------------------------------------------------------- feedback
    def ingest_feedback(self, batch: FeedbackBatch) -> IngestReport:
        rep = IngestReport()
        n = len(batch)
        if n == 0:
            return rep
        c = self.counters
        c["feedback_in"] += n
        ts = batch.ts
        v = batch.value
        bad_val = np.isinf(v) | ((batch.kind == KIND_DWELL) & (v < 0))
        bad_grade = np.zeros(n, dtype=bool)
        if len(batch.rel_grades):
            g_bad = ~np.isfinite(batch.rel_grades) | (batch.rel_grades < 0)
            if g_bad.any():
                owner = np.repeat(np.arange(n), np.diff(batch.rel_offsets))
                bad_grade[owner[g_bad]] = True
        invalid = bad_val | bad_grade
        ok = self._reject("feedback", batch, rep, invalid, [
            (bad_val, "value", lambda i: "not_finite" if np.isinf(v[i]) else "negative",
             lambda i: f"value must be finite (and >= 0 for dwell), got {v[i]}"),
            (bad_grade, "value", "bad_value", "relevance grades must be finite and >= 0")])
        wm = self._watermark_before(ts, ok)
        late = ok & (wm != _I64_MIN) & (ts < wm - self.cfg.label_delay_ms)
        ok &= ~late
        # duplicates: the feedback table remembers event ids until a
        # re-delivery would be late (ts < wm - label_delay)
        fslots_all = self._insert_dedup(
            self.fb_store, batch, ok, rep, "duplicate_feedback", "feedback_evicted",
            lambda t: t + self.cfg.label_delay_ms + 1)
        if late.any():
            rep.late = int(late.sum())
            c["late_feedback"] += rep.late
            self.late_events.append(("feedback", batch.take(late)))
        idx = np.flatnonzero(ok)
        rep.accepted = len(idx)
        c["feedback_accepted"] += len(idx)
        if not len(idx):
            return rep
        b = batch if len(idx) == n else batch.take(idx)
        slots = fslots_all[idx]
        wm = wm[idx]
        self.max_ts = max(self.max_ts, int(b.ts.max()))
        lmap = self._label_map(b.labels)
        label = lmap[b.label]
        # 1. join with the inferences already here
        matched = np.zeros(len(b), dtype=bool)
        if len(self.pending):
            qi, ps = self.pending.lookup_multi(b.request_id)
            live = self.pending.col["expiry"][ps] > wm[qi]
            qi, ps = qi[live], ps[live]
            if len(qi):
                matched[qi] = True
                roffs = b.rel_offsets
                ln = roffs[qi + 1] - roffs[qi]
                noffs = np.zeros(len(qi) + 1, dtype=np.int64)
                np.cumsum(ln, out=noffs[1:])
                sel = _ranges(roffs[qi], ln)
                ids = (b.request_id[qi], None) if self._paired_on else None
                rep.matched_pairs += self._apply_pairs(
                    ps, b.kind[qi], label[qi], b.value[qi], noffs,
                    b.rel_items[sel], b.rel_grades[sel], wm[qi], ids)
        # 2. keep every feedback for inferences that arrive later
        kept = slots >= 0
        s_ = slots[kept]
        st = self.fb_store.col
        st["ts"][s_] = b.ts[kept]
        st["kind"][s_] = b.kind[kept]
        st["label"][s_] = label[kept]
        st["value"][s_] = b.value[kept]
        st["matched"][s_] = matched[kept]
        st["seq"][s_] = self._fb_seq + np.arange(len(s_))
        self._fb_seq += len(s_)
        rel_rows = np.flatnonzero(kept & (b.kind == KIND_RELEVANCE))
        if len(rel_rows):
            self.fb_store.arena_put("rel", slots[rel_rows], b.rel_offsets,
                                    {"items": b.rel_items, "grades": b.rel_grades}, rel_rows)
        self.fb_store.enforce_capacity()
        self._count_evicted(self.fb_store, "feedback_evicted")
        return rep

    def _insert_dedup(self, table: KeyTable, batch, ok: np.ndarray, rep: IngestReport,
                      dup_counter: str, evicted_counter: str, expiry_of) -> np.ndarray:
        """Insert the ``ok`` rows into a join table, which also deduplicates them.

        A row whose request already holds an entry with its event id is a
        duplicate: it is taken out of ``ok`` and counted.  Returns each row's
        slot (-1 for rows not inserted).
        """
        slots_all = np.full(len(batch), -1, dtype=np.int64)
        idx = np.flatnonzero(ok)
        if len(idx):
            sl, dup = table.insert_multi(batch.request_id[idx], expiry_of(batch.ts[idx]),
                                         ident=batch.event_id[idx])
            slots_all[idx] = sl
            ok[idx[dup]] = False
            rep.duplicates = int(dup.sum())
            self.counters[dup_counter] += rep.duplicates
            self._count_evicted(table, evicted_counter)
        return slots_all

    def _count_evicted(self, table: KeyTable, name: str) -> None:
        ev = table.take_evicted()
        if ev:
            self.counters[name] += len(ev["expiry"])

    # ------------------------------------------------------------------ join
    def _apply_pairs(self, ps: np.ndarray, kind: np.ndarray, label: np.ndarray,
                     value: np.ndarray, rel_offs: np.ndarray, rel_items: np.ndarray,
                     rel_grades: np.ndarray, wm_pairs: np.ndarray,
                     ids: tuple | None = None) -> int:
        """Fold (pending inference slot, feedback) pairs into the inference's panes.

        For the paired family: ``wm_pairs``, the watermark each pair is seen at
        (liveness of the pairing records), and ``ids``, the request id and
        (or None: read from the join table) event id of each pair's inference.
        """
        col = self.pending.col
        task = col["task"][ps]
        # label pairs on the wrong kind of model are counted, not guessed at,
        # and do not use up the inference's label
        is_label = kind == KIND_LABEL
        is_rel = kind == KIND_RELEVANCE
        cls_ok = is_label & (task == TASK_CLASSIFICATION) & (label >= 0)
        reg_ok = is_label & (task == TASK_REGRESSION) & np.isfinite(value)
        rnk_ok = is_rel & (task == TASK_RANKING)
        mismatch = (is_label & ~(cls_ok | reg_ok)) | (is_rel & ~rnk_ok)
        if mismatch.any():
            self.counters["feedback_type_mismatch"] += int(mismatch.sum())
        # kinds that count once per inference: the first pair per slot wins,
        # in arrival order; a false click / conversion counts for nothing
        once = np.zeros(len(ps), dtype=np.uint8)
        for k, bit in _ONCE_BITS.items():
            once[kind == k] = bit
        use = ~mismatch
        if once.any():
            positive = ~(((kind == KIND_CLICK) | (kind == KIND_CONVERSION)) & ~(value > 0))
            apply_once(ps, np.where(mismatch, 0, once).astype(np.uint8), positive, col["seen"],
                       use)
        labelled = use & (cls_ok | reg_ok | rnk_ok)
        col["labelled"][ps[labelled]] = True
        fb_kind = use & (np.isin(kind, (KIND_THUMBS, KIND_CLICK, KIND_CONVERSION, KIND_DWELL,
                                        KIND_REWARD)) | labelled)
        ts = col["ts"][ps]
        series = col["series"][ps]
        pane_start = ts - ts % self.pane_ms
        jobs = []
        m_cls = use & cls_ok
        true_cls = None
        if m_cls.any() and ("classification" in self.families or self._paired_on):
            true_cls = self._local_codes(series[m_cls].astype(np.int64), label[m_cls])
        if "classification" in self.families and true_cls is not None:
            jobs.append(("classification", m_cls, {"true": true_cls, "pred": col["pred"][ps[m_cls]]}))
        if "regression" in self.families:
            m = use & reg_ok
            if m.any():
                jobs.append(("regression", m, {"true": value[m], "pred": col["pred_value"][ps[m]]}))
        if "ranking" in self.families:
            m = use & rnk_ok
            if m.any():
                jobs.append(("ranking", m, self._ranking_cols(ps[m], *_subset_csr(
                    np.flatnonzero(m), rel_offs, rel_items, rel_grades))))
        if "feedback" in self.families and fb_kind.any():
            jobs.append(("feedback", fb_kind, {"kind": kind[fb_kind], "value": value[fb_kind]}))
        # the feedback rows' time-pane groups serve the feedback and paired families
        fb_groups = None
        if fb_kind.any() and ("feedback" in self.families or self._paired_on):
            fb_groups = self._groups(_TIME, pane_start[fb_kind], series[fb_kind])
        for family, m, cols in jobs:
            for space, keys in self._spaces(pend_slots=ps[m], ts=pane_start[m]):
                if family == "feedback" and space == _TIME:
                    gid, panes, sids = fb_groups
                else:
                    gid, panes, sids = self._groups(space, keys, series[m])
                self._update(space, family, panes, sids, gid, cols)
        if self._paired_on and fb_groups is not None:
            self._paired_feedback(ps, series, kind, value, use, fb_kind, fb_groups, m_cls,
                                  true_cls, use & reg_ok, wm_pairs, ids)
        n_used = int(use.sum())
        self.counters["join_pairs"] += n_used
        return n_used

    # ---------------------------------------------------------------- paired
    def _paired_add(self, panes: list[_Pane], sids: np.ndarray, sums: np.ndarray,
                    cols: np.ndarray, arms: bool) -> None:
        """Add per-group sums (groups -> (time pane, series)) to the panes' paired tables.

        ``arms``: arm sums of each series' own role (series without a role,
        the overflow series, are skipped); else paired sums of challengers.
        """
        by_pane: dict[int, tuple[_Pane, list[int]]] = {}
        for i, p in enumerate(panes):
            by_pane.setdefault(id(p), (p, []))[1].append(i)
        for p, idx in by_pane.values():
            ix = np.asarray(idx, dtype=np.intp)
            t = p.tables.get("paired")
            if t is None:
                t = p.tables["paired"] = PairedTable(len(self.series_keys))
            if arms:
                roles = self._series_role[sids[ix]]
                ix = ix[roles >= 0]
                t.add_arms(sids[ix], self._series_role[sids[ix]], cols, sums[ix])
            else:
                t.add_pairs(sids[ix], cols, sums[ix])

    def _pair_inferences(self, b: InferenceBatch, kept: np.ndarray, s_: np.ndarray,
                         ser: np.ndarray, prior_max: int) -> None:
        """Pair this batch's accepted inferences (``kept`` rows, join-table slots ``s_``).

        A challenger inference is paired with a primary inference of the same
        request and model: one that arrived before it (the smallest event-id
        hash if several did), else the first to arrive after it; both must be
        live (label deadline not passed) when the later one arrives.  This is
        what one-event-at-a-time processing gives, whatever the batching.
        Records waiting from earlier batches meet this batch's primaries
        first; then this batch's challengers are recorded and look for their
        primary in the join table (this batch's rows included).
        """
        T = self.pair_tab
        role = self._series_role[ser]
        model = self._series_model[ser]
        pm = (role == ROLE_PRIMARY) & self._series_pairable[ser]
        cm = role == ROLE_CHALLENGER
        if not (cm.any() or (pm.any() and self._pair_waiting > 0)):
            return
        ts_k = b.ts[kept]
        req_k = b.request_id[kept]
        wm_after = self._watermark_before(ts_k, np.ones(len(ts_k), dtype=bool), prior=prior_max,
                                          include_self=True)
        colp = self.pending.col
        c = T.col
        # (i) records waiting from earlier batches: the first live primary of this batch
        if self._pair_waiting > 0 and pm.any():
            rows = np.flatnonzero(pm)
            qi, rs = T.lookup_multi(req_k[rows])
            if len(qi):
                csid = c["csid"][rs]
                ok = (((c["flags"][rs] & _R_HASP) == 0)
                      & (self._series_model[csid] == model[rows][qi])
                      & (c["expiry"][rs] > wm_after[rows][qi]))
                qi, rs = qi[ok], rs[ok]
                order = np.lexsort((qi, rs))
                qi, rs = qi[order], rs[order]
                first = np.r_[True, rs[1:] != rs[:-1]] if len(rs) else np.zeros(0, dtype=bool)
                qi, rs = qi[first], rs[first]
                if len(rs):
                    self._pair_form(rs, s_[rows[qi]])
        # (ii) this batch's challengers: recorded, and paired with a primary already here
        if cm.any():
            rows = np.flatnonzero(cm)
            rslots, dup = T.insert_multi(req_k[rows], colp["expiry"][s_[rows]],
                                         ident=b.event_id[kept][rows])
            self._count_pair_evicted()
            if dup.any():   # a re-delivery whose join entry was evicted: recorded already
                rows, rslots = rows[~dup], rslots[~dup]
            c = T.col
            cs = s_[rows]
            c["csid"][rslots] = ser[rows]
            c["ctask"][rslots] = colp["task"][cs]
            c["clat"][rslots] = colp["lat"][cs]
            c["flags"][rslots] = np.where(b.error[kept][rows], _R_CERR, 0)
            self._pair_waiting += len(rows)
            self.counters["paired_challengers"] += len(rows)
            qi, ps = self.pending.lookup_multi(req_k[rows])
            if len(qi):
                pser = colp["series"][ps]
                row_c = rows[qi]
                ok = ((self._series_role[pser] == ROLE_PRIMARY)
                      & (self._series_model[pser] == model[row_c]))
                qi, ps, row_c = qi[ok], ps[ok], row_c[ok]
            if len(qi):
                # the batch row of candidates of this batch (-1: an earlier batch);
                # they are among its primaries of models with a challenger
                prow = np.flatnonzero(pm)
                row_p = rows_of_slots(np.ascontiguousarray(s_[prow], dtype=np.int64), prow,
                                      np.ascontiguousarray(ps, dtype=np.int64))
                before = row_p < row_c
                at = np.where(before, row_c, row_p)      # the later arrival of the two
                wm_l = wm_after[at]
                live = (colp["expiry"][ps] > wm_l) & (c["expiry"][rslots[qi]] > wm_l)
                qi, ps, before, row_p = qi[live], ps[live], before[live], row_p[live]
                if len(qi):
                    # per challenger (qi is non-decreasing): a primary from before it
                    # (smallest event-id hash), else the first after it
                    key = np.where(before, self.pending.ident[ps], row_p.astype(np.uint64))
                    sel = best_per_query(qi, before, key)
                    self._pair_form(rslots[qi[sel]], ps[sel])
        T.enforce_capacity()
        self._count_pair_evicted()

    def _pair_form(self, rs: np.ndarray, ps: np.ndarray) -> None:
        """Records ``rs`` get the primary inference at join-table slot ``ps``."""
        T = self.pair_tab
        c, colp = T.col, self.pending.col
        n = len(rs)
        rs = np.ascontiguousarray(rs, dtype=np.int64)
        ps = np.ascontiguousarray(ps, dtype=np.int64)
        perr, cerr = np.empty(n, dtype=np.bool_), np.empty(n, dtype=np.bool_)
        plat, clat = np.empty(n), np.empty(n)
        lo = pair_form_kernel(
            rs, ps, self.pending.ident, colp["ts"], colp["task"], colp["seen"],
            colp["pred_value"], colp["lat"], colp["expiry"], c["pident"], c["pts"], c["ptask"],
            c["p_out"], c["flags"], c["expiry"], c["clat"], np.uint8(_ERR_BIT),
            np.uint8(_CORRECT_BIT), np.uint8(_ONCE_BITS[KIND_LABEL]), np.uint8(_R_HASP),
            np.uint8(_R_PLAB), np.uint8(_R_CERR),
            np.int8(TASK_CLASSIFICATION), np.int8(TASK_REGRESSION), perr, cerr, plat, clat)
        T.min_expiry = min(T.min_expiry, int(lo))
        self._pair_waiting -= n
        self.counters["paired_requests"] += n
        pts = c["pts"][rs]
        gid, panes, sids = self._groups(_TIME, pts - pts % self.pane_ms,
                                        c["csid"][rs].astype(np.int64))
        sums = pair_inference_sums(gid, len(panes), perr, cerr, plat, clat)
        self._paired_add(panes, sids, sums, PAIR_INFERENCE_COLS, arms=False)
        self._pair_emit_labelled(take_ready(rs, c["flags"], np.uint8(_R_HASP | _R_CLAB | _R_PLAB),
                                            np.uint8(_R_DONE)))

    def _pair_emit_labelled(self, rs: np.ndarray) -> None:
        """Labelled-pair sums of records ``rs``, whose two sides now have their label."""
        if not len(rs):
            return
        c = self.pair_tab.col
        pt, ct = c["ptask"][rs], c["ctask"][rs]
        pts = c["pts"][rs]
        gid, panes, sids = self._groups(_TIME, pts - pts % self.pane_ms,
                                        c["csid"][rs].astype(np.int64))
        sums = pair_label_sums_masked(gid, len(panes), pt == TASK_CLASSIFICATION,
                                      ct == TASK_CLASSIFICATION, pt == TASK_REGRESSION,
                                      ct == TASK_REGRESSION, c["p_out"][rs], c["c_out"][rs])
        self._paired_add(panes, sids, sums, PAIR_LABEL_COLS, arms=False)
        self.counters["paired_labelled"] += len(rs)

    def _paired_feedback(self, ps, series, kind, value, use, fb_kind, fb_groups, m_cls, true_cls,
                         m_reg, wm_pairs, ids) -> None:
        """Arm sums of joined feedback (first labels, rewards) and label outcomes for pairing.

        ``fb_groups``: the time-pane groups of the ``fb_kind`` rows, which
        hold every first label and reward.
        """
        col = self.pending.col
        gid, panes, sids = fb_groups
        f = np.flatnonzero(fb_kind)
        true_code = np.full(len(ps), -1, dtype=np.int32)
        if true_cls is not None:
            true_code[m_cls] = true_cls
        rew = use & (kind == KIND_REWARD)
        sums, out_f = arm_feedback_sums(gid, len(panes), ps[f], m_cls[f], true_code[f], m_reg[f],
                                        rew[f], value[f], col["pred"], col["pred_value"],
                                        col["seen"], _CORRECT_BIT)
        self._paired_add(panes, sids, sums, ARM_LABEL_COLS, arms=True)
        if not len(self.pair_tab):
            return
        # first labels of inferences that may be in a pairing record: the outcome
        # goes to the record (by request id, and event id of either side)
        outcome = np.full(len(ps), np.nan)
        outcome[f] = out_f
        li = np.flatnonzero((m_cls | m_reg) & self._series_pairable[series])
        if not len(li):
            return
        req, ident = ids
        qi, rs = self.pair_tab.lookup_multi(req[li])
        if not len(qi):
            return
        ident = self.pending.ident[ps[li]] if ident is None else ident[li]
        c = self.pair_tab.col
        ready = record_labels_kernel(
            qi, rs, ident, np.ascontiguousarray(wm_pairs[li], dtype=np.int64),
            self._series_role[series[li]], outcome[li], self.pair_tab.ident,
            c["expiry"], c["flags"], c["pident"], c["c_out"], c["p_out"], np.int8(ROLE_PRIMARY),
            np.int8(ROLE_CHALLENGER), np.uint8(_R_HASP), np.uint8(_R_CLAB), np.uint8(_R_PLAB),
            np.uint8(_R_DONE))
        self._pair_emit_labelled(ready)

    def _count_pair_evicted(self) -> None:
        ev = self.pair_tab.take_evicted()
        if ev:
            self.counters["paired_evicted"] += len(ev["expiry"])
            self._pair_waiting -= int(((ev["flags"] & _R_HASP) == 0).sum())

    def _ranking_cols(self, ps, rel_offs, rel_items, rel_grades) -> dict[str, np.ndarray]:
        return ranking_metrics(self.pending.col["rank_off"][ps],
                               self.pending.col["rank_len"][ps].astype(np.int64),
                               self.pending.arena["rank"]["items"], rel_offs, rel_items,
                               rel_grades, self._k)

    # ------------------------------------------------------------ collecting
    def advance(self, watermark_ms: int) -> None:
        """Move the watermark forward as if an event at ``watermark_ms + lateness`` was seen.

        The live path calls it from processing time so that idle windows
        close; replay calls ``flush()`` at the end of the input.
        """
        self.max_ts = max(self.max_ts, int(watermark_ms) + self.cfg.lateness_ms)

    def flush(self) -> None:
        """End of input: every window becomes final."""
        self._flushed = True

    _flushed = False

    @property
    def emit_watermark(self) -> int:
        """The watermark to hand downstream: far in the future once flushed."""
        return FAR_FUTURE if self._flushed else self.watermark

    def collect(self) -> list[Partial]:
        """Cumulative partials of the panes touched since the last call; final ones are dropped."""
        wm = self.emit_watermark
        delay = self.cfg.label_delay_ms
        self._expire(wm)
        out: list[Partial] = []
        for space, panes in self.panes.items():
            is_time = space == _TIME
            size = None if is_time else self.cfg.window(space).size
            for pkey, p in list(panes.items()):
                if is_time:
                    op_final = wm >= p.end
                    q_final = wm >= p.end + delay
                    key, sid_fixed = pkey, None
                    start, end = p.start, p.end
                else:
                    complete = p.n >= size or self._flushed
                    op_final = complete
                    last_pane_end = p.max_ts - p.max_ts % self.pane_ms + self.pane_ms
                    q_final = complete and (self._flushed or wm >= last_pane_end + delay)
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
                    out.append(Partial(space, int(key), self.series_keys[sid], family, detached,
                                       bool(fin), int(start), int(end)))
                    if fin:
                        del p.states[(family, sid)]
                for family, t in list(p.tables.items()):
                    fin = op_final if FAMILY_CLASSES[family].horizon == "inference" else q_final
                    for sid in t.sids(dirty_only=not fin):
                        out.append(Partial(space, int(key), self.series_keys[sid], family,
                                           t.state(sid), bool(fin), int(start), int(end)))
                    t.clean()
                    if fin:
                        del p.tables[family]
                p.dirty.clear()
                p.op_final, p.q_final = op_final, q_final
                if not p.states and not p.tables and q_final:
                    del panes[pkey]
        return out

    def _expire(self, wm: int) -> None:
        ex = self.pending.expire(wm, ("labelled",))
        if ex:
            unl = ~ex["labelled"]
            self.counters["inference_expired_unlabelled"] += int(unl.sum())
        ex = self.fb_store.expire(wm, ("matched",))
        if ex:
            self.counters["feedback_unmatched"] += int((~ex["matched"]).sum())
        if self.pair_tab is not None:
            ex = self.pair_tab.expire(wm, ("flags",))
            if ex:
                unpaired = int(((ex["flags"] & _R_HASP) == 0).sum())
                self.counters["paired_unmatched"] += unpaired   # no primary came
                self._pair_waiting -= unpaired

    # --------------------------------------------------------------- reports
    def stats(self) -> dict:
        return {
            "watermark": self.watermark, "max_ts": self.max_ts,
            "series": len(self.series_keys), "labels": len(self.labels),
            "pending": len(self.pending), "feedback_kept": len(self.fb_store),
            "paired_kept": len(self.pair_tab) if self.pair_tab is not None else 0,
            "open_panes": sum(len(p) for p in self.panes.values()),
            "counters": dict(self.counters),
            "rejected": {f"{f}:{r}": n for (f, r), n in self.rejected.items()},
            "state_bytes": self.state_nbytes(), "table_bytes": self.table_nbytes(),
        }

    def state_nbytes(self, deep: bool = False) -> int:
        """Bytes of metric state held: the arrays' data, or (``deep``) with object overhead."""
        from kpistream.engine.states import deep_size

        size = deep_size if deep else (lambda st: st.nbytes)
        return sum(size(st) for panes in self.panes.values() for p in panes.values()
                   for st in (*p.states.values(), *p.tables.values()))

    def table_nbytes(self) -> int:
        return (self.pending.nbytes + self.fb_store.nbytes
                + (self.pair_tab.nbytes if self.pair_tab is not None else 0))

    def active_series(self) -> int:
        s = set()
        for panes in self.panes.values():
            for p in panes.values():
                s.update(sid for _, sid in p.states)
                for t in p.tables.values():
                    s.update(t.sids())
        return len(s)


def _subset_csr(rows: np.ndarray, offs: np.ndarray, items: np.ndarray, grades: np.ndarray):
    ln = offs[rows + 1] - offs[rows]
    noffs = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(ln, out=noffs[1:])
    sel = _ranges(offs[rows], ln)
    return noffs, items[sel], grades[sel]


def ranking_metrics(rank_off: np.ndarray, rank_len: np.ndarray, arena: np.ndarray,
                    rel_offs: np.ndarray, rel_items: np.ndarray, rel_grades: np.ndarray,
                    k: int) -> dict[str, np.ndarray]:
    """Per pair: precision@k, recall@k (NaN without relevant items), NDCG@k, reciprocal rank@k.

    Rankings are the top ``k`` item hashes (``arena[rank_off : rank_off + rank_len]``);
    relevance is CSR (``rel_offs``, ``rel_items``, ``rel_grades``).  Gains are
    linear (grade / log2(rank + 1)), as in scikit-learn's ``ndcg_score``.
    """
    from kpistream.engine.kernels import ranking_pairs

    P = len(rank_off)
    out = {name: np.empty(P, dtype=np.float64) for name in ("p_at_k", "r_at_k", "ndcg", "rr")}
    ranking_pairs(np.ascontiguousarray(rank_off, dtype=np.int64),
                  np.ascontiguousarray(rank_len, dtype=np.int64),
                  arena, np.ascontiguousarray(rel_offs, dtype=np.int64), rel_items,
                  np.ascontiguousarray(rel_grades, dtype=np.float64), int(k),
                  out["p_at_k"], out["r_at_k"], out["ndcg"], out["rr"])
    return out


def run_events(engine: Engine, batches: Iterable[tuple[str, object]]) -> list[Partial]:
    """Feed ``("inference"|"feedback", batch)`` pairs, flush, and return every partial."""
    out: list[Partial] = []
    for kind, b in batches:
        if kind == "inference":
            engine.ingest_inference(b)  # type: ignore[arg-type]
        else:
            engine.ingest_feedback(b)  # type: ignore[arg-type]
    engine.flush()
    out.extend(engine.collect())
    return out
