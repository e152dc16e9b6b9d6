"""Evaluate a model on ApolloMoEBench in 50 languages (the original's protocol, docs/original.md, Evaluation):

  python -m apollo_jax.evaluate --model=runs/tiny --bench=data/sample/apollo_moe_bench_sample.json \\
      --out=runs/tiny/eval [--mode=generate|loglik|both] [--shots=3] [--limit=N] [--languages=en,zh]

--model is anything `apollo_jax.inference.load` takes: a training workdir (latest checkpoint, or
--step), a converted params dir, or a HuggingFace Qwen2 / Qwen2-MoE directory. Writes
OUT/predictions.jsonl, OUT/scores.json, OUT/report.md (paper Table 4 layout) and
OUT/per_language.png.
"""

import os
import sys

from absl import flags

FLAGS = flags.FLAGS


def define_flags():
  from apollo_jax.evaluation import bench, prompts
  flags.DEFINE_string("model", None, "workdir, converted params dir or HF Qwen2/Qwen2-MoE dir")
  flags.DEFINE_integer("step", None, "checkpoint step of a workdir (default: the latest)")
  flags.DEFINE_string("tokenizer", None, "tokenizer file (default: the model's own; needed for a "
                      "convert_from_hf dir)")
  flags.DEFINE_string("bench", "data/sample/apollo_moe_bench_sample.json",
                      "ApolloMoEBench JSON: a path, a glob or a comma-separated list")
  flags.DEFINE_string("out", None, "output directory")
  flags.DEFINE_enum("mode", "both", ["generate", "loglik", "both"],
                    "generate: greedy decoding + answer extraction (the paper's protocol); loglik: "
                    "option log-likelihoods (sum and per-token mean); both")
  flags.DEFINE_integer("shots", 3, "few-shot examples per prompt (same source, never the item)")
  flags.DEFINE_integer("limit", 0, "at most N questions per source (0: all)")
  flags.DEFINE_list("languages", [], "language codes to evaluate (default: all present)")
  flags.DEFINE_integer("seed", 0, "seed of the shot selection")
  flags.DEFINE_string("templates", "", f"prompt wording JSON (default {prompts.DEFAULT_TEMPLATES})")
  flags.DEFINE_list("exclude", list(bench.EXCLUDED_SOURCES),
                    "sources scored but left out of the language scores ('' keeps all)")
  flags.DEFINE_integer("budget", prompts.BUDGET_CHARS, "prompt budget in characters (original: 4096)")
  flags.DEFINE_integer("max_new_tokens", 256, "generation length (original: 256)")
  flags.DEFINE_integer("batch_size", 16, "prompts (generate) or prompt/option pairs (loglik) per call")
  flags.DEFINE_bool("skip_bad", False, "skip and count malformed bench records instead of failing")
  flags.DEFINE_string("cache_dir", "", "where the bench's TFDS dataset is built once (default: OUT/data_cache)")


def main(argv):
  del argv
  from apollo_jax import evaluation, inference
  lm = inference.load(FLAGS.model, step=FLAGS.step, tokenizer=FLAGS.tokenizer)
  _, scores = evaluation.evaluate(
      lm, FLAGS.bench, FLAGS.out, mode=FLAGS.mode, shots=FLAGS.shots, seed=FLAGS.seed,
      limit=FLAGS.limit, languages=FLAGS.languages or None, templates=FLAGS.templates,
      exclude=tuple(x for x in FLAGS.exclude if x), budget=FLAGS.budget,
      max_new_tokens=FLAGS.max_new_tokens, batch_size=FLAGS.batch_size, skip_bad=FLAGS.skip_bad,
      model_name=FLAGS.model if FLAGS.step is None else f"{FLAGS.model}@{FLAGS.step}",
      cache_dir=FLAGS.cache_dir or os.path.join(FLAGS.out, "data_cache"))
  c = scores["counts"]
  fmt = lambda e: "n/a" if e["acc"] is None else f"{100 * e['acc']:.1f}"
  for name, m in scores["methods"].items():
    print(f"{name}: Major {fmt(m['major_avg'])} ({m['major_avg']['languages']}/12 languages), "
          f"Minor {fmt(m['minor_avg'])} ({m['minor_avg']['languages']}/38)")
  print(f"{c['scored']} questions scored ({c['skipped_over_budget']} over budget) in {scores['seconds']:.1f}s "
        f"({scores['questions_per_s']:.2f} questions/s); wrote {FLAGS.out}/report.md", file=sys.stderr)


if __name__ == "__main__":
  define_flags()
  from apollo_jax.runtime import cli
  cli.run(main, required=("model", "out"))
