"""Answer extraction from a generated response, exactly as the original scorer (SPEC §7.5).

  1. a response with newlines is cut to its first non-empty line;
  2. every letter A-F (either case) between ASCII or full-width parentheses counts once;
  3. the Arabic letters أ/ب/س,ك/د count as A/B/C/D where a parenthesis touches them on at least
     one side;
  4. nothing counted: retry with any upper-case A-F on the same line; still nothing: the exact
     line "Yes." is A, "No." is B, anything else has no answer (scored wrong);
  5. the most frequent letter wins; ties go to the letter counted first (parenthesised Latin
     letters in order of appearance, then the Arabic ones).
"""

import re

_PAREN_LETTER = re.compile(r"[(（]([A-Fa-f])[)）]")
_ARABIC_LETTERS = {"أ": "A", "ب": "B", "س": "C", "ك": "C", "د": "D"}
_ARABIC = re.compile(r"[()（）]([أبسكد])|([أبسكد])[()（）]")
_LOOSE = re.compile(r"[A-F]")
_YES_NO = {"Yes.": "A", "No.": "B"}


def _first_line(response: str) -> str:
  if "\n" not in response:
    return response
  for line in response.split("\n"):
    if line:
      return line
  return response


def _most_frequent(letters):
  """Most frequent letter; ties -> the one counted first (dicts keep insertion order)."""
  counts = {}
  for x in letters:
    counts[x] = counts.get(x, 0) + 1
  if not counts:
    return None
  best = max(counts.values())
  return next(x for x, n in counts.items() if n == best)


def extract_answer(response: str) -> str | None:
  """The answer letter 'A'-'F' of a model response, or None (SPEC §7.5)."""
  line = _first_line(response)
  letters = [m.upper() for m in _PAREN_LETTER.findall(line)]
  letters += [_ARABIC_LETTERS[a or b] for a, b in _ARABIC.findall(line)]
  if not letters:
    letters = _LOOSE.findall(line)
  if not letters:
    return _YES_NO.get(line)
  return _most_frequent(letters)
