"""Streaming detokenization: token ids → text deltas, cut at stop strings.

Byte-level BPE tokens can split a UTF-8 character; bytes are decoded incrementally so a delta never
holds half a character. Text that might be the start of a stop string is held back until it is
known not to be one, so a stream never shows part of a stop string.
"""

from __future__ import annotations

import codecs


class TextStream:
    """Feed tokens with push(); each call returns the new text that is safe to show."""

    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self._longest = max((len(s) for s in self.stop), default=0)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # everything decoded so far (cut at a stop string once found)
        self.emitted = 0  # characters of self.text already returned
        self.stopped = False  # a stop string was found

    def _bytes(self, token: int) -> bytes:
        tok = self.tokenizer
        if hasattr(tok, "decode_bytes"):
            return tok.decode_bytes([token])
        return tok.decode([token]).encode("utf-8")

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        before = len(self.text)
        self.text += self._utf8.decode(self._bytes(token))
        return self._advance(before, final=False)

    def finish(self) -> str:
        """The rest of the text (held-back characters, a trailing partial character)."""
        if self.stopped:
            return ""
        before = len(self.text)
        self.text += self._utf8.decode(b"", final=True)
        return self._advance(before, final=True)

    def _advance(self, before: int, final: bool) -> str:
        safe = len(self.text)
        if self.stop:
            start = max(0, before - self._longest + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
                safe = len(self.text)
            elif not final:  # hold back a suffix that could begin a stop string
                for s in self.stop:
                    for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                        if self.text.endswith(s[:n]):
                            safe = min(safe, len(self.text) - n)
                            break
        delta = self.text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return delta
