"""The llama.cpp backend: GGUF models through llama-cpp-python.

One worker thread per loaded model owns the `Llama` object; llama.cpp contexts
are not safe to share, and the thread keeps every blocking call off the event
loop. Admission is a counter of slots (one running + `queue_size` waiting)
checked synchronously in `open()`, so a full model answers `Overloaded` at once
instead of making the caller wait.

The prompt is rendered and tokenized (and checked against the context) before it
runs: by the worker itself when the model is idle (one thread hop to the first
token, not two), otherwise by an executor thread while the request waits, so a
prompt that cannot fit is refused at once rather than after its turn. Either way
such a refusal comes before the first token.

The generation loop is ours (on top of `Llama.generate`) rather than
`create_chat_completion`, because we need what that API does not give while
streaming: exact prompt/completion token counts for the ledger, a cancellation
check between every two tokens, and stop sequences that never leak a partial
match to the client (`mesh.api.stops`). The chat prompt is rendered with the GGUF's
own template by llama-cpp-python's `Jinja2ChatFormatter`, exactly as
`create_chat_completion` would.

Tokens reach the event loop through `loop.call_soon_threadsafe` into a
per-request asyncio queue; that queue is bounded by the model's context length,
since one request never produces more tokens than the context holds.
"""

from __future__ import annotations

import asyncio
import codecs
import enum
import logging
import queue
import secrets
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from mesh.api.stops import StopScanner
from mesh.clock import SYSTEM, Clock
from mesh.config import ModelConfig
from mesh.errors import (
    BackendError,
    ConfigError,
    ContextLengthExceeded,
    InvalidRequest,
    MeshError,
    Overloaded,
    Unavailable,
)
from mesh.inference import (
    Finished,
    FinishReason,
    InferenceEvent,
    InferenceRequest,
    Load,
    ModelInfo,
    TextDelta,
)

logger = logging.getLogger(__name__)

DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95
DEFAULT_TOP_K = 40
DEFAULT_MIN_P = 0.05
TPS_SMOOTHING = 0.3  # weight of the newest measurement in the tokens/s average

# llama.cpp's `general.file_type` values for the quantizations people actually ship.
_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
    16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16",
}  # fmt: skip


def _first(*values: float | None) -> float:
    """The request's value, else the model's default, else llama.cpp's."""
    for value in values:
        if value is not None:
            return value
    raise ValueError("no default given")


class _State(enum.Enum):
    QUEUED = 1
    RUNNING = 2
    DONE = 3


@dataclass(frozen=True, slots=True)
class _Failure:
    error: MeshError


@dataclass(eq=False, kw_only=True)
class _Job:
    request: InferenceRequest
    prompt_tokens: list[int]
    max_new_tokens: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[InferenceEvent | _Failure] = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    state: _State = _State.QUEUED
    counted_prompt_tokens: int = 0  # the prompt without a failover continuation
    prepared: bool = True  # False: the worker renders and tokenizes the prompt first

    def emit(self, event: InferenceEvent | _Failure) -> None:
        """Called from the worker thread."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancel.set()


class LlamaStream:
    """The caller's end of one request."""

    def __init__(self, job: _Job, backend: LlamaCppBackend) -> None:
        self._job = job
        self._backend = backend
        self._done = False

    def __aiter__(self) -> AsyncIterator[InferenceEvent]:
        return self

    async def __anext__(self) -> InferenceEvent:
        if self._done:
            raise StopAsyncIteration
        event = await self._job.events.get()
        if isinstance(event, _Failure):
            self._done = True
            raise event.error
        if isinstance(event, Finished):
            self._done = True
        return event

    async def aclose(self) -> None:
        self._done = True
        self._backend.cancel(self._job)


