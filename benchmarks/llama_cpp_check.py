"""llama.cpp runs our GGUF export as we do: logits, greedy tokens and tokenisation compared.

  python benchmarks/llama_cpp_check.py                      # the tiny config, large random weights
  python benchmarks/llama_cpp_check.py --model=runs/tiny    # a trained workdir (any inference.load path)
  python benchmarks/llama_cpp_check.py --dtypes=f32,f16,q8_0 --new_tokens=40

Needs llama-cpp-python (not a requirement of this repository; see docs/hf.md#gguf for the
install); without it the script says so and exits 0. For each GGUF dtype and KV-cache type it
prints the largest |logit difference| over prompts + their greedy continuations (and relative to
the largest |logit|), how many greedy tokens llama.cpp picks as we do (`apollo_jax` generate, the
KV-cache decoder), and how many texts of the sample corpus (all 50 languages) plus edge cases it
tokenises to our ids.
"""

import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

PROMPTS = ["What is a fever?", "¿Qué es la diabetes?", "高血压有什么症状？", "Was hilft gegen Kopfschmerzen?"]
EDGE_TEXTS = ["a  b", "  x ", "x\n\n  y", "1234 5.67", "User:hi\nAssistant:ok", "😀 ∮ 𝔘", "tab\there", "</s> <s>"]


def random_lm():
  """The tiny config with the sample tokenizer and large random weights (norm scales 1 + 0.1 z,
  others 0.2 z), so logits are far from uniform and greedy picks are not near-ties."""
  from apollo_jax import config as cfg, inference
  from apollo_jax.data.tokenizer import load_tokenizer
  from apollo_jax.model.transformer import abstract_params
  c = cfg.load("tiny")
  c.moe.expert_multiple = 0
  rng = np.random.RandomState(0)
  flat, tree = jax.tree_util.tree_flatten_with_path(abstract_params(c))
  leaves = [(1 + 0.1 * rng.standard_normal(x.shape) if "norm" in jax.tree_util.keystr(p)
             else 0.2 * rng.standard_normal(x.shape)).astype(np.float32) for p, x in flat]
  tok = load_tokenizer(os.path.join(ROOT, "data/sample/tokenizer.model"))
  return inference.from_params(c, jax.tree.unflatten(tree, leaves), tok, devices=jax.devices()[:1])


def sample_texts():
  from apollo_jax.data import records
  samples, _ = records.read_dataset(os.path.join(ROOT, "data/sample/apollo_moe_sample.json"), False)
  return [t for s in samples for t in s.turns] + EDGE_TEXTS


class LlamaRun:
  """One llama.cpp context over a GGUF file: full-sequence logits and greedy decoding."""

  def __init__(self, llama_cpp, path, n_ctx, kv_f32, threads):
    kv = {"type_k": 0, "type_v": 0} if kv_f32 else {}                # 0 = GGML_TYPE_F32
    self.llm = llama_cpp.Llama(path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, logits_all=True,
                               verbose=False, **kv)

  def logits(self, ids):
    self.llm.reset()
    self.llm.eval(ids)
    return np.array(self.llm.scores[:len(ids)], np.float32)

  def greedy(self, ids, n, eos):
    self.llm.reset()
    self.llm.eval(ids)
    out = []
    for _ in range(n):
      t = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
      out.append(t)
      if t == eos:
        break
      self.llm.eval([t])
    return out

  def tokenize(self, text):
    return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) if text else []


def _matched(a, b):
  n = 0
  for x, y in zip(a, b):
    if x != y:
      break
    n += 1
  return n


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="", help="inference.load path (default: the tiny config, random weights)")
  p.add_argument("--dtypes", default="f32,q8_0", help="GGUF dtypes to check (f32, f16, bf16, q8_0)")
  p.add_argument("--new_tokens", type=int, default=20, help="greedy tokens per prompt")
  p.add_argument("--threads", type=int, default=2)
  a = p.parse_args(argv)
  try:
    import llama_cpp
  except ImportError:
    print("SKIP: llama_cpp is not importable (pip install llama-cpp-python; see docs/hf.md#gguf)")
    return 0
  from apollo_jax import inference
  from apollo_jax.hf import gguf_export
  lm = inference.load(a.model, devices=jax.devices()[:1]) if a.model else random_lm()
  eos = lm.tokenizer.eos_id
  prompts = [lm.chat_prompt([{"role": "user", "content": q}]) for q in PROMPTS]
  ours_gen = lm.generate(prompts, max_new_tokens=a.new_tokens)
  seqs = [pr + g for pr, g in zip(prompts, ours_gen)]
  ours_logits = [np.asarray(lm.logits([s]))[0] for s in seqs]
  scale = max(float(np.abs(x).max()) for x in ours_logits)
  texts = sample_texts()
  ours_ids = [lm.tokenizer.encode(t) for t in texts]
  n_ctx = max(len(s) for s in seqs) + a.new_tokens + 8
  print(f"model: {a.model or 'tiny config, random weights'}; llama-cpp-python {llama_cpp.__version__}; "
        f"{len(prompts)} prompts, {sum(map(len, seqs))} positions compared, max |logit| {scale:.3g}")
  print(f"{'gguf':>6} {'kv cache':>8} {'max |dlogit|':>13} {'relative':>9} {'greedy tokens':>14} "
        f"{'tokenisation':>13}")
  with tempfile.TemporaryDirectory() as tmp:
    for dtype in a.dtypes.split(","):
      path = os.path.join(tmp, f"model_{dtype}.gguf")
      gguf_export.export(lm, path, dtype)
      for kv_f32 in (True, False):
        run = LlamaRun(llama_cpp, path, n_ctx, kv_f32, a.threads)
        err = max(float(np.abs(run.logits(s) - x).max()) for s, x in zip(seqs, ours_logits))
        same = sum(_matched(run.greedy(pr, a.new_tokens, eos), g) for pr, g in zip(prompts, ours_gen))
        total = sum(map(len, ours_gen))
        tok_ok = sum(run.tokenize(t) == ids for t, ids in zip(texts, ours_ids)) if kv_f32 else None
        print(f"{dtype:>6} {'f32' if kv_f32 else 'f16':>8} {err:>13.3g} {err / scale:>9.2g} "
              f"{f'{same}/{total}':>14} {f'{tok_ok}/{len(texts)}' if tok_ok is not None else '':>13}")
        del run
  return 0


if __name__ == "__main__":
  sys.exit(main())
