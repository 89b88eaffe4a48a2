"""Config documents mutated key by key, and what the loaders said about them.

``tests/spec/data/config_oracle.json.gz`` holds the base documents and, per mutated
document, the result of the hand-written loaders the spec layer replaced (an error's path and
reason, or a hash of the loaded config's repr).  Regenerate it from an older tree with
``python tests/spec/config_oracle.py <tree> <out.json.gz>`` (the tree's kpistream is used).
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import random
import sys
from pathlib import Path
from typing import Any

BAD = [None, -1, 0, 1, 2, 0.5, 1.5, "x", "", "5s", "0s", "accuracy", "10s", [], ["x"], [1], {},
       {"a": 1}, True, 1e9]
FNS = {"metrics": ["config_from_dict"], "alerts": ["rules_from_dict", "alerts_from_dict"],
       "canary": ["policy_from_dict", "load_canary_config"]}


def _paths(doc: Any, prefix: tuple = ()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, prefix + (i,))


def _get(doc: Any, p: tuple) -> Any:
    for k in p:
        doc = doc[k]
    return doc


def mutations(doc: Any) -> list[list]:
    """Every key set to each of :data:`BAD`, deleted, and every mapping given a bogus key."""
    out: list[list] = []
    for p in _paths(doc):
        if p:
            out += [["set", list(p), b] for b in BAD] + [["del", list(p), None]]
        if isinstance(_get(doc, p), dict):
            out.append(["add", list(p), None])
    return out


def apply(doc: Any, muts: list[list]) -> Any:
    d = copy.deepcopy(doc)
    for op, p, b in muts:
        try:
            parent = _get(d, p[:-1]) if p else None
            if op == "set":
                parent[p[-1]] = copy.deepcopy(b)
            elif op == "del":
                if isinstance(parent, dict):
                    del parent[p[-1]]
                else:
                    parent.pop(p[-1])
            else:
                _get(d, p)["zz_bogus"] = 1
        except (KeyError, IndexError, TypeError, AttributeError):
            pass
    return d


def run(fn: str, doc: Any) -> list:
    """``["ok", sha1 of repr]``, ``["err", path, reason]`` or ``["exc", type name]``."""
    from kpistream.errors import ConfigError

    if fn == "config_from_dict":
        from kpistream.spec.metrics import config_from_dict as f
    elif fn == "rules_from_dict":
        from kpistream.alerts.rules import rules_from_dict as f
    elif fn == "alerts_from_dict":
        from kpistream.alerts.watcher import alerts_from_dict as f
    elif fn == "policy_from_dict":
        from kpistream.decide.policy import policy_from_dict as f
    else:
        from actors.canary import load_canary_config as f
    try:
        return ["ok", hashlib.sha1(repr(f(copy.deepcopy(doc))).encode()).hexdigest()[:16]]
    except ConfigError as e:
        return ["err", e.path, e.reason]
    except Exception as e:  # noqa: BLE001 -- recorded: the old loaders crashed on some input
        return ["exc", type(e).__name__]


def load(path: Path) -> tuple[dict, list]:
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    return data["bases"], data["cases"]


def documents(bases: dict, cases: list):
    """(kind, fn, doc, expected) for every recorded case."""
    for kind, i, muts, fn, expected in cases:
        yield kind, fn, apply(bases[kind][i], muts), expected


def _bases(root: Path) -> dict:
    import yaml

    met = {"version": 1, "time": {"lateness": "1s", "label_delay": 5000, "max_future": "1h"},
           "windows": [{"name": "a", "type": "tumbling", "size": "10s"},
                       {"type": "sliding", "size": "1m", "step": "20s"},
                       {"name": "k", "type": "count", "size": 100}],
           "series": {"segments": ["region", "tier"], "max_series": 50},
           "join": {"max_pending": 100, "max_feedback": 200, "max_paired": 300},
           "metrics": {"families": ["traffic", "latency", "classification"],
                       "classification": {"positive_label": "yes", "max_classes": 8},
                       "ranking": {"k": 5}, "latency": {"relative_accuracy": 0.02},
                       "paired": {"primary_variant": "p"},
                       "features": {"sample_size": 64, "max_features": 8}}}
    al = {"version": 1, "rules": [
        {"name": "r1", "metric": "accuracy", "window": "10s", "match": {"model": "m"},
         "condition": {"relative_drop": 0.1, "baseline": "10m"},
         "clear": {"relative_drop": 0.05}, "for": "30s", "min_count": 10,
         "min_label_coverage": 0.5, "severity": "page", "labels": {"team": "ml"},
         "annotations": {"summary": "{value:.2f} {series}"}, "group_by": ["model", "variant"],
         "stale_after": "10m"},
        {"name": "r2", "metric": "error_rate", "window": 10,
         "condition": {"disparity": 0.1, "across": "region", "alpha": 0.05},
         "clear": {"disparity": 0.05}},
        {"name": "r3", "condition": {"detector": "d1"}},
        {"name": "r4", "metric": "latency_p99", "window": "1m",
         "condition": {"op": ">", "value": 100}, "clear": {"op": "<", "value": 90}}],
        "detectors": [
            {"name": "d1", "type": "cusum", "metric": "accuracy", "window": "10s", "shift": 0.05,
             "direction": "down", "false_alarm_every": "7d", "target": 0.9, "sigma": 0.1,
             "warmup": 5, "guard": 1, "min_count": 10, "lam": 0.3, "delta": 0.01,
             "threshold": 20, "hold": "1m", "match": {"model": "m"}},
            {"name": "d2", "type": "ewma", "metric": "latency_p99", "window": "10s"}],
        "input_drift": [
            {"name": "i1", "window": "10s", "match": {"model": "m"}, "group_by": ["model"],
             "reference": "1m", "max_reference": 100, "alpha": 0.05, "min_effect": 0.2,
             "psi": {"bins": 5, "floor": 0.2}, "min_samples": 20, "hold": "30s",
             "features": ["f1"]}],
        "notifications": {"log": False, "webhooks": [
            {"url": "http://x/h", "states": ["firing"], "timeout": "2s", "retries": 2,
             "backoff": "1s", "max_backoff": "10s", "headers": {"A": "b"}}]}}
    ca = {"alpha": 0.1, "mode": "canary", "min_samples": 10, "min_duration": "1s",
          "max_duration": "2h", "target_samples": 50, "min_n": 5,
          "srm": {"alpha": 0.01, "expected_share": 0.2, "concentration": 10},
          "metrics": [{"name": "accuracy", "margin": 0.02, "harm": 0.1, "role": "guardrail"},
                      {"name": "reward", "margin": 0}],
          "experiments": [{"name": "e", "model": "m", "registered_model": "rm",
                           "primary_variant": "a", "challenger_variant": "b", "mode": "canary",
                           "steps": [0.1, 0.5, 1], "settle": "2s", "interval": "3s"},
                          {"name": "f", "model": "m2"}],
          "retrain": {"on_alerts": ["x"], "every_labelled": 100, "model": "mm"},
          "actions": {"mode": "approval", "cooldown": "1m", "retrain_cooldown": "2m"}}
    shipped = {k: yaml.safe_load((root / f"configs/{k}.yaml").read_text())
               for k in ("metrics", "alerts", "canary")}
    return {"metrics": [shipped["metrics"], met], "alerts": [shipped["alerts"], al],
            "canary": [shipped["canary"], ca]}


def generate(root: Path, pairs: int = 250) -> dict:
    rnd = random.Random(7)
    bases = _bases(root)
    cases = []
    for kind, docs in bases.items():
        for i, doc in enumerate(docs):
            ms = mutations(doc)
            variants = [[]] + [[m] for m in ms] + [rnd.sample(ms, 2) for _ in range(pairs)]
            for muts in variants:
                for fn in FNS[kind]:
                    cases.append([kind, i, muts, fn, run(fn, apply(doc, muts))])
    return {"bases": bases, "cases": cases}


if __name__ == "__main__":
    tree, out = Path(sys.argv[1]).resolve(), sys.argv[2]
    sys.path.insert(0, str(tree))
    data = generate(tree)
    with gzip.open(out, "wt") as f:
        json.dump(data, f, separators=(",", ":"))
    print(len(data["cases"]), "cases")
