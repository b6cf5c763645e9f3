"""Stop sequences over a token stream, sans I/O.

Text arrives in pieces (one token's worth at a time) and a stop sequence may be
split across pieces, so the scanner holds back the longest tail of the text
that could still become a stop sequence. What it releases is final: the
client never sees text that a later piece turns into a stop sequence, and
never misses text that did not.

    scanner = StopScanner(("\\n\\n", "END"))
    released, stopped = scanner.feed("Hello EN")   # -> ("Hello ", False)
    released, stopped = scanner.feed("D more")     # -> ("", True)
    scanner.flush()                                 # at end of stream: held text
"""

from __future__ import annotations


class StopScanner:
    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    def feed(self, piece: str) -> tuple[str, bool]:
        """Add a piece; return (text safe to release now, whether a stop sequence hit)."""
        if self.stopped:
            return "", True
        if not self._stops:
            return piece, False
        text = self._held + piece
        first = -1
        for stop in self._stops:
            at = text.find(stop)
            if at != -1 and (first == -1 or at < first):
                first = at
        if first != -1:
            self._held = ""
            self.stopped = True
            return text[:first], True
        keep = self._partial_tail(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """The stream ended without a stop: the held tail is ordinary text."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_tail(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop."""
        best = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:length]):
                    best = length
                    break
        return best
