"""Answer extraction from a generated response, rule for rule the original scorer's.

  1. a response with newlines is cut to its first non-empty line;
  2. every letter A-F (either case) between ASCII or full-width parentheses counts once per
     occurrence, in order of appearance;
  3. then, in the fixed order A, B, C, D, each Arabic option letter (أ→A, ب→B, س or ك→C, د→D)
     adds at most ONE count to its option, however often it occurs, and only where an OPENING
     parenthesis `(`/`（` stands right before it or a CLOSING one `)`/`）` right after it (the
     other side optional): `)د` or `د(` alone does not count;
  4. nothing counted: retry with any upper-case A-F on the same line; still nothing: the exact
     line "Yes." is A, "No." is B, anything else has no answer (scored wrong);
  5. the most frequent letter wins; ties go to the option counted first (insertion order: the
     parenthesised Latin letters as they appear, then the Arabic options in the order A, B, C, D).

So `'أ) ب) ب)'` is A (1:1, A inserted first) and `'دA（\t(G)دE)c'` is A (no parenthesis on the
right side of either د; the loose pass sees A before E).
"""

import re

_PAREN_LETTER = re.compile(r"[(（]([A-Fa-f])[)）]")
# One pattern per option, in the order their counts are inserted.
_ARABIC = {option: re.compile(f"[(（][{letters}]|[{letters}][)）]")
           for option, letters in (("A", "أ"), ("B", "ب"), ("C", "سك"), ("D", "د"))}
_LOOSE = re.compile(r"[A-F]")
_YES_NO = {"Yes.": "A", "No.": "B"}


def _first_line(response: str) -> str:
  if "\n" not in response:
    return response
  for line in response.split("\n"):
    if line:
      return line
  return response


def _most_frequent(counts: dict) -> str | None:
  """Most counted option; ties -> the one inserted first (dicts keep insertion order)."""
  if not counts:
    return None
  best = max(counts.values())
  return next(x for x, n in counts.items() if n == best)


def extract_answer(response: str) -> str | None:
  """The answer letter 'A'-'F' of a model response, or None (rules in the module docstring)."""
  line = _first_line(response)
  counts = {}
  for letter in _PAREN_LETTER.findall(line):
    counts[letter.upper()] = counts.get(letter.upper(), 0) + 1
  for option, pattern in _ARABIC.items():
    if pattern.search(line):
      counts[option] = counts.get(option, 0) + 1
  if not counts:
    for letter in _LOOSE.findall(line):
      counts[letter] = counts.get(letter, 0) + 1
  if not counts:
    return _YES_NO.get(line)
  return _most_frequent(counts)
