"""The gateway keeps the cyclic garbage collector off what lives as long as the process."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from apibox.gateway.app import GC_YOUNG_ALLOCATIONS, settle_garbage_collector


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_once_started_what_lives_is_frozen_and_young_garbage_waits_longer(restored_gc: None) -> None:
    gc.unfreeze()
    long_lived = [object() for _ in range(1_000)]
    settle_garbage_collector()
    assert gc.get_freeze_count() >= len(long_lived)  # no longer walked by any collection
    assert gc.get_threshold()[0] == GC_YOUNG_ALLOCATIONS > 700
    cycle: list[object] = []
    cycle.append(cycle)  # garbage made later is still collected
    del cycle
    assert gc.collect() >= 1
