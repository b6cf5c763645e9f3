"""Saved prompt prefixes: a slot's KV state kept in memory after the slot moved on.

A slot keeps the KV cache of its last conversation, so the next turn of that conversation
only pays for what is new. When a slot is taken by a different prompt, what it held is
saved here first (llama.cpp's per-sequence state, `llama_state_seq_get_data`), so a
returning conversation is restored into whichever slot is free instead of being processed
again. The store is bounded by bytes; the least recently used entries go first, and an
entry that another one extends is dropped (the longer one serves both). Each entry keeps the
keys of the chats it holds (`mesh.routing.prefix`), so the box can say which conversations
it holds (cache-aware routing): an entry's keys go when it goes, and pass to the entry that
extends it.

Plain values in, plain values out: the backend does the llama.cpp calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass(frozen=True, slots=True)
class SavedPrefix:
    tokens: tuple[int, ...]
    state: bytearray  # llama.cpp's sequence state, written in place (never changed after)
    keys: frozenset[bytes] = frozenset()  # the chats whose prompts it holds


class PromptCache:
    def __init__(self, *, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._entries: list[SavedPrefix] = []  # least recently used first
        self.used_bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def best(self, prompt: Sequence[int]) -> tuple[SavedPrefix | None, int]:
        """The saved entry sharing the longest prefix with `prompt`, and that length."""
        found: SavedPrefix | None = None
        longest = 0
        for entry in self._entries:
            n = common_prefix(entry.tokens, prompt)
            if n > longest:
                found, longest = entry, n
        return found, longest

    def touch(self, entry: SavedPrefix) -> None:
        """`entry` was used: it is the last to go."""
        if entry in self._entries:
            self._entries.remove(entry)
            self._entries.append(entry)

    def holds(self, tokens: Sequence[int]) -> bool:
        """Is `tokens` (or a longer prefix starting with it) saved already?"""
        return self._holder(tokens) is not None

    def _holder(self, tokens: Sequence[int]) -> int | None:
        """The index of an entry holding `tokens` (or extending them)."""
        n = len(tokens)
        for i, e in enumerate(self._entries):
            if len(e.tokens) >= n and common_prefix(e.tokens, tokens) == n:
                return i
        return None

    def put(
        self, tokens: Sequence[int], state: bytearray, keys: frozenset[bytes] = frozenset()
    ) -> bool:
        """Save `state` for `tokens` (the prompts of the chats `keys` name); False when it is
        larger than the whole budget."""
        if len(state) > self.budget_bytes:
            return False
        # What the new entry extends is served by it from now on.
        extended = [
            e
            for e in self._entries
            if len(e.tokens) <= len(tokens) and common_prefix(e.tokens, tokens) == len(e.tokens)
        ]
        for old in extended:
            keys |= old.keys
            self._drop(old)
        entry = SavedPrefix(tuple(tokens), state, keys)
        self._entries.append(entry)
        self.used_bytes += len(state)
        while self.used_bytes > self.budget_bytes:
            self._drop(self._entries[0])
        return True

    def add_keys(self, tokens: Sequence[int], keys: frozenset[bytes]) -> None:
        """The chats `keys` name are held by the entry holding `tokens` (or extending them)."""
        i = self._holder(tokens)
        if i is not None:
            e = self._entries[i]
            self._entries[i] = SavedPrefix(e.tokens, e.state, e.keys | keys)

    def keys(self) -> list[frozenset[bytes]]:
        """The chats each entry holds, the most recently used entry first."""
        return [e.keys for e in reversed(self._entries)]

    def _drop(self, entry: SavedPrefix) -> None:
        self._entries.remove(entry)
        self.used_bytes -= len(entry.state)
