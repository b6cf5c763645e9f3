"""Sampling for one slot: a llama.cpp sampler chain per running request.

Every slot samples with its own chain, built from the request's parameters when the
request takes the slot and freed when it leaves, so requests batched together never
share sampling state (a seeded request draws the same tokens whoever runs beside it).

The chain is exactly the one llama-cpp-python's `Llama.generate` builds (`Llama.
_init_sampler`), which this backend used before it had slots, so answers, seeds
included, did not change: a penalties stage (neutral: repeat 1.0, no frequency or
presence penalty, over the last 64 tokens), then greedy at temperature 0, or top-k 40,
typical 1.0, top-p, min-p 0.05, temperature and a seeded draw.

How stages plug in: `SamplingPlan` is the whole recipe, stage by stage (`stages()`). The
request's presence and frequency penalties go in the penalties stage, its logit bias in a
stage of its own before it; a grammar (structured output, a forced tool call) after the
penalties, before the truncations, where llama.cpp wants it.

A structured answer continued after failover (`InferenceRequest.continuation`) starts with
its grammar already past the text delivered (`SlotSampler(prime=...)`). llama.cpp's grammar
accept aborts the whole process on a token that does not fit (GGML_ABORT on an end token the
grammar cannot end at, an uncaught C++ exception on any other misfit), so every token is
first offered alone to the grammar's apply, which only masks (a misfit's logit becomes
-inf), and accepted only when it survived: a continuation the grammar cannot take is a 400
(`grammar_misfit`), never a crash.
"""

from __future__ import annotations

import functools
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mesh.api.tool_calls import call_forced, call_schema
from mesh.config import ModelConfig
from mesh.errors import InvalidRequest
from mesh.inference import InferenceRequest, ResponseFormatType, Sampling

DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95
DEFAULT_TOP_K = 40
DEFAULT_MIN_P = 0.05
DEFAULT_TYPICAL_P = 1.0
PENALTY_LAST_N = 64  # llama-cpp-python's `last_n_tokens_size`
MIN_KEEP = 1


def _first(*values: float | None) -> float:
    """The request's value, else the model's default, else llama.cpp's."""
    for value in values:
        if value is not None:
            return value
    raise ValueError("no default given")


