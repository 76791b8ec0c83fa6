"""A subscription of the bus: the valid messages on one topic pattern, as an async iterator.

The :class:`~fogmig.platform.bus.client.Bus` delivers into it; a consumer that stalls loses its
oldest messages rather than stalling the bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import TracebackType
from typing import TYPE_CHECKING, Final, NamedTuple, Self

from fogmig.platform.bus.schemas import BusMessage, Cleared

if TYPE_CHECKING:
    from fogmig.platform.bus.client import Bus

log = logging.getLogger(__name__)


class Received(NamedTuple):
    """One valid message from a subscription."""

    topic: str
    message: BusMessage | Cleared


class _End:
    """Marks the end of a subscription's stream."""


_END: Final = _End()


class Subscription:
    """A stream of valid messages on one topic pattern (an async iterator and context manager).

    QoS 1 is at-least-once: a message may arrive twice (and retained ones again after a
    reconnection), so consumers treat messages as idempotent updates.
    """

    def __init__(self, bus: Bus, pattern: str, maxsize: int) -> None:
        self.pattern = pattern
        self.dropped = 0
        self._bus = bus
        self._queue: asyncio.Queue[Received | _End] = asyncio.Queue(maxsize)
        self._opened = False
        self._closed = False

    async def open(self) -> Self:
        """Subscribe at the broker; returns once the broker has acknowledged it."""
        if not self._opened:
            self._opened = True
            await self._bus._add(self)
        return self

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._end()
            if self._opened:
                await self._bus._remove(self)

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Received:
        if not self._opened:
            await self.open()
        item = await self._queue.get()
        if isinstance(item, _End):
            self._end()  # keep the marker for any later reader
            raise StopAsyncIteration
        return item

    def _deliver(self, item: Received) -> None:
        if self._closed:
            return
        if self._queue.full():
            # A stalled consumer must not stall the whole bus: drop its oldest message.
            with contextlib.suppress(asyncio.QueueEmpty):
                self._queue.get_nowait()
            self.dropped += 1
            log.warning("subscription %s is full: dropped its oldest message", self.pattern)
        self._queue.put_nowait(item)

    def _end(self) -> None:
        while True:
            try:
                self._queue.put_nowait(_END)
                return
            except asyncio.QueueFull:
                self._queue.get_nowait()
