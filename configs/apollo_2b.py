"""Apollo-MoE on Qwen2-1.5B (the "2B" model): 7 family experts in the last 2 of 28 layers.

2,039,187,968 parameters, 1,626,311,168 active per token. The learning rate of the
released 1.5B run is not published; 1e-4 follows the 0.5B recipe.
Arguments: routing=hybrid|topk|language, moe_layers=last:N|all|none|i;j, expert_map=family7|major12|lang50.
Sizes, memory and learning rates: apollo_jax/config.py (SIZES).
"""

from apollo_jax import config as cfg


def get_config(arg=None):
  return cfg.released_config("1.5b", arg)
