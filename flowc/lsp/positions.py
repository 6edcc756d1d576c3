"""Offsets into a document's text and LSP positions.

LSP counts lines at ``\\n``, ``\\r\\n`` and ``\\r`` only, and characters in the code units of
the encoding agreed at initialization (UTF-16 unless the client offers another). The
compiler counts lines at ``\\n`` and columns in code points, after dropping a byte order
mark; every conversion between the two goes through an offset into the editor's text.
"""

from __future__ import annotations

import bisect
import re

BOM = "\ufeff"
_BREAK = re.compile(r"\r\n|\r|\n")


def units(text: str, encoding: str) -> int:
    """The length of ``text`` in the code units of ``encoding`` (utf-8, utf-16, utf-32)."""
    if encoding == "utf-32" or text.isascii():
        return len(text)
    if encoding == "utf-8":
        return len(text.encode("utf-8", "surrogatepass"))
    return len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF)


class LineIndex:
    """Line starts of a text as LSP counts them."""

    def __init__(self, text: str, encoding: str = "utf-16") -> None:
        self.text = text
        self.encoding = encoding
        self.starts = [0, *(m.end() for m in _BREAK.finditer(text))]

    def position(self, offset: int) -> tuple[int, int]:
        """The 0-based (line, character) of ``offset``."""
        offset = max(0, min(offset, len(self.text)))
        line = bisect.bisect_right(self.starts, offset) - 1
        start = self.starts[line]
        end = self._line_end(line)
        return line, units(self.text[start : min(offset, end)], self.encoding)

    def offset(self, line: int, character: int) -> int:
        """The offset of a client position; past the end of a line is its end (as LSP says)."""
        if line < 0:
            return 0
        if line >= len(self.starts):
            return len(self.text)
        start, end = self.starts[line], self._line_end(line)
        if self.encoding == "utf-32" or self.text[start:end].isascii():
            return min(start + max(0, character), end)
        seen = 0
        for i in range(start, end):
            if seen >= character:
                return i
            seen += units(self.text[i], self.encoding)
        return end

    def _line_end(self, line: int) -> int:
        """Where the line's text ends, before its line break."""
        if line + 1 >= len(self.starts):
            return len(self.text)
        end = self.starts[line + 1]
        if self.text[end - 2 : end] == "\r\n":
            return end - 2
        return end - 1


class CompilerLines:
    """The compiler's 1-based (line, column) in a text without its byte order mark, back to
    offsets into the editor's text (which may have the mark)."""

    def __init__(self, text: str) -> None:
        self.shift = 1 if text.startswith(BOM) else 0
        body = text[self.shift :]
        self.length = len(body)
        self.starts = [0, *(m.end() for m in re.finditer("\n", body))]

    def offset(self, line: int, col: int) -> int:
        if line < 1:
            return self.shift
        if line > len(self.starts):
            return self.shift + self.length
        return self.shift + min(self.starts[line - 1] + max(0, col - 1), self.length)
