"""Allerac Mesh library: identity, configuration, the inference domain and the wire contract.

`mesh` never imports `node` or `cloud_relay`; protocol logic here takes values
(bytes, dataclasses, `now`) and returns values, and the asyncio edges live in
the agent (`node/`) and the relay (`cloud_relay/`).
"""

__version__ = "0.1.0"
PROTOCOL_VERSION = 4
