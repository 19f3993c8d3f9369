"""What a caller may ask for, and what its request counts against, before anything is held:
the model its key and plan allow, the price it pays, the limits it is under, and the most
output the hold must assume."""

from __future__ import annotations

from typing import Any

from apibox.auth import Caller
from apibox.config import LimitSet, ModelSettings
from apibox.errors import InvalidRequest, PermissionDenied
from apibox.gateway.context import Gateway
from apibox.limits import Subject
from apibox.pricing import Price

NO_LIMITS = LimitSet()


def authorized_model(gateway: Gateway, caller: Caller, name: object) -> ModelSettings:
    """The model ``name`` refers to, if this caller's key may use it."""
    model = gateway.router.resolve(name)
    if caller.key.models and model.name not in caller.key.models:
        raise PermissionDenied(f"This API key may not use the model `{model.name}`.", param="model",
                               code="model_not_allowed")
    group = gateway.settings.group(caller.user.group)
    if group.models and model.name not in group.models:
        raise PermissionDenied(f"Your plan ({caller.user.group}) does not include the model `{model.name}`.",
                               param="model", code="model_not_in_plan")
    return model


def price_for(gateway: Gateway, caller: Caller, model: ModelSettings) -> Price:
    """The price in force as the request arrives, as the caller's group pays it."""
    return model.price_at(gateway.clock()).for_group(gateway.settings.group(caller.user.group).multiplier)


def limit_subjects(gateway: Gateway, caller: Caller) -> list[Subject]:
    """What a request counts against: its key (the key's own limits, else the config's key
    defaults) and its user (the config's user defaults); subjects without limits are left out."""
    key, defaults = caller.key, gateway.settings.limits
    rpm = key.rpm if key.rpm is not None else defaults.key.rpm
    tpm = key.tpm if key.tpm is not None else defaults.key.tpm
    concurrency = key.concurrency if key.concurrency is not None else defaults.key.concurrency
    subjects = []
    if rpm is not None or tpm is not None or concurrency is not None:
        subjects.append(Subject(f"key:{key.id}", LimitSet(rpm=rpm, tpm=tpm, concurrency=concurrency)))
    if defaults.user != NO_LIMITS:
        subjects.append(Subject(f"user:{caller.user.id}", defaults.user))
    return subjects


def answer_count(endpoint: str, body: dict[str, Any]) -> int:
    """How many answers the upstream makes for the request, each up to the request's limit: ``n``;
    for legacy completions, that many for each prompt of a list, and ``best_of`` of them when it
    asks for more (the upstream makes them all, returns the best ``n`` and bills every one)."""
    if endpoint == "embeddings":
        return 1
    n = _count(body, "n", 128)
    if endpoint != "completions":
        return n
    best_of = _count(body, "best_of", 20)
    if best_of < n and "best_of" in body:
        raise InvalidRequest("best_of must be at least n", param="best_of")
    prompt = body.get("prompt")
    prompts = len(prompt) if type(prompt) is list and any(type(part) is not int for part in prompt) else 1
    return max(n, best_of) * max(1, prompts)


def _count(body: dict[str, Any], field_name: str, most: int) -> int:
    value = body.get(field_name)
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise InvalidRequest(f"{field_name} must be a whole number from 1 to {most}", param=field_name)
    return value


def requested_output(endpoint: str, body: dict[str, Any], model: ModelSettings) -> int:
    """The most output tokens the request may produce in each answer, as the hold must assume."""
    if endpoint == "embeddings":
        return 0
    limits = []
    for field_name in ("max_tokens", "max_completion_tokens"):  # both given: the provider sends the lower
        asked = body.get(field_name)
        if asked is None:
            continue
        if isinstance(asked, bool) or not isinstance(asked, int) or asked < 1:
            raise InvalidRequest(f"{field_name} must be a positive whole number", param=field_name)
        limits.append(asked)
    if not limits:
        limits.append(16 if endpoint == "completions" else model.max_output_tokens)
    return min(limits)
