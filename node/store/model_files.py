"""Model files on this box: is a file a GGUF model at all, before llama.cpp is asked to
load it (a clear error for a web page saved as `.gguf`, a truncated download, a
directory)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from mesh.config import ModelConfig
from mesh.errors import InvalidRequest
from mesh.profiles import Profile, models_fit

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file (ggml's gguf.h)
GGUF_HEADER_BYTES = 24  # magic, version (u32), tensor count (u64), metadata count (u64)


def check_gguf(path: Path) -> None:
    """Raise InvalidRequest naming `path` and what is wrong, unless it starts like a GGUF
    file (the full check is llama.cpp's, when it loads it)."""
    if not path.is_absolute():
        raise InvalidRequest(f"{path}: give the model file's absolute path", param="path")
    try:
        with path.open("rb") as handle:
            header = handle.read(GGUF_HEADER_BYTES)
    except IsADirectoryError:
        raise InvalidRequest(
            f"{path} is a directory, not a GGUF model file", param="path"
        ) from None
    except FileNotFoundError:
        raise InvalidRequest(f"no model file at {path}", param="path") from None
    except OSError as exc:
        raise InvalidRequest(f"cannot read {path}: {exc.strerror}", param="path") from exc
    if header[:4] != GGUF_MAGIC:
        raise InvalidRequest(
            f"{path} is not a GGUF model file (it starts with {header[:4]!r}, not {GGUF_MAGIC!r})",
            param="path",
        )
    if len(header) < GGUF_HEADER_BYTES:
        raise InvalidRequest(f"{path} is cut short: a GGUF header alone is longer", param="path")


def model_bytes(models: Sequence[ModelConfig]) -> list[int]:
    """The file size of each model served from a file on this box (0 for the others)."""
    sizes = []
    for model in models:
        try:
            sizes.append(model.path.stat().st_size if model.path is not None else 0)
        except OSError:
            sizes.append(0)
    return sizes


def check_memory(models: Sequence[ModelConfig], profile: Profile) -> None:
    """Warn when the models loaded need more memory than the box profile gives them."""
    sizes = model_bytes(models)
    fit = models_fit(sizes, profile.model_memory_bytes)
    if fit < len(sizes):
        logger.warning(
            "the models need %.1f GiB, more than the %.1f GiB the %s profile gives models on "
            "this box (the first %d fit): expect swapping, or remove a model",
            sum(sizes) / (1 << 30),
            profile.model_memory_bytes / (1 << 30),
            profile.name,
            fit,
        )
