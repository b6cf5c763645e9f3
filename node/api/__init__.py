"""The box's HTTP face: the OpenAI-compatible API, the owner's administration (users, mesh
invitations and revocations) and how a request proves it is the owner's.

May import: `mesh`, `node.store`, `node.transport`, `node.serving`.
"""
