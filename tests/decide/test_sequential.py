"""Anytime-valid tests: coverage under continuous peeking, and agreement with fixed-n oracles."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats

from kpistream.errors import ConfigError
from kpistream.decide.sequential import (
    BET_GRID, asymptotic_cs, binary_two_sample_cs, bounded_cs, bounded_log_evalue, mixture_radius,
    mixture_z, optimal_rho2, paired_binary_cs, paired_binary_log_evalue, randomized_binary_cs,
    randomized_binary_log_evalue, srm_log_evalue, srm_p_value, two_sample_cs,
)

PATHS, STEPS = 2000, 5000
ALPHA = 0.05                       # two-sided: 0.025 per side
SE_BOUND = ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / PATHS)


# --------------------------------------------------------------------------
# normal mixture boundary
# --------------------------------------------------------------------------

@pytest.mark.parametrize("t", [1, 30, 1000, 20000])
def test_mixture_z_solves_the_one_sided_mixture_martingale(t):
    """At S = z sqrt(t + 1/rho2), the half-normal mixture of exp(lam S - lam^2 t/2) is exactly 1/alpha."""
    a, rho2 = 0.025, optimal_rho2(1000, 0.025)
    z = float(mixture_z(t, a, rho2))
    S = z * math.sqrt(t + 1 / rho2)
    sd = math.sqrt(rho2)
    m, _ = integrate.quad(lambda lam: 2 * stats.norm.pdf(lam, 0, sd)
                          * math.exp(lam * S - lam * lam * t / 2), 0, 40 * sd)
    assert m == pytest.approx(1 / a, rel=1e-7)


def test_mixture_radius_is_wider_than_the_fixed_n_interval_and_close_to_the_paper():
    a, rho2 = 0.025, optimal_rho2(1000, 0.025)
    t = np.array([10, 100, 1000, 10_000, 100_000])
    r = mixture_radius(t, a, rho2)
    fixed = stats.norm.ppf(1 - a) / np.sqrt(t)          # the fixed-n oracle at the same level
    assert np.all(r > fixed)
    assert np.all(r[2] / fixed[2] < 1.6)                  # tight near the target n = 1000
    # Waudby-Smith et al.'s two-sided formula at 2 alpha is a lower bound, at alpha an upper one
    two = lambda al: np.sqrt(2 * (t * rho2 + 1) / (t * t * rho2) * np.log(np.sqrt(t * rho2 + 1) / al))  # noqa: E731
    assert np.all(two(2 * a) <= r) and np.all(r <= two(a))
    assert np.all(r / two(2 * a) < 1.01)


def _ever_missed(gen, mu, rng, min_n=100, target=1000):
    """Share of paths whose two-sided asymptotic CS ever misses mu (checked at every step >= min_n)."""
    rho2 = optimal_rho2(target, ALPHA / 2)
    t = np.arange(1, STEPS + 1, dtype=float)
    r = mixture_radius(t, ALPHA / 2, rho2)
    missed = 0
    for _ in range(4):
        x = gen(rng, (PATHS // 4, STEPS))
        s, q = np.cumsum(x, 1), np.cumsum(x * x, 1)
        m = s / t
        sd = np.sqrt(np.maximum(q / t - m * m, 0.0))
        missed += (np.abs(m - mu) > sd * r)[:, min_n - 1:].any(axis=1).sum()
    return missed / PATHS


@pytest.mark.parametrize("name,gen,mu", [
    ("normal", lambda rng, sh: rng.normal(0.3, 2.0, sh), 0.3),
    ("exponential", lambda rng, sh: rng.exponential(1.0, sh), 1.0),
])
def test_asymptotic_cs_coverage_under_continuous_peeking(name, gen, mu):
    miss = _ever_missed(gen, mu, np.random.default_rng(11))
    assert miss <= SE_BOUND, f"{name}: ever-miss rate {miss:.4f}"


def test_asymptotic_cs_matches_the_vectorized_formula():
    rng = np.random.default_rng(5)
    x = rng.normal(1.0, 3.0, 777)
    est, lo, hi = asymptotic_cs(x.size, x.sum(), (x * x).sum(), 0.01, 0.04, target_n=500)
    sd = x.std()
    assert float(est) == pytest.approx(x.mean())
    assert float(est - lo) == pytest.approx(sd * float(mixture_radius(777, 0.01, optimal_rho2(500, 0.01))))
    assert float(hi - est) == pytest.approx(sd * float(mixture_radius(777, 0.04, optimal_rho2(500, 0.01))))
    # before min_n: infinite
    _, lo, hi = asymptotic_cs(np.array([50, 150]), np.array([5.0, 15.0]), np.array([60.0, 180.0]))
    assert lo[0] == -np.inf and hi[0] == np.inf and np.isfinite(lo[1]) and np.isfinite(hi[1])


@pytest.mark.slow
def test_two_sample_cs_coverage_under_continuous_peeking():
    """Canary mode: each unit goes to arm 1 with probability 0.3; normal outcomes, unequal variances."""
    rng = np.random.default_rng(12)
    rho2 = optimal_rho2(2000, ALPHA / 2)
    t = np.arange(1, STEPS + 1, dtype=float)
    r = mixture_radius(t, ALPHA / 2, rho2)
    missed = 0
    for _ in range(4):
        sh = (PATHS // 4, STEPS)
        arm = rng.random(sh) < 0.3
        y = np.where(arm, rng.normal(1.2, 2.0, sh), rng.normal(1.0, 1.0, sh))
        n1, n0 = np.cumsum(arm, 1), np.cumsum(~arm, 1)
        s1, s0 = np.cumsum(np.where(arm, y, 0), 1), np.cumsum(np.where(arm, 0, y), 1)
        q1, q0 = np.cumsum(np.where(arm, y * y, 0), 1), np.cumsum(np.where(arm, 0, y * y), 1)
        est, lo, hi = two_sample_cs(n1, s1, q1, n0, s0, q0, ALPHA / 2, ALPHA / 2,
                                    target_n=2000, min_n=100)
        missed += ((lo > 0.2) | (hi < 0.2)).any(axis=1).sum()
        # the same radius as the one-sample boundary at t = n1 + n0
        k = (slice(None), -1)
        v1 = q1[k] / n1[k] - (s1[k] / n1[k]) ** 2
        v0 = q0[k] / n0[k] - (s0[k] / n0[k]) ** 2
        sd = np.sqrt(t[-1] * (v1 / n1[k] + v0 / n0[k]))
        assert np.allclose(hi[k] - est[k], sd * r[-1])
    assert missed / PATHS <= SE_BOUND


def test_binary_two_sample_cs_never_has_zero_width():
    est, lo, hi = binary_two_sample_cs(0, 200, 0, 200)
    assert float(est) == 0.0 and float(lo) < -0.01 and float(hi) > 0.01


# --------------------------------------------------------------------------
# betting e-values (exact)
# --------------------------------------------------------------------------

def test_betting_evalue_has_expectation_at_most_one_exactly():
    """E[e_n] <= 1 under the worst null (mean = null), by exact enumeration of trinomial outcomes."""
    p_minus, p_plus = 0.07, 0.03                    # mean of d: -0.04
    null = p_plus - p_minus
    for n in (1, 5, 20, 60):
        a, b = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
        ok = a + b <= n
        a, b = a[ok], b[ok]
        pmf = stats.multinomial.pmf(np.stack([a, n - a - b, b], 1), n, [p_minus, 1 - p_minus - p_plus, p_plus])
        for alt in ("greater", "less"):
            e = np.exp(paired_binary_log_evalue(a, b, n, null, alt))
            assert np.sum(pmf * e) <= 1 + 1e-9
        # and a null that is false is rejected more: E[e] > 1
        assert np.sum(pmf * np.exp(paired_binary_log_evalue(a, b, n, null - 0.05, "greater"))) > 1


def _runs_checkpoints(nz: np.ndarray) -> np.ndarray:
    """Steps at which the running e-value can reach a new maximum (``nz``: observation != 0).

    Between two nonzero observations only zeros arrive; a zero multiplies
    every bet's wealth by the same-sided factor ``1 - lam m`` (all > 1 or all
    < 1), so the mixture is monotone along a run of zeros and its maximum over
    the run is at one of the run's ends: the step of a nonzero observation,
    the step just before one, or the last step.  Checking those steps is
    checking every step.
    """
    keep = nz.copy()
    keep[:, :-1] |= nz[:, 1:]
    keep[:, -1] = True
    return keep


@pytest.mark.slow
def test_paired_binary_cs_coverage_under_continuous_peeking():
    rng = np.random.default_rng(13)
    p = np.array([0.04, 0.94, 0.02])               # d = -1, 0, +1: a 2-point accuracy drop
    mu = p[2] - p[0]
    la = math.log(1 / (ALPHA / 2))
    missed = 0
    for _ in range(4):
        d = rng.choice(np.array([-1, 0, 1]), size=(PATHS // 4, STEPS), p=p)
        minus, plus = np.cumsum(d == -1, 1), np.cumsum(d == 1, 1)
        n = np.arange(1, STEPS + 1)
        keep = _runs_checkpoints(d != 0)
        m, pl, nn = minus[keep], plus[keep], np.broadcast_to(n, d.shape)[keep]
        bad = ((paired_binary_log_evalue(m, pl, nn, mu, "greater") >= la)
               | (paired_binary_log_evalue(m, pl, nn, mu, "less") >= la))
        row = np.broadcast_to(np.arange(d.shape[0])[:, None], d.shape)[keep]
        missed += np.unique(row[bad]).size
    assert missed / PATHS <= SE_BOUND


def test_bounded_cs_bounds_agree_with_the_evalues():
    """lower > m exactly when the e-value against mean <= m reaches 1/alpha (bisection is faithful)."""
    rng = np.random.default_rng(4)
    n = rng.integers(50, 20_000, 300)
    minus = rng.binomial(n, 0.05)
    plus = rng.binomial(n, 0.03)
    est, lo, hi = paired_binary_cs(minus, plus, n, 0.025, 0.01)
    for m in (-0.03, -0.01, 0.0, 0.01):
        rej_lo = paired_binary_log_evalue(minus, plus, n, m, "greater") >= math.log(1 / 0.025)
        rej_hi = paired_binary_log_evalue(minus, plus, n, m, "less") >= math.log(1 / 0.01)
        far = (np.abs(lo - m) > 1e-9) & (np.abs(hi - m) > 1e-9)
        assert np.array_equal((lo > m)[far], rej_lo[far])
        assert np.array_equal((hi < m)[far], rej_hi[far])
    assert np.all((lo <= est) & (est <= hi))


def test_betting_cs_is_wider_than_the_fixed_n_interval():
    n = np.array([500, 2000, 10_000])
    minus, plus = (0.05 * n).astype(int), (0.03 * n).astype(int)
    est, lo, hi = paired_binary_cs(minus, plus, n, 0.025, 0.025)
    var = (minus + plus) / n - est ** 2
    z = stats.norm.ppf(0.975) * np.sqrt(var / n)         # fixed-n (Wald) interval, same level
    assert np.all(lo < est - z) and np.all(hi > est + z)
    assert np.all((hi - lo) < 4 * 2 * z)                    # but not absurdly so


def test_bounded_log_evalue_edges_and_validation():
    c = np.array([[3, 10, 0]])
    # H0: mean <= -1 (the lowest value): not refuted by -1s, refuted by any larger value
    assert float(bounded_log_evalue([[3, 0, 0]], [-1, 0, 1], -1.0, -1, 1)[0]) == 0.0
    assert float(bounded_log_evalue(c, [-1, 0, 1], -1.0, -1, 1)[0]) == np.inf
    # H0: mean <= 1 (the highest value) is never rejected
    assert float(bounded_log_evalue([[0, 0, 50]], [-1, 0, 1], 1.0, -1, 1)[0]) <= 0.0
    with pytest.raises(ConfigError) as e:
        bounded_log_evalue(c, [-2, 0, 1], 0.0, -1, 1)
    assert e.value.path == "values"
    with pytest.raises(ConfigError) as e:
        bounded_log_evalue(c, [-1, 0, 1], 0.0, -1, 1, alternative="two-sided")
    assert e.value.path == "alternative"
    assert len(BET_GRID) == 48 and BET_GRID.max() < 1


@pytest.mark.slow
def test_randomized_binary_coverage_under_continuous_peeking():
    """Canary mode, 0/1 outcomes, 10 % of units to the challenger (arm 0 here), exact by design."""
    rng = np.random.default_rng(14)
    s1, r1, r0 = 0.9, 0.10, 0.12                   # arm 1 = primary: its error rate is 0.10
    la = math.log(1 / (ALPHA / 2))
    paths, steps = 1000, 4000
    arm = rng.random((paths, steps)) < s1
    y = np.where(arm, rng.random((paths, steps)) < r1, rng.random((paths, steps)) < r0)
    x1, n1 = np.cumsum(arm & y, 1), np.cumsum(arm, 1)
    x0, n0 = np.cumsum(~arm & y, 1), np.cumsum(~arm, 1)
    keep = _runs_checkpoints(y)                          # every step, via the runs of zeros
    args = (x1[keep], n1[keep], x0[keep], n0[keep], s1)
    bad = ((randomized_binary_log_evalue(*args, r1 - r0, "greater") >= la)
           | (randomized_binary_log_evalue(*args, r1 - r0, "less") >= la))
    row = np.broadcast_to(np.arange(paths)[:, None], y.shape)[keep]
    assert np.unique(row[bad]).size / paths <= ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / paths)
    est, lo, hi = randomized_binary_cs(x1[:, -1], n1[:, -1], x0[:, -1], n0[:, -1], s1)
    assert abs(np.mean(est) - (r1 - r0)) < 0.002
    assert np.mean((lo <= r1 - r0) & (r1 - r0 <= hi)) > 0.95


# --------------------------------------------------------------------------
# sample-ratio mismatch
# --------------------------------------------------------------------------

def test_srm_bayes_factor_matches_numerical_integration():
    x, n, share, k = 530, 1000, 0.5, 100.0
    a, b = k * share, k * (1 - share)
    # the mixture of likelihood ratios, integrated in a numerically safe form
    ratio = lambda q: math.exp(stats.beta.logpdf(q, a, b) + x * math.log(q / share)  # noqa: E731
                               + (n - x) * math.log((1 - q) / (1 - share)))
    bf, _ = integrate.quad(ratio, 1e-9, 1 - 1e-9, points=[x / n], limit=400,
                           epsabs=0, epsrel=1e-11)
    assert float(srm_log_evalue(x, n, share, k)) == pytest.approx(math.log(bf), abs=1e-8)


@pytest.mark.slow
def test_srm_type_one_error_under_continuous_peeking_and_power():
    rng = np.random.default_rng(15)
    steps = np.arange(1, STEPS + 1)
    x = np.cumsum(rng.random((PATHS, STEPS)) < 0.2, axis=1)
    p = srm_p_value(x, steps, 0.2)
    assert (p <= ALPHA).any(axis=1).mean() <= SE_BOUND
    # a 18 % share instead of 20 % is found within 5,000 units most of the time
    x = np.cumsum(rng.random((500, STEPS)) < 0.18, axis=1)
    assert (srm_p_value(x, steps, 0.2) <= ALPHA).any(axis=1).mean() > 0.5


def test_srm_p_value_is_more_cautious_than_the_fixed_n_binomial_test():
    for x, n in ((4800, 10_000), (520, 1000), (45, 100)):
        fixed = stats.binomtest(x, n, 0.5).pvalue
        assert float(srm_p_value(x, n, 0.5)) >= fixed
    assert float(srm_p_value(0, 0, 0.5)) == 1.0
    with pytest.raises(ConfigError) as e:
        srm_p_value(1, 2, 1.2)
    assert e.value.path == "expected_share"


def test_functions_broadcast_over_experiments():
    n = np.array([1000, 2000, 3000])
    one = [paired_binary_cs(30, 10, int(v)) for v in n]
    many = paired_binary_cs(np.full(3, 30), np.full(3, 10), n)
    for i in range(3):
        for k in range(3):
            assert float(many[k][i]) == pytest.approx(float(one[i][k]))
    assert np.asarray(bounded_cs(np.zeros((2, 3)), [-1, 0, 1], -1, 1)[1]).tolist() == [-1.0, -1.0]
