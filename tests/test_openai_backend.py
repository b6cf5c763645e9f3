"""The `openai` backend: a node serving through an OpenAI-compatible upstream.

The real upstream is another Allerac node on the embedded model (the `node` fixture);
a front node serves it as `backend = "openai"`, and the official client talks to the
front node. Broken, busy and slow upstreams are a small aiohttp server of the test's
own (`ScriptedUpstream`) whose answer depends on the model asked for.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import socket
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import openai
import pydantic
import pytest
from aiohttp import web

from mesh.config import ModelConfig, UpstreamConfig
from mesh.errors import MeshError, Unavailable
from mesh.inference import (
    ChatMessage,
    Finished,
    FinishReason,
    InferenceEvent,
    InferenceRequest,
    Sampling,
    TextDelta,
)
from node.serving.backends import create_backend
from node.serving.backends.openai_upstream import OpenAIUpstreamBackend
from tests.clients import openai_client
from tests.nodeproc import NodeProcess

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
KEY_VARIABLE = "ALLERAC_TEST_UPSTREAM_KEY"
UPSTREAM_KEY = "sk-test-4f1c9a"  # what the scripted upstream accepts
WAIT_S = 30.0


# --- a scripted upstream ----------------------------------------------------------------------


class ScriptedUpstream:
    """An OpenAI-compatible server on its own thread and loop, answering by model name:

    good        "Hello world", usage 7 + 2      no-usage    "Hello world", no usage chunk
    junk-json   a chunk that is not JSON        not-sse     200 with a JSON body
    http-500    500 "engine crashed"            busy        429
    too-long    vLLM's 400 about the context    cut-off     "Hello", then the stream ends
    broken-sse  "Hello", then invalid UTF-8     stall       "Hello", then waits for release()
    silent      never answers (until release() or the client leaves)
    tools       with tools: a streamed call of the first tool (finish_reason tool_calls);
                with a json_schema response format: a JSON weather report; else "Paris"
                with logprobs when asked (and the prompt first with echo)
    """

    MODELS = (
        "good",
        "no-usage",
        "junk-json",
        "not-sse",
        "http-500",
        "busy",
        "too-long",
        "cut-off",
        "broken-sse",
        "stall",
        "silent",
        "tools",
    )

    def __init__(self, sock: socket.socket | None = None, api_key: str | None = None) -> None:
        self._sock = sock
        self._api_key = api_key
        self.requests: list[dict[str, Any]] = []
        self.stalled = threading.Event()  # a stall/silent answer is waiting
        self.disconnected = threading.Event()  # ...and its client went away
        self._ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._release: asyncio.Event | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> ScriptedUpstream:
        self._thread.start()
        assert self._ready.wait(WAIT_S), "the scripted upstream did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(WAIT_S)

    def release(self) -> None:
        """Let waiting stall/silent answers go on."""
        assert self._loop is not None
        assert self._release is not None
        self._loop.call_soon_threadsafe(self._release.set)

    def reset(self) -> None:
        assert self._loop is not None

        async def clear() -> None:
            assert self._release is not None
            self._release.clear()

        asyncio.run_coroutine_threadsafe(clear(), self._loop).result(WAIT_S)
        self.stalled.clear()
        self.disconnected.clear()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._release = asyncio.Event()
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._answer)
        app.router.add_post("/v1/completions", self._answer)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site: web.BaseSite
        if self._sock is not None:
            site = web.SockSite(runner, self._sock)
        else:
            site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.base_events.Server)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def _refused(self, request: web.Request) -> web.Response | None:
        if self._api_key and request.headers.get("Authorization") != f"Bearer {self._api_key}":
            return web.json_response({"error": {"message": "invalid api key"}}, status=401)
        return None

    async def _models(self, request: web.Request) -> web.Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        return web.json_response({"data": [{"id": m, "object": "model"} for m in self.MODELS]})

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append({"authorization": request.headers.get("Authorization"), "body": body})
        refused = self._refused(request)
        if refused is not None:
            return refused
        chat = request.path.endswith("/chat/completions")
        model = body.get("model")

        def chunk(text: str | None, finish: str | None = None) -> bytes:
            if chat:
                choice: dict[str, Any] = {"delta": {} if text is None else {"content": text}}
            else:
                choice = {"text": text or ""}
            payload = {"choices": [{"index": 0, **choice, "finish_reason": finish}]}
            return b"data: " + json.dumps(payload).encode() + b"\n\n"

        usage = b'data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}\n\n'
        if model == "not-sse":
            return web.json_response({"oops": True})
        if model == "http-500":
            return web.json_response({"error": {"message": "engine crashed"}}, status=500)
        if model == "busy":
            return web.json_response({"error": {"message": "too many requests"}}, status=429)
        if model == "too-long":
            message = "This model's maximum context length is 2048 tokens. However, you asked more"
            return web.json_response({"object": "error", "message": message}, status=400)
        if model == "tools":
            return await self._tools(request, body, chat)
        if model == "silent":
            await self._wait_for_release()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if model == "junk-json":
            await response.write(b'data: {"choices": [{"delta": {"content": "Hel\n\n')
            return response
        await response.write(chunk("Hello"))
        if model == "cut-off":
            return response
        if model == "broken-sse":
            await response.write(b"data: \xff\xfe\n\n")
            return response
        if model == "stall":
            await self._wait_for_release()
        await response.write(chunk(" world"))
        await response.write(chunk(None, "stop"))
        if model != "no-usage":
            await response.write(usage)
        await response.write(b"data: [DONE]\n\n")
        return response

    async def _tools(
        self, request: web.Request, body: dict[str, Any], chat: bool
    ) -> web.StreamResponse:
        """What vLLM streams for tools and logprobs (OpenAI's shapes)."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def send(choice: dict[str, Any]) -> None:
            payload = {"choices": [{"index": 0, "logprobs": None, **choice}]}
            await response.write(b"data: " + json.dumps(payload).encode() + b"\n\n")

        if chat and body.get("tools"):
            name = body["tools"][0]["function"]["name"]
            first = {"index": 0, "id": "call_7", "type": "function"}
            first["function"] = {"name": name, "arguments": ""}
            await send({"delta": {"role": "assistant", "tool_calls": [first]}})
            for piece in ('{"city":', ' "Paris"}'):
                call = {"index": 0, "function": {"arguments": piece}}
                await send({"delta": {"tool_calls": [call]}})
            await send({"delta": {}, "finish_reason": "tool_calls"})
        elif chat and (body.get("response_format") or {}).get("type") == "json_schema":
            answer = json.dumps({"city": "Paris", "temperature_c": 21})
            await send({"delta": {"content": answer}})
            await send({"delta": {}, "finish_reason": "stop"})
        else:
            top = [{"token": " Paris", "logprob": -0.5}, {"token": " Lyon", "logprob": -2.0}]
            top = top[: body.get("top_logprobs") or 0] if chat else top[: body["logprobs"]]
            if chat:
                logprobs = {"content": [{"token": " Paris", "logprob": -0.5, "top_logprobs": top}]}
                choice: dict[str, Any] = {"delta": {"content": " Paris"}}
            else:
                logprobs = {
                    "tokens": [" Paris"],
                    "token_logprobs": [-0.5],
                    "top_logprobs": [{t["token"]: t["logprob"] for t in top}],
                }
                choice = {"text": (body["prompt"] if body.get("echo") else "") + " Paris"}
            asked = body.get("logprobs") not in (None, False)
            await send({**choice, "logprobs": logprobs if asked else None})
            await send({"delta": {}, "text": "", "finish_reason": "stop"})
        await response.write(
            b'data: {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3}}\n\n'
        )
        await response.write(b"data: [DONE]\n\n")
        return response

    async def _wait_for_release(self) -> None:
        assert self._release is not None
        self.stalled.set()
        try:
            async with asyncio.timeout(WAIT_S):
                await self._release.wait()
        except asyncio.CancelledError:
            self.disconnected.set()  # the client closed the connection
            raise


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scripted() -> Iterator[ScriptedUpstream]:
    with ScriptedUpstream(api_key=UPSTREAM_KEY) as server:
        yield server


@pytest.fixture(scope="module")
def late_socket() -> Iterator[socket.socket]:
    """A port with nothing listening yet (bound, so nobody else takes it)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock
    finally:
        sock.close()


def openai_model(name: str, url: str, **settings: object) -> str:
    lines = [f'[[models]]\nname = "{name}"\nbackend = "openai"\nurl = "{url}"\n']
    lines += [f"{key} = {json.dumps(value)}\n" for key, value in settings.items()]
    return "".join(lines)


@pytest.fixture(scope="module")
def front(
    tmp_path_factory: pytest.TempPathFactory,
    node: NodeProcess,
    scripted: ScriptedUpstream,
    late_socket: socket.socket,
) -> Iterator[NodeProcess]:
    """A node whose every model is served by an upstream."""
    config = openai_model("real", node.url + "/v1", upstream_model="default")
    config += openai_model("ghost", node.url + "/v1", upstream_model="no-such-model")
    late_port = late_socket.getsockname()[1]
    config += openai_model("late", f"http://127.0.0.1:{late_port}/v1", upstream_model="good")
    config += openai_model(
        "narrow",
        scripted.url,
        api_key_env=KEY_VARIABLE,
        upstream_model="tools",
        capabilities=["tools"],
    )
    for model in ScriptedUpstream.MODELS:
        config += openai_model(
            model, scripted.url, api_key_env=KEY_VARIABLE, slots=1 if model == "stall" else 4
        )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(KEY_VARIABLE, UPSTREAM_KEY)  # the node process inherits it
        proc = NodeProcess(tmp_path_factory.mktemp("front"), config=config).start()
    try:
        yield proc
    finally:
        proc.kill()


@pytest.fixture(scope="module")
def client(front: NodeProcess) -> Iterator[openai.OpenAI]:
    with openai_client(front.url + "/v1") as owner:
        yield owner


@pytest.fixture(scope="module")
def direct(node: NodeProcess) -> Iterator[openai.OpenAI]:
    """The upstream itself, asked without the front node."""
    with openai_client(node.url + "/v1") as owner:
        yield owner


def get_json(proc: NodeProcess, path: str) -> Any:
    with urllib.request.urlopen(proc.url + path, timeout=30) as response:
        return json.loads(response.read())


def assert_still_serving(client: openai.OpenAI, front: NodeProcess) -> None:
    assert front.proc is not None
    assert front.proc.poll() is None
    answer = client.chat.completions.create(model="good", messages=CAPITAL)
    assert answer.choices[0].message.content == "Hello world"


# --- through a real upstream ------------------------------------------------------------------


def test_a_chat_answer_is_the_upstreams_own_and_says_the_front_node_served_it(
    client: openai.OpenAI, direct: openai.OpenAI, front: NodeProcess, node: NodeProcess
) -> None:
    expected = direct.chat.completions.create(
        model="default", messages=CAPITAL, temperature=0, max_tokens=40
    )
    raw = client.chat.completions.with_raw_response.create(
        model="real", messages=CAPITAL, temperature=0, max_tokens=40
    )
    assert raw.headers["x-allerac-node"] == front.node_id != node.node_id
    assert raw.headers["x-allerac-route"] == "local"
    answer = raw.parse()
    assert answer.model == "real"
    assert answer.choices[0].message.content == expected.choices[0].message.content
    assert "Paris" in answer.choices[0].message.content
    assert answer.choices[0].finish_reason == expected.choices[0].finish_reason
    assert answer.usage.prompt_tokens == expected.usage.prompt_tokens
    assert answer.usage.completion_tokens == expected.usage.completion_tokens


def test_a_streamed_answer_passes_tokens_through_and_ends_with_the_upstreams_usage(
    client: openai.OpenAI, direct: openai.OpenAI
) -> None:
    expected = direct.chat.completions.create(
        model="default", messages=CAPITAL, temperature=0, max_tokens=40
    )
    chunks = list(
        client.chat.completions.create(
            model="real",
            messages=CAPITAL,
            temperature=0,
            max_tokens=40,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    pieces = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert "".join(pieces) == expected.choices[0].message.content
    assert len(pieces) > 1
    usage = chunks[-1].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        expected.usage.prompt_tokens,
        expected.usage.completion_tokens,
    )


def test_a_text_completion_with_a_stop_sequence_matches_the_upstream(
    client: openai.OpenAI, direct: openai.OpenAI
) -> None:
    ask = {"prompt": "Count: 1, 2, 3,", "temperature": 0, "max_tokens": 20, "stop": [" 5"]}
    expected = direct.completions.create(model="default", **ask)  # type: ignore[call-overload]
    answer = client.completions.create(model="real", **ask)  # type: ignore[call-overload]
    assert answer.choices[0].text == expected.choices[0].text
    assert " 5" not in answer.choices[0].text
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.completion_tokens == expected.usage.completion_tokens


def test_the_front_node_shows_the_upstreams_context_and_the_measured_speed(
    client: openai.OpenAI, front: NodeProcess
) -> None:
    client.completions.create(model="real", prompt="1, 2, 3,", temperature=0, max_tokens=40)
    listed = {m["id"]: m for m in get_json(front, "/v1/models")["data"]}
    assert listed["real"]["context_length"] == 2048  # learned from the upstream's /models
    status = {m["name"]: m for m in get_json(front, "/allerac/status")["models"]}
    assert status["real"]["backend"] == "openai"
    assert status["real"]["tokens_per_second"] > 0
    assert status["real"]["requests"]["completed"] >= 1


def test_a_model_the_upstream_does_not_serve_is_a_clear_error(
    client: openai.OpenAI, front: NodeProcess
) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="ghost", messages=CAPITAL)
    assert info.value.status_code == 503
    assert "answered HTTP 404" in info.value.message
    assert "no-such-model" in info.value.message
    assert "does not list 'no-such-model'" in front.output()  # said at start, too


def test_the_upstream_key_goes_along_and_never_into_the_log(
    client: openai.OpenAI, front: NodeProcess, scripted: ScriptedUpstream
) -> None:
    answer = client.chat.completions.create(
        model="good", messages=CAPITAL, temperature=0.5, top_p=0.5, seed=3, max_tokens=9
    )
    assert answer.choices[0].message.content == "Hello world"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (7, 2)
    sent = scripted.requests[-1]
    assert sent["authorization"] == f"Bearer {UPSTREAM_KEY}"
    body = sent["body"]
    assert (body["temperature"], body["top_p"], body["seed"], body["max_tokens"]) == (
        0.5,
        0.5,
        3,
        9,
    )
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert UPSTREAM_KEY not in front.output()


# --- broken, busy, slow and absent upstreams --------------------------------------------------


@pytest.mark.parametrize(
    ("model", "status", "words"),
    [
        ("junk-json", 503, "an answer chunk is not valid JSON"),
        ("not-sse", 503, "not an event stream"),
        ("http-500", 503, "answered HTTP 500: engine crashed"),
        ("busy", 429, "too many requests"),
        ("too-long", 400, "maximum context length is 2048 tokens"),
    ],
)
def test_a_bad_upstream_answer_is_a_clear_error_and_the_node_goes_on(
    client: openai.OpenAI, front: NodeProcess, model: str, status: int, words: str
) -> None:
    for stream in (False, True):
        # A failure before the first token keeps its status, streamed or not.
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model=model, messages=CAPITAL, stream=stream)
        assert info.value.status_code == status
        assert words in info.value.message
    if model == "too-long":
        assert isinstance(info.value, openai.BadRequestError)
        assert info.value.code == "context_length_exceeded"
    assert_still_serving(client, front)


@pytest.mark.parametrize(
    ("model", "words"),
    [("cut-off", "ended before it finished"), ("broken-sse", "not valid UTF-8")],
)
def test_an_upstream_failing_mid_answer_ends_the_stream_with_an_error(
    client: openai.OpenAI, front: NodeProcess, model: str, words: str
) -> None:
    received: list[str] = []

    def read_all() -> None:
        stream = client.chat.completions.create(model=model, messages=CAPITAL, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)

    with pytest.raises(openai.APIError):
        read_all()
    assert received == ["Hello"]  # what came before the failure was delivered
    assert words in front.output()
    assert_still_serving(client, front)


def test_an_absent_upstream_gets_503_until_it_comes_up(
    client: openai.OpenAI, front: NodeProcess, late_socket: socket.socket
) -> None:
    port = late_socket.getsockname()[1]
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="late", messages=CAPITAL)
    assert info.value.status_code == 503
    assert f"cannot reach upstream http://127.0.0.1:{port}/v1: connection refused" in (
        info.value.message
    )
    assert "is unreachable (connection refused)" in front.output()  # warned at start
    with ScriptedUpstream(sock=late_socket):
        answer = client.chat.completions.create(model="late", messages=CAPITAL)
        assert answer.choices[0].message.content == "Hello world"


def test_full_slots_get_429_at_once_and_a_client_leaving_closes_the_upstream_stream(
    client: openai.OpenAI, front: NodeProcess, scripted: ScriptedUpstream
) -> None:
    scripted.reset()
    url = urllib.parse.urlsplit(front.url)
    body = {"model": "stall", "messages": CAPITAL, "stream": True}
    first = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        first.request(
            "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        response = first.getresponse()
        assert response.status == 200
        while b'"Hello"' not in response.readline():
            pass
        started = time.monotonic()
        with pytest.raises(openai.RateLimitError) as info:  # slots = 1, and it is taken
            client.chat.completions.create(model="stall", messages=CAPITAL)
        assert time.monotonic() - started < 5  # at once, not after the stalled answer
        assert "busy" in info.value.message
    finally:
        first.close()  # the client goes away mid-answer...
    assert scripted.disconnected.wait(WAIT_S)  # ...so the upstream's connection is closed
    scripted.release()  # the next stall answer goes straight through
    answer = client.chat.completions.create(model="stall", messages=CAPITAL)
    assert answer.choices[0].message.content == "Hello world"  # the slot was freed


def test_an_upstream_refusing_the_key_stops_the_node_at_start(
    tmp_path: Path, scripted: ScriptedUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_VARIABLE, "sk-wrong-key")
    proc = NodeProcess(
        tmp_path / "home",
        config=openai_model("good", scripted.url, api_key_env=KEY_VARIABLE),
    )
    with pytest.raises(RuntimeError, match="exited with") as info:
        proc.start()
    message = str(info.value)
    assert "refused this node's credentials (HTTP 401: invalid api key)" in message
    assert "check api_key_env ($ALLERAC_TEST_UPSTREAM_KEY)" in message
    assert "sk-wrong-key" not in message


# --- the backend in this process --------------------------------------------------------------


@pytest.fixture
async def backend_for(
    scripted: ScriptedUpstream,
) -> AsyncIterator[Any]:
    made: list[OpenAIUpstreamBackend] = []

    async def make(url: str | None = None, **upstream: Any) -> OpenAIUpstreamBackend:
        """A backend for `url` (default: the scripted upstream, with its key)."""
        if url is None:
            url = scripted.url
            upstream.setdefault("api_key", UPSTREAM_KEY)
        upstream.setdefault("model", "good")
        config = ModelConfig(
            name="front",
            backend="openai",
            context_length=0,
            upstream=UpstreamConfig(url=url, **upstream),
        )
        backend = create_backend(config)
        assert isinstance(backend, OpenAIUpstreamBackend)
        await backend.start()
        made.append(backend)
        return backend

    try:
        yield make
    finally:
        for backend in made:
            await backend.aclose()


async def collect(backend: OpenAIUpstreamBackend, request: InferenceRequest) -> list[Any]:
    stream = await backend.open(request)
    try:
        return [event async for event in stream]
    finally:
        await stream.aclose()


def text_of(events: list[InferenceEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


async def test_a_failover_continuation_goes_on_where_the_delivered_text_ends(
    node: NodeProcess, backend_for: Any
) -> None:
    backend = await backend_for(node.url + "/v1", model="default")
    greedy = Sampling(temperature=0, max_tokens=40)
    whole = text_of(
        await collect(backend, InferenceRequest(model="x", prompt="1, 2, 3, 4,", sampling=greedy))
    )
    delivered = whole[: whole.index("8,") + 2]  # " 5, 6, 7, 8,"
    rest = await collect(
        backend,
        InferenceRequest(
            model="x",
            prompt="1, 2, 3, 4,",
            continuation=delivered,
            sampling=Sampling(temperature=0, max_tokens=10),
        ),
    )
    finished = rest[-1]
    assert isinstance(finished, Finished)
    assert finished.completion_tokens == 10  # only what it generated
    assert text_of(rest)
    assert whole[len(delivered) :].startswith(text_of(rest))


async def test_a_chat_continuation_asks_the_upstream_to_continue_the_partial_answer(
    scripted: ScriptedUpstream, backend_for: Any
) -> None:
    backend = await backend_for()
    request = InferenceRequest(
        model="front",
        messages=(ChatMessage(role="user", content="Hi"),),
        continuation="Hello",
    )
    events = await collect(backend, request)
    assert text_of(events) == "Hello world"
    body = scripted.requests[-1]["body"]
    assert body["messages"][-1] == {"role": "assistant", "content": "Hello"}
    assert (body["continue_final_message"], body["add_generation_prompt"]) == (True, False)


async def test_stopping_the_node_ends_answers_under_way_as_cancelled(
    scripted: ScriptedUpstream, backend_for: Any
) -> None:
    scripted.reset()
    backend = await backend_for(model="stall")
    request = InferenceRequest(model="front", messages=(ChatMessage(role="user", content="Hi"),))
    running = await backend.open(request)
    assert await anext(running) == TextDelta("Hello", 1)
    admitted = await backend.open(request)  # admitted, not started
    backend.cancel_all()
    assert backend.load().draining
    finished = await anext(running)
    assert finished == Finished(reason=FinishReason.CANCELLED, prompt_tokens=0, completion_tokens=1)
    with pytest.raises(Unavailable, match="shutting down"):
        await anext(admitted)
    with pytest.raises(Unavailable, match="not serving"):
        await backend.open(request)
    assert await asyncio.to_thread(scripted.disconnected.wait, WAIT_S)
    assert not backend.busy()
    assert backend.counters["cancelled"] == 2
    assert backend.counters["failed"] == 0


async def test_an_upstream_that_never_answers_meets_the_deadline(
    scripted: ScriptedUpstream, backend_for: Any
) -> None:
    scripted.reset()
    backend = await backend_for(model="silent", timeout_s=0.5)
    request = InferenceRequest(model="front", prompt="Hi")
    with pytest.raises(Unavailable, match=r"did not answer within 0\.5 s"):
        await collect(backend, request)
    assert not backend.busy()  # the slot is free again
    assert backend.counters["failed"] == 1


async def test_without_usage_tokens_are_counted_per_chunk_and_said_once(
    backend_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    backend = await backend_for(model="no-usage")
    request = InferenceRequest(model="front", prompt="Hi")
    with caplog.at_level(logging.WARNING, logger="node.serving.backends.openai_upstream"):
        for _ in range(2):
            events = await collect(backend, request)
            assert text_of(events) == "Hello world"
            assert events[-1] == Finished(
                reason=FinishReason.STOP, prompt_tokens=0, completion_tokens=2
            )
    said = [r.getMessage() for r in caplog.records if "sent no usage" in r.getMessage()]
    assert len(said) == 1


async def test_a_full_backend_refuses_at_once_with_overloaded(backend_for: Any) -> None:
    backend = await backend_for(model="good", slots=1)
    request = InferenceRequest(model="front", prompt="Hi")
    holding = await backend.open(request)
    try:
        with pytest.raises(MeshError) as info:
            await backend.open(request)
        assert info.value.http_status == 429
        assert backend.counters["rejected"] == 1
    finally:
        await holding.aclose()
    assert text_of(await collect(backend, request)) == "Hello world"  # the slot came back


# --- issue 15: every field its upstream accepts, and tool calls and logprobs back ----------------

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def test_the_upstream_receives_every_forwarded_field_and_the_tool_call_comes_back(
    client: openai.OpenAI, scripted: ScriptedUpstream
) -> None:
    fields: dict[str, Any] = {
        "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "weather", "schema": {"type": "object"}, "strict": True},
        },
        "logprobs": True,
        "top_logprobs": 2,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
        "logit_bias": {"42": -100},
        "seed": 11,
        "stop": ["END"],
        "temperature": 0.3,
        "top_p": 0.8,
    }
    answer = client.chat.completions.create(
        model="tools", messages=CAPITAL, max_completion_tokens=50, **fields
    )
    body = scripted.requests[-1]["body"]
    for key, value in fields.items():
        assert body[key] == value, key
    assert body["max_tokens"] == 50
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls or []
    assert (call.id, call.type, call.function.name) == ("call_7", "function", "get_weather")
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (9, 3)


def test_streamed_tool_call_deltas_arrive_in_openais_shape(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="tools", messages=CAPITAL, tools=[WEATHER_TOOL], stream=True
        )
    )
    pieces = [call for c in chunks if c.choices for call in (c.choices[0].delta.tool_calls or [])]
    assert pieces[0].id == "call_7"
    assert pieces[0].function is not None
    assert pieces[0].function.name == "get_weather"
    arguments = "".join(p.function.arguments or "" for p in pieces if p.function)
    assert json.loads(arguments) == {"city": "Paris"}
    assert {p.index for p in pieces} == {0}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_a_tool_round_trip_is_forwarded_whole(
    client: openai.OpenAI, scripted: ScriptedUpstream
) -> None:
    history: list[Any] = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_7",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_7", "content": "sunny"},
    ]
    answer = client.chat.completions.create(model="tools", messages=history, logprobs=True)
    assert scripted.requests[-1]["body"]["messages"] == history
    assert answer.choices[0].message.content == " Paris"


def test_logprobs_come_back_with_the_asked_alternatives(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="tools", messages=CAPITAL, logprobs=True, top_logprobs=2
    )
    assert answer.choices[0].logprobs is not None
    [token] = answer.choices[0].logprobs.content or []
    assert (token.token, token.logprob) == (" Paris", -0.5)
    assert len(token.top_logprobs) == 2
    assert token.token in {t.token for t in token.top_logprobs}
    text = client.completions.create(model="tools", prompt="The capital is", echo=True, logprobs=1)
    assert text.choices[0].text == "The capital is Paris"
    assert text.choices[0].logprobs is not None
    assert text.choices[0].logprobs.top_logprobs == [{" Paris": -0.5}]


def test_the_front_node_advertises_what_its_upstream_honours(
    client: openai.OpenAI, scripted: ScriptedUpstream
) -> None:
    model = client.models.retrieve("tools")
    assert {"tools", "structured_output", "logprobs", "penalties", "logit_bias", "echo"} <= set(
        model.model_extra["capabilities"]  # type: ignore[index]
    )
    # n choices reach the upstream as n requests of one choice.
    before = len(scripted.requests)
    answer = client.chat.completions.create(model="tools", messages=CAPITAL, n=2)
    assert [(c.index, c.message.content) for c in answer.choices] == [(0, " Paris"), (1, " Paris")]
    sent = scripted.requests[before:]
    assert len(sent) == 2
    assert all("n" not in r["body"] for r in sent)


class Weather(pydantic.BaseModel):
    city: str
    temperature_c: int


def test_parse_with_a_pydantic_model_gets_a_valid_object(
    client: openai.OpenAI, scripted: ScriptedUpstream
) -> None:
    completion = client.chat.completions.parse(
        model="tools", messages=CAPITAL, response_format=Weather
    )
    assert completion.choices[0].message.parsed == Weather(city="Paris", temperature_c=21)
    sent = scripted.requests[-1]["body"]["response_format"]
    assert sent["type"] == "json_schema"
    assert sent["json_schema"]["name"] == "Weather"
    assert sent["json_schema"]["strict"] is True
    assert set(sent["json_schema"]["schema"]["properties"]) == {"city", "temperature_c"}


def test_an_upstream_said_to_honour_less_refuses_the_rest(client: openai.OpenAI) -> None:
    """`capabilities = ["tools"]`: a llama.cpp server upstream without logprobs, say."""
    answer = client.chat.completions.create(model="narrow", messages=CAPITAL, tools=[WEATHER_TOOL])
    assert answer.choices[0].finish_reason == "tool_calls"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="narrow", messages=CAPITAL, logprobs=True)
    assert info.value.body["param"] == "logprobs"  # type: ignore[index]
