"""Apollo-MoE-7B: Qwen2-7B upcycled, 7 family experts in the last 2 of 28 layers, untied head.

10,059,897,344 parameters, 8,023,038,464 active per token (the paper's "10B / 8.02B").
The learning rate of the released 7B MoE run is not published; the dense Apollo2-7B used 1e-5.
Arguments: routing=hybrid|topk|language, moe_layers=last:N|all|none|i;j, expert_map=family7|major12|lang50.
"""

from apollo_jax import config as cfg


def get_config(arg=None):
  args = cfg.parse_arg(arg, **cfg.MOE_ARGS)
  c = cfg.base_config()
  m = c.model
  m.vocab_size, m.hidden_size, m.intermediate_size = 152064, 3584, 18944
  m.num_layers, m.num_heads, m.num_kv_heads = 28, 28, 4
  m.tie_embeddings = False
  m.dtype = "bfloat16"
  m.remat = "full"
  # Memory (README "Memory and FLOP plan"): tensor=2 halves the gathered expert weights, attention
  # scores and logits per device; on 8 devices fsdp=4, 1 row x 4096 tokens per batch shard and
  # micro-batch, 8 micro-batches per step of 32 rows; plan: 55.6 GB/device (fsdp=8: 80.6).
  c.mesh.tensor = 2
  c.grad_accum = 8
  cfg.apply_moe_args(c, args)
  cfg.needs_real_setup(c, "Qwen/Qwen2-7B")   # init_from, tokenizer, train_files: see apollo_jax/training/setup.py
  c.data.eval_fraction = 0.0        # never drop training data silently; evaluate on data.eval_files
  c.optim.lr = 1e-5
  return c
