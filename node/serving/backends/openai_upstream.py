"""The `openai` backend: a model served by an OpenAI-compatible upstream (vLLM,
llama.cpp's server, a hosted API). This is how an Allerac Cloud GPU node serves: the
same agent, in front of vLLM.

How it works:
- One aiohttp session per model. Every request goes upstream streamed; the protocol
  (request bodies, chunks, usage, error statuses) is `mesh.api.upstream`, sans I/O, and the
  event stream is split by `mesh.api.sse`. Reading is pulled by the caller: a slow client
  slows the upstream down (TCP back-pressure) instead of filling a buffer.
- Admission: at most `slots` requests upstream at once, counted synchronously in
  `open()`; the next one gets `Overloaded` (429) at once, as with llama_cpp.
- Deadlines: connecting `min(timeout_s, CONNECT_TIMEOUT_S)`; then the upstream may stay
  silent at most `timeout_s` (before the answer starts, and between two pieces of it).
- Cancellation: closing the stream closes the upstream connection, so the upstream
  stops generating (vLLM aborts a request whose client went away). `cancel_all()` (the
  node is stopping) closes every connection at once; an answer already under way ends
  as cancelled, one that has not produced text yet fails with 503.
- Errors are converted where they enter: connection refused and timeouts -> 503
  `Unavailable`; an upstream 429 -> `Overloaded`; 404 -> `ModelNotFound`; 400 about
  the context -> `ContextLengthExceeded`; other 4xx -> `InvalidRequest`; 5xx ->
  `Unavailable`/`BackendError`; malformed bytes -> `RemoteProtocolError`. Nothing the
  upstream sends can raise anything else.
- Start: `GET {url}/models`, once, within PROBE_TIMEOUT_S. An upstream that refuses our
  key (401/403) stops the node from starting: that is the operator's config and it will
  not fix itself. An upstream that is down, slow or broken does NOT: vLLM takes minutes
  to load a model and is often started beside the agent, and a node that exits would
  crash-loop and take its other models away. It logs a warning and serves; requests get
  503 (which the mesh fails over from silently) until the upstream answers.
- Failover continuation: see `mesh.api.upstream`. Chat continuation needs vLLM's
  `continue_final_message`; other upstreams either refuse it (retried elsewhere) or
  start a new reply instead of continuing the old one.

Why aiohttp and not the `openai` SDK: the daemon already runs on aiohttp, while the SDK
would bring httpx, anyio, pydantic and jiter into every box's install for one backend;
and the SDK parses leniently and raises httpx, pydantic and JSON exceptions of its own,
where this boundary has to turn every malformed byte into one clear `MeshError`, which
a sans-I/O parser we fuzz (`mesh.api.sse`, `mesh.api.upstream`) guarantees.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import aiohttp

from mesh import __version__
from mesh.api.sse import SseDecoder
from mesh.api.upstream import (
    AnswerReader,
    ModelDefaults,
    error_from_status,
    error_message,
    read_models_list,
    request_body,
)
from mesh.clock import SYSTEM, Clock
from mesh.config import ModelConfig, UpstreamConfig
from mesh.errors import (
    BackendError,
    ConfigError,
    MeshError,
    Overloaded,
    RemoteProtocolError,
    Unavailable,
)
from mesh.inference import (
    Feature,
    Finished,
    FinishReason,
    InferenceEvent,
    InferenceRequest,
    Load,
    ModelInfo,
    TextDelta,
)

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
PROBE_TIMEOUT_S = 10.0
MAX_ERROR_BODY_BYTES = 64 * 1024
MAX_MODELS_BODY_BYTES = 4 * 1024 * 1024
TPS_SMOOTHING = 0.3  # weight of the newest measurement in the tokens/s average
MIN_TOKENS_TO_MEASURE = 8


async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """At most `limit` bytes of a body (what is beyond is not read)."""
    parts: list[bytes] = []
    size = 0
    while size < limit:
        piece = await response.content.read(limit - size)
        if not piece:
            break
        parts.append(piece)
        size += len(piece)
    return b"".join(parts)


def _why(exc: BaseException) -> str:
    """A network failure in a few words ("connection refused"; aiohttp's own messages
    can be empty, or a repr of the address)."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        error = exc.os_error
        if error.errno is not None and error.errno > 0:  # getaddrinfo's are negative
            return os.strerror(error.errno).lower()
        return str(error.strerror or error)
    return str(exc) or type(exc).__name__


