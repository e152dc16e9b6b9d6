"""Apollo-MoE-0.5B: Qwen2-0.5B upcycled, 7 family experts in the last 2 layers (the released model).

650,938,496 parameters, 520,194,176 active per token. Recipe of the released run: lr 1e-4,
32 packed rows x 4096 tokens per step, warmup 3 %, cosine over 1.35 x the run, bf16.
Arguments: routing=hybrid|topk|language, moe_layers=last:N|all|none|i;j, expert_map=family7|major12|lang50.
Sizes, memory and learning rates: apollo_jax/config.py (SIZES).
"""

from apollo_jax import config as cfg


def get_config(arg=None):
  return cfg.released_config("0.5b", arg)
