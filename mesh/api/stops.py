"""Stop sequences over a token stream, sans I/O.

Text arrives in pieces (one token's worth at a time) and a stop sequence may be
split across pieces, so the scanner holds back every tail of the text that
could still become a stop sequence. The answer ends at the *earliest* place
any stop sequence starts; a complete stop found later in the text does not end
the answer while an earlier, still-incomplete candidate might complete (stops
can contain one another: "aba" and "b"). So what is released never depends on
how the text was cut into pieces, and what is released is final.

    scanner = StopScanner(("\\n\\n", "END"))
    scanner.feed("Hello EN")   # -> ("Hello ", False)
    scanner.feed("D more")     # -> ("", True)
    scanner.flush()            # at end of stream: ("", False) or the held text
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
        complete = self._first_complete(text)
        open_at = len(text) - self._partial_tail(text)
        if complete != -1 and complete <= open_at:
            self._held = ""
            self.stopped = True
            return text[:complete], True
        self._held = text[open_at:]
        return text[:open_at], False

    def flush(self) -> tuple[str, bool]:
        """The stream ended: release the held tail, cut at a stop if one completed in it."""
        held, self._held = self._held, ""
        if self.stopped:
            return "", True
        complete = self._first_complete(held)
        if complete != -1:
            self.stopped = True
            return held[:complete], True
        return held, False

    def _first_complete(self, text: str) -> int:
        first = -1
        for stop in self._stops:
            at = text.find(stop)
            if at != -1 and (first == -1 or at < first):
                first = at
        return first

    def _partial_tail(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop."""
        best = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:length]):
                    best = length
                    break
        return best
