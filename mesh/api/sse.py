"""Server-sent events, decoding only, sans I/O (WHATWG HTML, "Server-sent events",
section "Event stream interpretation").

Bytes go in as they arrive, cut anywhere (inside a line, inside a UTF-8 sequence,
between the CR and the LF of a line end); whole events come out. What comes out
never depends on where the bytes were cut. The stream is UTF-8; lines end in
CRLF, LF or CR; a blank line dispatches the event gathered since the last one;
`data:` lines are joined with "\\n"; lines starting with ":" are comments (servers
send them as keep-alives); `id` and `retry` are ignored (we never reconnect).

The peer is not trusted: invalid UTF-8, or a line or an event longer than
`max_chars`, raises `RemoteProtocolError` instead of buffering without bound. The
events completed before the bad bytes still come out first: the error is raised by
the next `feed()`, or by `close()` when the stream ends there.

    decoder = SseDecoder()
    decoder.feed(b"data: {\\"a\\": 1}\\n\\ndata: [DO")  # -> [SseEvent(data='{"a": 1}')]
    decoder.feed(b"NE]\\n\\n")                        # -> [SseEvent(data='[DONE]')]
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

from mesh.errors import RemoteProtocolError

MAX_EVENT_CHARS = 1 << 20
_LINE_END = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class SseEvent:
    data: str
    event: str = "message"


class SseDecoder:
    def __init__(self, *, max_chars: int = MAX_EVENT_CHARS) -> None:
        self._max_chars = max_chars
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="strict")
        self._line = ""  # the incomplete last line
        self._after_cr = False  # the last line ended in CR: a leading LF belongs to it
        self._started = False  # a leading byte order mark has been dropped (or was absent)
        self._data: list[str] = []
        self._data_chars = 0
        self._event = ""
        self._error: RemoteProtocolError | None = None  # raised by the next call

    def feed(self, data: bytes) -> list[SseEvent]:
        """Decode the next bytes; return the events they completed."""
        if self._error is not None:
            raise self._error
        try:
            text = self._utf8.decode(data)
        except UnicodeDecodeError as exc:
            # What came before the bad byte is still good: hand its events out first.
            self._error = RemoteProtocolError(f"the event stream is not valid UTF-8 ({exc.reason})")
            self._error.__cause__ = exc
            text = exc.object[: exc.start].decode("utf-8")
        events: list[SseEvent] = []
        try:
            self._take_text(text, events)
        except RemoteProtocolError as exc:
            self._error = exc
        if self._error is not None and not events:
            raise self._error
        return events

    def close(self) -> None:
        """The stream ended: raise the error its last bytes held, if any. (An event not
        followed by a blank line is dropped, as the standard says.)"""
        if self._error is not None:
            raise self._error

    def _take_text(self, text: str, events: list[SseEvent]) -> None:
        if not text:
            return
        if not self._started:
            self._started = True
            text = text.removeprefix("\ufeff")
        if self._after_cr and text.startswith("\n"):
            text = text[1:]
        self._after_cr = False
        text = self._line + text
        start = 0
        for match in _LINE_END.finditer(text):
            if match.group() == "\r" and match.end() == len(text):
                self._after_cr = True  # an LF may still follow in the next piece
            self._take_line(text[start : match.start()], events)
            start = match.end()
        self._line = text[start:]
        self._check_length(len(self._line), "line")

    def _check_length(self, chars: int, what: str) -> None:
        if chars > self._max_chars:
            raise RemoteProtocolError(
                f"an event stream {what} is longer than {self._max_chars} characters"
            )

    def _take_line(self, line: str, events: list[SseEvent]) -> None:
        self._check_length(len(line), "line")
        if not line:
            if self._data:
                events.append(SseEvent(data="\n".join(self._data), event=self._event or "message"))
            self._data = []
            self._data_chars = 0
            self._event = ""
            return
        if line.startswith(":"):
            return  # a comment
        field, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data_chars += len(value) + 1
            self._check_length(self._data_chars, "event")
            self._data.append(value)
        elif field == "event":
            self._event = value
        # "id", "retry" and unknown fields are ignored, as the standard says.
