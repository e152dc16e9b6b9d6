""""Spread Out in the End" (docs/original.md, Routing analysis) at small scale: is routing more
language-specific in later layers?

Trains the tiny config with MoE in EVERY layer under Hybrid-k (family7, major12) and a plain top-k
baseline on the shipped sample, analyses each model's inference routing (plain top-k) on the
sample benchmark prompts (not trained on) and on the training conversations, and writes the
per-layer specialization table to experiments/spread_out.md plus one heatmap PNG.

  python experiments/spread_out.py [--steps=300] [--runs=runs/spread_out]

Each step is a subprocess of the public CLIs (train, analyze); a finished run is not retrained.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    "hybrid_family7": "routing=hybrid,moe_layers=all,expert_map=family7",
    "hybrid_major12": "routing=hybrid,moe_layers=all,expert_map=major12",
    "topk_family7": "routing=topk,moe_layers=all,expert_map=family7",
}
DATA = {"bench": "data/sample/apollo_moe_bench_sample.json",
        "conversations": "data/sample/apollo_moe_sample.json"}


def run(args):
  print("$", " ".join(args), flush=True)
  subprocess.run([sys.executable] + args, cwd=ROOT, check=True,
                 env={**os.environ, "WANDB_MODE": "disabled"})


def last_eval(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    recs = [json.loads(line) for line in f if line.strip()]
  evals = [r for r in recs if r.get("eval_loss") is not None]
  return evals[0]["eval_loss"], evals[-1]["eval_loss"], evals[-1]["step"]


def table(results):
  """Markdown rows: S (chance) per layer, by language and by family, for every run and data set."""
  layers = next(iter(results.values()))["bench"]["moe_layers"]
  head = "| model | data | grouping | " + " | ".join(f"layer {i}" for i in layers) + " |"
  lines = [head, "|" + "---|" * (3 + len(layers))]
  for name, res in results.items():
    for data, r in res.items():
      for group in ("language", "family"):
        g = r[group]
        cells = [f"{s:.3f} ({c:.3f})" for s, c in zip(g["specialization"], g["specialization_chance"])]
        lines.append(f"| {name} | {data} | {group} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--runs", default="runs/spread_out")
  p.add_argument("--out", default="experiments")
  a = p.parse_args()
  results, losses = {}, {}
  for name, arg in VARIANTS.items():
    wd = os.path.join(a.runs, name)
    run(["-m", "apollo_jax.train", f"--config=configs/tiny.py:{arg}", f"--workdir={wd}",
         f"--config.steps={a.steps}"])
    losses[name] = last_eval(os.path.join(ROOT, wd))
    results[name] = {}
    for data, files in DATA.items():
      out = os.path.join(wd, f"analysis_{data}")
      run(["-m", "apollo_jax.analyze", f"--model={wd}", f"--data={files}", f"--out={out}",
           "--group=family", "--batch_size=32"])
      with open(os.path.join(ROOT, out, "routing.json")) as f:
        results[name][data] = json.load(f)
  first = next(iter(results.values()))["bench"]
  text = [
      "# Spread Out in the End, tiny scale", "",
      f"`python experiments/spread_out.py --steps={a.steps}`: configs/tiny.py (4 layers, hidden 64) with "
      f"MoE in every layer, {a.steps} steps on the shipped sample, MoE implementation "
      f"`{first['impl']}`. Inference routing (plain top-k). Cells: specialization S of the layer "
      "(normalised mutual information of language/family and expert, 0 = routing ignores the "
      "language, 1 = language determines the expert) and, in brackets, its chance level (the same "
      "token counts routed independently of the language).", "",
      "| model | eval loss (step 0 -> end) |", "|---|---|",
      *[f"| {n} | {l0:.3f} -> {l1:.3f} (step {s}) |" for n, (l0, l1, s) in losses.items()], "",
      table(results), ""]
  os.makedirs(os.path.join(ROOT, a.out), exist_ok=True)
  with open(os.path.join(ROOT, a.out, "spread_out.md"), "w") as f:
    f.write("\n".join(text))
  shutil.copyfile(os.path.join(ROOT, a.runs, "hybrid_family7", "analysis_bench", "dominant_family.png"),
                  os.path.join(ROOT, a.out, "spread_out_hybrid_family7_dominant_family.png"))
  print("\n".join(text))


if __name__ == "__main__":
  main()
