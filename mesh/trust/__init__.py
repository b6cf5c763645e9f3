"""Trust: who a node is and who belongs to the mesh (identity, membership, encryption keys,
sealing, invites, signed goodbyes, node cards).

May import: the standard library (no I/O), cryptography, `mesh.errors`, `mesh.wire`.
"""
