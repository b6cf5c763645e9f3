"""Embeddings from a GGUF file (issue 15 item 5): a llama.cpp context of its own in
embedding mode (mean pooling unless the file says otherwise), next to the model's chat
backend, so `/v1/embeddings` never waits behind a chat answer nor disturbs its slots.

`EmbeddingModel` is the model as the node serves it (a `Backend`): chat and completions go
to the chat backend it wraps, embeddings requests (`InferenceRequest.inputs`) to its
`Embedder`, and its card says `embeddings` besides what the chat backend honours. A model
gets one with `embedding = true` in its config (the embedded default model has it).

The embedding context is made at the first embeddings request (the chat backend has
already checked the file at start), so a node that is never asked for embeddings pays
nothing for them. Each input is embedded on its own (so a batch gives exactly what one
by one gives), normalized to length 1 as OpenAI's are, and rounded to float32 (what the
wire carries).
An input longer than the context is a 400 naming it, never silently truncated; a
`dimensions` other than the model's own is a 400 (a GGUF embedding model is not trained
to be shortened).
"""

from __future__ import annotations

import array
import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from mesh.clock import SYSTEM, Clock
from mesh.config import ModelConfig
from mesh.errors import (
    BackendError,
    ConfigError,
    ContextLengthExceeded,
    Overloaded,
    Unavailable,
    UnsupportedParameter,
)
from mesh.inference import (
    Feature,
    Finished,
    FinishReason,
    InferenceEvent,
    InferenceRequest,
    Load,
    ModelInfo,
)
from node.serving.backends.base import Backend, InferenceStream
from node.store.hardware import default_threads

logger = logging.getLogger(__name__)


class Embedder:
    """One embedding context, one request at a time off the event loop, a bounded line."""

    def __init__(self, config: ModelConfig, *, clock: Clock = SYSTEM) -> None:
        if config.path is None:
            raise ConfigError(f"model {config.name!r}: embeddings need a GGUF file (path)")
        self._config = config
        self._clock = clock
        self._llama: Any = None
        self._turn = asyncio.Lock()
        self._waiting = 0
        self._running = 0
        self._closing = False
        self.limit = 1 + config.queue_size
        self.dimensions = 0

    def _load(self) -> None:
        from llama_cpp import LLAMA_POOLING_TYPE_MEAN, Llama

        cfg = self._config
        kwargs: dict[str, Any] = {
            "model_path": str(cfg.path),
            "embedding": True,
            "pooling_type": LLAMA_POOLING_TYPE_MEAN,
            # A whole input is one batch (non-causal pooling needs it in one ubatch).
            "n_ctx": cfg.context_length,
            "n_batch": cfg.context_length,
            "n_ubatch": cfg.context_length,
            "verbose": False,
        }
        # The same threads as the model's decoding (node.store.hardware.default_threads: the
        # physical cores, or $ALLERAC_THREADS), for the prompt too: llama-cpp-python's own
        # default reads prompts on every logical CPU, and its OpenMP threads spin-wait for
        # each other, so on cores shared with other work an embedding took seconds, not ms.
        threads = cfg.threads or default_threads()
        kwargs["n_threads"] = threads
        kwargs["n_threads_batch"] = threads
        try:
            self._llama = Llama(**kwargs)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ConfigError(
                f"cannot load model {cfg.name!r} from {cfg.path} for embeddings: {exc}"
            ) from exc
        self.dimensions = int(self._llama.n_embd())

    def _loaded(self) -> Any:
        if self._llama is None:
            started = self._clock.monotonic()
            self._load()
            logger.info(
                "model %s: embeddings of %d dimensions (mean pooling), ready in %.2f s",
                self._config.name,
                self.dimensions,
                self._clock.monotonic() - started,
            )
        return self._llama

    def _embed(
        self, inputs: tuple[str, ...], dimensions: int | None
    ) -> tuple[tuple[tuple[float, ...], ...], int]:
        llama = self._loaded()
        if dimensions is not None and dimensions != self.dimensions:
            raise UnsupportedParameter(
                f"model {self._config.name!r} makes embeddings of {self.dimensions} dimensions "
                f"and cannot shorten them to {dimensions}",
                param="dimensions",
            )
        limit = min(int(llama.n_ctx()), self._config.context_length)
        vectors = []
        total = 0
        for index, text in enumerate(inputs):
            count = len(llama.tokenize(text.encode("utf-8")))
            if count > limit:
                raise ContextLengthExceeded(
                    f"input[{index}] is {count} tokens; model {self._config.name!r} embeds at "
                    f"most {limit}",
                    param="input",
                )
            try:
                vector, used = llama.embed(text, normalize=True, truncate=False, return_count=True)
            except (ValueError, RuntimeError) as exc:
                raise BackendError(f"embedding input[{index}] failed: {exc}") from exc
            vectors.append(tuple(array.array("f", vector)))  # float32, as the wire carries
            total += int(used)
        return tuple(vectors), total

    async def embed(self, request: InferenceRequest) -> Finished:
        assert request.inputs is not None
        if self._closing:
            raise Unavailable(f"model {self._config.name!r} is not serving (shutting down)")
        if self._waiting + self._running >= self.limit:
            raise Overloaded(
                f"model {self._config.name!r} is busy embedding ({self.limit} requests at once)"
            )
        self._waiting += 1
        waiting = True
        try:
            async with self._turn:
                self._waiting -= 1
                waiting = False
                self._running += 1
                try:
                    vectors, tokens = await asyncio.to_thread(
                        self._embed, request.inputs, request.dimensions
                    )
                finally:
                    self._running -= 1
        finally:
            if waiting:  # cancelled while in line
                self._waiting -= 1
        return Finished(
            reason=FinishReason.STOP,
            prompt_tokens=tokens,
            completion_tokens=0,
            embeddings=vectors,
        )

    def load(self) -> tuple[int, int]:
        return self._running, self._waiting

    def drain(self) -> None:
        self._closing = True

    async def aclose(self) -> None:
        self._closing = True
        async with self._turn:  # the call under way (it is short) finishes first
            self._llama = None


