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
"""

from __future__ import annotations

import functools
import json
import secrets
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

    def __init__(self, plan: SamplingPlan, *, n_vocab: int, model: Any = None) -> None:
        from llama_cpp import _internals
        from llama_cpp.llama_grammar import LlamaGrammar

        internals: Any = _internals  # llama-cpp-python leaves these untyped
        self.plan = plan
        self._chain: Any = internals.LlamaSampler()
        for stage, args in plan.stages():
            if stage in ("penalties", "logit_bias"):
                getattr(self._chain, f"add_{stage}")(n_vocab, *args)
            elif stage == "grammar":
                self._chain.add_grammar(model, LlamaGrammar.from_string(args[0], verbose=False))
            else:
                getattr(self._chain, f"add_{stage}")(*args)

    def sample(self, ctx: Any, index: int) -> int:
        """The next token from the logits at `index` of the last batch (accepted into the
        chain's history, as llama.cpp's `llama_sampler_sample` does)."""
        return int(self._chain.sample(ctx, index))

    def close(self) -> None:
        self._chain.close()


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
