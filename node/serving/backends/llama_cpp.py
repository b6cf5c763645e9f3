"""The llama.cpp backend: GGUF models through llama-cpp-python's low-level bindings.

How it works. One worker thread per loaded model owns one llama.cpp context holding
`parallel` sequences, one per *slot* (llama.cpp's own server calls them the same). Each
step of the worker is one `llama_decode` of a batch that carries, for every slot that is
generating, its last sampled token, and for the slots still reading their prompts the next
chunk of it (continuous batching): a new request starts while others are half-way through
theirs, and a long prompt is read a chunk per step beside the others' decoding rather than
stalling them. A step that finishes a prompt goes ahead of the others' next tokens (a few
such steps in a row at most: `PROMPTS_AHEAD_OF_ANSWERS`), and a later prompt joins a step
only whole, so requests that arrive together get their first tokens one prompt apart and
the last waits for the others' prompts only. Each slot samples with its own chain
(`llama_sampling`), so requests batched together never share sampling state: a seeded
request gives what it gives alone.

The KV cache gives every sequence its own stream of the full configured context (llama.cpp's
non-unified cache), so batching never changes what a sequence attends to, and weights are
kept in llama.cpp's plain layouts (`_model_params`), so no row's arithmetic depends on the
batch: a greedy request produces the same tokens whoever runs beside it (tests/test_slots.py
checks it on both test models).

Prompt cache: a slot keeps its sequence's KV cache after its request ends, and a new request
takes the free slot holding the longest prefix of its prompt, so a conversation's next turn
reads only what is new. When a slot's cached conversation is about to be overwritten it is
saved to memory first (`prompt_cache`, bounded by `prompt_cache_mb`) and restored into any
free slot when that conversation comes back. Each slot and saved prefix keeps the keys of
the chats it holds (`mesh.routing.prefix`): `held_prefixes()` says which, for the card
(cache-aware routing sends a conversation's next turn back here).

Admission is counted synchronously in `open()` (slots running + `queue_size` waiting), so
a full model answers `Overloaded` at once. When it is full, a user holding more than a fair
share gives up their newest waiting request (it gets `Overloaded`, before any token, so its
entry node can try another box) to a user holding less; and a free slot goes to the waiting
request whose user holds the fewest slots (first come, first served among equals). A
request that leaves (cancelled) frees its place at once, also while its prompt is being
read: the worker ends it before the next step.

The prompt is rendered (with the GGUF's own chat template, by llama-cpp-python's
`Jinja2ChatFormatter`, exactly as `create_chat_completion` would) and tokenized, and
checked against the context, before it runs: by the worker when a slot is free (one thread
hop to the first token), otherwise by an executor thread while the request waits, so a
prompt that cannot fit is refused before the first token either way.

The generation loop is ours because we need what the high-level API does not give while
streaming: exact prompt/completion token counts for the ledger, a cancellation check every
step, and stop sequences that never leak a partial match (`mesh.api.stops`). Tokens reach
the event loop through `loop.call_soon_threadsafe` into a per-request asyncio queue,
bounded by the context length (one request never produces more tokens than that).
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import enum
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from mesh.api.stops import StopScanner
from mesh.api.tool_calls import (
    ToolCallReader,
    allowed_tools,
    call_forced,
    calls_asked,
    parallel_allowed,
    template_input,
)
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
    UnsupportedParameter,
)
from mesh.inference import (
    MAX_HELD_PREFIXES,
    Feature,
    Finished,
    FinishReason,
    InferenceEvent,
    InferenceRequest,
    Load,
    ModelInfo,
    TextDelta,
    TokenLogprob,
    ToolCallDelta,
    TopLogprob,
)
from mesh.routing.prefix import request_key
from node.serving.backends.llama_sampling import (
    SamplingPlan,
    SlotSampler,
    grammar_fits,
    grammar_misfit,
    grammar_of,
)
from node.serving.backends.prompt_cache import PromptCache, common_prefix
from node.store.hardware import default_threads, memory_bytes, physical_cores

logger = logging.getLogger(__name__)

TPS_SMOOTHING = 0.3  # weight of the newest measurement in the tokens/s average
BATCH_TOKENS = 512  # the most tokens one llama_decode takes (llama.cpp's n_batch)
# Prompt tokens read per step while other slots are generating: a long prompt costs the
# others this much delay per token they make, not the whole prompt's. Most of a batch: each
# step costs more than its tokens (with 128, four users' 284-token prompts took 11 % longer
# to read than one after the other; with 384, 2 %: bench/bench_slots.py's TTFT row).
PROMPT_CHUNK_BESIDE_DECODING = 384
# A step that finishes a prompt reads it without the running answers' next tokens: with
# llama.cpp's non-unified cache a batch that mixes sequences is computed in several parts,
# each costing about a decode step, and with the answers riding along four users' last
# first token came 2-8 % later than one user's plus three prompts' reading (issue 14's
# row; bench/bench_slots.py). A running answer waits for at most this many such steps in a
# row: four users asking a Home box at once each get a first token before anyone a second.
PROMPTS_AHEAD_OF_ANSWERS = 3
MAX_DEFAULT_PARALLEL = 8
MIN_DEFAULT_PARALLEL = 4
KV_MEMORY_SHARE = 4  # slots' KV caches get at most 1/4 of the box's memory by default
PROMPT_CACHE_MEMORY_SHARE = 32  # saved prefixes get 1/32 of it by default...
MAX_DEFAULT_PROMPT_CACHE_BYTES = 1 << 30  # ...and at most 1 GiB
MIN_SAVED_PREFIX_TOKENS = 64  # shorter prefixes are cheaper to read again than to keep

# llama.cpp's `general.file_type` values for the quantizations people actually ship.
_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
    16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16",
}  # fmt: skip

_backend_ready = threading.Lock()
_backend_initialized = False


def _init_llama_backend() -> None:
    """llama.cpp's process-wide setup, once; and its log lines only on errors."""
    global _backend_initialized
    import llama_cpp
    from llama_cpp._logger import set_verbose

    with _backend_ready:
        if not _backend_initialized:
            set_verbose(False)
            llama_cpp.llama_backend_init()
            _backend_initialized = True


