"""What usage cost, per route, from the prices a business sets (`[prices]` in config:
per 1,000 tokens on each route, and on a hosted API for comparison): `allerac usage
--cost`, so the cost of cloud overflow is seen next to the mesh's own hardware. Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mesh.ledger.records import UsageRow

TOKENS_PER_PRICE = 1000
HOSTED = "hosted"


@dataclass(frozen=True, kw_only=True)
class CostRow:
    route: str
    requests: int
    tokens: int
    cost: float | None  # None: no price set for this route
    hosted_cost: float | None  # what the same tokens cost on the hosted API (if priced)


def costs(rows: Sequence[UsageRow], prices: Mapping[str, float]) -> list[CostRow]:
    """`rows`: usage by tier (route). Tokens are prompt plus completion tokens."""
    hosted = prices.get(HOSTED)
    out = []
    for row in rows:
        tokens = row.prompt_tokens + row.completion_tokens
        price = prices.get(row.key)
        out.append(
            CostRow(
                route=row.key,
                requests=row.requests,
                tokens=tokens,
                cost=None if price is None else tokens * price / TOKENS_PER_PRICE,
                hosted_cost=None if hosted is None else tokens * hosted / TOKENS_PER_PRICE,
            )
        )
    return out
