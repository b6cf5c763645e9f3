"""Options every `allerac` command module shares."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def home_option(func: F) -> F:
    return click.option(
        "--home",
        "home_dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Data dir of the node (default: $ALLERAC_HOME or the platform data dir).",
    )(func)


MAX_CHAT_FILE_CHARS = 16 * 1024 * 1024  # the HTTP API refuses far less anyway


def chat_body(source: TextIO, *, model: str, max_tokens: int | None) -> dict[str, Any]:
    """A chat completions body from `route --messages`: the file holds an array of OpenAI
    messages, or a whole body; MODEL (and --max-tokens) are put in. The node checks the
    messages themselves (a 400 naming the field)."""
    name = getattr(source, "name", "the messages file")
    text = source.read(MAX_CHAT_FILE_CHARS + 1)
    if len(text) > MAX_CHAT_FILE_CHARS:
        raise click.BadParameter(f"{name} is over {MAX_CHAT_FILE_CHARS} characters")
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(f"{name} is not JSON: {exc}") from exc
    if isinstance(data, list):
        data = {"messages": data}
    if not isinstance(data, dict):
        raise click.BadParameter(
            f"{name} must hold an array of messages or a chat completions object"
        )
    body: dict[str, Any] = {**data, "model": model}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body
