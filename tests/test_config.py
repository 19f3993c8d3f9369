"""The config loader and `apibox config check`.

YAML with ``${VAR}`` / ``${VAR:-default}``, validation errors that name the file, the key path
and the problem, the resolution order, and secrets that never reach the output.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from apibox.cli.main import app as cli_app
from apibox.config import default_settings, load_settings, parse_settings, resolve_config_path
from apibox.errors import ConfigError
from apibox.settings import DatabaseSettings, ServerSettings

GOOD = """
server: {host: 0.0.0.0, port: 9000, admin_key: "${ADMIN}"}
database: {url: "sqlite:///${DATA_DIR:-/var/lib/apibox}/apibox.db"}
providers:
  - {name: echo, type: echo}
  - name: openai
    type: openai
    base_url: https://api.openai.com/v1
    api_key: ${OPENAI_API_KEY}
    headers: {OpenAI-Organization: "org-${ORG:-none}"}
models:
  - name: gpt-4o-mini
    routes: [{provider: openai, model: gpt-4o-mini-2024-07-18}]
    price: {input: 0.15, output: 0.60, cached_input: 0.075}
    max_output_tokens: 16384
    aliases: [mini]
  - name: demo
    routes: [{provider: echo, weight: 3, priority: 2}]
    price: {input: 5, output: 15}
limits:
  key: {rpm: 600, tpm: 1000000, concurrency: 32}
  user: {rpm: 1200}
"""
ENV = {"ADMIN": "admin-secret-value", "OPENAI_API_KEY": "sk-upstream-SECRET-abc123"}

# A minimal valid document that error cases below break one key at a time.
BASE = """
providers:
  - {name: echo, type: echo}
models:
  - name: demo
    routes: [{provider: echo}]
    price: {input: 5, output: 15}
"""


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> tuple[Path, str]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(str(path), env=env or {})
    return path, info.value.message


def run_cli(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(cli_app, list(args), env={"COLUMNS": "200", **(env or {})})


# -- a good file ---------------------------------------------------------------------------------


def test_a_full_config_parses(tmp_path: Path) -> None:
    settings = load_settings(str(write(tmp_path, GOOD)), env=ENV)
    assert settings.source == str(tmp_path / "cfg.yaml")
    assert (settings.server.host, settings.server.port) == ("0.0.0.0", 9000)
    assert settings.server.admin_key == "admin-secret-value"
    openai = settings.provider("openai")
    assert openai.api_key == "sk-upstream-SECRET-abc123"
    assert openai.headers == {"OpenAI-Organization": "org-none"}
    mini = settings.model_index()["mini"]
    assert mini.name == "gpt-4o-mini" and mini.max_output_tokens == 16384
    # USD per 1M tokens -> exact micro-USD per 1M tokens, floats from YAML included.
    assert (mini.price.input, mini.price.output, mini.price.cached_input) == (150_000, 600_000, 75_000)
    assert mini.routes[0].model == "gpt-4o-mini-2024-07-18"
    demo = settings.model_index()["demo"]
    assert demo.routes[0].model == "demo"  # the upstream model defaults to the model's name
    assert (demo.routes[0].weight, demo.routes[0].priority) == (3, 2)
    assert demo.max_output_tokens == 4096
    assert (settings.limits.key.rpm, settings.limits.key.tpm, settings.limits.key.concurrency) == (600, 1000000, 32)
    assert settings.limits.user.rpm == 1200 and settings.limits.user.tpm is None


def test_the_example_config_loads_and_its_server_section_shows_the_defaults(tmp_path: Path) -> None:
    """config.example.yaml documents every key with its default: it must load, and say them right."""
    example = Path(__file__).parent.parent / "config.example.yaml"
    variables = set(re.findall(r"\$\{([A-Z_0-9]+)", example.read_text()))
    settings = load_settings(str(example), env={name: "set-" + name.lower() for name in variables
                                                if name != "APIBOX_ADMIN_KEY"})
    assert settings.server == ServerSettings()
    assert settings.database == DatabaseSettings()


@pytest.mark.parametrize(("base_url", "field"), [
    ("https://api.openai.com/v1", "max_completion_tokens"),
    ("https://my-org.openai.azure.com/openai/v1", "max_completion_tokens"),
    ("https://api.deepseek.com/v1", "max_tokens"),
    ("http://127.0.0.1:8000/v1", "max_tokens"),
    ("https://api.openai.com.example.net/v1", "max_tokens"),
    ("https://eu.api.openai.com/v1", "max_completion_tokens"),
    ("https://API.OpenAI.com/v1", "max_completion_tokens"),
    ("https://my-res.cognitiveservices.azure.com/openai/v1", "max_completion_tokens"),
    ("https://my-res.services.ai.azure.com/models", "max_tokens"),  # Azure AI inference: Llama, Mistral...
    ("https://models.inference.ai.azure.com", "max_tokens"),
    ("https://notopenai.com/v1", "max_tokens"),
])
def test_the_length_limit_field_follows_the_upstreams_host_unless_set(base_url: str, field: str) -> None:
    """OpenAI's own API refuses max_tokens for reasoning models; other servers may know only it."""
    auto = parse_settings(f"providers: [{{name: o, type: openai, base_url: '{base_url}'}}]", env={})
    assert auto.provider("o").max_tokens_field == field
    other = "max_tokens" if field == "max_completion_tokens" else "max_completion_tokens"
    chosen = parse_settings(f"providers: [{{name: o, type: openai, base_url: '{base_url}', "
                            f"max_tokens_field: {other}}}]", env={})
    assert chosen.provider("o").max_tokens_field == other


