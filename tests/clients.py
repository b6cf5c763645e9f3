"""OpenAI clients for tests: the box's owner (loopback, no key at all) or a user's key; and
the tool they ask for in tests of tool calls."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import openai

# A function tool in OpenAI's shape: a forced call to it is `{"city": "..."}`.
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def _drop_authorization(request: Any) -> None:
    request.headers.pop("Authorization", None)


async def _drop_authorization_async(request: Any) -> None:
    _drop_authorization(request)


def _settings(base_url: str, api_key: str | None, owner_http: Callable[[], Any]) -> Any:
    """Without `api_key` no Authorization header is sent, as the box's owner does on
    loopback (the official client insists on a key, so it gets a placeholder that
    `owner_http`'s client removes from every request)."""
    common = {"base_url": base_url, "max_retries": 0, "timeout": 120}
    if api_key is not None:
        return {**common, "api_key": api_key}
    return {**common, "api_key": "owner", "http_client": owner_http()}


def openai_client(base_url: str, api_key: str | None = None) -> openai.OpenAI:
    """A client of the node at `base_url` (ending in /v1), the owner's or `api_key`'s."""
    return openai.OpenAI(
        **_settings(
            base_url,
            api_key,
            lambda: openai.DefaultHttpxClient(event_hooks={"request": [_drop_authorization]}),
        )
    )


def async_openai_client(base_url: str, api_key: str | None = None) -> openai.AsyncOpenAI:
    """`openai_client`, for asyncio (`openai.AsyncOpenAI`)."""
    hooks = {"request": [_drop_authorization_async]}
    return openai.AsyncOpenAI(
        **_settings(base_url, api_key, lambda: openai.DefaultAsyncHttpxClient(event_hooks=hooks))
    )
