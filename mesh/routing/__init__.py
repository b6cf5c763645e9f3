"""Routing: which peers are known and how they are doing, who serves a request, what a
candidate's failure means, LAN discovery hints, the relay's rules, and the caps on what
strangers may hold (rate limits, connection limits).

May import: the standard library (no I/O), `mesh.errors`, `mesh.inference`, `mesh.trust`,
`mesh.wire`.
"""
