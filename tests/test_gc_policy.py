"""The garbage-collector policy of API processes (gc_policy.py): freeze, sweep, metrics."""

from __future__ import annotations

import asyncio
import gc
import weakref

from prometheus_client import CollectorRegistry, generate_latest

from quartermaster.config import GcSettings
from quartermaster.gc_policy import GcPolicy


class Cycle:
    def __init__(self) -> None:
        self.me = self


async def test_freezes_survivors_sweeps_cycles_and_unfreezes_on_stop() -> None:
    registry = CollectorRegistry()
    policy = GcPolicy(GcSettings(freeze_interval_s=0.05, sweep_interval_s=0.6), registry)
    assert gc.get_freeze_count() == 0
    policy.start()
    try:
        await asyncio.sleep(0.2)
        frozen = gc.get_freeze_count()
        assert frozen > 1_000  # everything alive went to the permanent generation

        # cyclic garbage among frozen objects survives until the sweep reclaims it
        cycle = Cycle()
        ref = weakref.ref(cycle)
        await asyncio.sleep(0.15)  # frozen while still reachable
        del cycle
        gc.collect()
        assert ref() is not None  # unreachable, but frozen: a full collection does not walk it
        # the next sweep (unfreeze, one full collection, freeze again) reclaims it
        for _ in range(100):
            if ref() is None:
                break
            await asyncio.sleep(0.05)
        assert ref() is None

        gc.collect()  # a full collection now walks only what came after the last freeze
        text = generate_latest(registry).decode()
        assert "qm_gc_full_collections_total" in text
        assert "qm_gc_frozen_objects" in text
        assert policy.longest_s > 0
    finally:
        await policy.stop()
    assert gc.get_freeze_count() == 0  # collectable again once the app is gone


async def test_off_when_the_interval_is_zero() -> None:
    policy = GcPolicy(GcSettings(freeze_interval_s=0.0))
    policy.start()
    try:
        await asyncio.sleep(0.1)
        assert gc.get_freeze_count() == 0
        before = policy.full_collections
        gc.collect()
        assert policy.full_collections == before + 1  # still measured
    finally:
        await policy.stop()


def test_settings_default_off_under_test_only() -> None:
    assert GcSettings.from_env("test").freeze_interval_s == 0
    assert GcSettings.from_env("production").freeze_interval_s == 10.0
    assert GcSettings.from_env("development").sweep_interval_s == 600.0
