"""The join of inferences and feedback by request id, which also deduplicates by event id.

Symmetric and in either order: inferences wait for feedback until their
pane's label deadline (pane end + label delay), feedback waits for
inferences (early feedback, a shadow's late prediction) for the label delay;
both tables are bounded.  Matched pairs are folded into the inference's panes.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from kpistream.engine.kernels import apply_once
from kpistream.engine.keytable import KeyTable
from kpistream.engine.states import TASK_CLASSIFICATION, TASK_RANKING, TASK_REGRESSION
from kpistream.engine.panes import TIME
from kpistream.spec.metrics import EngineConfig
from kpistream.wire.batch import (
    KIND_CLICK, KIND_CONVERSION, KIND_DWELL, KIND_LABEL, KIND_RELEVANCE, KIND_REWARD,
    KIND_THUMBS, FeedbackBatch, InferenceBatch, ranges,
)

# bits of the per-inference "seen" mask: feedback kinds that count once per inference
ONCE_BITS = {KIND_LABEL: 1, KIND_CLICK: 2, KIND_CONVERSION: 4, KIND_RELEVANCE: 8}
# ... and two more bits of it for the paired family: the inference's status was
# "error"; its first label made it correct (classification)
ERR_BIT, CORRECT_BIT = 16, 32


class Join:
    """The join tables (``pending`` inferences, ``fb_store`` feedback) and matched pairs.

    Each table remembers every entry's event id, so a re-delivery is caught
    for as long as it would not be late anyway.  ``pairing`` (set by the
    engine when the paired family is on) gets the label outcomes of pairs.
    """

    def __init__(self, cfg: EngineConfig, counters: Counter, vocab, panes, wm,
                 families: tuple[str, ...]) -> None:
        self.cfg = cfg
        self.counters = counters
        self.vocab = vocab
        self.panes = panes
        self.wm = wm
        self.families = families
        self._paired_on = "paired" in families
        self.pairing = None
        self.pane_ms = cfg.pane_ms
        self._k = cfg.k
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
        self.fb_store = KeyTable(cfg.max_feedback, {
            "ts": np.int64, "kind": np.int8, "label": np.int32, "value": np.float64,
            "matched": np.bool_, "seq": np.int64},
            arenas={"rel": {"items": np.uint64, "grades": np.float64}})
        self._fb_seq = 0

    # ------------------------------------------------------------------ dedup
    def insert_inferences(self, batch: InferenceBatch, ok: np.ndarray) -> tuple[np.ndarray, int]:
        """Insert the ``ok`` inferences (duplicates leave ``ok``); kept until the label deadline."""
        return self._insert_dedup(
            self.pending, batch, ok, "duplicate_inference", "pending_evicted",
            lambda t: t - t % self.pane_ms + self.pane_ms + self.cfg.label_delay_ms)

    def insert_feedback(self, batch: FeedbackBatch, ok: np.ndarray) -> tuple[np.ndarray, int]:
        """Insert the ``ok`` feedback (duplicates leave ``ok``); kept until a re-delivery
        would be late (ts < wm - label_delay)."""
        return self._insert_dedup(
            self.fb_store, batch, ok, "duplicate_feedback", "feedback_evicted",
            lambda t: t + self.cfg.label_delay_ms + 1)

    def _insert_dedup(self, table: KeyTable, batch, ok: np.ndarray, dup_counter: str,
                      evicted_counter: str, expiry_of) -> tuple[np.ndarray, int]:
        """Insert the ``ok`` rows into a join table, which also deduplicates them.

        A row whose request already holds an entry with its event id is a
        duplicate: it is taken out of ``ok`` and counted.  Returns each row's
        slot (-1 for rows not inserted) and the number of duplicates.
        """
        slots_all = np.full(len(batch), -1, dtype=np.int64)
        idx = np.flatnonzero(ok)
        ndup = 0
        if len(idx):
            sl, dup = table.insert_multi(batch.request_id[idx], expiry_of(batch.ts[idx]),
                                         ident=batch.event_id[idx])
            slots_all[idx] = sl
            ok[idx[dup]] = False
            ndup = int(dup.sum())
            self.counters[dup_counter] += ndup
            self._count_evicted(table, evicted_counter)
        return slots_all, ndup

    def _count_evicted(self, table: KeyTable, name: str) -> None:
        ev = table.take_evicted()
        if ev:
            self.counters[name] += len(ev["expiry"])

    # ------------------------------------------------------------- inferences
    def store_inferences(self, b: InferenceBatch, slots: np.ndarray, series: np.ndarray,
                         task: np.ndarray, pred: np.ndarray, cw_keys) -> tuple[np.ndarray, np.ndarray]:
        """The rest of each accepted inference's entry, kept for feedback until the label deadline.

        Returns the rows kept (``slots >= 0``) and their slots.
        """
        kept = slots >= 0
        if not kept.all():
            self.counters["join_chain_overflow"] += int((~kept).sum())
        s_ = slots[kept]
        colp = self.pending.col
        colp["ts"][s_] = b.ts[kept]
        colp["series"][s_] = series[kept]
        colp["task"][s_] = task[kept]
        colp["pred"][s_] = pred[kept]
        colp["pred_value"][s_] = b.pred_value[kept]
        colp["seen"][s_] = 0
        colp["labelled"][s_] = False
        if self._paired_on:
            colp["lat"][s_] = b.latency_ms[kept]
            colp["seen"][s_] = np.where(b.error[kept], ERR_BIT, 0)
        for w in self.cfg.count_windows:
            colp[f"cw_{w.name}"][s_] = cw_keys[w.name][kept]
        rk = kept & (task == TASK_RANKING)
        if rk.any():
            # keep the top K items only
            offs = b.rank_offsets
            rank_len = np.diff(offs)
            lo = offs[:-1]
            topk = np.minimum(rank_len, self._k)
            toffs = np.zeros(len(b) + 1, dtype=np.int64)
            np.cumsum(topk, out=toffs[1:])
            items = b.rank_items[ranges(lo, topk)]
            rows = np.flatnonzero(rk)
            self.pending.arena_put("rank", slots[rows], toffs, {"items": items}, rows)
        return kept, s_

    def meet_early_feedback(self, b: InferenceBatch, kept: np.ndarray, s_: np.ndarray,
                            prior_max: int) -> int:
        """Feedback that came before this batch's inferences (kept rows, slots ``s_``).

        As one-event-at-a-time processing sees it: the watermark just after
        each inference, and in arrival order.  Returns the pairs used.
        """
        if not len(self.fb_store):
            return 0
        qi, fs = self.fb_store.lookup_multi(b.request_id[kept])
        if len(qi):
            wm_after = self.wm.after(b.ts[kept], prior_max)
            st = self.fb_store.col
            live = st["expiry"][fs] > wm_after[qi]
            qi, fs = qi[live], fs[live]
            order = np.lexsort((st["seq"][fs], qi))
            qi, fs = qi[order], fs[order]
        if not len(qi):
            return 0
        ps = s_[qi]
        st["matched"][fs] = True
        rel = self.fb_store.arena["rel"]
        roffs = np.zeros(len(fs) + 1, dtype=np.int64)
        ln = st["rel_len"][fs].astype(np.int64)
        np.cumsum(ln, out=roffs[1:])
        sel = ranges(st["rel_off"][fs], ln)
        ids = ((b.request_id[kept][qi], b.event_id[kept][qi]) if self._paired_on else None)
        return self.apply_pairs(ps, st["kind"][fs], st["label"][fs], st["value"][fs],
                                roffs, rel["items"][sel], rel["grades"][sel], wm_after[qi], ids)

    def trim_pending(self) -> None:
        """Evict inferences over ``max_pending`` (counted)."""
        self.pending.enforce_capacity()
        self._count_evicted(self.pending, "pending_evicted")

    # --------------------------------------------------------------- feedback
    def meet_inferences(self, b: FeedbackBatch, label: np.ndarray,
                        wm: np.ndarray) -> tuple[np.ndarray, int]:
        """Accepted feedback meets the inferences already here (live at each row's ``wm``).

        Returns which rows matched and the pairs used.
        """
        matched = np.zeros(len(b), dtype=bool)
        if not len(self.pending):
            return matched, 0
        qi, ps = self.pending.lookup_multi(b.request_id)
        live = self.pending.col["expiry"][ps] > wm[qi]
        qi, ps = qi[live], ps[live]
        if not len(qi):
            return matched, 0
        matched[qi] = True
        roffs = b.rel_offsets
        ln = roffs[qi + 1] - roffs[qi]
        noffs = np.zeros(len(qi) + 1, dtype=np.int64)
        np.cumsum(ln, out=noffs[1:])
        sel = ranges(roffs[qi], ln)
        ids = (b.request_id[qi], None) if self._paired_on else None
        return matched, self.apply_pairs(ps, b.kind[qi], label[qi], b.value[qi], noffs,
                                         b.rel_items[sel], b.rel_grades[sel], wm[qi], ids)

    def store_feedback(self, b: FeedbackBatch, slots: np.ndarray, label: np.ndarray,
                       matched: np.ndarray) -> None:
        """Keep every accepted feedback for inferences that arrive later (bounded, counted)."""
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

    # ------------------------------------------------------------------ pairs
    def apply_pairs(self, ps: np.ndarray, kind: np.ndarray, label: np.ndarray,
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
        for k, bit in ONCE_BITS.items():
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
            true_cls = self.vocab.local_codes(series[m_cls].astype(np.int64), label[m_cls])
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
            fb_groups = self.panes.groups(TIME, pane_start[fb_kind], series[fb_kind])
        for family, m, cols in jobs:
            for space, keys in self.panes.spaces(pane_start[m], self._cw_keys(ps[m])):
                if family == "feedback" and space == TIME:
                    gid, panes, sids = fb_groups
                else:
                    gid, panes, sids = self.panes.groups(space, keys, series[m])
                self.panes.update(space, family, panes, sids, gid, cols)
        if self._paired_on and fb_groups is not None:
            self.pairing.feedback(ps, series, kind, value, use, fb_kind, fb_groups, m_cls,
                                  true_cls, use & reg_ok, wm_pairs, ids)
        n_used = int(use.sum())
        self.counters["join_pairs"] += n_used
        return n_used

    def _cw_keys(self, ps: np.ndarray) -> dict[str, np.ndarray]:
        """Count-window indices of the join-table slots ``ps``."""
        col = self.pending.col
        return {w.name: col[f"cw_{w.name}"][ps] for w in self.cfg.count_windows}

    def _ranking_cols(self, ps, rel_offs, rel_items, rel_grades) -> dict[str, np.ndarray]:
        return ranking_metrics(self.pending.col["rank_off"][ps],
                               self.pending.col["rank_len"][ps].astype(np.int64),
                               self.pending.arena["rank"]["items"], rel_offs, rel_items,
                               rel_grades, self._k)

    # ----------------------------------------------------------------- expiry
    def expire(self, wm: int) -> None:
        """Drop entries past their deadline; count unlabelled inferences, unmatched feedback."""
        ex = self.pending.expire(wm, ("labelled",))
        if ex:
            unl = ~ex["labelled"]
            self.counters["inference_expired_unlabelled"] += int(unl.sum())
        ex = self.fb_store.expire(wm, ("matched",))
        if ex:
            self.counters["feedback_unmatched"] += int((~ex["matched"]).sum())

    @property
    def nbytes(self) -> int:
        return self.pending.nbytes + self.fb_store.nbytes


def _subset_csr(rows: np.ndarray, offs: np.ndarray, items: np.ndarray, grades: np.ndarray):
    ln = offs[rows + 1] - offs[rows]
    noffs = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(ln, out=noffs[1:])
    sel = ranges(offs[rows], ln)
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
