"""Readers and validation for the upstream JSON formats (docs/original.md, Data formats).

ApolloMoEDataset comes in two forms, detected from the top-level JSON type:
  list form:      [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}, ...],
                    "source": "medicalBook_en_qa", "class": "major"}, ...]
  extracted form: {"medicalBook_en_qa": [[q, a, q2, a2, ...], ...], "general_ckb": [...], ...}
Both become `Sample(source, language, turns, where)` (turns alternate user/assistant; the language
index comes from the source key, languages.language_of_source). ApolloMoEBench is a list of
{"question", "options", "answer", "source", ["context", "class"]}.

Files are parsed streaming (stream_json.py): one record at a time, never the whole file. Bad input
never passes silently: every problem raises a ValueError naming the file, line and record, or, with
skip_bad=True, is collected in a `BadRecords` tally (count + first reasons).

A conversation may end on a user turn (odd number of turns), as the original accepts:
the template then ends with that user turn and EOS.
"""

import dataclasses
import glob
import logging
import os

from apollo_jax import languages
from apollo_jax.data import stream_json


@dataclasses.dataclass(frozen=True)
class Sample:
  source: str
  language: int            # index into languages.CODES
  turns: tuple             # (user, assistant, user, assistant, ...) strings
  where: str = ""          # "file: record i (source ...)" for messages


@dataclasses.dataclass
class BadRecords:
  """Tally of skipped records (skip_bad=True); keeps the first few reasons for the log."""
  count: int = 0
  reasons: list = dataclasses.field(default_factory=list)
  keep: int = 5

  def add(self, reason: str):
    self.count += 1
    if len(self.reasons) < self.keep:
      self.reasons.append(reason)

  def log(self, what="records"):
    if self.count:
      logging.warning("skipped %d bad %s (data.skip_bad_records=True); first reasons:\n  %s",
                      self.count, what, "\n  ".join(self.reasons))


class BadRecord(ValueError):
  pass


def expand_files(spec: str) -> list:
  """`data.train_files`: a path, a glob or a comma-separated list of those -> sorted unique paths."""
  out = []
  for part in [p.strip() for p in str(spec).split(",") if p.strip()]:
    matches = sorted(glob.glob(os.path.expanduser(part)))
    if not matches:
      raise FileNotFoundError(f"data file pattern {part!r} (from {spec!r}) matches no file")
    out.extend(m for m in matches if m not in out)
  if not out:
    raise FileNotFoundError(f"no data files given (got {spec!r}); set data.train_files")
  return out


def _check_turns(turns, where):
  if not isinstance(turns, list):
    raise BadRecord(f"{where}: conversation must be a list, got {type(turns).__name__}")
  if not turns:
    raise BadRecord(f"{where}: empty conversation")
  for j, t in enumerate(turns):
    if not isinstance(t, str):
      raise BadRecord(f"{where}: turn {j} value must be a string, got {type(t).__name__}")
  return tuple(turns)


def _language(source, where):
  if not isinstance(source, str):
    raise BadRecord(f"{where}: 'source' must be a string, got {type(source).__name__}")
  try:
    return languages.index(languages.language_of_source(source))
  except ValueError as e:
    raise BadRecord(f"{where}: {e}") from None


def _list_record(item, where):
  if not isinstance(item, dict):
    raise BadRecord(f"{where}: expected an object with 'conversations' and 'source', "
                    f"got {type(item).__name__}")
  for key in ("conversations", "source"):
    if key not in item:
      raise BadRecord(f"{where}: missing field {key!r}")
  lang = _language(item["source"], where)
  conv = item["conversations"]
  if not isinstance(conv, list):
    raise BadRecord(f"{where}: 'conversations' must be a list, got {type(conv).__name__}")
  values = []
  for j, turn in enumerate(conv):
    if not isinstance(turn, dict) or "value" not in turn:
      raise BadRecord(f"{where}: turn {j} must be an object with a 'value' string")
    values.append(turn["value"])
  return Sample(item["source"], lang, _check_turns(values, where), where)


def _guarded(make, bad):
  """make(); a BadRecord is re-raised (bad is None) or tallied in `bad` (then None is returned)."""
  try:
    return make()
  except BadRecord as e:
    if bad is None:
      raise
    bad.add(str(e))
    return None


def _where(path, i, item, line=None, source=None):
  src = source if source is not None else (item.get("source") if isinstance(item, dict) else None)
  return f"{path}: record {i} (source {src!r})" + ("" if line is None else f" on line {line}")


def _not_a_list(items, where):
  raise BadRecord(f"{where}: value must be a list of conversations, got {type(items).__name__}")


DATASET_TOP = ("{path}: expected a JSON list (ApolloMoEDataset) or an object {{source_key: [[turn, ...], ...]}} "
               "(extracted form), got {got}")


def iter_dataset_file(path: str, bad: BadRecords | None = None, on_read=None):
  """Yield the Samples of one ApolloMoEDataset file (either form), in file order, streaming.

  bad=None: the first bad record raises ValueError; else bad records are skipped and tallied.
  on_read(n_bytes): progress callback as the file is read.
  """
  for source, i, item, line in stream_json.iter_items(path, DATASET_TOP, on_read):
    if source is None:                    # list form
      where = _where(path, i, item, line)
      s = _guarded(lambda: _list_record(item, where), bad)
    elif i is None:                       # extracted form, a value that is not a list
      s = _guarded(lambda: _not_a_list(item, f"{path}: source {source!r} on line {line}"), bad)
    else:
      where = _where(path, i, None, line, source)
      s = _guarded(lambda: Sample(source, _language(source, where), _check_turns(item, where), where), bad)
    if s is not None:
      yield s


def read_dataset(files, skip_bad: bool = False):
  """All Samples of the files (expanded, in order) and the BadRecords tally."""
  bad = BadRecords() if skip_bad else None
  paths = expand_files(files) if isinstance(files, str) else list(files)
  samples = [s for p in paths for s in iter_dataset_file(p, bad)]
  bad = bad or BadRecords()
  bad.log()
  return samples, bad


BENCH_FIELDS = ("question", "options", "answer", "source")


def _bench_record(item, where):
  if not isinstance(item, dict):
    raise BadRecord(f"{where}: expected an object, got {type(item).__name__}")
  for key in BENCH_FIELDS:
    if key not in item:
      raise BadRecord(f"{where}: missing field {key!r}")
  for key in BENCH_FIELDS + ("context", "class"):
    if key in item and not isinstance(item[key], str):
      raise BadRecord(f"{where}: field {key!r} must be a string, got {type(item[key]).__name__}")
  return {k: item.get(k, "") for k in BENCH_FIELDS + ("context", "class")}


def read_bench(files, skip_bad: bool = False, parse=None):
  """ApolloMoEBench records (dicts with str question/options/answer/source/context/class).

  parse(record, where), if given, turns each record into the returned value; a BadRecord it
  raises is handled like the reader's own (raised, or skipped and counted)."""
  bad = BadRecords() if skip_bad else None
  out = []
  paths = expand_files(files) if isinstance(files, str) else list(files)
  top = "{path}: ApolloMoEBench must be a JSON list of records, got {got}"
  for path in paths:
    for _, i, item, _ in stream_json.iter_items(path, top, objects=False):
      where = _where(path, i, item)
      rec = _guarded(lambda: (parse or (lambda r, _: r))(_bench_record(item, where), where), bad)
      if rec is not None:
        out.append(rec)
  bad = bad or BadRecords()
  bad.log("benchmark records")
  return out, bad
