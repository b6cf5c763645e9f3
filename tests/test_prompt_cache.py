"""The prompt cache's bookkeeping and the default sizing of slots (pure rules)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from node.serving.backends.llama_cpp import default_parallel, kv_bytes_per_token
from node.serving.backends.prompt_cache import PromptCache, common_prefix

GIB = 1 << 30


def test_the_longest_shared_prefix_wins_and_a_longer_entry_replaces_its_prefix() -> None:
    cache = PromptCache(budget_bytes=100)
    assert cache.put([1, 2, 3], bytearray(b"a" * 10))
    assert cache.put([1, 5], bytearray(b"b" * 10))
    entry, shared = cache.best([1, 2, 3, 4])
    assert entry is not None
    assert (entry.tokens, shared) == ((1, 2, 3), 3)
    assert cache.put([1, 2, 3, 4, 5], bytearray(b"c" * 10))  # extends (1, 2, 3): that one goes
    assert len(cache) == 2
    assert cache.used_bytes == 20
    assert cache.holds([1, 2, 3])
    assert not cache.holds([1, 2, 9])


def test_the_budget_drops_the_least_recently_used_first() -> None:
    cache = PromptCache(budget_bytes=25)
    cache.put([1], bytearray(b"x" * 10))
    cache.put([2], bytearray(b"y" * 10))
    first, _ = cache.best([1])
    assert first is not None
    cache.touch(first)  # [1] is used again: [2] is now the oldest
    cache.put([3], bytearray(b"z" * 10))
    assert cache.holds([1])
    assert cache.holds([3])
    assert not cache.holds([2])
    assert not cache.put([4], bytearray(b"w" * 26))  # larger than the whole budget: not kept
    assert cache.used_bytes <= 25


@given(
    st.lists(st.tuples(st.lists(st.integers(0, 3), max_size=6), st.integers(1, 40)), max_size=20)
)
def test_the_cache_never_holds_more_than_its_budget(puts: list[tuple[list[int], int]]) -> None:
    cache = PromptCache(budget_bytes=64)
    for tokens, size in puts:
        cache.put(tokens, bytearray(b"s" * size))
        assert 0 <= cache.used_bytes <= 64
        entry, shared = cache.best(tokens)
        assert shared <= len(tokens)
        if entry is not None:
            assert common_prefix(entry.tokens, tokens) == shared


def test_default_slots_follow_cores_within_four_to_eight_and_fit_memory() -> None:
    assert default_parallel(cores=2, memory=24 * GIB, kv_bytes_per_slot=50 << 20) == 4
    assert default_parallel(cores=8, memory=32 * GIB, kv_bytes_per_slot=50 << 20) == 8
    assert default_parallel(cores=64, memory=256 * GIB, kv_bytes_per_slot=50 << 20) == 8
    # A 32k context of a large model on a small box: the KV caches get a quarter of memory.
    assert default_parallel(cores=8, memory=16 * GIB, kv_bytes_per_slot=2 * GIB) == 2
    assert default_parallel(cores=8, memory=4 * GIB, kv_bytes_per_slot=8 * GIB) == 1


def test_kv_bytes_per_token_reads_the_attention_shape() -> None:
    smollm2 = {
        "general.architecture": "llama",
        "llama.block_count": "30",
        "llama.attention.head_count": "9",
        "llama.attention.head_count_kv": "3",
        "llama.embedding_length": "576",
    }
    assert kv_bytes_per_token(smollm2) == 2 * 30 * 3 * (64 + 64)
    assert kv_bytes_per_token({"general.architecture": "mystery"}) == 0
