"""OpenAI clients for tests: the box's owner (loopback, no key at all) or a user's key."""

from __future__ import annotations

from typing import Any

import openai


def _drop_authorization(request: Any) -> None:
    request.headers.pop("Authorization", None)


def openai_client(base_url: str, api_key: str | None = None) -> openai.OpenAI:
    """A client of the node at `base_url` (ending in /v1). Without `api_key` it sends no
    Authorization header, as the box's owner does on loopback (the official client insists
    on a key, so it gets a placeholder that is removed from every request)."""
    if api_key is not None:
        return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)
    return openai.OpenAI(
        base_url=base_url,
        api_key="owner",
        max_retries=0,
        timeout=120,
        http_client=openai.DefaultHttpxClient(event_hooks={"request": [_drop_authorization]}),
    )


async def _drop_authorization_async(request: Any) -> None:
    request.headers.pop("Authorization", None)


def async_openai_client(base_url: str, api_key: str | None = None) -> openai.AsyncOpenAI:
    """`openai_client`, for asyncio (`openai.AsyncOpenAI`)."""
    if api_key is not None:
        return openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)
    hooks = {"request": [_drop_authorization_async]}
    return openai.AsyncOpenAI(
        base_url=base_url,
        api_key="owner",
        max_retries=0,
        timeout=120,
        http_client=openai.DefaultAsyncHttpxClient(event_hooks=hooks),
    )
