"""StopScanner: stop sequences over a stream of text pieces."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.api.stops import StopScanner


def run(stops: tuple[str, ...], pieces: Sequence[str]) -> tuple[list[str], bool, str]:
    """Feed every piece; return (released per feed, stopped?, text released by flush())."""
    scanner = StopScanner(stops)
    released = []
    stopped = False
    for piece in pieces:
        text, stopped = scanner.feed(piece)
        released.append(text)
    return released, stopped, scanner.flush()[0]


def test_stop_split_across_pieces_is_never_leaked() -> None:
    released, stopped, tail = run(("END",), ["Hello E", "N", "D more"])
    assert stopped
    assert released == ["Hello ", "", ""]
    assert tail == ""
    assert "E" not in "".join(released)


def test_docstring_example() -> None:
    scanner = StopScanner(("\n\n", "END"))
    assert scanner.feed("Hello EN") == ("Hello ", False)
    assert scanner.feed("D more") == ("", True)
    assert scanner.flush() == ("", True)


def test_false_prefix_is_released_later() -> None:
    scanner = StopScanner(("END",))
    assert scanner.feed("The EN") == ("The ", False)
    # "ENx" can no longer become "END": all of it goes out.
    assert scanner.feed("x") == ("ENx", False)
    assert scanner.feed("E") == ("", False)
    assert scanner.feed("nd") == ("End", False)


def test_held_prefix_overlapping_a_later_stop_start() -> None:
    # "aab" holds "aa"; a second "a" shifts where the stop could start.
    scanner = StopScanner(("aab",))
    assert scanner.feed("xaa") == ("x", False)
    assert scanner.feed("a") == ("a", False)
    assert scanner.feed("b!") == ("", True)


def test_flush_releases_held_text_at_end_of_stream() -> None:
    released, stopped, tail = run(("STOP",), ["all good ST"])
    assert not stopped
    assert released == ["all good "]
    assert tail == "ST"


def test_flush_after_a_stop_releases_nothing() -> None:
    scanner = StopScanner(("x",))
    assert scanner.feed("abxcd") == ("ab", True)
    assert scanner.flush() == ("", True)


def test_after_a_stop_nothing_more_is_released() -> None:
    scanner = StopScanner(("x",))
    scanner.feed("x")
    assert scanner.stopped
    assert scanner.feed("more text") == ("", True)


def test_multiple_stops_pick_the_earliest() -> None:
    scanner = StopScanner(("world", "lo"))
    assert scanner.feed("hello world") == ("hel", True)


def test_multiple_stops_earliest_across_pieces() -> None:
    released, stopped, _ = run(("\n\n", "User:"), ["Answer.", "\n", "\nUser: hi"])
    assert stopped
    assert "".join(released) == "Answer."


def test_no_stops_passes_everything_through() -> None:
    scanner = StopScanner(())
    assert scanner.feed("anything END") == ("anything END", False)
    assert scanner.flush() == ("", False)


def test_empty_stop_strings_are_ignored() -> None:
    scanner = StopScanner(("", "Z"))
    assert scanner.feed("abc") == ("abc", False)
    assert scanner.feed("yZ") == ("y", True)


def test_released_text_does_not_depend_on_piece_boundaries() -> None:
    # 'b' lies inside 'aba': the answer ends where 'aba' starts, however the text was cut.
    stops = ("aba", "b")
    whole, _, _ = run(stops, ["aba"])
    split, _, _ = run(stops, ["ab", "a"])
    assert "".join(whole) == "".join(split) == ""


def test_a_stop_completed_in_the_held_tail_is_honoured_at_end_of_stream() -> None:
    # "ab" then end: 'b' completed but 'aba' might have; at the end 'b' wins.
    released, stopped, tail = run(("aba", "b"), ["xab"])
    assert (released, stopped, tail) == (["x"], False, "a")


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="abc\n", max_size=30),
    stops=st.lists(st.text(alphabet="abc\n", min_size=1, max_size=4), min_size=1, max_size=4),
    cuts=st.lists(st.integers(min_value=0, max_value=30), max_size=10),
)
def test_released_text_is_the_text_before_the_first_stop(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    points = sorted({min(c, len(text)) for c in cuts})
    bounds = [0, *points, len(text)]
    pieces = [text[i:j] for i, j in pairwise(bounds)]
    scanner = StopScanner(tuple(stops))
    out = []
    hit = False
    for piece in pieces:
        released, hit = scanner.feed(piece)
        out.append(released)
        if hit:
            break
    if not hit:
        tail, hit = scanner.flush()
        out.append(tail)

    hits = [at for at in (text.find(s) for s in stops) if at != -1]
    expected = text[: min(hits)] if hits else text
    assert "".join(out) == expected
    assert hit == bool(hits)
