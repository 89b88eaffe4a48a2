"""Tests of kpistream.engine.sketch.QuantileSketch (no Ray)."""

from __future__ import annotations

import math
import pickle
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kpistream.engine import sketch as sketch_mod
from kpistream.errors import StateError
from kpistream.engine.sketch import MIN_POSITIVE, ZERO_KEY, QuantileSketch

QS = np.array([0.0, 0.01, 0.25, 0.5, 0.9, 0.99, 0.999, 1.0])
ROUNDING = 1e-12  # float slack on top of the relative-accuracy bound


def assert_within_bound(est: np.ndarray, exact: np.ndarray, a: float, what: str = "") -> None:
    est = np.asarray(est, dtype=float)
    exact = np.asarray(exact, dtype=float)
    for q, e, x in zip(QS if len(est) == len(QS) else range(len(est)), est, exact):
        if x <= MIN_POSITIVE:
            assert e <= MIN_POSITIVE, f"{what} q={q}: exact {x} in zero bucket, got {e}"
        else:
            err = abs(e - x) / x
            assert err <= a * (1 + ROUNDING) + ROUNDING, f"{what} q={q}: exact {x}, est {e}, rel err {err}"


def make(dist: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if dist == "lognormal":
        return rng.lognormal(3.0, 1.5, n)
    if dist == "uniform":
        return rng.uniform(0.0, 1000.0, n)
    if dist == "pareto":
        return (rng.pareto(1.2, n) + 1.0) * 5.0
    if dist == "lomax":  # heavy tail with values near 0
        return rng.pareto(0.8, n)
    if dist == "zeros":  # many exact zeros, e.g. cache hits timed at 0
        v = rng.lognormal(1.0, 1.0, n)
        v[rng.random(n) < 0.6] = 0.0
        return v
    raise AssertionError(dist)


# ---------------------------------------------------------------- accuracy

@pytest.mark.parametrize("a", [0.01, 0.02, 0.005])
@pytest.mark.parametrize("dist", ["lognormal", "uniform", "pareto", "lomax", "zeros"])
@pytest.mark.parametrize("n", [1, 2, 7, 100, 1000, 100_000])
def test_accuracy_vs_numpy(a: float, dist: str, n: int) -> None:
    rng = np.random.default_rng(zlib.crc32(repr((a, dist, n)).encode()))
    v = make(dist, n, rng)
    # lomax spans ~1e12 (e**27): more than 2048 buckets hold at a = 0.5 %
    s = QuantileSketch(relative_accuracy=a, max_buckets=2048 if a >= 0.01 else 8192)
    s.update(v)
    assert s.count == n and s.collapses == 0
    exact = np.quantile(v, QS, method="lower")
    est = s.quantiles(QS)
    assert_within_bound(est, exact, a, f"{dist} n={n} a={a}")
    for i, q in enumerate(QS):
        assert s.quantile(float(q)) == est[i]
    assert v.min() <= s.quantile(0.0) and s.quantile(1.0) <= v.max()  # clamped
    assert math.isclose(s.mean, v.mean(), rel_tol=1e-12)
    assert s.zero_count == int((v <= MIN_POSITIVE).sum())


def test_accuracy_in_many_small_batches() -> None:
    rng = np.random.default_rng(3)
    v = rng.lognormal(0.0, 2.0, 20_000)
    s = QuantileSketch()
    for chunk in np.array_split(v, 97):
        s.update(chunk)
    one = QuantileSketch()
    one.update(v)
    assert s == one
    assert_within_bound(s.quantiles(QS), np.quantile(v, QS, method="lower"), 0.01)


def test_bucket_boundaries_and_values() -> None:
    a = 0.01
    s = QuantileSketch(a)
    g = s.gamma
    assert g == pytest.approx((1 + a) / (1 - a))
    # the bucket value is within a of both ends of the bucket
    for k in (-500, -1, 0, 1, 37, 900):
        mid = s.bucket_value(k)
        assert abs(mid - g**k) / g**k == pytest.approx(a, rel=1e-9)
        assert abs(mid - g ** (k - 1)) / g ** (k - 1) == pytest.approx(a, rel=1e-9)
    # values straddling bucket boundaries
    ks = np.arange(-300, 300)
    edges = g ** ks.astype(float)
    v = np.concatenate([edges, np.nextafter(edges, 0), np.nextafter(edges, np.inf)])
    s.update(v)
    qs = np.linspace(0, 1, 1001)
    assert_within_bound(s.quantiles(qs), np.quantile(v, qs, method="lower"), a)


def test_keys() -> None:
    v = np.array([0.0, 1e-9, 2e-9, 1.0, 1.5, 1e6])
    k = QuantileSketch.keys(v, 0.01)
    assert k.dtype == np.int64
    assert k[0] == ZERO_KEY and k[1] == ZERO_KEY
    g = 1.01 / 0.99
    for x, kk in zip(v[2:], k[2:]):
        assert kk == math.ceil(math.log(x) / math.log(g))
        assert g ** (kk - 1) < x * (1 + 1e-12) and x <= g**kk * (1 + 1e-12)
    assert QuantileSketch.keys(np.array([1.5, 2.0]), 0.02).tolist() == [
        math.ceil(math.log(x) / math.log(1.02 / 0.98)) for x in (1.5, 2.0)]


def test_empty_and_edge_queries() -> None:
    s = QuantileSketch()
    assert math.isnan(s.quantile(0.5))
    assert np.isnan(s.quantiles([0.1, 0.9])).all()
    assert s.count == 0 and math.isnan(s.mean)
    s.update(np.array([], dtype=float))
    assert s.count == 0
    s.update([0.0, 0.0])
    assert s.quantiles([0, 0.5, 1]).tolist() == [0.0, 0.0, 0.0]
    s.update([5.0])
    assert s.quantile(1.0) == 5.0 and s.quantile(0.5) == 0.0
    with pytest.raises(ValueError):
        s.quantile(1.5)
    with pytest.raises(ValueError):
        s.quantiles([-0.1])
    with pytest.raises(ValueError):
        s.quantile(float("nan"))


def test_tiny_positive_values_go_to_zero_bucket() -> None:
    s = QuantileSketch()
    s.update(np.array([5e-10, 1e-9, 2.0]))
    assert s.zero_count == 2
    assert s.quantile(0.0) == 5e-10  # zero bucket answers 0.0, clamped to min
    assert s.quantile(0.5) == 5e-10
    assert abs(s.quantile(1.0) - 2.0) <= 0.01 * 2.0


# ------------------------------------------------------------ validation

@pytest.mark.parametrize("bad", [[1.0, float("nan")], [1.0, -0.5], [float("inf")], [-1e-300]])
def test_update_rejects_bad_values(bad: list[float]) -> None:
    s = QuantileSketch()
    s.update([1.0, 2.0])
    before = s.copy()
    with pytest.raises(ValueError):
        s.update(np.array(bad))
    assert s == before  # nothing half-applied
    with pytest.raises(ValueError):
        QuantileSketch.update_grouped([s, QuantileSketch()], np.array([0] * len(bad)), np.array(bad))
    assert s == before


@pytest.mark.parametrize("kwargs", [dict(relative_accuracy=0.0), dict(relative_accuracy=1.0),
                                    dict(relative_accuracy=-0.1), dict(max_buckets=1)])
def test_bad_parameters(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        QuantileSketch(**kwargs)


def test_merge_different_accuracy_raises() -> None:
    a, b = QuantileSketch(0.01), QuantileSketch(0.02)
    a.update([1.0])
    b.update([2.0])
    with pytest.raises(StateError):
        a.merge(b)
    with pytest.raises(StateError):
        QuantileSketch.update_grouped([a, b], np.array([0, 1]), np.array([1.0, 2.0]))
    with pytest.raises(StateError):
        a.merge("not a sketch")  # type: ignore[arg-type]


def test_update_grouped_bad_groups() -> None:
    sk = [QuantileSketch(), QuantileSketch()]
    with pytest.raises(ValueError):
        QuantileSketch.update_grouped(sk, np.array([0, 2]), np.array([1.0, 2.0]))
    with pytest.raises(ValueError):
        QuantileSketch.update_grouped(sk, np.array([0, -1]), np.array([1.0, 2.0]))
    with pytest.raises(ValueError):
        QuantileSketch.update_grouped(sk, np.array([0]), np.array([1.0, 2.0]))
    with pytest.raises(ValueError):
        QuantileSketch.update_grouped(sk, np.array([0.0, 1.0]), np.array([1.0, 2.0]))
    assert sk[0].count == 0 and sk[1].count == 0


# ---------------------------------------------------------------- merging

value_lists = st.lists(
    st.one_of(
        st.floats(min_value=0.0, max_value=1e9, allow_nan=False, allow_infinity=False),
        st.just(0.0),
        st.floats(min_value=0.1, max_value=10_000.0),
    ),
    min_size=0, max_size=300)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=value_lists, data=st.data(),
       max_buckets=st.sampled_from([2, 8, 64, 2048]),
       a=st.sampled_from([0.01, 0.05]))
def test_merge_equals_concatenation(values: list[float], data: st.DataObject,
                                    max_buckets: int, a: float) -> None:
    v = np.array(values, dtype=float)
    k = data.draw(st.integers(1, 6), label="parts")
    cuts = sorted(data.draw(st.lists(st.integers(0, len(v)), min_size=k - 1, max_size=k - 1),
                            label="cuts"))
    parts = np.split(v, cuts)
    order = data.draw(st.permutations(range(len(parts))), label="order")

    whole = QuantileSketch(a, max_buckets)
    whole.update(v)

    sketches = []
    for p in parts:
        s = QuantileSketch(a, max_buckets)
        s.update(p)
        sketches.append(s)
    merged = QuantileSketch(a, max_buckets)
    for i in order:
        merged.merge(sketches[i])
    assert merged == whole
    assert whole.bucket_counts()[1].tolist() == merged.bucket_counts()[1].tolist()
    np.testing.assert_array_equal(merged.quantiles(QS), whole.quantiles(QS))

    # also: merging into an existing partial, and sequential updates
    seq = QuantileSketch(a, max_buckets)
    for i in order:
        seq.update(parts[i])
    assert seq == whole
    if len(parts) > 1:
        first = sketches[order[0]].copy()
        for i in order[1:]:
            first.merge(sketches[i])
        assert first == whole
    if max_buckets >= 2048 and len(v):
        assert whole.collapses == 0


def test_merge_self_and_empty() -> None:
    s = QuantileSketch()
    s.update([1.0, 2.0, 3.0])
    ref = QuantileSketch()
    ref.update([1.0, 2.0, 3.0, 1.0, 2.0, 3.0])
    assert s.merge(s) is s
    assert s == ref
    assert s.merge(QuantileSketch()) == ref
    e = QuantileSketch()
    e.merge(s)
    assert e == ref


# --------------------------------------------------------- update_grouped

@settings(max_examples=150, deadline=None)
@given(values=value_lists, data=st.data(), ngroups=st.integers(1, 5),
       max_buckets=st.sampled_from([4, 2048]))
def test_update_grouped_equals_per_group(values: list[float], data: st.DataObject,
                                         ngroups: int, max_buckets: int) -> None:
    v = np.array(values, dtype=float)
    g = np.array(data.draw(st.lists(st.integers(0, ngroups - 1), min_size=len(v), max_size=len(v))),
                 dtype=np.int64)
    # some sketches already hold data before the grouped update
    pre = data.draw(st.lists(st.floats(0.0, 1e6), max_size=20))
    grouped = [QuantileSketch(0.01, max_buckets) for _ in range(ngroups)]
    single = [QuantileSketch(0.01, max_buckets) for _ in range(ngroups)]
    grouped[0].update(pre)
    single[0].update(pre)
    QuantileSketch.update_grouped(grouped, g, v)
    for i in range(ngroups):
        single[i].update(v[g == i])
        assert grouped[i] == single[i], i
        assert grouped[i].collapses == single[i].collapses or max_buckets < 2048


@pytest.mark.parametrize("gdtype", [np.int8, np.uint8, np.int32, np.int64])
def test_update_grouped_large(gdtype) -> None:
    rng = np.random.default_rng(11)
    n = 200_000
    v = rng.lognormal(3, 1, n)
    v[rng.random(n) < 0.05] = 0.0
    g = rng.integers(0, 3, n).astype(gdtype)
    grouped = [QuantileSketch() for _ in range(3)]
    QuantileSketch.update_grouped(grouped, g, v)
    for i in range(3):
        ref = QuantileSketch()
        ref.update(v[g == i])
        assert grouped[i] == ref
        assert_within_bound(grouped[i].quantiles(QS),
                            np.quantile(v[g == i], QS, method="lower"), 0.01)


def test_update_grouped_wide_range_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sketch_mod, "_GROUPED_MAX_CELLS", 16)
    rng = np.random.default_rng(5)
    v = 10 ** rng.uniform(-3, 6, 5000)
    g = rng.integers(0, 4, v.size)
    grouped = [QuantileSketch() for _ in range(4)]
    QuantileSketch.update_grouped(grouped, g, v)
    for i in range(4):
        ref = QuantileSketch()
        ref.update(v[g == i])
        assert grouped[i] == ref


