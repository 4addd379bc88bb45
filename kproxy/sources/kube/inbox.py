"""The queue that carries watch events and status changes from the watch threads to the agent's loop,
in batches: one wake-up per burst."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Generic, TypeVar

# watch events applied per turn of the agent's loop
DRAIN_BATCH = 512

T = TypeVar("T")


class Inbox(Generic[T]):
    """Items put by any thread, applied one by one in the loop given to `attach` (`apply`), in the order
    they were put; `done` runs after each batch (even one cut short by an exception)."""

    def __init__(self, apply: Callable[[T], None], done: Callable[[], None]) -> None:
        self._apply = apply
        self._done = done
        self.loop: asyncio.AbstractEventLoop | None = None
        self._items: collections.deque[T] = collections.deque()
        self._scheduled = False

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop: items are applied in LOOP from now on."""
        self.loop = loop
        self._scheduled = False  # a drain scheduled on an earlier run's loop never comes

    def put(self, item: T) -> None:
        """A watch thread: queue a watch event or a watch's status change for the agent's loop, in the
        order they happened. The loop is woken (a write to its self-pipe, a syscall in each thread)
        only when the queue was empty: a burst crosses in one wake-up."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        self._items.append(item)
        if not self._scheduled:
            self._scheduled = True
            try:
                loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop closed meanwhile
                self._scheduled = False

    def _drain(self) -> None:
        """The agent's loop: apply queued items in order, at most DRAIN_BATCH per turn of the loop (a
        burst of thousands does not hold up the health server)."""
        self._scheduled = False  # before draining: an item queued from now on schedules again
        items = self._items
        try:
            for _ in range(min(len(items), DRAIN_BATCH)):
                self._apply(items.popleft())
        finally:
            self._done()
        if items and not self._scheduled and self.loop is not None:
            self._scheduled = True
            self.loop.call_soon(self._drain)
