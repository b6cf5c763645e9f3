"""What `allerac chat` reads from a person at a terminal.

Lines are read with GNU readline (the arrow keys, Home/End and Ctrl-A/E/K/W edit the line;
Up/Down and Ctrl-R walk the history), and the history is kept in the node's data dir
(`chat_history`, 0600, the last `HISTORY_LINES` lines), so a question asked yesterday is an
arrow key away. A message spans several lines when each but the last ends with a backslash,
or between two lines holding `\"\"\"` (the way Ollama and Python write long text).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

PROMPT = "you> "
MORE_PROMPT = "...> "
HISTORY_LINES = 1000
BLOCK = '"""'


def read_message(read_line: Callable[[str], str]) -> str:
    """One message: a line, lines continued with a trailing backslash, or a block between
    two `\"\"\"` marks. EOFError (Ctrl-D) inside a message drops what was typed of it."""
    first = read_line(PROMPT)
    if first.lstrip().startswith(BLOCK):
        text = first.lstrip()[len(BLOCK) :]
        if text.rstrip().endswith(BLOCK) and text.strip():  # """one line"""
            return text.rstrip()[: -len(BLOCK)]
        lines = [text] if text else []
        while True:
            line = read_line(MORE_PROMPT)
            if line.rstrip().endswith(BLOCK):
                last = line.rstrip()[: -len(BLOCK)]
                return "\n".join([*lines, last] if last else lines)
            lines.append(line)
    lines = []
    line = first
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = read_line(MORE_PROMPT)
    return "\n".join([*lines, line])


@contextlib.contextmanager
def line_editing(history_file: Path) -> Iterator[None]:
    """Readline editing for `input()`, with the history loaded from and saved to
    `history_file` (created 0600; a history that cannot be read or written is skipped,
    never an error: it only costs the arrow keys yesterday's lines)."""
    import readline  # importing it is what switches editing on for input()

    readline.set_history_length(HISTORY_LINES)
    readline.parse_and_bind("tab: tab-insert")  # no file-name completion inside a question
    with contextlib.suppress(OSError):
        readline.read_history_file(history_file)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            fd = os.open(history_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.close(fd)
            os.chmod(history_file, 0o600)
            readline.write_history_file(history_file)
