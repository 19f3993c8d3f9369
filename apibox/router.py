"""Model names -> the routes that can serve them, in the order to try them.

Routes with a lower ``priority`` are tried first; within one priority, the order is a
weighted shuffle, so ``weight`` is each route's share of first attempts.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from apibox.config import ModelSettings, Route, Settings
from apibox.errors import InvalidRequest, ModelNotFound


class Router:
    def __init__(self, settings: Settings, rng: random.Random | None = None) -> None:
        self._models = settings.model_index()
        self._rng = rng or random.Random()

    @property
    def models(self) -> list[ModelSettings]:
        """Each configured model once (aliases folded), in config order."""
        return list({id(m): m for m in self._models.values()}.values())

    def resolve(self, name: object) -> ModelSettings:
        if not isinstance(name, str) or not name:
            # A missing model is a bad request (400, as OpenAI answers), not an unknown model (404).
            raise InvalidRequest("you must name a model (the `model` field); GET /v1/models lists them",
                                 param="model")
        model = self._models.get(name)
        if model is None:
            raise ModelNotFound(f"The model `{name[:100]}` does not exist or you do not have access to it.",
                                param="model")
        return model

    def plan(self, model: ModelSettings) -> list[Route]:
        """The routes to try for one request, first choice first."""
        if len(model.routes) == 1:
            return list(model.routes)
        ordered: list[Route] = []
        for priority in sorted({r.priority for r in model.routes}):
            ordered.extend(self._weighted_order(r for r in model.routes if r.priority == priority))
        return ordered

    def _weighted_order(self, routes: Iterable[Route]) -> list[Route]:
        pool = list(routes)
        order: list[Route] = []
        while pool:
            weights = [max(r.weight, 0) for r in pool]
            if sum(weights) == 0:
                order.extend(pool)
                break
            pick = self._rng.choices(range(len(pool)), weights=weights)[0]
            order.append(pool.pop(pick))
        return order
