"""Streamed text with OpenAI stop sequences: the text is cut before the first stop string, and text that
could still become a stop string is held back until the next tokens settle it."""
from __future__ import annotations

from ..report import TextStream


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that is the start of a stop string (it may yet complete)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class StopText:
    """Feed committed tokens, get the text deltas safe to send; `stopped` once a stop string appears."""

    def __init__(self, tokenizer, stops: list[str]):
        self.stream = TextStream(tokenizer)
        self.stops = [s for s in stops if s]
        self.text = ""        # decoded so far (complete characters only)
        self.sent = 0         # characters of `text` already handed out
        self.stopped = False

    def push(self, new: list[int]) -> str:
        if self.stopped:
            return ""
        self.text += self.stream.push(new)
        cut = self._first_stop()
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
            return self._release(len(self.text))
        return self._release(len(self.text) - _held_back(self.text, self.stops))

    def finish(self) -> str:
        """The rest at the end of the run (held-back text, a trailing incomplete character)."""
        if not self.stopped:
            full = self.stream.tokenizer.decode(self.stream.tokens, skip_special_tokens=True)
            self.text = full
        return self._release(len(self.text))

    def _first_stop(self) -> int | None:
        # Only text past what was sent can hold a new stop string (sent text never ends in a stop prefix).
        start = max(self.sent - max((len(s) for s in self.stops), default=0), 0)
        found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def _release(self, upto: int) -> str:
        delta = self.text[self.sent:upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return delta
