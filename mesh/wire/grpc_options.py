"""Every gRPC server and channel option, built in one place.

Limits follow the style guide: a maximum message size on both directions,
keepalive so dead peers are noticed, and a floor on how often a client may
ping (a peer pinging faster than that is disconnected by the server). Values only: the
servers and channels that take them live in `node/` and `cloud_relay/`.
"""

from __future__ import annotations

from mesh.wire.codec import MAX_MESSAGE_BYTES

KEEPALIVE_TIME_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 5_000
MIN_PING_INTERVAL_MS = 10_000
MAX_CONCURRENT_STREAMS = 64  # per connection
MAX_STREAMS_PER_PEER = 16  # per sending node, across its connections
MAX_CALL_S = 1800.0  # a server-side bound for callers that set no deadline
# The node's gRPC server sits behind its front (node/grpc_front.py), which caps connections
# per source; these are backstops for what reaches the server some other way (a local
# process connecting to its loopback port directly): a connection must finish the HTTP/2
# handshake within this (gRPC's default is 120 s), and the server holds at most the
# front's total plus this margin.
HANDSHAKE_TIMEOUT_MS = 10_000
BACKSTOP_MARGIN_CONNECTIONS = 64


def server_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_concurrent_streams", MAX_CONCURRENT_STREAMS),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.so_reuseport", 0),
    ]


def node_server_options(*, max_connections: int) -> list[tuple[str, int]]:
    """The node's gRPC server: `server_options()` plus the backstops above."""
    return [
        *server_options(),
        ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
        ("grpc.max_allowed_incoming_connections", max_connections + BACKSTOP_MARGIN_CONNECTIONS),
    ]


def channel_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
