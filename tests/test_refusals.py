"""What the entry node does when a candidate fails (issue 13 item 6), as one table, and
the defects it fixes on real nodes: a box whose context is too small for the prompt (it
counts exactly; the scheduler estimates) hands the request to one with room, instead of
answering 400; an error that crosses a failed failover keeps its details."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.errors import (
    BadSignature,
    ContextLengthExceeded,
    InvalidRequest,
    MeshError,
    NotAMember,
    Overloaded,
    PermissionDenied,
    PrivacyNotAllowed,
    QuotaExceeded,
    ReplayDetected,
    Unavailable,
)
from mesh.routing.refusals import Next, after_candidate_failure
from mesh.wire import codec
from tests.test_lan_mesh import start_mesh

TRY, ANSWER = Next.TRY_NEXT, Next.ANSWER


@pytest.mark.parametrize(
    ("error", "remote", "next_"),
    [
        (Unavailable("down"), True, TRY),
        (Overloaded("full"), False, TRY),
        (QuotaExceeded("plan used up", resets_at="2026-12-01T00:00:00Z"), True, TRY),
        (ContextLengthExceeded("too long"), False, TRY),
        (ContextLengthExceeded("too long"), True, TRY),
        (BadSignature("forged"), True, TRY),
        (NotAMember("revoked"), True, TRY),
        (ReplayDetected("replayed"), True, TRY),  # the peer refuses us: another may serve
        (PermissionDenied("no"), True, TRY),
        (PermissionDenied("no"), False, ANSWER),
        (PrivacyNotAllowed("looser than the key"), False, ANSWER),
        (InvalidRequest("bad temperature"), True, ANSWER),  # every box would say so
        (MeshError("bug"), False, ANSWER),
    ],
)
def test_the_table(error: MeshError, remote: bool, next_: Next) -> None:
    if remote:
        error = error.said_by_peer()
    assert after_candidate_failure(error) is next_


def test_a_peers_refusal_arrives_as_the_peers_with_its_code() -> None:
    """Decoded from the wire, an error keeps its class and code and is marked the peer's;
    one this node raises is not."""
    wire = codec.error_to_pb(PermissionDenied("replayed request")).error
    error = codec.error_from_status(wire.grpc_status, wire.message, wire.code)
    assert type(error) is PermissionDenied
    assert error.from_peer
    assert after_candidate_failure(error) is Next.TRY_NEXT
    assert not PermissionDenied("replayed request").from_peer
    assert after_candidate_failure(PermissionDenied("no")) is Next.ANSWER


def test_a_reworded_error_keeps_its_kind_and_details() -> None:
    error = QuotaExceeded("over", param="quota", resets_at="2026-12-01T00:00:00Z")
    again = error.reworded("a failed mid-answer and nobody could continue it: over")
    assert type(again) is QuotaExceeded
    assert (again.param, again.resets_at, again.code) == ("quota", error.resets_at, error.code)
    assert str(again) == again.message == "a failed mid-answer and nobody could continue it: over"
    assert error.message == "over"  # the original is untouched


def _config(path: Path, context: int) -> str:
    from node.store.config_file import embedded_model_path

    return (
        f'[[models]]\nname = "m"\npath = "{embedded_model_path()}"\n'
        f'context_length = {context}\nsystem_prompt = "You are a helpful assistant."\n'
        "temperature = 0.0\n"
    )


@pytest.fixture
def small_and_large(tmp_path: Path) -> Iterator[dict[str, Any]]:
    nodes = start_mesh(
        tmp_path, {"small": _config(tmp_path, 256), "large": _config(tmp_path, 2048)}
    )
    try:
        yield nodes
    finally:
        for node in nodes.values():
            node.kill()


def _complete(url: str, prompt: str) -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(
        url + "/v1/completions",
        data=json.dumps({"model": "m", "prompt": prompt, "max_tokens": 4}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def test_a_context_too_small_for_the_exact_count_hands_over(
    small_and_large: dict[str, Any],
) -> None:
    small, large = small_and_large["small"], small_and_large["large"]
    # Digits and spaces cost a token each: the scheduler's estimate (a token per four
    # characters: 100) fits the small box's 256, its exact count (399) does not.
    prompt = " ".join(str(i % 10) for i in range(200))
    status, headers, body = _complete(small.url, prompt)
    assert status == 200, body
    assert headers["x-allerac-node"] == large.node_id
    # Where nobody has room, the client still hears why (400, context_length_exceeded).
    too_long = " ".join(str(i % 10) for i in range(3000))  # 5,999 tokens
    status, _, body = _complete(small.url, too_long)
    assert status == 400, body
    assert body["error"]["code"] == "context_length_exceeded"


def test_a_context_smaller_than_llamas_padding_is_the_one_enforced(tmp_path: Path) -> None:
    """llama.cpp pads a context of 96 up to 256 and reports 256, but llama-cpp-python's
    buffers hold 96 tokens: a 150-token prompt failed inside it as a 503. The configured
    context is the one reported and enforced (a clear 400)."""
    from tests.nodeproc import NodeProcess

    node = NodeProcess(tmp_path / "tiny", config=_config(tmp_path, 96)).start()
    try:
        status, _, body = _complete(node.url, " ".join(str(i % 10) for i in range(75)))
        assert status == 400, body
        assert body["error"]["code"] == "context_length_exceeded"
        assert "context of 96 tokens" in body["error"]["message"]
        status, _, body = _complete(node.url, "1 2 3")
        assert status == 200, body
    finally:
        node.kill()
