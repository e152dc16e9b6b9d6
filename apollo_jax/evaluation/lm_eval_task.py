"""An lm-evaluation-harness task with exactly our log-likelihood evaluation's prompts.

The prompts are not re-templated in YAML: they are built here by prompts.build (the same
templates, shot draws, seed and character budget as `evaluate --mode=loglik`) and written as a
JSON-lines dataset, one row per question: `query` (3-shot prompt ending in "Assistant:"),
`choices` (each option's answer sentence, prompts.continuations) and `gold` (its index). The YAML
then only points lm-eval at those fields, with:
  * `target_delimiter: ""`: lm-eval puts the delimiter (default " ") between prompt and choice; our
    continuations follow "Assistant:" directly;
  * `num_fewshot: 0`: the shots are already inside `query`;
  * the shots' end-of-text marker written as the evaluated tokenizer's EOS token text (e.g.
    "</s>" for the exported sample tokenizer, "<|endoftext|>" for Qwen2's), which an HF tokenizer
    turns into the EOS id as prompts.encode does.
lm-eval's `acc` is our `loglik` accuracy; its `acc_norm` divides by the choice's length in bytes
(ours, `loglik_norm`, by its token count).
"""

import json
import os

from apollo_jax.evaluation import bench, prompts as prompts_lib

TASK = "apollo_moe_bench"


def rows(bench_files, eos_token, shots=3, seed=0, limit=0, languages=None, templates="",
         budget=prompts_lib.BUDGET_CHARS, skip_bad=False):
  """(dataset rows, items skipped over the budget) for the same selection as runner.evaluate."""
  if not eos_token:
    raise ValueError("eos_token is empty: pass the evaluated tokenizer's end-of-text token text "
                     "(e.g. '</s>'), or an HF dir whose tokenizer_config.json names it")
  pool, _ = bench.read(bench_files, skip_bad)
  items = bench.select(pool, languages, limit)
  table = prompts_lib.load_templates(templates)
  prompts, skipped = prompts_lib.build(items, pool, table, shots, seed, budget)
  out = [{"id": p.item.id, "source": p.item.source, "language": p.item.language,
          "query": p.text.replace(prompts_lib.EOS_TEXT, eos_token),
          "choices": prompts_lib.continuations(table, p.item),
          "gold": p.item.labels.index(p.item.gold)} for p in prompts]
  return out, skipped


def eos_token_of(hf_dir) -> str:
  """The EOS token text of an HF dir's tokenizer (tokenizer_config.json, else special_tokens_map.json)."""
  for name in ("tokenizer_config.json", "special_tokens_map.json"):
    path = os.path.join(hf_dir, name)
    if os.path.exists(path):
      eos = json.load(open(path, encoding="utf-8")).get("eos_token")
      eos = eos.get("content") if isinstance(eos, dict) else eos
      if eos:
        return eos
  raise ValueError(f"{hf_dir}: no eos_token in tokenizer_config.json or special_tokens_map.json; "
                   "pass --eos_token")


def task_yaml(data_file, task=TASK) -> str:
  """The lm-eval task config for the rows in `data_file` (an absolute path: lm-eval opens it from
  wherever it runs)."""
  return "\n".join([
      "# Written by python -m apollo_jax.write_lm_eval_task (apollo_jax/evaluation/lm_eval_task.py):",
      "# the prompts of `evaluate --mode=loglik`, pre-built in the data file.",
      f"task: {task}",
      "dataset_path: json",
      "dataset_kwargs:",
      "  data_files:",
      f"    test: {json.dumps(data_file)}",
      "test_split: test",
      "output_type: multiple_choice",
      "doc_to_text: query",
      "doc_to_choice: choices",
      "doc_to_target: gold",
      'target_delimiter: ""',
      "num_fewshot: 0",
      "metric_list:",
      "  - metric: acc",
      "    aggregation: mean",
      "    higher_is_better: true",
      "  - metric: acc_norm",
      "    aggregation: mean",
      "    higher_is_better: true",
      "metadata:",
      "  version: 1.0",
      ""])


def write(out_dir, rows_, task=TASK):
  """OUT/<task>.jsonl + OUT/<task>.yaml; returns the YAML's path."""
  os.makedirs(out_dir, exist_ok=True)
  data = os.path.abspath(os.path.join(out_dir, f"{task}.jsonl"))
  with open(data, "w", encoding="utf-8") as f:
    for r in rows_:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  path = os.path.join(out_dir, f"{task}.yaml")
  with open(path, "w", encoding="utf-8") as f:
    f.write(task_yaml(data, task))
  return path
