"""The family registry: every state class by name, and no import cycle among the state modules."""

from __future__ import annotations

import ast
from pathlib import Path

from kpistream.engine import features, paired, states
from kpistream.engine.families import FAMILY_CLASSES
from kpistream.spec.metrics import FAMILIES


def test_every_configurable_family_is_registered_in_order():
    assert list(FAMILY_CLASSES) == ["traffic", "latency", "cost", "classification", "regression",
                                    "ranking", "feedback", "paired", "features"]
    assert set(FAMILY_CLASSES) == set(FAMILIES)
    assert FAMILY_CLASSES["paired"] is paired.PairedState
    assert FAMILY_CLASSES["features"] is features.FeatureSampleState
    for name, cls in FAMILY_CLASSES.items():
        assert cls.family == name and issubclass(cls, states.MetricState)
        assert cls.horizon in ("inference", "label")


def _imports(mod) -> set[str]:
    tree = ast.parse(Path(mod.__file__).read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_state_modules_do_not_import_each_other_back():
    s = _imports(states)
    assert not any(m.startswith(("kpistream.engine.paired", "kpistream.engine.features",
                                 "kpistream.engine.families")) for m in s)
    for mod in (paired, features):
        assert not any(m.startswith("kpistream.engine.families") for m in _imports(mod))
        assert not hasattr(mod, "FAMILY_CLASSES")
    assert not hasattr(states, "FAMILY_CLASSES")
