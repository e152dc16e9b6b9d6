"""Source mixture: per-source priority and repeat count, priority-weighted order (docs/original.md, Mixture).

Defaults (the original's table):
  * medical text-derived QA (`medicalBook|medicalGuideline|medicalPaper|medicalWeb|medicalWiki_*_qa`)
    of a major language: priority 16, repeat 1;
  * exams, patient dialogues, general, code, math (`medicalExam_*`, `medicalPatient_*`,
    `general_*`, `code_*`, `math_*`) and every minor-language source: priority 2, repeat 2;
  * any other source key: priority 2, repeat 1 (UNKNOWN_DEFAULT). The original raised KeyError
    for unlisted keys; we keep going, and pipeline logs which keys fell back to the default.
`data.priorities = "prefix=prio:repeat,..."` overrides them; the longest matching key prefix wins,
e.g. "medicalWeb=8:1,general_en=4:2,code=1:1".

Order: each record appears `repeat` times; the sequence is a weighted sample without replacement
proportional to priority (the original's torch.multinomial(replacement=False)), drawn as an
exponential race: sort by Exp(1) / priority. Priority-16 items therefore come first ~8x more
eagerly than priority-2 items — an implicit curriculum, medical QA first.
"""

import numpy as np

from apollo_jax import languages

TEXT_QA = ("medicalBook", "medicalGuideline", "medicalPaper", "medicalWeb", "medicalWiki")
REPEATED = ("medicalExam", "medicalPatient", "general", "code", "math")
UNKNOWN_DEFAULT = (2.0, 1)


def default_priority(source: str):
  """(priority, repeat, known) of a source key under the original's defaults (known=False: fallback)."""
  parts = source.split("_")
  name, lang = parts[0], parts[1] if len(parts) > 1 else ""
  if lang in languages.MINOR:
    return 2.0, 2, True
  if name in TEXT_QA and parts[-1] == "qa":
    return 16.0, 1, True
  if name in REPEATED:
    return 2.0, 2, True
  return UNKNOWN_DEFAULT + (False,)


def parse_priorities(spec: str) -> dict:
  """"prefix=prio:repeat,..." -> {prefix: (prio, repeat)} with clear errors."""
  out = {}
  for item in [p.strip() for p in (spec or "").split(",") if p.strip()]:
    key, eq, val = item.partition("=")
    prio, colon, rep = val.partition(":")
    try:
      p, r = float(prio), int(rep) if colon else 1
    except ValueError:
      p = r = None
    if not eq or not key or p is None or p <= 0 or r < 1:
      raise ValueError(f"data.priorities item {item!r}: expected 'source_prefix=priority:repeat' with "
                       "priority > 0 and an integer repeat >= 1, e.g. 'medicalWeb=8:1'")
    out[key.strip()] = (p, r)
  return out


def source_priority(source: str, overrides: dict):
  """(priority, repeat, known) for one source key: longest matching override prefix, else default."""
  best = max((k for k in overrides if source.startswith(k)), key=len, default=None)
  if best is not None:
    return overrides[best] + (True,)
  return default_priority(source)


def weights(sources, spec: str = ""):
  """Per-record float priority and int repeat arrays; plus the source keys that used the default."""
  overrides = parse_priorities(spec)
  table = {s: source_priority(s, overrides) for s in set(sources)}
  prio = np.array([table[s][0] for s in sources], np.float64)
  rep = np.array([table[s][1] for s in sources], np.int64)
  unknown = sorted(s for s, v in table.items() if not v[2])
  return prio, rep, unknown


def order(prio, repeat, seed, epoch: int = 0):
  """One epoch's record order (indices into the records, each repeated `repeat` times): a
  priority-proportional sample without replacement, deterministic in (seed, epoch)."""
  items = np.repeat(np.arange(len(prio)), repeat)
  rng = np.random.default_rng([int(seed), int(epoch)])
  keys = rng.exponential(size=len(items)) / np.repeat(prio, repeat)
  return items[np.argsort(keys, kind="stable")]
