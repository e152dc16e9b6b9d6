"""Parameter counts of a config's model, total and active per token, from shapes alone."""

import math

import jax

from apollo_jax.model.transformer import abstract_params


def count_params(config) -> dict:
  """Exact integer counts from `jax.eval_shape` of the init; padded experts are left out and
  "active" counts the top_k routed experts (plus the shared one), as "8.02B active" does."""
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
