"""Router: the order in which a model's routes are tried, and how failing routes cool down.

Pure unit tests: the router gets a seeded ``random.Random`` and a clock the test moves by
hand, so every order and every cooldown boundary is reproducible.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from apibox.config import ModelSettings, Route, RoutingSettings, Settings
from apibox.pricing import Price
from apibox.router import Router

PRICE = Price(input=1_000_000, output=2_000_000)
A = Route("up-a", "model-a", priority=1)
B = Route("up-b", "model-b", priority=2)
DRAWS = 20_000


class Clock:
    """A monotonic clock that only moves when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def model(*routes: Route, name: str = "m") -> ModelSettings:
    return ModelSettings(name=name, routes=routes, price=PRICE)


def router(*models: ModelSettings, seed: int = 1234, clock: Clock | None = None, failures: int = 3,
           cooldown: float = 30.0) -> Router:
    settings = Settings(models=models, routing=RoutingSettings(failures_before_cooldown=failures,
                                                               cooldown_seconds=cooldown))
    return Router(settings, rng=random.Random(seed), clock=clock or Clock())


def a_cooled() -> tuple[ModelSettings, Clock, Router]:
    """A model served by A then B, whose router has just cooled A (three failures, 30 s cooldown)."""
    served, clock = model(A, B), Clock()
    r = router(served, clock=clock, cooldown=30.0)
    for _ in range(3):
        r.failed(A)
    return served, clock, r


# -- the plan: priority, then a weighted shuffle --------------------------------------------


def test_lower_priority_is_tried_first_whatever_the_config_order() -> None:
    low = [Route("p1", f"low-{i}", weight=1, priority=1) for i in range(3)]
    mid = [Route("p2", f"mid-{i}", weight=5, priority=5) for i in range(2)]
    high = [Route("p3", f"high-{i}", weight=100, priority=9) for i in range(2)]
    served = model(high[0], mid[0], low[0], high[1], low[1], mid[1], low[2])  # shuffled on purpose
    r = router(served)
    for _ in range(500):
        plan = r.plan(served)
        assert sorted(plan, key=lambda x: x.model) == sorted(served.routes, key=lambda x: x.model)
        assert [x.priority for x in plan] == [1, 1, 1, 5, 5, 9, 9]


def test_a_heavy_weight_does_not_jump_a_priority() -> None:
    served = model(Route("p", "backup", weight=1000, priority=2), Route("p", "primary", weight=1, priority=1))
    r = router(served)
    assert all(r.plan(served)[0].model == "primary" for _ in range(1000))


@pytest.mark.parametrize("weights", [(1, 1), (1, 3), (1, 2, 7), (5, 3, 2, 0)])
def test_each_route_gets_its_weight_share_of_first_places(weights: tuple[int, ...]) -> None:
    routes = [Route("p", f"r{i}", weight=w) for i, w in enumerate(weights)]
    served = model(*routes)
    r = router(served, seed=sum(weights))
    firsts = Counter(r.plan(served)[0].model for _ in range(DRAWS))
    total = sum(weights)
    for route in routes:
        share = firsts[route.model] / DRAWS
        # Binomial sd at 20k draws is at most 0.0036: 0.02 is over five of them.
        assert share == pytest.approx(route.weight / total, abs=0.02), (route, firsts)


def test_the_shuffle_varies_the_whole_order_not_just_the_first_place() -> None:
    served = model(*(Route("p", name) for name in "abc"))
    r = router(served)
    orders = Counter(tuple(x.model for x in r.plan(served)) for _ in range(6000))
    assert len(orders) == 6  # every permutation of three equal routes shows up
    assert all(count > 700 for count in orders.values()), orders  # about 1000 each


def test_the_same_seed_gives_the_same_plans() -> None:
    served = model(*(Route("p", name, weight=w) for name, w in (("a", 1), ("b", 2), ("c", 3))))
    first, second = router(served, seed=7), router(served, seed=7)
    assert [first.plan(served) for _ in range(50)] == [second.plan(served) for _ in range(50)]


def test_a_weight_zero_route_is_never_first_while_others_have_weight() -> None:
    zero = Route("p", "zero", weight=0)
    served = model(zero, Route("p", "one", weight=1), Route("p", "two", weight=2))
    r = router(served)
    for _ in range(3000):
        plan = r.plan(served)
        assert plan[-1] == zero  # still tried, but only after every weighted route
        assert len(plan) == 3


def test_a_weight_zero_route_of_a_lower_priority_still_comes_first() -> None:
    zero = Route("p", "zero", weight=0, priority=1)
    served = model(Route("p", "heavy", weight=9, priority=2), zero)
    r = router(served)
    assert all(r.plan(served)[0] == zero for _ in range(200))


def test_routes_all_of_weight_zero_are_all_still_planned() -> None:
    served = model(Route("p", "x", weight=0), Route("p", "y", weight=0))
    r = router(served)
    for _ in range(50):
        assert sorted(x.model for x in r.plan(served)) == ["x", "y"]


def test_a_single_route_model_always_plans_its_route() -> None:
    only = Route("p", "only", weight=0, priority=7)
    served = model(only)
    clock = Clock()
    r = router(served, clock=clock)
    assert r.plan(served) == [only]
    for _ in range(5):
        r.failed(only)
    assert r.cooling(only)
    assert r.plan(served) == [only]  # cooling or not, it is the only way to serve the model


def test_a_plan_is_a_fresh_list_the_caller_may_change() -> None:
    served = model(A)
    r = router(served)
    r.plan(served).append(B)
    assert r.plan(served) == [A]


