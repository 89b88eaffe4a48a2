"""Shadow-mode promote / rollback decisions on simulated experiments (prints figures; not a test).

Data.  Each experiment is a shadow comparison on a binary quality metric
(accuracy): every labelled request is scored by both models, and the pair
(primary correct, challenger correct) is drawn from one joint distribution
with primary accuracy ``--p0`` (0.90) and the models disagreeing on a share
``--disagree`` (5 %) of requests (they agree on 95 %: a retrained model of
the same family)::

    P(n10) = (disagree - delta) / 2,  P(n01) = (disagree + delta) / 2,
    P(n11) = p0 - P(n10),             P(n00) = the rest

where ``delta`` = challenger - primary accuracy.  Scenarios: ``A/A``
(delta 0), ``at margin`` (delta = -margin: promoting would be wrong) and
``2x margin`` (delta = -2 margin: must be rolled back).  Requests come in
batches of ``--batch`` labelled pairs (100), one batch per simulated minute,
up to ``--batches`` (200, i.e. 20,000 pairs); every judge looks after every
batch and the first decision ends the experiment.  The data are drawn per
batch as multinomial counts (``--experiments`` per scenario at once; no
Python loop per request) and all three judges see the SAME counts.

Judges.

* **kpistream**: ``CanaryPolicy.evaluate`` (the policy's own vectorized code;
  ``bounds=False`` skips only the bisection placing the displayed bounds)
  with ``configs/canary.yaml`` reduced to the accuracy metric (margin 0.01, harm 0), ``min_samples``
  1,000, ``min_duration`` 10m, ``max_duration`` = the last batch.  With one
  metric, the promote side runs at alpha/2 and the rollback side at alpha/2.
* **Kayenta-style**: Kayenta's Mann-Whitney classifier compares the two
  arms' per-request values as independent samples (it knows nothing of the
  pairing) at confidence 0.95, and canary analyses re-run the judge each
  interval on all data so far.  Modelled as: after every batch, a two-sided
  ``scipy.stats.mannwhitneyu`` test (alpha 0.05) of the challenger's 0/1
  outcomes against the primary's; roll back as soon as it is significant
  with the challenger worse; promote at the end otherwise (Kayenta has no
  non-inferiority margin: "not significantly worse" passes).  Kayenta's
  classifier literally checks the 95 % interval of the Hodges-Lehmann shift
  against +-25 % of that shift; on 0/1 outcomes the shift estimate is 0, so
  the literal rule would never flag an accuracy drop -- the p-value at the
  same level is the faithful reading of "significantly worse".  For 0/1 data
  the U statistic, its tie correction and so the p-value are functions of
  the four counts, so the bench computes scipy's exact formula (normal
  approximation, tie and continuity corrections) from the counts, and checks
  it against ``scipy.stats.mannwhitneyu`` on the expanded per-request arrays
  for a sample of experiments and looks (the check is printed).
* **naive repeated z**: after every batch, the fixed-n z interval on the
  paired differences, ``mean -+ 1.96 se`` (each side alpha/2 = 2.5 %, the
  same level as kpistream's promote side): promote when the lower end is
  above ``-margin`` (with the same min_samples / min_duration gates), roll
  back when the upper end is below 0.

A sensitivity table repeats A/A and 2x margin for other disagreement
shares: the anytime-valid paired test is fast because the models agree on
most requests (only discordant pairs carry information), while the
Kayenta-style judge ignores the pairing but peeks at a fixed-n level.  With
less agreement kpistream's rollbacks get slower than Kayenta-style ones,
which then pay with false rollbacks in A/A (the table prints both).

The last line (rates are shares of experiments; rollback n = median
labelled pairs at the rollback of 2x-margin regressions, experiments never
rolled back counting as infinitely late)::

    canary: false promote <kpistream, at margin>, false rollback <kpistream, A/A>,
    rollback n <kpistream, 2x>, kayenta rollback n <2x>, kayenta false promote <at margin>,
    naive false promote <at margin>
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from scipy import special, stats

from kpistream.decide.policy import ACTIONS, load_policy

ROOT = Path(__file__).resolve().parent.parent
WAIT, PROMOTE, ROLLBACK, HALT, INCONCLUSIVE = (ACTIONS.index(a) for a in
                                               ("wait", "promote", "rollback", "halt", "inconclusive"))


def cell_probs(p0: float, disagree: float, delta: float) -> np.ndarray:
    """(n11, n10, n01, n00) probabilities for primary accuracy p0 and challenger p0 + delta."""
    p10, p01 = (disagree - delta) / 2.0, (disagree + delta) / 2.0
    p = np.array([p0 - p10, p10, p01, 1.0 - p0 - p01])
    if np.any(p < 0):
        raise SystemExit(f"impossible scenario: cells {p}")
    return p


def simulate(probs: np.ndarray, experiments: int, batches: int, batch: int,
             rng: np.random.Generator) -> np.ndarray:
    """Cumulative cell counts, shape (batches, experiments, 4)."""
    return np.cumsum(rng.multinomial(batch, probs, size=(batches, experiments)), axis=0)


def mwu_p_binary(k1: np.ndarray, n1: int, k2: np.ndarray, n2: int) -> np.ndarray:
    """Two-sided Mann-Whitney p-value of 0/1 samples (k1 ones of n1 vs k2 ones of n2).

    scipy's asymptotic method (used whenever there are ties): average ranks,
    tie correction, continuity correction, ``p = 2 sf(z)`` clipped to 1.
    """
    n = n1 + n2
    ones = k1 + k2
    zeros = n - ones
    r1 = (n1 - k1) * (zeros + 1) / 2.0 + k1 * (zeros + (ones + 1) / 2.0)
    u1 = r1 - n1 * (n1 + 1) / 2.0
    u = np.maximum(u1, n1 * n2 - u1)
    tie = (zeros ** 3 - zeros) + (ones ** 3 - ones)
    s = np.sqrt(n1 * n2 / 12.0 * ((n + 1) - tie / (n * (n - 1.0))))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (u - n1 * n2 / 2.0 - 0.5) / s
    p = 2.0 * special.ndtr(-z)
    return np.clip(np.where(s > 0, p, 1.0), 0.0, 1.0)


def check_mwu(cum: np.ndarray, rng: np.random.Generator, samples: int = 12) -> float:
    """Largest |count formula - scipy.stats.mannwhitneyu| over random experiments and looks."""
    worst = 0.0
    batches, experiments, _ = cum.shape
    for _ in range(samples):
        b, e = int(rng.integers(batches)), int(rng.integers(experiments))
        n11, n10, n01, n00 = (int(v) for v in cum[b, e])
        # per-request outcomes (order is irrelevant to a rank test)
        primary = np.r_[np.ones(n11 + n10), np.zeros(n01 + n00)]
        challenger = np.r_[np.ones(n11), np.zeros(n10), np.ones(n01), np.zeros(n00)]
        ref = stats.mannwhitneyu(challenger, primary, alternative="two-sided").pvalue
        n = n11 + n10 + n01 + n00
        mine = float(mwu_p_binary(np.array(n11 + n01), n, np.array(n11 + n10), n))
        worst = max(worst, abs(ref - mine))
    return worst


def first_decision(actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(action, batch index) of the first non-wait action per experiment; (WAIT, -1) if none."""
    decided = actions != WAIT                      # (batches, experiments)
    any_ = decided.any(axis=0)
    idx = np.where(any_, decided.argmax(axis=0), -1)
    act = np.where(any_, actions[np.maximum(idx, 0), np.arange(actions.shape[1])], WAIT)
    return act, idx


