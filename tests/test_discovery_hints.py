"""mDNS hints: only well-formed hints of our protocol pass; junk is dropped, never raised."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.discovery import MAX_TXT_VALUE_BYTES, hint_properties, parse_hint
from mesh.identity import Identity

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