@dataclass(frozen=True, kw_only=True, slots=True)
class SamplingPlan:
    """What one request samples with, every default resolved."""

    temperature: float
    top_p: float
    seed: int  # the request's, or a fresh random one
    top_k: int = DEFAULT_TOP_K
    min_p: float = DEFAULT_MIN_P
    typical_p: float = DEFAULT_TYPICAL_P
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), as OpenAI's
    grammar: str = ""  # GBNF the answer must follow (structured output), or none

    @classmethod
    def of(
        cls, sampling: Sampling, model: ModelConfig, *, request: InferenceRequest | None = None
    ) -> SamplingPlan:
        return cls(
            temperature=_first(sampling.temperature, model.temperature, DEFAULT_TEMPERATURE),
            top_p=_first(sampling.top_p, model.top_p, DEFAULT_TOP_P),
            seed=sampling.seed if sampling.seed is not None else secrets.randbits(32),
            frequency_penalty=sampling.frequency_penalty or 0.0,
            presence_penalty=sampling.presence_penalty or 0.0,
            logit_bias=sampling.logit_bias,
            grammar=grammar_of(request) if request is not None else "",
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def stages(self) -> list[tuple[str, tuple[Any, ...]]]:
        """The chain, in order: (the `LlamaSampler.add_*` stage, its arguments). A logit
        bias comes first (OpenAI adds it to the logits before anything samples; -100 bans a
        token, +100 all but forces it); without one the chain is exactly as it was."""
        bias: list[tuple[str, tuple[Any, ...]]] = []
        if self.logit_bias:
            bias.append(("logit_bias", (dict(self.logit_bias),)))
        out: list[tuple[str, tuple[Any, ...]]] = [
            *bias,
            (
                "penalties",
                (
                    PENALTY_LAST_N,
                    self.repeat_penalty,
                    self.frequency_penalty,
                    self.presence_penalty,
                ),
            ),
        ]
        if self.grammar:
            out.append(("grammar", (self.grammar,)))
        if self.greedy:
            return [*out, ("greedy", ())]
        return [
            *out,
            ("top_k", (self.top_k,)),
            ("typical", (self.typical_p, MIN_KEEP)),
            ("top_p", (self.top_p, MIN_KEEP)),
            ("min_p", (self.min_p, MIN_KEEP)),
            ("temp", (self.temperature,)),
            ("dist", (self.seed,)),
        ]


class SlotSampler:
    """One request's sampler chain (llama.cpp's); `close()` frees it."""

    def __init__(
        self, plan: SamplingPlan, *, n_vocab: int, model: Any = None, prime: Sequence[int] = ()
    ) -> None:
        """`prime`: tokens of answer text already delivered (a failover's continuation); the
        grammar starts past them. One that does not fit is `grammar_misfit`'s 400."""
        import llama_cpp
        from llama_cpp import _internals

        internals: Any = _internals  # llama-cpp-python leaves these untyped
        self.plan = plan
        self._chain: Any = internals.LlamaSampler()
        for stage, args in plan.stages():
            if stage in ("penalties", "logit_bias"):
                getattr(self._chain, f"add_{stage}")(n_vocab, *args)
            elif stage == "grammar":
                grammar = grammar_stage(model, args[0])
                llama_cpp.llama_sampler_chain_add(self._chain.sampler, grammar)  # it owns it
                if prime and advance_grammar(grammar, prime) is not None:
                    self._chain.close()
                    raise grammar_misfit()
            else:
                getattr(self._chain, f"add_{stage}")(*args)

    def sample(self, ctx: Any, index: int) -> int:
        """The next token from the logits at `index` of the last batch (accepted into the
        chain's history, as llama.cpp's `llama_sampler_sample` does)."""
        return int(self._chain.sample(ctx, index))

    def close(self) -> None:
        self._chain.close()


def grammar_stage(model: Any, gbnf: str) -> Any:
    """A llama.cpp grammar sampler for `gbnf` (freed by `llama_sampler_free`, or by the chain
    it is added to)."""
    import llama_cpp
    from llama_cpp.llama_grammar import LlamaGrammar

    parsed = LlamaGrammar.from_string(gbnf, verbose=False)
    stage = llama_cpp.llama_sampler_init_grammar(
        model.vocab, parsed._grammar.encode("utf-8"), parsed._root.encode("utf-8")
    )
    if not stage:  # llama.cpp could not parse it (it logs why)
        raise InvalidRequest("the answer's grammar cannot be parsed", param="response_format")
    return stage


def advance_grammar(stage: Any, tokens: Sequence[int]) -> int | None:
    """Feed `tokens` to the grammar sampler `stage`, each one checked before it is accepted
    (module docstring): the index of the first that does not fit (nothing from it on is
    fed), or None when all did."""
    import ctypes

    import llama_cpp

    cell = (llama_cpp.llama_token_data * 1)()
    candidates = llama_cpp.llama_token_data_array(
        data=ctypes.cast(cell, llama_cpp.llama_token_data_p), size=1, selected=-1, sorted=False
    )
    for index, token in enumerate(tokens):
        cell[0] = llama_cpp.llama_token_data(token, 0.0, 0.0)
        candidates.size = 1
        llama_cpp.llama_sampler_apply(stage, ctypes.byref(candidates))
        if candidates.size != 1 or cell[0].logit == float("-inf"):
            return index
        llama_cpp.llama_sampler_accept(stage, token)
    return None


def grammar_fits(model: Any, gbnf: str, tokens: Sequence[int]) -> bool:
    """Whether `tokens` (any tokenization of the text) are a start the grammar allows."""
    import llama_cpp

    stage = grammar_stage(model, gbnf)
    try:
        return advance_grammar(stage, tokens) is None
    finally:
        llama_cpp.llama_sampler_free(stage)


def grammar_misfit() -> InvalidRequest:
    return InvalidRequest(
        "the answer so far (the continuation) does not fit the schema the answer must follow",
        param="response_format",
    )


@functools.lru_cache(maxsize=64)
def _schema_grammar(schema: str) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    return str(json_schema_to_gbnf(schema))


def grammar_of(request: InferenceRequest) -> str:
    """The GBNF grammar a request asks for ("" for plain text). A required or forced tool
    call: the generic call format with each function's parameters schema
    (`mesh.api.tool_calls.call_schema`; it wins over `response_format`, which is for
    content). Else `response_format`'s: any JSON object for `json_object`, the schema's
    language for `json_schema` (llama-cpp-python's converter, as `LlamaGrammar.
    from_json_schema`). A schema it cannot express is a 400 naming the field."""
    if call_forced(request):
        try:
            # Not sorted: `name` must come before `arguments` (the reader streams it first).
            return _schema_grammar(json.dumps(call_schema(request), ensure_ascii=False))
        except Exception as exc:  # the converter raises what it meets
            raise InvalidRequest(
                f"a tool's parameters schema cannot be turned into a grammar: {exc}",
                param="tools",
            ) from exc
    fmt = request.response_format
    if fmt is None or fmt.type is ResponseFormatType.TEXT:
        return ""
    if fmt.type is ResponseFormatType.JSON_OBJECT:
        from llama_cpp.llama_grammar import JSON_GBNF  # llama.cpp's json.gbnf: an object

        return str(JSON_GBNF)
    try:
        return _schema_grammar(fmt.schema)
    except Exception as exc:  # the converter raises what it meets (ValueError, KeyError...)
        raise InvalidRequest(
            f"response_format.json_schema.schema cannot be turned into a grammar: {exc}",
            param="response_format",
        ) from exc
