"""The spec layer's shared pieces: key paths, the Spec base, field helpers, value checks."""

from __future__ import annotations

from typing import Annotated, Any

import pytest
from pydantic import Field

from kpistream.errors import ConfigError
from kpistream.spec.common import (MISSING, SiblingError, Spec, check, check_ctx, default,
                                   finite, integer, items, join_path, label_map, non_empty,
                                   optional, parse, parse_duration, positive_duration, read_yaml,
                                   sub, text, validated, window_name)


def err(fn, *args, **kw) -> tuple[str, str]:
    with pytest.raises(ConfigError) as e:
        fn(*args, **kw)
    return e.value.path, e.value.reason


# ------------------------------------------------------------------ paths
@pytest.mark.parametrize("base,sub_,out", [
    ("", "", ""), ("", "a", "a"), ("a", "", "a"), ("a", "b", "a.b"), ("a", "[0]", "a[0]"),
    ("a[0]", "b.c", "a[0].b.c"), ("a", "[0].b", "a[0].b"), ("a", "[x", "a.[x"), ("a", "1", "a.1"),
])
def test_join_path(base, sub_, out):
    assert join_path(base, sub_) == out


# ------------------------------------------------------------------ the Spec base
def _twice(v: Any, data: Any) -> Any:
    return MISSING if v is MISSING else integer(v, "") * 2


def _after_a(v: Any, data: Any) -> Any:
    if not validated(data, "a"):
        return MISSING
    if v is not MISSING and v < data["a"]:
        raise SiblingError("a", f"must not exceed b ({v})")
    return v


class Inner(Spec):
    required = ("x",)

    x: Annotated[Any, check(lambda v, d: text(v, ""))] = MISSING
    y: Annotated[Any, default(3, integer, lo=0)] = MISSING


def _inners(v: Any, data: Any, ctx: Any) -> Any:
    if v is MISSING:
        return ()
    non_empty(v, "", "expected a non-empty list")
    out = items(Inner, v)
    if ctx and ctx.get("limit") is not None and len(out) > ctx["limit"]:
        raise ConfigError("", f"at most {ctx['limit']}")
    return out


class Outer(Spec):
    other_keys = frozenset({"elsewhere"})

    a: Annotated[Any, check(_twice)] = MISSING
    b: Annotated[Any, check(_after_a)] = MISSING
    inner: Inner = Field(default_factory=lambda: {"x": "d"})
    inners: Annotated[Any, check_ctx(_inners)] = MISSING
    for_: Annotated[Any, optional(parse_duration)] = Field(MISSING, alias="for")


def test_spec_values_defaults_and_given():
    o = parse(Outer, {"a": 2, "for": "1s", "elsewhere": [1], "inners": [{"x": "p", "y": 0}]})
    assert (o.a, o.b, o.for_, o.inner.x, o.inner.y) == (4, MISSING, 1000, "d", 3)
    assert [(i.x, i.y) for i in o.inners] == [("p", 0)]
    assert set(o.given()) == {"a", "inner", "inners", "for_"}
    assert parse(Outer, None).a is MISSING          # a null document reads as an empty one
    with pytest.raises(Exception):
        o.a = 1                                     # frozen


@pytest.mark.parametrize("raw,path,words", [
    ([1], "<root>", "expected a mapping, got list"),
    ({"c": 1}, "c", "unknown key (allowed: a, b, elsewhere, for, inner, inners)"),
    ({"a": "x"}, "a", "expected an integer, got 'x'"),
    ({"a": 5, "b": 3}, "a", "must not exceed b (3)"),         # a sibling's path
    ({"inner": {}}, "inner.x", "missing"),                     # required, before the values
    ({"inner": {"x": "", "z": 1}}, "inner.z", "unknown key"),  # keys before values
    ({"inner": {"x": 1}}, "inner.x", "non-empty string"),
    ({"inner": 3}, "inner", "expected a mapping, got int"),
    ({"inners": []}, "inners", "non-empty"),
    ({"inners": [{"x": "a"}, {"x": "b", "y": -1}]}, "inners[1].y", "must be in [0, inf]"),
    ({"inners": [{"x": "a"}, 7]}, "inners[1]", "expected a mapping"),
    ({"for": "soon"}, "for", "duration"),
    # the first error in field order wins, whatever the order of the keys
    ({"for": "soon", "a": "x"}, "a", "integer"),
    ({"b": 1, "inner": {"x": 1}, "a": "x"}, "a", "integer"),
])
def test_spec_errors_name_the_key_path(raw, path, words):
    p, reason = err(parse, Outer, raw)
    assert p == path and words in reason, (p, reason)


