"""`python -m apollo_jax.params --config=configs/apollo_moe_7b.py` -> {"total_params": ..., "active_params": ...}.

Exact integer counts from `jax.eval_shape` of the model's init (nothing is allocated). Padded
experts (added only for expert parallelism) are left out; "active" counts the experts a token
uses (top_k routed experts, plus the shared expert when there is one), as the paper's
"10B total / 8.02B active" does for Apollo-MoE-7B.
"""

import json
from absl import flags
from ml_collections import config_flags

from apollo_jax import config as cfg
from apollo_jax.runtime import cli
from apollo_jax.model.size import count_params


def main(argv):
  del argv
  config = cfg.validate(flags.FLAGS.config)
  print(json.dumps(count_params(config)))


if __name__ == "__main__":   # flags defined only here, so importing this module never clashes
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/apollo_moe_7b.py[:args].")
  cli.run(main, required=("config",))