# -- cooldown -------------------------------------------------------------------------------


def test_a_route_is_cooled_after_the_configured_failures_in_a_row() -> None:
    served = model(A, B)
    clock = Clock()
    r = router(served, clock=clock, failures=3)
    r.failed(A)
    r.failed(A)
    assert r.plan(served) == [A, B]
    assert not r.cooling(A)
    r.failed(A)
    assert r.cooling(A)
    assert r.plan(served) == [B, A]  # to the back, but still there as a last resort


@pytest.mark.parametrize("failures", [1, 2, 5])
def test_the_failure_count_before_cooldown_is_configurable(failures: int) -> None:
    served = model(A, B)
    r = router(served, failures=failures)
    for _ in range(failures - 1):
        r.failed(A)
    assert r.plan(served)[0] == A
    r.failed(A)
    assert r.plan(served)[0] == B


def test_failures_must_be_in_a_row_to_cool_a_route() -> None:
    served = model(A, B)
    r = router(served, failures=3)
    for _ in range(4):
        r.failed(A)
        r.failed(A)
        r.succeeded(A)
    assert not r.cooling(A)
    assert r.plan(served) == [A, B]


def test_a_cooled_route_comes_back_when_its_cooldown_has_passed() -> None:
    served, clock, r = a_cooled()
    clock.advance(29.999)
    assert r.plan(served) == [B, A]
    clock.advance(0.001)
    assert not r.cooling(A)
    assert r.plan(served) == [A, B]  # half-open: tried first again, by this one request
    assert r.plan(served) == [B, A]  # the others keep away until the trial reports
    r.succeeded(A)
    assert r.plan(served) == [A, B]


def test_a_failed_half_open_trial_cools_the_route_for_another_period() -> None:
    served, clock, r = a_cooled()
    clock.advance(30)
    assert r.plan(served)[0] == A  # the trial
    r.failed(A)
    clock.advance(29)
    assert r.plan(served) == [B, A]


def test_one_failure_when_half_open_cools_the_route_again_at_once() -> None:
    served, clock, r = a_cooled()
    clock.advance(31)
    assert r.plan(served) == [A, B]
    r.failed(A)  # a single failure, not three
    assert r.plan(served) == [B, A]
    clock.advance(29.9)
    assert r.plan(served) == [B, A]  # a full cooldown from the new failure
    clock.advance(0.2)
    assert r.plan(served) == [A, B]


def test_a_success_when_half_open_clears_the_route() -> None:
    served, clock, r = a_cooled()
    clock.advance(31)
    r.succeeded(A)
    r.failed(A)
    r.failed(A)
    assert r.plan(served) == [A, B]  # the count started over: two failures are not enough
    r.failed(A)
    assert r.plan(served) == [B, A]


def test_a_success_clears_a_cooling_route_at_once() -> None:
    served, _, r = a_cooled()
    assert r.cooling(A)
    r.succeeded(A)  # e.g. it served as the last resort while cooling
    assert not r.cooling(A)
    assert r.plan(served) == [A, B]


@pytest.mark.parametrize(("cooldown", "retry_after", "cooled_for"), [
    (30.0, 5.0, 30.0),   # the longer of the two: our cooldown
    (30.0, 100.0, 100.0),  # the longer of the two: the upstream's wish
    (2.0, 2.5, 2.5),
])
def test_an_upstream_retry_after_cools_the_route_at_once(cooldown: float, retry_after: float,
                                                         cooled_for: float) -> None:
    served = model(A, B)
    clock = Clock()
    r = router(served, clock=clock, failures=3, cooldown=cooldown)
    r.failed(A, retry_after=retry_after)  # one failure is enough when the upstream asks us to wait
    assert r.plan(served) == [B, A]
    clock.advance(cooled_for - 0.01)
    assert r.plan(served) == [B, A]
    clock.advance(0.02)
    assert r.plan(served) == [A, B]


def test_a_failure_without_retry_after_does_not_cool_early() -> None:
    served = model(A, B)
    r = router(served, failures=3)
    r.failed(A, retry_after=None)
    r.failed(A, retry_after=0.0)
    assert r.plan(served) == [A, B]


def test_cooling_routes_keep_their_priority_order_behind_the_healthy_ones() -> None:
    c = Route("up-c", "model-c", priority=3)
    served = model(A, B, c)
    r = router(served, failures=1)
    r.failed(A)
    r.failed(B)
    assert r.plan(served) == [c, A, B]
    r.failed(c)
    assert r.plan(served) == [A, B, c]  # all cooling: every route is still tried, by priority


def test_a_route_cools_down_for_every_model_that_uses_it() -> None:
    shared = Route("up-shared", "same-upstream-model", priority=1)
    first, second = model(shared, B, name="first"), model(shared, Route("up-c", "c", priority=2), name="second")
    r = router(first, second, failures=1)
    r.failed(shared)
    assert r.plan(first)[0] == B
    assert r.plan(second)[0].provider == "up-c"


def test_routes_cool_down_independently() -> None:
    served = model(A, B, Route("up-c", "model-c", priority=3))
    r = router(served, failures=2)
    r.failed(A)
    r.failed(B)
    r.failed(B)
    assert r.cooling(B) and not r.cooling(A)
    assert [x.provider for x in r.plan(served)] == ["up-a", "up-c", "up-b"]


def test_the_same_upstream_model_on_another_provider_is_another_route() -> None:
    here, there = Route("up-a", "same"), Route("up-b", "same", priority=2)
    served = model(here, there)
    r = router(served, failures=1)
    r.failed(here)
    assert r.cooling(here) and not r.cooling(there)