class EmbeddingStream:
    """An embeddings answer: one `Finished` carrying the vectors."""

    def __init__(self, embedder: Embedder, request: InferenceRequest) -> None:
        self._embedder = embedder
        self._request = request
        self._done = False

    def __aiter__(self) -> AsyncIterator[InferenceEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[InferenceEvent]:
        if self._done:
            return
        self._done = True
        yield await self._embedder.embed(self._request)

    async def aclose(self) -> None:
        self._done = True


class EmbeddingModel:
    """A model served for chat by `chat` and for embeddings by its own `Embedder`."""

    def __init__(self, chat: Backend, config: ModelConfig, *, clock: Clock = SYSTEM) -> None:
        self._chat = chat
        self._config = config
        self._embedder = Embedder(config, clock=clock)

    @property
    def info(self) -> ModelInfo:
        info = self._chat.info
        return replace(info, features=info.features | {Feature.EMBEDDINGS})

    @property
    def config(self) -> ModelConfig:
        return self._config

    @property
    def counters(self) -> dict[str, int]:
        return self._chat.counters

    def load(self) -> Load:
        """The chat backend's: what the scheduler weighs chat requests by (embeddings have
        a line of their own, and refuse at once when it is full)."""
        return self._chat.load()

    async def start(self) -> None:
        await self._chat.start()

    async def open(self, request: InferenceRequest) -> InferenceStream:
        if request.inputs is None:
            return await self._chat.open(request)
        return EmbeddingStream(self._embedder, request)

    def drain(self) -> None:
        self._chat.drain()
        self._embedder.drain()

    def busy(self) -> bool:
        running, waiting = self._embedder.load()
        return self._chat.busy() or bool(running or waiting)

    def cancel_all(self) -> None:
        self._chat.cancel_all()
        self._embedder.drain()

    async def aclose(self) -> None:
        await self._chat.aclose()
        await self._embedder.aclose()
