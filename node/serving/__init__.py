"""The node's work: answering a request (admission and quotas, the entry side with its plan
and failover, the serving side, accounting), the inference backends, the service other
nodes call (`node_service.NodeService`), and keeping the ledger and users in step with the
mesh.

May import: `mesh`, `node.store`, `node.transport`.
"""
