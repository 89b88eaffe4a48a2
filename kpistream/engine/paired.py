"""Family ``paired``: per-arm totals and paired statistics for shadow / canary comparison.

A request can be scored by several variants of one model: the same
``request_id`` and ``model``, a different ``variant``.  The variant named by
the config (``metrics.paired.primary_variant``, default ``"primary"``) is the
*primary*; every other variant of the model is a *challenger arm*.

Two kinds of evidence, both sufficient statistics (sums), so merging the
states of any partition of a stream gives the state of the whole stream:

**Arms** (unpaired, per series): what canary mode compares, where each
request is served by one arm only.  Per arm: requests, errors (status
``error``), labelled (inferences with a first label: classification or
regression), correct (classification), and ``(n, sum, sumsq)`` of the
natural log of latency (ms), of reward feedback and of the regression
absolute error ``|pred - label|``.  Every series has a paired state that
carries its own arm: a series of the primary variant fills
``arms["primary"]``, any other variant fills ``arms["challenger"]``.  So the
primary arm of a comparison is the paired state of the *primary's* series:
a caller merges the summaries of the primary's and the challenger's series
(same model, window and segments) with :func:`merge_summaries`, or calls
:func:`comparison`.  (Putting the primary's totals into every challenger's
state would make a shard that never saw the challenger unable to report its
share of the primary arm: merged shards would not equal one engine.)

**Paired** (shadow mode, in the challenger's series): a challenger
inference whose request was also answered by the primary of the same model
is a *paired request*.  It is attributed to the pane of the **primary's**
inference time (both sides of a comparison then share their windows with the
primary's own KPIs).  Per pair, d = challenger - primary:

- ``requests``; ``error``: the 2x2 table of (primary error, challenger error);
- ``log_latency``: ``(n, sum d, sum d^2)`` of the log-latency difference;
- once both inferences have their first label (the engine's join: each
  inference's first label in arrival order, compared as the classification
  family compares them, canonical labels in the series' vocabulary):
  ``labelled``, ``correct``: the 2x2 table of (primary correct, challenger
  correct) when both are classifications, and ``abs_error``:
  ``(n, sum d, sum d^2)`` of the absolute-error difference when both are
  regressions.  Ranking predictions are not compared (no ``correct`` for a
  ranking; they count in ``requests`` and ``error`` only).

There is no paired reward: in shadow mode the user saw the primary's answer
only, so reward feedback belongs to the primary's answer.  (The engine joins
feedback to every inference of a request, so in shadow mode the challenger
arm's ``reward`` is the primary's reward; it means something in canary mode
only, where each request is served by one arm.)

**Pairing in the engine** (:class:`~kpistream.engine.pairing.Pairing`, time panes
only; count windows have no paired state).  Each accepted challenger
inference gets a record in a bounded table keyed by request id
(``join.max_paired``); it looks for the primary's inference in the join
table (which holds every inference until its label deadline), else waits
for it.  Its partner: a primary inference of the same request and model
that arrived before it (the smallest event-id hash if several did), else
the first to arrive after it; both must be live -- their pane's label
deadline (pane end + label delay) not passed -- when the later one
arrives.  The rule depends on arrival order only, so batching and sharding
by request id change nothing.  A record expires at the label deadline of
the challenger's pane while it waits, of the primary's pane once paired
(a later label no longer counts for the pair, whose pane is final; it may
still count in the challenger's own arm).
Each challenger inference (each challenger variant) is a pair of its own.
Engine counters: ``paired_challengers`` (records made), ``paired_requests``,
``paired_labelled``, ``paired_unmatched`` (records expired without a
primary), ``paired_evicted`` (capacity); ``stats()["paired_kept"]``.
Latencies below ``MIN_LATENCY_MS`` are taken as ``MIN_LATENCY_MS`` before
the log.

The tidy rows of a challenger's state (:meth:`PairedState.value`):
``paired_requests``, ``paired_labelled``, ``accuracy_diff`` (challenger -
primary accuracy over pairs where both are classifications, labelled),
``error_rate_diff``, ``latency_log_ratio`` (mean log-latency difference: the
log of the geometric-mean latency ratio) and ``mae_diff``.  A state without
paired requests (a primary series, a canary arm) has no rows; its evidence is
in :meth:`PairedState.summary`.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np
from numba import njit

from kpistream.engine.states import SeriesFlags, SumsState, Value

#: Latency floor (ms) before the log: a zero latency is a clock artefact, not a speed-up.
MIN_LATENCY_MS = 1e-3

#: One arm's sums, in order.
ARM: tuple[str, ...] = ("requests", "errors", "labelled", "correct", "lat_sum", "lat_sq",
                        "rew_n", "rew_sum", "rew_sq", "ae_n", "ae_sum", "ae_sq")
#: The paired sums, in order (``cAB``: A = primary correct, B = challenger correct; ``eAB`` errors).
PAIR: tuple[str, ...] = ("requests", "labelled", "c11", "c10", "c01", "c00",
                         "e11", "e10", "e01", "e00", "ll_sum", "ll_sq", "ae_n", "ae_sum", "ae_sq")
NA, NP = len(ARM), len(PAIR)
ROLE_NONE, ROLE_PRIMARY, ROLE_CHALLENGER = -1, 0, 1

# column indexes of the partial sums below
ARM_INFERENCE_COLS = np.array([ARM.index(c) for c in ("requests", "errors", "lat_sum", "lat_sq")])
ARM_LABEL_COLS = np.array([ARM.index(c) for c in ("labelled", "correct", "rew_n", "rew_sum",
                                                   "rew_sq", "ae_n", "ae_sum", "ae_sq")])
PAIR_INFERENCE_COLS = np.array([PAIR.index(c) for c in ("requests", "e11", "e10", "e01", "e00",
                                                         "ll_sum", "ll_sq")])
PAIR_LABEL_COLS = np.array([PAIR.index(c) for c in ("labelled", "c11", "c10", "c01", "c00",
                                                     "ae_n", "ae_sum", "ae_sq")])


@njit(cache=True)
def _arm_inference_kernel(group, error, lat, floor, out):
    for i in range(group.shape[0]):
        g = group[i]
        x = lat[i]
        if x < floor:
            x = floor
        ll = np.log(x)
        out[g, 0] += 1.0
        if error[i]:
            out[g, 1] += 1.0
        out[g, 2] += ll
        out[g, 3] += ll * ll


def arm_inference_sums(group: np.ndarray, n_groups: int, error: np.ndarray,
                       latency: np.ndarray) -> np.ndarray:
    """(n_groups, 4) sums for :data:`ARM_INFERENCE_COLS`: one pass in machine code."""
    out = np.zeros((n_groups, 4), dtype=np.float64)
    if len(group):
        _arm_inference_kernel(np.ascontiguousarray(group, dtype=np.int64),
                              np.ascontiguousarray(error, dtype=np.bool_),
                              np.ascontiguousarray(latency, dtype=np.float64), MIN_LATENCY_MS, out)
    return out


@njit(cache=True)
def _arm_label_kernel(group, is_cls, is_reg, outcome, is_rew, value, out):
    for i in range(group.shape[0]):
        g = group[i]
        if is_cls[i] or is_reg[i]:
            out[g, 0] += 1.0
        if is_cls[i]:
            out[g, 1] += outcome[i]
        if is_rew[i]:
            v = value[i]
            out[g, 2] += 1.0
            out[g, 3] += v
            out[g, 4] += v * v
        if is_reg[i]:
            a = outcome[i]
            out[g, 5] += 1.0
            out[g, 6] += a
            out[g, 7] += a * a


def arm_label_sums_masked(group: np.ndarray, n_groups: int, is_cls: np.ndarray,
                          is_reg: np.ndarray, outcome: np.ndarray, is_rew: np.ndarray,
                          value: np.ndarray) -> np.ndarray:
    """(n_groups, 8) sums for :data:`ARM_LABEL_COLS` (the engine's form).

    Per joined row: ``is_cls`` a first classification label (``outcome``
    1/0: correct), ``is_reg`` a first regression label (``outcome``: the
    absolute error), ``is_rew`` a reward (``value``).
    """
    out = np.zeros((n_groups, 8), dtype=np.float64)
    if len(group):
        _arm_label_kernel(np.ascontiguousarray(group, dtype=np.int64),
                          np.ascontiguousarray(is_cls, dtype=np.bool_),
                          np.ascontiguousarray(is_reg, dtype=np.bool_),
                          np.ascontiguousarray(outcome, dtype=np.float64),
                          np.ascontiguousarray(is_rew, dtype=np.bool_),
                          np.ascontiguousarray(value, dtype=np.float64), out)
    return out


def arm_label_sums(group: np.ndarray, n_groups: int, correct: np.ndarray,
                   abs_error: np.ndarray, reward: np.ndarray) -> np.ndarray:
    """(n_groups, 8) sums for :data:`ARM_LABEL_COLS`.

    One row per joined (inference, feedback) pair that counts: ``correct``
    1/0 for a first classification label (NaN otherwise), ``abs_error`` for a
    first regression label (NaN otherwise), ``reward`` for a reward (NaN
    otherwise).
    """
    is_cls, is_reg, is_rew = ~np.isnan(correct), ~np.isnan(abs_error), ~np.isnan(reward)
    return arm_label_sums_masked(group, n_groups, is_cls, is_reg,
                                 np.where(is_cls, correct, np.where(is_reg, abs_error, 0.0)),
                                 is_rew, np.where(is_rew, reward, 0.0))


@njit(cache=True)
def _arm_feedback_kernel(group, ps, is_cls, true_code, is_reg, is_rew, value, pred, pred_value,
                         seen, correct_bit, out, outcome):
    for i in range(group.shape[0]):
        g = group[i]
        s = ps[i]
        if is_cls[i]:
            out[g, 0] += 1.0
            if pred[s] == true_code[i]:
                out[g, 1] += 1.0
                seen[s] |= correct_bit
                outcome[i] = 1.0
            else:
                outcome[i] = 0.0
        elif is_reg[i]:
            a = abs(pred_value[s] - value[i])
            pred_value[s] = a
            out[g, 0] += 1.0
            out[g, 5] += 1.0
            out[g, 6] += a
            out[g, 7] += a * a
            outcome[i] = a
        if is_rew[i]:
            v = value[i]
            out[g, 2] += 1.0
            out[g, 3] += v
            out[g, 4] += v * v


def arm_feedback_sums(group: np.ndarray, n_groups: int, ps: np.ndarray, is_cls: np.ndarray,
                      true_code: np.ndarray, is_reg: np.ndarray, is_rew: np.ndarray,
                      value: np.ndarray, pred: np.ndarray, pred_value: np.ndarray,
                      seen: np.ndarray, correct_bit: int) -> tuple[np.ndarray, np.ndarray]:
    """The engine's one pass over joined feedback rows: (n_groups, 8) sums for
    :data:`ARM_LABEL_COLS` and each row's label outcome (1/0 correct, or the
    absolute error; NaN for other rows).

    In place, on the join table's columns at slots ``ps``: a correct
    classification sets ``correct_bit`` in ``seen``; a regression's
    prediction ``pred_value`` is replaced by its absolute error.
    """
    out = np.zeros((n_groups, 8), dtype=np.float64)
    outcome = np.full(len(group), np.nan)
    if len(group):
        _arm_feedback_kernel(np.ascontiguousarray(group, dtype=np.int64),
                             np.ascontiguousarray(ps, dtype=np.int64),
                             np.ascontiguousarray(is_cls, dtype=np.bool_),
                             np.ascontiguousarray(true_code, dtype=np.int32),
                             np.ascontiguousarray(is_reg, dtype=np.bool_),
                             np.ascontiguousarray(is_rew, dtype=np.bool_),
                             np.ascontiguousarray(value, dtype=np.float64), pred, pred_value,
                             seen, np.uint8(correct_bit), out, outcome)
    return out, outcome


@njit(cache=True)
def _pair_inference_kernel(group, p_err, c_err, p_lat, c_lat, floor, out):
    for i in range(group.shape[0]):
        g = group[i]
        out[g, 0] += 1.0
        code = (0 if p_err[i] else 2) + (0 if c_err[i] else 1)   # 11, 10, 01, 00
        out[g, 1 + code] += 1.0
        a = p_lat[i]
        b = c_lat[i]
        if a < floor:
            a = floor
        if b < floor:
            b = floor
        d = np.log(b) - np.log(a)
        out[g, 5] += d
        out[g, 6] += d * d


def pair_inference_sums(group: np.ndarray, n_groups: int, p_error: np.ndarray, c_error: np.ndarray,
                        p_latency: np.ndarray, c_latency: np.ndarray) -> np.ndarray:
    """(n_groups, 7) sums for :data:`PAIR_INFERENCE_COLS`, one row per paired request."""
    out = np.zeros((n_groups, 7), dtype=np.float64)
    if len(group):
        _pair_inference_kernel(np.ascontiguousarray(group, dtype=np.int64),
                               np.ascontiguousarray(p_error, dtype=np.bool_),
                               np.ascontiguousarray(c_error, dtype=np.bool_),
                               np.ascontiguousarray(p_latency, dtype=np.float64),
                               np.ascontiguousarray(c_latency, dtype=np.float64),
                               MIN_LATENCY_MS, out)
    return out


@njit(cache=True)
def _pair_label_kernel(group, p_cls, c_cls, p_reg, c_reg, p_out, c_out, out):
    for i in range(group.shape[0]):
        g = group[i]
        out[g, 0] += 1.0
        if p_cls[i] and c_cls[i]:
            code = (0 if p_out[i] > 0.5 else 2) + (0 if c_out[i] > 0.5 else 1)
            out[g, 1 + code] += 1.0
        if p_reg[i] and c_reg[i]:
            d = c_out[i] - p_out[i]
            out[g, 5] += 1.0
            out[g, 6] += d
            out[g, 7] += d * d


def pair_label_sums_masked(group: np.ndarray, n_groups: int, p_cls: np.ndarray, c_cls: np.ndarray,
                           p_reg: np.ndarray, c_reg: np.ndarray, p_out: np.ndarray,
                           c_out: np.ndarray) -> np.ndarray:
    """(n_groups, 8) sums for :data:`PAIR_LABEL_COLS` (the engine's form): per labelled
    pair, each side's task flags and first-label outcome (1/0 correct, or the absolute error)."""
    out = np.zeros((n_groups, 8), dtype=np.float64)
    if len(group):
        b = lambda x: np.ascontiguousarray(x, dtype=np.bool_)  # noqa: E731
        f = lambda x: np.ascontiguousarray(x, dtype=np.float64)  # noqa: E731
        _pair_label_kernel(np.ascontiguousarray(group, dtype=np.int64), b(p_cls), b(c_cls),
                           b(p_reg), b(c_reg), f(p_out), f(c_out), out)
    return out


def pair_label_sums(group: np.ndarray, n_groups: int, p_correct: np.ndarray, c_correct: np.ndarray,
                    p_abs_error: np.ndarray, c_abs_error: np.ndarray) -> np.ndarray:
    """(n_groups, 8) sums for :data:`PAIR_LABEL_COLS`, one row per labelled pair.

    ``*_correct`` are 1/0 (NaN: not a classification), ``*_abs_error`` NaN
    where not a regression; a side of each kind counts only if both are.
    """
    pc, cc = ~np.isnan(p_correct), ~np.isnan(c_correct)
    pr, cr = ~np.isnan(p_abs_error), ~np.isnan(c_abs_error)
    po = np.where(pc, p_correct, np.where(pr, p_abs_error, 0.0))
    co = np.where(cc, c_correct, np.where(cr, c_abs_error, 0.0))
    return pair_label_sums_masked(group, n_groups, pc, cc, pr, cr, po, co)


@njit(cache=True)
def best_per_query(qi, first_class, key):
    """Per run of equal ``qi`` (non-decreasing): the index of the best candidate,
    ``first_class`` ones before the others, then the smallest ``key``."""
    n = qi.shape[0]
    out = np.empty(n, dtype=np.int64)
    m = 0
    i = 0
    while i < n:
        best = i
        j = i + 1
        while j < n and qi[j] == qi[i]:
            if (first_class[j] and not first_class[best]) or (
                    first_class[j] == first_class[best] and key[j] < key[best]):
                best = j
            j += 1
        out[m] = best
        m += 1
        i = j
    return out[:m]


@njit(cache=True)
def rows_of_slots(slots, rows, queries):
    """For each query slot: its row if it is one of ``slots`` (``rows[i]`` for
    ``slots[i]``, distinct), else -1.  A small open-addressing map, O(n)."""
    size = 16
    while size < 2 * slots.shape[0]:
        size *= 2
    mask = size - 1
    keys = np.full(size, -1, dtype=np.int64)
    vals = np.empty(size, dtype=np.int64)
    for i in range(slots.shape[0]):
        k = slots[i]
        h = (k * 0x9E3779B1) & mask
        while keys[h] != -1:
            h = (h + 1) & mask
        keys[h] = k
        vals[h] = rows[i]
    out = np.full(queries.shape[0], -1, dtype=np.int64)
    for j in range(queries.shape[0]):
        k = queries[j]
        h = (k * 0x9E3779B1) & mask
        while keys[h] != -1:
            if keys[h] == k:
                out[j] = vals[h]
                break
            h = (h + 1) & mask
    return out


@njit(cache=True)
def take_ready(rs, flags, full, done):
    """Record slots among ``rs`` whose ``flags`` have every bit of ``full`` and not
    ``done``; marks them ``done`` (each slot once)."""
    out = np.empty(rs.shape[0], dtype=np.int64)
    m = 0
    for i in range(rs.shape[0]):
        r = rs[i]
        f = flags[r]
        if (f & full) == full and (f & done) == 0:
            flags[r] = f | done
            out[m] = r
            m += 1
    return out[:m]


# --- the engine's pairing kernels (join-table slot ``s``, pairing-record slot ``r``)

@njit(cache=True)
def pair_form_kernel(rs, ps, j_ident, j_ts, j_task, j_seen, j_pred_value, j_lat, j_expiry,
                     r_pident, r_pts, r_ptask, r_pout, r_flags, r_expiry, r_clat,
                     err_bit, correct_bit, label_bit, f_hasp, f_plab, f_cerr, task_cls, task_reg,
                     o_perr, o_cerr, o_plat, o_clat):
    """Records ``rs[i]`` get the primary inference at join-table slot ``ps[i]``:
    its event id, time, task, first-label outcome (``label_bit`` of ``seen``:
    it has its first label) and label deadline (the record's new expiry).
    Fills the per-pair outputs ``o_*`` for the paired sums; returns the
    smallest new expiry."""
    lo = np.iinfo(np.int64).max
    for i in range(rs.shape[0]):
        r = rs[i]
        s = ps[i]
        r_pident[r] = j_ident[s]
        r_pts[r] = j_ts[s]
        t = j_task[s]
        r_ptask[r] = t
        seen = j_seen[s]
        if t == task_cls:
            r_pout[r] = 1.0 if (seen & correct_bit) != 0 else 0.0
        else:
            r_pout[r] = j_pred_value[s]
        f = r_flags[r] | f_hasp
        if (seen & label_bit) != 0 and (t == task_cls or t == task_reg):
            f |= f_plab
        r_flags[r] = f
        e = j_expiry[s]
        r_expiry[r] = e
        if e < lo:
            lo = e
        o_perr[i] = (seen & err_bit) != 0
        o_cerr[i] = (f & f_cerr) != 0
        o_plat[i] = j_lat[s]
        o_clat[i] = r_clat[r]
    return lo


@njit(cache=True)
def record_labels_kernel(qi, rs, ident, wm, role, outcome, r_ident, r_expiry, r_flags,
                         r_pident, r_cout, r_pout, role_p, role_c, f_hasp, f_clab, f_plab,
                         f_done):
    """First-label outcomes of inferences (query ``q``: event id ``ident[q]``,
    ``role[q]``, ``outcome[q]``, watermark ``wm[q]``) into the live records
    ``rs`` found for their request: the challenger side by its event id, the
    primary side by its partner's.  Returns the records that now have both
    sides labelled (each once; marked done)."""
    ready = np.empty(rs.shape[0], dtype=np.int64)
    m = 0
    for j in range(rs.shape[0]):
        r = rs[j]
        q = qi[j]
        if r_expiry[r] <= wm[q]:
            continue
        f = r_flags[r]
        if role[q] == role_c and r_ident[r] == ident[q]:
            f |= f_clab
            r_cout[r] = outcome[q]
        elif role[q] == role_p and (f & f_hasp) != 0 and r_pident[r] == ident[q]:
            f |= f_plab
            r_pout[r] = outcome[q]
        else:
            continue
        full = f_hasp | f_clab | f_plab
        if (f & full) == full and (f & f_done) == 0:
            f |= f_done
            ready[m] = r
            m += 1
        r_flags[r] = f
    return ready[:m]


def _opt(cols: Mapping[str, np.ndarray], name: str, n: int) -> np.ndarray:
    v = cols.get(name)
    return np.full(n, np.nan) if v is None else np.asarray(v, dtype=np.float64)


#: The metrics of a paired state's rows (a challenger series; also in the store).
PAIRED_METRICS: tuple[str, ...] = ("paired_requests", "paired_labelled", "error_rate_diff",
                                   "latency_log_ratio", "accuracy_diff", "mae_diff")

class PairedState(SumsState):
    """Arms and paired statistics of one series and pane (see the module docstring).

    ``s`` is ``[primary arm (ARM), challenger arm (ARM), paired (PAIR)]``.

    :meth:`update` / :meth:`update_grouped` take one of four column sets
    (numpy arrays of one length), recognised by their keys:

    - inference rows: ``arm`` (0 primary, 1 challenger), ``error`` (bool),
      ``latency`` (ms);
    - joined feedback rows: ``arm``, and any of ``correct`` (1/0, NaN n/a),
      ``abs_error``, ``reward`` (NaN n/a);
    - paired requests: ``p_error``, ``c_error``, ``p_latency``, ``c_latency``;
    - labelled pairs: ``p_correct``, ``c_correct``, ``p_abs_error``,
      ``c_abs_error`` (NaN n/a).
    """

    family = "paired"
    horizon = "label"
    STATS = tuple(f"p_{a}" for a in ARM) + tuple(f"c_{a}" for a in ARM) + tuple(
        f"pair_{a}" for a in PAIR)
    __slots__ = ()

    @classmethod
    def update_grouped(cls, states, group, cols) -> None:
        n = len(group)
        if not n:
            return
        group = np.asarray(group, dtype=np.int64)
        G = len(states)
        if "p_error" in cols:
            sums = pair_inference_sums(group, G, cols["p_error"], cols["c_error"],
                                       cols["p_latency"], cols["c_latency"])
            cls._add(states, 2 * NA + PAIR_INFERENCE_COLS, sums)
            return
        if "p_correct" in cols or "p_abs_error" in cols:
            sums = pair_label_sums(group, G, _opt(cols, "p_correct", n), _opt(cols, "c_correct", n),
                                   _opt(cols, "p_abs_error", n), _opt(cols, "c_abs_error", n))
            cls._add(states, 2 * NA + PAIR_LABEL_COLS, sums)
            return
        arm = np.asarray(cols["arm"], dtype=np.int64)
        for a in (ROLE_PRIMARY, ROLE_CHALLENGER):
            m = arm == a
            if not m.any():
                continue
            if "latency" in cols:
                sums = arm_inference_sums(group[m], G, np.asarray(cols["error"])[m],
                                          np.asarray(cols["latency"])[m])
                cls._add(states, a * NA + ARM_INFERENCE_COLS, sums)
            else:
                sums = arm_label_sums(group[m], G, _opt(cols, "correct", n)[m],
                                      _opt(cols, "abs_error", n)[m], _opt(cols, "reward", n)[m])
                cls._add(states, a * NA + ARM_LABEL_COLS, sums)

    @staticmethod
    def _add(states, idx: np.ndarray, sums: np.ndarray) -> None:
        for st, row in zip(states, sums):
            st.s[idx] += row

    # -- reading -------------------------------------------------------------
    def _arm(self, a: int) -> dict[str, Any]:
        v = self.s[a * NA:(a + 1) * NA]
        d = dict(zip(ARM, v.tolist()))
        n = int(round(d["requests"]))
        return {"requests": n, "errors": int(round(d["errors"])),
                "labelled": int(round(d["labelled"])), "correct": int(round(d["correct"])),
                "log_latency": [n, d["lat_sum"], d["lat_sq"]],
                "reward": [int(round(d["rew_n"])), d["rew_sum"], d["rew_sq"]],
                "abs_error": [int(round(d["ae_n"])), d["ae_sum"], d["ae_sq"]]}

    def summary(self) -> dict[str, Any]:
        """The evidence as plain numbers (ints for counts), d = challenger - primary::

            {"arms": {"primary": ARM, "challenger": ARM},
             "paired": {"requests", "labelled", "correct": {"n11", "n10", "n01", "n00"},
                        "error": {...}, "log_latency": [n, sum_d, sumsq_d],
                        "abs_error": [n, sum_d, sumsq_d]}}

        with ARM = ``{"requests", "errors", "labelled", "correct",
        "log_latency": [n, sum, sumsq], "reward": [...], "abs_error": [...]}``;
        first digit of ``nAB``: primary correct (in error), second: challenger.
        """
        p = dict(zip(PAIR, self.s[2 * NA:].tolist()))
        i = lambda k: int(round(p[k]))  # noqa: E731
        n = i("requests")
        return {"arms": {"primary": self._arm(ROLE_PRIMARY),
                         "challenger": self._arm(ROLE_CHALLENGER)},
                "paired": {"requests": n, "labelled": i("labelled"),
                           "correct": {"n11": i("c11"), "n10": i("c10"), "n01": i("c01"),
                                       "n00": i("c00")},
                           "error": {"n11": i("e11"), "n10": i("e10"), "n01": i("e01"),
                                     "n00": i("e00")},
                           "log_latency": [n, p["ll_sum"], p["ll_sq"]],
                           "abs_error": [i("ae_n"), p["ae_sum"], p["ae_sq"]]}}

    def value(self) -> dict[str, Value]:
        out: dict[str, Value] = {}
        if not self.s[2 * NA]:   # no paired requests (a primary series, a canary arm)
            return out
        p = dict(zip(PAIR, self.s[2 * NA:].tolist()))
        n = int(round(p["requests"]))
        lab = int(round(p["labelled"]))
        out["paired_requests"] = (float(n), n, None)
        out["paired_labelled"] = (float(lab), n, lab)
        out["error_rate_diff"] = ((p["e01"] - p["e10"]) / n, n, None)
        out["latency_log_ratio"] = (p["ll_sum"] / n, n, None)
        nc = int(round(p["c11"] + p["c10"] + p["c01"] + p["c00"]))
        if nc:
            out["accuracy_diff"] = ((p["c01"] - p["c10"]) / nc, nc, nc)
        na = int(round(p["ae_n"]))
        if na:
            out["mae_diff"] = (p["ae_sum"] / na, na, na)
        return out

    # compact pickles: most states carry one arm and no pairs
    def __getstate__(self):
        parts = [self.s[:NA], self.s[NA:2 * NA], self.s[2 * NA:]]
        return tuple(x.tolist() if x.any() else None for x in parts)

    def __setstate__(self, state):
        if isinstance(state, list):  # plain SumsState form
            self.s = np.asarray(state, dtype=np.float64)
            return
        s = np.zeros(len(self.STATS), dtype=np.float64)
        for (lo, hi), x in zip(((0, NA), (NA, 2 * NA), (2 * NA, 2 * NA + NP)), state):
            if x is not None:
                s[lo:hi] = x
        self.s = s


def _add_nested(a: Any, b: Any) -> Any:
    if isinstance(a, dict):
        return {k: _add_nested(a[k], b[k]) for k in a}
    if isinstance(a, list):
        return [_add_nested(x, y) for x, y in zip(a, b)]
    return a + b


def empty_summary() -> dict[str, Any]:
    return PairedState().summary()


def merge_summaries(summaries: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The sum of :meth:`PairedState.summary` dicts (panes, segments, shards, arms).

    Summing is exact for the counts and the sums: the summary of merged
    states equals the merged summaries (up to float rounding of the sums).
    """
    out = empty_summary()
    for s in summaries:
        out = _add_nested(out, s)
    return out


def comparison(items: Iterable[Any], challenger: str, primary: str = "primary",
               **labels: str) -> dict[str, Any]:
    """One summary comparing ``challenger`` with ``primary``: what a canary policy reads.

    ``items``: engine :class:`~kpistream.engine.Partial` objects, or
    ``(series labels mapping or SeriesKey, state)`` pairs, of any families;
    the paired states of series with variant ``primary`` (their primary arm)
    or ``challenger`` (challenger arm and pairs) matching ``labels``
    (``model="churn", region="eu"`` ...) are merged.
    """
    from kpistream.wire.batch import series_labels

    acc = PairedState()
    for it in items:
        if hasattr(it, "family"):
            if it.family != PairedState.family:
                continue
            key, st = it.series, it.state
        else:
            key, st = it
        if not isinstance(st, PairedState):
            continue
        lab = series_labels(key) if isinstance(key, tuple) else dict(key)
        if lab.get("variant") not in (primary, challenger):
            continue
        if any(lab.get(k) != v for k, v in labels.items()):
            continue
        acc.merge(st)
    return acc.summary()


# ---------------------------------------------------------------------------
# the engine's per-pane form

class PairedTable(SeriesFlags):
    """The paired family of every series of one pane (the engine's form).

    ``arms`` holds one arm row per series (the series' own arm; ``role``
    says which), ``pairs`` one paired row per challenger series, allocated
    on the first pair.  Same interface as :class:`~kpistream.engine.states.SumsTable`
    for :meth:`Engine.collect`: :meth:`sids`, :meth:`state`, :attr:`dirty`,
    :meth:`clean`.
    """

    __slots__ = ("arms", "role", "pairs")

    def __init__(self, n_series: int) -> None:
        n = max(n_series, 4)
        self.arms = np.zeros((n, NA), dtype=np.float64)
        self.role = np.zeros(n, dtype=np.int8)
        self.flags = np.zeros(n, dtype=np.uint8)
        self.pairs = np.zeros((0, NP), dtype=np.float64)

    def _fit(self, need: int) -> None:
        if need > len(self.arms):
            n = max(need, 2 * len(self.arms))
            for a in ("arms", "role", "flags"):
                old = getattr(self, a)
                new = np.zeros((n, *old.shape[1:]), dtype=old.dtype)
                new[: len(old)] = old
                setattr(self, a, new)

    def add_arms(self, sids: np.ndarray, roles: np.ndarray, cols: np.ndarray,
                 sums: np.ndarray) -> None:
        """Add ``sums[i]`` (columns ``cols`` of ARM) to series ``sids[i]`` (distinct)."""
        if not len(sids):
            return
        self._fit(int(sids.max()) + 1)
        self.arms[np.ix_(sids, cols)] += sums
        self.role[sids] = roles
        self.flags[sids] = self._LIVE | self._DIRTY

    def add_pairs(self, sids: np.ndarray, cols: np.ndarray, sums: np.ndarray) -> None:
        """Add ``sums[i]`` (columns ``cols`` of PAIR) to challenger series ``sids[i]`` (distinct)."""
        if not len(sids):
            return
        need = int(sids.max()) + 1
        self._fit(need)
        if need > len(self.pairs):
            grown = np.zeros((max(need, 2 * len(self.pairs)), NP), dtype=np.float64)
            grown[: len(self.pairs)] = self.pairs
            self.pairs = grown
        self.pairs[np.ix_(sids, cols)] += sums
        self.role[sids] = ROLE_CHALLENGER
        self.flags[sids] = self._LIVE | self._DIRTY

    _ZERO_ARM = np.zeros(NA)
    _ZERO_PAIR = np.zeros(NP)

    def state(self, sid: int) -> PairedState:
        st = PairedState.__new__(PairedState)
        arm = self.arms[sid]
        pair = self.pairs[sid] if sid < len(self.pairs) else self._ZERO_PAIR
        if self.role[sid] == ROLE_CHALLENGER:
            st.s = np.concatenate((self._ZERO_ARM, arm, pair))
        else:
            st.s = np.concatenate((arm, self._ZERO_ARM, pair))
        return st

    @property
    def nbytes(self) -> int:
        return self.arms.nbytes + self.role.nbytes + self.flags.nbytes + self.pairs.nbytes


__all__ = ["PairedState", "PairedTable", "merge_summaries", "comparison", "empty_summary",
           "ARM", "PAIR", "MIN_LATENCY_MS"]
