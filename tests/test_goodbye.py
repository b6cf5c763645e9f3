"""Pure rules for what strangers can do before proving anything: signed goodbyes (only
the leaving node can take itself out of rotation), per-source rate limits, and a replay
window that survives a restart by refusing what was issued before it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.errors import ReplayDetected
from mesh.routing.ratelimit import Rate, SourceLimiter, source_address
from mesh.trust.goodbye import GOODBYE_WINDOW_MS, Goodbye, goodbye_holds, sign_goodbye
from mesh.trust.identity import Identity
from mesh.trust.sealing import ReplayGuard

NOW = 1_800_000_000_000
CARD_AT = NOW - 5_000


@pytest.fixture(scope="module")
def leaver() -> Identity:
    return Identity.generate()


def _holds(goodbye: Goodbye, leaver: Identity, **changes: object) -> bool:
    kwargs: dict[str, object] = {
        "identity_public_key": leaver.public_key_raw,
        "me": "ME",
        "card_issued_at_ms": CARD_AT,
        "now_ms": NOW,
        **changes,
    }
    return goodbye_holds(goodbye, **kwargs)  # type: ignore[arg-type]


def test_a_signed_goodbye_holds_only_where_and_when_it_was_meant(leaver: Identity) -> None:
    bye = sign_goodbye(leaver, recipient_node_id="ME", now_ms=NOW, card_issued_at_ms=CARD_AT)
    assert _holds(bye, leaver)
    assert not _holds(bye, leaver, me="SOMEONE-ELSE")  # replayed at another peer
    assert not _holds(bye, leaver, now_ms=NOW + GOODBYE_WINDOW_MS + 1)  # stale
    assert not _holds(bye, leaver, now_ms=NOW - GOODBYE_WINDOW_MS - 1)  # from the future
    assert not _holds(bye, leaver, card_issued_at_ms=CARD_AT + 1)  # the node restarted since
    assert _holds(bye, leaver, card_issued_at_ms=CARD_AT - 1)  # re-signed since its heartbeat
    assert not _holds(bye, leaver, card_issued_at_ms=None)  # a node we hold no card for
    other = Identity.generate()
    assert not _holds(bye, leaver, identity_public_key=other.public_key_raw)


def test_an_unsigned_or_altered_goodbye_never_holds(leaver: Identity) -> None:
    bye = sign_goodbye(leaver, recipient_node_id="ME", now_ms=NOW, card_issued_at_ms=CARD_AT)
    unsigned = Goodbye(
        leaving_node_id=bye.leaving_node_id,
        recipient_node_id="ME",
        sent_at_ms=NOW,
        card_issued_at_ms=CARD_AT,
        signature=b"",
    )
    assert not _holds(unsigned, leaver)
    assert not _holds(_fields(bye, sent_at_ms=NOW + 1), leaver)
    newer_card = _fields(bye, card_issued_at_ms=CARD_AT + 1)  # not what it signed
    assert not _holds(newer_card, leaver)


def _fields(bye: Goodbye, **changes: object) -> Goodbye:
    values: dict[str, object] = {
        "leaving_node_id": bye.leaving_node_id,
        "recipient_node_id": bye.recipient_node_id,
        "sent_at_ms": bye.sent_at_ms,
        "card_issued_at_ms": bye.card_issued_at_ms,
        "signature": bye.signature,
        **changes,
    }
    return Goodbye(**values)  # type: ignore[arg-type]


@given(
    node=st.text(max_size=200),
    recipient=st.text(max_size=200),
    sent=st.integers(-(2**70), 2**70),
    card=st.integers(-(2**70), 2**70),
    signature=st.binary(max_size=100),
)
def test_any_goodbye_is_checked_without_crashing(
    node: str, recipient: str, sent: int, card: int, signature: bytes
) -> None:
    bye = Goodbye(
        leaving_node_id=node,
        recipient_node_id=recipient,
        sent_at_ms=sent,
        card_issued_at_ms=card,
        signature=signature,
    )
    held = goodbye_holds(
        bye, identity_public_key=bytes(32), me=recipient, card_issued_at_ms=card, now_ms=sent
    )
    assert held is False  # nobody holds the private key of 32 zero bytes


def test_each_source_has_its_own_rate() -> None:
    limiter = SourceLimiter(Rate(per_s=2.0, burst=3.0))
    assert [limiter.allow("10.0.0.1", 0.0) for _ in range(5)] == [True, True, True, False, False]
    assert limiter.allow("10.0.0.2", 0.0)  # another address is not slowed down
    assert not limiter.allow("10.0.0.1", 0.4)  # 0.8 tokens back: not yet
    assert limiter.allow("10.0.0.1", 0.5)  # one token back
    assert limiter.refused == 3


def test_the_source_table_is_bounded() -> None:
    limiter = SourceLimiter(Rate(per_s=1.0, burst=1.0), max_sources=100)
    for i in range(10_000):
        limiter.allow(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(limiter) == 100


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("ipv4:127.0.0.2:5000", "127.0.0.2"),
        ("ipv6:[::1]:5000", "::/64"),
        ("ipv6:%5B2001:db8:1:2::9%5D:443", "2001:db8:1:2::/64"),
        ("ipv6:[::ffff:10.1.2.3]:80", "10.1.2.3"),
        ("relay:ABCDEFG", "relay:ABCDEFG"),
        ("unix:/tmp/x", "unix:/tmp/x"),
        ("", ""),
    ],
)
def test_source_address(peer: str, address: str) -> None:
    assert source_address(peer) == address


def test_what_was_issued_before_the_start_is_refused() -> None:
    started = NOW
    guard = ReplayGuard(not_before_ms=started)
    with pytest.raises(ReplayDetected, match="before this node started"):
        guard.check(b"r" * 32, started - 1, started + 10)
    guard.check(b"r" * 32, started, started + 10)  # issued after the start: fine
