"""Typed configuration: one YAML file, environment overrides, secrets from env or files.

Config classes are frozen dataclasses. :func:`build` walks their type hints, so a
typo is an error (``unknown key 'bootsrap_servers' at kafka``), never a silent default.

Environment overrides use ``EXCHANGE_CONNECTORS__<SECTION>__<KEY>=value`` (values are
parsed as YAML scalars/lists), plus the common ``KAFKA_BOOTSTRAP_SERVERS``.

Error messages quote at most :data:`EXCERPT_CHARS` characters of an offending value
(:func:`excerpt`), and never any part of a :class:`Secret` field's value, whatever its
type: a config error is logged, and logs are read by more people than the secrets' owner.
YAML aliases are allowed, but the whole document, once aliases are expanded, may hold
at most :data:`MAX_VALUES` values: a "billion laughs" file is refused in milliseconds
instead of being walked (or printed) in full.
"""

from __future__ import annotations

import dataclasses
import math
import os
import reprlib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from connectors.runtime.errors import ConfigError

ENV_PREFIX = "EXCHANGE_CONNECTORS__"

T = TypeVar("T")

#: The longest excerpt of an offending value an error message shows.
EXCERPT_CHARS = 80
#: Values (scalars, lists, mappings) a whole config may hold once YAML aliases are
#: expanded. A real config holds a few hundred; far more means an alias bomb.
MAX_VALUES = 100_000

_repr = reprlib.Repr()
_repr.maxlevel = 3
_repr.maxstring = EXCERPT_CHARS
_repr.maxother = EXCERPT_CHARS
_repr.maxlong = 40
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 5


def excerpt(value: Any) -> str:
    """``repr(value)`` cut to :data:`EXCERPT_CHARS`, in bounded work (a huge or deeply
    nested value is never formatted in full)."""
    text = _repr.repr(value)
    if len(text) > EXCERPT_CHARS:
        text = text[: EXCERPT_CHARS - 3] + "..."
    return text


def positive(where: str, value: float, unit: str = "seconds") -> None:
    """Refuse a duration or count that cannot work unless it is above zero."""
    if not value > 0:
        raise ConfigError(f"{where} must be a positive number of {unit} (got {excerpt(value)})")


def _check_size(data: Any, what: str) -> None:
    """Refuse a document that expands (through YAML aliases) beyond :data:`MAX_VALUES`.

    Counts every value as the config would be walked, stopping at the limit, so the
    cost is bounded whatever the aliases expand to (recursive aliases included).
    """
    stack = [data]
    seen = 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise ConfigError(
                f"{what} holds more than {MAX_VALUES} values once YAML aliases are expanded "
                "(an alias bomb?); write it without aliases"
            )
        if isinstance(node, Mapping):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)


def _yaml_problem(exc: BaseException) -> str:
    """What is wrong and where, without PyYAML's quote of the line (it may hold a secret)."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"{exc.problem} (line {mark.line + 1}, column {mark.column + 1})"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc)[:EXCERPT_CHARS] or type(exc).__name__


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"


def _holds_secret(tp: Any) -> bool:
    return tp is Secret or any(_holds_secret(arg) for arg in get_args(tp))


class Secret:
    """A string that never shows itself in ``repr``, ``str`` or logs.

    Call :meth:`reveal` at the single place the value is needed (signing a request).
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))


def read_secret(
    *, value: str | None, file: str | None, env: str, what: str, required: bool = True
) -> Secret | None:
    """Resolve a secret from (in order) the environment, a mounted file, the config.

    Mounted files (Kubernetes secrets) are stripped of surrounding whitespace.
    """
    from_env = os.environ.get(env)
    if from_env:
        return Secret(from_env.strip())
    if file:
        try:
            return Secret(Path(file).read_text(encoding="utf-8").strip())
        except OSError as exc:
            raise ConfigError(f"{what}: cannot read secret file {file!r}: {exc.strerror}") from None
    if value:
        return Secret(value)
    if required:
        raise ConfigError(f"{what} is required: set ${env} or the {what}_file option")
    return None


