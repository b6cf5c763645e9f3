"""Quotas without I/O (mesh/quota.py): the spec, reservations that never let used plus
reserved tokens pass a limit, idempotent release, periods that reset on the UTC calendar
(injected clock), and a prompt bound no tokenizer exceeds."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import InvalidRequest, QuotaExceeded
from mesh.inference import ChatMessage, InferenceRequest, Sampling
from mesh.ledger.records import ChainWriter, Usage, open_record
from mesh.quota.rules import (
    DEFAULT_MAX_TOKENS,
    HOLD_TTL_MS,
    Grant,
    Quota,
    QuotaBook,
    TierClass,
    parse_quota,
    prompt_bound,
)
from mesh.trust.identity import Identity

MESH, CLOUD = TierClass.MESH, TierClass.CLOUD
WRITER = ChainWriter(Identity.generate())


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


NOW = ms("2026-11-25T12:00:00")


def reserve(
    book: QuotaBook,
    request_id: str,
    user: str,
    quota: Quota,
    classes: list[TierClass],
    prompt_tokens: int,
    max_tokens: int | None,
    now_ms: int,
) -> Grant:
    return book.reserve(
        request_id=request_id,
        user=user,
        quota=quota,
        classes=classes,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        now_ms=now_ms,
    )


def record(user: str, tokens: int, *, route: str = "lan", at: int = NOW) -> object:
    signed = WRITER.append(
        Usage(
            request_id=f"{WRITER.last_seq:032x}",
            entry_node_id="E",
            user=user,
            model="m",
            prompt_tokens=tokens // 2,
            completion_tokens=tokens - tokens // 2,
            route=route,
            started_at_ms=at - 10,
            ended_at_ms=at,
        )
    )
    return open_record(signed)


@pytest.mark.parametrize(
    ("spec", "canonical"),
    [
        ("mesh=unlimited,cloud=1M/month", "cloud=1M/month"),
        ("cloud=1M", "cloud=1M/month"),
        ("cloud=1000000/month", "cloud=1M/month"),
        ("  mesh = 250k / day , cloud=2G ", "mesh=250k/day,cloud=2G/month"),
        (
            "cloud=1M/month,cloud=50k/day,mesh=1500/day",
            "mesh=1500/day,cloud=50k/day,cloud=1M/month",
        ),
        ("unlimited", "unlimited"),
        ("", "unlimited"),
    ],
)
def test_quota_specs_parse_to_one_canonical_form(spec: str, canonical: str) -> None:
    quota = parse_quota(spec)
    assert quota.spec == canonical
    assert parse_quota(quota.spec) == quota


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("cloud", "has no '='"),
        ("gpu=1M", "unknown class 'gpu'"),
        ("cloud=lots", "'lots' is not a token count"),
        ("cloud=1M/week", "unknown period 'week'"),
        ("cloud=-5", "is not a token count"),
        ("cloud=1T", "is not a token count"),
        ("cloud=unlimited/day", "unlimited takes no period"),
        ("cloud=1M,cloud=2M", "two month limits"),
        ("mesh=unlimited,mesh=1k", "both unlimited and limited"),
        ("cloud=" + "9" * 300, "longer than"),
    ],
)
def test_a_bad_quota_spec_says_what_is_wrong_and_how_to_write_one(spec: str, problem: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_quota(spec)
    assert problem in info.value.message
    assert "mesh=unlimited,cloud=1M/month" in info.value.message
    assert info.value.param == "quota"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60) | st.from_regex(r"(mesh|cloud)=[0-9kMG]{0,4}(/(day|month|x))?"))
def test_any_text_is_a_quota_or_a_clear_error(spec: str) -> None:
    try:
        quota = parse_quota(spec)
    except InvalidRequest as exc:
        message = exc.message
    else:
        message = ""
        assert parse_quota(quota.spec) == quota
    assert not message or message.startswith("not a quota")


def test_reservations_never_let_used_plus_reserved_pass_the_limit() -> None:
    book = QuotaBook()
    quota = parse_quota("mesh=1000/day")
    book.count([record("alice", 700)])
    grant = reserve(book, "r1", "alice", quota, [MESH], 50, 200, NOW)
    assert grant.classes == {MESH}
    assert grant.max_tokens == 200
    assert book.held("alice", MESH) == 250
    with pytest.raises(QuotaExceeded) as info:  # 700 used + 250 held: 50 left
        reserve(book, "r2", "alice", quota, [MESH], 10, 50, NOW)
    message = info.value.message
    assert "'alice'" in message
    assert "mesh=1k/day" in message
    assert "50 of 1,000 tokens left this day" in message
    assert "resets at 2026-11-26T00:00:00Z" in message
    assert info.value.resets_at == "2026-11-26T00:00:00Z"
    # Other users and the owner are not touched by alice's quota.
    reserve(book, "r3", "bob", quota, [MESH], 10, 500, NOW)
    # Released (the answer's records now count): the room comes back, once.
    assert book.release("r1") is True
    assert book.release("r1") is False
    assert book.held("alice", MESH) == 0
    book.count([record("alice", 120)])
    assert book.used("alice", MESH, parse_quota("mesh=1/day").limits[0].period, NOW) == 820


def test_reserving_the_same_request_twice_holds_it_once() -> None:
    book = QuotaBook()
    quota = parse_quota("cloud=1000")
    first = reserve(book, "r", "a", quota, [CLOUD], 10, 100, NOW)
    again = reserve(book, "r", "a", quota, [CLOUD], 10, 100, NOW)
    assert first == again
    assert book.held("a", CLOUD) == 110


def test_a_class_without_room_is_closed_and_the_others_stay_open() -> None:
    book = QuotaBook()
    quota = parse_quota("mesh=unlimited,cloud=100/day")
    book.count([record("alice", 90, route="cloud")])
    grant = reserve(book, "r", "alice", quota, [MESH, CLOUD], 20, 30, NOW)
    assert grant.classes == {MESH}
    assert "cloud=100/day" in grant.refusals[0]
    # Mesh usage never counts against the cloud limit.
    book.count([record("alice", 10_000, route="local")])
    assert book.used("alice", CLOUD, quota.limits[0].period, NOW) == 90


def test_without_max_tokens_the_grant_caps_generation_at_what_is_left() -> None:
    book = QuotaBook()
    grant = reserve(book, "r", "u", parse_quota("mesh=500/day"), [MESH], 100, None, NOW)
    assert grant.max_tokens == 400
    unlimited = reserve(book, "s", "u", parse_quota("unlimited"), [MESH], 100, None, NOW)
    assert unlimited.max_tokens is None  # nothing to protect: no cap
    big = reserve(book, "t", "v", parse_quota("mesh=1G"), [MESH], 1, None, NOW)
    assert big.max_tokens == DEFAULT_MAX_TOKENS


def test_periods_reset_on_the_utc_calendar() -> None:
    book = QuotaBook()
    quota = parse_quota("mesh=1000/day,mesh=1500/month")
    late = ms("2026-11-30T23:59:59")
    book.count([record("alice", 1000, at=late)])

    def ask(now: int, tokens: int = 600) -> None:
        reserve(book, str(now), "alice", quota, [MESH], 0, tokens, now)
        book.release(str(now))

    with pytest.raises(QuotaExceeded, match="mesh=1k/day"):
        ask(late)
    # A new day and a new month: both limits start again.
    ask(ms("2026-12-01T00:00:00"))
    book.count([record("alice", 1000, at=ms("2026-12-02T10:00:00"))])
    ask(ms("2026-12-03T10:00:00"), 500)  # a new day; the month has 500 left
    with pytest.raises(QuotaExceeded, match="mesh=1500/month") as info:
        reserve(book, "x", "alice", quota, [MESH], 0, 501, ms("2026-12-03T10:00:00"))
    assert info.value.resets_at == "2027-01-01T00:00:00Z"


def test_a_reservation_whose_entry_node_vanished_expires() -> None:
    book = QuotaBook()
    quota = parse_quota("mesh=100/day")
    reserve(book, "lost", "u", quota, [MESH], 0, 100, NOW)
    with pytest.raises(QuotaExceeded):
        reserve(book, "next", "u", quota, [MESH], 0, 1, NOW + 1000)
    reserve(book, "later", "u", quota, [MESH], 0, 1, NOW + HOLD_TTL_MS)


def test_the_prompt_bound_covers_text_template_and_continuation() -> None:
    chat = InferenceRequest(
        model="m",
        messages=(
            ChatMessage(role="system", content="Be brief."),
            ChatMessage(role="user", content="Hé, ça va ?"),
        ),
        sampling=Sampling(max_tokens=5),
        continuation="Oui",
    )
    assert prompt_bound(chat) == len("Be brief.") + len("Hé, ça va ?".encode()) + 3 + 3 * 32
    plain = InferenceRequest(model="m", prompt="1, 2, 3", sampling=Sampling())
    assert prompt_bound(plain) == 7 + 32


def test_a_lease_takes_at_most_a_quarter_of_what_is_left_and_counts_as_held() -> None:
    book = QuotaBook()
    quota = parse_quota("mesh=unlimited,cloud=1000/day")
    both = frozenset({MESH, CLOUD})
    got = book.lease(lease_id="L", user="u", quota=quota, classes=both, wanted=5000, now_ms=NOW)
    assert got == 250
    assert book.held("u", CLOUD) == 250
    assert (
        book.lease(lease_id="L", user="u", quota=quota, classes=both, wanted=5000, now_ms=NOW)
        == 187
    )
    # Consumed tokens leave the lease as their records come in: the total stays the same.
    book.count([record("u", 100, route="cloud")])
    book.shrink("L", 100, NOW)
    assert book.used("u", CLOUD, quota.limits[0].period, NOW) + book.held("u", CLOUD) == 437
    book.shrink("L", 10_000, NOW)  # more than it holds: it is simply gone
    assert book.held("u", CLOUD) == 0
    assert (
        book.lease(
            lease_id="M",
            user="u",
            quota=parse_quota("unlimited"),
            classes=both,
            wanted=9,
            now_ms=NOW,
        )
        == 0
    )
    # Leases and requests together never pass the limit.
    book.lease(lease_id="N", user="u", quota=quota, classes=both, wanted=10**6, now_ms=NOW)
    with pytest.raises(QuotaExceeded):
        reserve(book, "r", "u", quota, [CLOUD], 0, 700, NOW)


def test_reservations_and_leases_are_taken_back_after_a_restart() -> None:
    quota = parse_quota("mesh=10k/day,cloud=1k/day")
    book = QuotaBook()
    book.reserve(
        request_id="r1",
        user="u",
        quota=quota,
        classes=[TierClass.MESH, TierClass.CLOUD],
        prompt_tokens=10,
        max_tokens=90,
        now_ms=NOW,
    )
    book.lease(
        lease_id="lease/B/u",
        user="u",
        quota=quota,
        classes=frozenset({TierClass.MESH}),
        wanted=4096,
        now_ms=NOW,
    )
    again = QuotaBook()
    assert again.restore(book.holds(), NOW + 1) == 2
    assert again.holds() == book.holds()
    for tier_class in TierClass:
        assert again.held("u", tier_class) == book.held("u", tier_class)
    # Expired ones stay behind; a second restore of the same rows adds nothing.
    assert again.restore(book.holds(), NOW + 1) == 0
    assert QuotaBook().restore(book.holds(), NOW + 31 * 60 * 1000) == 0


@given(
    st.one_of(
        st.lists(
            st.dictionaries(
                st.sampled_from(["id", "user", "classes", "tokens", "expires_at_ms", "x"]),
                st.one_of(
                    st.integers(-5, 2**64), st.text(max_size=5), st.lists(st.text(max_size=5))
                ),
            ),
            max_size=4,
        ),
        st.integers(),
        st.text(max_size=5),
    )
)
def test_restoring_junk_raises_value_error_or_restores(rows: object) -> None:
    book = QuotaBook()
    try:
        book.restore(rows, NOW)
    except ValueError:
        return
    assert all(h["tokens"] > 0 for h in book.holds())  # type: ignore[operator]


def test_lease_report_totals_survive_a_restart_and_take_nothing_twice() -> None:
    book, quota = QuotaBook(), parse_quota("mesh=100000/day")
    book.lease(
        lease_id="lease/B/u",
        user="u",
        quota=quota,
        classes=frozenset({TierClass.MESH}),
        wanted=4096,
        now_ms=NOW,
    )
    held = book.held("u", TierClass.MESH)
    assert book.told("lease/B/u", "9/1", total=40, tokens=40, now_ms=NOW) == 40
    book.shrink("lease/B/u", 40, NOW)
    again = QuotaBook()
    again.restore(book.holds(), NOW + 1)
    again.restore_told(book.told_rows(), NOW + 1)
    # The same report once more (its answer was lost): nothing; the next one: its growth.
    assert again.told("lease/B/u", "9/1", total=40, tokens=40, now_ms=NOW + 2) == 0
    assert again.told("lease/B/u", "9/1", total=70, tokens=30, now_ms=NOW + 3) == 30
    assert again.told("lease/B/u", "10/1", total=5, tokens=5, now_ms=NOW + 4) == 5  # a new run
    assert again.held("u", TierClass.MESH) == held - 40
    # Kept as long as a hold would be, then forgotten.
    assert QuotaBook().told("lease/B/u", "9/1", total=40, tokens=40, now_ms=NOW) == 40
    late = QuotaBook()
    late.restore_told(book.told_rows(), NOW + 31 * 60 * 1000)
    assert late.told_rows() == []


@given(
    st.one_of(
        st.lists(
            st.lists(
                st.one_of(st.integers(-5, 2**64), st.text(max_size=300), st.booleans()),
                max_size=5,
            ),
            max_size=4,
        ),
        st.integers(),
        st.text(max_size=5),
    )
)
def test_restoring_junk_report_totals_raises_value_error_or_restores(rows: object) -> None:
    book = QuotaBook()
    try:
        book.restore_told(rows, NOW)
    except ValueError:
        return
    for lease, report, total, until in book.told_rows():
        assert isinstance(lease, str)
        assert isinstance(report, str)
        assert isinstance(total, int)
        assert isinstance(until, int)
        assert until > NOW
