"""A serving node that bills for tokens it never delivered (issue 12, finding 6), against
real node processes: the hostile member is a real `allerac up` whose model claims far
more tokens than the text it sends can be (tests/inflating_node.py); the entry node is
an unmodified node. The entry node checks the record against what it saw itself (the
prompt it sent, the text it delivered) and refuses to countersign it; the refusal is
signed, kept with the record as proof, travels with it, and `ledger verify` names it on
every box that holds it."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.ledger.records import open_record, record_hash
from tests.inflating_node import CLAIMED_PROMPT_TOKENS, WORDS
from tests.members import models_config, read_ledger
from tests.nodeproc import NodeProcess, run_cli
from tests.test_lan_mesh import peer_states, post, wait_until

HOSTILE = [sys.executable, str(Path(__file__).resolve().parent / "inflating_node.py")]
HOSTILE_CONFIG = '[[models]]\nname = "inflated"\npath = "{path}"\nbackend = "test_inflating"\n'
ASK = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say hello."},
]


@pytest.fixture(scope="module")
def entry_and_hostile(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[NodeProcess, NodeProcess]]:
    from node.store.config_file import embedded_model_path

    root = tmp_path_factory.mktemp("inflation")
    nodes: list[NodeProcess] = []
    try:
        entry = NodeProcess(root / "entry", config=models_config("smollm2-135m-instruct"))
        nodes.append(entry.start())
        hostile = NodeProcess(
            root / "hostile",
            "--peer",
            entry.info["grpc_address"],
            config=HOSTILE_CONFIG.format(path=embedded_model_path()),
            command=HOSTILE,
        )
        nodes.append(hostile.start())
        code = run_cli(entry.home, "mesh", "invite").stdout.strip()
        joined = run_cli(hostile.home, "mesh", "join", code)
        assert joined.returncode == 0, joined.stderr
        wait_until(
            lambda: peer_states(entry).get(hostile.node_id) == "up", 15, "the hostile box is up"
        )
        yield entry, hostile
    finally:
        for node in nodes:
            node.kill()


def test_an_inflated_record_is_refused_kept_as_proof_and_named_by_verify(
    entry_and_hostile: tuple[NodeProcess, NodeProcess],
) -> None:
    entry, hostile = entry_and_hostile
    code, headers, body = post(
        entry, "/v1/chat/completions", {"model": "inflated", "messages": ASK, "max_tokens": 64}
    )
    assert code == 200, body
    assert headers["x-allerac-node"] == hostile.node_id
    assert body["choices"][0]["message"]["content"] == "".join(WORDS)
    # The client is told what the entry node can vouch for, not what the box claimed.
    assert body["usage"]["prompt_tokens"] < CLAIMED_PROMPT_TOKENS
    assert body["usage"]["completion_tokens"] <= 64

    records, receipts = read_ledger(entry.home)
    [inflated] = [r for r in records if open_record(r).node_id == hostile.node_id]
    record = open_record(inflated)
    assert record.prompt_tokens == CLAIMED_PROMPT_TOKENS  # what the hostile box signed
    # Not countersigned: no receipt of the entry node over it.
    assert record_hash(inflated) not in {r.record_hash for r in receipts}

    checked = run_cli(entry.home, "ledger", "verify", "--json")
    assert checked.returncode == 1, checked.stdout + checked.stderr
    problems = json.loads(checked.stdout)["problems"]
    refused = [p for p in problems if p["kind"] == "refused"]
    assert [(p["node_id"], p["seq"]) for p in refused] == [(hostile.node_id, record.seq)]
    assert "prompt tokens" in refused[0]["detail"]
    assert "completion tokens" in refused[0]["detail"]
    # Usage does not count what the entry node refused, and says so.
    usage = run_cli(entry.home, "usage", "--by", "node", "--json")
    assert usage.returncode == 0, usage.stderr
    shown = json.loads(usage.stdout)
    assert hostile.node_id not in {row["node"] for row in shown["rows"]}
    assert shown["refused"] == [
        {
            "node_id": hostile.node_id,
            "seq": record.seq,
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens,
        }
    ]

    # The refusal travels with the record: the hostile box's own ledger names it too.
    def named_at_hostile() -> bool:
        at_hostile = run_cli(hostile.home, "ledger", "verify", "--json")
        kinds = {(p["kind"], p["seq"]) for p in json.loads(at_hostile.stdout)["problems"]}
        return ("refused", record.seq) in kinds

    wait_until(named_at_hostile, 20, "the refusal reaches the serving box")
