"""Users and their quotas: API keys, signed user entries, quota rules counted from the
ledger, and the lease state machine.

May import: the standard library (no I/O), cryptography, `mesh.errors`, `mesh.inference`,
`mesh.ledger`, `mesh.trust`, `mesh.wire`.
"""
