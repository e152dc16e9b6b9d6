"""Scores per source, per language, Major and Minor averages with 95% intervals.

As the original (docs/original.md, Aggregation); the intervals are ours:
  * source: right / all (items skipped for the prompt budget are not in "all", as the original);
  * language: en and zh are the unweighted mean of their sources' accuracies (macro); every
    other language pools its sources (micro: sum right / sum all), which for the single-source
    languages is just that source;
  * Major = unweighted mean of the 12 major languages present; Minor = unweighted mean of the
    minor languages present;
  * pubmedqa, cmb-single and cmexam are scored but left out of the languages by default (the
    paper's numbers; `exclude=()` keeps them, as the released collector script did).

Intervals (95%): point ± 1.96 standard errors, clipped to [0, 1]. A source's variance is the
Agresti-Coull one, p~(1 - p~) / (n + 4) with p~ = (right + 2) / (n + 4), so 0/n and n/n still get
an honest width; averages add the variances of their parts with the same weights (macro: 1/m
each, micro: n_s / N), treating sources as independent.
"""

import numpy as np

from apollo_jax import languages
from apollo_jax.evaluation.bench import EXCLUDED_SOURCES

MACRO_LANGUAGES = ("en", "zh")
Z95 = 1.959963984540054


def _entry(acc, var, **extra):
  half = Z95 * float(np.sqrt(var))
  return {"acc": float(acc), "ci": [max(0.0, float(acc) - half), min(1.0, float(acc) + half)], **extra}


def aggregate(results, exclude=EXCLUDED_SOURCES) -> dict:
  """results: iterable of (source, language, correct). Returns per_source, per_language,
  major_avg, minor_avg (accuracies as fractions, each with `ci` = [low, high])."""
  exclude = {s.lower() for s in exclude}
  counts = {}
  for source, language, correct in results:
    c = counts.setdefault(source, {"language": language, "n": 0, "correct": 0})
    c["n"] += 1
    c["correct"] += bool(correct)
  per_source, var = {}, {}
  for source in sorted(counts):
    c = counts[source]
    p_tilde = (c["correct"] + 2) / (c["n"] + 4)
    var[source] = p_tilde * (1 - p_tilde) / (c["n"] + 4)
    per_source[source] = _entry(c["correct"] / c["n"], var[source], **c,
                                excluded=source.lower() in exclude)

  per_language, lang_var = {}, {}
  for code in languages.CODES:
    srcs = [s for s, v in per_source.items() if v["language"] == code and not v["excluded"]]
    if not srcs:
      continue
    n = np.array([per_source[s]["n"] for s in srcs], float)
    acc = np.array([per_source[s]["acc"] for s in srcs])
    w = np.full(len(srcs), 1 / len(srcs)) if code in MACRO_LANGUAGES else n / n.sum()
    lang_var[code] = float(w ** 2 @ np.array([var[s] for s in srcs]))
    per_language[code] = _entry(w @ acc, lang_var[code], n=int(n.sum()), sources=srcs,
                                average="macro" if code in MACRO_LANGUAGES else "micro",
                                tier=languages.tier(code))

  def average(tier):
    codes = [c for c in per_language if languages.tier(c) == tier]
    total = len(languages.MAJOR if tier == "major" else languages.MINOR)
    if not codes:
      return {"acc": None, "ci": None, "languages": 0, "of": total}
    return _entry(np.mean([per_language[c]["acc"] for c in codes]),
                  sum(lang_var[c] for c in codes) / len(codes) ** 2, languages=len(codes), of=total)

  return {"per_source": per_source, "per_language": per_language,
          "major_avg": average("major"), "minor_avg": average("minor")}
