"""The bound on what a serving node's usage record may claim, from what the entry node saw
(mesh/ledger_bounds.py): an honest node's counts never meet it, whatever the text and
however it was split into tokens and deltas; counts past it are named."""

from __future__ import annotations

import codecs

from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.inference import ChatMessage, InferenceRequest, Sampling
from mesh.ledger.bounds import (
    Delivered,
    completion_tokens_bound,
    implausible,
    prompt_tokens_bound,
)
from mesh.wire.v1 import ledger_pb2 as lpb

TEXT = st.text(max_size=200)


@st.composite
def requests(draw: st.DrawFn) -> InferenceRequest:
    stop = tuple(draw(st.lists(st.text(min_size=1, max_size=12), max_size=2)))
    max_tokens = draw(st.one_of(st.none(), st.integers(1, 400)))
    sampling = Sampling(max_tokens=max_tokens, stop=stop)
    if draw(st.booleans()):
        return InferenceRequest(model="m", prompt=draw(TEXT), sampling=sampling)
    roles = st.sampled_from(["system", "user", "assistant"])
    messages = draw(
        st.lists(st.builds(ChatMessage, role=roles, content=TEXT), min_size=1, max_size=4)
    )
    return InferenceRequest(model="m", messages=tuple(messages), sampling=sampling)


def _honest_prompt_tokens(request: InferenceRequest, system_prompt: str) -> int:
    """The most a byte-level tokenizer makes of the prompt: a token per byte, a BOS, a few
    template tokens per message, the node's own system prompt when the chat has none."""
    if request.messages is None:
        return len((request.prompt or "").encode()) + 1
    texts = [m.content for m in request.messages]
    if not any(m.role == "system" for m in request.messages):
        texts.append(system_prompt)
    return sum(len(t.encode()) for t in texts) + 1 + 8 * (len(texts) + 1)


@settings(max_examples=300, deadline=None)
@given(
    requests(),
    st.binary(max_size=300),
    st.data(),
    st.text(max_size=300),
)
def test_an_honest_nodes_counts_are_never_refused(
    request: InferenceRequest, answer: bytes, data: st.DataObject, system_prompt: str
) -> None:
    # The answer's bytes cut into tokens of at least one byte each (a character may be
    # split over tokens); a few control tokens render nothing.
    cuts = sorted(data.draw(st.sets(st.integers(1, max(len(answer) - 1, 1)), max_size=300)))
    cuts = [c for c in cuts if c < len(answer)]
    pieces = [answer[a:b] for a, b in zip([0, *cuts], [*cuts, len(answer)], strict=True) if b > a]
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    texts = [decoder.decode(piece) for piece in pieces]
    texts[-1:] = [texts[-1] + decoder.decode(b"", final=True)] if texts else []
    # Deltas as the node sends them: each released text (never empty), some merged.
    released = [t for t in texts if t]
    merge = data.draw(st.integers(1, 4))
    deltas = ["".join(released[i : i + merge]) for i in range(0, len(released), merge)]
    control = data.draw(st.integers(0, len(deltas)))
    generated = len(pieces) + control
    wanted = request.sampling.max_tokens
    if wanted is not None and generated > wanted:
        return  # the node would have stopped at max_tokens: another answer
    delivered = Delivered()
    for text in deltas:
        delivered = delivered.plus(text)
    record = lpb.UsageRecord(
        prompt_tokens=_honest_prompt_tokens(request, system_prompt),
        completion_tokens=generated,
    )
    assert implausible(record, request, delivered) == ""


@settings(max_examples=200, deadline=None)
@given(requests(), st.text(max_size=200), st.integers(1, 10**6), st.integers(1, 10**6))
def test_counts_past_the_bound_are_named(
    request: InferenceRequest, text: str, extra_prompt: int, extra_completion: int
) -> None:
    delivered = Delivered().plus(text) if text else Delivered()
    prompt = prompt_tokens_bound(request)
    completion = completion_tokens_bound(request, delivered)
    assert (
        implausible(
            lpb.UsageRecord(prompt_tokens=prompt, completion_tokens=completion), request, delivered
        )
        == ""
    )
    too_many = lpb.UsageRecord(
        prompt_tokens=prompt + extra_prompt, completion_tokens=completion + extra_completion
    )
    reason = implausible(too_many, request, delivered)
    assert f"{prompt + extra_prompt} prompt tokens" in reason
    assert f"{completion + extra_completion} completion tokens" in reason


def test_the_bound_is_tight_where_the_entry_node_knows_the_whole_prompt() -> None:
    chat = InferenceRequest(
        model="m",
        messages=(
            ChatMessage(role="system", content="Be brief."),
            ChatMessage(role="user", content="Say hello."),
        ),
        sampling=Sampling(max_tokens=64),
    )
    assert prompt_tokens_bound(chat) == len("Be brief.Say hello.") + 32 * 3
    delivered = Delivered().plus("Hello from a greedy box.")
    assert completion_tokens_bound(chat, delivered) == 24 + 1 + 16
    # A chat without a system message may get the serving node's own.
    bare = InferenceRequest(model="m", messages=(ChatMessage(role="user", content="Hi"),))
    assert prompt_tokens_bound(bare) > 16384 * 4
