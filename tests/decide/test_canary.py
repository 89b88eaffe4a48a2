"""Canary / shadow policy: decisions on hand-built summaries, config errors, peeking-proof error rates."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from kpistream.decide.policy import ACTIONS, CanaryPolicy, Decision, MetricRule, load_policy
from kpistream.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

POLICY = load_policy({
    "alpha": 0.05, "min_samples": 1000, "min_duration": "30m", "max_duration": "24h",
    "srm": {"alpha": 0.001, "expected_share": 0.5},
    "metrics": [
        {"name": "accuracy", "margin": 0.01, "harm": 0.0, "role": "quality"},
        {"name": "error_rate", "margin": 0.005, "harm": 0.0, "role": "guardrail"},
        {"name": "latency", "margin": 0.05, "harm": 0.10, "role": "guardrail"},
    ],
})


def shadow(n: int, *, n10: float = 0.02, n01: float = 0.02, e10: float = 0.001, e01: float = 0.001,
           lat: float = 0.0, lat_sd: float = 0.2, requests: tuple[int, int] | None = None) -> dict:
    """A shadow summary of n labelled pairs; cells given as shares of n (expected counts)."""
    c10, c01 = round(n10 * n), round(n01 * n)
    c11 = round(0.88 * n)
    f10, f01 = round(e10 * n), round(e01 * n)
    rp, rc = requests or (n, n)
    arm = {"requests": n, "errors": 0, "labelled": n, "correct": 0}
    return {
        "arms": {"primary": dict(arm, requests=rp), "challenger": dict(arm, requests=rc)},
        "paired": {
            "requests": n, "labelled": n,
            "correct": {"n11": c11, "n10": c10, "n01": c01, "n00": n - c11 - c10 - c01},
            "error": {"n11": 0, "n10": f10, "n01": f01, "n00": n - f10 - f01},
            "log_latency": [n, lat * n, n * (lat_sd ** 2 + lat ** 2)],
        },
    }


def canary(n: int, *, acc: tuple[float, float] = (0.90, 0.90), err: tuple[float, float] = (0.01, 0.01),
           lat: tuple[float, float] = (4.0, 4.0), share: float = 0.5,
           reward: tuple[float, float] = (0.2, 0.2)) -> dict:
    """A canary summary: n requests in all, a share of them served (and labelled) by the challenger."""
    out = {}
    for name, k, m in (("primary", 0, round(n * (1 - share))), ("challenger", 1, round(n * share))):
        out[name] = {"requests": m, "errors": round(err[k] * m), "labelled": m,
                     "correct": round(acc[k] * m),
                     "log_latency": [m, lat[k] * m, m * (0.5 ** 2 + lat[k] ** 2)],
                     "reward": [m, reward[k] * m, m * reward[k]],          # 0/1 rewards
                     "abs_error": [0, 0.0, 0.0]}
    return {"arms": out, "paired": {}}


# --------------------------------------------------------------------------
# decisions
# --------------------------------------------------------------------------

def test_clear_win_promotes_only_after_min_samples_and_min_duration():
    win = dict(n10=0.01, n01=0.04)                      # challenger 3 points more accurate
    d = POLICY.decide(shadow(600, **win), elapsed_s=7200)
    assert d.action == "wait" and "1,000 labelled pairs (have 600)" in d.reason
    d = POLICY.decide(shadow(5000, **win), elapsed_s=600)
    assert d.action == "wait" and "30m (have 10m00s)" in d.reason
    assert {m.metric: m.verdict for m in d.metrics}["accuracy"] == "better"
    d = POLICY.decide(shadow(5000, **win), elapsed_s=1860)
    assert d.action == "promote", d.reason
    assert d.reason.startswith("Promote: every metric is within its non-inferiority margin")
    acc = d.metrics[0]
    assert acc.lower > 0 and acc.estimate == pytest.approx(0.03) and acc.n == 5000


def test_clear_regression_rolls_back_before_min_samples_and_duration():
    d = POLICY.decide(shadow(300, n10=0.10, n01=0.01), elapsed_s=60)
    assert d.action == "rollback"
    acc = {m.metric: m for m in d.metrics}["accuracy"]
    assert acc.verdict == "harmful" and acc.upper < 0 and acc.estimate == pytest.approx(-0.09)
    assert "accuracy" in d.reason and d.reason.startswith("Roll back")


def test_error_rate_regression_rolls_back_from_discordant_pairs():
    d = POLICY.decide(shadow(2000, e10=0.0, e01=0.02), elapsed_s=120)   # +2 points of errors
    assert d.action == "rollback"
    err = {m.metric: m for m in d.metrics}["error_rate"]
    assert err.verdict == "harmful" and err.direction == "lower_is_better"
    assert err.estimate == pytest.approx(-0.02) and err.raw_estimate == pytest.approx(0.02)


def test_latency_guardrail_rolls_back_only_beyond_its_harm_threshold():
    slow = POLICY.decide(shadow(400, lat=0.30), elapsed_s=60)           # ~35 % slower
    assert slow.action == "rollback"
    lat = {m.metric: m for m in slow.metrics}["latency"]
    assert lat.verdict == "harmful" and lat.upper < -0.10
    # 7 % slower: beyond the margin (5 %) but not beyond the harm threshold (10 %)
    mid = POLICY.decide(shadow(50_000, lat=0.07), elapsed_s=7200)
    assert mid.action == "wait"
    assert {m.metric: m.verdict for m in mid.metrics}["latency"] == "undecided"
    end = POLICY.decide(shadow(50_000, lat=0.07), elapsed_s=24 * 3600)
    assert end.action == "inconclusive" and "the primary stays" in end.reason


def test_sample_ratio_mismatch_halts_even_a_clear_win():
    s = shadow(5000, n10=0.01, n01=0.04, requests=(5300, 4700))
    d = POLICY.decide(s, elapsed_s=7200)
    assert d.action == "halt"
    assert d.srm["observed_share"] == pytest.approx(0.47) and d.srm["p_value"] < 0.001
    assert "sample-ratio mismatch" in d.reason
    # the caller's share wins over the config's: 0.47 expected -> no mismatch -> promote
    assert POLICY.decide(s, elapsed_s=7200, expected_share=0.47).action == "promote"


def test_without_expected_share_the_ratio_is_not_checked_and_says_so():
    p = load_policy({"min_samples": 1000, "metrics": [{"name": "accuracy", "margin": 0.01}]})
    d = p.decide(shadow(500, requests=(500, 100)), elapsed_s=60)
    assert d.action == "wait" and d.srm["checked"] is False and d.srm["p_value"] is None
    assert "sample ratio not checked" in d.reason


def test_max_duration_is_inconclusive_and_keeps_the_primary():
    d = POLICY.decide(shadow(400), elapsed_s=24 * 3600)
    assert d.action == "inconclusive"
    assert "24h" in d.reason and "the primary stays" in d.reason


def test_canary_mode_uses_the_arms_and_counts_reward():
    p = load_policy({"min_samples": 1000, "min_duration": "0s", "srm": {"expected_share": 0.1},
                     "metrics": [{"name": "accuracy", "margin": 0.01},
                                 {"name": "error_rate", "margin": 0.005},
                                 {"name": "latency", "margin": 0.05, "harm": 0.1},
                                 {"name": "reward", "margin": 0.02}]})
    win = canary(200_000, acc=(0.90, 0.92), share=0.1)
    d = p.decide(win, elapsed_s=3600, mode="canary")
    assert d.action == "promote", d.reason
    v = {m.metric: m for m in d.metrics}
    assert v["accuracy"].estimate == pytest.approx(0.02, abs=1e-3)
    assert v["reward"].verdict == "non_inferior" and v["reward"].n == 200_000
    assert d.alpha["rollback_side"] == pytest.approx(0.05 / 8)
    # too little traffic per arm yet: wait; a clear error-rate regression: roll back
    assert p.decide(canary(5000, share=0.1), elapsed_s=3600, mode="canary").action == "wait"
    bad = p.decide(canary(20_000, err=(0.01, 0.05), share=0.1), elapsed_s=60, mode="canary")
    assert bad.action == "rollback" and "error_rate" in bad.reason
    # shadow mode: reward does not apply (users only see the primary) and leaves the alpha split
    s = p.decide(shadow(100), elapsed_s=60, mode="shadow")
    assert {m.metric: m.verdict for m in s.metrics}["reward"] == "not_applicable"
    assert s.alpha["rollback_side"] == pytest.approx(0.05 / 6)


def test_canary_mode_without_a_share_falls_back_to_asymptotic_bounds():
    p = load_policy({"min_samples": 1000, "min_duration": "0s",
                     "metrics": [{"name": "accuracy", "margin": 0.01}]})
    d = p.decide(canary(100_000, acc=(0.90, 0.92)), elapsed_s=60, mode="canary")
    assert d.action == "promote" and d.srm["checked"] is False
    assert d.metrics[0].lower is not None and 0 < d.metrics[0].lower < 0.02


def test_decision_as_dict_is_json_and_complete():
    d = POLICY.decide(shadow(50), elapsed_s=5)
    assert isinstance(d, Decision)
    out = json.loads(json.dumps(d.as_dict(), allow_nan=False))
    assert set(out) == {"action", "reason", "mode", "elapsed_s", "metrics", "counts", "srm", "alpha"}
    m = out["metrics"][2]
    assert set(m) >= {"metric", "estimate", "lower", "upper", "margin", "harm", "n", "verdict",
                      "direction"}
    assert m["metric"] == "latency" and m["lower"] is None and m["verdict"] == "undecided"  # < min_n
    assert set(out["srm"]) >= {"p_value", "observed_share", "expected_share"}
    assert out["counts"]["samples"] == 50


def test_evaluate_is_decide_elementwise():
    cases = [shadow(300, n10=0.10, n01=0.01), shadow(5000, n10=0.01, n01=0.04), shadow(800),
             shadow(5000, n10=0.01, n01=0.04, requests=(5300, 4700))]

    def stack(objs):
        if isinstance(objs[0], dict):
            return {k: stack([o[k] for o in objs]) for k in objs[0]}
        if isinstance(objs[0], list):
            return [stack([o[i] for o in objs]) for i in range(len(objs[0]))]
        return np.array(objs)

    ev = POLICY.evaluate(stack(cases), elapsed_s=np.array([60, 3600, 3600, 3600]), bounds=False)
    got = [ACTIONS[a] for a in ev["action"]]
    want = [POLICY.decide(c, t).action for c, t in zip(cases, (60, 3600, 3600, 3600))]
    assert got == want == ["rollback", "promote", "wait", "halt"]


def test_error_rates_hold_under_continuous_peeking():
    """At the margin nothing is promoted, with no difference nothing is rolled back (alpha/2 each)."""
    rng = np.random.default_rng(7)
    policy = load_policy({"min_samples": 500, "min_duration": "0s", "max_duration": "100m",
                          "metrics": [{"name": "accuracy", "margin": 0.01}]})
    E, looks, batch = 1500, 100, 100
    bound = 0.025 + 3 * math.sqrt(0.025 * 0.975 / E)
    for delta, bad in ((-0.01, "promote"), (0.0, "rollback")):
        p = [0.9 - (0.04 - delta) / 2, (0.04 - delta) / 2, (0.04 + delta) / 2, 0.0]
        p[3] = 1 - sum(p[:3])
        cum = np.cumsum(rng.multinomial(batch, p, size=(looks, E)), axis=0)
        first = np.full(E, ACTIONS.index("wait"))
        for b in range(looks):
            n11, n10, n01, n00 = cum[b].T
            n = (b + 1) * batch
            ev = policy.evaluate({"paired": {"labelled": n, "correct": {
                "n11": n11, "n10": n10, "n01": n01, "n00": n00}}}, elapsed_s=60.0 * (b + 1),
                bounds=False)
            first = np.where(first == ACTIONS.index("wait"), ev["action"], first)
        assert np.mean(first == ACTIONS.index(bad)) <= bound


# --------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------

def test_shipped_config_loads():
    p = load_policy(ROOT / "configs" / "canary.yaml")
    assert p.alpha == 0.05 and p.mode == "shadow" and p.min_samples == 300   # the demo's
    assert p.min_duration_ms == 30_000 and p.max_duration_ms == 3_600_000
    assert [m.name for m in p.metrics] == ["accuracy", "error_rate", "latency"]
    assert p.metrics[2] == MetricRule("latency", 0.5, 1.0, "guardrail")
    assert p.srm_expected_share is None and p.srm_alpha == 0.001 and p.min_n == 100
    assert load_policy(None) == CanaryPolicy()
    assert p.alpha_promote() == 0.025 and p.alpha_rollback() == pytest.approx(0.05 / 6)


@pytest.mark.parametrize("raw,path", [
    ({"alpah": 0.1}, "alpah"),
    ({"alpha": 0}, "alpha"),
    ({"alpha": True}, "alpha"),
    ({"version": 2}, "version"),
    ({"mode": "blue"}, "mode"),
    ({"min_samples": -1}, "min_samples"),
    ({"min_duration": "10 minutes"}, "min_duration"),
    ({"min_duration": "2h", "max_duration": "1h"}, "min_duration"),
    ({"max_duration": "0s"}, "max_duration"),
    ({"min_n": 1}, "min_n"),
    ({"target_samples": 0}, "target_samples"),
    ({"srm": {"alfa": 0.1}}, "srm.alfa"),
    ({"srm": {"expected_share": 1.5}}, "srm.expected_share"),
    ({"srm": {"concentration": 0}}, "srm.concentration"),
    ({"metrics": []}, "metrics"),
    ({"metrics": [{"name": "accuracy", "margin": 0.01}, {"name": "latency", "margn": 0.05}]},
     "metrics[1].margn"),
    ({"metrics": [{"name": "latency"}]}, "metrics[0].margin"),
    ({"metrics": [{"name": "acc", "margin": 0.01}]}, "metrics[0].name"),
    ({"metrics": [{"name": "accuracy", "margin": -0.01}]}, "metrics[0].margin"),
    ({"metrics": [{"name": "accuracy", "margin": 0.01, "harm": "x"}]}, "metrics[0].harm"),
    ({"metrics": [{"name": "accuracy", "margin": 0.01, "role": "boss"}]}, "metrics[0].role"),
    ({"metrics": [{"name": "accuracy", "margin": 0.01}, {"name": "accuracy", "margin": 0.02}]},
     "metrics[1].name"),
])
def test_config_errors_name_the_field(raw, path):
    with pytest.raises(ConfigError) as e:
        load_policy(raw)
    assert e.value.path == path


def test_bad_arguments_and_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError) as e:
        POLICY.decide(shadow(10), 1, mode="blue")
    assert e.value.path == "mode"
    with pytest.raises(ConfigError) as e:
        POLICY.decide(shadow(10), 1, expected_share=2)
    assert e.value.path == "expected_share"
    with pytest.raises(ConfigError, match="file not found"):
        load_policy(tmp_path / "missing.yaml")
    (tmp_path / "c.yaml").write_text("metrics:\n  - {name: accuracy, margin: 0.01, extra: 1}\n")
    with pytest.raises(ConfigError) as e:
        load_policy(tmp_path / "c.yaml")
    assert e.value.path == "metrics[0].extra"
