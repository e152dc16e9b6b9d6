"""Write an lm-evaluation-harness task with the prompts of `evaluate --mode=loglik`:

  python -m apollo_jax.write_lm_eval_task --hf_dir=export/tiny --out=tasks/apollo \
      [--bench=data/sample/apollo_moe_bench_sample.json] [--shots=3] [--seed=0] [--limit=N per source]
      [--languages=en,zh] [--templates=PATH] [--eos_token=TEXT]
  lm_eval --model hf --model_args pretrained=export/tiny --include_path tasks/apollo \
      --tasks apollo_moe_bench

Writes OUT/apollo_moe_bench.jsonl (one pre-built prompt per question) and OUT/apollo_moe_bench.yaml.
--hf_dir is the export to be evaluated: its tokenizer's EOS token text separates the shots
(--eos_token overrides). See apollo_jax/evaluation/lm_eval_task.py and docs/evaluation.md.
"""

from absl import flags


def define_flags():
  """CLI flags; defined only when run as a script, so importing this module never clashes."""
  flags.DEFINE_string("hf_dir", None, "HF dir to be evaluated (for its EOS token text).")
  flags.DEFINE_string("out", None, "Output dir for the task YAML and its data file.")
  flags.DEFINE_string("bench", "data/sample/apollo_moe_bench_sample.json", "ApolloMoEBench file(s).")
  flags.DEFINE_integer("shots", 3, "Shots per prompt.")
  flags.DEFINE_integer("seed", 0, "Shot-drawing seed.")
  flags.DEFINE_integer("limit", 0, "At most N questions per source (0: all).")
  flags.DEFINE_list("languages", [], "Language codes to keep (default: all).")
  flags.DEFINE_string("templates", "", "Prompt templates JSON (default: the shipped one).")
  flags.DEFINE_string("eos_token", "", "EOS token text (default: read from --hf_dir).")


def write(out, hf_dir=None, bench="data/sample/apollo_moe_bench_sample.json", shots=3, seed=0, limit=0,
          languages=None, templates="", eos_token=""):
  """Returns (YAML path, number of questions, number skipped over the budget)."""
  from apollo_jax.evaluation import lm_eval_task
  if not eos_token:
    if not hf_dir:
      raise ValueError("pass --hf_dir (the export to evaluate) or --eos_token")
    eos_token = lm_eval_task.eos_token_of(hf_dir)
  rows, skipped = lm_eval_task.rows(bench, eos_token, shots, seed, limit, languages or None, templates)
  return lm_eval_task.write(out, rows), len(rows), len(skipped)


def main(argv):
  del argv
  f = flags.FLAGS
  path, n, skipped = write(f.out, f.hf_dir, f.bench, f.shots, f.seed, f.limit, f.languages, f.templates,
                           f.eos_token)
  print(f"wrote {path}: {n} questions ({skipped} over the prompt budget, skipped as evaluate does)")


if __name__ == "__main__":
  define_flags()
  from apollo_jax.runtime import cli
  cli.run(main, required=("out",))
