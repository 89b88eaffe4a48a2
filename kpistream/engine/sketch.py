"""A mergeable relative-error quantile sketch for latencies (DDSketch-style): :class:`QuantileSketch`."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from kpistream.errors import StateError

__all__ = ["MIN_POSITIVE", "ZERO_KEY", "QuantileSketch"]

#: Values ``<= MIN_POSITIVE`` go to the zero bucket.
MIN_POSITIVE = 1e-9
#: Key returned by :meth:`QuantileSketch.keys` for values in the zero bucket.
ZERO_KEY = int(np.iinfo(np.int64).min)

_U16_MAX = 2**16 - 1
_U32_MAX = 2**32 - 1
_SCALAR_BYTES = 12 * 8      # count, zero_count, sum, min, max, offset, lo/hi keys, ...
_STATE_VERSION = 1
_GROUPED_MAX_CELLS = 1 << 22  # groups * key width above which update_grouped loops per group


def _check_accuracy(relative_accuracy: float) -> float:
    a = float(relative_accuracy)
    if not 0.0 < a < 1.0:
        raise ValueError(f"relative_accuracy must be in (0, 1), got {relative_accuracy!r}")
    return a


def _as_values(values: Any) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    return v if v.ndim == 1 else v.ravel()


def _value_range(v: np.ndarray) -> tuple[float, float]:
    """(min, max) of a non-empty batch; ValueError for NaN, negative or infinite values."""
    vmin = float(v.min())
    vmax = float(v.max())
    if not (vmin >= 0.0 and vmax < math.inf):  # NaN fails both comparisons
        if math.isnan(vmin) or math.isnan(vmax):
            raise ValueError("QuantileSketch got NaN values")
        if vmin < 0.0:
            raise ValueError(f"QuantileSketch got negative values (min {vmin!r})")
        raise ValueError("QuantileSketch got infinite values")
    return vmin, vmax


def _float_keys(positive: np.ndarray, inv_log_gamma: float) -> np.ndarray:
    """Bucket keys, as integral float64, of values all ``> MIN_POSITIVE``.

    The one place keys are computed (``update``, ``update_grouped`` and
    ``keys`` all go through it), so they agree value by value.
    """
    out = np.log(positive)
    out *= inv_log_gamma
    np.ceil(out, out=out)
    return out


def _int_keys(v: np.ndarray, a: float) -> np.ndarray:
    """int64 keys of ``v`` at relative accuracy ``a`` (``ZERO_KEY`` for zeros)."""
    inv = 1.0 / math.log((1.0 + a) / (1.0 - a))
    out = np.full(v.shape, ZERO_KEY, dtype=np.int64)
    pos = v > MIN_POSITIVE
    if pos.all():
        return _float_keys(v, inv).astype(np.int64)
    out[pos] = _float_keys(v[pos], inv).astype(np.int64)
    return out


def _check_grouped(sketches: Sequence[QuantileSketch], group: Any,
                   values: Any) -> tuple[np.ndarray, np.ndarray, float]:
    """Validated ``(values, group, min of values)`` of :meth:`QuantileSketch.update_grouped`.

    With several sketches ``group`` comes back as ``intp`` and the values are
    checked (NaN, negative, infinite); with one, its ``update`` checks them
    (and the min is NaN).  An empty batch comes back unchecked.
    """
    v = _as_values(values)
    g = np.asarray(group)
    if g.ndim != 1:
        g = g.ravel()
    if g.shape != v.shape:
        raise ValueError(f"group and values differ in length ({g.size} != {v.size})")
    if v.size == 0:
        return v, g, math.nan
    ng = len(sketches)
    if ng == 0:
        raise ValueError("update_grouped needs at least one sketch")
    if g.dtype.kind not in "iu":
        if g.dtype.kind == "b":
            g = g.astype(np.intp)
        else:
            raise ValueError(f"group must be an integer array, got dtype {g.dtype}")
    gmin = int(g.min())
    gmax = int(g.max())
    if gmin < 0 or gmax >= ng:
        raise ValueError(f"group values must be in [0, {ng}), got [{gmin}, {gmax}]")
    a = sketches[0].relative_accuracy
    for sk in sketches:
        if sk.relative_accuracy != a:
            raise StateError(
                f"update_grouped over sketches with different relative accuracy "
                f"({a} vs {sk.relative_accuracy})")
    if ng == 1:
        return v, g, math.nan
    vmin, _ = _value_range(v)
    if g.dtype != np.intp:
        g = g.astype(np.intp)
    return v, g, vmin


def _grouped_tables(v: np.ndarray, g: np.ndarray, ng: int, inv_log_gamma: float,
                    vmin: float) -> tuple | None:
    """Per-group statistics of a validated batch (``vmin`` its min), for ``update_grouped``.

    Returns ``(sums, zero_counts, mins, maxs, rows, kmin, nz_lo, nz_hi)``:
    ``rows[i, j]`` counts group ``i``'s values with key ``kmin + j`` (``rows``
    is None when every value is a zero) and ``nz_lo[i]`` / ``nz_hi[i]`` are the
    first / last non-empty column of row ``i`` (-1 if none).  None when the
    dense table would exceed ``_GROUPED_MAX_CELLS`` cells.
    """
    sums = np.bincount(g, weights=v, minlength=ng)
    mins = np.full(ng, math.inf)
    maxs = np.full(ng, -math.inf)
    if vmin <= MIN_POSITIVE:
        zmask = v <= MIN_POSITIVE
        gz = g[zmask]
        zc = np.bincount(gz, minlength=ng)
        vz = v[zmask]
        np.minimum.at(mins, gz, vz)
        np.maximum.at(maxs, gz, vz)
        pos = ~zmask
        vp = v[pos]
        gp = g[pos]
    else:
        zc = np.zeros(ng, dtype=np.intp)
        vp = v
        gp = g
    if not vp.size:
        return sums, zc, mins, maxs, None, 0, None, None
    fk = _float_keys(vp, inv_log_gamma)
    kmin = fk.min()
    width = int(fk.max() - kmin) + 1
    if width * ng > _GROUPED_MAX_CELLS:
        return None
    fk -= kmin
    idx = fk.astype(np.intp)
    idx += gp * width
    rows = np.bincount(idx, minlength=ng * width).reshape(ng, width)
    # exact per-group min / max: they sit in each group's lowest / highest
    # non-empty bucket, so only values in those buckets are reduced
    edge = np.zeros(ng * width, dtype=bool)
    nz_lo = np.full(ng, -1, dtype=np.intp)
    nz_hi = np.full(ng, -1, dtype=np.intp)
    for i in range(ng):
        nzi = np.flatnonzero(rows[i])
        if nzi.size:
            nz_lo[i] = nzi[0]
            nz_hi[i] = nzi[-1]
            edge[i * width + nzi[0]] = True
            edge[i * width + nzi[-1]] = True
    sel = np.flatnonzero(edge[idx])
    ve = vp[sel]
    ge = gp[sel]
    np.minimum.at(mins, ge, ve)
    np.maximum.at(maxs, ge, ve)
    return sums, zc, mins, maxs, rows, int(kmin), nz_lo, nz_hi


def _widened(counts: np.ndarray, i0: int, bc: np.ndarray) -> np.ndarray:
    """``counts``, widened (uint16 -> uint32 -> uint64) if adding ``bc`` at ``i0``
    would overflow a bucket; else ``counts`` itself."""
    if counts.dtype == np.uint64:
        return counts
    seg = counts[i0:i0 + bc.size]
    top = int((seg.astype(np.uint64) + bc.astype(np.uint64)).max())
    limit = _U16_MAX if counts.dtype == np.uint16 else _U32_MAX
    if top > limit:
        wide = np.uint32 if top <= _U32_MAX else np.uint64
        return counts.astype(wide)
    return counts


def _grown_layout(lo: int, hi: int, cap: int, off: int, max_buckets: int) -> tuple[int, int]:
    """(capacity, offset) of a new dense array covering keys ``[lo, hi]``.

    Up to ~1/8 slack (at least 16), on the side the keys grew towards
    (split when they grew both ways or the array is new); never more than
    ``max(max_buckets, hi - lo + 1)``.
    """
    need = hi - lo + 1
    new_cap = min(max(need + max(16, need // 8), need), max(max_buckets, need))
    slack = new_cap - need
    if cap == 0:
        return new_cap, lo - slack // 2
    down = lo < off
    up = hi >= off + cap
    if down and not up:
        return new_cap, lo - slack
    if up and not down:
        return new_cap, lo
    return new_cap, lo - slack // 2


def _lower_quantile_keys(seg: np.ndarray, zero_count: int, rank: np.ndarray) -> np.ndarray:
    """Index in ``seg`` (bucket counts above the zero bucket) of each rank."""
    cum = np.cumsum(seg, dtype=np.uint64).astype(np.float64)
    cum += zero_count
    i = np.searchsorted(cum, rank, side="right")
    np.minimum(i, seg.size - 1, out=i)
    return i


class QuantileSketch:
    """Mergeable relative-error quantile sketch.

    Keeps a histogram over logarithmic buckets.  With
    relative accuracy ``a`` (``0.01`` by default) and ``gamma = (1 + a) / (1 - a)``
    a value ``x > 1e-9`` goes to the bucket with key ``k = ceil(log(x) / log(gamma))``,
    i.e. ``gamma**(k-1) < x <= gamma**k``; values ``<= 1e-9`` (zeros) go to a
    separate zero bucket.  A bucket answers with ``2 * gamma**k / (gamma + 1)``,
    which is within a factor ``1 +- a`` of every value the bucket can hold.

    The guarantee, in numbers:

    * **Accuracy.**  For any ``q`` in ``[0, 1]`` the estimate ``quantile(q)`` is
      within relative error ``a`` (1 % by default) of the exact *lower* quantile
      ``numpy.quantile(values, q, method="lower")`` whenever that exact value is
      ``> 1e-9``, as long as no collapse happened (``collapses == 0``); when the
      exact value is ``<= 1e-9`` the estimate is ``0.0`` (or the sketch's ``min``
      if that is larger).  Answers are also clamped to ``[min, max]`` of the data
      (which only ever reduces the error).  The only
      slack beyond ``a`` is float rounding (about 1e-15 relative) for a value
      lying exactly on a bucket boundary.
    * **Collapse.**  At most ``max_buckets`` buckets are kept; when the range of
      keys would exceed it, the lowest buckets are folded into the lowest kept one
      (like DDSketch's ``CollapsingLowestDenseStore``), so the *upper* quantiles
      (the ones latency SLOs care about) stay accurate.  With ``max_buckets=2048``
      and ``a = 1 %`` a collapse only happens when ``max / min > gamma**2048``
      (about ``e**41``, i.e. 18 orders of magnitude).
    * **Memory.**  2 bytes per bucket (``uint16`` counts, widened to ``uint32``
      and then ``uint64`` only when a single bucket would overflow) between the
      smallest and the largest positive value seen: about
      ``ln(max/min) / ln(gamma)`` buckets, e.g. about 230 buckets (≈ 0.45 KiB)
      for latencies spanning 100x at ``a = 1 %``, plus ~100 bytes of scalars.
      The in-memory array keeps up to ~1/8 slack to grow without reallocating; pickled state and :meth:`QuantileSketch.copy` are trimmed to
      the non-zero range.
    * **Mergeability.**  ``merge`` is exact: the bucket counts after merging any
      partition of a stream, in any order, are identical to one sketch over the
      whole stream (also when collapses happened, because the collapse boundary
      depends only on the largest key seen).

    Updates are vectorized: one ``np.log`` per value and one ``np.bincount`` per
    batch (:meth:`QuantileSketch.update`), or one for a batch split over several
    sketches (:meth:`QuantileSketch.update_grouped`).  Pure numpy; the module does
    not depend on the ``ddsketch`` package (the tests compare against it).

    Public state: ``relative_accuracy``, ``max_buckets``, ``gamma``, ``count``
    (all values, zero bucket included), ``zero_count``, ``sum`` (float, for
    means), ``min`` / ``max`` (``+inf`` / ``-inf`` while empty) and
    ``collapses`` (how many times low buckets were folded; 0 means the
    accuracy guarantee holds for every quantile).
    """

    __slots__ = ("relative_accuracy", "max_buckets", "gamma", "_log_gamma", "_inv_log_gamma",
                 "_counts", "_offset", "_klo", "_khi",
                 "count", "zero_count", "sum", "min", "max", "collapses", "__weakref__")

    def __init__(self, relative_accuracy: float = 0.01, max_buckets: int = 2048) -> None:
        self._init_params(relative_accuracy, max_buckets)
        self._counts = np.zeros(0, dtype=np.uint16)
        self._offset = 0            # key of self._counts[0]
        self._klo: int | None = None  # lowest / highest key with a non-zero count
        self._khi: int | None = None
        self.count = 0
        self.zero_count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.collapses = 0

    def _init_params(self, relative_accuracy: float, max_buckets: int) -> None:
        a = _check_accuracy(relative_accuracy)
        mb = int(max_buckets)
        if mb < 2:
            raise ValueError(f"max_buckets must be >= 2, got {max_buckets!r}")
        self.relative_accuracy = a
        self.max_buckets = mb
        self.gamma = (1.0 + a) / (1.0 - a)
        self._log_gamma = math.log(self.gamma)
        self._inv_log_gamma = 1.0 / self._log_gamma

    # ------------------------------------------------------------------ keys

    @staticmethod
    def keys(values: np.ndarray, relative_accuracy: float = 0.01) -> np.ndarray:
        """int64 bucket keys of ``values`` (``ZERO_KEY`` for values ``<= MIN_POSITIVE``).

        ``k = ceil(log(x) / log(gamma))`` with ``gamma = (1 + a) / (1 - a)``.
        No validation: NaN or negative values give ``ZERO_KEY``-like garbage.
        """
        return _int_keys(_as_values(values), _check_accuracy(relative_accuracy))

    def bucket_value(self, key: int | np.ndarray) -> float | np.ndarray:
        """The value a bucket answers with: ``2 * gamma**key / (gamma + 1)``."""
        k = np.asarray(key, dtype=np.float64)
        out = np.power(self.gamma, k) * (2.0 / (self.gamma + 1.0))
        return float(out) if out.ndim == 0 else out

    # --------------------------------------------------------------- updates

    def update(self, values: np.ndarray) -> None:
        """Add a batch of values (non-negative, finite; ValueError otherwise)."""
        v = _as_values(values)
        n = v.size
        if n == 0:
            return
        vmin, vmax = _value_range(v)
        total = float(v.sum())
        zeros = 0
        if vmin <= MIN_POSITIVE:
            v = v[v > MIN_POSITIVE]
            zeros = n - v.size
        if v.size:
            fk = _float_keys(v, self._inv_log_gamma)
            kmin = fk.min()
            kmax = fk.max()
            fk -= kmin
            bc = np.bincount(fk.astype(np.intp), minlength=int(kmax - kmin) + 1)
            self._add_counts(int(kmin), bc, v.size)
        self.count += n
        self.zero_count += zeros
        self.sum += total
        if vmin < self.min:
            self.min = vmin
        if vmax > self.max:
            self.max = vmax

    @classmethod
    def update_grouped(cls, sketches: Sequence[QuantileSketch], group: np.ndarray,
                       values: np.ndarray) -> None:
        """Add ``values[i]`` to ``sketches[group[i]]`` for every i, in one pass.

        One key computation and one ``np.bincount`` over
        ``group * width + key - kmin`` for the whole batch; each sketch then
        adds its row.  The result equals calling :meth:`update` on each
        group's values (bucket counts, count, zero_count, min, max exactly;
        ``sum`` up to float summation order).  All sketches must share
        ``relative_accuracy`` (StateError otherwise).
        """
        v, g, vmin = _check_grouped(sketches, group, values)
        if v.size == 0:
            return
        if len(sketches) == 1:
            sketches[0].update(v)
            return
        tables = _grouped_tables(v, g, len(sketches), sketches[0]._inv_log_gamma, vmin)
        if tables is None:
            # absurd key range for a dense (groups x width) table: go group by group
            for i, sk in enumerate(sketches):
                m = g == i
                if m.any():
                    sk.update(v[m])
            return
        sums, zc, mins, maxs, rows, kmin, nz_lo, nz_hi = tables
        for i, sk in enumerate(sketches):
            nzero = int(zc[i])
            npos = 0
            if rows is not None and nz_lo[i] >= 0:
                lo, hi = int(nz_lo[i]), int(nz_hi[i])
                row = rows[i, lo:hi + 1]
                npos = int(row.sum())
                sk._add_counts(kmin + lo, row, npos)
            if npos == 0 and nzero == 0:
                continue
            sk.count += npos + nzero
            sk.zero_count += nzero
            sk.sum += float(sums[i])
            if mins[i] < sk.min:
                sk.min = float(mins[i])
            if maxs[i] > sk.max:
                sk.max = float(maxs[i])

    # ----------------------------------------------------------- the store

    def _add_counts(self, k0: int, bc: np.ndarray, total: int) -> None:
        """Add bucket counts ``bc`` for keys ``k0 .. k0 + len(bc) - 1``.

        ``bc`` holds non-negative integers with ``bc[0] > 0`` and
        ``bc[-1] > 0``; ``total == bc.sum()``.  Collapses if the key range
        would exceed ``max_buckets``.  Scalars (count, sum...) are the
        caller's business.
        """
        k1 = k0 + bc.size - 1
        may_overflow = self.count + total > _U16_MAX
        if self._klo is None:
            lo, hi = k0, k1
        else:
            lo = min(self._klo, k0)
            hi = max(self._khi, k1)  # type: ignore[type-var]
        folded_store = 0
        floor = 0
        if hi - lo >= self.max_buckets:
            floor = hi - self.max_buckets + 1
            if k0 < floor:  # fold the incoming low buckets
                if k1 < floor:
                    bc = np.array([total], dtype=np.uint64)
                    k0 = floor
                else:
                    cut = floor - k0
                    folded = int(bc[:cut].sum())
                    bc = bc[cut:].astype(np.uint64)
                    bc[0] += folded
                    k0 = floor
                k1 = k0 + bc.size - 1
            if self._klo is not None and self._klo < floor:  # fold the stored low buckets
                i0 = self._klo - self._offset
                i1 = min(floor - self._offset, self._counts.size)
                seg = self._counts[i0:i1]
                folded_store = int(seg.sum(dtype=np.uint64))
                seg[:] = 0
                self._klo = floor
            lo = min(k0, self._klo) if self._klo is not None else k0
            self.collapses += 1
        self._reserve(lo, hi)
        if folded_store:
            self._add_at(floor - self._offset, np.array([folded_store], dtype=np.uint64),
                         may_overflow)
        self._add_at(k0 - self._offset, bc, may_overflow)
        self._klo = lo
        self._khi = hi

    def _add_at(self, i0: int, bc: np.ndarray, may_overflow: bool) -> None:
        if may_overflow:
            self._counts = _widened(self._counts, i0, bc)
        seg = self._counts[i0:i0 + bc.size]
        np.add(seg, bc, out=seg, dtype=seg.dtype, casting="unsafe")

    def _reserve(self, lo: int, hi: int) -> None:
        """Make the dense array cover keys ``[lo, hi]`` (with some slack)."""
        cap = self._counts.size
        off = self._offset
        if cap and off <= lo and hi < off + cap:
            return
        new_cap, new_lo = _grown_layout(lo, hi, cap, off, self.max_buckets)
        new = np.zeros(new_cap, dtype=self._counts.dtype)
        if self._klo is not None:
            # every non-zero stored bucket lies in [klo, khi], which is inside [lo, hi]
            a = max(self._klo, lo)
            b = min(self._khi, hi)  # type: ignore[type-var]
            if a <= b:
                new[a - new_lo:b - new_lo + 1] = self._counts[a - off:b - off + 1]
        self._counts = new
        self._offset = new_lo

    def _trimmed(self) -> np.ndarray:
        """View of the counts from the lowest to the highest non-empty bucket."""
        if self._klo is None:
            return self._counts[:0]
        return self._counts[self._klo - self._offset:self._khi - self._offset + 1]  # type: ignore[operator]

    def bucket_counts(self) -> tuple[int, np.ndarray]:
        """(lowest non-empty key, copy of the counts up to the highest non-empty key).

        ``(0, empty array)`` when no positive value was added.
        """
        return (self._klo if self._klo is not None else 0), self._trimmed().copy()

    # ----------------------------------------------------------------- merge

    def merge(self, other: QuantileSketch) -> QuantileSketch:
        """Add ``other`` into this sketch, in place; returns ``self``.

        StateError if the relative accuracies differ.
        """
        if not isinstance(other, QuantileSketch):
            raise StateError(f"cannot merge a QuantileSketch with {type(other).__name__}")
        if other.relative_accuracy != self.relative_accuracy:
            raise StateError(
                f"cannot merge sketches with different relative accuracy "
                f"({self.relative_accuracy} vs {other.relative_accuracy})")
        if other.count == 0:
            return self
        if other is self:
            other = other.copy()
        if other._klo is not None:
            seg = other._trimmed()
            self._add_counts(other._klo, seg, int(other.count - other.zero_count))
        self.count += other.count
        self.zero_count += other.zero_count
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.collapses += other.collapses
        return self

    def copy(self) -> QuantileSketch:
        """An independent copy (with the counts trimmed to the non-empty range)."""
        new = QuantileSketch.__new__(QuantileSketch)
        new.__setstate__(self.__getstate__())
        return new

    # ------------------------------------------------------------- queries

    def quantiles(self, qs: Sequence[float] | np.ndarray) -> np.ndarray:
        """Estimated lower quantiles for each ``q`` in ``qs`` (NaN when empty)."""
        q = np.asarray(qs, dtype=np.float64)
        if q.size and not bool(((q >= 0.0) & (q <= 1.0)).all()):
            raise ValueError(f"quantiles must be in [0, 1], got {qs!r}")
        if self.count == 0:
            return np.full(q.shape, np.nan)
        rank = q * (self.count - 1)
        seg = self._trimmed()
        out = np.zeros(q.shape, dtype=np.float64)
        nonzero = rank >= self.zero_count
        if seg.size and nonzero.any():
            i = _lower_quantile_keys(seg, self.zero_count, rank[nonzero])
            out[nonzero] = self.bucket_value(i + self._klo)  # type: ignore[operator]
        np.clip(out, self.min, self.max, out=out)
        return out

    def quantile(self, q: float) -> float:
        """Estimated lower quantile ``q`` (NaN when empty)."""
        return float(self.quantiles(np.array([q], dtype=np.float64))[0])

    @property
    def mean(self) -> float:
        """Exact mean of the values (NaN when empty)."""
        return self.sum / self.count if self.count else math.nan

    @property
    def nbytes(self) -> int:
        """Bytes of state held: the counts array plus the scalars."""
        return int(self._counts.nbytes) + _SCALAR_BYTES

    # ------------------------------------------------------ pickle / compare

    def __getstate__(self) -> dict[str, Any]:
        seg = self._trimmed()
        return {
            "v": _STATE_VERSION,
            "a": self.relative_accuracy,
            "mb": self.max_buckets,
            "lo": self._klo,
            "dt": seg.dtype.str,
            "counts": seg.tobytes(),
            "n": self.count,
            "z": self.zero_count,
            "sum": self.sum,
            "min": self.min,
            "max": self.max,
            "c": self.collapses,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        if state.get("v") != _STATE_VERSION:
            raise StateError(f"unknown QuantileSketch state version {state.get('v')!r}")
        self._init_params(state["a"], state["mb"])
        counts = np.frombuffer(state["counts"], dtype=np.dtype(state["dt"])).copy()
        lo = state["lo"]
        self._counts = counts
        self._offset = lo if lo is not None else 0
        self._klo = lo
        self._khi = lo + counts.size - 1 if lo is not None else None
        self.count = int(state["n"])
        self.zero_count = int(state["z"])
        self.sum = float(state["sum"])
        self.min = float(state["min"])
        self.max = float(state["max"])
        self.collapses = int(state["c"])

    def __eq__(self, other: object) -> bool:
        """Same accuracy and content: identical bucket counts, count, zero_count,
        min and max; ``sum`` equal up to 1e-9 relative (float summation order
        differs between one pass and merged partials).  ``max_buckets`` and
        ``collapses`` are not compared."""
        if not isinstance(other, QuantileSketch):
            return NotImplemented
        return (self.relative_accuracy == other.relative_accuracy
                and self.count == other.count
                and self.zero_count == other.zero_count
                and self.min == other.min
                and self.max == other.max
                and self._klo == other._klo
                and np.array_equal(self._trimmed(), other._trimmed())
                and math.isclose(self.sum, other.sum, rel_tol=1e-9, abs_tol=1e-300))

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return (f"QuantileSketch(relative_accuracy={self.relative_accuracy}, "
                f"max_buckets={self.max_buckets}, count={self.count}, "
                f"buckets={self._trimmed().size}, collapses={self.collapses})")
