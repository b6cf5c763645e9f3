"""What the node keeps on disk: the SQLite ledger, the trust files (mesh, certificate,
revocations), the users file, and the worker processes that check ledger signatures.

May import: `mesh`. The lowest of node's layers (store <- transport <- serving <- api).
"""