# ----------------------------------------------------- pickle and memory

def test_pickle_round_trip_exact_and_trimmed() -> None:
    rng = np.random.default_rng(2)
    v = rng.uniform(1.0, 100.0, 50_000)  # spans 100x: about 231 buckets
    v[:100] = 0.0
    s = QuantileSketch()
    for chunk in np.array_split(v, 50):
        s.update(chunk)
    blob = pickle.dumps(s)
    r = pickle.loads(blob)
    assert r == s
    assert r.sum == s.sum and r.collapses == s.collapses and r.max_buckets == s.max_buckets
    np.testing.assert_array_equal(r.quantiles(QS), s.quantiles(QS))
    nb = s.bucket_counts()[1].size
    assert nb <= 232
    assert r.nbytes == nb * r.bucket_counts()[1].itemsize + sketch_mod._SCALAR_BYTES
    assert r.bucket_counts()[1].dtype == np.uint16  # no bucket near 2**16 here
    assert r.nbytes < 600            # ≈ 0.45 KiB of uint16 counts + scalars
    assert s.nbytes <= r.nbytes + 2 * (nb // 8 + 16)  # bounded growth slack
    assert len(blob) < 1500
    c = s.copy()
    assert c == s and c.nbytes == r.nbytes
    c.update([1e6])
    assert c != s  # independent
    # a round-tripped sketch keeps working
    r.update(v)
    s.update(v)
    assert r == s
    assert pickle.loads(pickle.dumps(QuantileSketch(0.02, 64))) == QuantileSketch(0.02, 64)


def test_uint16_to_uint32_upgrade() -> None:
    s = QuantileSketch()
    s.update(np.ones(2**16 - 5))
    assert s.bucket_counts()[1].dtype == np.uint16
    s.update(np.ones(4))  # 2**16 - 1: still fits
    assert s.bucket_counts()[1].dtype == np.uint16
    s.update(np.ones(2))
    k, c = s.bucket_counts()
    assert c.dtype == np.uint32 and int(c[0]) == 2**16 + 1 and s.count == 2**16 + 1
    t = QuantileSketch()
    t.update(np.ones(10))
    t.merge(s)  # a narrow sketch absorbing a wide one
    assert int(t.bucket_counts()[1][0]) == 2**16 + 11


def test_uint64_upgrade() -> None:
    s = QuantileSketch()
    s.update([1.0, 2.0])
    state = s.__getstate__()
    counts = np.frombuffer(state["counts"], dtype=np.uint16).astype(np.uint32)
    counts[0] = 2**32 - 10
    state.update(counts=counts.tobytes(), dt=counts.dtype.str, n=int(counts.sum()))
    big = QuantileSketch.__new__(QuantileSketch)
    big.__setstate__(state)
    assert big.bucket_counts()[1].dtype == np.uint32
    big.update(np.ones(5))  # still fits
    assert big.bucket_counts()[1].dtype == np.uint32
    big.update(np.ones(20))  # 2**32 + 15 > 2**32 - 1
    k, c = big.bucket_counts()
    assert c.dtype == np.uint64 and int(c[0]) == 2**32 - 10 + 25
    assert big.count == int(c.sum())
    big.merge(big.copy())
    assert int(big.bucket_counts()[1][0]) == 2 * (2**32 + 15)
    assert big.quantile(0.5) == pytest.approx(1.0, rel=0.01)
    assert pickle.loads(pickle.dumps(big)) == big


# ---------------------------------------------------------------- collapse

def test_collapse_keeps_upper_quantiles() -> None:
    rng = np.random.default_rng(8)
    v = 10 ** rng.uniform(-6, 12, 100_000)  # log-uniform over 18 decades
    a, mb = 0.01, 128
    s = QuantileSketch(a, mb)
    for chunk in np.array_split(v, 20):
        s.update(chunk)
    assert s.collapses > 0
    k, c = s.bucket_counts()
    assert c.size <= mb
    assert int(c.sum()) + s.zero_count == s.count == v.size
    floor_value = s.gamma ** (k + 1)  # exact buckets start above the collapsed one
    upper = np.array([0.95, 0.99, 0.999, 1.0])
    exact = np.quantile(v, upper, method="lower")
    assert (exact > floor_value).all()
    for q, e, x in zip(upper, s.quantiles(upper), exact):
        assert abs(e - x) / x <= a * (1 + ROUNDING), q
    assert s.quantile(0.0) >= v.min()  # clamped
    # collapse stays mergeable: partitions give identical buckets
    parts = [QuantileSketch(a, mb) for _ in range(7)]
    for p, chunk in zip(parts, np.array_split(rng.permutation(v), 7)):
        p.update(chunk)
    m = QuantileSketch(a, mb)
    for p in reversed(parts):
        m.merge(p)
    assert m == s
    # the default max_buckets does not collapse on the same data (span e**41.4 > gamma**2048?)
    d = QuantileSketch()
    d.update(10 ** rng.uniform(-6, 11, 10_000))  # 17 decades < e**41 (17.8 decades)
    assert d.collapses == 0


# --------------------------------------------------------------- ddsketch

@pytest.mark.parametrize("a", [0.01, 0.02, 0.005])
@pytest.mark.parametrize("dist", ["lognormal", "pareto", "uniform", "zeros"])
def test_against_ddsketch(a: float, dist: str) -> None:
    from ddsketch import DDSketch

    rng = np.random.default_rng(17)
    v = make(dist, 20_000, rng)
    ours = QuantileSketch(a)
    ours.update(v)
    dd = DDSketch(relative_accuracy=a)
    for x in v.tolist():
        dd.add(x)
    exact = np.quantile(v, QS, method="lower")
    theirs = np.array([dd.get_quantile_value(float(q)) for q in QS])
    ests = ours.quantiles(QS)
    assert_within_bound(ests, exact, a, "ours")
    assert_within_bound(theirs, exact, a, "ddsketch")
    # same logarithmic mapping: away from the clamped ends the answers agree closely
    inner = (QS > 0) & (QS < 1) & (exact > MIN_POSITIVE)
    np.testing.assert_allclose(ests[inner], theirs[inner], rtol=2 * a + 1e-9)


# ------------------------------------------------------------- isolation
