"""Keep CPython's full garbage collections short in long-running API processes.

An API process with many WebSocket subscribers holds hundreds of thousands of long-lived
objects (per connection: Starlette, uvicorn, websockets and strawberry objects). CPython's
full (generation 2) collection walks all of them: measured here at 1,000 subscribers, a pass
took 100–330 ms, every 20–30 s under load, and every subscriber's events waited for it (the
p99 of the live-stock benchmark went from ~80 ms to ~380 ms).

The policy: every ``QM_GC_FREEZE_S`` seconds, ``gc.freeze()`` moves every object that has
survived so far into the permanent generation, which collections do not walk; a full
collection then only walks what was promoted since the last freeze. Cyclic garbage among
frozen objects (a closed connection's cycles, say) is only reclaimed by the sweep: every
``QM_GC_SWEEP_S`` seconds the objects are unfrozen, one full collection runs (one pause of
the old length), and they are frozen again. Reference counting frees everything else as
usual. ``QM_GC_FREEZE_S=0`` turns the policy off (the default under ``QM_ENV=test``, whose
processes build many short-lived apps).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from typing import Any

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from quartermaster.config import GcSettings

log = structlog.get_logger(__name__)


class GcPolicy(Collector):
    """The freeze/sweep task, and ``/metrics`` figures of full collections (collected here at
    scrape time: the gc callback only adds to plain numbers, since it may run while any lock,
    a metric's included, is held)."""

    def __init__(self, settings: GcSettings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.full_collections = 0
        self.full_seconds = 0.0
        self.longest_s = 0.0
        self._started_at: float | None = None
        self._task: asyncio.Task[None] | None = None
        if registry is not None:
            registry.register(self)

    def collect(self) -> Any:
        count = CounterMetricFamily(
            "qm_gc_full_collections", "Full (generation 2) garbage collections"
        )
        count.add_metric([], float(self.full_collections))
        seconds = CounterMetricFamily(
            "qm_gc_full_collection_seconds", "Time spent in full garbage collections"
        )
        seconds.add_metric([], self.full_seconds)
        longest = GaugeMetricFamily(
            "qm_gc_full_collection_longest_seconds", "The longest full garbage collection so far"
        )
        longest.add_metric([], self.longest_s)
        frozen = GaugeMetricFamily(
            "qm_gc_frozen_objects", "Objects in the permanent generation (gc.freeze)"
        )
        frozen.add_metric([], float(gc.get_freeze_count()))
        yield from (count, seconds, longest, frozen)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._started_at = time.perf_counter()
        elif self._started_at is not None:
            took = time.perf_counter() - self._started_at
            self._started_at = None
            self.full_collections += 1
            self.full_seconds += took
            self.longest_s = max(self.longest_s, took)

    def start(self) -> None:
        gc.callbacks.append(self._on_gc)
        if self.settings.freeze_interval_s > 0:
            self._task = asyncio.create_task(self._run(), name="qm-gc-policy")

    async def stop(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._on_gc)
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            gc.unfreeze()  # what was frozen is collectable again once the app is gone

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        sweep_every = self.settings.sweep_interval_s
        next_sweep = loop.time() + sweep_every
        while True:
            await asyncio.sleep(self.settings.freeze_interval_s)
            if sweep_every > 0 and loop.time() >= next_sweep:
                next_sweep = loop.time() + sweep_every
                started = time.perf_counter()
                gc.unfreeze()
                collected = gc.collect()
                log.info(
                    "gc.sweep",
                    collected=collected,
                    ms=round((time.perf_counter() - started) * 1000, 1),
                )
            gc.freeze()
