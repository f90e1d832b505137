"""Stop strings in streamed text: cut at the first one, hold back what may still become one."""
from __future__ import annotations

from mirror_deploy.serve.text import StopText


class CharTokenizer:
    """Token i is chr(i): enough for StopText, which only decodes."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


def _ids(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_stop_text_holds_back_a_stop_string_split_across_steps():
    text = StopText(CharTokenizer(), ["END", "xyz"])
    sent = [text.push(_ids("hello E")), text.push(_ids("N")), text.push(_ids("D tail"))]
    assert sent == ["hello ", "", ""] and text.stopped and text.text == "hello "
    assert text.finish() == ""


def test_stop_text_releases_a_false_alarm_and_the_tail():
    text = StopText(CharTokenizer(), ["END"])
    sent = [text.push(_ids("an E")), text.push(_ids("Nd")), text.push(_ids(" E"))]
    assert sent == ["an ", "ENd", " "] and not text.stopped
    assert text.finish() == "E" and text.text == "an ENd E"
