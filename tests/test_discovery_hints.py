"""mDNS hints: only well-formed hints of our protocol pass; junk is dropped, never raised.
What discovery keeps stays within its limits whoever floods the LAN."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.routing.discovery import (
    MAX_TXT_VALUE_BYTES,
    DiscoveryLimits,
    ForwardGate,
    Hint,
    NameBook,
    NameState,
    Refusal,
    capped_ttl,
    hint_properties,
    parse_hint,
)
from mesh.trust.identity import Identity

NODE = Identity.generate().node_id
MESH = Identity.generate().node_id


def encoded(props: dict[str, str]) -> dict[bytes, bytes | None]:
    return {k.encode(): v.encode() for k, v in props.items()}


def test_a_good_hint_round_trips() -> None:
    hint, why = parse_hint(encoded(hint_properties(node_id=NODE, mesh_id=MESH, port=8471)))
    assert why == ""
    assert hint is not None
    assert (hint.node_id, hint.mesh_id, hint.port) == (NODE, MESH, 8471)


def test_bad_hints_are_dropped_with_a_reason() -> None:
    good = hint_properties(node_id=NODE, mesh_id=MESH, port=8471)
    cases = [
        ({**good, "v": "999"}, "protocol version"),
        ({**good, "id": "not-a-node-id"}, "malformed node or mesh ID"),
        ({**good, "id": NODE[:-1] + ("A" if NODE[-1] != "A" else "B")}, "malformed"),
        ({**good, "mesh": ""}, "malformed"),
        ({**good, "port": "70000"}, "malformed port"),
        ({**good, "port": "-1"}, "malformed port"),
        ({**good, "junk": "x" * (MAX_TXT_VALUE_BYTES + 1)}, "oversized"),
        ({k: v for k, v in good.items() if k != "v"}, "protocol version"),
    ]
    for props, reason in cases:
        hint, why = parse_hint(encoded(props))
        assert hint is None
        assert reason in why
    hint, why = parse_hint({b"id": b"\xff\xfe", b"v": b"1"})
    assert hint is None
    assert "non-ASCII" in why
    assert parse_hint({str(i).encode(): b"" for i in range(40)})[0] is None


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.binary(max_size=20), st.one_of(st.none(), st.binary(max_size=300)), max_size=20
    )
)
def test_any_txt_gives_a_hint_or_a_reason(props: dict[bytes, bytes | None]) -> None:
    hint, why = parse_hint(props)
    assert (hint is None) == bool(why)


# --- what discovery keeps: the name book and the forward gate ---------------------------------

SMALL = DiscoveryLimits(
    max_names_per_source=3,
    max_names=6,
    max_record_ttl_s=120,
    unresolved_ttl_ms=10_000,
    forward_burst_per_source=2,
    forward_per_source_per_s=0.5,
    forward_burst=4,
    forward_per_s=1,
    max_sources=4,
    max_forwarded=8,
)
HINT = Hint(node_id=NODE, mesh_id=MESH, port=8471)


def name(i: int | str) -> str:
    return f"box{i}._allerac._tcp.local."


def test_a_source_holds_its_share_of_names_and_no_more() -> None:
    book = NameBook(SMALL)
    for i in range(3):
        assert book.admit(name(i), source="10.0.0.9", now_ms=0).new
    refused = book.admit(name(3), source="10.0.0.9", now_ms=0)
    assert not refused.admitted
    assert refused.refusal is Refusal.SOURCE_FULL
    assert name(3) not in book
    # Another box is not held back by the flooder.
    assert book.admit(name("real"), source="10.0.0.2", now_ms=0).admitted
    # A refresh of a name held costs nothing, in any spelling.
    assert book.admit(name(0).upper(), source="10.0.0.9", now_ms=5).admitted
    assert book.name_as_admitted(name(0).upper()) == name(0)
    assert book.take_refused() == {"10.0.0.9": 1}
    assert book.take_refused() == {}


def test_a_full_book_makes_room_at_the_expense_of_the_biggest_source() -> None:
    book = NameBook(SMALL)
    for i in range(3):
        book.admit(name(f"a{i}"), source="a", now_ms=i)
    book.admit(name("b0"), source="b", now_ms=3)
    book.admit(name("b1"), source="b", now_ms=4)
    book.resolved(name("a0"), HINT, ["10.0.0.1:1"], now_ms=5)
    book.rejected(name("a2"))
    book.admit(name("me"), source="c", now_ms=6)
    book.protect(name("me"))
    assert len(book) == 6
    # The source holding most pays, its junk first.
    assert book.admit(name("d0"), source="d", now_ms=7).evicted == (name("a2"),)
    # a and b hold two each, both an unresolved name: the newer of those goes.
    assert book.admit(name("d1"), source="d", now_ms=8).evicted == (name("b0"),)
    assert book.admit(name("e0"), source="e", now_ms=9).evicted == (name("d0"),)
    # a alone holds two: its unresolved name goes, not its resolved one.
    assert book.admit(name("e1"), source="e", now_ms=10).evicted == (name("a1"),)
    assert len(book) == 6
    assert name("me") in book
    assert name("a0") in book  # resolved, and long announced


def test_between_equal_sources_junk_and_unresolved_names_go_before_resolved_ones() -> None:
    book = NameBook(DiscoveryLimits(max_names=3, max_names_per_source=3))
    for source in ("old", "real", "junk"):
        book.admit(name(source), source=source, now_ms=0)
    book.resolved(name("old"), HINT, [], now_ms=0)
    book.resolved(name("real"), HINT, [], now_ms=0)
    book.rejected(name("junk"))
    assert book.admit(name("new"), source="new", now_ms=1).evicted == (name("junk"),)
    book.resolved(name("new"), HINT, [], now_ms=1)
    # All resolved, one name per source: the newest goes, the boxes announced all along stay.
    assert book.admit(name("newer"), source="newer", now_ms=2).evicted == (name("new"),)


def test_protected_names_are_never_given_up() -> None:
    book = NameBook(DiscoveryLimits(max_names=2, max_names_per_source=2))
    for i in range(2):
        book.admit(name(i), source="s", now_ms=0)
        book.protect(name(i))
    refused = book.admit(name(9), source="t", now_ms=0)
    assert refused.refusal is Refusal.BOOK_FULL
    assert book.expire(10**12) == []


def test_names_that_do_not_resolve_or_are_not_refreshed_expire() -> None:
    book = NameBook(SMALL)
    book.admit(name("pending"), source="s", now_ms=0)
    book.admit(name("junk"), source="s", now_ms=0)
    book.rejected(name("junk"))
    book.admit(name("real"), source="t", now_ms=0)
    book.resolved(name("real"), HINT, ["10.0.0.1:8471"], now_ms=0)
    book.note_server(name("real"), "Real.local.")
    assert book.pending() == [name("pending")]
    assert book.expire(9_999) == []
    assert sorted(book.expire(10_000)) == sorted([name("pending"), name("junk")])
    assert book.state_of(name("real")) is NameState.RESOLVED
    assert book.knows_server("real.local.")
    book.admit(name("real"), source="t", now_ms=100_000)  # re-announced: kept
    assert book.expire(120_000) == []
    assert book.expire(220_000) == [name("real")]
    assert not book.knows_server("real.local.")
    assert len(book) == 0


def test_servers_are_counted_per_name() -> None:
    book = NameBook(SMALL)
    for i in range(2):
        book.admit(name(i), source="s", now_ms=0)
        book.note_server(name(i), "shared.local.")
    book.remove(name(0))
    assert book.knows_server("shared.local.")
    book.note_server(name(1), "other.local.")
    assert not book.knows_server("shared.local.")
    assert book.server_of(name(1)) == "other.local."


def test_refusals_are_counted_for_a_bounded_number_of_sources() -> None:
    book = NameBook(DiscoveryLimits(max_names_per_source=0, max_sources=4))
    for i in range(100):
        book.admit(name(i), source=f"10.0.{i}.1", now_ms=0)
    assert len(book.take_refused()) == 4


def test_ttls_are_capped() -> None:
    assert capped_ttl(86_400) == 120
    assert capped_ttl(4_500) == 120
    assert capped_ttl(60) == 60
    assert capped_ttl(0) == 0  # a goodbye stays a goodbye


def test_the_forward_gate_limits_new_addresses_per_source_and_in_all() -> None:
    gate = ForwardGate(replace(SMALL, forward_burst=3, forward_per_s=0.5))
    assert gate.allow("s", "10.0.0.9:1", now_ms=0)
    assert gate.allow("s", "10.0.0.9:2", now_ms=0)
    assert not gate.allow("s", "10.0.0.9:3", now_ms=0)  # over its burst
    assert gate.allow("s", "10.0.0.9:1", now_ms=0)  # handed on already: free
    assert gate.allow("s", "10.0.0.9:3", now_ms=2_000)  # one more after 2 s
    assert gate.allow("t", "10.0.0.2:1", now_ms=2_000)  # another source is not held back
    assert not gate.allow("u", "10.0.0.3:1", now_ms=2_000)  # but the global bucket is empty
    assert gate.allow("u", "10.0.0.3:1", now_ms=4_000)  # once the global bucket refilled
    assert gate.refused == 2


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["admit", "resolve", "reject", "protect", "remove", "expire"]),
            st.integers(0, 30),  # name
            st.integers(0, 5),  # source
            st.integers(0, 5_000),  # time step, ms
        ),
        max_size=200,
    )
)
def test_the_book_stays_within_its_limits_whatever_arrives(
    steps: list[tuple[str, int, int, int]],
) -> None:
    book = NameBook(SMALL)
    now = 0
    protected: set[str] = set()
    for op, n, source, step in steps:
        now += step
        if op == "admit":
            admission = book.admit(name(n), source=f"s{source}", now_ms=now)
            assert not protected & set(admission.evicted)
            book.note_server(name(n), f"host{n % 4}.local.")
        elif op == "resolve":
            book.resolved(name(n), HINT, ["10.0.0.1:1"], now_ms=now)
        elif op == "reject":
            book.rejected(name(n))
        elif op == "protect" and name(n) in book and len(protected) < 2:
            book.protect(name(n))
            protected.add(name(n))
        elif op == "remove" and name(n) not in protected:
            book.remove(name(n))
        elif op == "expire":
            assert not protected & set(book.expire(now))
        assert len(book) <= SMALL.max_names
        for s in range(6):
            assert len(book.names_of(f"s{s}")) <= SMALL.max_names_per_source
        assert sum(len(book.names_of(f"s{s}")) for s in range(6)) == len(book)
        assert protected <= {n for n in map(name, range(31)) if n in book}
        servers = {book.server_of(n) for n in map(name, range(31)) if n in book}
        for i in range(4):
            assert book.knows_server(f"host{i}.local.") == (f"host{i}.local." in servers)
