"""Upcycle a dense model into Post-MoE: experts are copies of the dense FFN, the router is random."""

import jax
import jax.numpy as jnp
import numpy as np

from apollo_jax import config as cfg
from apollo_jax.hf.config import check_same_model
from apollo_jax.hf.load import finish_tree, join_layers, split_layers


def upcycle(dense_params, dense_config, moe_config, rng) -> dict:
  """Dense params -> Post-MoE params (docs/original.md, Upcycling): experts = copies of the dense FFN,
  router N(0, std).

  Everything the two models share is copied unchanged; padded experts are zero; a shared expert
  (if configured) is another copy of the FFN with its gate N(0, init_std). Not function-preserving
  (the chosen experts' un-normalised probabilities scale the FFN output), exactly as the original.
  """
  check_same_model(dense_config, moe_config, "dense config", "MoE config")
  top, layers = split_layers(jax.tree.map(np.asarray, dense_params), dense_config)
  src_moe = set(cfg.moe_layer_indices(dense_config.moe.layers, dense_config.model.num_layers))
  dst_moe = set(cfg.moe_layer_indices(moe_config.moe.layers, moe_config.model.num_layers))
  n, n_pad = moe_config.moe.num_experts, cfg.padded_num_experts(moe_config)
  h = moe_config.model.hidden_size
  out = []
  for i, layer in enumerate(layers):
    if i in src_moe:
      if i not in dst_moe:
        raise ValueError(f"layer {i} is MoE in the source config but dense in the target")
      out.append(layer)          # already MoE: copied as is (finish_tree checks the shapes)
      continue
    if i not in dst_moe:
      out.append(layer)
      continue
    ffn = layer["mlp"]
    rng, k_router, k_shared = jax.random.split(rng, 3)

    def experts(w):
      return np.concatenate([np.broadcast_to(w, (n,) + w.shape),
                             np.zeros((n_pad - n,) + w.shape, np.float32)]).astype(np.float32)

    router = np.asarray(jax.random.normal(k_router, (h, n), jnp.float32)) * moe_config.moe.router_init_std
    mlp = {"gate": {"kernel": router},
           "experts": {k: experts(ffn[k]["kernel"]) for k in ("gate_proj", "up_proj", "down_proj")}}
    if moe_config.moe.shared_expert:
      mlp["shared_expert"] = jax.tree.map(np.copy, ffn)
      gate = np.asarray(jax.random.normal(k_shared, (h, 1), jnp.float32)) * moe_config.model.init_std
      mlp["shared_expert_gate"] = {"kernel": gate}
    out.append({**layer, "mlp": mlp})
  return finish_tree(join_layers(top, out, moe_config), moe_config, "upcycled params")
