"""Streaming reader for the upstream JSON files: a top-level list of items, or an object
{key: [items]} (the extracted form), yielded one item at a time.

The 13.5 GB ApolloMoEDataset never sits in memory: the file is read in chunks and each
item is decoded with json's C scanner (`raw_decode`), so memory is bounded by the largest item plus
one chunk. Malformed JSON raises a ValueError naming the file, line and column, as json.load did.
"""

import codecs
import json
import re

CHUNK = 1 << 18                    # bytes read at a time (grows while one item is larger)
_WS = re.compile(r"[ \t\n\r]*")
_NEAR_END = 16                     # a decode error this close to the buffer end may be a cut item


class _Stream:
  """A text buffer over a binary file with the line/column of every position."""

  def __init__(self, f, path, on_read=None):
    self.f, self.path, self.on_read = f, path, on_read
    self.utf8 = codecs.getincrementaldecoder("utf-8")()
    self.buf, self.pos, self.eof = "", 0, False
    self.line, self.line_pos = 1, 0          # line number at buf[line_pos]
    self.col0 = 0                            # column (0-based) of buf[0] when no newline precedes it
    self.decoder = json.JSONDecoder()

  def _more(self):
    """Read more text: at least CHUNK bytes, and as much again as the buffered item (amortised O(n))."""
    self._compact()
    raw = self.f.read(max(CHUNK, len(self.buf) - self.pos))
    if self.on_read:
      self.on_read(len(raw))
    try:
      self.buf += self.utf8.decode(raw, final=not raw)
    except UnicodeDecodeError as e:
      raise ValueError(f"{self.path}: not UTF-8 text near line {self._line(self.pos)} ({e})") from None
    self.eof = not raw

  def _compact(self):
    """Drop the consumed text before reading more (once per read: O(n) overall)."""
    if not self.pos:
      return
    self._line(self.pos)                     # count the lines being dropped
    nl = self.buf.rfind("\n", 0, self.pos)
    self.col0 = self.pos - nl - 1 if nl >= 0 else self.col0 + self.pos
    self.buf, self.line_pos, self.pos = self.buf[self.pos:], 0, 0

  def _line(self, pos):
    """1-based line of buf[pos]; positions only move forward, so counting is O(n) overall."""
    self.line += self.buf.count("\n", self.line_pos, pos)
    self.line_pos = pos
    return self.line

  def _line_col(self, pos):
    nl = self.buf.rfind("\n", 0, pos)
    return self._line(pos), (pos - nl if nl >= 0 else self.col0 + pos + 1)

  def error(self, msg, pos=None):
    line, col = self._line_col(self.pos if pos is None else pos)
    return ValueError(f"{self.path}: malformed JSON at line {line} column {col}: {msg}")

  def peek(self):
    """The next non-blank character ('' at the end of the file); positions the stream on it."""
    while True:
      self.pos = _WS.match(self.buf, self.pos).end()
      if self.pos < len(self.buf) or self.eof:
        return self.buf[self.pos:self.pos + 1]
      self._more()

  def here(self):
    return self._line(self.pos)

  def value(self):
    """Decode the JSON value at the current position (after peek())."""
    while True:
      try:
        obj, end = self.decoder.raw_decode(self.buf, self.pos)
        if end < len(self.buf) or self.eof:    # a number at the very end might continue
          self.pos = end
          return obj
      except json.JSONDecodeError as e:
        cut = e.pos >= len(self.buf) - _NEAR_END or e.msg.startswith("Unterminated string")
        if self.eof or not cut:
          raise self.error(e.msg, e.pos) from None
      self._more()

  def expect(self, chars, what):
    c = self.peek()
    if not c or c not in chars:
      raise self.error(f"expecting {what}")
    self.pos += 1
    return c

  def items(self):
    """(index, item, line) of the list that starts here."""
    self.expect("[", "'['")
    if self.peek() == "]":
      self.pos += 1
      return
    i = 0
    while True:
      self.peek()
      line = self.here()
      yield i, self.value(), line
      i += 1
      if self.expect(",]", "',' delimiter") == "]":
        return


def iter_items(path, top_error, on_read=None, objects=True):
  """Yield (key, index, item, line) for every element of a top-level list (key None) or, if
  `objects`, of every list value of a top-level object; an object value that is not a list yields
  (key, None, value, line) once. Any other top level raises
  ValueError(top_error.format(path=..., got=type name)). on_read(n_bytes) is called as the file
  is read (progress bars)."""
  with open(path, "rb") as f:
    s = _Stream(f, path, on_read)
    c = s.peek()
    if c == "[":
      for i, item, line in s.items():
        yield None, i, item, line
    elif c == "{" and objects:
      s.pos += 1
      more = s.peek() != "}"
      if not more:
        s.pos += 1
      while more:
        if s.peek() != '"':
          raise s.error("expecting a string key")
        line = s.here()
        key = s.value()
        s.expect(":", "':' delimiter")
        if s.peek() == "[":
          for i, item, item_line in s.items():
            yield key, i, item, item_line
        else:
          yield key, None, s.value(), line
        more = s.expect(",}", "',' delimiter") == ","
    else:
      got = type(s.value()).__name__ if c else "an empty file"
      raise ValueError(top_error.format(path=path, got=got))
    if s.peek():
      raise s.error("extra data after the top-level value")
