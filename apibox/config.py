"""Reading the configuration: YAML with ``${VAR}`` interpolation, validated into the
dataclasses of ``apibox.settings`` (re-exported here, so callers import from one place).

This is the only module that reads ``os.environ``. Every error names the file, the key path
and what is wrong, e.g. ``apibox.yaml: models[0].price.input: must be a number ...``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, date, datetime
from pathlib import Path
from urllib.parse import urlsplit

from apibox.config_document import Node, join_path, kind_of, read_document
from apibox.errors import ConfigError
from apibox.money import MoneyError, parse_usd
from apibox.pricing import MULTIPLIER_ONE, Price
from apibox.settings import (
    ACCESS_LOG_FORMATS,
    DEFAULT_BASE_URLS,
    DEFAULT_CONFIG_NAME,
    PROVIDER_TYPES,
    DatabaseSettings,
    Group,
    LimitDefaults,
    LimitSet,
    ModelSettings,
    ProviderSettings,
    RedisSettings,
    Route,
    RoutingSettings,
    ServerSettings,
    Settings,
    Timeouts,
    default_settings,
)
from apibox.timeparse import TimeParseError, parse_moment
from apibox.urls import masked, masked_url, proxy_url_problem, redis_url_problem

__all__ = [
    "ACCESS_LOG_FORMATS",
    "DEFAULT_BASE_URLS",
    "DEFAULT_CONFIG_NAME",
    "PROVIDER_TYPES",
    "DatabaseSettings",
    "Group",
    "LimitDefaults",
    "LimitSet",
    "ModelSettings",
    "ProviderSettings",
    "RedisSettings",
    "Route",
    "RoutingSettings",
    "ServerSettings",
    "Settings",
    "Timeouts",
    "default_settings",
    "load_settings",
    "masked",
    "masked_url",
    "parse_settings",
    "resolve_config_path",
]


def resolve_config_path(explicit: str | None, env: Mapping[str, str] | None = None,
                        cwd: Path | None = None) -> Path | None:
    """``--config``, else ``$APIBOX_CONFIG``, else ``./apibox.yaml``, else None (defaults)."""
    env = os.environ if env is None else env
    if explicit:
        return Path(explicit)
    if env.get("APIBOX_CONFIG"):
        return Path(env["APIBOX_CONFIG"])
    candidate = (cwd or Path.cwd()) / DEFAULT_CONFIG_NAME
    return candidate if candidate.exists() else None


def load_settings(explicit: str | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Find, read, interpolate and validate the configuration."""
    env = os.environ if env is None else env
    path = resolve_config_path(explicit, env)
    if path is None:
        return default_settings()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x}); "
                          "save the file as UTF-8") from None
    return parse_settings(text, source=str(path), env=env)


def parse_settings(text: str, *, source: str = "<config>", env: Mapping[str, str] | None = None) -> Settings:
    return _Parser(read_document(text, source, os.environ if env is None else env)).settings()


ORIGIN = re.compile(r"https?://[A-Za-z0-9.\-\[\]:]+")


def _hour_writes(price: Price) -> Price:
    """A price for a model Anthropic serves: cache writes kept an hour at twice the input rate,
    Anthropic's, unless the config sets ``cache_write_1h`` (holds then count them too)."""
    return price if price.cache_write_1h is not None else replace(price, cache_write_1h=2 * price.input)