def run_scenario(policy, cum: np.ndarray, batch: int, minutes_per_batch: float, margin: float,
                 alpha: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    batches, experiments, _ = cum.shape
    ours = np.empty((batches, experiments), dtype=np.int64)
    kay = np.empty_like(ours)
    naive = np.empty_like(ours)
    zc = stats.norm.ppf(1 - alpha / 2)
    for b in range(batches):
        c = cum[b]
        n = (b + 1) * batch
        elapsed = (b + 1) * minutes_per_batch * 60.0
        n11, n10, n01, n00 = c[:, 0], c[:, 1], c[:, 2], c[:, 3]
        summary = {
            "arms": {"primary": {"requests": n, "labelled": n, "correct": n11 + n10},
                     "challenger": {"requests": n, "labelled": n, "correct": n11 + n01}},
            "paired": {"requests": n, "labelled": n,
                       "correct": {"n11": n11, "n10": n10, "n01": n01, "n00": n00}},
        }
        ev = policy.evaluate(summary, elapsed, mode="shadow", expected_share=0.5, bounds=False)
        ours[b] = np.broadcast_to(ev["action"], (experiments,))
        last = b == batches - 1
        # Kayenta-style: fail on significantly worse, pass at the end
        p = mwu_p_binary(n11 + n01, n, n11 + n10, n)
        worse = (n01 < n10) & (p < alpha)
        kay[b] = np.where(worse, ROLLBACK, PROMOTE if last else WAIT)
        # naive repeated z on the paired differences
        mean = (n01 - n10) / n
        se = np.sqrt(np.maximum((n01 + n10) / n - mean ** 2, 0.0) / n)
        gate = (n >= policy.min_samples) and (elapsed * 1000 >= policy.min_duration_ms)
        naive[b] = np.where(mean + zc * se < 0, ROLLBACK,
                            np.where((mean - zc * se > -margin) & gate, PROMOTE,
                                     INCONCLUSIVE if last else WAIT))
    return {"kpistream": first_decision(ours), "kayenta": first_decision(kay),
            "naive z": first_decision(naive)}


def median_n(act: np.ndarray, idx: np.ndarray, action: int, batch: int) -> float:
    """Median labelled pairs at ``action``; experiments without it count as infinitely late."""
    n = np.where(act == action, (idx + 1) * batch, np.inf).astype(float)
    return float(np.median(n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experiments", type=int, default=10000)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--p0", type=float, default=0.90)
    ap.add_argument("--disagree", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=20240611)
    ap.add_argument("--sensitivity", type=float, nargs="*", default=[0.03, 0.10, 0.15, 0.19],
                    help="other disagreement shares to compare (A/A and 2x margin only)")
    ap.add_argument("--sens-experiments", type=int, default=2000)
    args = ap.parse_args()

    t0 = time.perf_counter()
    base = load_policy(ROOT / "configs" / "canary.yaml")
    acc = next(m for m in base.metrics if m.name == "accuracy")
    minutes = 1.0
    policy = load_policy({
        "alpha": base.alpha, "min_samples": 1000, "min_duration": "10m",
        "max_duration": f"{int(args.batches * minutes)}m", "srm": {"alpha": base.srm_alpha},
        "metrics": [{"name": "accuracy", "margin": acc.margin, "harm": acc.harm}],
    })
    margin, alpha = acc.margin, policy.alpha
    E = args.experiments
    se = np.sqrt(alpha * (1 - alpha) / E)
    print(f"policy: accuracy margin {margin:g}, harm {acc.harm:g}, alpha {alpha:g} "
          f"(promote side {policy.alpha_promote('shadow'):g}, rollback side "
          f"{policy.alpha_rollback('shadow'):g}), min_samples {policy.min_samples}, "
          f"min_duration 10m, max {args.batches * args.batch:,} pairs")
    print(f"data: primary accuracy {args.p0:g}, models disagree on {args.disagree:.0%} of "
          f"requests, {E:,} experiments per scenario, a look every {args.batch} labelled pairs")
    rng = np.random.default_rng(args.seed)
    scenarios = {"A/A": 0.0, "at margin": -margin, "2x margin": -2.0 * margin}
    results: dict[str, dict] = {}
    for name, delta in scenarios.items():
        cum = simulate(cell_probs(args.p0, args.disagree, delta), E, args.batches, args.batch, rng)
        if name == "A/A":
            print(f"Mann-Whitney from counts vs scipy.stats.mannwhitneyu on per-request arrays: "
                  f"max |diff p| = {check_mwu(cum, rng):.2e}")
        res = run_scenario(policy, cum, args.batch, minutes, margin, alpha)
        results[name] = res
        print(f"\n{name}: challenger - primary accuracy = {delta:+.3f}")
        print(f"  {'judge':<10} {'promote':>8} {'rollback':>9} {'no decision':>12} "
              f"{'median n promote':>17} {'median n rollback':>18}")
        for judge, (act, idx) in res.items():
            rates = [np.mean(act == a) for a in (PROMOTE, ROLLBACK)]
            other = 1.0 - sum(rates)
            mp = np.median((idx[act == PROMOTE] + 1) * args.batch) if (act == PROMOTE).any() else np.nan
            mr = np.median((idx[act == ROLLBACK] + 1) * args.batch) if (act == ROLLBACK).any() else np.nan
            print(f"  {judge:<10} {rates[0]:>8.4f} {rates[1]:>9.4f} {other:>12.4f} "
                  f"{mp:>17,.0f} {mr:>18,.0f}")

    # How much of the speed comes from the pairing: the same comparison as the models
    # agree less (0.19 is about independent errors at accuracies 0.90 / 0.88).
    print(f"\nsensitivity to the models' disagreement ({args.sens_experiments:,} experiments each):")
    print(f"  {'disagree':>8} {'A/A false rollback':>19} {'kayenta A/A false rollback':>27} "
          f"{'2x rollback n':>14} {'kayenta 2x rollback n':>22}")
    for dis in args.sensitivity:
        row = []
        for delta in (0.0, -2.0 * margin):
            cum = simulate(cell_probs(args.p0, dis, delta), args.sens_experiments, args.batches,
                           args.batch, rng)
            row.append(run_scenario(policy, cum, args.batch, minutes, margin, alpha))
        aa, x2 = row
        print(f"  {dis:>8.2f} {np.mean(aa['kpistream'][0] == ROLLBACK):>19.4f} "
              f"{np.mean(aa['kayenta'][0] == ROLLBACK):>27.4f} "
              f"{median_n(*x2['kpistream'], ROLLBACK, args.batch):>14,.0f} "
              f"{median_n(*x2['kayenta'], ROLLBACK, args.batch):>22,.0f}")

    fp = float(np.mean(results["at margin"]["kpistream"][0] == PROMOTE))
    fr = float(np.mean(results["A/A"]["kpistream"][0] == ROLLBACK))
    rn = median_n(*results["2x margin"]["kpistream"], ROLLBACK, args.batch)
    krn = median_n(*results["2x margin"]["kayenta"], ROLLBACK, args.batch)
    kfp = float(np.mean(results["at margin"]["kayenta"][0] == PROMOTE))
    nfp = float(np.mean(results["at margin"]["naive z"][0] == PROMOTE))
    kfr = float(np.mean(results["A/A"]["kayenta"][0] == ROLLBACK))
    bound = alpha + 3 * se
    print(f"\ngoals (alpha + 3 SE = {bound:.4f} with {E:,} experiments):")
    print(f"  kpistream false promote {fp:.4f} <= {bound:.4f}: {'met' if fp <= bound else 'NOT MET'}")
    print(f"  kpistream false rollback {fr:.4f} <= {bound:.4f}: {'met' if fr <= bound else 'NOT MET'}")
    print(f"  naive false promote {nfp:.4f} visibly above alpha: "
          f"{'met' if nfp > bound else 'NOT MET'}")
    print(f"  kpistream median rollback n {rn:,.0f} < Kayenta's {krn:,.0f}: "
          f"{'met' if rn < krn else 'NOT MET'}")
    print(f"  (Kayenta-style A/A false rollback {kfr:.4f}; runtime {time.perf_counter() - t0:.1f} s)")
    print(f"canary: false promote {fp:.4f}, false rollback {fr:.4f}, rollback n {rn:.0f}, "
          f"kayenta rollback n {krn:.0f}, kayenta false promote {kfp:.4f}, "
          f"naive false promote {nfp:.4f}")


if __name__ == "__main__":
    main()