def test_context_and_sub():
    raw = {"inners": [{"x": "a"}, {"x": "b"}]}
    assert err(parse, Outer, raw, context={"limit": 1}) == ("inners", "at most 1")
    assert len(parse(Outer, raw, context={"limit": 2}).inners) == 2
    # inside a validator, sub() raises a relative path
    assert err(sub, Inner, {"x": 1}, "[3]") == ("[3].x", "expected a non-empty string, got 1")
    assert err(sub, Inner, 5, "") == ("", "expected a mapping, got int")


def test_missing_is_a_falsy_singleton():
    assert not MISSING and repr(MISSING) == "MISSING"
    assert type(MISSING)() is MISSING


# ------------------------------------------------------------------ value checks
def test_value_checks_and_their_messages():
    assert integer(5, "k") == 5
    assert err(integer, True, "k") == ("k", "expected an integer, got True")
    assert err(integer, 0, "k", 1, 9) == ("k", "must be in [1, 9], got 0")
    assert finite(1, "k") == 1.0 and isinstance(finite(1, "k"), float)
    assert err(finite, float("nan"), "k") == ("k", "expected a finite number, got nan")
    assert err(finite, 2, "k", 0.0, 1.0) == ("k", "must be in [0.0, 1.0], got 2")
    assert err(text, "", "k") == ("k", "expected a non-empty string, got ''")
    assert window_name(10, "w") == "10"
    assert err(window_name, None, "w") == ("w", "missing (a window name such as '10s')")
    assert positive_duration("1m", "d") == 60_000
    assert err(positive_duration, "0s", "d") == ("d", "must be positive")
    assert err(parse_duration, -1, "d") == ("d", "must not be negative")
    assert label_map({"a": 1, "b": "x"}, "m") == (("a", "1"), ("b", "x"))
    assert label_map(None, "m") == ()
    assert err(label_map, {"a b": "x"}, "m")[0] == "m.a b"
    assert err(label_map, {"severity": "x"}, "m") == ("m.severity", "'severity' is reserved")
    assert label_map({"a b": "x"}, "m", names=False) == (("a b", "x"),)
    assert err(label_map, {"a": [1]}, "")[0] == "a"


def test_read_yaml(tmp_path):
    (tmp_path / "a.yaml").write_text("")
    assert read_yaml(tmp_path / "a.yaml") == {}
    (tmp_path / "b.yaml").write_text("x: [\n")
    assert "not valid YAML" in err(read_yaml, tmp_path / "b.yaml")[1]
    assert err(read_yaml, tmp_path / "c.yaml") == (str(tmp_path / "c.yaml"), "file not found")


# ------------------------------------------------------------------ constants kept in step
def test_spec_constants_match_their_engines():
    from kpistream.alerts import rules
    from kpistream.decide import policy
    from kpistream.spec.alerts import OPS

    assert tuple(rules._OPS) == OPS and set(rules._NEGATE) == set(OPS)
    assert tuple(policy._SIGN) == policy.METRIC_NAMES


def test_no_module_imports_a_private_config_helper():
    """Config parsing goes through kpistream.spec, not another module's underscored helper."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    bad = []
    for p in [*root.glob("kpistream/**/*.py"), *root.glob("actors/*.py"), *root.glob("app/*.py")]:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                    ("kpistream.spec", "kpistream.alerts", "kpistream.decide")):
                bad += [f"{p.relative_to(root)}: {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_") and a.name != "__all__"]
    assert not bad, bad