class _Parser:
    def __init__(self, root: Node) -> None:
        self.root = root

    def settings(self) -> Settings:
        top = self.root.mapping(("server", "database", "providers", "models", "limits", "routing", "groups",
                                 "redis"))
        providers = tuple(self.provider(n) for n in top["providers"].items()) if "providers" in top else ()
        names = [p.name for p in providers]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise top["providers"].items()[i].fail(f"provider name {name!r} is used twice")
        kinds = {p.name: p.type for p in providers}
        models = tuple(self.model(n, kinds) for n in top["models"].items()) if "models" in top else ()
        self.check_model_names(models, top.get("models"))
        return Settings(
            server=self.server(top["server"]) if "server" in top else ServerSettings(),
            database=self.database(top["database"]) if "database" in top else DatabaseSettings(),
            providers=providers,
            models=models,
            limits=self.limits(top["limits"]) if "limits" in top else LimitDefaults(),
            routing=self.routing(top["routing"]) if "routing" in top else RoutingSettings(),
            groups=self.groups(top["groups"], {m.name for m in models}) if "groups" in top else {},
            redis=self.redis(top["redis"]) if "redis" in top else None,
            source=self.root.source,
        )

    def server(self, node: Node) -> ServerSettings:
        fields = node.mapping(("host", "port", "admin_key", "max_body_mb", "trusted_proxies",
                               "failed_auth_per_minute", "max_in_flight", "access_log", "cors_origins",
                               "stream_keepalive_seconds", "shutdown_seconds"))
        port = fields["port"].integer(minimum=0) if "port" in fields else 8080
        if port > 65535:
            raise fields["port"].fail(f"must be a TCP port (0-65535), got {port}")
        admin_key = fields["admin_key"].text(nonempty=False) if "admin_key" in fields else None
        return ServerSettings(
            host=fields["host"].text() if "host" in fields else "127.0.0.1",
            port=port,
            admin_key=admin_key or None,
            max_body_mb=fields["max_body_mb"].number() if "max_body_mb" in fields else 20.0,
            trusted_proxies=tuple(self.cidr(n) for n in fields["trusted_proxies"].items())
            if "trusted_proxies" in fields else (),
            failed_auth_per_minute=fields["failed_auth_per_minute"].integer(minimum=1)
            if "failed_auth_per_minute" in fields else 30,
            max_in_flight=fields["max_in_flight"].integer(minimum=1) if "max_in_flight" in fields else 4096,
            access_log=self.access_log(fields["access_log"]) if "access_log" in fields else "none",
            cors_origins=tuple(self.origin(n) for n in fields["cors_origins"].items())
            if "cors_origins" in fields else ("*",),
            stream_keepalive_seconds=fields["stream_keepalive_seconds"].number(zero=True)
            if "stream_keepalive_seconds" in fields else 15.0,
            shutdown_seconds=fields["shutdown_seconds"].number() if "shutdown_seconds" in fields else 30.0,
        )

    @staticmethod
    def origin(node: Node) -> str:
        """A web page's origin as browsers send it (scheme://host[:port], nothing after), or "*"."""
        text = node.text().rstrip("/")
        if text != "*" and not ORIGIN.fullmatch(text):
            raise node.fail(f"must be \"*\" or an origin such as https://app.example.com (scheme, host and "
                            f"port; no path), got {text!r}")
        return text

    @staticmethod
    def access_log(node: Node) -> str:
        value = "none" if node.value is None or node.value is False else node.text()
        if value not in ACCESS_LOG_FORMATS:
            raise node.fail(f"must be one of {', '.join(ACCESS_LOG_FORMATS)}, got {value!r}")
        return value

    @staticmethod
    def cidr(node: Node) -> str:
        text = node.text()
        try:
            ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise node.fail(f"{text!r} is not an IP address or CIDR range") from None
        return text

    def database(self, node: Node) -> DatabaseSettings:
        fields = node.mapping(("url", "pool_size"))
        defaults = DatabaseSettings()
        url = fields["url"].text() if "url" in fields else defaults.url
        if not url.startswith(("sqlite://", "postgresql://", "postgres://")):
            raise fields["url"].fail(f"must start with sqlite:/// or postgresql://, got {url!r}")
        pool_size = fields["pool_size"].integer(minimum=1) if "pool_size" in fields else defaults.pool_size
        return DatabaseSettings(url=url, pool_size=pool_size)

    REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
    REDIS_PREFIX = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")

    def redis(self, node: Node) -> RedisSettings | None:
        """The ``redis:`` section; empty, or with an empty url, it is off (as when absent)."""
        fields = node.mapping(("url", "prefix", "timeout"))
        if not fields:
            return None
        if "url" not in fields:
            raise node.fail("missing key 'url' (e.g. redis://127.0.0.1:6379/0)")
        url = fields["url"].text(nonempty=False).strip()
        if not url:
            return None
        if not url.startswith(self.REDIS_SCHEMES):
            raise fields["url"].fail(f"must start with redis://, rediss:// or unix://, got {masked_url(url)!r}")
        problem = redis_url_problem(url)
        if problem:
            raise fields["url"].fail(f"{problem}, got {masked_url(url)!r}")
        defaults = RedisSettings(url=url)
        prefix = fields["prefix"].text() if "prefix" in fields else defaults.prefix
        if not self.REDIS_PREFIX.match(prefix):
            raise fields["prefix"].fail(f"must be 1-64 letters, digits, '.', '_', ':' or '-', got {prefix!r}")
        timeout = fields["timeout"].number() if "timeout" in fields else defaults.timeout
        if timeout > 10:
            raise fields["timeout"].fail(f"must be at most 10 seconds (a request may wait that long), got {timeout}")
        return RedisSettings(url=url, prefix=prefix, timeout=timeout)

    def provider(self, node: Node) -> ProviderSettings:
        fields = node.mapping(("name", "type", "base_url", "api_key", "headers", "timeouts", "stream_usage",
                               "proxy", "max_tokens_field"))
        for required in ("name", "type"):
            if required not in fields:
                raise node.fail(f"missing key {required!r}")
        kind = fields["type"].text()
        if kind not in PROVIDER_TYPES:
            raise fields["type"].fail(f"unknown provider type {kind!r} (known: {', '.join(PROVIDER_TYPES)})")
        base_url = fields["base_url"].text() if "base_url" in fields else DEFAULT_BASE_URLS.get(kind, "")
        if kind == "openai" and not base_url:
            raise node.fail("missing key 'base_url' (an OpenAI-compatible provider needs its URL)")
        if base_url and not base_url.startswith(("http://", "https://")):
            raise fields["base_url"].fail(f"must be an http:// or https:// URL, got {base_url!r}")
        headers = {}
        if "headers" in fields:
            raw = fields["headers"].value
            if not isinstance(raw, dict):
                raise fields["headers"].fail("must be a mapping of header names to values")
            for name, value in raw.items():
                if not isinstance(value, str | int | float) or isinstance(value, bool):
                    raise fields["headers"].fail(f"header {name!r} must have a text value, got {kind_of(value)}")
            headers = {str(k): str(v) for k, v in raw.items()}
        return ProviderSettings(
            name=fields["name"].text(),
            type=kind,
            base_url=base_url.rstrip("/"),
            api_key=(fields["api_key"].text(nonempty=False) or None) if "api_key" in fields else None,
            headers=headers,
            timeouts=self.timeouts(fields["timeouts"]) if "timeouts" in fields else Timeouts(),
            stream_usage=fields["stream_usage"].boolean() if "stream_usage" in fields else True,
            proxy=self.proxy(fields["proxy"]) if "proxy" in fields else None,
            max_tokens_field=self.max_tokens_field(kind, fields.get("max_tokens_field"), base_url),
        )

    MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens")
    # Hosts whose chat API refuses max_tokens for reasoning models (o-series, gpt-5): OpenAI's (api.,
    # eu., us.) and Azure OpenAI's (*.openai.azure.com, *.cognitiveservices.azure.com); not Azure AI
    # model inference (*.services.ai.azure.com, *.inference.ai.azure.com), whose Llama, Mistral and
    # Phi take max_tokens. Elsewhere, a refusal of max_tokens that names the other field teaches the
    # provider that one for the model (providers/openai.py).
    COMPLETION_TOKENS_HOSTS = re.compile(r"(^|\.)openai\.com$|\.(openai|cognitiveservices)\.azure\.com$")

    @classmethod
    def max_tokens_field(cls, kind: str, node: Node | None, base_url: str) -> str:
        """The chat length-limit field to send: as configured, else by the upstream's host."""
        if node is not None:
            if kind != "openai":
                raise node.fail(f"applies to type openai only (a {kind} upstream's field is fixed)")
            chosen = node.text()
            if chosen not in cls.MAX_TOKENS_FIELDS:
                raise node.fail(f"must be max_tokens or max_completion_tokens, got {chosen!r}")
            return chosen
        host = (urlsplit(base_url).hostname or "").lower()
        return "max_completion_tokens" if cls.COMPLETION_TOKENS_HOSTS.search(host) else "max_tokens"

    @staticmethod
    def proxy(node: Node) -> str | None:
        """An HTTP proxy's URL (empty: none); a refusal shows it with its password masked."""
        text = node.text(nonempty=False)
        if not text:
            return None
        problem = proxy_url_problem(text)
        if problem is not None:
            raise node.fail(f"{problem}, got {masked_url(text)!r}")
        return text

    def timeouts(self, node: Node) -> Timeouts:
        fields = node.mapping(("connect", "first_byte", "idle"))
        defaults = Timeouts()
        return Timeouts(**{name: fields[name].number() if name in fields else getattr(defaults, name)
                           for name in ("connect", "first_byte", "idle")})

    def model(self, node: Node, providers: Mapping[str, str]) -> ModelSettings:
        """A model; ``providers`` maps each provider's name to its type."""
        fields = node.mapping(("name", "routes", "price", "max_output_tokens", "aliases", "kind", "price_schedule"))
        for required in ("name", "routes", "price"):
            if required not in fields:
                raise node.fail(f"missing key {required!r}")
        name = fields["name"].text()
        routes = tuple(self.route(r, providers, name) for r in fields["routes"].items())
        if not routes:
            raise fields["routes"].fail("must list at least one route")
        kind = fields["kind"].text() if "kind" in fields else "chat"
        if kind not in ("chat", "embedding"):
            raise fields["kind"].fail(f"must be 'chat' or 'embedding', got {kind!r}")
        aliases = tuple(a.text() for a in fields["aliases"].items()) if "aliases" in fields else ()
        price = self.price(fields["price"])
        schedule = self.schedule(fields["price_schedule"], price) if "price_schedule" in fields else ()
        if any(providers[route.provider] == "anthropic" for route in routes):
            price, schedule = _hour_writes(price), tuple((starts, _hour_writes(p)) for starts, p in schedule)
        return ModelSettings(
            name=name,
            routes=routes,
            price=price,
            schedule=schedule,
            max_output_tokens=fields["max_output_tokens"].integer(minimum=1)
            if "max_output_tokens" in fields else 4096,
            aliases=aliases,
            kind=kind,
        )

    def route(self, node: Node, providers: Mapping[str, str], model_name: str) -> Route:
        fields = node.mapping(("provider", "model", "weight", "priority"))
        if "provider" not in fields:
            raise node.fail("missing key 'provider'")
        provider = fields["provider"].text()
        if provider not in providers:
            known = ", ".join(sorted(providers)) or "none defined"
            raise fields["provider"].fail(f"unknown provider {provider!r} (providers: {known})")
        return Route(
            provider=provider,
            model=fields["model"].text() if "model" in fields else model_name,
            weight=fields["weight"].integer(minimum=0) if "weight" in fields else 1,
            priority=fields["priority"].integer(minimum=0) if "priority" in fields else 1,
        )

    PRICE_KEYS = ("input", "output", "cached_input", "cache_write", "cache_write_1h", "reasoning", "per_request")

    def price(self, node: Node, previous: Price | None = None) -> Price:
        """A price; in a schedule entry, keys it leaves out keep the previous price's values."""
        fields = node.mapping((*self.PRICE_KEYS, "effective_from") if previous else self.PRICE_KEYS)
        if previous is None:
            for required in ("input", "output"):
                if required not in fields:
                    raise node.fail(f"missing key {required!r} (USD per 1M tokens)")
        values = {k: fields[k].price_per_million() for k in self.PRICE_KEYS if k in fields}
        if previous is not None:
            return replace(previous, **values)
        return Price(**values)

    def schedule(self, node: Node, base: Price) -> tuple[tuple[datetime, Price], ...]:
        entries: list[tuple[datetime, Price]] = []
        previous = base
        for item in node.items():
            fields = item.mapping((*self.PRICE_KEYS, "effective_from"))
            if "effective_from" not in fields:
                raise item.fail("missing key 'effective_from' (a UTC date-time like 2026-12-01T00:00:00Z)")
            starts = self.moment(fields["effective_from"])
            if entries and starts <= entries[-1][0]:
                raise fields["effective_from"].fail("entries must be in time order, each later than the one before")
            previous = self.price(item, previous)
            entries.append((starts, previous))
        return tuple(entries)

    @staticmethod
    def moment(node: Node) -> datetime:
        value = node.value
        if isinstance(value, datetime):  # YAML reads unquoted timestamps and dates itself
            return value if value.tzinfo else value.replace(tzinfo=UTC)
        if isinstance(value, date):
            return datetime(value.year, value.month, value.day, tzinfo=UTC)
        try:
            return parse_moment(node.text())
        except TimeParseError as exc:
            raise node.fail(str(exc)) from None

    def groups(self, node: Node, models: set[str]) -> dict[str, Group]:
        groups: dict[str, Group] = {}
        raw = node.value or {}
        if not isinstance(raw, dict):
            raise node.fail("must be a mapping of group names to {multiplier, models}")
        for name in raw:
            item = Node(raw[name], node.source, join_path(node.path, str(name)))
            fields = item.mapping(("multiplier", "models"))
            multiplier = MULTIPLIER_ONE
            if "multiplier" in fields:
                try:
                    multiplier = parse_usd(fields["multiplier"].value, allow_zero=True)  # 6 decimals, exact
                except MoneyError:
                    raise fields["multiplier"].fail("must be a number like 0.8 (at most 6 decimals)") from None
            allowed = tuple(m.text() for m in fields["models"].items()) if "models" in fields else ()
            unknown = [m for m in allowed if m not in models]
            if unknown:
                raise fields["models"].fail(f"unknown model {unknown[0]!r}")
            groups[str(name)] = Group(multiplier=multiplier, models=allowed)
        return groups

    def routing(self, node: Node) -> RoutingSettings:
        fields = node.mapping(("failures_before_cooldown", "cooldown_seconds"))
        defaults = RoutingSettings()
        return RoutingSettings(
            failures_before_cooldown=fields["failures_before_cooldown"].integer(minimum=1)
            if "failures_before_cooldown" in fields else defaults.failures_before_cooldown,
            cooldown_seconds=fields["cooldown_seconds"].number()
            if "cooldown_seconds" in fields else defaults.cooldown_seconds)

    def limits(self, node: Node) -> LimitDefaults:
        fields = node.mapping(("key", "user"))
        return LimitDefaults(**{k: self.limit_set(fields[k]) if k in fields else LimitSet() for k in ("key", "user")})

    def limit_set(self, node: Node) -> LimitSet:
        fields = node.mapping(("rpm", "tpm", "concurrency"))
        return LimitSet(**{k: fields[k].integer(minimum=1) if k in fields else None
                           for k in ("rpm", "tpm", "concurrency")})

    @staticmethod
    def check_model_names(models: tuple[ModelSettings, ...], node: Node | None) -> None:
        seen: set[str] = set()
        for i, model in enumerate(models):
            for name in (model.name, *model.aliases):
                if name in seen:
                    assert node is not None
                    raise node.items()[i].fail(f"model name or alias {name!r} is used twice")
                seen.add(name)
