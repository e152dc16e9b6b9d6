"""Data pipeline throughput at scale: streaming parse, pre-tokenised build, loader, in one run.

Generates a list-form ApolloMoEDataset file of --records conversations (real multilingual text
from data/sample, repeated to realistic lengths), then measures
  parse      records.iter_dataset_file alone (streaming JSON + validation)
  build_wN   token_cache.build with N tokenising processes (parse + template + tokenise + write)
  plan       one epoch's order + packing plan (mixture.order, packing.plan_rows)
  rows       TrainRows[i] (read arrays + pack one seq_len row), one thread
  grain      the training iterator as make_data builds it (batches of --rows_per_batch rows)
and compares the loader's tokens/s with what one optimizer step of an 8-GPU host consumes:
  need = gpus * peak_flops * mfu / model FLOPs per token (metrics.flops_per_token of --config),
by default 8 x H100 (989 TFLOP/s bf16 dense) at 40% MFU for Apollo-MoE-0.5B at seq_len 4096.

  python benchmarks/data_pipeline.py                                 # ~1 min on 2 CPUs
  python benchmarks/data_pipeline.py --records=200000 --workers=16 --tokenizer=qwen2/tokenizer.json
"""

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from apollo_jax.data import corpus as corpus_lib  # noqa: E402
from apollo_jax.data import pipeline, records, tfds_builders, token_cache  # noqa: E402
from apollo_jax.data import tokenizer as tok_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS_TOKENS = 2.5e9                 # ApolloMoEDataset major languages (paper)


def generate(path, n, seed=0):
  """n list-form records built from the sample's conversations, each turn repeated 1-6 times."""
  sample = json.load(open(os.path.join(ROOT, "data/sample/apollo_moe_sample.json"), encoding="utf-8"))
  rng = np.random.default_rng(seed)
  with open(path, "w", encoding="utf-8") as f:
    f.write("[")
    for i in range(n):
      item = sample[int(rng.integers(len(sample)))]
      conv = [{"from": t.get("from", ""), "value": " ".join([t["value"]] * int(rng.integers(1, 7)))}
              for t in item["conversations"]]
      f.write(("," if i else "") + json.dumps({"conversations": conv, "source": item["source"],
                                                "class": item.get("class", "major")}, ensure_ascii=False) + "\n")
    f.write("]")
  return os.path.getsize(path)


def timed(fn):
  t = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t


def cpu_seconds():
  """CPU time of this process and its finished children (the build's worker processes)."""
  me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def needed_tokens_per_s(a):
  import importlib
  from apollo_jax.training import metrics
  config = importlib.import_module(f"configs.{a.config}").get_config()
  config.data.seq_len = a.seq_len
  per_token = metrics.flops_per_token(config)
  return a.gpus * a.peak_flops * a.mfu / per_token, per_token


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--records", type=int, default=20000)
  p.add_argument("--workers", type=int, default=0, help="tokenising processes (0: every CPU)")
  p.add_argument("--tokenizer", default=os.path.join(ROOT, "data/sample/tokenizer.model"))
  p.add_argument("--seq_len", type=int, default=4096)
  p.add_argument("--rows", type=int, default=200, help="rows timed for the loader")
  p.add_argument("--rows_per_batch", type=int, default=4, help="rows per device per step")
  p.add_argument("--gpus", type=int, default=8)
  p.add_argument("--peak_flops", type=float, default=989e12, help="per GPU (H100 bf16 dense)")
  p.add_argument("--mfu", type=float, default=0.4)
  p.add_argument("--config", default="apollo_moe_0p5b")
  p.add_argument("--dir", default="", help="work folder (default: a temporary one, removed)")
  a = p.parse_args()
  work = a.dir or tempfile.mkdtemp(prefix="apollo_data_bench_")
  try:
    run(a, work)
  finally:
    if not a.dir:
      shutil.rmtree(work, ignore_errors=True)


