"""Apollo-MoE-7B: Qwen2-7B upcycled, 7 family experts in the last 2 of 28 layers, untied head.

10,059,897,344 parameters, 8,023,038,464 active per token (the paper's "10B / 8.02B").
The learning rate of the released 7B MoE run is not published; the dense Apollo2-7B used 1e-5.
Arguments: routing=hybrid|topk|language, moe_layers=last:N|all|none|i;j, expert_map=family7|major12|lang50.
Sizes, memory and learning rates: apollo_jax/config.py (SIZES).
"""

from apollo_jax import config as cfg


def get_config(arg=None):
  return cfg.released_config("7b", arg)
