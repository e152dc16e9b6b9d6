"""Output files of an evaluation: predictions.jsonl, scores.json, report.md, per_language.png."""

import json
import os

from apollo_jax import languages

# Column order of the paper's Table 4 and its Apollo-MoE rows (docs/original.md, Reported results).
TABLE4_LANGUAGES = ("ar", "de", "en", "es", "fr", "hi", "it", "ja", "ko", "pt", "ru", "zh")
PAPER_ROWS = (    # (size, Major, Minor, the 12 languages in TABLE4_LANGUAGES order)
    ("0.5B", 40.5, 34.6, (36.3, 38.2, 45.4, 39.8, 38.4, 33.1, 39.9, 26.9, 35.2, 37.3, 64.1, 51.3)),
    ("1.5B", 54.8, 44.9, (47.2, 53.8, 56.5, 52.5, 53.3, 39.5, 54.4, 45.7, 49.5, 57.3, 69.1, 66.8)),
    ("7.0B", 69.9, 58.3, (58.3, 73.5, 73.1, 69.4, 72.4, 56.9, 71.9, 62.4, 68.4, 73.8, 74.2, 84.1)),
)


def _pct(entry):
  return "–" if not entry or entry.get("acc") is None else f"{100 * entry['acc']:.1f}"


def _pct_ci(entry):
  if not entry or entry.get("acc") is None:
    return "–"
  lo, hi = entry["ci"]
  return f"{100 * entry['acc']:.1f} ({100 * lo:.1f}–{100 * hi:.1f})"


def _params_text(n):
  if not n:
    return "?"
  for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
    if n >= div:
      return f"{n / div:.2f}{unit}"
  return str(n)


def markdown(scores: dict) -> str:
  methods = scores["methods"]
  s, c = scores["settings"], scores["counts"]
  lines = [
      "# ApolloMoEBench evaluation", "",
      f"model `{scores['model']}`; mode {scores['mode']}; {s['shots']}-shot, seed {s['seed']}, "
      f"prompt budget {s['budget_chars']} characters; {c['scored']} questions scored "
      f"({c['skipped_over_budget']} skipped over budget, {c['bad_records']} bad records skipped) "
      f"of {c['selected']} selected from {c['bench']}.",
      f"Sources left out of the language scores: {', '.join(s['exclude']) or 'none'}. Accuracy in %; "
      "en and zh average their sources unweighted, every other language pools its questions.", "",
      "## Table 4 (paper layout)", "",
      "| model | #params | Major | Minor | " + " | ".join(x.capitalize() for x in TABLE4_LANGUAGES) + " |",
      "|---|---|---|---|" + "---|" * len(TABLE4_LANGUAGES),
  ]
  for name, m in methods.items():
    cells = [_pct(m["per_language"].get(x)) for x in TABLE4_LANGUAGES]
    lines.append(f"| this model, {name} | {_params_text(scores.get('params'))} | {_pct(m['major_avg'])} | "
                 f"{_pct(m['minor_avg'])} | " + " | ".join(cells) + " |")
  for size, major, minor, row in PAPER_ROWS:
    lines.append(f"| Apollo-MoE (paper) | {size} | {major} | {minor} | " + " | ".join(f"{v}" for v in row) + " |")
  averages = [f"{name}: Major {_pct_ci(m['major_avg'])} over {m['major_avg']['languages']}/12 languages, "
              f"Minor {_pct_ci(m['minor_avg'])} over {m['minor_avg']['languages']}/38"
              for name, m in methods.items()]
  lines += ["", "Major / Minor averages with 95% intervals: " + "; ".join(averages), ""]

  lines += ["## Per language (95% interval)", "",
            "| code | language | tier | questions | " + " | ".join(methods) + " |",
            "|---|---|---|---|" + "---|" * len(methods)]
  first = next(iter(methods.values()))
  for code in languages.CODES:
    if code in first["per_language"]:
      cells = [_pct_ci(m["per_language"].get(code)) for m in methods.values()]
      lines.append(f"| {code} | {languages.NAMES[code]} | {languages.tier(code)} | "
                   f"{first['per_language'][code]['n']} | " + " | ".join(cells) + " |")
  lines += ["", "## Per source", "",
            "| source | language | questions | skipped | " + " | ".join(methods) + " |",
            "|---|---|---|---|" + "---|" * len(methods)]
  for src, v in first["per_source"].items():
    cells = [_pct_ci(m["per_source"][src]) for m in methods.values()]
    note = " (excluded)" if v["excluded"] else ""
    lines.append(f"| {src}{note} | {v['language']} | {v['n']} | {c['skipped_by_source'].get(src, 0)} | "
                 + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot(scores: dict, path: str):
  """Grouped bars: accuracy per language (major first, then minor) per method, 95% intervals."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  methods = scores["methods"]
  first = next(iter(methods.values()))["per_language"]
  codes = [c for c in languages.MAJOR + languages.MINOR if c in first]
  fig, ax = plt.subplots(figsize=(min(20, 4 + 0.32 * len(codes)), 4.5))
  width = 0.8 / len(methods)
  x = np.arange(len(codes))
  for j, (name, m) in enumerate(methods.items()):
    acc = np.array([100 * m["per_language"][c]["acc"] for c in codes])
    ci = 100 * np.array([m["per_language"][c]["ci"] for c in codes]).reshape(-1, 2)
    ax.bar(x + (j - (len(methods) - 1) / 2) * width, acc, width, label=name,
           yerr=np.stack([acc - ci[:, 0], ci[:, 1] - acc]), capsize=1.5, error_kw={"lw": 0.6})
  n_major = sum(c in languages.MAJOR for c in codes)
  if 0 < n_major < len(codes):
    ax.axvline(n_major - 0.5, color="grey", ls="--", lw=0.8)
  ax.set_xticks(x, codes, rotation=90, fontsize=7)
  ax.set_ylim(0, 100)
  ax.set_ylabel("accuracy (%)")
  model = os.path.basename(scores["model"].rstrip("/"))
  ax.set_title(f"ApolloMoEBench per language (major | minor), 95% intervals — {model}")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write(out_dir: str, predictions, scores: dict):
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "predictions.jsonl"), "w", encoding="utf-8") as f:
    for rec in predictions:
      f.write(json.dumps(rec, ensure_ascii=False) + "\n")
  with open(os.path.join(out_dir, "scores.json"), "w", encoding="utf-8") as f:
    json.dump(scores, f, ensure_ascii=False, indent=1)
  with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
    f.write(markdown(scores))
  if scores["counts"]["scored"]:
    plot(scores, os.path.join(out_dir, "per_language.png"))
