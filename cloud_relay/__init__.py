"""The Allerac relay server (DESIGN.md "Relay"); built in the issue "Across the internet".

`relay_pb2_grpc.py` is the generated RelayService stub (scripts/gen_proto.py); the node's
relay link imports it from here. May import: `mesh` (never `node`).
"""
