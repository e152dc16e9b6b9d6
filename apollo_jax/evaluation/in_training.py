"""In-training benchmark evaluation (`config.bench_eval`): option log-likelihood scoring of a
seeded dev subset of ApolloMoEBench with the current params, on the training mesh (through
`inference.LM`, the same scorer as `python -m apollo_jax.evaluate`).

train.py builds it once (`make`, None when off) and, every `bench_eval.every` steps and at the last, merges
`bench(params)` into the logged record: bench/<code> per language, bench/major, bench/minor, and
bench_norm/major, bench_norm/minor for the length-normalised variant (accuracies in [0, 1]).
"""

import math
import random

from apollo_jax import inference
from apollo_jax.evaluation import aggregate, bench, prompts as prompts_lib, scoring


def dev_subset(items, fraction: float, seed: int):
  """`fraction` of each source's items (rounded half up, at least one), drawn with a per-source
  seed; in bench order."""
  by_source = {}
  for it in items:
    by_source.setdefault(it.source, []).append(it)
  keep = set()
  for source, group in by_source.items():
    k = max(1, math.floor(fraction * len(group) + 0.5))
    keep.update(it.id for it in random.Random(f"{seed}/{source}").sample(group, k))
  return [it for it in items if it.id in keep]


class BenchEval:
  def __init__(self, config, mesh, tokenizer, cache_dir=None):
    b = config.bench_eval
    pool, _ = bench.read(b.files, config.data.skip_bad_records, cache_dir)
    self.templates = prompts_lib.load_templates(b.templates)
    self.prompts, self.skipped = prompts_lib.build(dev_subset(pool, b.fraction, b.seed), pool,
                                                   self.templates, b.shots, b.seed)
    self.batch_size = b.batch_size
    # one LM (its jitted forward compiles once per shape); each run swaps in the current params
    self.lm = inference.LM(inference.inference_config(config), None, tokenizer, mesh)

  def __call__(self, params) -> dict:
    self.lm.params = params
    preds = scoring.predictions(self.lm, self.prompts, self.templates, "loglik",
                                batch_size=self.batch_size, progress=False)
    out = {"bench/questions": len(preds)}
    for method, prefix in (("loglik", "bench"), ("loglik_norm", "bench_norm")):
      r = aggregate.aggregate([(p["source"], p["language"], p["correct"][method]) for p in preds])
      out[f"{prefix}/major"], out[f"{prefix}/minor"] = r["major_avg"]["acc"], r["minor_avg"]["acc"]
      if method == "loglik":
        out.update({f"bench/{code}": v["acc"] for code, v in r["per_language"].items()})
    return {k: v for k, v in out.items() if v is not None}


def make(config, mesh, tokenizer, cache_dir=None):
  """BenchEval for `config.bench_eval`, or None when it is off (every == 0)."""
  b = config.get("bench_eval")
  if b is None or b.every <= 0:
    return None
  if not b.files:
    raise ValueError("bench_eval.every > 0 needs bench_eval.files (ApolloMoEBench JSON, e.g. "
                     "--config.bench_eval.files=data/sample/apollo_moe_bench_sample.json)")
  if not 0 < b.fraction <= 1:
    raise ValueError(f"bench_eval.fraction={b.fraction} must be in (0, 1]")
  return BenchEval(config, mesh, tokenizer, cache_dir)
