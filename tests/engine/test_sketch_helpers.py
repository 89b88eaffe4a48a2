"""The module-level numpy helpers of kpistream/engine/sketch.py against direct oracles."""

import numpy as np
import pytest

from kpistream.engine import sketch as sk


def test_int_keys_match_the_formula():
    rng = np.random.default_rng(1)
    v = np.concatenate([rng.lognormal(0, 3, 1000), [0.0, 1e-10, 1e-9]])
    a = 0.02
    gamma = (1 + a) / (1 - a)
    want = np.ceil(np.log(np.maximum(v, 1.0)) / np.log(gamma)).astype(np.int64)
    pos = v > sk.MIN_POSITIVE
    want[pos] = np.ceil(np.log(v[pos]) / np.log(gamma))
    want[v <= sk.MIN_POSITIVE] = sk.ZERO_KEY
    assert np.array_equal(sk._int_keys(v, a), want)


def test_widened_only_when_a_bucket_would_overflow():
    c = np.zeros(4, dtype=np.uint16)
    c[1] = 65000
    assert sk._widened(c, 0, np.array([1, 535], dtype=np.int64)) is c
    w = sk._widened(c, 0, np.array([1, 536], dtype=np.int64))
    assert w.dtype == np.uint32 and np.array_equal(w, c)
    w = sk._widened(c, 1, np.array([2**32], dtype=np.int64))
    assert w.dtype == np.uint64
    big = np.zeros(2, dtype=np.uint64)
    assert sk._widened(big, 0, np.array([2**40], dtype=np.int64)) is big


@pytest.mark.parametrize("lo,hi,cap,off", [(0, 9, 0, 0), (-5, 9, 20, 0), (0, 30, 20, 0),
                                           (-10, 40, 20, 0), (0, 5000, 0, 0)])
def test_grown_layout_covers_the_range(lo, hi, cap, off):
    new_cap, new_lo = sk._grown_layout(lo, hi, cap, off, 2048)
    assert new_lo <= lo and hi < new_lo + new_cap
    need = hi - lo + 1
    assert new_cap <= max(2048, need)


def test_lower_quantile_keys_against_a_loop():
    rng = np.random.default_rng(2)
    seg = rng.integers(0, 5, 50)
    seg[0] = seg[-1] = 1
    zeros = 3
    rank = rng.uniform(zeros, zeros + seg.sum() - 1, 200)
    got = sk._lower_quantile_keys(seg, zeros, rank)
    cum = np.cumsum(seg) + zeros
    for r, i in zip(rank, got):
        assert i == min(int(np.sum(cum <= r)), seg.size - 1)


def test_grouped_tables_against_per_group_loops():
    rng = np.random.default_rng(3)
    v = rng.lognormal(2, 1, 5000)
    v[::7] = 0.0
    g = rng.integers(0, 6, v.size).astype(np.intp)
    inv = 1.0 / np.log((1.01) / (0.99))
    sums, zc, mins, maxs, rows, kmin, nz_lo, nz_hi = sk._grouped_tables(v, g, 6, inv, float(v.min()))
    for i in range(6):
        vi = v[g == i]
        assert sums[i] == pytest.approx(vi.sum())
        assert zc[i] == np.sum(vi <= sk.MIN_POSITIVE)
        assert mins[i] == vi.min() and maxs[i] == vi.max()
        keys = sk._int_keys(vi[vi > sk.MIN_POSITIVE], 0.01)
        assert nz_lo[i] == keys.min() - kmin and nz_hi[i] == keys.max() - kmin
        assert np.array_equal(np.flatnonzero(rows[i]) + kmin, np.unique(keys))
