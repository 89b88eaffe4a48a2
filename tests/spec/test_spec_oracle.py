"""The spec layer against the hand-written loaders it replaced: same error path and reason
(or the same loaded config) on every recorded mutated document (tests/spec/config_oracle.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.spec.config_oracle import documents, load, run

DATA = Path(__file__).parent / "data" / "config_oracle.json.gz"
BASES, CASES = load(DATA)


def _psi_first(expected: list, got: list) -> bool:
    """The one documented change: an input_drift entry's ``psi`` values are checked with its
    keys (before ``alpha``), no longer after ``min_effect``; only a document with a bad psi
    value *and* another bad key of that entry reports the other one first."""
    return got[0] == "err" and expected[0] == "err" and ".psi." in got[1] \
        and expected[1].startswith("input_drift[") and ".psi." not in expected[1]


@pytest.mark.slow
@pytest.mark.parametrize("fn", ["config_from_dict", "rules_from_dict", "alerts_from_dict",
                                "policy_from_dict", "load_canary_config"])
def test_same_result_as_the_hand_written_loaders(fn):
    differ, n = [], 0
    for kind, f, doc, expected in documents(BASES, CASES):
        if f != fn:
            continue
        n += 1
        got = run(fn, doc)
        if expected[0] == "exc":
            # the old loaders crashed (e.g. an unhashable value looked up in a dict):
            # the spec layer reports a ConfigError instead
            ok = got[0] == "err"
        else:
            ok = got == expected or _psi_first(expected, got)
        if not ok:
            differ.append((doc, expected, got))
    assert n > 500
    assert not differ, f"{len(differ)} of {n} differ; first: {differ[0]}"
