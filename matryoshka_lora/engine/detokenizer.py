"""Incremental detokenisation and stop strings: token ids in, correct text deltas out.

Decoding one token at a time is wrong for byte-level BPE (a character may span several tokens) and
for tokenizers that drop a leading space at the start of a decode. Like vLLM, each step decodes a
short window twice, ids[prefix:read] and ids[prefix:], and emits the difference; an unfinished
multi-byte character (U+FFFD at the end) holds the delta back until the next token completes it.
"""

from __future__ import annotations

NUM_CONTEXT_TOKENS = 5
REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int] | tuple[int, ...]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-NUM_CONTEXT_TOKENS:])  # context, so the first output keeps its leading space
        self.prefix = 0
        self.read = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def step(self, token_id: int) -> str:
        """Add one token; return the text it completes ("" while a character is still incomplete)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""


class StopStringFilter:
    """Cuts the output at the first stop string and never emits a stop string's beginning early.

    text += delta
    if a stop string s occurs at i:  emit text[emitted:i], finish
    else: hold back the longest tail of text that is a prefix of some stop string, emit the rest
    """

    def __init__(self, stop: tuple[str, ...]):
        self.stop = tuple(s for s in stop if s)
        self.max_len = max((len(s) for s in self.stop), default=0)
        self.text = ""
        self.emitted = 0

    def push(self, delta: str) -> tuple[str, bool]:
        """Returns (text to emit now, whether a stop string was hit)."""
        if not self.stop:
            return delta, False
        search_from = max(0, len(self.text) - self.max_len + 1)
        self.text += delta
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            end = min(hits)
            out = self.text[self.emitted : end] if end > self.emitted else ""
            self.emitted = max(self.emitted, end)
            return out, True
        hold = self._held_tail()
        end = len(self.text) - hold
        out = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return out, False

    def flush(self) -> str:
        """At a finish that is not a stop string: the held-back tail is ordinary text after all."""
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out

    def _held_tail(self) -> int:
        for n in range(min(self.max_len - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0