class UpstreamStream:
    """The caller's end of one request: pulls the upstream's answer as it is read."""

    def __init__(self, backend: OpenAIUpstreamBackend, request: InferenceRequest) -> None:
        self._backend = backend
        self._request = request
        self._reader = AnswerReader(
            chat=request.is_chat,
            stops=request.sampling.stop,
            max_tokens=request.sampling.max_tokens,
        )
        self._decoder = SseDecoder()
        self._pending: collections.deque[InferenceEvent] = collections.deque()
        self._sending: asyncio.Task[aiohttp.ClientResponse] | None = None
        self._response: aiohttp.ClientResponse | None = None
        self._ended = False
        self._node_cancelled = False  # cancel_all(): the node is stopping
        self._first_at = 0.0
        self._last_at = 0.0
        self._first_tokens = 0

    def __aiter__(self) -> AsyncIterator[InferenceEvent]:
        return self

    async def __anext__(self) -> InferenceEvent:
        if not self._pending:
            if self._ended:
                raise StopAsyncIteration
            try:
                await self._fill()
            except MeshError as exc:
                if self._node_cancelled:
                    self._end("cancelled")  # the node is stopping; nothing went wrong
                    raise
                self._end("failed")
                logger.warning(
                    "model %s: request %s failed upstream: %s",
                    self._backend.info.name,
                    self._request.request_id,
                    exc.message,
                )
                raise
            except asyncio.CancelledError:
                self._end("cancelled")
                raise
            except Exception as exc:  # a bug of ours or aiohttp's: fail the request, not the node
                self._end("failed")
                logger.exception(
                    "model %s: request %s failed", self._backend.info.name, self._request.request_id
                )
                raise BackendError(f"model {self._backend.info.name!r} failed: {exc}") from exc
        event = self._pending.popleft()
        if isinstance(event, Finished):
            # The slot is free before the caller hears the end, so its next request is admitted.
            self._end("cancelled" if event.reason is FinishReason.CANCELLED else "completed")
            self._backend.measured(
                event.completion_tokens, self._first_tokens, self._last_at - self._first_at
            )
        return event

    async def aclose(self) -> None:
        """The caller left: close the upstream connection (the upstream stops generating)."""
        self._end("cancelled")
        sending, self._sending = self._sending, None
        if sending is not None:
            sending.cancel()
            await asyncio.wait({sending})
            if not sending.cancelled() and sending.exception() is None:
                sending.result().close()

    def cancel_now(self) -> None:
        """The node is stopping: end this request now (from any task)."""
        self._node_cancelled = True
        if self._sending is not None:
            self._sending.cancel()
        if self._response is not None:
            self._response.close()

    # --- the exchange ------------------------------------------------------------------------

    def _end(self, outcome: str) -> None:
        if self._ended:
            return
        self._ended = True
        self._backend.release(self, outcome)
        if self._response is not None:
            # A complete answer leaves a reusable connection; anything else is cut.
            if self._reader.done:
                self._response.release()
            else:
                self._response.close()

    def _shutting_down(self) -> None:
        """Called when the node cancelled us: end as cancelled, or fail if nothing was said."""
        if self._first_at == 0.0:
            raise Unavailable(f"model {self._backend.info.name!r} is shutting down")
        usage = self._reader.usage
        self._pending.append(
            Finished(
                reason=FinishReason.CANCELLED,
                prompt_tokens=usage.prompt_tokens if usage is not None else 0,
                completion_tokens=self._reader.counted,
            )
        )

    async def _fill(self) -> None:
        """Read until there is an event to hand out."""
        if self._node_cancelled:
            self._shutting_down()
            return
        if self._response is None:
            self._response = await self._send()
        while not self._pending:
            if self._reader.complete:
                self._finish()
                return
            try:
                piece = await self._read(self._response)
            except MeshError:
                if self._node_cancelled:
                    self._shutting_down()
                    return
                raise
            if self._node_cancelled:
                self._shutting_down()
                return
            if not piece:
                self._decoder.close()  # the stream ended: fine if it was whole...
                self._finish()  # ...and the answer finished
                return
            for event in self._decoder.feed(piece):
                delta = self._reader.feed(event.data)
                if delta is not None:
                    self._produced(delta)
                if self._reader.complete:
                    break

    def _produced(self, delta: TextDelta) -> None:
        self._last_at = self._backend.clock.monotonic()
        if self._first_at == 0.0:
            self._first_at = self._last_at
            self._first_tokens = delta.tokens
        self._pending.append(delta)

    def _finish(self) -> None:
        tail, finished = self._reader.finish()
        if tail is not None:
            self._produced(tail)
        if self._reader.usage is None and not self._reader.stopped:
            self._backend.note_no_usage()
        self._pending.append(finished)

    async def _send(self) -> aiohttp.ClientResponse:
        backend = self._backend
        upstream = backend.upstream
        path, body = request_body(self._request, model=upstream.model, defaults=backend.defaults)
        # A task of its own, so that cancel_all() can interrupt connecting from another task.
        sending = asyncio.create_task(
            backend.post(f"{upstream.url}/{path}", body, self._request.request_id),
            name=f"upstream:{self._request.request_id[:8]}",
        )
        self._sending = sending
        try:
            response = await sending
        except asyncio.CancelledError:
            if sending.done() and not sending.cancelled() and sending.exception() is None:
                sending.result().close()  # it answered just as we were cancelled
            current = asyncio.current_task()
            if self._node_cancelled and (current is None or not current.cancelling()):
                raise Unavailable(f"model {backend.info.name!r} is shutting down") from None
            raise
        except aiohttp.ConnectionTimeoutError as exc:
            raise Unavailable(
                f"cannot reach {backend.source}: no connection within "
                f"{min(CONNECT_TIMEOUT_S, upstream.timeout_s):g} s"
            ) from exc
        except TimeoutError as exc:
            raise Unavailable(
                f"{backend.source} did not answer within {upstream.timeout_s:g} s"
            ) from exc
        except aiohttp.ClientResponseError as exc:
            raise RemoteProtocolError(
                f"{backend.source} sent an invalid HTTP response: {_why(exc)}"
            ) from exc
        except aiohttp.ClientError as exc:
            raise Unavailable(f"cannot reach {backend.source}: {_why(exc)}") from exc
        finally:
            self._sending = None
        if self._ended:  # closed meanwhile
            response.close()
            raise Unavailable("the request was cancelled")
        if response.status != 200:
            try:
                said = await self._read_error_body(response)
            finally:
                response.close()
            raise error_from_status(
                response.status,
                said,
                source=backend.source,
                model=upstream.model,
                continuation=bool(self._request.continuation),
            )
        if response.content_type != "text/event-stream":
            response.close()
            raise RemoteProtocolError(
                f"{backend.source} answered with Content-Type {response.content_type!r}, not "
                "an event stream (does it support stream: true?)"
            )
        return response

    async def _read_error_body(self, response: aiohttp.ClientResponse) -> bytes:
        try:
            return await _read_capped(response, MAX_ERROR_BODY_BYTES)
        except (TimeoutError, aiohttp.ClientError):
            return b""  # the status alone still says what happened

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        source = self._backend.source
        try:
            return await response.content.readany()
        except TimeoutError as exc:
            raise Unavailable(
                f"{source} went silent for {self._backend.upstream.timeout_s:g} s while answering"
            ) from exc
        except aiohttp.ClientPayloadError as exc:
            raise Unavailable(f"the connection to {source} broke mid-answer: {_why(exc)}") from exc
        except aiohttp.ClientError as exc:
            raise Unavailable(f"lost the connection to {source} mid-answer: {_why(exc)}") from exc


