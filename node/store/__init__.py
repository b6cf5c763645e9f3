"""What the node keeps on disk and reads from its box: the data directory (`home`), private
files written atomically (`files`), the identity key file, the SQLite ledger, the trust files
(mesh, certificate, revocations), the users file, and the worker processes that check ledger
signatures. `mesh` takes the bytes these read and returns the bytes these write.

May import: `mesh`. The lowest of node's layers (store <- transport <- serving <- api).
"""
