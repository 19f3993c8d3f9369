"""A config file read as a document: YAML without duplicate keys, ``${VAR}`` interpolated, and
each value a ``Node`` that knows its key path, so that every check names where it failed
(``apibox.yaml: models[0].price.input: must be a number ...``). ``apibox.config`` turns the
nodes into settings."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml

from apibox.errors import ConfigError
from apibox.money import MoneyError, parse_usd


def read_document(text: str, source: str, env: Mapping[str, str]) -> Node:
    """The document's root node, every ``${VAR}`` replaced from ``env``; ``source`` names it in errors."""
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # safe: plain data, no Python objects
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc.message}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{source}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        data = {}
    return Node(_interpolate(data, env, source, ""), source, "")


# libyaml's parser when PyYAML was built with it (its wheels are): a config is read on every CLI
# command, and the pure-Python parser took 9 ms for a config of five providers and six models.
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _StrictLoader(_SafeLoader):
    """A safe loader that refuses a key given twice in one mapping (YAML would keep the last)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice")
        seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(value: Any, env: Mapping[str, str], source: str, path: str) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string; a missing VAR is an error."""
    if isinstance(value, str):
        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if default is not None and not env.get(name):
                return default  # as in the shell: ``:-`` covers unset and empty
            if name in env:
                return env[name]
            raise ConfigError(f"{source}: {path or '<root>'}: environment variable {name} is not set")
        whole = _VAR.fullmatch(value)
        result = _VAR.sub(substitute, value)
        if whole and value != result:
            # `port: ${PORT:-8080}` should be a number: a value that is one variable alone is
            # read as a YAML scalar (numbers, booleans), never as a structure.
            typed = yaml.load(result, Loader=_SafeLoader) if result.strip() else result
            return typed if isinstance(typed, int | float | bool) else result
        return result
    if isinstance(value, dict):
        return {k: _interpolate(v, env, source, join_path(path, str(k))) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env, source, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def join_path(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class Node:
    """A value and where it came from, so every check can name its key path."""

    def __init__(self, value: Any, source: str, path: str) -> None:
        self.value, self.source, self.path = value, source, path

    def fail(self, problem: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self.path or '<root>'}: {problem}")

    def mapping(self, allowed: tuple[str, ...]) -> dict[str, Node]:
        if self.value is None:
            return {}
        if not isinstance(self.value, dict):
            raise self.fail(f"must be a mapping, got {kind_of(self.value)}")
        unknown = [k for k in self.value if k not in allowed]
        if unknown:
            raise self.fail(f"unknown key {unknown[0]!r} (allowed: {', '.join(allowed)})")
        return {k: Node(v, self.source, join_path(self.path, k)) for k, v in self.value.items()}

    def items(self) -> list[Node]:
        if self.value is None:
            return []
        if not isinstance(self.value, list):
            raise self.fail(f"must be a list, got {kind_of(self.value)}")
        return [Node(v, self.source, f"{self.path}[{i}]") for i, v in enumerate(self.value)]

    def text(self, *, nonempty: bool = True) -> str:
        if isinstance(self.value, bool) or not isinstance(self.value, str | int | float):
            raise self.fail(f"must be a string, got {kind_of(self.value)}")
        text = str(self.value)
        if nonempty and not text.strip():
            raise self.fail("must not be empty")
        return text

    def integer(self, *, minimum: int = 0) -> int:
        if isinstance(self.value, bool) or not isinstance(self.value, int):
            raise self.fail(f"must be a whole number, got {kind_of(self.value)}")
        if self.value < minimum:
            raise self.fail(f"must be at least {minimum}, got {self.value}")
        return self.value

    def number(self, *, zero: bool = False) -> float:
        """A number greater than 0 (or, with ``zero``, 0 too)."""
        if isinstance(self.value, bool) or not isinstance(self.value, int | float):
            raise self.fail(f"must be a number, got {kind_of(self.value)}")
        if self.value < 0 or (self.value == 0 and not zero):
            raise self.fail(f"must be {'0 or more' if zero else 'greater than 0'}, got {self.value}")
        return float(self.value)

    def boolean(self) -> bool:
        if not isinstance(self.value, bool):
            raise self.fail(f"must be true or false, got {kind_of(self.value)}")
        return self.value

    def price_per_million(self) -> int:
        """USD per 1M tokens -> micro-USD per 1M tokens, exactly."""
        if isinstance(self.value, bool) or not isinstance(self.value, int | float | str):
            raise self.fail(f"must be a number of USD per 1M tokens, got {kind_of(self.value)}")
        try:
            return parse_usd(self.value, allow_zero=True)
        except MoneyError as exc:
            raise self.fail(str(exc)) from None


def kind_of(value: Any) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: f"the string {value!r}", bool: f"{value}"}.get(
        type(value), f"{value!r}")