def _model_params() -> Any:
    """llama.cpp's model defaults, without its repacked weight layouts ("extra buffer
    types": Q4_0, Q4_K, IQ4_NL, Q8_0 on x86 and ARM). Those multiply several rows at once
    with another summation order than one row alone, so a sequence's logits would depend on
    how many others share its batch, and a greedy answer could change with the load
    (measured: Gemma-3-270M Q4_K_M gave a different continuation batched than alone).
    Without them every row is computed the same way, whatever the batch."""
    import llama_cpp

    params = llama_cpp.llama_model_default_params()
    params.use_extra_bufts = False
    return params


def default_parallel(*, cores: int, memory: int, kv_bytes_per_slot: int) -> int:
    """Slots for a model nobody configured: one per physical core, at least 4 (a household
    asks at once) and at most 8 (beyond that each answer gets slow on a CPU), fewer when
    their KV caches would take more than a quarter of the memory."""
    wanted = max(MIN_DEFAULT_PARALLEL, min(MAX_DEFAULT_PARALLEL, cores))
    if memory > 0 and kv_bytes_per_slot > 0:
        wanted = min(wanted, memory // KV_MEMORY_SHARE // kv_bytes_per_slot)
    return max(1, wanted)


def default_prompt_cache_bytes(memory: int) -> int:
    return min(MAX_DEFAULT_PROMPT_CACHE_BYTES, memory // PROMPT_CACHE_MEMORY_SHARE)


def kv_bytes_per_token(metadata: dict[str, str]) -> int:
    """An f16 KV cache's bytes per token, from the GGUF's attention shape (0 if unknown)."""
    arch = metadata.get("general.architecture", "")
    try:
        layers = int(metadata[f"{arch}.block_count"])
        heads = int(metadata[f"{arch}.attention.head_count"])
        kv_heads = int(metadata.get(f"{arch}.attention.head_count_kv", heads))
        embedding = int(metadata[f"{arch}.embedding_length"])
        key_length = int(metadata.get(f"{arch}.attention.key_length", embedding // heads))
        value_length = int(metadata.get(f"{arch}.attention.value_length", key_length))
    except (KeyError, ValueError, ZeroDivisionError):
        return 0
    return 2 * layers * kv_heads * (key_length + value_length)


PROBE_TOOL = "allerac_probe_tool_4d1c"


def renders_tools(formatter: Any) -> bool:
    """Does this chat template render the tools it is given (a Hermes, Qwen, Llama 3.1
    template does; SmolLM2's does not)? Seen by rendering one: its name must show."""
    probe = [{"type": "function", "function": {"name": PROBE_TOOL, "parameters": {}}}]
    try:
        rendered = formatter(messages=[{"role": "user", "content": "hi"}], tools=probe)
    except Exception:  # a template may raise anything (jinja2, ValueError)
        return False
    return PROBE_TOOL in str(rendered.prompt)


def _smoothed(average: float, rate: float) -> float:
    """A speed's running average with a new measurement (the first one taken as it is)."""
    return rate if average == 0 else (1 - TPS_SMOOTHING) * average + TPS_SMOOTHING * rate


class _State(enum.Enum):
    WAITING = 1  # admitted, waiting for a slot
    RUNNING = 2  # in a slot
    DONE = 3


@dataclass(frozen=True, slots=True)
class _Failure:
    error: MeshError


_arrivals = itertools.count()


@dataclass(eq=False, kw_only=True)
class _Job:
    request: InferenceRequest
    loop: asyncio.AbstractEventLoop
    prompt_tokens: list[int] = field(default_factory=list)
    max_new_tokens: int = 0
    events: asyncio.Queue[InferenceEvent | _Failure] = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    state: _State = _State.WAITING
    counted_prompt_tokens: int = 0  # the prompt without a failover continuation
    grammar_prime: list[int] = field(default_factory=list)  # a structured continuation's
    prepared: bool = True  # False: the worker renders and tokenizes the prompt first
    refusal: MeshError | None = None  # why it was turned away after admission
    arrival: int = field(default_factory=lambda: next(_arrivals))

    @property
    def user(self) -> str:
        return self.request.user

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


class _Generation:
    """One request's answer being made in a slot: its sampler, and what becomes text."""

    def __init__(self, job: _Job, sampler: SlotSampler, *, backend: LlamaCppBackend) -> None:
        self.job = job
        self.sampler = sampler
        self._backend = backend
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._scanner = StopScanner(job.request.sampling.stop)
        self.produced = 0
        self._unsent = 0  # tokens whose text is not out yet (held back by the stop scanner)
        self.first_at = self.last_at = 0.0
        request = job.request
        self.wants_logprobs = request.sampling.logprobs
        self.top_logprobs = request.sampling.top_logprobs
        self._logprobs: list[TokenLogprob] = []  # of the tokens whose text is not out yet
        # Tools offered: the answer is read as text or calls (mesh.api.tool_calls). A
        # continuation goes on after text already sent, so it stays text.
        self._calls = (
            ToolCallReader(
                allowed_tools(request),
                forced=call_forced(request),
                parallel=parallel_allowed(request),
            )
            if calls_asked(request) and not request.continuation
            else None
        )
        if request.sampling.echo and request.prompt and not request.continuation:
            # Completions' echo: the prompt first, as OpenAI sends it, generated by nobody
            # (no tokens) and never scanned for stop strings.
            job.emit(TextDelta(request.prompt, 0))

    def accept(self, token: int) -> Finished | None:
        """`token` was sampled: send what can be sent; the end, when this was the last."""
        backend = self._backend
        if backend.is_end_of_generation(token):
            if self._logprobs:
                self._logprobs.pop()  # the end's own: it makes no text
            return self.finish(FinishReason.STOP)
        self.produced += 1
        self._unsent += 1
        self.last_at = backend.clock.monotonic()
        if self.produced == 1:
            self.first_at = self.last_at
        released, stopped = self._scanner.feed(self._decoder.decode(backend.piece(token)))
        if released:
            self._send(*self._read(released))
        if stopped:
            return self.finish(FinishReason.STOP)
        if self._calls is not None and self._calls.done:
            return self.finish(FinishReason.TOOL_CALLS)  # the calls are complete
        if self.produced >= self.job.max_new_tokens:
            return self.finish(FinishReason.LENGTH)
        return None

    def note_logprob(self, logprob: TokenLogprob) -> None:
        """The next token's log probability (sampled, not yet accepted). An end of
        generation token has none: it makes no text."""
        self._logprobs.append(logprob)

    def _take_logprobs(self) -> tuple[TokenLogprob, ...]:
        taken, self._logprobs = tuple(self._logprobs), []
        return taken

    def _read(self, text: str) -> tuple[str, tuple[ToolCallDelta, ...]]:
        """What of the model's text goes out as text, and as tool calls."""
        if self._calls is None:
            return text, ()
        return self._calls.feed(text)

    def _send(self, text: str, calls: tuple[ToolCallDelta, ...], *, last: bool = False) -> None:
        if text or calls:
            tokens = max(1, self._unsent) if last else self._unsent
            self.job.emit(TextDelta(text, tokens, self._take_logprobs(), tool_calls=calls))
            self._unsent = 0

    def finish(self, reason: FinishReason) -> Finished:
        if reason is not FinishReason.CANCELLED:
            text = ""
            calls: tuple[ToolCallDelta, ...] = ()
            if not self._scanner.stopped:
                released, _ = self._scanner.feed(self._decoder.decode(b"", final=True))
                rest, stopped = self._scanner.flush()
                if stopped:
                    reason = FinishReason.STOP
                text, calls = self._read(released + rest)
            if self._calls is not None:
                more_text, more_calls = self._calls.finish()
                text, calls = text + more_text, calls + more_calls
                if self._calls.calls and reason is FinishReason.STOP:
                    reason = FinishReason.TOOL_CALLS
            self._send(text, calls, last=True)
        return Finished(
            reason=reason,
            prompt_tokens=self.job.counted_prompt_tokens,
            completion_tokens=self.produced,
        )


@dataclass(eq=False)
class _Slot:
    """One sequence of the context. `tokens` is what its KV cache holds, position by
    position (kept after a request ends: the prompt cache); `pending` the tokens to feed
    it next (the rest of a prompt, or the last sampled token)."""

    seq_id: int
    tokens: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    generation: _Generation | None = None
    sampled: bool = False  # its request has its first token: `pending` is the last one
    last_used: int = 0
    keys: frozenset[bytes] = frozenset()  # the chats whose prompts `tokens` hold


class LlamaCppBackend:
    def __init__(self, config: ModelConfig, *, clock: Clock = SYSTEM) -> None:
        self.clock = clock
        self._config = config
        self._model: Any = None  # llama_cpp._internals.LlamaModel
        self._ctx: Any = None  # llama_cpp._internals.LlamaContext
        self._memory: Any = None
        self._batch: Any = None
        self._vocab: Any = None
        self._n_vocab = 0
        self._formatter: Any = None
        self._native_tools = False  # the chat template renders tools itself
        self._threads = config.threads or default_threads()
        self._parallel = config.parallel or 1  # decided at load when not configured
        self._n_ctx_seq = config.context_length
        self._info = ModelInfo(
            name=config.name,
            aliases=config.aliases,
            context_length=config.context_length,
            backend="llama_cpp",
            threads=self._threads,
            parallel=self._parallel,
            # Through each slot's sampler chain (llama_sampling.SamplingPlan); echo by
            # sending the prompt first, tools by reading the answer (_Generation).
            features=frozenset(
                {
                    Feature.TOOLS,
                    Feature.PENALTIES,
                    Feature.LOGIT_BIAS,
                    Feature.STRUCTURED_OUTPUT,
                    Feature.ECHO,
                    Feature.LOGPROBS,
                }
            ),
        )
        self._inbox: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiting: list[_Job] = []
        self._running: list[_Job] = []
        self._closing = False
        self._thread: threading.Thread | None = None
        self._tokens_per_second = 0.0
        self._prompt_tokens_per_second = 0.0  # measured on steps that only read prompts
        # The worker's own (no lock: only its thread touches them).
        self._slots: list[_Slot] = []
        self._prompt_steps_ahead = 0  # steps in a row that read prompts ahead of answers
        self._ready: list[_Job] = []  # handed to the worker, waiting for a slot
        self._cache = PromptCache(budget_bytes=0)
        self._ticks = itertools.count(1)
        self._held: frozenset[bytes] = frozenset()  # set by the worker (_note_held)
        # Lifetime counters, shown by `allerac status`.
        self.counters = {"completed": 0, "cancelled": 0, "failed": 0, "rejected": 0}
        self.prompt_cache_stats = {
            "prompt_tokens_read": 0,  # decoded
            "prompt_tokens_cached": 0,  # found in a slot's or a saved KV cache
            "prefixes_saved": 0,
            "prefixes_restored": 0,
        }

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def info(self) -> ModelInfo:
        return replace(
            self._info,
            tokens_per_second=round(self._tokens_per_second, 1),
            prompt_tokens_per_second=round(self._prompt_tokens_per_second, 1),
        )

    @property
    def config(self) -> ModelConfig:
        return self._config

    @property
    def parallel(self) -> int:
        return self._parallel

    @property
    def threads(self) -> int:
        return self._threads

    async def start(self) -> None:
        await asyncio.to_thread(self._load_model)
        self._thread = threading.Thread(
            target=self._work, name=f"llama:{self._config.name}", daemon=False
        )
        self._thread.start()

    def _load_model(self) -> None:
        import llama_cpp
        from llama_cpp._internals import LlamaContext, LlamaModel
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        cfg = self._config
        if cfg.path is None:
            raise ConfigError(f"model {cfg.name!r}: a llama_cpp model needs a path (a GGUF file)")
        _init_llama_backend()
        started = self.clock.monotonic()
        model: Any
        try:
            model = LlamaModel(path_model=str(cfg.path), params=_model_params(), verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ConfigError(
                f"cannot load model {cfg.name!r} from {cfg.path}: {exc} "
                "(is it a GGUF file llama.cpp supports?)"
            ) from exc
        metadata: dict[str, str] = model.metadata()
        memory = memory_bytes()
        kv_per_slot = kv_bytes_per_token(metadata) * cfg.context_length
        if cfg.parallel is None:
            self._parallel = default_parallel(
                cores=physical_cores(), memory=memory, kv_bytes_per_slot=kv_per_slot
            )
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = cfg.context_length * self._parallel
        params.n_batch = params.n_ubatch = BATCH_TOKENS
        params.n_seq_max = self._parallel
        params.kv_unified = False  # each sequence its own stream (module docstring)
        params.n_threads = params.n_threads_batch = self._threads
        try:
            ctx = LlamaContext(model=model, params=params, verbose=False)
        except (ValueError, RuntimeError) as exc:
            model.close()
            raise ConfigError(
                f"cannot make a context for model {cfg.name!r} ({self._parallel} slots of "
                f"{cfg.context_length} tokens): {exc}; lower parallel or context_length"
            ) from exc
        template = metadata.get("tokenizer.chat_template")
        if template:
            eos_id, bos_id = model.token_eos(), model.token_bos()
            self._formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=model.token_get_text(eos_id) if eos_id != -1 else "",
                bos_token=model.token_get_text(bos_id) if bos_id != -1 else "",
                add_generation_prompt=True,
            )
            self._native_tools = renders_tools(self._formatter)
        try:
            file_type = _FILE_TYPES.get(int(metadata.get("general.file_type", "-1")), "")
        except ValueError:
            file_type = ""
        # llama.cpp pads its context up and reports that, but a request may fill only what
        # was configured (what the card says, and what failover plans with).
        self._n_ctx_seq = min(int(llama_cpp.llama_n_ctx_seq(ctx.ctx)), cfg.context_length)
        budget = (
            cfg.prompt_cache_mb << 20
            if cfg.prompt_cache_mb is not None
            else default_prompt_cache_bytes(memory)
        )
        self._cache = PromptCache(budget_bytes=budget)
        self._slots = [_Slot(seq_id=i) for i in range(self._parallel)]
        self._batch = llama_cpp.llama_batch_init(BATCH_TOKENS, 0, 1)
        self._model, self._ctx, self._vocab = model, ctx, model.vocab
        self._memory = llama_cpp.llama_get_memory(ctx.ctx)
        self._n_vocab = model.n_vocab()
        self._info = replace(
            self._info,
            family=metadata.get("general.architecture", ""),
            parameter_count=int(model.n_params()),
            quantization=file_type,
            context_length=self._n_ctx_seq,
            chat=self._formatter is not None,
            parallel=self._parallel,
        )
        logger.info(
            "loaded model %s (%s, %s, %s params) in %.2f s: %d slots of %d tokens, %d threads, "
            "prompt cache %d MiB",
            cfg.name,
            self._info.family,
            file_type or "unknown quantization",
            self._info.parameter_count,
            self.clock.monotonic() - started,
            self._parallel,
            self._n_ctx_seq,
            self._threads,
            budget >> 20,
        )

    def _free_model(self) -> None:
        import llama_cpp

        for slot in self._slots:
            if slot.generation is not None:
                slot.generation.sampler.close()
                slot.generation = None
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None
        if self._model is not None:
            self._model.close()
            self._model = None

    def drain(self) -> None:
        """Take no new requests (they get 503); what is admitted goes on."""
        with self._lock:
            self._closing = True

    def busy(self) -> bool:
        with self._lock:
            return bool(self._running) or bool(self._waiting)

    def cancel_all(self) -> None:
        """End everything now: waiting requests get 503, running ones end as cancelled."""
        refusal = Unavailable("the node is shutting down")
        with self._lock:
            self._closing = True
            waiting, self._waiting = self._waiting, []
            running = list(self._running)
            for job in waiting:
                job.state = _State.DONE
                job.refusal = refusal
        for job in waiting:
            job.cancel.set()
            job.emit(_Failure(refusal))
        for job in running:
            job.cancel.set()

    async def aclose(self) -> None:
        """Cancel everything still queued or running, stop the worker, free the model."""
        self.cancel_all()
        self._inbox.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        self._free_model()

    # --- admission ---------------------------------------------------------------------------

    @property
    def _capacity(self) -> int:
        return self._parallel + self._config.queue_size

    def load(self) -> Load:
        with self._lock:
            return Load(
                active_streams=len(self._running),
                queued=len(self._waiting),
                slots=self._capacity,
                draining=self._closing,
                parallel=self._parallel,
            )

    async def open(self, request: InferenceRequest) -> LlamaStream:
        loop = asyncio.get_running_loop()
        bumped: _Job | None = None
        with self._lock:
            if self._closing or self._model is None:
                raise Unavailable(f"model {self._config.name!r} is not serving (shutting down)")
            busy = len(self._waiting) + len(self._running)
            if busy >= self._capacity:
                bumped = self._bump_for(request.user)
                if bumped is None:
                    self.counters["rejected"] += 1
                    raise Overloaded(
                        f"model {self._config.name!r} is busy: {busy} requests running or "
                        f"waiting (the limit is {self._capacity}); retry shortly"
                    )
            # A slot is free and nobody waits: the worker prepares the prompt itself and
            # starts it at once (module docstring). Otherwise it is prepared while it waits.
            start_now = len(self._running) + len(self._waiting) < self._parallel
            job = _Job(request=request, loop=loop, prepared=not start_now)
            self._waiting.append(job)
        if bumped is not None:
            bumped.cancel.set()
            assert bumped.refusal is not None
            bumped.emit(_Failure(bumped.refusal))
        if start_now:
            self._inbox.put(job)
            return LlamaStream(job, self)
        try:
            (
                job.prompt_tokens,
                job.max_new_tokens,
                job.counted_prompt_tokens,
                job.grammar_prime,
            ) = await loop.run_in_executor(None, self._prepare, request)
        except BaseException:
            self._forget(job)
            raise
        with self._lock:
            if job.state is _State.DONE:  # shut down or bumped meanwhile
                raise job.refusal or Unavailable(f"model {self._config.name!r} is shutting down")
        self._inbox.put(job)
        return LlamaStream(job, self)

    def _bump_for(self, user: str) -> _Job | None:
        """The box is full: the newest waiting request of the user holding the most, when
        that user holds at least two more than `user` does (a fair share); None otherwise.
        Called with the lock held; the bumped request is taken out and marked."""
        held: dict[str, int] = {}
        for job in itertools.chain(self._running, self._waiting):
            held[job.user] = held.get(job.user, 0) + 1
        mine = held.get(user, 0)
        for victim in reversed(self._waiting):
            if victim.user != user and held[victim.user] >= mine + 2:
                top = max(held.values())
                if held[victim.user] == top:
                    self._waiting.remove(victim)
                    victim.state = _State.DONE
                    victim.refusal = Overloaded(
                        f"model {self._config.name!r} is busy and this user holds "
                        f"{held[victim.user]} of its {self._capacity} places; another user "
                        "took this one (a fair share); retry shortly"
                    )
                    self.counters["rejected"] += 1
                    return victim
        return None

    def _forget(self, job: _Job, *, cancelled: bool = False) -> bool:
        """Take `job` out of the waiting or running lists (its place is free at once)."""
        with self._lock:
            for jobs in (self._waiting, self._running):
                if job in jobs:
                    jobs.remove(job)
                    job.state = _State.DONE
                    if cancelled:
                        self.counters["cancelled"] += 1
                    return True
        return False

    def cancel(self, job: _Job) -> None:
        """The caller left: its place is free now; a running request ends before the next
        decoding step (also while its prompt is being read)."""
        job.cancel.set()
        self._forget(job, cancelled=True)

    def _prepare(self, request: InferenceRequest) -> tuple[list[int], int, int, list[int]]:
        """Render and tokenize the prompt; check it fits (and a continuation its grammar:
        the last value, `_grammar_prime`). Runs on the worker or an executor thread
        (llama.cpp tokenization only reads the vocabulary, so it is safe beside decoding)."""
        model = self._model
        prompt_only = 0
        if request.messages is not None:
            if self._formatter is None:
                raise InvalidRequest(
                    f"model {self._config.name!r} has no chat template; use /v1/completions",
                    param="model",
                )
            messages, extra = template_input(
                request,
                native_tools=self._native_tools,
                system_prompt=self._config.system_prompt or "",
            )
            try:
                rendered = self._formatter(messages=messages, **extra)
            except Exception as exc:  # a template may raise anything (jinja2, ValueError)
                raise InvalidRequest(
                    f"the model's chat template rejected the messages: {exc}"
                ) from exc
            add_bos = not rendered.added_special
            tokens = model.tokenize(rendered.prompt.encode("utf-8"), add_bos, True)
            if request.continuation:
                # Failover: the answer so far follows the prompt; the model goes on from it.
                prompt_only = len(tokens)
                tokens = model.tokenize(
                    (rendered.prompt + request.continuation).encode("utf-8"), add_bos, True
                )
        else:
            assert request.prompt is not None
            tokens = model.tokenize(request.prompt.encode("utf-8"), True, False)
            if request.continuation:
                prompt_only = len(tokens)
                tokens = model.tokenize(
                    (request.prompt + request.continuation).encode("utf-8"), True, False
                )
            if not tokens:
                bos = model.token_bos()
                if bos == -1:
                    raise InvalidRequest("prompt must not be empty", param="prompt")
                tokens = [bos]
        # A forced tool call cut off on another box is not continued here: what was delivered
        # is the calls read from the hidden JSON, not that JSON.
        if request.continuation and call_forced(request):
            raise UnsupportedParameter(
                "a tool call cut off on one box cannot be continued on another",
                param="tool_choice",
            )
        n_vocab = self._n_vocab
        prime = self._grammar_prime(request)  # also: a schema no grammar can express, a 400 now
        n_vocab = self._n_vocab
        for token, _ in request.sampling.logit_bias:
            if not 0 <= token < n_vocab:
                raise InvalidRequest(
                    f"logit_bias names token {token}; model {self._config.name!r} has token "
                    f"IDs 0 to {n_vocab - 1}",
                    param="logit_bias",
                )
        n_ctx = self._n_ctx_seq
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
        return tokens, room if wanted is None else wanted, prompt_tokens, prime

    def _grammar_prime(self, request: InferenceRequest) -> list[int]:
        """A structured answer continued after failover: the delivered text's tokens, for
        the grammar to start past them (checked here, so a misfit is a 400 before the answer
        takes a slot). The grammar reads text, so any tokenization of it will do; a grammar
        whose schema cannot be expressed is a 400 here too (`grammar_of`)."""
        grammar = grammar_of(request)
        if not (grammar and request.continuation):
            return []
        text = request.continuation.encode("utf-8")
        tokens = self._model.tokenize(text, False, False)
        if bytes(self._model.detokenize(tokens)) != text or not grammar_fits(
            self._model, grammar, tokens
        ):
            raise grammar_misfit()
        return list(tokens)

    # --- what the generations ask ------------------------------------------------------------

    def is_end_of_generation(self, token: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def piece(self, token: int) -> bytes:
        return bytes(self._model.detokenize([token]))

    def _logprob(self, index: int, token: int, top: int) -> TokenLogprob:
        """`token`'s log probability under the model's distribution at `index` of the last
        batch (the raw logits, before sampling's own changes), and the `top` most likely."""
        import llama_cpp
        import numpy as np

        pointer = llama_cpp.llama_get_logits_ith(self._ctx.ctx, index)
        logits = np.ctypeslib.as_array(pointer, shape=(self._n_vocab,)).astype(np.float64)
        peak = float(logits.max())
        logprobs = logits - (peak + float(np.log(np.exp(logits - peak).sum())))

        def text(t: int) -> str:
            return self.piece(t).decode("utf-8", errors="replace")

        best: list[TopLogprob] = []
        if top:
            ids = np.argpartition(-logprobs, top)[:top]
            ids = ids[np.argsort(-logprobs[ids])]
            best = [TopLogprob(token=text(int(i)), logprob=float(logprobs[i])) for i in ids]
        return TokenLogprob(token=text(token), logprob=float(logprobs[token]), top=tuple(best))

    # --- the worker --------------------------------------------------------------------------

    def _work(self) -> None:
        stopping = False
        try:
            while not stopping:
                idle = not self._ready and all(s.generation is None for s in self._slots)
                try:
                    job = self._inbox.get() if idle else self._inbox.get_nowait()
                    while True:
                        if job is None:
                            stopping = True
                            break
                        self._ready.append(job)
                        job = self._inbox.get_nowait()
                except queue.Empty:
                    pass
                self._end_cancelled()
                if stopping:
                    break
                try:
                    self._assign_slots()
                    if any(s.generation is not None for s in self._slots):
                        self._step()
                except Exception as exc:  # what ran fails; the worker serves the next ones
                    logger.exception("model %s failed", self._config.name)
                    self._fail_all(BackendError(f"model {self._config.name!r} failed: {exc}"))
        finally:
            for slot in self._slots:
                if slot.generation is not None:
                    self._end(slot, slot.generation.finish(FinishReason.CANCELLED))

    def _end_cancelled(self) -> None:
        for slot in self._slots:
            if slot.generation is not None and slot.generation.job.cancel.is_set():
                self._end(slot, slot.generation.finish(FinishReason.CANCELLED))

    def _end(self, slot: _Slot, outcome: Finished | _Failure) -> None:
        """The slot's request is over: count it, free the slot, tell the caller."""
        generation = slot.generation
        assert generation is not None
        slot.generation = None
        slot.pending = []
        slot.last_used = next(self._ticks)
        generation.sampler.close()
        job = generation.job
        if not slot.sampled and slot.keys:  # left with its prompt half read: not held
            slot.keys = frozenset()
            self._note_held()
        if isinstance(outcome, Finished):
            self._measured(generation)
        with self._lock:
            if job in self._running:  # not when the caller cancelled it (counted then)
                self._running.remove(job)
                job.state = _State.DONE
                if not isinstance(outcome, Finished):
                    self.counters["failed"] += 1
                elif outcome.reason is FinishReason.CANCELLED:
                    self.counters["cancelled"] += 1
                else:
                    self.counters["completed"] += 1
        # The slot is free before the caller hears the end, so its next request is admitted.
        job.emit(outcome)

    def _fail_all(self, error: MeshError) -> None:
        """Every running request fails (before or after its first token: the caller's
        failover knows which); their sequences are emptied, the slots serve on."""
        for slot in self._slots:
            if slot.generation is not None:
                self._end(slot, _Failure(error))
                self._clear(slot)

    def _measured(self, generation: _Generation) -> None:
        produced, first_at, last_at = generation.produced, generation.first_at, generation.last_at
        if produced >= 8 and last_at > first_at:
            rate = (produced - 1) / (last_at - first_at)
            self._tokens_per_second = _smoothed(self._tokens_per_second, rate)

    def _prompt_measured(self, tokens: int, seconds: float) -> None:
        """A step read `tokens` prompt tokens (and nothing else) in `seconds`."""
        if seconds > 0:
            self._prompt_tokens_per_second = _smoothed(
                self._prompt_tokens_per_second, tokens / seconds
            )

    def _assign_slots(self) -> None:
        """Waiting requests into free slots: the user holding the fewest slots first, each
        into the free slot whose KV cache holds the longest prefix of its prompt."""
        self._ready = [j for j in self._ready if j.state is _State.WAITING]
        free = [s for s in self._slots if s.generation is None]
        while free and self._ready:
            held: dict[str, int] = {}
            for slot in self._slots:
                if slot.generation is not None:
                    user = slot.generation.job.user
                    held[user] = held.get(user, 0) + 1
            job = min(self._ready, key=lambda j: (held.get(j.user, 0), j.arrival))
            self._ready.remove(job)
            with self._lock:
                if job.state is not _State.WAITING:
                    continue
                self._waiting.remove(job)
                self._running.append(job)
                job.state = _State.RUNNING
            if not job.prepared:
                try:
                    (
                        job.prompt_tokens,
                        job.max_new_tokens,
                        job.counted_prompt_tokens,
                        job.grammar_prime,
                    ) = self._prepare(job.request)
                except MeshError as error:  # refused before its first token, as in open()
                    self._forget(job)
                    job.emit(_Failure(error))
                    continue
            slot = self._place(job.prompt_tokens, free, request_key(job.request))
            free.remove(slot)
            plan = SamplingPlan.of(job.request.sampling, self._config, request=job.request)
            # The prime was checked in _prepare: it fits (SlotSampler checks each token again).
            sampler = SlotSampler(
                plan, n_vocab=self._n_vocab, model=self._model, prime=job.grammar_prime
            )
            slot.generation = _Generation(job, sampler, backend=self)
            slot.sampled = False

    def _place(self, prompt: list[int], free: list[_Slot], key: bytes | None) -> _Slot:
        """The free slot for `prompt` (longest cached prefix; else the least recently used),
        its KV cache cut to what the prompt shares, and the rest of the prompt to read. The
        slot is named for the chat `key` from now on (a card signed while it runs says this
        box holds it; `_end` takes the name back if the prompt is left half read)."""
        import llama_cpp

        def worth(slot: _Slot) -> tuple[int, int]:
            # A slot is reused for what it shares only when that is at least half of what
            # it holds (llama.cpp's server has the same rule): a chat template's first few
            # tokens must not cost another conversation its cache.
            shared = common_prefix(slot.tokens, prompt)
            return (shared if 2 * shared >= len(slot.tokens) else 0, -slot.last_used)

        slot = max(free, key=worth)
        shared = common_prefix(slot.tokens, prompt)
        saved, saved_shared = self._cache.best(prompt)
        if len(slot.tokens) - shared >= MIN_SAVED_PREFIX_TOKENS:
            self._save(slot)  # what the slot holds is about to be overwritten
        if saved is not None and saved_shared > shared:
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
            state = (ctypes.c_uint8 * len(saved.state)).from_buffer(saved.state)  # no copy
            if llama_cpp.llama_state_seq_set_data(
                self._ctx.ctx, state, len(saved.state), slot.seq_id
            ):
                slot.tokens = list(saved.tokens)
                shared = saved_shared
                self._cache.touch(saved)
                self.prompt_cache_stats["prefixes_restored"] += 1
            else:
                self._clear(slot)
                shared = 0
        # At least one prompt token is read, so its logits are there to sample from.
        keep = min(shared, len(prompt) - 1)
        if keep < len(slot.tokens) and not llama_cpp.llama_memory_seq_rm(
            self._memory, slot.seq_id, keep, -1
        ):
            self._clear(slot)  # this cache cannot cut a sequence part-way (recurrent, SWA)
            keep = 0
        slot.tokens = prompt[:keep]
        slot.pending = prompt[keep:]
        slot.keys = frozenset() if key is None else frozenset({key})  # a new chat's now
        self._note_held()
        self.prompt_cache_stats["prompt_tokens_cached"] += keep
        return slot

    def _clear(self, slot: _Slot) -> None:
        import llama_cpp

        llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
        slot.tokens = []
        slot.keys = frozenset()
        self._note_held()

    def _note_held(self) -> None:
        """What `held_prefixes` answers from now on: the chats the slots and the saved
        prefixes hold, the most recently used first, at most MAX_HELD_PREFIXES."""
        newest: list[frozenset[bytes]] = [
            s.keys for s in sorted(self._slots, key=lambda s: -s.last_used)
        ]
        newest += self._cache.keys()
        held: dict[bytes, None] = {}
        for keys in newest:
            held.update(dict.fromkeys(keys))
        self._held = frozenset(list(held)[:MAX_HELD_PREFIXES])

    def held_prefixes(self) -> frozenset[bytes]:
        return self._held

    def _save(self, slot: _Slot) -> None:
        """Keep what `slot` holds in the prompt cache (llama.cpp's sequence state)."""
        import llama_cpp

        cache = self._cache
        if cache.budget_bytes <= 0:
            return
        if cache.holds(slot.tokens):
            cache.add_keys(slot.tokens, slot.keys)
            return
        size = int(llama_cpp.llama_state_seq_get_size(self._ctx.ctx, slot.seq_id))
        if not 0 < size <= cache.budget_bytes:
            return
        # llama.cpp writes straight into the memory the cache keeps: one pass over a few MB
        # (a ctypes array copied to bytes made two more, ~5 ms for SmolLM2's 290 tokens).
        state = bytearray(size)
        into = (ctypes.c_uint8 * size).from_buffer(state)
        written = int(llama_cpp.llama_state_seq_get_data(self._ctx.ctx, into, size, slot.seq_id))
        del into  # lets go of the bytearray, which may now shrink
        del state[written:]
        if written and cache.put(slot.tokens, state, slot.keys):
            self.prompt_cache_stats["prefixes_saved"] += 1

    def _step(self) -> None:
        """One llama_decode: every generating slot's last token, then prompt chunks."""
        import llama_cpp

        batch = self._batch
        batch.n_tokens = 0
        sample_at: list[tuple[_Slot, int]] = []
        fed: list[tuple[_Slot, int]] = []

        def add(slot: _Slot, count: int, *, last_logits: bool) -> None:
            base = len(slot.tokens)
            for j in range(count):
                i = batch.n_tokens
                batch.token[i] = slot.pending[j]
                batch.pos[i] = base + j
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = slot.seq_id
                batch.logits[i] = False
                batch.n_tokens = i + 1
            if last_logits:
                batch.logits[batch.n_tokens - 1] = True
                sample_at.append((slot, batch.n_tokens - 1))
            fed.append((slot, count))

        active = [s for s in self._slots if s.generation is not None]
        decoding = [s for s in active if s.sampled]
        reading = sorted(
            (s for s in active if not s.sampled),
            key=lambda s: s.generation.job.arrival if s.generation else 0,
        )
        # Prompts first: a prompt this step finishes is read ahead of the running answers'
        # next tokens, at most PROMPTS_AHEAD_OF_ANSWERS steps in a row.
        if (
            decoding
            and reading
            and len(reading[0].pending) <= BATCH_TOKENS
            and self._prompt_steps_ahead < PROMPTS_AHEAD_OF_ANSWERS
        ):
            self._prompt_steps_ahead += 1
            decoding = []
        elif decoding:
            self._prompt_steps_ahead = 0
        for slot in decoding:
            add(slot, 1, last_logits=True)
        room = BATCH_TOKENS - len(decoding)
        if decoding:
            room = min(room, PROMPT_CHUNK_BESIDE_DECODING)
        for slot in reading:
            # The first come is read (a chunk of it if it is long); the next ones only whole,
            # so that no first token waits for a part of a later prompt.
            if room <= 0 or (slot is not reading[0] and len(slot.pending) > room):
                break
            count = min(len(slot.pending), room)
            add(slot, count, last_logits=count == len(slot.pending))
            room -= count
        started = self.clock.monotonic()
        code = llama_cpp.llama_decode(self._ctx.ctx, batch)
        if not decoding and batch.n_tokens >= MIN_SAVED_PREFIX_TOKENS and code == 0:
            self._prompt_measured(batch.n_tokens, self.clock.monotonic() - started)
        if code != 0:
            logger.error("model %s: llama_decode returned %d", self._config.name, code)
            self._fail_all(BackendError(f"model {self._config.name!r} failed (decode {code})"))
            return
        for slot, count in fed:
            if not slot.sampled:
                self.prompt_cache_stats["prompt_tokens_read"] += count
            slot.tokens.extend(slot.pending[:count])
            del slot.pending[:count]
        for slot, index in sample_at:
            generation = slot.generation
            assert generation is not None
            token = generation.sampler.sample(self._ctx, index)
            if generation.wants_logprobs:
                generation.note_logprob(self._logprob(index, token, generation.top_logprobs))
            outcome = generation.accept(token)
            if outcome is not None:
                self._end(slot, outcome)
            else:
                slot.pending = [token]
                slot.sampled = True
