"""Upstream providers, one module per wire format; ``build_providers`` picks them from config."""

from __future__ import annotations

import aiohttp

from apibox.config import Settings
from apibox.providers.anthropic import AnthropicProvider
from apibox.providers.base import Provider
from apibox.providers.echo import EchoProvider
from apibox.providers.gemini import GeminiProvider
from apibox.providers.openai import OpenAIProvider


def build_providers(settings: Settings, session: aiohttp.ClientSession) -> dict[str, Provider]:
    """One provider object per configured provider, all sharing the one upstream session."""
    providers: dict[str, Provider] = {}
    for config in settings.providers:
        if config.type == "echo":
            providers[config.name] = EchoProvider(config)
        else:
            providers[config.name] = HTTP_PROVIDERS[config.type](config, session)
    return providers


HTTP_PROVIDERS = {"openai": OpenAIProvider, "anthropic": AnthropicProvider, "gemini": GeminiProvider}
