"""One attacking process for bench/bench_flood.py (standard library only, so that starting
several of them costs little): holds up to COUNT connections from 127.0.0.2 to
127.0.0.1:PORT, redials those the node closes (at most REDIAL_PER_S a second), and reports
once a second as a JSON line on stdout. KIND `idle` sends nothing; `slowloris` sends the
start of an HTTP request and one more header line every 5 s. Stops on SIGTERM.

    python bench/flood_worker.py KIND PORT COUNT REDIAL_PER_S [NICENESS]
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
import sys
import time

ATTACKER = "127.0.0.2"
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
SLOWLORIS_START = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
SLOWLORIS_EVERY_S = 5.0
DIALS_IN_FLIGHT = 256
# On a real network the attacker is another machine; here it shares 2 cores with the node,
# so by default it yields the CPU to the node where both want it (the kernel's share of
# every connection still lands on this machine).
NICENESS = 10


class _Held(asyncio.Protocol):
    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._worker.held.add(self)

    def data_received(self, data: bytes) -> None:
        pass  # an attacker does not read answers

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self._worker.held:
            self._worker.held.discard(self)
            self._worker.closed_by_node += 1


class Worker:
    def __init__(self, kind: str, port: int, count: int, redial_per_s: float) -> None:
        self.kind = kind
        self.port = port
        self.count = count
        self.redial_per_s = redial_per_s
        self.held: set[_Held] = set()
        self.dialed = 0
        self.reset = 0  # refused while connecting (a reset, or no answer in 10 s)
        self.closed_by_node = 0
        self.wave_done = False
        self._in_flight = asyncio.Semaphore(DIALS_IN_FLIGHT)
        self._dials: set[asyncio.Task[None]] = set()

    async def dial(self) -> None:
        loop = asyncio.get_running_loop()
        async with self._in_flight:
            self.dialed += 1
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((ATTACKER, 0))
                sock.setblocking(False)
                await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", self.port)), 10)
                transport, _ = await loop.create_connection(lambda: _Held(self), sock=sock)
            except (OSError, TimeoutError):
                self.reset += 1
                sock.close()
                return
            if self.kind == "slowloris":
                transport.write(SLOWLORIS_START)

    def spawn(self, n: int) -> None:
        for _ in range(n):
            task = asyncio.create_task(self.dial())
            self._dials.add(task)
            task.add_done_callback(self._dials.discard)

    def report(self) -> None:
        line = {
            "kind": self.kind,
            "open": len(self.held),
            "dialed": self.dialed,
            "reset": self.reset,
            "closed_by_node": self.closed_by_node,
            "wave_done": self.wave_done,
        }
        print(json.dumps(line), flush=True)

    async def run(self) -> None:
        self.report()  # started
        self.spawn(self.count)
        while self._dials:
            await asyncio.wait(set(self._dials), timeout=1.0)
            self.report()
        self.wave_done = True
        self.report()
        last_header = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            deficit = self.count - len(self.held) - len(self._dials)
            self.spawn(max(0, min(deficit, int(self.redial_per_s))))
            if self.kind == "slowloris" and time.monotonic() - last_header >= SLOWLORIS_EVERY_S:
                last_header = time.monotonic()
                for held in list(self.held):
                    if held.transport is not None:
                        held.transport.write(b"X-Still-Typing: 1\r\n")
            self.report()

    def close(self) -> None:
        for task in self._dials:
            task.cancel()
        for held in list(self.held):
            if held.transport is not None:
                held.transport.abort()


async def main(kind: str, port: int, count: int, redial_per_s: float, niceness: int) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this process's own share
    if niceness:
        os.nice(niceness)
    worker = Worker(kind, port, count, redial_per_s)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    running = asyncio.create_task(worker.run())
    try:
        await stop.wait()
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        worker.close()


if __name__ == "__main__":
    kind, port, count, redial = sys.argv[1:5]
    niceness = int(sys.argv[5]) if len(sys.argv) > 5 else NICENESS
    asyncio.run(main(kind, int(port), int(count), float(redial), niceness))
