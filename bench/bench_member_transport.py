"""What carrying one sealed request between two boxes costs, by transport: today's gRPC
call per request against the alternatives a faster LAN hop would need.

A server process answers every request with two replies, sized as a one-token answer's
two sealed frames (69 and 471 bytes) for a 1,748-byte sealed request (the sizes a LAN
request puts on the wire); this process sends one request at a time and waits for both
replies. No cryptography, no model: the transport alone. Measured in one run,
interleaved request by request:

  call, front    a gRPC unary-stream call per request, through the node's own front
                 (`node.transport.grpc_front.GrpcFront`, its interceptor in the server):
                 what a LAN request takes today (the baseline)
  call, direct   the same call to the gRPC server's own port (no front)
  stream, front  one long-lived gRPC bidirectional stream through the front: a request
                 is one message on it, its replies two messages back
  framed TCP     length-prefixed frames on one asyncio TCP connection

Issue 13 asks a LAN hop to add at most 2 ms to a request; `bench/bench_routing.py`
measures the whole hop (sealing, scheduling, the record) on the node itself.

    python bench/bench_member_transport.py [--requests 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesh.routing.connlimits import Caps  # noqa: E402
from mesh.wire import grpc_options  # noqa: E402
from node.transport.grpc_front import GrpcFront  # noqa: E402

REQUEST = os.urandom(1748)
REPLIES = (os.urandom(69), os.urandom(471))
CALL = "/allerac.bench.Member/Call"
LINK = "/allerac.bench.Member/Link"
LENGTH = struct.Struct(">I")


def _same(data: bytes) -> bytes:
    return data


async def _call(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    for reply in REPLIES:
        yield reply


async def _link(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> AsyncIterator[bytes]:
    async for _ in requests:
        for reply in REPLIES:
            yield reply


async def _framed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            (size,) = LENGTH.unpack(await reader.readexactly(LENGTH.size))
            await reader.readexactly(size)
            writer.write(b"".join(LENGTH.pack(len(r)) + r for r in REPLIES))
            await writer.drain()
    except asyncio.IncompleteReadError:
        writer.close()


async def serve() -> None:
    """The server side: prints its ports as one JSON line, then serves until killed."""
    front = GrpcFront(caps=Caps(per_source=64, total=256), member_deadline_s=3600.0)
    server = grpc.aio.server(
        interceptors=[front.interceptor],
        options=grpc_options.node_server_options(max_connections=256),
    )
    handlers = {
        "Call": grpc.unary_stream_rpc_method_handler(
            _call, request_deserializer=_same, response_serializer=_same
        ),
        "Link": grpc.stream_stream_rpc_method_handler(
            _link, request_deserializer=_same, response_serializer=_same
        ),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("allerac.bench.Member", handlers),)
    )
    backend_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    front_port = await front.start("127.0.0.1", 0, backend_port=backend_port)
    tcp = await asyncio.start_server(_framed, "127.0.0.1", 0)
    tcp_port = tcp.sockets[0].getsockname()[1]
    print(json.dumps({"front": front_port, "grpc": backend_port, "tcp": tcp_port}), flush=True)
    await server.wait_for_termination()


async def measure(ports: dict[str, int], requests: int) -> dict[str, list[float]]:
    options = grpc_options.channel_options()
    via_front = grpc.aio.insecure_channel(f"127.0.0.1:{ports['front']}", options=options)
    direct = grpc.aio.insecure_channel(f"127.0.0.1:{ports['grpc']}", options=options)
    call_front = via_front.unary_stream(CALL, request_serializer=_same, response_deserializer=_same)
    call_direct = direct.unary_stream(CALL, request_serializer=_same, response_deserializer=_same)
    link = via_front.stream_stream(LINK, request_serializer=_same, response_deserializer=_same)()
    reader, writer = await asyncio.open_connection("127.0.0.1", ports["tcp"])

    async def by_call(stub: Callable[..., AsyncIterator[bytes]]) -> None:
        async for _ in stub(REQUEST, timeout=10.0):
            pass

    async def by_stream() -> None:
        await link.write(REQUEST)
        for _ in REPLIES:
            await link.read()

    async def by_frames() -> None:
        writer.write(LENGTH.pack(len(REQUEST)) + REQUEST)
        await writer.drain()
        for _ in REPLIES:
            (size,) = LENGTH.unpack(await reader.readexactly(LENGTH.size))
            await reader.readexactly(size)

    ways: dict[str, Callable[[], Awaitable[None]]] = {
        "call, front": lambda: by_call(call_front),
        "call, direct": lambda: by_call(call_direct),
        "stream, front": by_stream,
        "framed TCP": by_frames,
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    names = list(ways)
    for i in range(requests + 200):  # the first 200 warm every path up
        for name in names[i % len(names) :] + names[: i % len(names)]:
            started = time.perf_counter()
            await ways[name]()
            if i >= 200:
                times[name].append(time.perf_counter() - started)
    await link.done_writing()
    writer.close()
    await via_front.close()
    await direct.close()
    return times


def main(requests: int) -> None:
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        ports = json.loads(server.stdout.readline())
        times = asyncio.run(measure(ports, requests))
    finally:
        server.kill()
        server.wait()
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, grpcio {grpc.__version__}"
    )
    print(
        f"{requests} requests per transport, interleaved; a {len(REQUEST):,}-byte request, "
        f"replies of {' and '.join(str(len(r)) for r in REPLIES)} bytes"
    )
    baseline = statistics.median(times["call, front"]) * 1000
    print(f"{'':16} {'median (ms)':>12} {'vs call, front':>15}")
    for name, samples in times.items():
        ms = statistics.median(samples) * 1000
        print(f"{name:16} {ms:12.3f} {ms - baseline:+15.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve())
    else:
        main(args.requests)
