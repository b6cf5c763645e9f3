"""How many tokens a serving node's usage record may claim, bounded by what the entry node
saw itself (DESIGN.md "Usage ledger and quotas"). Sans I/O.

The entry node countersigns the record of a node that served a request it let in. The
record's counts are that node's word, and so are the counts in its Finish event and
deltas; what the entry node knows for itself is the request it sent and the text it
delivered. From those:

- prompt tokens: at most `mesh.quota.rules.prompt_bound` of the request sent (byte-level BPE
  makes at least one byte of text per token; the chat template adds a few tokens per
  message). A chat that brings no system message may get the serving node's own system
  prompt: at most `MAX_SYSTEM_PROMPT_CHARS` characters (config.py's limit), 4 UTF-8
  bytes each, and one more message's template.
- completion tokens: at most the request's max_tokens, and at most the UTF-8 bytes of
  the text delivered from that node (each generated token adds at least one byte; a
  character split over tokens still counts its bytes, a bad byte becomes a 3-byte
  U+FFFD), plus one per delta received (a control token renders no text), plus the bytes
  of the longest stop sequence (text generated, then held back when a stop matched),
  plus `COMPLETION_SLACK` (the token a stop ended inside).

A record past either bound bills for tokens that cannot have been delivered: the entry
node refuses to countersign it (`mesh.ledger.records.refuse`). The bounds are generous on
purpose: an honest node never meets them. What they cannot see: inflation that stays
inside them (up to a few tokens per delivered byte), and tokens an upstream generates
but never sends (hidden reasoning tokens of a cloud API): those are refused too.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.inference import InferenceRequest
from mesh.quota.rules import TEMPLATE_TOKENS_PER_MESSAGE, prompt_bound
from mesh.wire.v1 import ledger_pb2 as lpb

MAX_SYSTEM_PROMPT_CHARS = 16384  # mesh/config.py: a model's system_prompt
SYSTEM_PROMPT_TOKENS = MAX_SYSTEM_PROMPT_CHARS * 4 + TEMPLATE_TOKENS_PER_MESSAGE
COMPLETION_SLACK = 16


@dataclass(frozen=True, kw_only=True, slots=True)
class Delivered:
    """What the entry node delivered to its client from one serving node."""

    text_bytes: int = 0  # UTF-8 bytes of the text
    deltas: int = 0  # text deltas it came in

    def plus(self, text: str) -> Delivered:
        return Delivered(
            text_bytes=self.text_bytes + len(text.encode("utf-8")), deltas=self.deltas + 1
        )


def prompt_tokens_bound(request: InferenceRequest) -> int:
    """The most prompt tokens serving `request` can take."""
    bound = prompt_bound(request)
    if request.messages is not None and not any(m.role == "system" for m in request.messages):
        bound += SYSTEM_PROMPT_TOKENS
    return bound


def completion_tokens_bound(request: InferenceRequest, delivered: Delivered) -> int:
    """The most tokens the serving node can have generated for the text delivered."""
    stop_bytes = max((len(stop.encode("utf-8")) for stop in request.sampling.stop), default=0)
    bound = delivered.text_bytes + delivered.deltas + stop_bytes + COMPLETION_SLACK
    if request.sampling.max_tokens is not None:
        bound = min(bound, request.sampling.max_tokens)
    return bound


def implausible(record: lpb.UsageRecord, request: InferenceRequest, delivered: Delivered) -> str:
    """What the record claims beyond what can be true ("" when nothing)."""
    reasons = []
    prompt = prompt_tokens_bound(request)
    if record.prompt_tokens > prompt:
        reasons.append(
            f"it claims {record.prompt_tokens} prompt tokens; the prompt sent can be at most "
            f"{prompt}"
        )
    completion = completion_tokens_bound(request, delivered)
    if record.completion_tokens > completion:
        reasons.append(
            f"it claims {record.completion_tokens} completion tokens; the text delivered "
            f"({delivered.text_bytes} bytes in {delivered.deltas} deltas) can be at most "
            f"{completion}"
        )
    return "; ".join(reasons)
