"""The OpenAI-compatible API as pure functions: request parsing and answer rendering,
server-sent events, stop sequences, and speaking to an OpenAI-compatible upstream.

May import: the standard library (no I/O), `mesh.errors`, `mesh.inference`.
"""
