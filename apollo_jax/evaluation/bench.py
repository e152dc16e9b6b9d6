"""ApolloMoEBench items: reading, validation and the language of each benchmark source.

Records are read with `apollo_jax.data.records` (types and required fields); this module adds
what scoring needs: the gold letter, the option labels and texts, and the language.
A malformed record raises ValueError naming file and record, or with skip_bad=True is skipped
and counted in the returned BadRecords.
"""

import dataclasses
import re

from apollo_jax import languages
from apollo_jax.data import records, tfds_builders

# Sources of the 12 major languages (docs/original.md, Evaluation), matched case-insensitively. The German and
# Portuguese MMLU subjects (MMLU_<subject>_de / _pt) and every minor-language source
# (`...-xx` / `...-xxx`) carry their language code as a suffix instead.
MAJOR_SOURCES = {
    "medqa-usmle": "en", "medmcqa": "en", "mmlu-medical": "en", "pubmedqa": "en",
    "medqa-mcmle": "zh", "cmmlu-medical": "zh", "cmb-single": "zh", "cmexam": "zh",
    "headqa": "es", "frenchmedmcqa": "fr", "mmlu-medical-fr": "fr", "mmlu-medical-hi": "hi",
    "mmlu-medical-ar": "ar", "igakuqa": "ja", "kormedmcqa": "ko", "medexpqa": "it",
    "mmlu-medical-it": "it", "rumeddanet": "ru",
}
# Left out of the language scores by default: the original's README says the paper does not use them.
EXCLUDED_SOURCES = ("pubmedqa", "cmb-single", "cmexam")

_GOLD = re.compile(r"\(([A-F])\)")
_OPTION = re.compile(r"\(([A-F])\)\s?(.*)")


@dataclasses.dataclass(frozen=True)
class Item:
  id: int                  # position in the bench (over all files, in order)
  source: str
  language: str            # code from languages.CODES
  question: str
  options: str             # the raw "(A) ...\n(B) ..." block, as prompts show it
  labels: tuple            # ("A", "B", ...) in order
  texts: tuple             # option texts, without the "(X) " label
  answer: str              # the raw answer string, e.g. "(D)" (shots show it verbatim)
  gold: str                # the letter, "D"
  context: str = ""


def source_language(source: str) -> str:
  """Language code of a benchmark source id: 'headqa' -> 'es', 'mmlu-medical-ckb' -> 'ckb'."""
  lang = MAJOR_SOURCES.get(source.lower())
  if lang:
    return lang
  suffix = re.split(r"[-_]", source)[-1]
  if suffix in languages.CODES:
    return suffix
  raise ValueError(f"benchmark source {source!r}: unknown language. Known major-language sources: "
                   f"{', '.join(sorted(MAJOR_SOURCES))}; any other source must end in '-xx' or '_xx' "
                   "with xx a code from apollo_jax.languages.CODES")


def parse_options(options: str):
  """'(A) foo\\n(B) bar' -> (('A', 'B'), ('foo', 'bar')); raises ValueError when a line has no label."""
  labels, texts = [], []
  for line in options.split("\n"):
    if not line.strip():
      continue
    m = _OPTION.match(line.strip())
    if not m:
      raise ValueError(f"option line {line!r} does not start with a label like '(A)'")
    labels.append(m.group(1))
    texts.append(m.group(2).strip())
  if len(labels) < 2 or len(set(labels)) != len(labels):
    raise ValueError(f"options must list at least 2 distinct labels, got {labels}")
  return tuple(labels), tuple(texts)


def _item(rec, where):
  try:
    language = source_language(rec["source"])
    labels, texts = parse_options(rec["options"])
  except ValueError as e:
    raise records.BadRecord(f"{where}: {e}") from None
  m = _GOLD.fullmatch(rec["answer"].strip())
  if not m:
    raise records.BadRecord(f"{where}: answer {rec['answer']!r} is not a letter in parentheses like '(D)'")
  if m.group(1) not in labels:
    raise records.BadRecord(f"{where}: answer {rec['answer']!r} is not one of the options {labels}")
  return Item(-1, rec["source"], language, rec["question"], rec["options"], labels, texts,
              rec["answer"], m.group(1), rec["context"])


def read(files, skip_bad: bool = False, cache_dir=None):
  """(items, BadRecords) of ApolloMoEBench files: a path, glob, comma-separated list or a list.
  With `cache_dir`, through the apollo_moe_bench TFDS dataset there (data/tfds_builders.py: parsed
  and validated once, rebuilt when the files or this module change)."""
  if cache_dir:
    rows, bad = tfds_builders.load_bench(files, cache_dir, skip_bad, validate=_item)
    items = [_item(r, "") for r in rows]          # validated when built: cannot fail
  else:
    items, bad = records.read_bench(files, skip_bad, parse=_item)
  return [dataclasses.replace(it, id=i) for i, it in enumerate(items)], bad


def select(items, languages_=None, limit=0):
  """Items of the given language codes (None: all), at most `limit` per source (0: all), in order."""
  if languages_:
    unknown = [c for c in languages_ if c not in languages.CODES]
    if unknown:
      raise ValueError(f"--languages: unknown codes {unknown}; known: {', '.join(languages.CODES)}")
    items = [it for it in items if it.language in languages_]
  if limit:
    seen = {}
    out = []
    for it in items:
      seen[it.source] = seen.get(it.source, 0) + 1
      if seen[it.source] <= limit:
        out.append(it)
    items = out
  return items
