"""Apollo-MoE-0.5B: Qwen2-0.5B upcycled, 7 family experts in the last 2 layers (the released model).

650,938,496 parameters, 520,194,176 active per token. Recipe of the released run: lr 1e-4,
32 packed rows x 4096 tokens per step, warmup 3 %, cosine over 1.35 x the run, bf16.
Arguments: routing=hybrid|topk|language, moe_layers=last:N|all|none|i;j, expert_map=family7|major12|lang50.
"""

from apollo_jax import config as cfg


def get_config(arg=None):
  args = cfg.parse_arg(arg, **cfg.MOE_ARGS)
  c = cfg.base_config()
  m = c.model
  m.vocab_size, m.hidden_size, m.intermediate_size = 151936, 896, 4864
  m.num_layers, m.num_heads, m.num_kv_heads = 24, 14, 2
  m.tie_embeddings = True
  m.dtype = "bfloat16"
  m.remat = "full"
  # Memory (README "Memory and FLOP plan"): on 8 devices, 2 rows x 4096 tokens per device and
  # micro-batch (as the original: 8 GPUs x 2 rows x 2 accumulation steps); plan: 20.8 GB/device.
  c.grad_accum = 2
  cfg.apply_moe_args(c, args)
  cfg.needs_real_setup(c, "Qwen/Qwen2-0.5B")   # init_from, tokenizer, train_files: see apollo_jax/training/setup.py
  c.data.eval_fraction = 0.0        # never drop training data silently; evaluate on data.eval_files
  c.optim.lr = 1e-4
  return c
