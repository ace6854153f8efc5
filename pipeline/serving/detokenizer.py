"""Token ids to text as they come, and the stop strings a request asked for.

Byte-level BPE splits a character across tokens and a tokenizer may clean up spaces depending on the
tokens around them, so new text is the difference between two decodes of a short window (vLLM's and
TGI's prefix/read offsets), held back while it ends in half a character.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

REPLACEMENT = "\ufffd"  # what a decode shows for half a UTF-8 character
WINDOW = 6  # tokens decoded before the new ones, enough for any merge or clean-up to settle


@dataclass
class IncrementalDetokenizer:
    tokenizer: Any
    tokens: list[int] = field(default_factory=list)
    prefix_offset: int = 0  # the window decoded for context starts here
    read_offset: int = 0  # text of the tokens before this was given out

    def push(self, new_tokens: list[int], final: bool = False) -> str:
        """The text the new tokens add; at the end (`final`) whatever was held back."""
        self.tokens.extend(new_tokens)
        decode = self.tokenizer.decode
        prefix = decode(self.tokens[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        text = decode(self.tokens[self.prefix_offset :], skip_special_tokens=True)
        if (text.endswith(REPLACEMENT) and not final) or len(text) <= len(prefix):
            return ""  # wait for the rest of the character (or nothing printable came)
        self.prefix_offset = max(self.read_offset, len(self.tokens) - WINDOW)
        self.read_offset = len(self.tokens)
        return text[len(prefix) :]


@dataclass
class StopChecker:
    """Cuts the text before the first stop string; holds back text that may be the start of one."""

    stops: tuple[str, ...]
    text: str = ""  # everything generated so far
    sent: int = 0  # characters given out
    stopped: bool = False

    def push(self, new_text: str, final: bool = False) -> str:
        """The text that can go to the client now; sets `stopped` once a stop string appeared."""
        if self.stopped:
            return ""
        self.text += new_text
        ends = [i for i in (self.text.find(stop, max(0, self.sent - len(stop) + 1)) for stop in self.stops) if i >= 0]
        if ends:
            self.stopped, end = True, min(ends)
        elif final:
            end = len(self.text)
        else:  # keep back a tail that could still grow into a stop string
            end = len(self.text) - max((len(stop) - 1 for stop in self.stops), default=0)
        end = max(end, self.sent)
        out, self.sent = self.text[self.sent : end], end
        return out
