"""Model names -> the routes that can serve them, in the order to try them.

Routes with a lower ``priority`` are tried first; within one priority, the order is a
weighted shuffle, so ``weight`` is each route's share of first attempts. A route that keeps
failing is cooled down: it goes to the back of the order until its cooldown ends, then one
request tries it again (half-open) while the others keep away: one more failure cools it
again at once, a success clears it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from apibox.config import ModelSettings, Route, Settings
from apibox.errors import InvalidRequest, ModelNotFound


@dataclass(slots=True)
class _Health:
    failures: int = 0
    cooled_until: float = 0.0


class Router:
    def __init__(self, settings: Settings, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._models = settings.model_index()
        self._rng = rng or random.Random()
        self._clock = clock
        self._failures_allowed = settings.routing.failures_before_cooldown
        self._cooldown = settings.routing.cooldown_seconds
        self._health: dict[tuple[str, str], _Health] = {}

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
        """The routes to try for one request, first choice first; cooling routes last."""
        if len(model.routes) == 1:
            return list(model.routes)
        ordered: list[Route] = []
        for priority in sorted({r.priority for r in model.routes}):
            ordered.extend(self._weighted_order(r for r in model.routes if r.priority == priority))
        now = self._clock()
        plan = sorted(ordered, key=lambda route: self.cooling(route, now))
        for route in plan:
            health = self._health.get((route.provider, route.model))
            if health is not None and 0 < health.cooled_until <= now:
                # Half-open: this request is the one trial; the others keep away until it reports.
                health.cooled_until = now + self._cooldown
        return plan

    def cooling(self, route: Route, now: float | None = None) -> bool:
        health = self._health.get((route.provider, route.model))
        return health is not None and health.cooled_until > (self._clock() if now is None else now)

    def failed(self, route: Route, retry_after: float | None = None) -> None:
        """Count a failure; enough in a row (or an upstream asking to wait) cools the route down."""
        health = self._health.setdefault((route.provider, route.model), _Health())
        health.failures += 1
        if health.failures >= self._failures_allowed or retry_after:
            health.cooled_until = self._clock() + max(self._cooldown, retry_after or 0.0)

    def succeeded(self, route: Route) -> None:
        self._health.pop((route.provider, route.model), None)

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
