"""SIGHUP for a running node: reload the configuration, never stop (issue 17).

Closing the SSH session that runs `allerac up` sends SIGHUP; by default it kills the
process at once, cutting answers in flight and leaving a stale `run/node.json`. The
handler is installed before the node starts, so a SIGHUP during start-up is not lost
either: it is answered with a reload once the node serves. Reloads run one after another
on the event loop (`node.reconfigure`); SIGINT and SIGTERM stop the node as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from node.reconfigure import Reconfigurer

logger = logging.getLogger(__name__)


class SighupReloads:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._asked = asyncio.Event()
        loop.add_signal_handler(signal.SIGHUP, self._asked.set)

    async def serve_until(self, stop: asyncio.Event, reconfigurer: Reconfigurer) -> None:
        """Reload at every SIGHUP until `stop` is set."""
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                asked = asyncio.ensure_future(self._asked.wait())
                try:
                    await asyncio.wait({stopping, asked}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    asked.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await asked
                if self._asked.is_set() and not stop.is_set():
                    self._asked.clear()
                    logger.info("SIGHUP: reloading the configuration")
                    await reconfigurer.reload_logged()
        finally:
            stopping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stopping
