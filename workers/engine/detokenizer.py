"""Incremental detokenization with stop strings.

Text is emitted only once it is final: byte-level BPE can split one UTF-8 character
over several tokens, and text that may be the start of a stop string is held back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

_REPLACEMENT = "\ufffd"
# Tokens of context re-decoded before the new ones; enough for any multi-byte character.
_WINDOW = 6


class Decoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str: ...


@dataclass(kw_only=True, frozen=True)
class DetokenizerState:
    """Everything an `IncrementalDetokenizer` knows, so a request moved to another engine keeps its text exact."""

    tokens: tuple[int, ...]
    """The trailing window of token ids still needed to decode the next ones."""
    prefix_offset: int
    read_offset: int
    text: str
    """Generated text decoded so far, including a tail held back as a possible stop-string prefix."""
    output_text: str
    """Text already emitted to the caller."""
    stopped: bool


class IncrementalDetokenizer:
    """Turns a growing token sequence into text deltas in O(window) work per token."""

    def __init__(
        self,
        tokenizer: Decoder,
        prompt_token_ids: Sequence[int],
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.skip_special_tokens = skip_special_tokens
        self._tokens = list(prompt_token_ids[-_WINDOW:])
        self._prefix_offset = 0
        self._read_offset = len(self._tokens)
        self._text = ""
        """Decoded generated text, including any held-back tail."""
        self.output_text = ""
        """Text emitted so far."""
        self.stopped = False

    def snapshot(self) -> DetokenizerState:
        return DetokenizerState(
            tokens=tuple(self._tokens),
            prefix_offset=self._prefix_offset,
            read_offset=self._read_offset,
            text=self._text,
            output_text=self.output_text,
            stopped=self.stopped,
        )

    @classmethod
    def restore(
        cls,
        tokenizer: Decoder,
        state: DetokenizerState,
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
    ) -> IncrementalDetokenizer:
        """A detokenizer that continues exactly where the one that took `state` stopped."""
        detok = cls(tokenizer, (), stop, skip_special_tokens)
        detok._tokens = list(state.tokens)
        detok._prefix_offset = state.prefix_offset
        detok._read_offset = state.read_offset
        detok._text = state.text
        detok.output_text = state.output_text
        detok.stopped = state.stopped
        return detok

    def update(self, new_token_ids: Sequence[int]) -> tuple[str, str | None]:
        """Add tokens; return (newly final text, the stop string matched or None)."""
        if self.stopped:
            return "", None
        for token in new_token_ids:
            self._tokens.append(token)
            self._text += self._decode_new()
        return self._emit()

    def skip(self, token_ids: Sequence[int], num_emitted_chars: int) -> None:
        """Take in tokens whose first `num_emitted_chars` characters of text the caller already has (a resume).

        Text past that point (held back for a possible stop string, or a partial character) is emitted
        by the next `update` or `flush`, exactly as the engine that produced the tokens would have.
        """
        for token in token_ids:
            self._tokens.append(token)
            self._text += self._decode_new()
        if not 0 <= num_emitted_chars <= len(self._text):
            raise ValueError(f"{num_emitted_chars} characters were emitted but the tokens decode to {len(self._text)}")
        self.output_text = self._text[:num_emitted_chars]

    def flush(self) -> str:
        """Release text held back as a possible stop-string prefix; call when the request ends otherwise."""
        if self.stopped:
            return ""
        delta = self._text[len(self.output_text) :]
        self.output_text += delta
        return delta

    def _decode_new(self) -> str:
        prefix = self._decode(self._tokens[self._prefix_offset : self._read_offset])
        full = self._decode(self._tokens[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith(_REPLACEMENT):
            delta = full[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._tokens)
            # Keep the token list short: only the window before the read offset matters.
            if self._prefix_offset > _WINDOW:
                drop = self._prefix_offset - _WINDOW
                del self._tokens[:drop]
                self._prefix_offset -= drop
                self._read_offset -= drop
            return delta
        return ""

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens)

    def _emit(self) -> tuple[str, str | None]:
        emitted = len(self.output_text)
        for stop in self.stop:
            # Only text not yet emitted (plus a stop's length of overlap) can hold a new match.
            at = self._text.find(stop, max(emitted - len(stop) + 1, 0))
            if at != -1:
                self.stopped = True
                delta = self._text[emitted:at]
                self.output_text += delta
                return delta, stop
        final = len(self._text) - self._held_back()
        delta = self._text[emitted:final]
        self.output_text += delta
        return delta, None

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(self._text)), longest, -1):
                if self._text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
