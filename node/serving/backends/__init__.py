"""Inference backends. Each loaded model is one backend object with its own worker.

`FACTORIES` maps a config's `backend = "..."` to the class that serves it.
"""

from __future__ import annotations

from collections.abc import Callable

from mesh.config import ModelConfig
from mesh.errors import ConfigError
from node.serving.backends.base import Backend
from node.serving.backends.llama_cpp import LlamaCppBackend
from node.serving.backends.llama_embed import EmbeddingModel
from node.serving.backends.openai_upstream import OpenAIUpstreamBackend

FACTORIES: dict[str, Callable[[ModelConfig], Backend]] = {
    "llama_cpp": LlamaCppBackend,
    "openai": OpenAIUpstreamBackend,
}


def create_backend(config: ModelConfig) -> Backend:
    factory = FACTORIES.get(config.backend)
    if factory is None:
        raise ConfigError(
            f"model {config.name!r}: backend = {config.backend!r} is unknown; "
            f"known: {', '.join(sorted(FACTORIES))}"
        )
    backend = factory(config)
    if config.embedding:  # also /v1/embeddings, through an embedding context of its own
        return EmbeddingModel(backend, config)
    return backend
