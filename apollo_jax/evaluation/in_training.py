"""In-training benchmark evaluation (`config.bench_eval`): option log-likelihood scoring of a
seeded dev subset of ApolloMoEBench with the current params, on the training mesh.

train.py builds it once (`make`, None when off) and, at steps where `due(step)`, merges
`bench(params)` into the logged record: bench/<code> per language, bench/major, bench/minor, and
bench_norm/major, bench_norm/minor for the length-normalised variant (accuracies in [0, 1]).
"""

import math
import random

import jax
import jax.numpy as jnp
import numpy as np

from apollo_jax import languages as languages_lib, sharding
from apollo_jax.evaluation import aggregate, bench, prompts as prompts_lib, scoring
from apollo_jax.train_step import token_ce

LENGTH_BUCKET = 64           # rows are padded to a multiple of this (one compile per bucket)


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


def encode_prompt(tokenizer, text: str) -> list:
  """Prompt ids with every literal end-of-text marker as the tokenizer's EOS id (what a Qwen2
  tokenizer does by itself; a sentencepiece model would spell the marker out)."""
  ids = []
  for j, part in enumerate(text.split(prompts_lib.EOS_TEXT)):
    if j:
      ids.append(tokenizer.eos_id)
    ids += tokenizer.encode(part)
  return ids


class ParamsLM:
  """`score` and `tokenizer` of the inference interface over the training model and mesh; the
  params are set with `bind` before scoring."""

  def __init__(self, model, mesh, tokenizer, batch_size: int):
    self.tokenizer, self.mesh = tokenizer, mesh
    shards = int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES]))
    self.rows = -(-batch_size // shards) * shards          # every batch shard gets rows
    self.params = None

    def logprob(params, ids, targets, mask, language_ids):
      logits = model.apply({"params": params}, ids, language_ids=language_ids, train=False)
      return -jnp.sum(token_ce(logits, targets) * mask, axis=-1)
    self._fn = jax.jit(logprob, out_shardings=sharding.replicated(mesh))

  def bind(self, params):
    self.params = params
    return self

  def score(self, prompts, continuations, languages=None):
    """Summed log-probability of each continuation (tokenised on its own) after its prompt."""
    pairs = [(encode_prompt(self.tokenizer, p), self.tokenizer.encode(c)) for p, c in zip(prompts, continuations)]
    out = []
    for start in range(0, len(pairs), self.rows):
      chunk = pairs[start:start + self.rows]
      length = -(-max(len(p) + len(c) for p, c in chunk) // LENGTH_BUCKET) * LENGTH_BUCKET
      batch = {k: np.zeros((self.rows, length), np.int32) for k in ("ids", "targets", "mask", "lang")}
      batch["ids"][:] = batch["targets"][:] = self.tokenizer.pad_id
      for r, (p, c) in enumerate(chunk):
        seq = p + c
        batch["ids"][r, :len(seq)] = seq
        batch["targets"][r, :len(seq) - 1] = seq[1:]
        batch["mask"][r, len(p) - 1:len(seq) - 1] = 1        # positions predicting the continuation
        if languages is not None:
          batch["lang"][r] = languages_lib.index(languages[start + r])
      sh = sharding.batch_sharding(self.mesh)
      args = [jax.device_put(batch[k], sh) for k in ("ids", "targets", "mask", "lang")]
      out.append(np.asarray(jax.device_get(self._fn(self.params, *args)))[:len(chunk)])
    return np.concatenate(out)


class BenchEval:
  def __init__(self, config, model, mesh, tokenizer):
    b = config.bench_eval
    self.every, self.last = b.every, config.steps
    pool, _ = bench.read(b.files, config.data.skip_bad_records)
    self.templates = prompts_lib.load_templates(b.templates)
    self.prompts, self.skipped = prompts_lib.build(dev_subset(pool, b.fraction, b.seed), pool,
                                                   self.templates, b.shots, b.seed)
    self.lm = ParamsLM(model, mesh, tokenizer, b.batch_size)

  def due(self, step: int) -> bool:
    return step % self.every == 0 or step == self.last

  def __call__(self, params) -> dict:
    preds = scoring.predictions(self.lm.bind(params), self.prompts, self.templates, "loglik",
                                batch_size=self.lm.rows, progress=False)
    out = {"bench/questions": len(preds)}
    for method, prefix in (("loglik", "bench"), ("loglik_norm", "bench_norm")):
      r = aggregate.aggregate([(p["source"], p["language"], p["correct"][method]) for p in preds])
      out[f"{prefix}/major"], out[f"{prefix}/minor"] = r["major_avg"]["acc"], r["minor_avg"]["acc"]
      if method == "loglik":
        out.update({f"bench/{code}": v["acc"] for code, v in r["per_language"].items()})
    return {k: v for k, v in out.items() if v is not None}


def make(config, model, mesh, tokenizer):
  """BenchEval for `config.bench_eval`, or None when it is off (every == 0)."""
  b = config.get("bench_eval")
  if b is None or b.every <= 0:
    return None
  if not b.files:
    raise ValueError("bench_eval.every > 0 needs bench_eval.files (ApolloMoEBench JSON, e.g. "
                     "--config.bench_eval.files=data/sample/apollo_moe_bench_sample.json)")
  if not 0 < b.fraction <= 1:
    raise ValueError(f"bench_eval.fraction={b.fraction} must be in (0, 1]")
  return BenchEval(config, model, mesh, tokenizer)