class LlamaCppBackend:
    def __init__(self, config: ModelConfig, *, clock: Clock = SYSTEM) -> None:
        self._clock = clock
        self._config = config
        self._llama: Any = None
        self._formatter: Any = None
        self._info = ModelInfo(
            name=config.name,
            aliases=config.aliases,
            context_length=config.context_length,
            backend="llama_cpp",
        )
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued: list[_Job] = []
        self._running: _Job | None = None
        self._slots = 1 + config.queue_size
        self._closing = False
        self._thread: threading.Thread | None = None
        self._tokens_per_second = 0.0
        # Lifetime counters, shown by `allerac status`.
        self.counters = {"completed": 0, "cancelled": 0, "failed": 0, "rejected": 0}

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def info(self) -> ModelInfo:
        return replace(self._info, tokens_per_second=round(self._tokens_per_second, 1))

    @property
    def config(self) -> ModelConfig:
        return self._config

    def _usable_context(self, llama: Any) -> int:
        """The context a request may fill: what was configured, never more. llama.cpp pads
        its context up (to a multiple of 256) and reports that, but llama-cpp-python sizes
        its token buffers by the context asked for, so a prompt between the two fails
        inside it ("could not broadcast input array")."""
        return min(int(llama.n_ctx()), self._config.context_length)

    async def start(self) -> None:
        await asyncio.to_thread(self._load_model)
        self._thread = threading.Thread(
            target=self._work, name=f"llama:{self._config.name}", daemon=False
        )
        self._thread.start()

    def _load_model(self) -> None:
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        cfg = self._config
        if cfg.path is None:
            raise ConfigError(f"model {cfg.name!r}: a llama_cpp model needs a path (a GGUF file)")
        kwargs: dict[str, Any] = {
            "model_path": str(cfg.path),
            "n_ctx": cfg.context_length,
            "verbose": False,
        }
        if cfg.threads is not None:
            kwargs["n_threads"] = cfg.threads
            kwargs["n_threads_batch"] = cfg.threads
        started = self._clock.monotonic()
        try:
            llama = Llama(**kwargs)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ConfigError(
                f"cannot load model {cfg.name!r} from {cfg.path}: {exc} "
                "(is it a GGUF file llama.cpp supports?)"
            ) from exc
        metadata: dict[str, str] = dict(llama.metadata)
        template = metadata.get("tokenizer.chat_template")
        if template:
            vocab_model = llama._model
            eos_id, bos_id = llama.token_eos(), llama.token_bos()
            self._formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=vocab_model.token_get_text(eos_id) if eos_id != -1 else "",
                bos_token=vocab_model.token_get_text(bos_id) if bos_id != -1 else "",
                add_generation_prompt=True,
            )
        try:
            file_type = _FILE_TYPES.get(int(metadata.get("general.file_type", "-1")), "")
        except ValueError:
            file_type = ""
        self._info = replace(
            self._info,
            family=metadata.get("general.architecture", ""),
            parameter_count=int(llama._model.n_params()),
            quantization=file_type,
            context_length=self._usable_context(llama),
            chat=self._formatter is not None,
        )
        self._llama = llama
        logger.info(
            "loaded model %s (%s, %s, %s params) in %.2f s",
            cfg.name,
            self._info.family,
            file_type or "unknown quantization",
            self._info.parameter_count,
            self._clock.monotonic() - started,
        )

    def drain(self) -> None:
        """Take no new requests (they get 503); what is admitted goes on."""
        with self._lock:
            self._closing = True

    def busy(self) -> bool:
        with self._lock:
            return self._running is not None or bool(self._queued)

    def cancel_all(self) -> None:
        """End everything now: waiting requests get 503, the running one ends as cancelled."""
        with self._lock:
            self._closing = True
            queued, self._queued = self._queued, []
            running = self._running
            for job in queued:
                job.state = _State.DONE
        for job in queued:
            job.cancel.set()
            job.emit(_Failure(Unavailable("the node is shutting down")))
        if running is not None:
            running.cancel.set()

    async def aclose(self) -> None:
        """Cancel everything still queued or running, stop the worker, free the model."""
        self.cancel_all()
        self._jobs.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        if self._llama is not None:
            self._llama.close()
            self._llama = None

    # --- admission ---------------------------------------------------------------------------

    def load(self) -> Load:
        with self._lock:
            return Load(
                active_streams=1 if self._running is not None else 0,
                queued=len(self._queued),
                slots=self._slots,
                draining=self._closing,
            )

    async def open(self, request: InferenceRequest) -> LlamaStream:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._closing or self._llama is None:
                raise Unavailable(f"model {self._config.name!r} is not serving (shutting down)")
            busy = len(self._queued) + (1 if self._running is not None else 0)
            if busy >= self._slots:
                self.counters["rejected"] += 1
                raise Overloaded(
                    f"model {self._config.name!r} is busy: {busy} requests running or waiting "
                    f"(the limit is {self._slots}); retry shortly"
                )
            # Hold the slot while the prompt is prepared, so concurrent admissions count it.
            idle = busy == 0
            placeholder = _Job(
                request=request, prompt_tokens=[], max_new_tokens=0, loop=loop, prepared=not idle
            )
            self._queued.append(placeholder)
        if idle:  # the worker is free: it prepares the prompt itself (module docstring)
            self._jobs.put(placeholder)
            return LlamaStream(placeholder, self)
        try:
            prompt_tokens, max_new, counted = await loop.run_in_executor(
                None, self._prepare, request
            )
        except BaseException:
            self._remove_queued(placeholder)
            raise
        placeholder.prompt_tokens = prompt_tokens
        placeholder.max_new_tokens = max_new
        placeholder.counted_prompt_tokens = counted
        with self._lock:
            if placeholder.state is _State.DONE:  # aclose() ran meanwhile
                raise Unavailable(f"model {self._config.name!r} is shutting down")
        self._jobs.put(placeholder)
        return LlamaStream(placeholder, self)

    def _remove_queued(self, job: _Job, *, cancelled: bool = False) -> bool:
        with self._lock:
            if job.state is _State.QUEUED and job in self._queued:
                self._queued.remove(job)
                job.state = _State.DONE
                if cancelled:
                    self.counters["cancelled"] += 1
                return True
        return False

    def cancel(self, job: _Job) -> None:
        """The caller left: a queued job frees its slot now, a running one at the next token."""
        job.cancel.set()
        self._remove_queued(job, cancelled=True)

    def _prepare(self, request: InferenceRequest) -> tuple[list[int], int, int]:
        """Render and tokenize the prompt; check it fits. Runs on the worker or an executor thread
        (llama.cpp tokenization only reads the vocabulary, so it is safe beside decoding)."""
        llama = self._llama
        prompt_only = 0
        if request.messages is not None:
            if self._formatter is None:
                raise InvalidRequest(
                    f"model {self._config.name!r} has no chat template; use /v1/completions",
                    param="model",
                )
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
            system = self._config.system_prompt
            if system and not any(m.role == "system" for m in request.messages):
                messages.insert(0, {"role": "system", "content": system})
            try:
                rendered = self._formatter(messages=messages)
            except Exception as exc:  # a template may raise anything (jinja2, ValueError)
                raise InvalidRequest(
                    f"the model's chat template rejected the messages: {exc}"
                ) from exc
            add_bos = not rendered.added_special
            tokens = llama.tokenize(rendered.prompt.encode("utf-8"), add_bos=add_bos, special=True)
            if request.continuation:
                # Failover: the answer so far follows the prompt; the model goes on from it.
                prompt_only = len(tokens)
                tokens = llama.tokenize(
                    (rendered.prompt + request.continuation).encode("utf-8"),
                    add_bos=add_bos,
                    special=True,
                )
        else:
            assert request.prompt is not None
            tokens = llama.tokenize(request.prompt.encode("utf-8"), add_bos=True, special=False)
            if request.continuation:
                prompt_only = len(tokens)
                tokens = llama.tokenize(
                    (request.prompt + request.continuation).encode("utf-8"),
                    add_bos=True,
                    special=False,
                )
            if not tokens:
                bos = llama.token_bos()
                if bos == -1:
                    raise InvalidRequest("prompt must not be empty", param="prompt")
                tokens = [bos]
        n_ctx = self._usable_context(llama)
        room = n_ctx - len(tokens)
        wanted = request.sampling.max_tokens
        if room <= 0 or (wanted is not None and wanted > room):
            raise ContextLengthExceeded(
                f"model {self._config.name!r} has a context of {n_ctx} tokens; the prompt uses "
                f"{len(tokens)}"
                + (f" and max_tokens asks for {wanted} more" if wanted is not None else "")
                + "; shorten the prompt or lower max_tokens",
                param="messages" if request.is_chat else "prompt",
            )
        prompt_tokens = prompt_only if request.continuation else len(tokens)
        return tokens, room if wanted is None else wanted, prompt_tokens

    # --- the worker --------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self._lock:
                if job.state is not _State.QUEUED or job.cancel.is_set():
                    if job in self._queued:
                        self._queued.remove(job)
                    job.state = _State.DONE
                    continue
                self._queued.remove(job)
                job.state = _State.RUNNING
                self._running = job
            if not job.prepared:
                try:
                    job.prompt_tokens, job.max_new_tokens, job.counted_prompt_tokens = (
                        self._prepare(job.request)
                    )
                except MeshError as error:  # refused before its first token, as in open()
                    with self._lock:
                        self._running = None
                        job.state = _State.DONE
                    job.emit(_Failure(error))
                    continue
            try:
                finished = self._generate(job)
            except Exception as exc:
                logger.exception(
                    "model %s failed on request %s", self._config.name, job.request.request_id
                )
                outcome: InferenceEvent | _Failure = _Failure(
                    BackendError(f"model {self._config.name!r} failed: {exc}")
                )
            else:
                outcome = finished
            with self._lock:
                self._running = None
                job.state = _State.DONE
                if not isinstance(outcome, Finished):
                    self.counters["failed"] += 1
                elif outcome.reason is FinishReason.CANCELLED:
                    self.counters["cancelled"] += 1
                else:
                    self.counters["completed"] += 1
            # The slot is free before the caller hears the end, so its next request is admitted.
            job.emit(outcome)

    def _generate(self, job: _Job) -> Finished:
        import llama_cpp

        llama = self._llama
        vocab = llama._model.vocab
        sampling = job.request.sampling
        llama.set_seed(sampling.seed if sampling.seed is not None else secrets.randbits(32))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        scanner = StopScanner(sampling.stop)
        produced = 0
        unsent = 0  # tokens whose text is not out yet (held back by the stop scanner)
        reason = FinishReason.LENGTH
        first_at = last_at = 0.0
        cfg = self._config
        temperature = _first(sampling.temperature, cfg.temperature, DEFAULT_TEMPERATURE)
        generator = llama.generate(
            job.prompt_tokens,
            temp=temperature,
            top_p=_first(sampling.top_p, cfg.top_p, DEFAULT_TOP_P),
            top_k=DEFAULT_TOP_K,
            min_p=DEFAULT_MIN_P,
            repeat_penalty=1.0,
            reset=True,
        )
        try:
            for token in generator:
                if job.cancel.is_set():
                    reason = FinishReason.CANCELLED
                    break
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    reason = FinishReason.STOP
                    break
                produced += 1
                unsent += 1
                last_at = self._clock.monotonic()
                if produced == 1:
                    first_at = last_at
                released, stopped = scanner.feed(decoder.decode(llama.detokenize([token])))
                if released:
                    job.emit(TextDelta(released, unsent))
                    unsent = 0
                if stopped:
                    reason = FinishReason.STOP
                    break
                if produced >= job.max_new_tokens:
                    reason = FinishReason.LENGTH
                    break
        finally:
            generator.close()
        if reason is not FinishReason.CANCELLED and not scanner.stopped:
            released, _ = scanner.feed(decoder.decode(b"", final=True))
            rest, stopped = scanner.flush()
            tail = released + rest
            if stopped:
                reason = FinishReason.STOP
            if tail:
                job.emit(TextDelta(tail, max(1, unsent)))
        if produced >= 8 and last_at > first_at:
            rate = (produced - 1) / (last_at - first_at)
            self._tokens_per_second = (
                rate
                if self._tokens_per_second == 0
                else (1 - TPS_SMOOTHING) * self._tokens_per_second + TPS_SMOOTHING * rate
            )
        return Finished(
            reason=reason, prompt_tokens=job.counted_prompt_tokens, completion_tokens=produced
        )
