"""Everything that carries bytes between nodes: the gRPC server and its front, clients to
peers, the relay link, peering (keeping in touch) and the peer directory, mDNS discovery,
the capped listeners of the public ports, and batching a stream for the wire. The servers
serve a `NodeCalls` protocol (`calls.py`), never the serving layer itself. `node_pb2_grpc.py`
is the generated NodeService stub (scripts/gen_proto.py).

May import: `mesh`, `cloud_relay` (the relay's client side), `node.store`.
"""
