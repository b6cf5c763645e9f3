"""A TCP proxy that appends every byte it forwards, both ways, to a file.

Run as `python -m tests.recording_proxy LISTEN_PORT TARGET_HOST:PORT OUTFILE`: what a
relay (or anyone on the path) receives and sends, for tests that assert a canary never
appears in it. A connection whose target is down is closed, and the next one tries again,
so the proxy outlives a relay restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Any


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, out: Any) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            out.write(data)
            out.flush()
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(ConnectionError, OSError):
        writer.close()


async def main(port: int, target: str, out_path: str) -> None:
    host, _, target_port = target.rpartition(":")
    out = open(out_path, "ab")  # noqa: ASYNC230 - one file for the proxy's life

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(host, int(target_port))
        except OSError:
            client_w.close()
            return
        await asyncio.gather(_pipe(client_r, server_w, out), _pipe(server_r, client_w, out))

    server = await asyncio.start_server(handle, "0.0.0.0", port)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3]))
