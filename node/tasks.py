"""Background work with an owner: one `Tasks` per object that runs loops or errands, so no
task outlives its owner and none fails unseen.

`start` runs a coroutine as a named task the group keeps; `aclose` lets the running ones
finish for at most `grace_s`, then cancels what is left and waits for it. A task that
ends with an exception other than cancellation is logged once, with its name.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

logger = logging.getLogger(__name__)


class Tasks:
    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._running: set[asyncio.Task[Any]] = set()
        self._closed = False

    def start(self, work: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        if self._closed:
            work.close()
            raise RuntimeError(f"{self._owner} is closed: cannot start {name}")
        task = asyncio.create_task(work, name=f"{self._owner}: {name}")
        self._running.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("%s failed", task.get_name(), exc_info=task.exception())

    def __len__(self) -> int:
        return len(self._running)

    @property
    def closed(self) -> bool:
        return self._closed

    async def aclose(self, grace_s: float = 0.0) -> None:
        """Stop: no new task starts; running ones get `grace_s` to end, then are cancelled.
        Safe to call more than once."""
        self._closed = True
        running = list(self._running)
        if running and grace_s > 0:
            await asyncio.wait(running, timeout=grace_s)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
