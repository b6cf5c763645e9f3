"""SseDecoder: server-sent events from bytes cut anywhere; junk gives RemoteProtocolError."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.api.sse import SseDecoder, SseEvent
from mesh.errors import RemoteProtocolError


def decode(pieces: Sequence[bytes], *, max_chars: int = 1 << 20) -> list[SseEvent]:
    decoder = SseDecoder(max_chars=max_chars)
    events: list[SseEvent] = []
    for piece in pieces:
        events += decoder.feed(piece)
    return events


def outcome(pieces: Sequence[bytes], max_chars: int = 1 << 20) -> tuple[list[SseEvent], bool]:
    """The events that came out, and whether the stream was found broken (at once or at
    its end)."""
    decoder = SseDecoder(max_chars=max_chars)
    events: list[SseEvent] = []
    try:
        for piece in pieces:
            events += decoder.feed(piece)
        decoder.close()
    except RemoteProtocolError:
        return events, True
    return events, False


def test_docstring_example() -> None:
    decoder = SseDecoder()
    assert decoder.feed(b'data: {"a": 1}\n\ndata: [DO') == [SseEvent(data='{"a": 1}')]
    assert decoder.feed(b"NE]\n\n") == [SseEvent(data="[DONE]")]


def test_what_an_openai_server_sends() -> None:
    stream = (
        b": keep-alive\n\n"
        b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n'
        b"event: error\ndata: line one\ndata: line two\n\n"
        b"id: 7\nretry: 100\ndata:no space\n\n"
        b"data: [DONE]\n\n"
    )
    assert decode([stream]) == [
        SseEvent(data='{"choices":[{"delta":{"content":"Hi"}}]}'),
        SseEvent(data="line one\nline two", event="error"),
        SseEvent(data="no space"),
        SseEvent(data="[DONE]"),
    ]


def test_line_endings_crlf_cr_and_lf_and_a_crlf_cut_in_two() -> None:
    assert decode([b"data: a\r\n\r\ndata: b\r\rdata: c\n\n"]) == [
        SseEvent(data="a"),
        SseEvent(data="b"),
        SseEvent(data="c"),
    ]
    # The CR ends the line at once; the LF in the next piece is not a second (blank) line.
    assert decode([b"data: a\r", b"\ndata: b\r\n", b"\r\n"]) == [SseEvent(data="a\nb")]


def test_event_without_a_blank_line_after_it_is_not_dispatched() -> None:
    assert decode([b"data: complete\n\ndata: cut off"]) == [SseEvent(data="complete")]


def test_empty_data_line_is_an_event_with_empty_data_but_no_data_is_none() -> None:
    assert decode([b"data:\n\nevent: x\n\n: comment\n\n"]) == [SseEvent(data="")]


def test_leading_byte_order_mark_is_dropped_even_when_cut() -> None:
    bom = "\ufeff".encode()
    assert decode([bom[:1], bom[1:] + b"data: x\n\n"]) == [SseEvent(data="x")]


def test_utf8_cut_inside_a_character() -> None:
    raw = "data: café ☕\n\n".encode()
    assert decode([raw[:10], raw[10:13], raw[13:]]) == [SseEvent(data="café ☕")]


def test_invalid_utf8_is_a_protocol_error() -> None:
    with pytest.raises(RemoteProtocolError, match="not valid UTF-8"):
        decode([b"data: \xff\xfe\n\n"])


def test_events_before_bad_bytes_come_out_and_the_error_follows() -> None:
    decoder = SseDecoder()
    assert decoder.feed(b"data: good\n\ndata: \xff\n\n") == [SseEvent(data="good")]
    with pytest.raises(RemoteProtocolError, match="not valid UTF-8"):
        decoder.close()  # the stream ended there
    with pytest.raises(RemoteProtocolError, match="not valid UTF-8"):
        decoder.feed(b"data: more\n\n")  # ...or it went on
    # A line growing too long: the event before it comes out, however the bytes were cut.
    too_long = ([SseEvent(data="a")], True)
    assert outcome([b"data: a\n\n" + b"x" * 200], max_chars=64) == too_long
    assert outcome([b"data: a\n\n", b"x" * 200], max_chars=64) == too_long


def test_a_line_without_end_cannot_grow_without_bound() -> None:
    decoder = SseDecoder(max_chars=100)
    decoder.feed(b"data: " + b"x" * 90)
    with pytest.raises(RemoteProtocolError, match="longer than 100 characters"):
        decoder.feed(b"x" * 20)


def test_an_event_of_many_short_lines_cannot_grow_without_bound() -> None:
    decoder = SseDecoder(max_chars=100)
    with pytest.raises(RemoteProtocolError, match="event is longer than 100"):
        decoder.feed(b"data: 0123456789\n" * 20)


# --- properties -----------------------------------------------------------------------------

data_lines = st.lists(
    st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=20),
    min_size=1,
    max_size=3,
)
events = st.lists(data_lines, max_size=6)
line_ends = st.sampled_from(["\n", "\r\n", "\r"])


@st.composite
def encoded_streams(draw: st.DrawFn) -> tuple[list[str], bytes]:
    """Events as a server may write them (any line ends, comments between), and what the
    data of each is."""
    expected = []
    text: list[str] = []

    def end() -> str:
        ending = draw(line_ends)
        # A CR followed by an LF is one line end (CRLF), not two: a server writing blank
        # lines after a CR-ended line writes CR again.
        return "\r" if text and text[-1].endswith("\r") and ending.startswith("\n") else ending

    for lines in draw(events):
        if draw(st.booleans()):
            text.append(":" + draw(st.text(alphabet="abc ", max_size=5)))
            text.append(end())
        for line in lines:
            space = " " if draw(st.booleans()) or line.startswith(" ") else ""
            text.append(f"data:{space}{line}")
            text.append(end())
        text.append(end())
        expected.append("\n".join(lines))
    return expected, "".join(text).encode()


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@settings(max_examples=300, deadline=None)
@given(stream=encoded_streams(), cuts=st.lists(st.integers(0, 400), max_size=8))
def test_every_event_comes_out_whole_wherever_the_bytes_are_cut(
    stream: tuple[list[str], bytes], cuts: list[int]
) -> None:
    expected, raw = stream
    assert [e.data for e in decode(split(raw, cuts))] == expected


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=300), cuts=st.lists(st.integers(0, 300), max_size=6))
def test_any_bytes_give_events_or_a_protocol_error_the_same_however_cut(
    raw: bytes, cuts: list[int]
) -> None:
    whole = outcome([raw], max_chars=64)
    assert outcome(split(raw, cuts), max_chars=64) == whole
