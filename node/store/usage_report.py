"""What `allerac usage` and `allerac ledger verify` report, and `GET /allerac/usage` serves:
one computation over a ledger file, for the command (no node needed) and the running node
(off its event loop), so the numbers are the same wherever they are read.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError

from mesh.errors import ConfigError
from mesh.ledger.records import period_bounds, refused_records, summarize, verify
from mesh.trust.names import node_label
from mesh.wire.v1.ledger_pb2 import UsageRecord
from node.store.ledger_store import LedgerFile, read_ledger_file

ChunkMap = Callable[..., Any]


def existing_ledger(root: Path, ledger_file: Path) -> Path:
    """The ledger file of a home a node has run in; a clear error for any other path, so
    that a mistyped --home never 'verifies' or reports an empty ledger."""
    if not root.is_dir():
        raise ConfigError(f"no data dir {root}: no node has run there (check --home)")
    if not ledger_file.is_file():
        raise ConfigError(f"no ledger in {root}: no node has run with this data dir (check --home)")
    return ledger_file


def verified_ledger(
    ledger_file: Path, *, require_receipts: bool, map_chunks: ChunkMap | None = None
) -> tuple[LedgerFile, Any]:
    """Everything in a ledger file, and its verification."""
    held = read_ledger_file(ledger_file)
    report = verify(
        held.records,
        held.receipts,
        refusals=held.refusals,
        heads=held.heads,
        marks=held.marks,
        positions=held.positions,
        require_receipts=require_receipts,
        map_chunks=map_chunks,
    )
    return held, report


def _parsed(held: LedgerFile) -> list[UsageRecord]:
    """The records that parse (the others are reported by verify as bad signatures)."""
    parsed = []
    for signed in held.records:
        try:
            parsed.append(UsageRecord.FromString(signed.record))
        except DecodeError:
            continue
    return parsed


def verification(held: LedgerFile, report: Any) -> dict[str, Any]:
    """`ledger verify --json`: problems by node and sequence, receipts still awaited (a
    record served for another entry node is countersigned there until the ledgers sync),
    each chain's reach and signed head."""
    awaiting = {(p.node_id, p.seq) for p in report.problems if p.kind == "no_receipt"}
    others = {
        (record.node_id, record.seq)
        for record in _parsed(held)
        if (record.node_id, record.seq) in awaiting and record.entry_node_id != record.node_id
    }
    awaited = [
        p for p in report.problems if p.kind == "no_receipt" and (p.node_id, p.seq) in others
    ]
    problems = [p for p in report.problems if p not in awaited]
    chains = [
        {
            "node_id": node_id,
            "seq": report.tops.get(node_id, 0),
            "signed_seq": report.heads[node_id].seq if node_id in report.heads else 0,
            "countersigned_by": (
                list(report.heads[node_id].countersigned_by) if node_id in report.heads else []
            ),
        }
        for node_id in sorted(set(report.tops) | set(report.heads))
    ]
    return {
        "ok": not problems,
        "records": report.records,
        "nodes": report.nodes,
        "awaiting_receipts": len(awaited),
        "problems": [
            {"kind": p.kind, "node_id": p.node_id, "seq": p.seq, "detail": p.detail}
            for p in problems
        ],
        "chains": chains,
    }


def usage(
    held: LedgerFile,
    report: Any,
    *,
    by: str,
    user: str | None,
    period: str,
    now_ms: int,
    names: dict[str, str],
) -> dict[str, Any]:
    """`allerac usage --json`: rows by node, model, tier, user or day; records not counted
    (refused by their entry node); records known to be missing. Rows by node carry the
    node's display name."""
    since, until = period_bounds(period, now_ms=now_ms)
    refused = refused_records(held.records, held.refusals)
    rows = summarize(
        held.records, by=by, user=user, since_ms=since, until_ms=until, excluded=refused
    )
    missing = [
        {"node_id": p.node_id, "from_seq": p.seq, "to_seq": p.last_seq}
        for p in report.problems
        if p.kind in ("gap", "truncated")
    ]
    refused_rows = [
        {
            "node_id": r.node_id,
            "seq": r.seq,
            "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens,
        }
        for r in sorted(refused.values(), key=lambda r: (r.node_id, r.seq))
        if (user is None or r.user == user) and since <= r.ended_at_unix_ms < until
    ]
    return {
        "period": period,
        "by": by,
        "rows": [
            {
                by: r.key,
                **({"display_name": node_label(r.key, names)} if by == "node" else {}),
                "requests": r.requests,
                "prompt_tokens": r.prompt_tokens,
                "completion_tokens": r.completion_tokens,
            }
            for r in rows
        ],
        "refused": refused_rows,
        "missing": missing,
    }