def run(a, work):
  os.makedirs(work, exist_ok=True)
  path = os.path.join(work, "data.json")
  size, secs = timed(lambda: generate(path, a.records))
  print(f"generated {a.records} records, {size / 1e6:.1f} MB in {secs:.1f} s")
  tok = tok_lib.load_tokenizer(a.tokenizer)

  cpu0 = cpu_seconds()
  n, secs = timed(lambda: sum(1 for _ in records.iter_dataset_file(path)))
  cpu = cpu_seconds() - cpu0
  print(f"parse: {n / secs:,.0f} records/s, {size / secs / 1e6:.1f} MB/s ({secs:.1f} s wall, {cpu:.1f} CPU-s: "
        f"{size / cpu / 1e6:.1f} MB per CPU-second; the 13.5 GB file: ~{13.5e9 / (size / cpu) / 60:.0f} CPU-min)")

  workers = token_cache.default_workers(a.workers)
  for w in sorted({1, workers}):
    cpu0 = cpu_seconds()
    out, secs = timed(lambda: token_cache.build([path], tok, False, w, os.path.join(work, f"build_w{w}"), "bench"))
    cpu = cpu_seconds() - cpu0
    meta = tfds_builders.read_meta(out)
    print(f"build_w{w}: {meta['num_records'] / secs:,.0f} records/s, {meta['tokens'] / secs:,.0f} tokens/s, "
          f"{size / secs / 1e6:.1f} MB/s ({meta['tokens']:,} tokens, {secs:.1f} s wall, {cpu:.1f} CPU-s: "
          f"{meta['tokens'] / cpu:,.0f} tokens per CPU-second); the 2.5 B-token corpus: "
          f"~{CORPUS_TOKENS / (meta['tokens'] / secs) / 3600:.2f} h at this rate")
  corpus = corpus_lib.Corpus(out, tok)
  avg = float(np.mean(corpus.lengths))
  step_rows = a.gpus * a.rows_per_batch          # one data process per host feeds all its GPUs
  rows = pipeline.TrainRows(corpus, np.arange(len(corpus)), 3407, a.seq_len, "segment", tok.pad_id, step_rows, 0, 1)
  (_, offsets), secs = timed(lambda: rows.plan(0))
  n_rows = len(offsets) - 1
  full = CORPUS_TOKENS / avg / len(corpus)
  print(f"plan: {secs:.2f} s for {len(corpus):,} records (x{full:,.0f} for the full corpus: ~{secs * full:.0f} s "
        f"per epoch); {n_rows:,} rows of {a.seq_len}")
  k = min(a.rows, n_rows)
  _, secs = timed(lambda: [rows[i] for i in range(k)])
  rows_tps = k * a.seq_len / secs
  print(f"rows: {k / secs:,.0f} rows/s = {rows_tps:,.0f} tokens/s (one thread, avg sample {avg:.0f} tokens)")
  it = pipeline._grain_iter(rows, step_rows, 0)
  next(it)
  b = max(1, k // step_rows)
  _, secs = timed(lambda: [next(it) for _ in range(b)])
  grain_tps = b * step_rows * a.seq_len / secs
  print(f"grain: {b / secs:,.2f} batches/s of {step_rows}x{a.seq_len} = {grain_tps:,.0f} tokens/s (one process)")
  need, per_token = needed_tokens_per_s(a)
  step_tokens = step_rows * a.seq_len
  print(f"need: {a.gpus} GPUs x {a.peak_flops / 1e12:.0f} TFLOP/s x {a.mfu:.0%} MFU / {per_token / 1e9:.2f} GFLOP "
        f"per token ({a.config}) = {need:,.0f} tokens/s; a step of {step_tokens:,} tokens every "
        f"{step_tokens / need:.2f} s")
  print(f"headroom: one data process per host feeds {grain_tps / need:.1f}x what the {a.gpus} GPUs consume")


if __name__ == "__main__":
  main()
