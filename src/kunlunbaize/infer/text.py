"""Text on top of token generation: prompt encoding, streamed decoding, stop strings."""

from __future__ import annotations

from collections.abc import Callable


class TextStream:
    """Per-row decoded text, revealed as it grows; a stop string ends the row and is cut off.

    Decoding the whole generated sequence each time (rather than token by token) keeps multi-byte
    characters split across tokens intact; text that ends in an incomplete character is held back.
    """

    def __init__(self, tokenizer, rows: int, stop: list[str] | None = None,
                 write: Callable[[int, str], None] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.write = write
        self.shown = [0] * rows
        self.texts = [""] * rows
        self.stopped = [False] * rows

    def update(self, row: int, tokens: list[int], final: bool = False) -> bool:
        """Take the row's tokens so far; write the new text; True when a stop string appeared."""
        if self.stopped[row]:
            return True
        text = self.tokenizer.decode(tokens, skip_special_tokens=False)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            text = text[:cut]
            self.stopped[row] = True
        elif text.endswith("\ufffd") and not final:
            return False  # an incomplete UTF-8 character: wait for the next token
        self.texts[row] = text
        # hold back what could still become the start of a stop string
        hold = 0 if self.stopped[row] else max((len(s) - 1 for s in self.stop), default=0)
        self._reveal(row, len(text) - hold)
        return self.stopped[row]

    def finish(self, row: int, tokens: list[int]) -> str:
        """Decode the row's final tokens, write whatever was held back; return the row's text."""
        self.update(row, tokens, final=True)
        self._reveal(row, len(self.texts[row]))
        return self.texts[row]

    def flush(self, row: int) -> None:
        """Write the row's text held back so far (an interrupted generation keeps everything decoded)."""
        self._reveal(row, len(self.texts[row]))

    def _reveal(self, row: int, upto: int) -> None:
        if self.write is not None and upto > self.shown[row]:
            self.write(row, self.texts[row][self.shown[row]:upto])
        self.shown[row] = max(self.shown[row], upto)
