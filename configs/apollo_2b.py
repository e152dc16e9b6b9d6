"""Apollo-MoE on Qwen2-1.5B (the "2B" model): 7 family experts in the last 2 of 28 layers.

2,039,187,968 parameters, 1,626,311,168 active per token. The learning rate of the
released 1.5B run is not published; 1e-4 follows the 0.5B recipe.
Arguments: routing=hybrid|topk|language, moe_layers=last:N|all|none|i;j, expert_map=family7|major12|lang50.
"""

from apollo_jax import config as cfg


def get_config(arg=None):
  args = cfg.parse_arg(arg, **cfg.MOE_ARGS)
  c = cfg.base_config()
  m = c.model
  m.vocab_size, m.hidden_size, m.intermediate_size = 151936, 1536, 8960
  m.num_layers, m.num_heads, m.num_kv_heads = 28, 12, 2
  m.tie_embeddings = True
  m.dtype = "bfloat16"
  m.remat = "full"
  # Memory (README "Memory and FLOP plan"): on 8 devices, 1 row x 4096 tokens per device and
  # micro-batch, 4 micro-batches per step of 32 rows; plan: 24.1 GB/device.
  c.grad_accum = 4
  cfg.apply_moe_args(c, args)
  cfg.needs_real_setup(c, "Qwen/Qwen2-1.5B")   # init_from, tokenizer, train_files: see apollo_jax/training/setup.py
  c.data.eval_fraction = 0.0        # never drop training data silently; evaluate on data.eval_files
  c.optim.lr = 1e-4
  return c
