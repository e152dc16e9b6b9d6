"""apollo_jax vs HF transformers (PyTorch) on the same model shape and tokens, side by side.

Both train the same architecture: Qwen2-MoE with the MoE in the last 2 layers (HF
`Qwen2MoeForCausalLM` with `mlp_only_layers`, no shared expert, built locally with random
weights), tied embeddings, float32, one AdamW step (with grad-norm clipping, as apollo_jax) per
measurement, plain top-k routing, exact on both sides (HF loops over experts; apollo_jax runs
moe.impl="dropless"). The two are alternated round by round in one process so machine noise hits
both alike. Also times one MoE layer against one dense FFN (forward + backward) at the same
tokens. Reported: best wall time per step, and best CPU time (less sensitive to other processes
on a shared machine; the ratio of the two systems is what matters).

  python benchmarks/vs_torch.py                 # the issue-8 shape: H512 I1536 8 layers, 4x512 tokens
  python benchmarks/vs_torch.py --quick         # tiny shapes (CI: still runnable)
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from apollo_jax import config as cfg  # noqa: E402
from apollo_jax.model import attention, dropless, layers  # noqa: E402
from apollo_jax.model.moe import MoEBlock  # noqa: E402
import moe_block  # noqa: E402
import train_step as ts_bench  # noqa: E402

QUICK = dict(hidden=32, inter=64, layers=3, heads=4, kv_heads=2, vocab=128, batch=2, seq=32, rounds=1)


def jax_config(a):
  c = cfg.load("tiny:routing=topk")
  m = c.model
  m.hidden_size, m.intermediate_size, m.num_layers = a.hidden, a.inter, a.layers
  m.num_heads, m.num_kv_heads, m.vocab_size, m.dtype = a.heads, a.kv_heads, a.vocab, "float32"
  c.moe.num_experts, c.moe.top_k, c.moe.layers, c.moe.impl = a.experts, a.top_k, "last:2", "dropless"
  c.data.seq_len, c.global_batch, c.steps = a.seq, a.batch, 1000
  c.optim.weight_decay = 0.1
  c.mesh.update(data=1, fsdp=-1, expert=1, tensor=1)
  return cfg.validate(c, jax.device_count())


def torch_model(a):
  import torch
  from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
  torch.manual_seed(0)
  hf = Qwen2MoeConfig(
      vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.inter, num_hidden_layers=a.layers,
      num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, num_experts=a.experts,
      num_experts_per_tok=a.top_k, moe_intermediate_size=a.inter, shared_expert_intermediate_size=0,
      mlp_only_layers=list(range(a.layers - 2)), norm_topk_prob=False, tie_word_embeddings=True,
      max_position_embeddings=a.seq, rope_theta=1e6, output_router_logits=False,
      router_aux_loss_coef=0.0)
  model = Qwen2MoeForCausalLM._from_config(hf, attn_implementation="sdpa", dtype=torch.float32)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
  return model, opt, getattr(model.config, "_experts_implementation", "?")


def torch_step(model, opt, ids, labels):
  import torch

  def run():
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()
  return run


def timed(fn):
  w, c = time.perf_counter(), time.process_time()
  fn()
  return time.perf_counter() - w, time.process_time() - c


def moe_vs_ffn(a, tokens):
  """(dense FFN, dropless MoE block) fwd+bwd best wall/cpu times at `tokens` x hidden."""
  B = tokens // a.seq
  x = jax.random.normal(jax.random.PRNGKey(0), (B, a.seq, a.hidden), jnp.float32)
  seg = jnp.ones((B, a.seq), jnp.int32)
  ffn = layers.MLP(a.inter, 0.02, jnp.float32)
  v_ffn = ffn.init(jax.random.PRNGKey(2), x)
  c = jax_config(a)
  block = MoEBlock(c)
  v_moe = block.init(jax.random.PRNGKey(3), x, seg, None, True)
  steps = {"dense_ffn": (moe_block.grad_step(ffn, v_ffn, x), v_ffn),
           "moe_dropless": (moe_block.grad_step(block, v_moe, x, seg, None, True), v_moe)}
  best = {k: [np.inf, np.inf] for k in steps}
  for k, (f, v) in steps.items():
    jax.block_until_ready(f(v, x))
  for _ in range(max(3, a.rounds)):
    for k, (f, v) in steps.items():
      w, cpu = timed(lambda: jax.block_until_ready(f(v, x)))
      best[k] = [min(best[k][0], w), min(best[k][1], cpu)]
  return best


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--hidden", type=int, default=512)
  p.add_argument("--inter", type=int, default=1536)
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--kv_heads", type=int, default=2)
  p.add_argument("--vocab", type=int, default=8192)
  p.add_argument("--experts", type=int, default=7)
  p.add_argument("--top_k", type=int, default=2)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--quick", action="store_true", help="tiny shapes, one round (CI)")
  a = p.parse_args()
  if a.quick:
    for k, v in QUICK.items():
      setattr(a, k, v)
  import torch

  rng = np.random.default_rng(0)
  ids = rng.integers(0, a.vocab, (a.batch, a.seq), dtype=np.int32)
  tokens = a.batch * a.seq

  config = jax_config(a)
  jax_run, state = ts_bench.build(config, input_ids=ids)
  model, opt, experts_impl = torch_model(a)
  t_ids = torch.from_numpy(ids.astype(np.int64))
  runs = {"torch": torch_step(model, opt, t_ids, t_ids.clone())}
  holder = {"state": state}

  def jax_step():
    holder["state"] = jax_run(holder["state"])
  runs["apollo_jax"] = jax_step
  for fn in runs.values():                 # compile / warm up
    fn()
  best = {k: [np.inf, np.inf] for k in runs}
  for _ in range(a.rounds):                # interleaved rounds
    for k, fn in runs.items():
      w, cpu = timed(fn)
      best[k] = [min(best[k][0], w), min(best[k][1], cpu)]
  layer = moe_vs_ffn(a, tokens)

  kernel = attention.resolve(config.model.attention, config.data.packing)
  print(f"\n{jax.devices()[0].device_kind} ({os.cpu_count()} cpus), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), jax {jax.__version__}")
  print(f"shape: H{a.hidden} I{a.inter} {a.layers} layers (MoE: last 2, {a.experts} experts top-{a.top_k}), "
        f"{a.heads} heads / {a.kv_heads} kv, vocab {a.vocab}, tied, {a.batch}x{a.seq} tokens, float32, "
        f"AdamW train step, best of {a.rounds} alternated rounds")
  print(f"torch experts: {experts_impl}, attention sdpa; apollo_jax: moe.impl=dropless "
        f"({dropless.default_kernel()} kernel), attention={kernel}\n")
  print(f"| {'':34s} | {'tokens/s (wall)':>15s} | {'tokens/s (cpu)':>15s} |")
  print(f"|{'-' * 36}|{'-' * 17}|{'-' * 17}|")
  for k, name in (("torch", "HF transformers Qwen2MoeForCausalLM"), ("apollo_jax", "apollo_jax")):
    print(f"| {name:34s} | {tokens / best[k][0]:15,.0f} | {tokens / best[k][1]:15,.0f} |")
  ratio = lambda i: best["torch"][i] / best["apollo_jax"][i]
  print(f"| {'apollo_jax / torch':34s} | {ratio(0):14.2f}x | {ratio(1):14.2f}x |")
  lr = lambda i: layer["moe_dropless"][i] / layer["dense_ffn"][i]
  print(f"| {'MoE layer / dense FFN (fwd+bwd)':34s} | {lr(0):14.2f}x | {lr(1):14.2f}x |")


if __name__ == "__main__":
  main()
