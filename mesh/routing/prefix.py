"""Conversation prefixes: which box already holds the start of a chat (cache-aware routing).

A box that served a chat keeps its prompt's KV cache (a slot's, or saved in memory), so the
conversation's next turn reads only what is new there. To send that next turn back to it,
every node names a conversation's prefixes the same way, without any tokenizer: the key of
`messages[:n]` is a BLAKE2b hash over canonical bytes of the tools and the first n messages
(every field of every message -- role, content, name, tool call ID, tool calls -- as UTF-8
with its length before it, so no two conversations share their bytes). Hashing is
incremental, so a request's keys at every message boundary cost one pass over its text.
A text completion's prompt has no messages: its boundaries are every TEXT_CHUNK_CHARS
characters (a prompt that goes on from an earlier one, the earlier one's answer and more,
shares the earlier one's boundaries up to its last whole chunk), hashed in a domain of their
own.

- A box advertises, per model, the keys of the conversations its slots and saved prompts
  hold (`request_key` of each chat or prompt it served), a bounded set, in its sealed full
  card.
- The entry node computes a request's boundaries once (`boundaries`) and looks for the
  longest one a candidate holds (`longest_held`): that candidate reads about
  `chars / CHARS_PER_TOKEN` fewer prompt tokens (`mesh.routing.scheduler`).
- The key the entry planned with travels inside the sealed request (`InferenceRequest.
  cache_prefix`); the serving box checks it against what it holds.

Pure: messages in, keys out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Container, Sequence
from dataclasses import dataclass

from mesh.inference import PREFIX_KEY_BYTES, ChatMessage, InferenceRequest, Tool

PREFIX_BYTES = PREFIX_KEY_BYTES  # 128 bits: no two conversations a mesh sees share a key
CHARS_PER_TOKEN = 4  # the scheduler's estimate (mesh.routing.candidates.Estimate)
_PERSON = b"allerac-prefix1"  # BLAKE2b personalization: these hashes are no other hashes
_TEXT_PERSON = b"allerac-text256"  # a text completion's prefixes (chunks of 256 characters)
TEXT_CHUNK_CHARS = 256


@dataclass(frozen=True, slots=True)
class Boundary:
    """The start of a request, up to `end` (a chat's first `end` messages; a text's first
    `end` characters): its key and its text's length."""

    end: int
    key: bytes
    chars: int

    @property
    def tokens(self) -> int:
        return self.chars // CHARS_PER_TOKEN


def _fields(*texts: str) -> bytes:
    """Each text as its UTF-8 bytes with their length before them (8 bytes, big-endian)."""
    out = bytearray()
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        out += len(data).to_bytes(8, "big")
        out += data
    return bytes(out)


def _message(message: ChatMessage) -> bytes:
    calls = [part for c in message.tool_calls for part in (c.id, c.name, c.arguments)]
    return _fields(
        message.role,
        message.content,
        message.name,
        message.tool_call_id,
        str(len(message.tool_calls)),
        *calls,
    )


def _start(tools: Sequence[Tool]) -> hashlib.blake2b:
    # Tools are rendered into the prompt (before the messages) by chat templates.
    digest = hashlib.blake2b(digest_size=PREFIX_BYTES, person=_PERSON)
    strict = {None: "", True: "1", False: "0"}
    digest.update(
        _fields(
            str(len(tools)),
            *(
                part
                for t in tools
                for part in (t.name, t.description, t.parameters, strict[t.strict])
            ),
        )
    )
    return digest


def boundaries(messages: Sequence[ChatMessage], tools: Sequence[Tool] = ()) -> list[Boundary]:
    """The key of every prefix `messages[:n]`, n = 1 .. len(messages), in that order."""
    digest = _start(tools)
    chars = 0
    out: list[Boundary] = []
    for n, message in enumerate(messages, start=1):
        digest.update(_message(message))
        chars += len(message.content)
        out.append(Boundary(end=n, key=digest.digest(), chars=chars))
    return out


def text_boundaries(prompt: str) -> list[Boundary]:
    """The key of every prefix `prompt[:k * TEXT_CHUNK_CHARS]` that is whole, in order."""
    digest = hashlib.blake2b(digest_size=PREFIX_BYTES, person=_TEXT_PERSON)
    out: list[Boundary] = []
    for end in range(TEXT_CHUNK_CHARS, len(prompt) + 1, TEXT_CHUNK_CHARS):
        digest.update(prompt[end - TEXT_CHUNK_CHARS : end].encode("utf-8", "surrogatepass"))
        out.append(Boundary(end=end, key=digest.digest(), chars=end))
    return out


def conversation_key(messages: Sequence[ChatMessage], tools: Sequence[Tool] = ()) -> bytes:
    """The key of the whole of `messages`: what a box holds once it has read them."""
    found = boundaries(messages, tools)
    return found[-1].key if found else _start(tools).digest()


def request_boundaries(request: InferenceRequest) -> list[Boundary]:
    """A chat's or a text completion's boundaries; none for embeddings, nor for a failover's
    continuation (a text the box has never seen)."""
    if request.continuation:
        return []
    if request.messages is not None:
        return boundaries(request.messages, request.tools)
    if request.prompt is not None:
        return text_boundaries(request.prompt)
    return []


def request_key(request: InferenceRequest) -> bytes | None:
    """What a box holds after serving `request`: its chat's key, or its prompt's last whole
    chunk's (None: nothing to name)."""
    if request.continuation:
        return None
    if request.messages is not None:
        return conversation_key(request.messages, request.tools)
    found = text_boundaries(request.prompt) if request.prompt is not None else []
    return found[-1].key if found else None


def longest_held(found: Sequence[Boundary], held: Container[bytes]) -> Boundary | None:
    """The longest of a request's boundaries that `held` contains."""
    for boundary in reversed(found):
        if boundary.key in held:
            return boundary
    return None
