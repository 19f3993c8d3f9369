"""The ``redis:`` config section: absent or empty means no Redis; every mistake is named precisely,
before anything tries to connect; `config check` shows it with the password masked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from apibox.cli.main import app as cli_app
from apibox.config import RedisSettings, load_settings, parse_settings
from apibox.errors import ConfigError
from tests.test_config import BASE


def settings_with(section: str, env: dict[str, str] | None = None) -> RedisSettings | None:
    return parse_settings(BASE + section, source="cfg.yaml", env=env or {}).redis


def test_no_section_means_no_redis() -> None:
    assert parse_settings(BASE, env={}).redis is None


def test_a_full_section() -> None:
    assert settings_with("redis: {url: 'redis://:pw@10.0.0.5:6380/2', prefix: shop-eu, timeout: 0.5}") == \
        RedisSettings(url="redis://:pw@10.0.0.5:6380/2", prefix="shop-eu", timeout=0.5)


def test_the_defaults() -> None:
    assert settings_with("redis: {url: redis://127.0.0.1:6379/0}") == \
        RedisSettings(url="redis://127.0.0.1:6379/0", prefix="apibox", timeout=0.25)


@pytest.mark.parametrize("url", ["rediss://user:pw@redis.example.com:6380/0", "redis://localhost",
                                 "unix:///run/redis/redis.sock", "redis://[::1]:6379/0"])
def test_every_kind_of_url(url: str) -> None:
    assert settings_with(f"redis: {{url: '{url}'}}") == RedisSettings(url=url)


@pytest.mark.parametrize("section", ["redis:", "redis: {}", "redis: {url: ''}", "redis: {url: '${REDIS_URL:-}'}"])
def test_an_empty_section_or_url_turns_redis_off(section: str) -> None:
    assert settings_with(section) is None


def test_the_url_may_come_from_the_environment() -> None:
    assert settings_with("redis: {url: '${REDIS_URL}'}", env={"REDIS_URL": "redis://r:6379/1"}) == \
        RedisSettings(url="redis://r:6379/1")


BAD = [
    ("redis: {prefix: x}", "redis", "missing key 'url'"),
    ("redis: {url: redis://h, port: 6379}", "redis", "unknown key 'port' (allowed: url, prefix, timeout)"),
    ("redis: redis://h:6379", "redis", "must be a mapping"),
    ("redis: {url: 'http://h:6379'}", "redis.url", "must start with redis://, rediss:// or unix://"),
    ("redis: {url: [1]}", "redis.url", "must be a string"),
    ("redis: {url: 'redis://h:port/0'}", "redis.url", "the port must be a number"),
    ("redis: {url: 'redis://h:70000/0'}", "redis.url", "the port must be a number"),
    ("redis: {url: 'redis:///0'}", "redis.url", "needs a host"),
    ("redis: {url: 'redis://h:6379/cache'}", "redis.url", "the database after the host must be a number"),
    ("redis: {url: 'unix://'}", "redis.url", "needs the socket's path"),
    ("redis: {url: redis://h, prefix: 'my app'}", "redis.prefix", "must be 1-64 letters"),
    ("redis: {url: redis://h, prefix: ''}", "redis.prefix", "must not be empty"),
    ("redis: {url: redis://h, timeout: 0}", "redis.timeout", "must be greater than 0"),
    ("redis: {url: redis://h, timeout: fast}", "redis.timeout", "must be a number"),
    ("redis: {url: redis://h, timeout: 30}", "redis.timeout", "must be at most 10 seconds"),
]


@pytest.mark.parametrize(("section", "where", "problem"), BAD, ids=[f"{c[1]}: {c[2]}" for c in BAD])
def test_mistakes_name_the_file_the_key_and_the_problem(section: str, where: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_with(section)
    assert info.value.message.startswith(f"cfg.yaml: {where}: "), info.value.message
    assert problem in info.value.message


def test_a_password_never_shows_in_an_error() -> None:
    with pytest.raises(ConfigError) as info:
        settings_with("redis: {url: 'http://:hunter2@h:6379/x'}")
    assert "hunter2" not in info.value.message and "****" in info.value.message
    with pytest.raises(ConfigError) as info:
        settings_with("redis: {url: 'redis://:hunter2@h:port/0'}")
    assert "hunter2" not in info.value.message


@pytest.mark.parametrize("as_json", [True, False])
def test_config_check_shows_redis_with_the_password_masked(tmp_path: Path, as_json: bool) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(BASE + "redis: {url: 'redis://:hunter2@10.0.0.5:6379/0', prefix: eu}\n")
    assert load_settings(str(path), env={}).redis is not None
    result = CliRunner().invoke(cli_app, ["config", "check", "--config", str(path), *(["--json"] if as_json else [])])
    assert result.exit_code == 0, result.output
    assert "hunter2" not in result.output
    if as_json:
        assert json.loads(result.output)["redis"] == {"url": "redis://:****@10.0.0.5:6379/0", "prefix": "eu",
                                                      "timeout": 0.25}
    else:
        assert "redis: redis://:****@10.0.0.5:6379/0 (prefix eu, timeout 0.25 s)" in result.output


def test_config_check_without_redis_says_none(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(BASE)
    result = CliRunner().invoke(cli_app, ["config", "check", "--config", str(path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["redis"] is None
    assert "redis: none" in CliRunner().invoke(cli_app, ["config", "check", "--config", str(path)]).output
