"""What every config spec shares: YAML reading, durations, value checks, and the pydantic
base (:class:`Spec`) whose first validation error becomes a ConfigError naming the key path."""

import math
import re
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Mapping, TypeVar

from pydantic import BaseModel, ConfigDict, PlainValidator, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from kpistream.errors import ConfigError

__all__ = ["ConfigError", "MISSING", "NAME", "SiblingError", "Spec", "check", "check_ctx",
           "check_keys", "default", "finite", "format_duration", "integer", "items", "join_path",
           "label_map", "non_empty", "object_name", "optional", "parse", "parse_duration",
           "positive_duration", "read_yaml", "spec_error", "sub", "text", "validated",
           "window_name"]

#: A label / rule / detector name.
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_DUR = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d)\s*$")


# ------------------------------------------------------------------ files and durations
def read_yaml(path: str | Path) -> Any:
    """A YAML file's content ({} when empty); a missing or broken file is a ConfigError."""
    import yaml

    p = Path(path)
    try:
        return yaml.safe_load(p.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(str(p), "file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(str(p), f"not valid YAML: {e}") from None


def parse_duration(value: Any, path: str) -> int:
    """Milliseconds from ``"10s"``-style strings or integer milliseconds."""
    if isinstance(value, bool):
        raise ConfigError(path, f"expected a duration like '10s', got {value!r}")
    if isinstance(value, int):
        ms = value
    elif isinstance(value, str) and (m := _DUR.match(value)):
        ms = int(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ConfigError(path, f"expected a duration like '500ms', '10s', '5m', '1h' or "
                                f"integer milliseconds, got {value!r}")
    if ms < 0:
        raise ConfigError(path, "must not be negative")
    return ms


def format_duration(ms: int) -> str:
    for unit in ("d", "h", "m", "s"):
        if ms and ms % _UNITS[unit] == 0:
            return f"{ms // _UNITS[unit]}{unit}"
    return f"{ms}ms"


# ------------------------------------------------------------------ value checks
# Each takes the value and the key path to name in its ConfigError.

def _key(path: str, k: Any) -> str:
    return f"{path}.{k}" if path else str(k)


def check_keys(d: Any, allowed: Iterable[str], path: str) -> Mapping[str, Any]:
    """``d`` as a mapping (None: empty) whose keys are all in ``allowed``."""
    if d is None:
        return {}
    if not isinstance(d, Mapping):
        raise ConfigError(path or "<root>", f"expected a mapping, got {type(d).__name__}")
    allowed = set(allowed)
    for k in d:
        if k not in allowed:
            raise ConfigError(_key(path, k), f"unknown key (allowed: {', '.join(sorted(allowed))})")
    return d


def positive_duration(v: Any, path: str) -> int:
    ms = parse_duration(v, path)
    if ms <= 0:
        raise ConfigError(path, "must be positive")
    return ms


def integer(v: Any, path: str, lo: int = 1, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(path, f"expected an integer, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        raise ConfigError(path, f"must be in [{lo}, {hi if hi is not None else 'inf'}], got {v}")
    return v


def finite(v: Any, path: str, lo: float | None = None, hi: float | None = None) -> float:
    """A finite number in the closed range [lo, hi] (either end may be open-ended: None)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(path, f"expected a finite number, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ConfigError(path, f"must be in [{lo}, {hi}], got {v!r}")
    return float(v)


def text(v: Any, path: str) -> str:
    """A non-empty string."""
    if not isinstance(v, str) or not v:
        raise ConfigError(path, f"expected a non-empty string, got {v!r}")
    return v


def non_empty(v: Any, path: str, what: str) -> list:
    """A non-empty list (else ``what`` is the reason)."""
    if not isinstance(v, list) or not v:
        raise ConfigError(path, what)
    return v


def object_name(v: Any, path: str) -> str:
    """A detector / input-drift name ([A-Za-z_][A-Za-z0-9_]*)."""
    if not isinstance(v, str) or not v.replace("_", "a").isalnum() or v[0].isdigit():
        raise ConfigError(path, f"expected a name ([A-Za-z_][A-Za-z0-9_]*), got {v!r}")
    return v


def window_name(v: Any, path: str) -> str:
    """A window name; an integer (YAML ``window: 10``) is read as its text."""
    if isinstance(v, int) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, str) or not v:
        raise ConfigError(path, "missing (a window name such as '10s')")
    return v


def label_map(v: Any, path: str, names: bool = True) -> tuple[tuple[str, str], ...]:
    """A mapping of strings (integers are read as text) as pairs; with ``names`` the keys
    are label names and not reserved ones."""
    if v is None:
        return ()
    if not isinstance(v, Mapping):
        raise ConfigError(path, f"expected a mapping of strings, got {type(v).__name__}")
    out = []
    for k, x in v.items():
        if not isinstance(k, str) or (names and not NAME.match(k)):
            raise ConfigError(_key(path, k), "not a valid label name ([A-Za-z_][A-Za-z0-9_]*)")
        if names and k in ("window", "metric", "alertname", "severity"):
            raise ConfigError(_key(path, k), f"{k!r} is reserved")
        if isinstance(x, bool) or not isinstance(x, (str, int)):
            raise ConfigError(_key(path, k), f"expected a string, got {x!r}")
        out.append((k, str(x)))
    return tuple(out)


# ------------------------------------------------------------------ pydantic glue
class _Missing:
    """The default of a key that was not given (distinct from an explicit null)."""

    _inst = None

    def __new__(cls):
        if cls._inst is None:
            cls._inst = super().__new__(cls)
        return cls._inst

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Any = _Missing()

_KIND = "kpistream_config"
_INDEX = re.compile(r"^\[\d+\]")


def join_path(base: str, sub: str) -> str:
    """``windows[0]`` + ``size`` -> ``windows[0].size``; ``rules`` + ``[1]`` -> ``rules[1]``."""
    if not base:
        return sub
    if not sub:
        return base
    return base + sub if _INDEX.match(sub) else f"{base}.{sub}"


def _parent(path: str) -> str:
    cut = max(path.rfind("."), path.rfind("["))
    return path[:cut] if cut > 0 else ""


class SiblingError(ConfigError):
    """A ConfigError about a sibling of the field being validated (its path is relative to
    the field's parent): a check that needs a later field's value, reported where it was."""


def _loc_path(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        out = join_path(out, f"[{part}]" if isinstance(part, int) else str(part))
    return out


def spec_error(e: ConfigError, at: str = "") -> PydanticCustomError:
    """A ConfigError raised inside a validator (its path relative to the value validated,
    below ``at``) as the pydantic error that :func:`parse` turns back into a ConfigError."""
    return PydanticCustomError(_KIND, "{path}: {reason}",
                               {"path": join_path(at, e.path), "reason": e.reason,
                                "sibling": isinstance(e, SiblingError)})


def _relay(fn: Callable[..., Any], v: Any, info: Any, with_context: bool = False) -> Any:
    data = info.data if info is not None and info.data is not None else {}
    try:
        if with_context:
            return fn(v, data, info.context if info is not None else None)
        return fn(v, data)
    except ConfigError as e:
        raise spec_error(e) from None


def check(fn: Callable[[Any, Mapping[str, Any]], Any]) -> PlainValidator:
    """A field validator from ``fn(value, data)``: ``data`` holds the fields validated before
    this one (a field that failed is absent from it), a key that was not given arrives as
    :data:`MISSING`, and a ConfigError's path is relative to the field (``""``: the field)."""
    return PlainValidator(lambda v, info: _relay(fn, v, info))


def validated(data: Mapping[str, Any], *keys: str) -> bool:
    """Whether every one of ``keys`` was validated (and given): a validator that depends on
    another field skips its checks when that field failed (its error comes first)."""
    return all(data.get(k, MISSING) is not MISSING for k in keys)


def optional(fn: Callable[..., Any], *args: Any, **kw: Any) -> PlainValidator:
    """A field checked by ``fn(value, path, *args, **kw)`` when its key is given (else it
    stays :data:`MISSING`)."""
    return check(lambda v, data: v if v is MISSING else fn(v, "", *args, **kw))


def default(value: Any, fn: Callable[..., Any], *args: Any, **kw: Any) -> PlainValidator:
    """A field checked by ``fn(value, path, *args, **kw)``; when its key is not given, the
    default ``value`` is (so a default goes through the same check)."""
    return check(lambda v, data: fn(value if v is MISSING else v, "", *args, **kw))


def check_ctx(fn: Callable[[Any, Mapping[str, Any], Any], Any]) -> PlainValidator:
    """Like :func:`check`, for ``fn(value, data, context)`` (the context given to
    :func:`parse`)."""
    return PlainValidator(lambda v, info: _relay(fn, v, info, True))


def _first_error(e: ValidationError) -> ConfigError:
    """The first error of a validation as a ConfigError; its path is relative to the
    validated value (``""``: the value itself)."""
    err = e.errors(include_url=False)[0]
    base = _loc_path(err["loc"])
    if err["type"] == _KIND:
        ctx = err["ctx"]
        return ConfigError(join_path(_parent(base) if ctx["sibling"] else base, ctx["path"]),
                           ctx["reason"])
    return ConfigError(base, err["msg"])


M = TypeVar("M", bound="Spec")


def parse(model: type[M], raw: Any, context: Any = None) -> M:
    """A whole file (``raw``: its parsed content) validated as ``model``; the first error is
    raised as a ConfigError naming the full key path (``<root>``: the file itself)."""
    try:
        return model.model_validate(raw, context=context)
    except ValidationError as e:
        err = _first_error(e)
        raise ConfigError(err.path or "<root>", err.reason) from None


def sub(model: type[M], raw: Any, path: str = "", context: Any = None) -> M:
    """A part of a file validated as ``model`` inside a validator: the first error is raised
    as a ConfigError whose path is relative (``path`` + the key path inside ``raw``)."""
    try:
        return model.model_validate(raw, context=context)
    except ValidationError as e:
        err = _first_error(e)
        raise ConfigError(join_path(path, err.path), err.reason) from None


def items(model: type[M], v: Any, context: Any = None) -> tuple[M, ...]:
    """Each element of the list ``v`` validated as ``model`` (inside a validator: the first
    bad element raises, its path relative to the list, ``[i].key``)."""
    return tuple(sub(model, x, f"[{i}]", context) for i, x in enumerate(v))


class Spec(BaseModel):
    """Base of the config models: unknown keys are refused before any value is looked at
    (naming them and the allowed keys), a null section reads as an empty one, every default
    goes through its field's validator, and instances are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True,
                              arbitrary_types_allowed=True)

    #: Keys accepted at this level but validated elsewhere (another spec's sections).
    other_keys: ClassVar[frozenset[str]] = frozenset()
    #: Keys that must be given, checked in this order right after the unknown keys.
    required: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, raw: Any) -> Any:
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise spec_error(ConfigError("", f"expected a mapping, got {type(raw).__name__}"))
        allowed = {f.alias or n for n, f in cls.model_fields.items()} | set(cls.other_keys)
        try:
            check_keys(raw, allowed, "")
        except ConfigError as e:
            raise spec_error(e) from None
        for k in cls.required:
            if k not in raw:
                raise spec_error(ConfigError(k, "missing"))
        return {k: v for k, v in raw.items() if k not in cls.other_keys}

    def given(self) -> dict[str, Any]:
        """The fields whose keys were given (not :data:`MISSING`), by field name."""
        return {k: getattr(self, k) for k in type(self).model_fields
                if getattr(self, k) is not MISSING}
