"""One evaluation: bench -> prompts -> model -> predictions -> scores -> files."""

import time

from apollo_jax.evaluation import aggregate as aggregate_lib
from apollo_jax.evaluation import bench, prompts as prompts_lib, report, scoring


def _param_count(lm):
  """Total parameters (real experts only) of an lm with an apollo_jax config, else None."""
  config = getattr(lm, "config", None)
  if config is None:
    return None
  from apollo_jax.model.size import count_params
  return count_params(config)["total_params"]


def evaluate(lm, bench_files, out_dir=None, *, mode="both", shots=3, seed=0, limit=0, languages=None,
             templates="", exclude=bench.EXCLUDED_SOURCES, budget=prompts_lib.BUDGET_CHARS,
             max_new_tokens=256, batch_size=16, skip_bad=False, model_name="", progress=True,
             cache_dir=None):
  """Scores `lm` on ApolloMoEBench files; writes the outputs to out_dir (if given); returns
  (predictions, scores). Shots come from the whole bench, whatever `limit`/`languages` select;
  `cache_dir`: read the bench through its TFDS dataset there (evaluation/bench.read)."""
  if mode not in scoring.METHODS:
    raise ValueError(f"--mode={mode!r}; choose one of {', '.join(scoring.METHODS)}")
  pool, bad = bench.read(bench_files, skip_bad, cache_dir)
  items = bench.select(pool, languages, limit)
  table = prompts_lib.load_templates(templates)
  prompts, skipped = prompts_lib.build(items, pool, table, shots, seed, budget)
  t0 = time.time()
  preds = scoring.predictions(lm, prompts, table, mode, max_new_tokens, batch_size, progress)
  seconds = time.time() - t0
  methods = {m: aggregate_lib.aggregate([(p["source"], p["language"], p["correct"][m]) for p in preds],
                                        exclude)
             for m in scoring.METHODS[mode]}
  skipped_by_source = {}
  for it in skipped:
    skipped_by_source[it.source] = skipped_by_source.get(it.source, 0) + 1
  primary = scoring.METHODS[mode][0]
  scores = {
      "model": model_name, "mode": mode, "primary": primary, "params": _param_count(lm),
      **{k: methods[primary][k] for k in ("per_source", "per_language", "major_avg", "minor_avg")},
      "methods": methods,
      "counts": {"bench": len(pool), "selected": len(items), "scored": len(preds),
                 "skipped_over_budget": len(skipped), "skipped_by_source": skipped_by_source,
                 "bad_records": bad.count},
      "settings": {"shots": shots, "seed": seed, "limit": limit, "languages": list(languages or []),
                   "templates": templates or prompts_lib.DEFAULT_TEMPLATES, "exclude": list(exclude),
                   "budget_chars": budget, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                   "bench": bench_files if isinstance(bench_files, str) else list(bench_files)},
      "seconds": seconds, "questions_per_s": len(preds) / seconds if seconds > 0 else None,
  }
  if out_dir:
    report.write(out_dir, preds, scores)
  return preds, scores
