"""Repetition loops in a VLM's output, found while it streams.

OCR VLMs sometimes loop on a page: the same phrase, cell or character until `max_tokens`
(PaddleOCR issues 17903 and 17737: 20,000-token answers, 26 s a page on an A100). A loop
is the end of the output being one unit (1 to MAX_UNIT characters) repeated at least
MIN_REPEATS times and over at least MIN_LOOP_CHARS characters: long enough that dot
leaders, rules and the separator row of a wide table are not loops, short enough that a
loop is cut a few hundred characters after it starts.
"""

from __future__ import annotations

import math

MAX_UNIT = 200
MIN_REPEATS = 8
MIN_LOOP_CHARS = 400
# The tail searched: a loop must show within it.
WINDOW = MAX_UNIT * MIN_REPEATS + MIN_LOOP_CHARS
# Streamed output is checked each time this much more has arrived.
CHECK_EVERY = 200


def loop_cut(text: str) -> int | None:
    """Where to cut `text` when its end is a loop (keeping one unit of it), else None."""
    tail = text[-WINDOW:]
    for size in range(1, MAX_UNIT + 1):
        repeats = max(MIN_REPEATS, math.ceil(MIN_LOOP_CHARS / size))
        if size * repeats > len(tail):
            break
        unit = tail[-size:]
        if not tail.endswith(unit * repeats):
            continue
        start = len(text) - size * repeats
        while start >= size and text[start - size:start] == unit:
            start -= size
        return start + size
    return None
