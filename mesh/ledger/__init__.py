"""The signed usage ledger without I/O: records and receipts, verification, the bounds a
serving node's claim must keep, and anti-entropy between members.

May import: the standard library (no I/O), cryptography, `mesh.errors`, `mesh.inference`,
`mesh.trust`, `mesh.wire`.
"""