def test_a_config_that_is_not_utf8_is_refused_in_one_line_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "apibox.yaml"
    path.write_bytes(b"server:\n  port: 8080\n# caf\xe9\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(str(path), env={})
    assert caught.value.message == f"{path}: line 3: not UTF-8 text (byte 0xe9); save the file as UTF-8"


def test_keepalives_may_be_turned_off(tmp_path: Path) -> None:
    settings = load_settings(str(write(tmp_path, "server: {stream_keepalive_seconds: 0}")), env={})
    assert settings.server.stream_keepalive_seconds == 0
    assert default_settings().server.stream_keepalive_seconds == 15


# -- interpolation ---------------------------------------------------------------------------------


def test_variables_are_interpolated(tmp_path: Path) -> None:
    settings = load_settings(str(write(tmp_path, GOOD)), env={**ENV, "DATA_DIR": "/srv/x", "ORG": "acme"})
    assert settings.database.url == "sqlite:////srv/x/apibox.db"
    assert settings.provider("openai").headers == {"OpenAI-Organization": "org-acme"}


def test_a_default_is_used_when_the_variable_is_unset(tmp_path: Path) -> None:
    settings = load_settings(str(write(tmp_path, GOOD)), env=ENV)
    assert settings.database.url == "sqlite:////var/lib/apibox/apibox.db"


def test_a_default_is_used_when_the_variable_is_empty(tmp_path: Path) -> None:
    # As in the shell and docker compose: ${VAR:-default} covers unset *and* empty.
    settings = load_settings(str(write(tmp_path, GOOD)), env={**ENV, "DATA_DIR": "", "ORG": ""})
    assert settings.database.url == "sqlite:////var/lib/apibox/apibox.db"
    assert settings.provider("openai").headers == {"OpenAI-Organization": "org-none"}


def test_a_variable_set_to_empty_without_a_default_is_empty(tmp_path: Path) -> None:
    settings = load_settings(str(write(tmp_path, GOOD)), env={**ENV, "ADMIN": ""})
    assert settings.server.admin_key is None  # an empty admin key turns the admin API off


def test_an_empty_default_is_allowed(tmp_path: Path) -> None:
    settings = parse_settings("server: {admin_key: '${ADMIN:-}'}", env={})
    assert settings.server.admin_key is None


def test_several_variables_in_one_value_and_plain_dollars(tmp_path: Path) -> None:
    settings = parse_settings("server: {admin_key: 'a$b-${X}-${Y:-y}-$Z'}", env={"X": "x"})
    assert settings.server.admin_key == "a$b-x-y-$Z"


def test_a_missing_variable_is_an_error_naming_it(tmp_path: Path) -> None:
    path, message = config_error(tmp_path, GOOD, env={"ADMIN": "a"})
    assert message == f"{path}: providers[1].api_key: environment variable OPENAI_API_KEY is not set"


def test_a_missing_variable_in_a_nested_list(tmp_path: Path) -> None:
    text = BASE + "    aliases: [a, '${ALIAS_TWO}']\n"
    path, message = config_error(tmp_path, text)
    assert message == f"{path}: models[0].aliases[1]: environment variable ALIAS_TWO is not set"


# -- errors name the file, the key path and the problem ------------------------------------------------


BAD_CASES = [
    # (replace in BASE, with, key path, problem)
    ("providers:", "provider:", "<root>", "unknown key 'provider'"),
    ("price: {input: 5,", "price: {inptu: 5, input: 5,", "models[0].price", "unknown key 'inptu'"),
    ("routes: [{provider: echo}]", "routes: [{provider: echo, wieght: 2}]", "models[0].routes[0]",
     "unknown key 'wieght'"),
    ("input: 5,", "input: abc,", "models[0].price.input", "'abc' is not an amount"),
    ("input: 5,", "input: 0.0000001,", "models[0].price.input", "more than 6 decimals"),
    ("input: 5,", "input: '1.1234567',", "models[0].price.input", "more than 6 decimals"),
    ("input: 5,", "input: -1,", "models[0].price.input", "negative"),
    ("input: 5,", "input: .nan,", "models[0].price.input", "not a finite"),
    ("input: 5,", "input: [1],", "models[0].price.input", "must be a number"),
    ("output: 15}", "output: 15, cached_input: x}", "models[0].price.cached_input", "'x' is not an amount"),
    ("price: {input: 5, output: 15}", "price: {input: 5}", "models[0].price", "missing key 'output'"),
    ("routes: [{provider: echo}]", "routes: [{provider: nope}]", "models[0].routes[0].provider",
     "unknown provider 'nope'"),
    ("routes: [{provider: echo}]", "routes: []", "models[0].routes", "at least one route"),
    ("routes: [{provider: echo}]", "routes: [{provider: echo, weight: heavy}]", "models[0].routes[0].weight",
     "must be a whole number"),
    ("type: echo}", "type: mystery}", "providers[0].type", "unknown provider type 'mystery'"),
    ("type: echo}", "type: echo, stream_usage: maybe}", "providers[0].stream_usage", "true or false"),
    ("  - {name: echo, type: echo}", "  - {name: echo, type: echo}\n  - {name: echo, type: echo}", "providers[1]",
     "'echo' is used twice"),
    ("  - {name: echo, type: echo}", "  - {name: o, type: openai}\n  - {name: echo, type: echo}", "providers[0]",
     "missing key 'base_url'"),
    ("  - {name: echo, type: echo}", "  - {name: o, type: openai, base_url: ftp://x}\n  - {name: echo, type: echo}",
     "providers[0].base_url", "http:// or https://"),
    ("type: echo}", "type: echo, max_tokens_field: max_tokens}", "providers[0].max_tokens_field",
     "applies to type openai only"),
    ("  - {name: echo, type: echo}", "  - {name: o, type: openai, base_url: 'http://x', max_tokens_field: limit}\n"
     "  - {name: echo, type: echo}", "providers[0].max_tokens_field",
     "max_tokens or max_completion_tokens, got 'limit'"),
    ("type: echo}", "type: echo, proxy: 'socks5://p.internal:1080'}", "providers[0].proxy",
     "SOCKS proxies are not supported"),
    ("type: echo}", "type: echo, proxy: 'http://:3128'}", "providers[0].proxy", "needs a host"),
    ("type: echo}", "type: echo, proxy: 'http://p.internal:port'}", "providers[0].proxy", "port must be a number"),
    ("type: echo}", "type: echo, proxy: 'http://u:pw-Z9x@p.internal:3128/v1'}", "providers[0].proxy",
     "got 'http://u:****@p.internal:3128/v1'"),
    ("name: demo", "name: demo\n    max_output_tokens: 0", "models[0].max_output_tokens", "at least 1"),
    ("name: demo", "name: demo\n    kind: image", "models[0].kind", "'chat' or 'embedding'"),
    ("models:", "limits: {key: {rpm: 0}}\nmodels:", "limits.key.rpm", "at least 1"),
    ("models:", "limits: {key: {rpm: fast}}\nmodels:", "limits.key.rpm", "must be a whole number"),
    ("models:", "server: {port: 70000}\nmodels:", "server.port", "0-65535"),
    ("models:", "server: {port: -1}\nmodels:", "server.port", "at least 0"),
    ("models:", "server: {port: http}\nmodels:", "server.port", "must be a whole number"),
    ("models:", "server: {port: 80.5}\nmodels:", "server.port", "must be a whole number"),
    ("models:", "server: {port: true}\nmodels:", "server.port", "must be a whole number"),
    ("models:", "server: {max_body_mb: 0}\nmodels:", "server.max_body_mb", "greater than 0"),
    ("models:", "server: {stream_keepalive_seconds: -5}\nmodels:", "server.stream_keepalive_seconds",
     "must be 0 or more, got -5"),
    ("models:", "server: {stream_keepalive_seconds: often}\nmodels:", "server.stream_keepalive_seconds",
     "must be a number"),
    ("models:", "server: {host: ''}\nmodels:", "server.host", "must not be empty"),
    ("models:", "server: {cors_origins: ['https://a.example.com/chat']}\nmodels:", "server.cors_origins[0]",
     "an origin such as https://app.example.com"),
    ("models:", "server: {cors_origins: '*'}\nmodels:", "server.cors_origins", "must be a list"),
    ("models:", "server: [1, 2]\nmodels:", "server", "must be a mapping"),
    ("models:", "database: {url: 'mysql://x'}\nmodels:", "database.url", "sqlite:///"),
    ("models:", "database: {url: sqlite:///a.db, pool: 5}\nmodels:", "database", "unknown key 'pool'"),
]


@pytest.mark.parametrize(("old", "new", "where", "problem"), BAD_CASES, ids=[c[3] for c in BAD_CASES])
def test_config_errors_name_file_key_path_and_problem(tmp_path: Path, old: str, new: str, where: str,
                                                      problem: str) -> None:
    assert old in BASE
    load_settings(str(write(tmp_path, BASE, "base.yaml")), env={})  # the base itself is fine
    path, message = config_error(tmp_path, BASE.replace(old, new, 1))
    assert message.startswith(f"{path}: {where}: "), message
    assert problem in message


def test_a_duplicate_model_name_is_an_error(tmp_path: Path) -> None:
    text = BASE + "  - name: demo\n    routes: [{provider: echo}]\n    price: {input: 1, output: 1}\n"
    path, message = config_error(tmp_path, text)
    assert message == f"{path}: models[1]: model name or alias 'demo' is used twice"


def test_an_alias_that_shadows_a_model_is_an_error(tmp_path: Path) -> None:
    text = BASE + ("  - name: other\n    aliases: [demo]\n    routes: [{provider: echo}]\n"
                   "    price: {input: 1, output: 1}\n")
    path, message = config_error(tmp_path, text)
    assert message.startswith(f"{path}: models[1]: ") and "'demo' is used twice" in message


def test_invalid_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    path, message = config_error(tmp_path, "server:\n  port: 80\n  host: [unclosed\n")
    assert message.startswith(f"{path}: not valid YAML (line ")


def test_a_config_that_is_not_a_mapping(tmp_path: Path) -> None:
    path, message = config_error(tmp_path, "- a\n- b\n")
    assert message == f"{path}: <root>: must be a mapping, got a list"


def test_a_missing_config_file_is_an_error_not_the_defaults(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(str(tmp_path / "nope.yaml"), env={})
    assert str(tmp_path / "nope.yaml") in info.value.message and "cannot read" in info.value.message
    with pytest.raises(ConfigError):
        load_settings(None, env={"APIBOX_CONFIG": str(tmp_path / "nope.yaml")})


def test_config_check_reports_an_error_in_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("input: 5,", "input: 5.1234567,"))
    result = run_cli("config", "check", "--config", str(path))
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert lines[0].startswith("error: ")
    assert f"{path}: models[0].price.input: " in lines[0] and "more than 6 decimals" in lines[0]


def test_every_command_refuses_a_bad_config(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "  - name: x\n    routes: [{provider: gone}]\n    price: {input: 1, output: 1}\n")
    for args in (("users", "list"), ("keys", "list"), ("db", "check"), ("serve",)):
        result = run_cli(*args, "--config", str(path))
        assert result.exit_code == 1, (args, result.output)
        assert "models[1].routes[0].provider: unknown provider 'gone'" in result.stderr
    assert not (tmp_path / "apibox.db").exists()  # nothing was created from a bad config


# -- resolution order ------------------------------------------------------------------------------


def test_resolution_order(tmp_path: Path) -> None:
    explicit, from_env = write(tmp_path, "server: {port: 1}", "explicit.yaml"), write(
        tmp_path, "server: {port: 2}", "env.yaml")
    env = {"APIBOX_CONFIG": str(from_env)}
    assert resolve_config_path(str(explicit), env, tmp_path) == explicit
    assert resolve_config_path(None, env, tmp_path) == from_env
    assert resolve_config_path(None, {}, tmp_path) is None
    local = write(tmp_path, "server: {port: 3}", "apibox.yaml")
    assert resolve_config_path(None, {}, tmp_path) == local
    assert resolve_config_path(None, env, tmp_path) == from_env
    assert resolve_config_path(str(explicit), env, tmp_path) == explicit


def test_resolution_order_through_load_settings(isolated: Path) -> None:
    explicit = write(isolated, "server: {port: 1}", "explicit.yaml")
    from_env = write(isolated, "server: {port: 2}", "env.yaml")
    assert load_settings(None, env={}).source == "built-in defaults"
    write(isolated, "server: {port: 3}", "apibox.yaml")  # ./apibox.yaml in the working directory
    assert load_settings(None, env={}).server.port == 3
    assert load_settings(None, env={"APIBOX_CONFIG": str(from_env)}).server.port == 2
    assert load_settings(str(explicit), env={"APIBOX_CONFIG": str(from_env)}).server.port == 1


def test_resolution_order_through_the_cli(isolated: Path) -> None:
    explicit = write(isolated, "server: {port: 1}", "explicit.yaml")
    from_env = write(isolated, "server: {port: 2}", "env.yaml")

    def port(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
        data = json.loads(run_cli("config", "check", "--json", *args, env=env).stdout)
        return data["server"]["port"], data["source"]

    assert port() == (8080, "built-in defaults")
    write(isolated, "server: {port: 3}", "apibox.yaml")
    assert port()[0] == 3
    assert port(env={"APIBOX_CONFIG": str(from_env)}) == (2, str(from_env))
    assert port("--config", str(explicit), env={"APIBOX_CONFIG": str(from_env)}) == (1, str(explicit))
    assert port("-c", str(explicit)) == (1, str(explicit))


def test_the_defaults_serve_the_demo_model_on_echo(isolated: Path) -> None:
    settings = load_settings(None, env={})
    assert settings == default_settings()
    assert settings.database.url == "sqlite:///./apibox.db"
    assert [(p.name, p.type) for p in settings.providers] == [("echo", "echo")]
    assert [m.name for m in settings.models] == ["demo"]
    demo = settings.models[0]
    assert demo.routes[0].provider == "echo"
    assert demo.price.input > 0 and demo.price.output > 0  # billing is visible
    data = json.loads(run_cli("config", "check", "--json").stdout)
    assert data["source"] == "built-in defaults"
    assert [m["name"] for m in data["models"]] == ["demo"]
    # And the CLI really uses ./apibox.db in the working directory.
    assert run_cli("users", "create", "ann@example.com").exit_code == 0
    assert (isolated / "apibox.db").exists()


# -- config check ----------------------------------------------------------------------------------


SECRETS = ("admin-secret-value", "sk-upstream-SECRET-abc123", "hdr-secret-xyz", "dbpass-Q7", "proxypass-K3")
SECRET_CONFIG = GOOD.replace(
    "headers: {OpenAI-Organization: \"org-${ORG:-none}\"}",
    "headers: {OpenAI-Organization: \"org-${ORG:-none}\", X-Upstream-Token: hdr-secret-xyz}\n"
    "    proxy: http://egress:proxypass-K3@proxy.internal:3128",
).replace('database: {url: "sqlite:///${DATA_DIR:-/var/lib/apibox}/apibox.db"}',
          "database: {url: 'postgresql://apibox:dbpass-Q7@db.internal:5432/apibox'}")


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_config_check_masks_every_secret(tmp_path: Path, as_json: bool) -> None:
    path = write(tmp_path, SECRET_CONFIG)
    result = run_cli("config", "check", "--config", str(path), *(["--json"] if as_json else []), env=ENV)
    assert result.exit_code == 0, result.output
    for secret in SECRETS:
        assert secret not in result.output
        assert secret[:8] not in result.output  # not even a piece of it
    assert "****" in result.output
    if as_json:
        data = json.loads(result.stdout)
        assert data["server"]["admin_key"] == "****"
        openai = next(p for p in data["providers"] if p["name"] == "openai")
        assert openai["api_key"] == "****"
        assert openai["headers"]["X-Upstream-Token"] == "****"
        assert data["database"]["url"] == "postgresql://apibox:****@db.internal:5432/apibox"
        assert openai["proxy"] == "http://egress:****@proxy.internal:3128"
        echo = next(p for p in data["providers"] if p["name"] == "echo")
        assert echo["api_key"] is None and echo["proxy"] is None  # unset stays visibly unset


def test_config_check_prints_the_resolved_config(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    result = run_cli("config", "check", "--config", str(path), env=ENV)
    assert result.exit_code == 0, result.output
    assert f"OK: {path}" in result.stdout
    assert "0.0.0.0:9000" in result.stdout
    assert "gpt-4o-mini -> openai:gpt-4o-mini-2024-07-18" in result.stdout
    assert "provider echo (echo) api_key=none\n" in result.stdout  # built in: no address, no key
    data = json.loads(run_cli("config", "check", "--config", str(path), "--json", env=ENV).stdout)
    mini = next(m for m in data["models"] if m["name"] == "gpt-4o-mini")
    assert mini["price_usd_per_1m"] == {"input": "0.150000", "output": "0.600000", "cached_input": "0.075000"}
    assert mini["aliases"] == ["mini"]
    assert data["limits"]["key"] == {"rpm": 600, "tpm": 1000000, "concurrency": 32}


def test_config_check_names_a_missing_variable(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    result = run_cli("config", "check", "--config", str(path), env={"ADMIN": "x"})
    assert result.exit_code == 1
    assert "OPENAI_API_KEY is not set" in result.stderr and str(path) in result.stderr
