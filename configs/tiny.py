"""Tiny Apollo-MoE for CPU: the main job (trains on the shipped sample in minutes) and the tests.

Same architecture as the released models (Post-MoE, last 2 of 4 layers, 7 family experts,
Hybrid-2 routing), scaled down. Arguments as the big configs, e.g.
`--config=configs/tiny.py:routing=topk,moe_layers=all,expert_map=major12`.
"""

from apollo_jax import config as cfg


def get_config(arg=None):
  args = cfg.parse_arg(arg, **cfg.MOE_ARGS)
  c = cfg.base_config()
  m = c.model
  m.vocab_size = 4096          # >= the shipped sample tokenizer's vocabulary
  m.hidden_size = 64
  m.intermediate_size = 128
  m.num_layers = 4
  m.num_heads = 4
  m.num_kv_heads = 2
  m.tie_embeddings = True
  cfg.apply_moe_args(c, args)
  c.moe.group_size = 256
  c.moe.capacity_factor = 2.0
  c.data.seq_len = 256
  c.global_batch = 8
  c.steps = 300
  c.eval_every = 50
  c.eval_batches = 4
  c.log_every = 10
  c.optim.lr = 3e-3
  c.optim.horizon = 1.0
  c.ckpt.every = 100
  c.ckpt.keep = 2
  return c