def read_secrets(
    section: Any, what: str, envs: Mapping[str, str], required: bool = True
) -> list[Secret | None]:
    """:func:`read_secret` for each ``name -> env`` of a credentials section whose
    fields are ``<name>`` (a Secret) and ``<name>_file`` (a mounted file's path)."""
    out = []
    for name, env in envs.items():
        value: Secret | None = getattr(section, name)
        out.append(
            read_secret(
                value=value.reveal() if value else None,
                file=getattr(section, f"{name}_file"),
                env=env,
                what=f"{what}.{name}",
                required=required,
            )
        )
    return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if _holds_secret(tp) and not isinstance(value, str | Secret) and value is not None:
        # Never a word of the value: a number or a list given here is still the secret.
        raise ConfigError(
            f"{where}: expected a string (quote it), got {_kind(value)}; "
            "the value is a secret and is not shown"
        )
    if origin in (Union, types.UnionType):
        errors = []
        for option in get_args(tp):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(option, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {excerpt(value)} is none of {_type_name(tp)}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        allowed = ", ".join(repr(a) for a in get_args(tp))
        raise ConfigError(f"{where}: {excerpt(value)} is not one of {allowed}")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        key_tp, val_tp = get_args(tp) or (str, Any)
        return {
            _coerce(key_tp, k, f"{where}"): _coerce(val_tp, v, f"{where}.{k}")
            for k, v in value.items()
        }
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {excerpt(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {excerpt(value)}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{where}: expected a finite number, got {excerpt(value)}")
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {excerpt(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {type(value).__name__}")
    if tp is Secret:
        if isinstance(value, Secret):
            return value
        if isinstance(value, str):
            return Secret(value)
        raise ConfigError(f"{where}: expected a string")
    raise ConfigError(f"{where}: unsupported config type {_type_name(tp)}")  # pragma: no cover


def build(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass ``cls`` from plain data, rejecting unknown keys and bad types."""
    label = where or "config"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{label}: expected a mapping, got {type(data).__name__}")
    assert dataclasses.is_dataclass(cls)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted((set(data) - set(fields)), key=str)
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"{label}: unknown key {excerpt(unknown[0])} (known: {known})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}" if where else name)
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{label}: {exc}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Turn ``EXCHANGE_CONNECTORS__A__B=v`` into ``{"a": {"b": v}}`` (YAML-parsed value)."""
    tree: dict[str, Any] = {}
    if environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        tree.setdefault("kafka", {})["bootstrap_servers"] = environ["KAFKA_BOOTSTRAP_SERVERS"]
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in key[len(ENV_PREFIX) :].split("__") if p]
        if not path:
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except (yaml.YAMLError, RecursionError, ValueError):
            value = raw
        if (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and path[-1] in ("bootstrap_servers",)
        ):
            value = raw
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"environment override {key} conflicts with another one")
        node[path[-1]] = value
    return tree


def merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def load(
    cls: type[T], path: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None
) -> T:
    """Read ``path`` (YAML), apply environment overrides and build ``cls``."""
    data: Any = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"cannot read config file {os.fspath(path)!r}: {exc.strerror}"
            ) from None
        try:
            data = yaml.safe_load(text) or {}
        except (yaml.YAMLError, RecursionError, ValueError) as exc:
            # ValueError: an integer beyond Python's digit limit; RecursionError: nesting.
            raise ConfigError(
                f"config file {os.fspath(path)!r} is not valid YAML: {_yaml_problem(exc)}"
            ) from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {os.fspath(path)!r} must hold a mapping")
        _check_size(data, f"config file {os.fspath(path)!r}")
    overrides = env_overrides(os.environ if environ is None else environ)
    _check_size(overrides, "the environment overrides")
    data = merge(data, overrides)
    return build(cls, data)
