"""Shadow / canary pairing: a challenger's inference meets the primary's for the same request.

Challenger inferences wait in a bounded table (and find earlier primaries in
the join table) until the label deadline; paired and labelled-pair sums go
to the ``paired`` family (:mod:`kpistream.engine.paired`) of time panes.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from kpistream.engine.join import CORRECT_BIT, ERR_BIT, ONCE_BITS
from kpistream.engine.keytable import KeyTable
from kpistream.engine.paired import (
    ARM_INFERENCE_COLS, ARM_LABEL_COLS, PAIR_INFERENCE_COLS, PAIR_LABEL_COLS, ROLE_CHALLENGER,
    ROLE_PRIMARY, PairedTable, arm_feedback_sums, arm_inference_sums, best_per_query,
    pair_form_kernel, pair_inference_sums, pair_label_sums_masked, record_labels_kernel,
    rows_of_slots, take_ready,
)
from kpistream.engine.panes import TIME, Pane
from kpistream.engine.states import TASK_CLASSIFICATION, TASK_REGRESSION
from kpistream.spec.metrics import EngineConfig
from kpistream.wire.batch import KIND_LABEL, KIND_REWARD, InferenceBatch

# flags of a pairing record
R_CERR, R_CLAB, R_HASP, R_PLAB, R_DONE = 1, 2, 4, 8, 16


class Pairing:
    """The pairing table (``tab``) and the ``paired`` family's sums.

    Records are challenger inferences by request id (ident: their event id),
    each with its primary partner once found (pident, pts); expiry: the label
    deadline of the challenger's pane while waiting, of the primary's pane
    once paired; c_out / p_out: first-label outcomes (1/0 correct, or the
    absolute error); flags: ``R_*`` bits.  ``pending`` is the join table of
    inferences (:class:`~kpistream.engine.join.Join`).
    """

    def __init__(self, cfg: EngineConfig, counters: Counter, vocab, panes, wm,
                 pending: KeyTable) -> None:
        self.counters = counters
        self.vocab = vocab
        self.panes = panes
        self.wm = wm
        self.pending = pending
        self.pane_ms = cfg.pane_ms
        self.tab = KeyTable(cfg.max_paired, {
            "csid": np.int32, "ctask": np.int8, "ptask": np.int8, "flags": np.uint8,
            "clat": np.float64, "c_out": np.float64, "p_out": np.float64, "pident": np.uint64,
            "pts": np.int64}, initial=1024)
        self.waiting = 0   # challenger entries without a primary yet

    # ------------------------------------------------------------------ sums
    def add_arms(self, b: InferenceBatch):
        """The arm sums of a batch's accepted inferences ``b``, as a hook for time-pane groups."""
        def arms(gid, panes, sids):
            sums = arm_inference_sums(gid, len(panes), b.error, b.latency_ms)
            self.add(panes, sids, sums, ARM_INFERENCE_COLS, arms=True)
        return arms

    def add(self, panes: list[Pane], sids: np.ndarray, sums: np.ndarray, cols: np.ndarray,
            arms: bool) -> None:
        """Add per-group sums (groups -> (time pane, series)) to the panes' paired tables.

        ``arms``: arm sums of each series' own role (series without a role,
        the overflow series, are skipped); else paired sums of challengers.
        """
        role = self.vocab.role
        by_pane: dict[int, tuple[Pane, list[int]]] = {}
        for i, p in enumerate(panes):
            by_pane.setdefault(id(p), (p, []))[1].append(i)
        for p, idx in by_pane.values():
            ix = np.asarray(idx, dtype=np.intp)
            t = p.tables.get("paired")
            if t is None:
                t = p.tables["paired"] = PairedTable(len(self.vocab.series_keys))
            if arms:
                roles = role[sids[ix]]
                ix = ix[roles >= 0]
                t.add_arms(sids[ix], role[sids[ix]], cols, sums[ix])
            else:
                t.add_pairs(sids[ix], cols, sums[ix])

    # ------------------------------------------------------------ inferences
    def add_inferences(self, b: InferenceBatch, kept: np.ndarray, s_: np.ndarray,
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
        V = self.vocab
        if not V.model_has_ch.any():
            return
        T = self.tab
        role = V.role[ser]
        model = V.model[ser]
        pm = (role == ROLE_PRIMARY) & V.pairable[ser]
        cm = role == ROLE_CHALLENGER
        if not (cm.any() or (pm.any() and self.waiting > 0)):
            return
        ts_k = b.ts[kept]
        req_k = b.request_id[kept]
        wm_after = self.wm.after(ts_k, prior_max)
        colp = self.pending.col
        c = T.col
        # (i) records waiting from earlier batches: the first live primary of this batch
        if self.waiting > 0 and pm.any():
            rows = np.flatnonzero(pm)
            qi, rs = T.lookup_multi(req_k[rows])
            if len(qi):
                csid = c["csid"][rs]
                ok = (((c["flags"][rs] & R_HASP) == 0)
                      & (V.model[csid] == model[rows][qi])
                      & (c["expiry"][rs] > wm_after[rows][qi]))
                qi, rs = qi[ok], rs[ok]
                order = np.lexsort((qi, rs))
                qi, rs = qi[order], rs[order]
                first = np.r_[True, rs[1:] != rs[:-1]] if len(rs) else np.zeros(0, dtype=bool)
                qi, rs = qi[first], rs[first]
                if len(rs):
                    self._form(rs, s_[rows[qi]])
        # (ii) this batch's challengers: recorded, and paired with a primary already here
        if cm.any():
            rows = np.flatnonzero(cm)
            rslots, dup = T.insert_multi(req_k[rows], colp["expiry"][s_[rows]],
                                         ident=b.event_id[kept][rows])
            self.count_evicted()
            if dup.any():   # a re-delivery whose join entry was evicted: recorded already
                rows, rslots = rows[~dup], rslots[~dup]
            c = T.col
            cs = s_[rows]
            c["csid"][rslots] = ser[rows]
            c["ctask"][rslots] = colp["task"][cs]
            c["clat"][rslots] = colp["lat"][cs]
            c["flags"][rslots] = np.where(b.error[kept][rows], R_CERR, 0)
            self.waiting += len(rows)
            self.counters["paired_challengers"] += len(rows)
            qi, ps = self.pending.lookup_multi(req_k[rows])
            if len(qi):
                pser = colp["series"][ps]
                row_c = rows[qi]
                ok = ((V.role[pser] == ROLE_PRIMARY)
                      & (V.model[pser] == model[row_c]))
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
                    self._form(rslots[qi[sel]], ps[sel])
        T.enforce_capacity()
        self.count_evicted()

    def _form(self, rs: np.ndarray, ps: np.ndarray) -> None:
        """Records ``rs`` get the primary inference at join-table slot ``ps``."""
        T = self.tab
        c, colp = T.col, self.pending.col
        n = len(rs)
        rs = np.ascontiguousarray(rs, dtype=np.int64)
        ps = np.ascontiguousarray(ps, dtype=np.int64)
        perr, cerr = np.empty(n, dtype=np.bool_), np.empty(n, dtype=np.bool_)
        plat, clat = np.empty(n), np.empty(n)
        lo = pair_form_kernel(
            rs, ps, self.pending.ident, colp["ts"], colp["task"], colp["seen"],
            colp["pred_value"], colp["lat"], colp["expiry"], c["pident"], c["pts"], c["ptask"],
            c["p_out"], c["flags"], c["expiry"], c["clat"], np.uint8(ERR_BIT),
            np.uint8(CORRECT_BIT), np.uint8(ONCE_BITS[KIND_LABEL]), np.uint8(R_HASP),
            np.uint8(R_PLAB), np.uint8(R_CERR),
            np.int8(TASK_CLASSIFICATION), np.int8(TASK_REGRESSION), perr, cerr, plat, clat)
        T.min_expiry = min(T.min_expiry, int(lo))
        self.waiting -= n
        self.counters["paired_requests"] += n
        pts = c["pts"][rs]
        gid, panes, sids = self.panes.groups(TIME, pts - pts % self.pane_ms,
                                             c["csid"][rs].astype(np.int64))
        sums = pair_inference_sums(gid, len(panes), perr, cerr, plat, clat)
        self.add(panes, sids, sums, PAIR_INFERENCE_COLS, arms=False)
        self._emit_labelled(take_ready(rs, c["flags"], np.uint8(R_HASP | R_CLAB | R_PLAB),
                                       np.uint8(R_DONE)))

    def _emit_labelled(self, rs: np.ndarray) -> None:
        """Labelled-pair sums of records ``rs``, whose two sides now have their label."""
        if not len(rs):
            return
        c = self.tab.col
        pt, ct = c["ptask"][rs], c["ctask"][rs]
        pts = c["pts"][rs]
        gid, panes, sids = self.panes.groups(TIME, pts - pts % self.pane_ms,
                                             c["csid"][rs].astype(np.int64))
        sums = pair_label_sums_masked(gid, len(panes), pt == TASK_CLASSIFICATION,
                                      ct == TASK_CLASSIFICATION, pt == TASK_REGRESSION,
                                      ct == TASK_REGRESSION, c["p_out"][rs], c["c_out"][rs])
        self.add(panes, sids, sums, PAIR_LABEL_COLS, arms=False)
        self.counters["paired_labelled"] += len(rs)

    # -------------------------------------------------------------- feedback
    def feedback(self, ps, series, kind, value, use, fb_kind, fb_groups, m_cls, true_cls,
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
                                        col["seen"], CORRECT_BIT)
        self.add(panes, sids, sums, ARM_LABEL_COLS, arms=True)
        if not len(self.tab):
            return
        # first labels of inferences that may be in a pairing record: the outcome
        # goes to the record (by request id, and event id of either side)
        outcome = np.full(len(ps), np.nan)
        outcome[f] = out_f
        li = np.flatnonzero((m_cls | m_reg) & self.vocab.pairable[series])
        if not len(li):
            return
        req, ident = ids
        qi, rs = self.tab.lookup_multi(req[li])
        if not len(qi):
            return
        ident = self.pending.ident[ps[li]] if ident is None else ident[li]
        c = self.tab.col
        ready = record_labels_kernel(
            qi, rs, ident, np.ascontiguousarray(wm_pairs[li], dtype=np.int64),
            self.vocab.role[series[li]], outcome[li], self.tab.ident,
            c["expiry"], c["flags"], c["pident"], c["c_out"], c["p_out"], np.int8(ROLE_PRIMARY),
            np.int8(ROLE_CHALLENGER), np.uint8(R_HASP), np.uint8(R_CLAB), np.uint8(R_PLAB),
            np.uint8(R_DONE))
        self._emit_labelled(ready)

    # ---------------------------------------------------------------- expiry
    def count_evicted(self) -> None:
        ev = self.tab.take_evicted()
        if ev:
            self.counters["paired_evicted"] += len(ev["expiry"])
            self.waiting -= int(((ev["flags"] & R_HASP) == 0).sum())

    def expire(self, wm: int) -> None:
        """Drop records past their deadline; count challengers no primary came for."""
        ex = self.tab.expire(wm, ("flags",))
        if ex:
            unpaired = int(((ex["flags"] & R_HASP) == 0).sum())
            self.counters["paired_unmatched"] += unpaired   # no primary came
            self.waiting -= unpaired