# What an OpenAI-compatible upstream (vLLM, llama.cpp's server, a hosted API) honours: every
# field is forwarded as OpenAI spells it. Not n > 1: the answer stream carries one choice.
UPSTREAM_FEATURES = frozenset(
    {
        Feature.TOOLS,
        Feature.STRUCTURED_OUTPUT,
        Feature.LOGPROBS,
        Feature.PENALTIES,
        Feature.LOGIT_BIAS,
        Feature.ECHO,
    }
)


class OpenAIUpstreamBackend:
    def __init__(self, config: ModelConfig, *, clock: Clock = SYSTEM) -> None:
        self.clock = clock
        if config.upstream is None:
            raise ConfigError(f"model {config.name!r}: backend = 'openai' needs a url")
        self._config = config
        self.upstream: UpstreamConfig = config.upstream
        self.source = f"upstream {self.upstream.url}"
        self.defaults = ModelDefaults(
            system_prompt=config.system_prompt,
            temperature=config.temperature,
            top_p=config.top_p,
        )
        self._info = ModelInfo(
            name=config.name,
            aliases=config.aliases,
            family=config.family,
            parameter_count=config.parameter_count,  # the upstream does not say it
            context_length=config.context_length,
            backend="openai",
            features=(
                UPSTREAM_FEATURES
                if self.upstream.capabilities is None
                else frozenset(Feature(name) for name in self.upstream.capabilities)
            ),
        )
        self._session: aiohttp.ClientSession | None = None
        self._streams: set[UpstreamStream] = set()
        self._closing = False
        self._tokens_per_second = 0.0
        self._said_no_usage = False
        # Lifetime counters, shown by `allerac status`.
        self.counters = {"completed": 0, "cancelled": 0, "failed": 0, "rejected": 0}

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def info(self) -> ModelInfo:
        return replace(self._info, tokens_per_second=round(self._tokens_per_second, 1))

    @property
    def config(self) -> ModelConfig:
        return self._config

    async def start(self) -> None:
        upstream = self.upstream
        headers = {"User-Agent": f"allerac-mesh/{__version__}"}
        if upstream.api_key is not None:
            headers["Authorization"] = f"Bearer {upstream.api_key}"
        self._session = aiohttp.ClientSession(
            headers=headers,
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=min(CONNECT_TIMEOUT_S, upstream.timeout_s),
                sock_read=upstream.timeout_s,
            ),
            connector=aiohttp.TCPConnector(limit=upstream.slots + 1),
        )
        try:
            await self._probe()
        except BaseException:
            await self._session.close()
            self._session = None
            raise

    async def _probe(self) -> None:
        """Ask the upstream once what it serves; see the module docstring for why only a
        refused key stops the node."""
        assert self._session is not None
        name, upstream = self._config.name, self.upstream
        later = "serving it anyway; its requests get 503 until the upstream answers"
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                async with self._session.get(f"{upstream.url}/models") as response:
                    status = response.status
                    body = await _read_capped(response, MAX_MODELS_BODY_BYTES)
        except TimeoutError:
            logger.warning(
                "model %s: %s did not answer GET /models within %g s; %s",
                name,
                self.source,
                PROBE_TIMEOUT_S,
                later,
            )
            return
        except aiohttp.ClientError as exc:
            logger.warning(
                "model %s: %s is unreachable (%s); %s", name, self.source, _why(exc), later
            )
            return
        if status in (401, 403):
            raise ConfigError(
                f"model {name!r}: {self.source} refused this node's credentials (HTTP {status}: "
                f"{error_message(body)}); check api_key_env"
                + (f" (${upstream.api_key_env})" if upstream.api_key_env else " (none is set)")
            )
        if status != 200:
            logger.warning(
                "model %s: %s answered GET /models with HTTP %s (%s); is url the API base, "
                "such as http://host:8000/v1? %s",
                name,
                self.source,
                status,
                error_message(body),
                later,
            )
            return
        try:
            listed = read_models_list(body, upstream.model)
        except RemoteProtocolError as exc:
            logger.warning("model %s: %s: %s; %s", name, self.source, exc.message, later)
            return
        if not listed.listed:
            # llama.cpp's server answers to any model name, so this is not fatal.
            logger.warning(
                "model %s: %s does not list %r (it lists: %s); asking for it anyway",
                name,
                self.source,
                upstream.model,
                ", ".join(listed.names[:10]) or "nothing",
            )
            return
        if not self._info.context_length and listed.context_length:
            self._info = replace(self._info, context_length=listed.context_length)
        logger.info(
            "model %s: %s serves %r (context %s)",
            name,
            self.source,
            upstream.model,
            self._info.context_length or "unknown",
        )

    def drain(self) -> None:
        """Take no new requests (they get 503); what is admitted goes on."""
        self._closing = True

    def busy(self) -> bool:
        return bool(self._streams)

    def cancel_all(self) -> None:
        """End everything now: answers under way end as cancelled."""
        self._closing = True
        for stream in list(self._streams):
            stream.cancel_now()

    async def aclose(self) -> None:
        self.cancel_all()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- admission ---------------------------------------------------------------------------

    def load(self) -> Load:
        return Load(
            active_streams=len(self._streams),
            queued=0,
            slots=self.upstream.slots,
            draining=self._closing,
            parallel=self.upstream.slots,  # the upstream runs them all at once
        )

    async def open(self, request: InferenceRequest) -> UpstreamStream:
        if self._closing or self._session is None:
            raise Unavailable(f"model {self._config.name!r} is not serving (shutting down)")
        if len(self._streams) >= self.upstream.slots:
            self.counters["rejected"] += 1
            raise Overloaded(
                f"model {self._config.name!r} is busy: {len(self._streams)} requests are with "
                f"its upstream (the limit is {self.upstream.slots}); retry shortly"
            )
        stream = UpstreamStream(self, request)
        self._streams.add(stream)
        return stream

    # --- what the streams report -------------------------------------------------------------

    async def post(self, url: str, body: dict[str, Any], request_id: str) -> aiohttp.ClientResponse:
        assert self._session is not None
        return await self._session.post(
            url,
            json=body,
            # Compression would hold tokens back; X-Request-Id shows up in vLLM's logs.
            headers={"Accept-Encoding": "identity", "X-Request-Id": request_id},
        )

    def release(self, stream: UpstreamStream, outcome: str) -> None:
        if stream in self._streams:
            self._streams.discard(stream)
            self.counters[outcome] += 1

    def measured(self, completion_tokens: int, first_tokens: int, elapsed_s: float) -> None:
        """Tokens/s from a real answer: the tokens after the first delta over the time
        they took (the first one's wait is queueing and prompt work, not speed)."""
        if completion_tokens < MIN_TOKENS_TO_MEASURE or elapsed_s <= 0:
            return
        rate = (completion_tokens - first_tokens) / elapsed_s
        if rate <= 0:
            return
        self._tokens_per_second = (
            rate
            if self._tokens_per_second == 0
            else (1 - TPS_SMOOTHING) * self._tokens_per_second + TPS_SMOOTHING * rate
        )

    def note_no_usage(self) -> None:
        if not self._said_no_usage:
            self._said_no_usage = True
            logger.warning(
                "model %s: %s sent no usage with its answers (stream_options.include_usage); "
                "counting one completion token per streamed chunk and 0 prompt tokens, so "
                "usage records may undercount",
                self._config.name,
                self.source,
            )
