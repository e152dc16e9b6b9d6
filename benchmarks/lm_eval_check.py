"""Our option log-likelihoods vs lm-evaluation-harness's, from the two commands' own outputs.

  python -m apollo_jax.evaluate --model=runs/tiny --out=runs/tiny/eval --mode=loglik
  python -m apollo_jax.write_lm_eval_task --hf_dir=export/tiny --out=tasks/apollo
  lm_eval --model hf --model_args pretrained=export/tiny,dtype=float32 --include_path tasks/apollo \
      --tasks apollo_moe_bench --log_samples --output_path lm_eval_out
  python benchmarks/lm_eval_check.py --predictions=runs/tiny/eval/predictions.jsonl \
      --samples=lm_eval_out/*/samples_apollo_moe_bench_*.jsonl

Prints the number of options compared, the largest |difference| (and relative to the largest
|log-likelihood|), and on how many questions both pick the same option (argmax of the sum).
"""

import argparse
import glob
import json
import sys


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--predictions", required=True, help="OUT/predictions.jsonl of evaluate --mode=loglik|both")
  p.add_argument("--samples", required=True, help="lm_eval --log_samples file (a glob is fine)")
  a = p.parse_args(argv)
  files = sorted(glob.glob(a.samples))
  if not files:
    sys.exit(f"ERROR: --samples={a.samples} matches no file")
  ours = {r["id"]: r for r in map(json.loads, open(a.predictions, encoding="utf-8"))}
  err, scale, same, n_opt, n_q = 0.0, 0.0, 0, 0, 0
  for line in open(files[-1], encoding="utf-8"):
    s = json.loads(line)
    mine = ours[s["doc"]["id"]]["loglik"]
    labels = sorted(mine)
    theirs = [float(r[0]) for r in s["filtered_resps"]]
    if len(theirs) != len(labels):
      sys.exit(f"ERROR: question {s['doc']['id']}: {len(theirs)} lm-eval options, {len(labels)} ours")
    for label, t in zip(labels, theirs):
      err, scale = max(err, abs(t - mine[label])), max(scale, abs(mine[label]))
    same += labels[max(range(len(theirs)), key=theirs.__getitem__)] == max(labels, key=mine.__getitem__)
    n_opt, n_q = n_opt + len(labels), n_q + 1
  print(f"{n_q} questions, {n_opt} options: max |lm-eval - ours| {err:.3g} (relative {err / scale:.2g} "
        f"of max |loglik| {scale:.3g}); same choice on {same}/{n_q}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
