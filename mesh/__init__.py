"""Allerac Mesh library: identity, configuration, the inference domain and the wire contract.

`mesh` never imports `node` or `cloud_relay`; protocol logic here takes values
(bytes, dataclasses, `now`) and returns values, and the asyncio edges live in
the agent (`node/`) and the relay (`cloud_relay/`).
"""

__version__ = "0.1.0"
# 4: admins by signed delegation; cards carry the box profile and each model's features
# (tools, structured output, logprobs, embeddings...); requests carry every OpenAI field; a
# node's load says how many requests it decodes at once (Load.parallel); lease reports
# name their lease and carry its total (a report sent again shrinks the home's hold once).
PROTOCOL_VERSION = 4
