"""Micro-batching: the round trips of many jobs in flight folded into one statement each.

A worker runs dozens of jobs at once, and each job reads its row, reads what the partner needs,
records its outcome and acknowledges its stream entry. One statement per job and step costs a
pool checkout, a round trip and the driver's work every time; a :class:`Batcher` collects the
requests that arrive within a short window (or within one turn of the event loop) and serves
them with one call, so those costs are paid per batch instead of per job.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

I = TypeVar("I")  # noqa: E741 - the item type
R = TypeVar("R")


class Batcher(Generic[I, R]):
    """``await batcher.submit(item)`` → ``flush(items)[i]`` for the items submitted together.

    Items submitted within ``window_s`` of the first one (with 0, within the same turn of the
    event loop: the jobs a stream read started) go to one ``flush`` call, at most ``max_size``
    at a time. ``flush`` returns one result per item, in order. If it raises, every caller of
    that batch gets the exception, so each job handles the failure as it would its own (the
    worker reschedules it; nothing is acknowledged).
    """

    def __init__(
        self,
        flush: Callable[[list[I]], Awaitable[Sequence[R]]],
        *,
        window_s: float = 0.0,
        max_size: int = 500,
    ) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self._flush = flush
        self.window_s = window_s
        self.max_size = max_size
        self._pending: list[tuple[I, asyncio.Future[R]]] = []
        self._timer: asyncio.Handle | None = None
        self._running: set[asyncio.Task[None]] = set()
        #: Flushes done and items served (for tests and metrics).
        self.flushes = 0
        self.items = 0

    def submit(self, item: I) -> asyncio.Future[R]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._pending.append((item, future))
        if len(self._pending) >= self.max_size:
            self._dispatch()
        elif self._timer is None:
            if self.window_s > 0:
                self._timer = loop.call_later(self.window_s, self._dispatch)
            else:
                self._timer = loop.call_soon(self._dispatch)
        return future

    def _dispatch(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        if not batch:
            return
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[tuple[I, asyncio.Future[R]]]) -> None:
        try:
            results = await self._flush([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"flush returned {len(results)} results for {len(batch)}")
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        self.flushes += 1
        self.items += len(batch)
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():  # a caller that was cancelled meanwhile
                future.set_result(result)

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Flush what is waiting and wait for the flushes under way, ``timeout_s`` at most (a
        database or Redis that does not answer must not hold a shutdown up); the rest are
        cancelled, and their callers get the cancellation."""
        self._dispatch()
        if not self._running:
            return
        _, late = await asyncio.wait(set(self._running), timeout=timeout_s)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)
