"""The write side of one graphql-transport-ws connection: a FIFO of ready frames and one
writer task.

The hub never awaits a socket. It appends pre-serialized frames here (``push``, synchronous)
and the connection's writer task sends them. Each subscription may have at most
``queue_size`` frames waiting; one more means the client does not keep up, and the whole
connection is closed with ``SLOW_CLOSE_CODE`` (the TCP connection is what is slow, so every
subscription on it is behind). The client reconnects and resumes each subscription with
``after:`` = the last cursor it received, and the replay fills the gap.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import structlog

log = structlog.get_logger("quartermaster.live")

#: "Try Again Later" (RFC 6455 registry). Not 4429: graphql-transport-ws uses that for "too
#: many initialisation requests", and the reference client treats it as fatal, while it
#: reconnects after 1013.
SLOW_CLOSE_CODE = 1013
SLOW_CLOSE_REASON = "Subscriber too slow: reconnect and resume with after"
#: Scope key under which the request middleware leaves the ASGI server's own ``send`` of a
#: WebSocket connection (``http.RequestContextMiddleware``).
RAW_WEBSOCKET_SEND = "qm.websocket_send"


class FrameOwner(Protocol):
    """What a queued frame belongs to (a subscription)."""

    pending: int
    closed: bool


class LiveConnection:
    def __init__(
        self,
        send: Callable[[str], Awaitable[None]],
        close: Callable[[int, str], Awaitable[None]],
        queue_size: int,
        on_fail: Callable[[LiveConnection], None],
        on_slow: Callable[[], None] | None = None,
        cork: Callable[[bool], None] | None = None,
    ) -> None:
        self._send = send
        self._cork = cork
        self._holds = 0
        self._close = close
        self.queue_size = queue_size
        self._on_fail = on_fail
        self._on_slow = on_slow
        #: (owner, frame, callback after sending or None)
        self._frames: deque[tuple[FrameOwner, str, Callable[[], None] | None]] = deque()
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._close_task: asyncio.Task[None] | None = None
        #: A send that started synchronously in ``push`` but had to wait (socket full).
        self._inflight: asyncio.Task[None] | None = None
        #: The writer task is between taking a frame and having sent it.
        self._sending = False
        self.failed = False
        self.subscribers: set[Any] = set()

    def push(self, owner: FrameOwner, frame: str) -> bool:
        """Queue a frame; False (and the connection closed as too slow) when ``owner``
        already has ``queue_size`` frames waiting."""
        if self.failed or owner.closed:
            return False
        if owner.pending >= self.queue_size:
            self.fail_slow()
            return False
        if not self._frames and not self._sending and self._inflight is None:
            return self._send_now(frame)
        owner.pending += 1
        self._frames.append((owner, frame, None))
        self._kick()
        return True

    def _send_now(self, frame: str) -> bool:
        """Send without a task hop. The ASGI send completes without suspending while the
        socket takes data (uvicorn only waits when the transport is paused), so it is
        stepped right here; a send that does have to wait is finished by a task, and the
        frames behind it queue up as usual."""
        coro = self._send(frame)
        try:
            waiting_for = coro.send(None)  # type: ignore[attr-defined]
        except StopIteration:
            return True
        except Exception as exc:
            log.debug("live.connection.send_failed", error=type(exc).__name__)
            self._fail()
            return False
        self._inflight = asyncio.ensure_future(self._finish_send(coro, waiting_for))
        return True

    async def _finish_send(self, coro: Any, waiting_for: Any) -> None:
        """Drive ``coro`` on from where ``_send_now`` left it, the way a task would."""
        try:
            while True:
                try:
                    if waiting_for is None:  # a bare yield (sleep(0))
                        await asyncio.sleep(0)
                    else:
                        waiting_for._asyncio_future_blocking = False
                        await waiting_for
                except BaseException as exc:
                    waiting_for = coro.throw(exc)
                    continue
                waiting_for = coro.send(None)
        except StopIteration:
            pass
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("live.connection.send_failed", error=type(exc).__name__)
            self._fail()
        finally:
            self._inflight = None
            self._progress.set()
            if self._frames and not self.failed:
                self._kick()

    def hold(self) -> None:
        """Keep what is sent from now on in the kernel until ``release`` (TCP_CORK): the
        frames of a batch leave together. Holds nest; without a socket to cork, no-op."""
        self._holds += 1
        if self._holds == 1 and self._cork is not None and not self.failed:
            self._cork(True)

    def release(self) -> None:
        self._holds = max(0, self._holds - 1)
        if self._holds == 0 and self._cork is not None:
            self._cork(False)

    def push_last(self, owner: FrameOwner, frame: str, then: Callable[[], None]) -> None:
        """Queue a final frame of ``owner`` (after its pending ones); ``then`` runs right
        before it is sent, or at once if the connection is gone."""
        if self.failed:
            then()
            return
        owner.pending += 1
        self._frames.append((owner, frame, then))
        self._kick()

    async def wait_capacity(self, owner: FrameOwner) -> None:
        """Wait until ``owner`` has room for another frame (replay paces itself here)."""
        while not self.failed and owner.pending >= self.queue_size // 2 + 1:
            self._progress.clear()
            await self._progress.wait()

    def _kick(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="qm-live-writer")
        self._wake.set()

    async def _run(self) -> None:
        frames = self._frames
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self._inflight is not None:
                    continue  # it kicks us again when it is done
                self._sending = True
                while frames:
                    owner, frame, then = frames.popleft()
                    owner.pending -= 1
                    if then is not None:
                        then()
                    elif owner.closed:
                        continue
                    await self._send(frame)
                    self._progress.set()
                self._sending = False
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the peer went away: the handler's read loop sees it too
            log.debug("live.connection.send_failed", error=type(exc).__name__)
            self._fail()

    def fail_slow(self) -> None:
        if self.failed:
            return
        log.warning("live.subscriber.too_slow", queue_size=self.queue_size)
        if self._on_slow is not None:
            self._on_slow()
        self._fail()
        # The writer may be stuck in a send to a client that does not read; the close frame
        # goes out behind whatever the transport still holds, from a task of its own.
        self._close_task = asyncio.create_task(self._close_quietly(), name="qm-live-close")

    async def _close_quietly(self) -> None:
        with contextlib.suppress(Exception):
            await self._close(SLOW_CLOSE_CODE, SLOW_CLOSE_REASON)

    def _fail(self) -> None:
        if self.failed:
            return
        self.failed = True
        callbacks = [then for _, _, then in self._frames if then is not None]
        self._frames.clear()
        for task in (self._task, self._inflight):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        self._progress.set()
        for then in callbacks:
            then()
        self._on_fail(self)

    async def aclose(self) -> None:
        """The handler is shutting down: stop writing (no close frame; the socket is gone)."""
        self._fail()
        for task in (self._task, self._close_task):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
