"""`python -m apollo_jax.params --config=configs/apollo_moe_7b.py` -> {"total_params": ..., "active_params": ...}.

Exact integer counts from `jax.eval_shape` of the model's init (nothing is allocated). Padded
experts (added only for expert parallelism) are left out; "active" counts the experts a token
uses (top_k routed experts, plus the shared expert when there is one), as the paper's
"10B total / 8.02B active" does for Apollo-MoE-7B.
"""

import json
import math

import jax
from absl import flags
from ml_collections import config_flags

from apollo_jax import cli, config as cfg
from apollo_jax.model.transformer import abstract_params


def count_params(config) -> dict:
  e_real, k = config.moe.num_experts, config.moe.top_k
  total = active = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params(config))[0]:
    names = [getattr(p, "key", str(p)) for p in path]
    size = math.prod(leaf.shape)
    if "experts" in names:                      # [E_pad, ...]: count real experts only
      per_expert = size // leaf.shape[0]
      total += e_real * per_expert
      active += k * per_expert
    else:
      total += size
      active += size
  return {"total_params": total, "active_params": active}


def main(argv):
  del argv
  config = cfg.validate(flags.FLAGS.config)
  print(json.dumps(count_params(config)))


if __name__ == "__main__":   # flags defined only here, so importing this module never clashes
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/apollo_moe_7b.py[:args].")
  cli.run(main)
