"""Accounting: the ledger records an answer leaves (DESIGN.md "Usage ledger and quotas").

- Served here: this node signs the record, and countersigns it too when the request came
  in here (`served_here`).
- Served by a peer: the entry node checks the peer's record against what it saw itself (the
  request it sent, the text delivered: `mesh.ledger.bounds`) and countersigns it, or keeps
  it with a signed refusal when it claims more than that can be; the answer then reports
  what this node can vouch for (`served_by_peer`).
- A source that stopped mid-answer: the entry node records what the client was sent from
  it (`partial`); a server that died cannot sign for it.
"""

from __future__ import annotations

import dataclasses
import logging

from mesh.clock import SYSTEM, Clock
from mesh.errors import MeshError
from mesh.inference import Finished, InferenceRequest, Route, ServedBy
from mesh.ledger.bounds import Delivered, completion_tokens_bound, implausible, prompt_tokens_bound
from mesh.ledger.records import Usage
from mesh.wire.v1 import ledger_pb2 as lpb
from node.store.ledger_store import LedgerStore

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Arrival:
    """Who let a request into the mesh, and the tier it took to reach this node."""

    entry_node_id: str
    route: Route


class Accountant:
    """One node's side of the ledger for the answers it serves or lets in. With no ledger
    (a node built without one) it records nothing and passes answers on as they are."""

    def __init__(self, *, node_id: str, ledger: LedgerStore | None, clock: Clock = SYSTEM) -> None:
        self._node_id = node_id
        self._ledger = ledger
        self._clock = clock

    async def served_here(
        self,
        *,
        model: str,
        asked: InferenceRequest,
        finished: Finished,
        arrival: Arrival,
        started_ms: int,
    ) -> Finished:
        """Sign the record of an answer this node's backend made (the store countersigns it
        in the same commit when the request came in here); the answer carries it to whoever
        let the request in."""
        ledger = self._ledger
        if ledger is None:
            return finished
        signed = await ledger.append(
            Usage(
                request_id=asked.request_id,
                entry_node_id=arrival.entry_node_id,
                user=asked.user,
                model=model,
                prompt_tokens=finished.prompt_tokens,
                completion_tokens=finished.completion_tokens,
                route=arrival.route.value,
                started_at_ms=started_ms,
                ended_at_ms=self._clock.now_ms(),
            )
        )
        # Countersigned in its own commit when the request came in here (the store sees
        # its own node as the entry node).
        return dataclasses.replace(finished, usage_record=signed.SerializeToString())

    async def served_by_peer(
        self,
        *,
        served_by: ServedBy,
        asked: InferenceRequest,
        finished: Finished,
        delivered: Delivered,
    ) -> Finished:
        """Check a peer's record against what this node sent and saw, and countersign it;
        or keep it with a signed refusal and report only what this node can vouch for."""
        ledger = self._ledger
        if ledger is None:
            return finished

        def judge(record: lpb.UsageRecord) -> str:
            if record.completion_tokens != finished.completion_tokens:
                return (
                    f"it counts {record.completion_tokens} completion tokens; its answer said "
                    f"{finished.completion_tokens}"
                )
            return implausible(record, asked, delivered)

        problem = await ledger.accept(
            finished.usage_record,
            served_by=served_by.node_id,
            request_id=asked.request_id,
            judge=judge,
        )
        if not problem:
            return finished
        logger.warning(
            "not countersigning the usage record of %s: %s", served_by.node_id[:7], problem
        )
        return dataclasses.replace(
            finished,
            usage_record=b"",  # not handed on either
            prompt_tokens=min(finished.prompt_tokens, prompt_tokens_bound(asked)),
            completion_tokens=min(
                finished.completion_tokens, completion_tokens_bound(asked, delivered)
            ),
        )

    async def partial(
        self,
        *,
        served_by: ServedBy,
        asked: InferenceRequest,
        tokens: int,
        started_ms: int,
        delivered: Delivered,
    ) -> lpb.SignedRecord | None:
        """The entry node's record of the part of an answer a source delivered before it
        stopped without finishing: what the client was sent is what the user used (the
        tokens the source counted, never more than the `delivered` text can be)."""
        ledger = self._ledger
        if ledger is None or tokens <= 0:
            return None
        if served_by.route is not Route.LOCAL:
            tokens = min(tokens, completion_tokens_bound(asked, delivered))
        try:
            signed = await ledger.append(
                Usage(
                    request_id=asked.request_id,
                    entry_node_id=self._node_id,
                    user=asked.user,
                    model=served_by.model,
                    prompt_tokens=0,  # the failed server never said; the continuation counts
                    completion_tokens=tokens,
                    route=served_by.route.value,
                    started_at_ms=started_ms,
                    ended_at_ms=self._clock.now_ms(),
                    partial=True,
                    served_by="" if served_by.route is Route.LOCAL else served_by.node_id,
                )
            )  # countersigned in its commit: this node is the entry node
        except MeshError as exc:
            logger.error("could not record a partial answer: %s", exc.message)
            return None
        return signed
